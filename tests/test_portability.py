"""The .pyz on every CPython 3.9+ this machine has, with no site-packages (-I -S)."""

from __future__ import annotations

import glob
import subprocess
import time
import urllib.request

import pytest

import rig

PYTHONS = sorted(set(glob.glob("/root/.pyenv/versions/3.*/bin/python3")
                     + glob.glob("/usr/bin/python3.*[0-9]")))


def version(python):
    out = subprocess.run([python, "-c", "import sys; print(sys.version_info[1])"],
                         capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


SUPPORTED = [p for p in PYTHONS if version(p) >= 9]


def test_at_least_the_running_python_is_checked():
    assert SUPPORTED or pytest.skip("no other interpreters on this machine")


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
