"""Helpers for tests that play a hostile or careless client against a real server process."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import time
import zlib

import rig


def client_entry(client_id: str, key: str, quota: int = 0, storage: str = "dir") -> dict:
    """A clients.json entry for a further client of a server_factory server."""
    return {"client_id": client_id, "api_key": hashlib.sha256(key.encode()).hexdigest(),
            "max_size_bytes": quota, "dataset": "", "enabled": True, "storage_type": storage}


def request(url: str, method: str, path: str, body=None, headers=None, timeout=10.0):
    """(status, decoded JSON or raw bytes, seconds) of one request on a fresh connection."""
    host, port = url.split("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    started = time.monotonic()
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = raw
    return response.status, data, time.monotonic() - started


def auth_of(env: dict) -> dict:
    """The auth headers of a server_factory client_env."""
    return {"X-Client-ID": env["CLIENT_ID"], "X-API-Key": env["API_KEY"]}


def open_upload(url: str, headers: dict, when: int = 1700000000, dataset="tank/data",
                estimate: int = 0, compression: str = "none"):
    """POST /upload for a full backup; the session's JSON (asserts 200)."""
    status, data, _ = request(url, "POST", "/upload", {
        "dataset": dataset, "snapshot": f"s{when}", "type": "full",
        "compression": compression, "snapshot_time": when, "estimated_size": estimate},
        headers)
    assert status == 200, data
    return data


def send_parts(url: str, headers: dict, session: dict, data: bytes):
    """Send `data` as the session's parts; the statuses, and the commit request it makes."""
    size = session["part_size"]
    pieces = [data[i:i + size] for i in range(0, len(data), size)]
    statuses = []
    for index, piece in enumerate(pieces):
        status, answer, _ = request(url, "POST", f"/upload-stream/{session['upload_id']}/{index}",
                                    piece, headers)
        statuses.append(status)
        if status != 200:
            break
    commit = {"sha256": hashlib.sha256(data).hexdigest(), "parts_crc32": rig.parts_crc32(pieces),
              "stored_size": len(data), "raw_size": len(data)}
    return statuses, commit


def commit(url: str, headers: dict, session: dict, declaration: dict):
    """POST the commit; (status, answer)."""
    status, answer, _ = request(url, "POST", f"/upload-stream/{session['upload_id']}/commit",
                                declaration, headers)
    return status, answer


def headers_only(url: str, head: bytes, timeout: float = 5.0) -> bytes:
    """Send a request's head and no body; what the server answers before `timeout` (b"" if
    nothing)."""
    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
    return b"".join(chunks)


def crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"
