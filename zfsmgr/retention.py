"""Grandfather-father-son retention as a pure function: items in, keep/delete decisions out.

No I/O, no clock, no zfs: the caller passes ``now`` and the items (snapshots or stored backups),
so the policy is tested without ZFS, like zfs_autobackup's ``Thinner.thin(objects, keep, now)``.

:func:`plan` decides per item; when several rules keep an item, the reason is the first of:

1. ``protected`` items are kept ("protected").
2. Items with ``time > now`` are kept ("newer than now: clock skew") and take no part in
   bucketing, so a clock jump neither uses up slots nor hides an older item of its bucket.
3. Every other item falls into buckets computed from its own time converted to ``tz``:
   hourly = local date and hour, daily = local calendar date, weekly = ISO year and week
   (``date.isocalendar()``), monthly = local year and month. The newest item of a bucket
   (greatest time, then greatest name) represents it. Only buckets that hold items count, and
   they are ranked newest first by their representative.

   - Typed items (``kind`` in SNAPSHOT_TYPES) are bucketed per kind, by that kind's period only;
     an item is kept if it represents one of the newest ``keep_<kind>`` buckets
     ("newest daily for 2024-02-13").
   - Untyped items (``kind is None``, e.g. backup streams) are bucketed together by all four
     periods; one is kept if it represents one of the newest keep_hourly hours, keep_daily days,
     keep_weekly ISO weeks or keep_monthly months, and the reason names the first of these rules
     (in that order) that kept it.

   ``keep_<x> = 0`` keeps nothing by that rule.
4. The single newest item overall (greatest time, then name; future items included) is kept
   ("newest item").
5. Dependency closure: the ``parent`` of a kept item is kept ("base of kept CHILD"),
   transitively, so nothing a kept item depends on is deleted. Unknown parents are ignored.

Everything else is deleted: "superseded by NAME in daily 2024-02-13" (a newer item represents
its bucket), "beyond keep_daily=7" (it represents a bucket past the limit), or for untyped items
"beyond keep_hourly=.., keep_daily=.., keep_weekly=.., keep_monthly=..".

Buckets are local wall-clock labels. With a DST zone (e.g. ``zoneinfo.ZoneInfo``) the hour
repeated at fall-back is one hourly bucket, because both passes share one local hour string, so
two items in it compete for one slot; the hour skipped at spring-forward has no bucket. The
default UTC has neither effect.

The result holds one Decision per item sorted by (time, name) ascending and does not depend on
the input order. Duplicate names, unknown kinds and non-finite times raise ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo

SNAPSHOT_TYPES = ("hourly", "daily", "weekly", "monthly")

_POLICY_KEYS = tuple(f"keep_{period}" for period in SNAPSHOT_TYPES)


def _check_count(key: str, value: object) -> None:
    # bool is an int subclass, but "keep_daily": true in a JSON config is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = repr(value)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        raise ValueError(f"{key} must be a non-negative integer, got {shown}")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many hourly/daily/weekly/monthly buckets to keep; every count is an int >= 0."""

    keep_hourly: int = 24
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 12

    def __post_init__(self) -> None:
        for key in _POLICY_KEYS:
            _check_count(key, getattr(self, key))

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> RetentionPolicy:
        """Build from a JSON object of keep_* counts; missing keys take defaults, bad ones raise."""
        # ValueError, not TypeError: a malformed config value, reported like the others.
        if not isinstance(m, Mapping):
            raise ValueError(  # noqa: TRY004
                f"retention policy must be an object of keep_* counts, got {type(m).__name__}"
            )
        unknown = sorted(repr(key) for key in m if key not in _POLICY_KEYS)
        if unknown:
            raise ValueError(
                f"unknown retention key {', '.join(unknown)} (expected {', '.join(_POLICY_KEYS)})"
            )
        return cls(**m)  # type: ignore[arg-type]  # __post_init__ validates the values

    def to_mapping(self) -> dict:
        """Return the JSON object form, keys in hourly, daily, weekly, monthly order."""
        return {key: getattr(self, key) for key in _POLICY_KEYS}


@dataclass(frozen=True)
class Item:
    """One snapshot or stored backup as retention sees it; ``name`` is unique within a plan."""

    name: str
    time: float  # epoch seconds, UTC (creation time)
    kind: str | None  # one of SNAPSHOT_TYPES, or None for untyped (e.g. a backup stream)
    parent: str | None = None  # name of the item this one is incremental on
    protected: bool = False  # held, cloned, base of the current backup, or user-owned


@dataclass(frozen=True)
class Decision:
    """Whether to keep the item called ``name``, and why in words."""

    name: str
    keep: bool
    reason: str


def _order_key(item: Item) -> tuple[float, str]:
    return (item.time, item.name)


def _label(period: str, local: datetime) -> str:
    if period == "hourly":
        return f"{local.year:04d}-{local.month:02d}-{local.day:02d}T{local.hour:02d}"
    if period == "daily":
        return f"{local.year:04d}-{local.month:02d}-{local.day:02d}"
    if period == "weekly":
        # ISO year, not calendar year: 2021-01-01 belongs to 2020-W53.
        iso_year, iso_week, _ = local.isocalendar()
        return f"{iso_year:04d}-W{iso_week:02d}"
    return f"{local.year:04d}-{local.month:02d}"


def _select(
    items: Sequence[Item], period: str, limit: int, tz: tzinfo
) -> tuple[dict[str, str], dict[str, str]]:
    """Return (kept name -> reason, dropped name -> reason) for one GFS rule over ``items``."""
    labels: dict[str, str] = {}
    reps: dict[str, Item] = {}
    for item in items:
        label = _label(period, datetime.fromtimestamp(item.time, tz))
        labels[item.name] = label
        best = reps.get(label)
        if best is None or _order_key(item) > _order_key(best):
            reps[label] = item
    # Rank by representative, not by label: labels are local wall-clock strings.
    ranked = sorted(reps.items(), key=lambda entry: _order_key(entry[1]), reverse=True)
    kept: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for rank, (label, rep) in enumerate(ranked):
        if rank < limit:
            kept[rep.name] = f"newest {period} for {label}"
        else:
            dropped[rep.name] = f"beyond keep_{period}={limit}"
    for item in items:
        rep = reps[labels[item.name]]
        if rep is not item:
            dropped[item.name] = f"superseded by {rep.name} in {period} {labels[item.name]}"
    return kept, dropped


def _validate(items: Sequence[Item], now: float) -> None:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite epoch time, got {now!r}")
    seen = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"duplicate item name {item.name!r}")
        seen.add(item.name)
        if item.kind is not None and item.kind not in SNAPSHOT_TYPES:
            raise ValueError(
                f"item {item.name!r} has unknown kind {item.kind!r}"
                f" (expected one of {', '.join(SNAPSHOT_TYPES)} or None)"
            )
        if not math.isfinite(item.time):
            raise ValueError(f"item {item.name!r} has non-finite time {item.time!r}")


def plan(
    items: Iterable[Item],
    policy: RetentionPolicy,
    now: float,
    *,
    # datetime.UTC would need Python 3.11; this package supports 3.9.
    tz: tzinfo = timezone.utc,  # noqa: UP017
) -> list[Decision]:
    """Decide keep/delete for every item under ``policy`` at epoch ``now`` (see module doc)."""
    ordered = sorted(items, key=_order_key)
    _validate(ordered, now)
    if not ordered:
        return []
    # Insertion order into ``keep`` is the precedence of reasons: first rule to keep wins.
    keep: dict[str, str] = {}
    drop: dict[str, str] = {}
    for item in ordered:
        if item.protected:
            keep[item.name] = "protected"
    for item in ordered:
        if item.time > now:
            keep.setdefault(item.name, "newer than now: clock skew")
    past = [item for item in ordered if item.time <= now]

    for period in SNAPSHOT_TYPES:
        pool = [item for item in past if item.kind == period]
        kept, dropped = _select(pool, period, getattr(policy, f"keep_{period}"), tz)
        for name, reason in kept.items():
            keep.setdefault(name, reason)
        drop.update(dropped)

    untyped = [item for item in past if item.kind is None]
    for period in SNAPSHOT_TYPES:
        kept, _ = _select(untyped, period, getattr(policy, f"keep_{period}"), tz)
        for name, reason in kept.items():
            keep.setdefault(name, reason)
    limits = ", ".join(f"{key}={getattr(policy, key)}" for key in _POLICY_KEYS)
    for item in untyped:
        drop[item.name] = f"beyond {limits}"

    keep.setdefault(ordered[-1].name, "newest item")

    # Walk each kept item's chain until it meets an item already kept; an item kept later by
    # this walk continues the walk itself, so the closure is complete and cycles terminate.
    by_name = {item.name: item for item in ordered}
    for item in reversed(ordered):
        child = item
        while child.name in keep and child.parent in by_name and child.parent not in keep:
            keep[child.parent] = f"base of kept {child.name}"
            child = by_name[child.parent]

    return [
        Decision(item.name, True, keep[item.name])
        if item.name in keep
        else Decision(item.name, False, drop[item.name])
        for item in ordered
    ]


def deletable(decisions: Iterable[Decision]) -> list[str]:
    """Return the names decided for deletion, in decision order."""
    return [decision.name for decision in decisions if not decision.keep]


def explain(decisions: Iterable[Decision]) -> list[str]:
    """Return one "keep NAME: reason" or "delete NAME: reason" line per decision."""
    return [
        f"{'keep' if decision.keep else 'delete'} {decision.name}: {decision.reason}"
        for decision in decisions
    ]
