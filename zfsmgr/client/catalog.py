"""The server's manifests of the datasets a run backs up, and only of those.

A run asks `GET /snapshots?dataset=A&dataset=B…` for its own datasets, in batches (at most
protocol.MAX_QUERY_DATASETS names and URL_BUDGET bytes of query each), so what it reads follows
its selection, not the size of everything the client ever stored there. A batch whose answer
is larger than a client reads (protocol.MAX_ANSWER) is asked again in halves; a single dataset
whose own answer is that large fails alone, with that said in one line. An older server that
takes one `dataset` only (its answer names none) is asked once per dataset.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple
from urllib.parse import quote

from zfsmgr import protocol
from zfsmgr.errors import AnswerTooLarge, ZfsmgrError
from zfsmgr.remote import ServerClient

URL_BUDGET = 4000  # bytes of query per request: proxies refuse long request lines (nginx: 8k)


def batches(datasets: Sequence[str]) -> List[List[str]]:
    """The datasets in query-sized batches, in order."""
    out: List[List[str]] = []
    size = URL_BUDGET
    for name in datasets:
        cost = len("&dataset=") + len(quote(name, safe=""))
        if size + cost > URL_BUDGET or len(out[-1]) >= protocol.MAX_QUERY_DATASETS:
            out.append([])
            size = 0
        out[-1].append(name)
        size += cost
    return out


def manifests(api: ServerClient, datasets: Sequence[str]
              ) -> Tuple[Dict[str, List[dict]], Dict[str, ZfsmgrError]]:
    """({dataset: its manifests, oldest first}, {dataset: why they could not be read})."""
    found: Dict[str, List[dict]] = {d: [] for d in datasets}
    failed: Dict[str, ZfsmgrError] = {}
    todo = batches(list(dict.fromkeys(datasets)))
    while todo:
        batch = todo.pop(0)
        try:
            answer = api.call("GET", protocol.SNAPSHOTS, query=[("dataset", d) for d in batch])
        except AnswerTooLarge as exc:
            if len(batch) > 1:
                todo[:0] = [batch[:len(batch) // 2], batch[len(batch) // 2:]]
            else:
                failed[batch[0]] = AnswerTooLarge(
                    f"{batch[0]}: {exc} (its backups on the server: rotate them there)")
            continue
        if answer.get("datasets") != batch and len(batch) > 1:  # an older server
            todo[:0] = [[d] for d in batch]
            continue
        listed = answer.get("snapshots")
        for manifest in listed if isinstance(listed, list) else [None]:
            why = _malformed(manifest)
            if why:  # the server's fault: its datasets fail, each in one line, the run goes on
                for name in batch if not isinstance(manifest, dict) or \
                        manifest.get("dataset") not in found else [manifest["dataset"]]:
                    failed.setdefault(name, ZfsmgrError(
                        f"the server's listing of {name}'s backups is malformed: {why}"))
            elif manifest["dataset"] in found:
                found[manifest["dataset"]].append(manifest)
    for name in failed:  # nothing half-read of a dataset that failed
        found[name] = []
    return found, failed


def _malformed(manifest) -> str:
    """Why a manifest of a listing is not one the client can use ('' when it is): what a run
    reads of it (the rest is restore's, which checks it whole)."""
    if not isinstance(manifest, dict):
        return "an entry that is no object"
    try:
        protocol.validate_dataset(manifest.get("dataset"))
        protocol.validate_snapshot(manifest.get("snapshot"))
        protocol.validate_epoch(manifest.get("snapshot_time"))
        protocol.validate_choice(manifest.get("type"), "backup type", protocol.BACKUP_TYPES)
        if manifest.get("guid") not in (None, ""):
            protocol.validate_guid(manifest["guid"])
    except ValueError as exc:  # ValidationError
        return str(exc)
    return ""
