"""Deleting stored backups, the one way every deletion goes: rotation (`POST /rotate`,
AUTO_ROTATE, `server rotate`) and `server delete`/`forget`/`remove-client`.

A catalog row goes only in the transaction that finds no committed backup and no open upload
based on it (a commit records its row, and checks its base, in one transaction too), so no
incremental is ever left, or committed, without its base. `ctx` is the ServerContext.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Dict

from zfsmgr.errors import Locked
from zfsmgr.protocol import Manifest
from zfsmgr.server.rotation import RotationPlan
from zfsmgr.storage.base import Store

log = logging.getLogger("zfsmgr.server")
GONE = "deleted already (by another rotation or deletion)"


def delete(ctx, manifest: Manifest, store: Store) -> str:
    """Delete one backup: out of the catalog (no new download starts), then out of its
    store; '' when deleted. A backup that a committed backup or an open upload has as its base
    stays, and the reason is returned. When the store refuses (Object Lock: Locked) or fails
    (StorageError, anything), the entry is listed again, so a backup still stored is never
    unlisted; the store's error is raised. The caller holds the client's lease."""
    with ctx.db.transaction():
        needed = ctx.catalog.children(manifest.client_id, manifest.dataset, manifest.snapshot)
        if needed:
            return f"the base of {', '.join(needed)}"
        uploads = ctx.sessions.based_on(manifest.client_id, manifest.dataset,
                                        manifest.snapshot)
        if uploads:
            return f"the base of the open upload {', '.join(uploads)}"
        if not ctx.catalog.remove(manifest.client_id, manifest.key):
            return GONE  # a rotation that planned at the same moment deleted it
    try:
        store.delete(manifest)
    except Exception:
        ctx.catalog.add(manifest)
        raise
    return ""


def apply(ctx, client, plan: RotationPlan) -> RotationPlan:
    """Delete what `plan` deletes, children first; a backup that turns out to be needed (the
    base of a kept or newly committed backup, or of an open upload) or that its store locks
    stays, and the plan returned says so, with the reason."""
    kept: Dict[str, str] = {}
    gone = set()  # deleted by a rotation that ran at the same time: not counted twice
    for manifest in plan.delete:
        store = ctx.store_named(manifest.storage_type or ctx.default_kind(client))
        child = next((c.key for c in plan.delete if c.parent == manifest.snapshot
                      and c.dataset == manifest.dataset and c.key in kept), None)
        why = f"the base of {child}, which stays" if child else ""
        if not why:
            try:
                why = delete(ctx, manifest, store)
            except Locked as exc:  # the store's lock outlasts the policy: keep it
                why = f"locked by the store (S3 Object Lock) for now: {exc}"
        if why == GONE:
            gone.add(manifest.key)
            continue
        if why:
            kept[manifest.key] = why
            log.info("rotation keeps %s (client=%s): %s", manifest.key, client.client_id, why)
            continue
        log.info("rotation deleted %s (client=%s): %s", manifest.key, client.client_id,
                 plan.reasons[manifest.key])
    if gone:
        plan = replace(plan, delete=[m for m in plan.delete if m.key not in gone],
                       freed_bytes=plan.freed_bytes - sum(plan.sizes.get(m.key, m.stored_size)
                                                          for m in plan.delete
                                                          if m.key in gone))
    if not kept:
        return plan
    plan = plan.settle([m for m in plan.delete if m.key in kept])
    plan.reasons.update(kept)
    return plan
