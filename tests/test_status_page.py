"""The status page at GET /, rendered by headless Chromium (Debian's package): the rows, the stale
row marked, sorting, and a screenshot whose pixels show the marked row."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zlib

import pytest

import rig

CHROMIUM = "/usr/bin/chromium"
ADMIN_KEY = "admin-page-secret"
STALE_RGB = (0xFF, 0xE0, 0x8A)  # tr.stale td, in page.STYLE
OK_TEXT_RGB = (0x17, 0x69, 0x2A)


def chromium(url, *args):
    """Run headless Chromium once with a throw-away profile; its stdout."""
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="chromium-", dir=rig.WORK)
    try:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", "--window-size=1200,700",
             *args, url], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def png_pixels(data):
    """(width, height, rows of (r, g, b)) of an 8-bit RGB or RGBA PNG, decoded with zlib."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    channels = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = previous[i]
            c = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) \
                    & 0xFF
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        previous = line
    return width, height, rows


def near(pixel, rgb, tolerance=6):
    return all(abs(p - q) <= tolerance for p, q in zip(pixel, rgb))


def test_png_decoder_reads_every_filter():
    width, height = 3, 5
    pixels = [[(x * 40 + y, y * 50, 200 - x * 10 - y) for x in range(width)] for y in range(height)]
    raw = b""
    for y, row in enumerate(pixels):  # filter type y % 5 in each line, encoded by hand
        line = bytes(v for p in row for v in p)
        prev = bytes(v for p in pixels[y - 1] for v in p) if y else bytes(len(line))
        kind = y % 5
        out = bytearray()
        for i, v in enumerate(line):
            a = line[i - 3] if i >= 3 else 0
            b, c = prev[i], prev[i - 3] if i >= 3 else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = [0, a, b, (a + b) // 2, a if pa <= pb and pa <= pc else b if pb <= pc else c]
            out.append((v - pred[kind]) & 0xFF)
        raw += bytes([kind]) + bytes(out)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert png_pixels(png) == (width, height, pixels)


def _post(url, path, body, client, key):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method="POST", headers={
        "X-Client-ID": client, "X-API-Key": key})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def upload(url, client, key, dataset, snapshot, when, data, parent=None):
    """One backup through the HTTP API, as a client sends it (a stream of `data`)."""
    opened = _post(url, "/upload", {
        "dataset": dataset, "snapshot": snapshot, "type": "incremental" if parent else "full",
        "parent": parent, "compression": "none", "snapshot_time": when,
        "estimated_size": len(data)}, client, key)
    _post(url, f"/upload-stream/{opened['upload_id']}/0", data, client, key)
    _post(url, f"/upload-stream/{opened['upload_id']}/commit", {
        "sha256": hashlib.sha256(data).hexdigest(), "parts_crc32": rig.parts_crc32([data]),
        "stored_size": len(data), "raw_size": len(data)}, client, key)


def test_status_page_in_headless_chromium(server_factory, tmp_path):
    late_key = "late-client-key"
    late = {"client_id": "late", "api_key": hashlib.sha256(late_key.encode()).hexdigest(),
            "enabled": True, "storage_type": "dir", "max_size_bytes": 1 << 30,
            "check_warn": "1s", "check_crit": "1h"}
    server = server_factory("dir", quota=1 << 30, extra_clients=[late], env={
        "ADMIN_API_KEY": hashlib.sha256(ADMIN_KEY.encode()).hexdigest()})
    fresh_ds, late_ds = "tank/fresh", "tank/late"
    now = int(time.time())
    upload(server.url, "late", late_key, late_ds, "s1", now - 5, b"late data" * 100)
    key = server.client_env["API_KEY"]
    upload(server.url, "client1", key, fresh_ds, "s1", now - 2, b"full stream" * 1000)
    upload(server.url, "client1", key, fresh_ds, "s2", now - 1, b"increment" * 100, parent="s1")

    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Basic " + "\u00e9".encode().decode("latin-1")}):
        # the last: UTF-8, not ASCII; it was a 500
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(server.url + "/", headers=headers))
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Basic realm=")

    base = f"http://admin:{ADMIN_KEY}@127.0.0.1:{server.port}/"
    dom = chromium(base + "?sort=client&order=asc", "--dump-dom")
    rows = re.findall(r'<tr class="(\w+)" data-client="([^"]+)" data-dataset="([^"]+)">(.*?)</tr>',
                      dom)
    assert [(state, client, dataset) for state, client, dataset, _ in rows] == [
        ("ok", "client1", fresh_ds), ("stale", "late", late_ds)]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[0][3])
    assert cells[3] == "2"  # chain: full + incremental
    assert "of 1.0 GiB" in cells[4] and cells[5] == "never" and cells[6] == "ok"
    assert re.fullmatch(r"\d+s ago", cells[2])
    late_cells = re.findall(r"<td[^>]*>(.*?)</td>", rows[1][3])
    assert late_cells[6] == "stale" and late_cells[3] == "1"
    assert "<script" not in dom

    by_client_desc = chromium(base + "?sort=client&order=desc", "--dump-dom")
    assert by_client_desc.index('data-client="late"') < by_client_desc.index(
        'data-client="client1"')

    shot = tmp_path / "page.png"
    chromium(base, f"--screenshot={shot}")
    shutil.copy(shot, rig.WORK / "status-page.png")  # kept for a look after the run
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 700)
    flat = [p for row in pixels for p in row]
    assert sum(1 for p in flat if near(p, STALE_RGB)) > 5000  # the stale row's background
    assert any(near(p, OK_TEXT_RGB, 30) for p in flat)  # the ok row's state text
    assert sum(1 for p in flat if max(p) < 100) > 500  # text was drawn: the page is not blank
    assert ADMIN_KEY not in server.log() and late_key not in server.log()
