"""HTTPS in `zfsmgr server` (TLS_CERT/TLS_KEY) with a test CA made by openssl: backup and restore
over it, a wrong CA refused, TLS 1.2 the minimum, SIGHUP reloading the certificate, and the
client's warning for plain HTTP (decided from the URL: no traffic leaves loopback)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import ssl
import struct
import time

import pytest

import rig
from zfsmgr import protocol
from zfsmgr import remote
from zfsmgr.remote import ServerClient


@pytest.fixture
def ca(tmp_path):
    return rig.TestCA(tmp_path / "pki", "ca")


def handshake(port: int, cafile, **limits) -> str:
    """The TLS version a handshake with the server settles on (raises when refused)."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this side offer old versions
    for name, value in limits.items():
        setattr(context, name, value)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.version()


def issuer_of(port: int) -> str:
    """The CN of the CA that signed the certificate the server presents now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    pem = ssl.DER_cert_to_PEM_cert(der)
    return rig.sh("openssl", "x509", "-noout", "-issuer", input=pem.encode()).strip()


@pytest.mark.zfs
def test_backup_and_restore_over_https(pool, server_factory, run_zfsmgr, ca):
    server = server_factory("dir", tls=ca)
    assert server.url.startswith("https://")
    dataset = pool.create("data")
    env = {**server.client_env, "LOCAL_DATASET": dataset}
    (pool.mountpoint(dataset) / "big.bin").write_bytes(os.urandom(4 << 20))  # > RAW_LIMIT
    digests = [rig.write_files(pool.mountpoint(dataset), seed=1)]
    first = run_zfsmgr(["client", "backup"], env=env, check=True)
    digests.append(rig.write_files(pool.mountpoint(dataset), seed=2))
    second = run_zfsmgr(["client", "backup"], env=env, check=True)
    assert ": incremental," in second.stdout
    assert "plain http" not in first.stderr + second.stderr
    run_zfsmgr(["restore", "latest", f"{pool.name}/r"], env=server.client_env, check=True)
    rig.sh("zfs", "set", f"mountpoint={pool.dir}/r", f"{pool.name}/r")
    rig.sh("zfs", "mount", f"{pool.name}/r", check=False)
    assert rig.tree_digest(pool.dir / "r") == digests[1]
    assert "listening on https://" in server.log()


def test_a_wrong_ca_or_none_is_refused(server_factory, run_zfsmgr, ca, tmp_path):
    server = server_factory("dir", tls=ca)
    other = rig.TestCA(tmp_path / "other", "other")
    env = {**server.client_env}
    assert run_zfsmgr(["restore", "list"], env=env).returncode == 0  # the right CA
    for ca_file in (str(other.cert), ""):  # another CA; the system CAs
        env["CA_FILE"] = ca_file
        refused = run_zfsmgr(["restore", "list"], env=env)
        assert refused.returncode == 1, refused.stderr
        assert "cannot verify the certificate" in refused.stderr
        assert env["API_KEY"] not in refused.stderr
    assert "GET /snapshots" in server.log() and server.log().count("GET /snapshots") == 1


def test_tls_1_2_is_the_minimum(server_factory, ca):
    server = server_factory("dir", tls=ca)
    assert handshake(server.port, ca.cert) == "TLSv1.3"
    assert handshake(server.port, ca.cert, maximum_version=ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError) as refused:
        handshake(server.port, ca.cert, minimum_version=ssl.TLSVersion.TLSv1,
                  maximum_version=ssl.TLSVersion.TLSv1_1)
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value)  # the server's alert, not ours
    plain = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP to an HTTPS port
    plain.settimeout(5)
    assert b"200 OK" not in plain.recv(4096)
    plain.close()
    still = ServerClient(server.url, "client1", "k", str(ca.cert))
    assert still.call("GET", protocol.HEALTH)["success"]  # serving on


def test_sighup_reloads_the_certificate(server_factory, ca, tmp_path):
    server = server_factory("dir", tls=ca)
    assert "zfsmgr test ca" in issuer_of(server.port)
    renewed = rig.TestCA(tmp_path / "renewed", "renewed")
    cert, key = renewed.issue()
    (tmp_path / "pki" / "server.crt").write_bytes(cert.read_bytes())
    (tmp_path / "pki" / "server.key").write_bytes(key.read_bytes())
    server.proc.send_signal(signal.SIGHUP)
    rig.wait_until(lambda: "certificate reloaded" in server.log(), 10,
                   "the server reloaded its certificate", interval=0.1)
    assert "zfsmgr test renewed" in issuer_of(server.port)
    assert ServerClient(server.url, "client1", "k", str(renewed.cert)).call(
        "GET", protocol.HEALTH)["success"]
    (tmp_path / "pki" / "server.key").write_text("not a key")  # a broken renewal
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 10
    while "not reloaded" not in server.log() and time.time() < deadline:
        time.sleep(0.1)
    assert "certificate not reloaded, the old one stays" in server.log()
    assert "zfsmgr test renewed" in issuer_of(server.port)
    assert server.proc.poll() is None


def test_sighup_without_tls_keeps_the_server_serving(server_factory):
    """The unit's ExecReload sends SIGHUP whether or not TLS is on; its default action ended
    a plain-http server (behind nginx), mid-upload, and Restart=on-failure left it down."""
    server = server_factory("dir")
    server.proc.send_signal(signal.SIGHUP)
    rig.wait_until(lambda: "SIGHUP: no TLS certificate to reload" in server.log(), 10,
                   "the server noted the SIGHUP", interval=0.1)
    assert server.proc.poll() is None
    assert ServerClient(server.url, "client1", "k").call("GET", protocol.HEALTH)["success"]


def test_a_bad_certificate_stops_the_start(tmp_path, run_zfsmgr, ca):
    cert, _ = ca.issue()
    env = {"PORT": str(rig.free_port()), "HOST": "127.0.0.1", "STORAGE_DIR": str(tmp_path),
           "TLS_CERT": str(cert)}
    missing = run_zfsmgr(["server"], env=env, cwd=tmp_path, timeout=30)
    assert missing.returncode == 2 and "TLS_KEY is not set" in missing.stderr
    env["TLS_KEY"] = str(tmp_path / "nowhere.key")
    broken = run_zfsmgr(["server"], env=env, cwd=tmp_path, timeout=30)
    assert broken.returncode == 2 and "cannot be loaded" in broken.stderr


@pytest.mark.parametrize("url,warned", [
    ("http://backup.example.com:8080", True), ("http://192.0.2.10:8080", True),
    ("http://[2001:db8::1]:8080", True), ("http://127.0.0.2:8080", False),
    ("http://localhost:8080", False), ("http://[::1]:8080", False),
    ("https://backup.example.com", False)])
def test_plain_http_to_a_host_that_is_not_loopback_warns(url, warned, capsys, monkeypatch):
    monkeypatch.setattr(remote, "_warned", set())  # a fresh process: other tests warned already
    ServerClient(url, "c1", "secret-key-value")  # no connection is made here
    err = capsys.readouterr().err
    assert ("is plain http" in err) == warned
    assert "secret-key-value" not in err
    if warned:  # once per run (per process), so each cron run says it again
        ServerClient(url, "c1", "secret-key-value")
        assert capsys.readouterr().err == ""


def test_status_over_https_is_the_same_api(server_factory, ca):
    server = server_factory("dir", tls=ca)
    api = ServerClient(server.url, "client1", server.client_env["API_KEY"], str(ca.cert))
    status = api.call("GET", protocol.STATUS)
    assert status["client_id"] == "client1" and status["snapshot_count"] == 0


def test_connections_reset_mid_part_give_back_the_clients_share(server_factory, ca):
    """A connection reset (or a TLS error) mid-body closes the channel past waitress's
    handle_close: the gate's count of bodies arriving must be given back all the same, or after
    CLIENT_MAX_REQUESTS such drops every part of the client got 429 until a restart."""
    server = server_factory("dir", tls=ca, env={"CLIENT_MAX_REQUESTS": "2"})
    key = server.client_env["API_KEY"]
    api = ServerClient(server.url, "client1", key, str(ca.cert))
    session = api.call("POST", protocol.UPLOAD, {
        "dataset": "tank/data", "snapshot": "s1", "type": "full", "compression": "none",
        "snapshot_time": 1700000000, "estimated_size": 0})
    path = protocol.UPLOAD_PART.format(upload_id=session["upload_id"], index=0)
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Client-ID: client1\r\nX-API-Key: {key}\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    context = ssl.create_default_context(cafile=str(ca.cert))
    for _ in range(4):
        tls = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port),
                                                           timeout=5),
                                  server_hostname="127.0.0.1")
        tls.sendall(head + b"x" * 1000)
        time.sleep(0.5)  # the server has the headers: the body is counted
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()  # no close_notify, an RST
    data = os.urandom(3000)
    assert api.put_part(session["upload_id"], 0, [data])["success"]  # before: 429
    api.call("POST", protocol.UPLOAD_COMMIT.format(upload_id=session["upload_id"]), {
        "sha256": hashlib.sha256(data).hexdigest(), "parts_crc32": rig.parts_crc32([data]),
        "stored_size": len(data), "raw_size": len(data)})
    assert api.call("GET", protocol.STATUS)["snapshot_count"] == 1
