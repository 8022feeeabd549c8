"""Which stored streams rebuild a snapshot: pure functions over manifests, no I/O.

A `full` stream stands alone. An `incremental` one applies on top of its parent: the manifest of
the same source dataset whose snapshot is the incremental's `parent` (and whose guid is the
incremental's `parent_guid` when both are recorded). A manifest the server lists as
`self_contained` also stands alone, whatever its type (its store sends a full stream: `local`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from zfsmgr.errors import BrokenChain  # noqa: F401 (imported from here)
from zfsmgr.protocol import Manifest


def self_contained(manifest: Manifest) -> bool:
    """Whether the download of `manifest` restores without any other stream."""
    return manifest.restores_alone


def _parent_rank(child: Manifest, candidate: Manifest) -> tuple | None:
    """How well `candidate` fits as the parent of `child` (higher is better), None if not."""
    if candidate.dataset != child.dataset or candidate.snapshot != child.parent:
        return None
    if candidate.key == child.key or candidate.snapshot_time > child.snapshot_time:
        return None
    guid_known = bool(child.parent_guid and candidate.guid)
    if guid_known and candidate.guid != child.parent_guid:
        return None
    # Prefer a proven guid match, then a stream that stands alone (a shorter chain), then the
    # most recently committed copy.
    return (guid_known, self_contained(candidate), candidate.created, candidate.key)


def parent_of(manifests: Iterable[Manifest], child: Manifest) -> Manifest | None:
    """The manifest `child` applies on top of, or None when the server has none."""
    ranked = [(rank, m) for m in manifests
              if (rank := _parent_rank(child, m)) is not None]
    return max(ranked, key=lambda pair: pair[0])[1] if ranked else None


def chain_for(manifests: Sequence[Manifest], target: Manifest) -> list[Manifest]:
    """The streams to receive, in order, to rebuild `target`: a self-contained base first,
    `target` last. Raises BrokenChain naming the first missing link."""
    chain = [target]
    seen = {target.key}
    current = target
    while not self_contained(current):
        if not current.parent:
            raise BrokenChain(f"cannot rebuild {target.dataset}@{target.snapshot}:"
                              f" {current.key} is incremental but records no parent")
        parent = parent_of(manifests, current)
        if parent is None:
            guid = f" (guid {current.parent_guid})" if current.parent_guid else ""
            raise BrokenChain(f"cannot rebuild {target.dataset}@{target.snapshot}: the chain is"
                              f" broken: {current.key} needs {current.dataset}@{current.parent}"
                              f"{guid}, which is not on the server")
        if parent.key in seen:
            raise BrokenChain(f"cannot rebuild {target.dataset}@{target.snapshot}: the parents"
                              f" of {current.key} form a loop")
        seen.add(parent.key)
        chain.append(parent)
        current = parent
    chain.reverse()
    return chain


def leaves(manifests: Sequence[Manifest]) -> list[Manifest]:
    """Manifests no other manifest builds on: restoring each of these covers every chain."""
    used: dict[str, Manifest] = {}
    for manifest in manifests:
        if not self_contained(manifest):
            parent = parent_of(manifests, manifest)
            if parent is not None:
                used[parent.key] = parent
    return [m for m in manifests if m.key not in used]
