"""Restoring a tree of datasets: a source dataset with its descendants (`--recursive`), or every
dataset of the client (`latest --all`), each with its own chain, under one target.

Which backup of each dataset: for `restore N --recursive`, the newest backup of the source
dataset and of each descendant taken no later than backup N; for `latest --recursive`, the
newest of each (a run does not send a dataset with nothing written, so a dataset's newest
backup may come from an earlier run than its parent's); for `--all`, each dataset's newest.
A descendant whose chosen backup is older than the run restored was unchanged at that run (the
run sent nothing for it, and checked it in), failed in it (its upload did not commit), or gone
(destroyed or left out before it): the manifests cannot tell, so the server's record of
check-ins and failed uploads does (`left_behind`); one that failed, or that the server heard
nothing of since, is restored all the same, with a warning.
The whole tree is received under the target the way a single restore is (restore/receive.py):
into the target when it does not exist, else — with --force — under a temporary sibling that
replaces the target only once every chain is in and verified.
A failure removes everything the restore created.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from zfsmgr.protocol import Manifest
from zfsmgr.restore.chain import chain_for
from zfsmgr.restore.listing import moment
from zfsmgr.restore.receive import StreamOpener, Target, receive_chain
from zfsmgr.restore.record import Records
from zfsmgr.zfs import Zfs

Items = list[tuple[str, Manifest]]  # (name relative to the target, '' for the target itself)


def below(name: str, parent: str) -> bool:
    return name.startswith(parent + "/")


def subtree(manifests: Sequence[Manifest], dataset: str, until: float | None = None) -> Items:
    """`dataset` as '' and each of its descendants, each with its newest backup taken no
    later than `until` (None: its newest), parents first; a run that found a dataset
    unchanged sent nothing for it, so its newest backup may come from an earlier run."""
    newest: dict[str, Manifest] = {}
    for m in manifests:
        if (m.dataset == dataset or below(m.dataset, dataset)) and (
                until is None or moment(m) <= until):
            if m.dataset not in newest or moment(m) > moment(newest[m.dataset]):
                newest[m.dataset] = m
    items = [(name[len(dataset) + 1:], m) for name, m in newest.items()]
    return sorted(items, key=lambda item: item[0])


CLOCK_MARGIN = 300.0  # seconds a host's clock (snapshot times) and its server's may differ


def left_behind(items: Items, run: float, heard: Mapping[str, tuple[float, float]],
                manifests: Sequence[Manifest] = ()) -> list[tuple[Manifest, str]]:
    """(manifest, why) of the chosen backups older than the run at `run` (snapshot times: the
    host's clock) that the server's record does not vouch for (`heard`: each dataset's newest
    check-in of "unchanged" and newest failed upload, by the server's clock, hence the margin):
    "failed" when its upload failed at or after the run, with no check-in since and no backup
    of it after the one chosen among `manifests` (the failure may be a later run's: only the
    newest of each is known), so that the run had changes of it that no backup holds;
    "unheard" when neither came since (the run may not have had the dataset any more)."""
    since, found = run - CLOCK_MARGIN, []
    newest: dict[str, float] = {}
    for m in manifests:
        newest[m.dataset] = max(newest.get(m.dataset, 0.0), moment(m))
    for _, m in items:
        checked, failed = heard.get(m.dataset, (0.0, 0.0))
        if moment(m) >= run:
            continue
        if failed >= since and failed >= checked and newest.get(m.dataset, 0.0) <= moment(m):
            found.append((m, "failed"))
        elif max(checked, failed) < since:
            found.append((m, "unheard"))
    return found


def every_dataset(manifests: Sequence[Manifest]) -> Items:
    """Each source dataset's newest backup, named by its full source name, parents first."""
    newest: dict[str, Manifest] = {}
    for m in manifests:
        if m.dataset not in newest or moment(m) > moment(newest[m.dataset]):
            newest[m.dataset] = m
    return sorted(newest.items(), key=lambda item: item[0])


def restore_tree(zfs: Zfs, open_stream: StreamOpener, manifests: Sequence[Manifest],
                 items: Items, target: Target) -> list[str]:
    """Receive every item's chain under `target`; return the restored dataset names. Every
    chain is checked before anything is received; on any failure, nothing stays."""
    chains = [(rel, chain_for(manifests, m)) for rel, m in items]  # broken: fails here
    records = Records(zfs, target.name)
    dest = target.prepare()
    restored = []
    try:
        target.received()
        if not any(rel == "" for rel, _ in chains):
            _placeholder(zfs, dest)
        for rel, chain in chains:
            into = f"{dest}/{rel}" if rel else dest
            if rel and "/" in rel:
                parent = into.rsplit("/", 1)[0]
                if not zfs.exists(parent):
                    _placeholder(zfs, parent)
            print(f"restoring {chain[-1].dataset}@{chain[-1].snapshot} into"
                  f" {target.name}{'/' + rel if rel else ''}", file=sys.stderr)
            shown = f"{target.name}/{rel}" if rel else target.name
            receive_chain(zfs, open_stream, chain, into, records.on_receive(chain, shown))
            records.settle(into, chain, shown)
            target.contain(into, shown)  # each dataset of the tree, as a single restore
            restored.append(shown)
        target.commit()
    except BaseException:
        target.undo()
        raise
    for warning in records.warnings + [Target(zfs, name).mount() for name in restored]:
        if warning:
            sys.stderr.write(f"zfsmgr: warning: {warning}\n")
    return restored


def _placeholder(zfs: Zfs, name: str) -> None:
    """An empty dataset that only holds restored children (its own data was not backed up),
    and so each missing one above it: `zfs create -p -o canmount=off` set canmount=off on the
    last one only, and mounted the others."""
    missing = [name]
    while "/" in missing[-1] and not zfs.exists(missing[-1].rsplit("/", 1)[0]):
        missing.append(missing[-1].rsplit("/", 1)[0])
    for each in reversed(missing):
        zfs.create(each, props={"canmount": "off"})
