"""The fleet at a glance: one row per client and dataset, for metrics, check and status page.

Pure over its inputs (clients, the catalog's manifests, the ledger's view, thresholds and
`now`), so staleness is tested without a clock. A dataset's age is that of its newest backed-up
snapshot (how old the data on the server is), not of the upload, or of the client's last check
that nothing was written since (an unchanged dataset sends no backup: BACKUP_UNCHANGED=false).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Dict, List, Mapping, Optional, Sequence

from zfsmgr.protocol import Manifest
from zfsmgr.server.clients import ClientConfig

OK, STALE, CRITICAL, NEVER, DISABLED = "ok", "stale", "critical", "never", "disabled"


@dataclass(frozen=True)
class DatasetRow:
    """One dataset of one client (dataset "" for a client that never backed up)."""

    client_id: str
    dataset: str
    enabled: bool
    backups: int
    chain_length: int  # streams a restore of the newest backup needs (1: it is full)
    stored_bytes: int
    client_stored_bytes: int
    quota_bytes: int
    newest_snapshot: Optional[float]
    oldest_snapshot: Optional[float]
    last_success: Optional[float]
    last_failure: Optional[float]
    last_failure_message: str
    last_verify: Optional[float]
    last_verify_failure: Optional[float]
    warn: float
    crit: float
    last_checked: Optional[float] = None  # the client found nothing written (POST /checkin)

    def age(self, now: float) -> Optional[float]:
        """Seconds since the data on the server was last known current: its newest backed-up
        snapshot, or the client's later check that nothing was written since; None without a
        backup."""
        if self.newest_snapshot is None:
            return None
        return max(0.0, now - max(self.newest_snapshot, self.last_checked or 0.0))

    def state(self, now: float) -> str:
        """ok, stale (past warn), critical (past crit), never (no backup) or disabled."""
        if not self.enabled:
            return DISABLED
        age = self.age(now)
        if age is None:
            return NEVER
        return CRITICAL if age >= self.crit else STALE if age >= self.warn else OK

    @property
    def name(self) -> str:
        """`client:dataset`, as check prints it."""
        return f"{self.client_id}:{self.dataset or '(no backup)'}"


def age_text(seconds: float) -> str:
    """42s, 17m, 5.1h, 2.3d."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _epoch(iso: str) -> Optional[float]:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None


def chain_length(backups: Sequence[Manifest]) -> int:
    """How many streams restoring the newest of one dataset's backups replays."""
    if not backups:
        return 0
    by_snapshot: Dict[str, Manifest] = {}
    for m in sorted(backups, key=lambda m: (m.snapshot_time, m.key)):
        by_snapshot.setdefault(m.snapshot, m)  # rotation.parent_key takes the first match
    current: Optional[Manifest] = max(backups, key=lambda m: (m.snapshot_time, m.key))
    length, seen = 0, set()
    while current is not None and current.key not in seen:
        seen.add(current.key)
        length += 1
        if current.restores_alone:  # as its store described it at commit (Store.marked)
            break
        current = by_snapshot.get(current.parent or "")
    return length


def rows(clients: Sequence[ClientConfig], backups: Mapping[str, List[Manifest]],
         ledger: Mapping[str, dict], warn: float, crit: float) -> List[DatasetRow]:
    """Every dataset of every client, sorted by client and dataset.

    `backups` maps a client id to its manifests; `ledger` is `Ledger.view()`; a client's own
    `check_warn`/`check_crit` override `warn`/`crit`."""
    events: Dict[str, Dict[str, dict]] = ledger.get("datasets", {})
    found = []
    for client in sorted(clients, key=lambda c: c.client_id):
        mine = backups.get(client.client_id, [])
        by_dataset: Dict[str, List[Manifest]] = {}
        for m in mine:
            by_dataset.setdefault(m.dataset, []).append(m)
        if not by_dataset:
            by_dataset[""] = []
        total = sum(m.stored_size for m in mine)
        for dataset, group in sorted(by_dataset.items()):
            seen = events.get(client.client_id, {}).get(dataset, {})
            committed = [t for t in (_epoch(m.created) for m in group) if t is not None]
            last_success = max([seen.get("last_success") or 0.0] + committed)
            times = [m.snapshot_time for m in group]
            found.append(DatasetRow(
                client_id=client.client_id, dataset=dataset, enabled=client.enabled,
                backups=len(group), chain_length=chain_length(group),
                stored_bytes=sum(m.stored_size for m in group), client_stored_bytes=total,
                quota_bytes=client.max_size_bytes,
                newest_snapshot=max(times) if times else None,
                oldest_snapshot=min(times) if times else None,
                last_success=last_success or None, last_failure=seen.get("last_failure"),
                last_failure_message=seen.get("last_failure_message", ""),
                last_verify=seen.get("last_verify_success"),
                last_verify_failure=seen.get("last_verify_failure"),
                last_checked=seen.get("last_checked") if group else None,
                warn=client.check_warn or warn,
                crit=max(client.check_crit or crit, client.check_warn or warn)))
    return found


_FIELDS = frozenset(f.name for f in fields(Manifest))


def _stored(entries: List[dict]) -> List[Manifest]:
    """Manifests from the catalog's stored mappings, which were validated when they entered
    (a scrape reads the whole fleet: validating every key again cost 90% of it)."""
    return [Manifest(**{k: v for k, v in e.items() if k in _FIELDS}) for e in entries]


def fleet(ctx, warn: Optional[float] = None, crit: Optional[float] = None) -> List[DatasetRow]:
    """The rows of a server context (settings' thresholds unless given)."""
    view = ctx.ledger.view()
    warn = ctx.settings.check_warn if warn is None else warn
    crit = ctx.settings.check_crit if crit is None else crit
    found: List[DatasetRow] = []
    for client in sorted(ctx.clients.all(), key=lambda c: c.client_id):
        # one client's manifests in memory at a time, whatever the size of the catalog
        mine = _stored(ctx.catalog.list_dicts(client.client_id))
        found += rows([client], {client.client_id: mine}, view, warn, crit)
    return found
