"""build_zipapp.py vendors exactly the wheels it pins: by sha256, never by file name alone."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil

import pytest

import rig


@pytest.fixture
def build(tmp_path, monkeypatch):
    """build_zipapp as a module, its wheel cache in a folder of this test's own."""
    spec = importlib.util.spec_from_file_location("build_zipapp", rig.ROOT / "build_zipapp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "WHEELS", tmp_path / "wheels")
    return module


def _good_copy(build, filename, folder):
    """A copy of a pinned wheel with its right bytes (from the real cache, else pip)."""
    source = rig.ROOT / "build" / "wheels" / filename
    if not source.is_file() or build.sha256_of(source) != build.WHEEL_SHA256[filename]:
        pin = next(p for p in build.pinned() if build.pinned_wheel(p)[0] == filename)
        build.download(pin, build.WHEEL_SHA256[filename], folder)
        return
    shutil.copy(source, folder / filename)


def test_every_pin_has_one_pure_wheel_and_sha256(build):
    pins = build.pinned()
    names = [build.pinned_wheel(pin)[0] for pin in pins]
    assert sorted(names) == sorted(build.WHEEL_SHA256)  # no hash without a pin, nor pin without
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in build.WHEEL_SHA256.values())


def test_a_cached_wheel_is_trusted_by_its_hash_not_its_name(build, monkeypatch):
    filename = "bottle-0.13.4-py2.py3-none-any.whl"
    build.WHEELS.mkdir()
    (build.WHEELS / filename).write_bytes(b"PK not the wheel at all")  # the right name only
    fetched = []

    def fake_download(pin, sha256, dest):
        fetched.append((pin, sha256))
        _good_copy(build, filename, dest)
    monkeypatch.setattr(build, "download", fake_download)
    path = build.wheel_for("bottle==0.13.4")
    assert fetched == [("bottle==0.13.4", build.WHEEL_SHA256[filename])]
    assert build.sha256_of(path) == build.WHEEL_SHA256[filename]
    assert build.wheel_for("bottle==0.13.4") == path and len(fetched) == 1  # now from cache


def test_a_download_that_does_not_match_stops_the_build(build, monkeypatch):
    filename = "waitress-3.0.2-py3-none-any.whl"

    def wrong_download(pin, sha256, dest):
        (dest / filename).write_bytes(b"something else")
    monkeypatch.setattr(build, "download", wrong_download)
    with pytest.raises(SystemExit, match="does not have the pinned sha256"):
        build.wheel_for("waitress==3.0.2")
    with pytest.raises(SystemExit, match="no sha256 pinned for waitress==9.9"):
        build.pinned_wheel("waitress==9.9")


def test_pip_itself_refuses_a_wheel_with_another_hash(build, tmp_path):
    with pytest.raises(SystemExit) as err:
        build.download("bottle==0.13.4", hashlib.sha256(b"not bottle").hexdigest(), tmp_path)
    assert "DO NOT MATCH THE HASHES" in str(err.value), err.value
    assert not list(tmp_path.glob("*.whl"))
