"""Log lines: plain by default, LOG_FORMAT=json one object per line, journald's own form."""

from __future__ import annotations

import io
import json
import logging
import os
import urllib.error
import urllib.request

import rig
from zfsmgr.logformat import (JournalFormatter, JsonFormatter, PlainFormatter, formatter,
                              under_journald)


def record(level=logging.WARNING, message="upload %s failed", args=("u1",)):
    return logging.LogRecord("zfsmgr.server", level, __file__, 1, message, args, None)


def test_json_lines_carry_the_plain_fields():
    line = JsonFormatter().format(record())
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message"} and "\n" not in line
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "WARNING", "zfsmgr.server", "upload u1 failed")
    assert entry["time"].endswith("+00:00")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "bad", (), sys.exc_info())
    entry = json.loads(JsonFormatter().format(failed))
    assert "ValueError: boom" in entry["exception"]


def test_journald_is_detected_by_device_and_inode_only(tmp_path):
    with open(tmp_path / "journal", "w") as stream:
        info = os.fstat(stream.fileno())
        mine = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert under_journald(stream, mine)
        assert not under_journald(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
        assert not under_journald(stream, {"JOURNAL_STREAM": "junk"})
        assert not under_journald(stream, {})
        assert isinstance(formatter("plain", stream, mine), JournalFormatter)
        assert isinstance(formatter("json", stream, mine), JsonFormatter)
        plain = formatter("plain", stream, {}).format(record())
        assert plain.endswith(" WARNING zfsmgr.server: upload u1 failed") and plain[:4].isdigit()
    assert JournalFormatter().format(record()) == "<4>WARNING zfsmgr.server: upload u1 failed"
    assert JournalFormatter().format(record(logging.INFO)).startswith("<6>INFO ")
    assert not under_journald(io.StringIO(), mine)


def test_server_logs_json_lines(server_factory):
    server = server_factory("dir", env={"LOG_FORMAT": "json"})
    with urllib.request.urlopen(server.url + "/health", timeout=10) as answer:
        assert answer.status == 200
    server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    assert any(e["message"].startswith("GET /health 200") for e in entries)
    assert any("listening on http://127.0.0.1:" in e["message"] for e in entries)


def test_plain_and_journal_lines_escape_what_would_start_a_line():
    forged = record(logging.INFO, "GET %s 401", ("/x\n2026-12-01 00:00:00,000 ERROR zfsmgr.server:"
                                                 " FORGED\r\x1b[2K\u2028",))
    for fmt in (PlainFormatter(), JournalFormatter()):
        line = fmt.format(forged)
        assert "\n" not in line and "\r" not in line and "\x1b" not in line, line
        assert line.endswith("GET /x\\n2026-12-01 00:00:00,000 ERROR zfsmgr.server: FORGED"
                             "\\r\\x1b[2K\\u2028 401")
    assert isinstance(formatter("plain", io.StringIO(), environ={}), PlainFormatter)


def test_a_path_cannot_forge_a_line_of_the_servers_log(server_factory):
    """The decoded path of a request refused without a key went into the log as it came:
    `%0a` started a line that looked like the server's own."""
    server = server_factory("dir")
    forged = "2026-12-01%2000:00:00,000%20ERROR%20zfsmgr.server:%20FORGED%20LINE"
    for path in (f"/upload-stream/%0a{forged}", f"/status%0d%0a{forged}"):
        try:
            urllib.request.urlopen(server.url + path, timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code in (401, 404)
    server.stop()
    lines = server.log().splitlines()
    assert any("FORGED LINE" in line for line in lines)
    assert not [line for line in lines if line.lstrip("\r").startswith("2026-12-01 00:00:00")]


def test_bad_log_format_is_a_one_line_error(pyz):
    done = rig.run_zfsmgr(["client", "status"], env={"LOG_FORMAT": "xml"})
    assert done.returncode == 2
    assert done.stderr.strip() == ("zfsmgr: error: LOG_FORMAT='xml' from environment is"
                                   " invalid: expected plain or json")


def test_under_journald_the_server_drops_its_timestamps(pyz, tmp_path):
    workdir = tmp_path / "server"
    workdir.mkdir()
    (workdir / "clients.json").write_text("[]")
    log = workdir / "server.log"  # the server's stderr: what systemd would connect to journald
    log.touch()
    info = os.stat(log)
    server = rig.ServerProcess(workdir, {
        "PORT": str(rig.free_port()), "HOST": "127.0.0.1", "STORAGE_DIR": str(workdir / "b"),
        "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}).start()
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=10) as answer:
            assert answer.status == 200
    finally:
        server.stop()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines
    assert any(line.startswith("<6>INFO zfsmgr.server: GET /health 200") for line in lines)
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamp of our own
