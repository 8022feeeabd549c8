"""A commit that outlasts the client's REQUEST_TIMEOUT: an S3 compose of terabytes copies every
part server-side, for many minutes. The upload's state answers at once that the commit is under
way, and the client waits for it: the stream is sent once, the snapshot becomes the base, and
the next run is incremental. A commit that fails meanwhile is the client's one-line error, as
if it had been answered; an abort while it runs is refused, and an interrupted client leaves
its snapshot for the next run to adopt. Played on SeaweedFS behind a relay that holds each
UploadPartCopy back (a provider's slow server-side copy); the client waits 2 s for an answer.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

import rig
from hostile import auth_of, request
from s3relay import ANSWERS, S3Relay, compose

pytestmark = [pytest.mark.zfs, pytest.mark.s3]

COPY_DELAY = 2.5  # seconds each part's server-side copy is held back: 3 parts, 7.5 s
TIMEOUT = "2s"


def _backed_by(relay, pool, server_factory, name: str, seed: int):
    """(server, dataset, client env): an S3 server through `relay`, a dataset of 12 MiB (three
    parts), a client that waits TIMEOUT for each answer."""
    server = server_factory("s3", env={"S3_ENDPOINT": relay.endpoint})
    dataset = pool.create(name)
    rig.write_files(pool.mountpoint(dataset), seed=seed, count=3, size=4 << 20)
    return server, dataset, {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "none",
                             "REQUEST_TIMEOUT": TIMEOUT}


def _requests(log: str, pattern: str) -> list:
    """(path, seconds) of the server's access lines for requests whose path matches."""
    return [(m.group(1), float(m.group(2))) for m in re.finditer(
        rf"(?m)^.*? ({pattern}) \d{{3}} client=\S+ ([0-9.]+)s$", log)]


def test_a_commit_longer_than_the_request_timeout_is_waited_for_and_sent_once(
        pool, s3, server_factory):
    relay = S3Relay(s3["seaweed"].endpoint, slow=compose, delay=COPY_DELAY)
    try:
        server, dataset, env = _backed_by(relay, pool, server_factory, "slow", 7)
        done = rig.run_zfsmgr(["client", "backup", "--json"], env=env)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["datasets"][0]["type"] == "full", report
        assert len(relay.held) >= 2, relay.held  # the compose took longer than the timeout
        assert "timed out; retry 1 in 1s" in done.stderr  # the commit's own request
        assert re.search(r"the server is still committing upload [0-9a-f]{32} of"
                         rf" {re.escape(dataset)} \(for [0-9.]+ s\): waiting for it",
                         done.stderr), done.stderr
        assert "retry 2" not in done.stderr, done.stderr  # one lost answer, then waiting

        log = server.log()
        upload = re.search(r"upload ([0-9a-f]{32}) committed", log).group(1)
        parts = _requests(log, rf"POST /upload-stream/{upload}/\d+")
        looks = _requests(log, rf"GET /upload-stream/{upload}")
        status, listed, _ = request(server.url, "GET", f"/snapshots?dataset={dataset}",
                                    headers=auth_of(server.client_env))
        assert status == 200, listed
        backups = listed["snapshots"]
        assert [b["type"] for b in backups] == ["full"], backups
        assert len(parts) == backups[0]["parts"] == 3, parts  # the stream went once
        assert looks and all(seconds < 1.0 for _, seconds in looks), looks  # answered at once
        snaps = rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset)
        assert snaps.split() == [f"{dataset}@{backups[0]['snapshot']}"], snaps  # the base

        relay.delay = 0.0
        rig.write_files(pool.mountpoint(dataset), seed=8, count=1, size=1 << 20)
        again = rig.run_zfsmgr(["client", "backup", "--json"], env=env)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["datasets"][0]["type"] == "incremental"
        assert "Traceback" not in server.log()
    finally:
        relay.shutdown()


def _client(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client", "backup"],
                            env=rig.clean_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_slow_commit_that_fails_is_the_clients_error_and_the_stream_goes_once(
        pool, s3, server_factory):
    """The compose is slow, then the provider has no room: the client, no longer waiting for
    the commit's answer, learns the 507 from the upload's state (it sent the whole stream
    again, and again timed out, for the ~7.5 minutes of its retries)."""
    relay = S3Relay(s3["seaweed"].endpoint, "XMinioStorageFull", refuse=compose, slow=compose,
                    delay=3.5)
    try:
        server, dataset, env = _backed_by(relay, pool, server_factory, "full", 9)
        done = rig.run_zfsmgr(["client", "backup"], env=env, timeout=120)
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("zfsmgr: error: server refused (507): S3 bucket"), done.stderr
        assert ANSWERS["XMinioStorageFull"][1] in last, last
        assert "retry 2" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        log = server.log()
        upload = re.search(r"upload ([0-9a-f]{32}) opened", log).group(1)
        assert len(_requests(log, rf"POST /upload-stream/{upload}/\d+")) == 3  # sent once
        assert rig.sh("zfs", "list", "-H", "-t", "snapshot", "-r", dataset).strip() == ""
        assert f"upload {upload} aborted" in log  # nothing stays staged
    finally:
        relay.shutdown()


def test_an_interrupted_client_leaves_a_committing_upload_and_the_next_run_adopts_it(
        pool, s3, server_factory):
    """Ctrl-C while the server composes: the client's abort is refused at once (409), not
    queued behind the commit, and the snapshot stays; once the commit is in, the next run
    keeps it as the base and sends its incremental from it."""
    relay = S3Relay(s3["seaweed"].endpoint, slow=compose, delay=COPY_DELAY)
    try:
        server, dataset, env = _backed_by(relay, pool, server_factory, "stop", 10)
        proc = _client(env)
        rig.wait_until(lambda: relay.held, 60, "the compose began")
        upload = re.search(r"upload ([0-9a-f]{32}) opened", server.log()).group(1)
        status, answer, seconds = request(server.url, "POST", f"/upload-stream/{upload}/abort",
                                          headers=auth_of(server.client_env))
        assert status == 409 and answer["committing"] is True and seconds < 1.0, answer
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, err
        assert f"upload {upload} of {dataset} is committing on the server: its snapshot" \
               " stays" in err, err
        assert "Traceback" not in err, err
        rig.wait_until(lambda: f"upload {upload} committed" in server.log(), 60,
                       "the commit ended")
        snaps = rig.sh("zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r", dataset)
        assert len(snaps.split()) == 1, snaps  # the interrupted run's snapshot stayed

        relay.delay = 0.0
        rig.write_files(pool.mountpoint(dataset), seed=11, count=1, size=1 << 20)
        again = rig.run_zfsmgr(["client", "backup", "--json"], env=env)
        assert again.returncode == 0, again.stderr
        assert "the server committed it" in again.stderr, again.stderr  # adopted
        assert json.loads(again.stdout)["datasets"][0]["type"] == "incremental"
        assert "Traceback" not in server.log()
    finally:
        relay.shutdown()
