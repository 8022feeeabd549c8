"""The numbered list of backups that `restore list` prints and the other commands refer to.

Numbers count from the newest backup (1) over all of the client's backups, so a number means
the same backup whether or not the list shown was filtered by --dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from zfsmgr.errors import UsageError
from zfsmgr.progress import human
from zfsmgr.protocol import Manifest, key_stem, parse_key, parse_timestamp

Numbered = list[tuple[int, Manifest]]
HEADER = ("#", "Snapshot ID", "Timestamp", "Size", "Type", "Dataset")


human_size = human  # the seed's units, shared with progress lines


def snapshot_id(key: str) -> str:
    """The key without its extension: `client1/tank_data_2024-02-13_14:30:00`."""
    return key_stem(key)


def moment(manifest: Manifest) -> float:
    """When the snapshot was taken (epoch seconds), from the manifest or else its key."""
    if manifest.snapshot_time:
        return float(manifest.snapshot_time)
    try:
        return parse_timestamp(parse_key(manifest.key).timestamp).timestamp()
    except ValueError:
        return 0.0


def timestamp_text(manifest: Manifest) -> str:
    """`YYYY-MM-DD HH:MM` in UTC."""
    when = datetime.fromtimestamp(moment(manifest), timezone.utc)  # noqa: UP017 (3.9 has no UTC)
    return when.strftime("%Y-%m-%d %H:%M")


def numbered(manifests: Iterable[Manifest]) -> Numbered:
    """(number, manifest) pairs, newest first, numbered from 1."""
    ordered = sorted(manifests, key=lambda m: (moment(m), m.created, m.key), reverse=True)
    return list(enumerate(ordered, start=1))


def only_dataset(rows: Numbered, dataset: str | None) -> Numbered:
    """The rows of one source dataset, keeping their numbers."""
    return [row for row in rows if dataset is None or row[1].dataset == dataset]


def pick(rows: Numbered, number: int) -> Manifest:
    """The backup with list number `number`, or a UsageError saying what exists."""
    for index, manifest in rows:
        if index == number:
            return manifest
    if not rows:
        raise UsageError("the server holds no backups for this client")
    raise UsageError(f"no backup number {number}: `zfsmgr restore list` shows 1 to {len(rows)}")


def format_table(rows: Numbered) -> str:
    """The `list` table: a header, then one aligned line per backup."""
    lines: list[Sequence[str]] = [HEADER]
    for number, m in rows:
        lines.append((str(number), snapshot_id(m.key), timestamp_text(m),
                      human_size(m.stored_size), m.type, m.dataset))
    widths = [max(len(line[col]) for line in lines) for col in range(len(HEADER))]
    out = []
    for line in lines:
        cells = [cell.rjust(widths[col]) if col in (0, 3) and line is not lines[0]
                 else cell.ljust(widths[col]) for col, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def as_json(rows: Numbered) -> list:
    """The rows as JSON-ready dicts: the manifest plus `number` and `id`."""
    return [{"number": number, "id": snapshot_id(m.key), **m.to_dict()} for number, m in rows]


def format_tree(rows: Numbered) -> str:
    """The `list --tree` view: one block per run (the snapshot name a run gives every
    dataset it backs up), newest first, each dataset indented under its parent."""
    runs: dict[str, Numbered] = {}
    for number, m in rows:
        runs.setdefault(m.snapshot, []).append((number, m))
    out = []
    for snapshot, members in runs.items():
        first = members[0][1]
        total = sum(m.stored_size for _, m in members)
        out.append(f"{snapshot}  {timestamp_text(first)}  {len(members)} datasets,"
                   f" {human_size(total)}")
        names = {m.dataset for _, m in members}
        for number, m in sorted(members, key=lambda row: row[1].dataset):
            depth = sum(1 for other in names if m.dataset.startswith(other + "/"))
            out.append(f"  {'  ' * depth}{number:>4}  {m.dataset}  {m.type}"
                       f"  {human_size(m.stored_size)}")
    return "\n".join(out)
