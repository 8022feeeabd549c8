"""The .pyz on every CPython 3.9+ this machine has, with no site-packages (-I -S)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

import rig


def interpreters() -> list:
    """Every CPython 3 this machine has, found rather than named: the running one, each
    python3.N on PATH, and pyenv's versions; one path per real executable."""
    found = {os.path.realpath(sys.executable): sys.executable}
    folders = os.environ.get("PATH", "").split(os.pathsep)
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    folders += sorted(glob.glob(os.path.join(root, "versions", "*", "bin")))
    for folder in folders:
        if os.path.basename(folder) == "shims":  # pyenv's wrappers of the versions below
            continue
        for path in sorted(glob.glob(os.path.join(folder, "python3*"))):
            if re.fullmatch(r"python3(\.\d+)?", os.path.basename(path)) and \
                    os.access(path, os.X_OK):
                found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


def version(python):
    out = subprocess.run([python, "-c", "import sys; print(sys.version_info[1])"],
                         capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


SUPPORTED = [p for p in interpreters() if version(p) >= 9]


def test_the_running_python_is_among_those_checked():
    assert os.path.realpath(sys.executable) in {os.path.realpath(p) for p in SUPPORTED}


@pytest.mark.parametrize("python", SUPPORTED)
def test_pyz_runs_server_and_imports_s3_with_no_site_packages(python, pyz, tmp_path):
    assert subprocess.run([python, "-I", "-S", str(pyz), "--version"], capture_output=True,
                          text=True, check=True).stdout.startswith("zfsmgr ")
    for group in ("server", "client", "restore"):
        subprocess.run([python, "-I", "-S", str(pyz), group, "help"], capture_output=True,
                       check=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from zfsmgr.storage.s3 import S3Store; "
             "S3Store('127.0.0.1:9', 'a', 'b', 'bucket', secure=False); print('ok')")
    assert subprocess.run([python, "-I", "-S", "-c", probe, str(pyz)], capture_output=True,
                          text=True, check=True).stdout.strip() == "ok"
    port = rig.free_port()
    server = subprocess.Popen([python, "-I", "-S", str(pyz), "server"], cwd=tmp_path,
                              env={"PORT": str(port), "HOST": "127.0.0.1", "PATH": "/usr/bin"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize("python", SUPPORTED)
def test_a_commit_time_with_z_counts_on_every_python(python, pyz):
    """Python before 3.11 reads no "Z" in fromisoformat: a manifest of another writer's
    counted as committed in 1970, so MIN_RETAIN_DAYS no longer protected it."""
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "from zfsmgr.protocol import Manifest; "
             "from zfsmgr.server.rotation import committed_at; "
             "print(committed_at(Manifest(key='c/k.zfs', client_id='c', dataset='tank/d',"
             " snapshot='s', type='full', parent=None, compression='none', raw_size=1,"
             " stored_size=1, sha256='', created=sys.argv[2], snapshot_time=0.0)))")
    for created in ("2026-11-30T12:00:00Z", "2026-11-30T12:00:00+00:00"):
        out = subprocess.run([python, "-I", "-S", "-c", probe, str(pyz), created],
                             capture_output=True, text=True, check=True).stdout
        assert float(out) == 1796040000.0, (python, created)


def test_a_python_without_sqlite3_gets_one_line_from_the_server_only(pyz, tmp_path):
    """FreeBSD's Python comes without its sqlite3 module (py39-sqlite3 is a package of its
    own): the server was an internal error naming `_sqlite3`. The client, restore and the
    commands that only edit clients.json need no catalog."""
    probe = ("import sys; sys.modules['_sqlite3'] = None; sys.path.insert(0, sys.argv[1]);"
             " from zfsmgr.cli import main; sys.exit(main(sys.argv[2:]))")

    def run(*args):
        return subprocess.run([sys.executable, "-I", "-S", "-c", probe, str(pyz), *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=60)

    for args in (["server"], ["server", "clients"], ["server", "reindex"]):
        done = run(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("zfsmgr: error: the server keeps its catalog in SQLite")
        assert len(done.stderr.splitlines()) == 1
    checked = run("server", "check")
    assert checked.returncode == 3 and "no sqlite3 module" in checked.stdout
    assert run("server", "add-client", "web1").returncode == 0
    assert run("server", "disable", "web1").returncode == 0
    assert run("client", "help").returncode == 0 and run("restore", "help").returncode == 0
