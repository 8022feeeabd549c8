"""`GET /metrics`: the fleet in Prometheus' text exposition format (version 0.0.4).

Times are exported as Unix timestamps, never as ages: an alert computes `time() - …`, so a
scrape that stalls cannot make a stale backup look fresh. A series without a value (a dataset
that never failed, never was verified) is absent rather than 0. Access needs
`Authorization: Bearer <METRICS_TOKEN>`, or `METRICS_NO_AUTH=true`.
"""

from __future__ import annotations

import hmac
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from zfsmgr import __version__
from zfsmgr.errors import Forbidden, Unauthorized
from zfsmgr.server.clients import ClientConfig
from zfsmgr.server.fleet import DatasetRow
from zfsmgr.server.ledger import UPLOAD_RESULTS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# per dataset: name, help, the DatasetRow attribute it exports
DATASET_GAUGES = (
    ("zfsmgr_backup_last_success_timestamp_seconds", "when the last upload was committed",
     "last_success"),
    ("zfsmgr_backup_newest_snapshot_timestamp_seconds", "creation of the newest stored snapshot",
     "newest_snapshot"),
    ("zfsmgr_backup_oldest_snapshot_timestamp_seconds", "creation of the oldest stored snapshot",
     "oldest_snapshot"),
    ("zfsmgr_backup_last_checked_timestamp_seconds",
     "when the client last found the dataset unchanged since its newest backup (POST /checkin)",
     "last_checked"),
    ("zfsmgr_backup_last_failure_timestamp_seconds", "when the last upload failed",
     "last_failure"),
    ("zfsmgr_backup_chain_length", "streams a restore of the newest backup replays",
     "chain_length"),
    ("zfsmgr_backup_count", "stored backups", "backups"),
    ("zfsmgr_stored_bytes", "bytes stored", "stored_bytes"),
    ("zfsmgr_verify_last_success_timestamp_seconds",
     "when a restore tool last verified the backups with success", "last_verify"),
    ("zfsmgr_verify_last_failure_timestamp_seconds",
     "when a restore tool last found a damaged backup", "last_verify_failure"),
)


def authorize(no_auth: bool, token: str, header: Optional[str]) -> None:
    """Raise unless the request may read the metrics (Forbidden when none is configured)."""
    if no_auth:
        return
    if not token:
        raise Forbidden("/metrics is off: set METRICS_TOKEN (or METRICS_NO_AUTH=true)")
    given = (header or "")[len("Bearer "):] if (header or "").startswith("Bearer ") else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("/metrics needs Authorization: Bearer <METRICS_TOKEN>")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _labels(pairs: Iterable[Tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Exposition:
    """Families in order, each with its HELP and TYPE once."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[Tuple[Sequence[Tuple[str, str]], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(clients: Sequence[ClientConfig], rows: Sequence[DatasetRow],
           counters: Dict[str, dict], problems: int = 0) -> str:
    """The exposition of every configured client; `counters` is the ledger's per client,
    `problems` the number of clients.json's refused entries (not monitored otherwise)."""
    out = _Exposition()
    datasets = [r for r in rows if r.dataset and r.backups]
    for name, help_text, attribute in DATASET_GAUGES:
        out.family(name, "gauge", help_text, (
            ((("client", r.client_id), ("dataset", r.dataset)), getattr(r, attribute))
            for r in datasets if getattr(r, attribute) is not None))
    ordered = sorted(clients, key=lambda c: c.client_id)
    out.family("zfsmgr_client_quota_bytes", "gauge", "the client's quota (0: none)",
               (((("client", c.client_id),), c.max_size_bytes) for c in ordered))
    out.family("zfsmgr_client_enabled", "gauge", "1 if the client may upload",
               (((("client", c.client_id),), int(c.enabled)) for c in ordered))
    mine = {c.client_id: counters.get(c.client_id, {}) for c in ordered}
    out.family("zfsmgr_uploads_total", "counter", "uploads that ended, by result", (
        ((("client", cid), ("result", result)), seen.get("uploads", {}).get(result, 0))
        for cid, seen in mine.items() for result in UPLOAD_RESULTS))
    out.family("zfsmgr_upload_bytes_total", "counter", "bytes of committed uploads",
               (((("client", cid),), seen.get("upload_bytes", 0)) for cid, seen in mine.items()))
    out.family("zfsmgr_rotation_deleted_total", "counter", "backups deleted by rotation",
               (((("client", cid),), seen.get("rotation_deleted", 0))
                for cid, seen in mine.items()))
    out.family("zfsmgr_config_problems", "gauge",
               "refused clients.json entries (or a file kept at its last good state)",
               [((), problems)])
    out.family("zfsmgr_build_info", "gauge", "the zfsmgr version serving",
               [((("version", __version__),), 1)])
    return out.text()
