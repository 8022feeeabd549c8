"""A commit that outlasts the client's REQUEST_TIMEOUT: an S3 compose of terabytes copies every
part server-side, for many minutes. The upload's state answers at once that the commit is under
way, and the client waits for it: the stream is sent once, the snapshot becomes the base, and
the next run is incremental. Played on SeaweedFS behind a relay that holds each UploadPartCopy
back (a provider's slow server-side copy); the client waits 2 s for an answer.
"""

from __future__ import annotations

import json
import re

import pytest

import rig
from hostile import auth_of, request
from s3relay import S3Relay, compose

pytestmark = [pytest.mark.zfs, pytest.mark.s3]

COPY_DELAY = 2.5  # seconds each part's server-side copy is held back: 3 parts, 7.5 s
TIMEOUT = "2s"


def _requests(log: str, pattern: str) -> list:
    """(path, seconds) of the server's access lines for requests whose path matches."""
    return [(m.group(1), float(m.group(2))) for m in re.finditer(
        rf"(?m)^.*? ({pattern}) \d{{3}} client=\S+ ([0-9.]+)s$", log)]


def test_a_commit_longer_than_the_request_timeout_is_waited_for_and_sent_once(
        pool, s3, server_factory):
    relay = S3Relay(s3["seaweed"].endpoint, slow=compose, delay=COPY_DELAY)
    try:
        server = server_factory("s3", env={"S3_ENDPOINT": relay.endpoint})
        dataset = pool.create("slow")
        rig.write_files(pool.mountpoint(dataset), seed=7, count=3, size=4 << 20)
        env = {**server.client_env, "LOCAL_DATASET": dataset, "COMPRESS": "none",
               "REQUEST_TIMEOUT": TIMEOUT}
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
