"""`restore verify`: prove that backups can be restored, without restoring them.

Every selected backup's chain must be whole, and every stored stream in those chains must
download completely with the size and sha256 its manifest records. With a scratch dataset each
chain is also received by `zfs recv` (into the scratch dataset, destroyed afterwards), which
checks the streams themselves. Each stream is downloaded once per pass.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from zfsmgr.errors import IntegrityError, UsageError, ZfsmgrError
from zfsmgr.protocol import Manifest
from zfsmgr.restore.chain import BrokenChain, chain_for, leaves
from zfsmgr.restore.listing import human_size, snapshot_id
from zfsmgr.restore.receive import StreamOpener, Target, receive_chain
from zfsmgr.restore.stream import reported
from zfsmgr.zfs import Zfs


class Report:
    """What verify found, printed as it goes."""

    def __init__(self, out: TextIO | None = None):
        self.out = out if out is not None else sys.stdout
        self.problems: list[str] = []
        self.checked = 0
        self.results: dict[str, tuple[bool, str]] = {}  # key: (ok, message); a failure sticks

    def ok(self, text: str, key: str = "") -> None:
        self.checked += 1
        if key and key not in self.results:
            self.results[key] = (True, "")
        print(f"ok       {text}", file=self.out, flush=True)

    def bad(self, text: str, keys: Sequence[str] = ()) -> None:
        self.problems.append(text)
        for key in keys:
            self.results[key] = (False, text)
        print(f"FAILED   {text}", file=self.out, flush=True)

    def as_request(self) -> dict:
        """The body of POST /verify-report."""
        return {"results": [{"key": k, "ok": ok, "message": message}
                            for k, (ok, message) in sorted(self.results.items())]}


def check_stream(open_stream: StreamOpener, manifest: Manifest, report: Report) -> None:
    """Download one stored stream completely and compare it with its manifest."""
    try:
        source = open_stream(manifest, snapshot_id(manifest.key))
        try:
            with reported(source, "read"):
                source.verify_whole()
        finally:
            source.close()
    except ZfsmgrError as exc:
        report.bad(str(exc) if manifest.key in str(exc) else f"{manifest.key}: {exc}",
                   [manifest.key])
        return
    what = "sha256 and size match" if source.verifiable else \
        "complete (no stored checksum: zfs checks the stream)"
    report.ok(f"{manifest.key}  {human_size(source.offset)}  {what}", manifest.key)


def verify(zfs: Zfs, open_stream: StreamOpener, manifests: Sequence[Manifest],
           selected: Sequence[Manifest], scratch: str | None = None,
           out: TextIO | None = None, report: Report | None = None) -> Report:
    """Check `selected` backups (and the chains under them); raise IntegrityError on trouble.

    `report` collects each key's outcome (for the server's record) even when it raises."""
    if scratch and zfs.exists(scratch):
        raise UsageError(f"scratch dataset {scratch} exists: name one that does not"
                         " (verify destroys it afterwards)")
    if scratch:  # a scratch this host cannot use (no such pool, a pool's root) fails here,
        Target(zfs, scratch).check()  # not as a verdict on the backups sent to the server
    report = report if report is not None else Report(out)
    needed: dict[str, Manifest] = {}
    whole: list[Manifest] = []
    for target in selected:
        try:
            chain = chain_for(manifests, target)
        except BrokenChain as exc:
            report.bad(str(exc), [target.key])
            needed.setdefault(target.key, target)
            continue
        whole.append(target)
        for manifest in chain:
            needed.setdefault(manifest.key, manifest)
    received = set()
    if scratch:
        for leaf in leaves(whole):
            chain = chain_for(manifests, leaf)
            received.update(_receive(zfs, open_stream, chain, scratch, report))
    for key, manifest in needed.items():
        if key not in received:
            check_stream(open_stream, manifest, report)
    streams = len(needed)
    if report.problems:
        first = report.problems[0]
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise IntegrityError(f"verify found {len(report.problems)} problem(s) in {streams}"
                             f" stream(s): {first}{more}")
    print(f"verified {streams} stream(s) of {len(selected)} backup(s): all well", file=report.out)
    return report


def _receive(zfs: Zfs, open_stream: StreamOpener, chain: Sequence[Manifest], scratch: str,
             report: Report) -> list[str]:
    """Receive one chain into the scratch dataset, then destroy it; return the keys settled
    (all of them on success, the one blamed by name on failure)."""
    target = Target(zfs, scratch)
    leaf = chain[-1]
    try:  # the scratch's own trouble (its parents cannot be made) is this host's, not a
        dest = target.prepare()  # backup's
    except BaseException:
        target.undo()
        raise
    try:
        target.received()
        receive_chain(zfs, open_stream, chain, dest)
    except ZfsmgrError as exc:
        text = str(exc)
        if not isinstance(exc, IntegrityError):
            text = f"{leaf.key}: receiving its chain into {scratch} failed: {text}"
        blamed = [m.key for m in chain if m.key in str(exc)]
        report.bad(text, blamed or [leaf.key])
        return blamed
    finally:
        target.undo()
    for manifest in chain:
        report.ok(f"{manifest.key}  received into {scratch}", manifest.key)
    return [m.key for m in chain]
