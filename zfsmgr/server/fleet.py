"""The fleet at a glance: one row per client and dataset, for metrics, check and status page.

Pure over its inputs (clients, the catalog's manifests, the ledger's view, thresholds and
`now`), so staleness is tested without a clock. A dataset's age is that of its newest backed-up
snapshot (how old the data on the server is), not of the upload, or of the client's last check
that nothing was written since (an unchanged dataset sends no backup: BACKUP_UNCHANGED=false).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Callable, Dict, List, Mapping, Optional, Sequence

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


def chain_length(newest: Optional[Manifest],
                 first_of: Callable[[str], Optional[Manifest]]) -> int:
    """How many streams restoring `newest` replays; `first_of(snapshot)` is the dataset's first
    backup of that snapshot by (snapshot_time, key), as rotation.parent_key takes it."""
    length, seen, current = 0, set(), newest
    while current is not None and current.key not in seen:
        seen.add(current.key)
        length += 1
        if current.restores_alone:  # as its store described it at commit (Store.marked)
            break
        current = first_of(current.parent or "")
    return length


@dataclass(frozen=True)
class DatasetFacts:
    """What a row says of one dataset's backups, from the catalog or from manifests."""

    dataset: str
    backups: int
    stored_bytes: int
    oldest_snapshot: Optional[float]
    newest_snapshot: Optional[float]
    last_created: Optional[float]  # the latest commit of a stored backup
    chain_length: int


def facts_of(dataset: str, group: Sequence[Manifest]) -> DatasetFacts:
    """The facts of one dataset's manifests."""
    by_snapshot: Dict[str, Manifest] = {}
    for m in sorted(group, key=lambda m: (m.snapshot_time, m.key)):
        by_snapshot.setdefault(m.snapshot, m)
    newest = max(group, key=lambda m: (m.snapshot_time, m.key)) if group else None
    times = [m.snapshot_time for m in group]
    committed = [t for t in (_epoch(m.created) for m in group) if t is not None]
    return DatasetFacts(dataset, len(group), sum(m.stored_size for m in group),
                        min(times) if times else None, max(times) if times else None,
                        max(committed) if committed else None,
                        chain_length(newest, by_snapshot.get))


def catalog_facts(catalog, client_id: str) -> List[DatasetFacts]:
    """The facts of a client's datasets as the catalog keeps them: its per-dataset totals and
    a few indexed rows each (the oldest, the newest and the streams of its chain), so their cost
    follows the datasets reported, not the backups stored."""
    found = []
    for dataset, count, size in catalog.dataset_totals(client_id):
        oldest, newest, created = catalog.dataset_span(client_id, dataset)
        head = catalog.newest(client_id, dataset)
        found.append(DatasetFacts(
            dataset, count, size, oldest, newest, _epoch(created),
            chain_length(_stored(head), lambda snap, d=dataset: _stored(
                catalog.first_of_snapshot(client_id, d, snap)))))
    return found


def _row(client: ClientConfig, facts: DatasetFacts, total: int, events: Mapping[str, dict],
         warn: float, crit: float) -> DatasetRow:
    seen = events.get(facts.dataset, {})
    last_success = max(seen.get("last_success") or 0.0, facts.last_created or 0.0)
    return DatasetRow(
        client_id=client.client_id, dataset=facts.dataset, enabled=client.enabled,
        backups=facts.backups, chain_length=facts.chain_length,
        stored_bytes=facts.stored_bytes, client_stored_bytes=total,
        quota_bytes=client.max_size_bytes, newest_snapshot=facts.newest_snapshot,
        oldest_snapshot=facts.oldest_snapshot, last_success=last_success or None,
        last_failure=seen.get("last_failure"),
        last_failure_message=seen.get("last_failure_message", ""),
        last_verify=seen.get("last_verify_success"),
        last_verify_failure=seen.get("last_verify_failure"),
        last_checked=seen.get("last_checked") if facts.backups else None,
        warn=client.check_warn or warn,
        crit=max(client.check_crit or crit, client.check_warn or warn))


def _client_rows(client: ClientConfig, facts: List[DatasetFacts], ledger: Mapping[str, dict],
                 warn: float, crit: float) -> List[DatasetRow]:
    """A client's rows, by dataset; one row of dataset "" when it has no backup."""
    events = ledger.get("datasets", {}).get(client.client_id, {})
    total = sum(f.stored_bytes for f in facts)
    facts = sorted(facts, key=lambda f: f.dataset) or [facts_of("", [])]
    return [_row(client, f, total, events, warn, crit) for f in facts]


def rows(clients: Sequence[ClientConfig], backups: Mapping[str, List[Manifest]],
         ledger: Mapping[str, dict], warn: float, crit: float) -> List[DatasetRow]:
    """Every dataset of every client, sorted by client and dataset.

    `backups` maps a client id to its manifests; `ledger` is `Ledger.view()`; a client's own
    `check_warn`/`check_crit` override `warn`/`crit`."""
    found = []
    for client in sorted(clients, key=lambda c: c.client_id):
        by_dataset: Dict[str, List[Manifest]] = {}
        for m in backups.get(client.client_id, []):
            by_dataset.setdefault(m.dataset, []).append(m)
        facts = [facts_of(dataset, group) for dataset, group in by_dataset.items()]
        found += _client_rows(client, facts, ledger, warn, crit)
    return found


_FIELDS = frozenset(f.name for f in fields(Manifest))


def _stored(entry: Optional[dict]) -> Optional[Manifest]:
    """A manifest from the catalog's stored mapping, which was validated when it entered."""
    if entry is None:
        return None
    return Manifest(**{k: v for k, v in entry.items() if k in _FIELDS})


def fleet(ctx, warn: Optional[float] = None, crit: Optional[float] = None) -> List[DatasetRow]:
    """The rows of a server context (settings' thresholds unless given), from the catalog's
    per-dataset facts (catalog_facts)."""
    view = ctx.ledger.view()
    warn = ctx.settings.check_warn if warn is None else warn
    crit = ctx.settings.check_crit if crit is None else crit
    found: List[DatasetRow] = []
    for client in sorted(ctx.clients.all(), key=lambda c: c.client_id):
        found += _client_rows(client, catalog_facts(ctx.catalog, client.client_id), view,
                              warn, crit)
    return found
