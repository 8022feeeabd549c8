"""The documented reverse proxy, the README's ```nginx block, run by Debian's nginx in front of a
plain-HTTP zfsmgr: the same backup and restore go through it, part bodies streamed (nothing
spooled to nginx's body files)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

import rig

pytestmark = [pytest.mark.zfs]
README = rig.ROOT / "README.md"


def site_from_readme() -> str:
    """The one ```nginx block of the README, as a user copies it."""
    blocks = re.findall(r"^```nginx\n(.*?)^```$", README.read_text(), re.S | re.M)
    assert len(blocks) == 1, "the README must hold exactly one ```nginx block"
    return blocks[0]


class Nginx:
    """nginx in the foreground, one process, everything under `folder`."""

    def __init__(self, folder, site: str):
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "site.conf").write_text(site)
        temps = "\n".join(f"    {kind}_temp_path {folder}/{kind};" for kind in (
            "client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(
            f"daemon off;\nmaster_process off;\npid {folder}/nginx.pid;\n"
            f"error_log {folder}/error.log info;\nevents {{}}\nhttp {{\n"
            f"    access_log {folder}/access.log;\n{temps}\n    include {folder}/site.conf;\n}}\n")
        argv = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(folder / "stderr.log", "wb"))

    def wait(self, port: int) -> None:
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("nginx did not start: " + self.log())

    def log(self) -> str:
        return "".join((self.folder / name).read_text() for name in ("stderr.log", "error.log")
                       if (self.folder / name).exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def site_for(port: int, cert, key, upstream: int, access_log) -> str:
    """The documented site with this test's port, certificate and upstream substituted."""
    text = site_from_readme()
    for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                     ("/etc/ssl/zfsmgr/fullchain.pem", str(cert)),
                     ("/etc/ssl/zfsmgr/privkey.pem", str(key)),
                     ("proxy_pass http://127.0.0.1:8080;",
                      f"proxy_pass http://127.0.0.1:{upstream};"),
                     ("/var/log/nginx/zfsmgr.access.log", str(access_log))):
        assert old in text, f"the README's nginx site no longer has {old!r}"
        text = text.replace(old, new)
    for needed in ("proxy_request_buffering off;", "client_max_body_size 0;",
                   "proxy_http_version 1.1;", "proxy_buffering off;"):
        assert needed in text
    return text


def test_backup_and_restore_through_nginx(pool, server_factory, run_zfsmgr, tmp_path):
    ca = rig.TestCA(tmp_path / "pki")
    cert, key = ca.issue()
    server = server_factory("dir")  # plain HTTP on loopback, behind nginx
    port = rig.free_port()
    access_log = tmp_path / "nginx" / "zfsmgr.access.log"
    nginx = Nginx(tmp_path / "nginx", site_for(port, cert, key, server.port, access_log))
    try:
        nginx.wait(port)
        dataset = pool.create("data")
        mnt = pool.mountpoint(dataset)
        env = {**server.client_env, "SERVER_URL": f"https://127.0.0.1:{port}",
               "CA_FILE": str(ca.cert), "LOCAL_DATASET": dataset, "COMPRESS": "none"}
        (mnt / "big.bin").write_bytes(os.urandom(3 << 20))  # several 1 MiB parts
        rig.write_files(mnt, seed=1)
        run_zfsmgr(["client", "backup"], env=env, check=True)
        digest = rig.write_files(mnt, seed=2)
        second = run_zfsmgr(["client", "backup"], env=env, check=True)
        assert ": incremental," in second.stdout and "plain http" not in second.stderr
        restore_env = {k: env[k] for k in ("CLIENT_ID", "API_KEY", "SERVER_URL", "CA_FILE")}
        run_zfsmgr(["restore", "latest", f"{pool.name}/r"], env=restore_env, check=True)
        verify = run_zfsmgr(["restore", "verify", "--all"], env=restore_env)
        assert verify.returncode == 0, verify.stderr
        rig.sh("zfs", "set", f"mountpoint={pool.dir}/r", f"{pool.name}/r")
        rig.sh("zfs", "mount", f"{pool.name}/r", check=False)
        assert rig.tree_digest(pool.dir / "r") == digest
        secret = urllib.parse.urlencode({"client_id": env["CLIENT_ID"],
                                         "api_key": env["API_KEY"]})
        tls = ssl.create_default_context(cafile=str(ca.cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/rotation-policy?{secret}",
                                    context=tls, timeout=10) as answer:
            assert json.load(answer)["success"]  # the seed's query form works through nginx
        time.sleep(0.2)  # nginx writes the line once the response is done
        access = access_log.read_text()
        assert access.count("POST /upload-stream/") >= 5 and "GET /download" in access
        assert "GET /rotation-policy HTTP/1.1\" 200" in access
        assert env["API_KEY"] not in access and "api_key" not in access
        assert (tmp_path / "nginx" / "access.log").read_text() == ""  # the site's own log
        assert "/upload-stream/" in server.log()  # it went through to zfsmgr
        assert "buffered to a temporary file" not in nginx.log()  # streamed, not spooled

        # zfsmgr down behind nginx (a 502): the server is unreachable (exit 4), and
        # snapshot rotation goes on with the server's last policy, as without the proxy
        run_zfsmgr(["client", "rotate", "--dry-run"], env=env, check=True)  # caches the policy
        server.stop()
        status = run_zfsmgr(["client", "status"], env=env)
        assert status.returncode == 4 and "cannot reach it" in status.stderr, status.stderr
        rotated = run_zfsmgr(["client", "rotate", "--dry-run"], env=env)
        assert rotated.returncode == 0, rotated.stderr
        assert "server unreachable; using its last policy" in rotated.stderr
    finally:
        nginx.stop()
