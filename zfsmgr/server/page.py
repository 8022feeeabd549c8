"""`GET /`: the status page for admins, plain HTML and CSS (no script at all).

Every client and dataset with the age of its newest backup, the chain a restore replays, the
stored size against the client's quota, the last verify; stale and critical rows are marked
(class and colour, and a word for those who cannot see the colour). Columns sort by links
(`?sort=age&order=desc`), done by the server. Access: the admin key (`ADMIN_API_KEY` holds its
SHA-256, as clients.json holds client keys) as the password of HTTP Basic auth (any user name;
browsers ask for it) or as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from zfsmgr import __version__
from zfsmgr.errors import Forbidden, Unauthorized
from zfsmgr.progress import human, utc_text
from zfsmgr.server.fleet import CRITICAL, DISABLED, NEVER, OK, STALE, DatasetRow, age_text

CHALLENGE = 'Basic realm="zfsmgr", charset="UTF-8"'
_STATE_ORDER = {CRITICAL: 0, NEVER: 1, STALE: 2, OK: 3, DISABLED: 4}


def authorize(admin_key_sha256: str, header: Optional[str]) -> None:
    """Raise unless the Authorization header carries the admin key."""
    if not admin_key_sha256:
        raise Forbidden("the status page is off: set ADMIN_API_KEY"
                        " (`zfsmgr server admin-key` makes one)")
    header = header or ""
    given = ""
    if header.startswith("Bearer "):
        given = header[len("Bearer "):]
    elif header.startswith("Basic "):
        try:
            given = base64.b64decode(header[len("Basic "):], validate=True).decode(
                "utf-8").partition(":")[2]
        except ValueError:  # not base64 (binascii.Error), not UTF-8, not even ASCII
            given = ""
    digest = hashlib.sha256(given.encode("utf-8")).hexdigest()
    if not given or not hmac.compare_digest(digest, admin_key_sha256):
        raise Unauthorized("the status page needs the admin key")


def _sort_keys(now: float) -> Dict[str, Callable[[DatasetRow], tuple]]:
    never = float("inf")
    return {
        "client": lambda r: (r.client_id, r.dataset),
        "dataset": lambda r: (r.dataset, r.client_id),
        "age": lambda r: (never if r.age(now) is None else r.age(now), r.client_id),
        "chain": lambda r: (r.chain_length, r.client_id),
        "stored": lambda r: (r.stored_bytes, r.client_id),
        "verify": lambda r: (-(r.last_verify or 0.0), r.client_id),
        "state": lambda r: (_STATE_ORDER[r.state(now)], r.client_id, r.dataset),
    }


COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("client", "Client"), ("dataset", "Dataset"), ("age", "Newest backup"),
    ("chain", "Chain"), ("stored", "Stored / quota"), ("verify", "Last verify"),
    ("state", "State"))

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1b1b;background:#fff}
h1{font-size:1.4em;margin:0 0 .2em}
p.summary{margin:0 0 1em;color:#444}
p.problem{margin:0 0 1em;padding:.4em .7em;background:#ff9c9c;font-weight:bold}
table{border-collapse:collapse;width:100%}
th,td{padding:.35em .7em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
th a{color:inherit;text-decoration:none}
th a:hover{text-decoration:underline}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.ok td.state{color:#17692a}
tr.stale td{background:#ffe08a}
tr.critical td,tr.never td{background:#ff9c9c}
tr.disabled td{color:#888;background:#f2f2f2}
td.verify-failed{color:#a00000;font-weight:bold}
.bar{display:inline-block;width:6em;height:.7em;background:#e5e5e5;vertical-align:middle}
.bar span{display:block;height:100%;background:#3b6fd4}
footer{margin-top:1em;color:#777;font-size:.9em}
"""


def _verify_cell(row: DatasetRow, now: float) -> Tuple[str, str]:
    failed = row.last_verify_failure is not None and (
        row.last_verify is None or row.last_verify_failure > row.last_verify)
    if failed:
        return "verify-failed", f"FAILED {age_text(now - row.last_verify_failure)} ago"
    if row.last_verify is None:
        return "", "never"
    return "", f"{age_text(now - row.last_verify)} ago"


def _stored_cell(row: DatasetRow) -> str:
    text = html.escape(human(row.stored_bytes))
    if not row.quota_bytes:
        return f"{text} <small>(no quota)</small>"
    share = min(100.0, 100.0 * row.client_stored_bytes / row.quota_bytes)
    return (f"{text} <small>client {html.escape(human(row.client_stored_bytes))} of"
            f" {html.escape(human(row.quota_bytes))}</small>"
            f' <span class="bar" title="{share:.0f}% of the quota">'
            f'<span style="width:{share:.0f}%"></span></span>')


def render(rows: Sequence[DatasetRow], sort: str = "state", order: str = "asc",
           now: Optional[float] = None, problems: Sequence[str] = ()) -> str:
    """The whole page; an unknown `sort` or `order` falls back to the defaults. `problems` of
    clients.json are listed above the table (a refused entry has no row)."""
    now = time.time() if now is None else now
    keys = _sort_keys(now)
    sort = sort if sort in keys else "state"
    order = order if order in ("asc", "desc") else "asc"
    ordered: List[DatasetRow] = sorted(rows, key=keys[sort], reverse=order == "desc")
    states = [r.state(now) for r in rows]
    late = sum(1 for s in states if s in (STALE, CRITICAL, NEVER))
    head = []
    for name, title in COLUMNS:
        flip = "desc" if name == sort and order == "asc" else "asc"
        mark = (" \u25b2" if order == "asc" else " \u25bc") if name == sort else ""
        head.append(f'<th><a href="?sort={name}&amp;order={flip}">{title}{mark}</a></th>')
    body = []
    for row in ordered:
        state = row.state(now)
        age = row.age(now)
        verify_class, verify_text = _verify_cell(row, now)
        failure = ""
        if row.last_failure and (row.last_success is None or row.last_failure > row.last_success):
            failure = (f' <small title="{html.escape(row.last_failure_message)}">last upload'
                       f" failed {age_text(now - row.last_failure)} ago</small>")
        body.append(
            f'<tr class="{state}" data-client="{html.escape(row.client_id)}"'
            f' data-dataset="{html.escape(row.dataset)}">'
            f"<td>{html.escape(row.client_id)}</td>"
            f"<td>{html.escape(row.dataset or '(no backup yet)')}</td>"
            f'<td class="num">{"never" if age is None else age_text(age) + " ago"}{failure}</td>'
            f'<td class="num">{row.chain_length}</td>'
            f"<td>{_stored_cell(row)}</td>"
            f'<td class="{verify_class}">{verify_text}</td>'
            f'<td class="state">{state}</td></tr>')
    title = f"zfsmgr: {len(rows)} datasets, {late} need attention"
    stamp = utc_text(now)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>zfsmgr backups</h1>"
            f'<p class="summary">{len(rows)} datasets of'
            f" {len({r.client_id for r in rows})} clients; {late} stale or missing.</p>"
            + "".join(f'<p class="problem">{html.escape(p)}</p>' for p in problems) +
            f"<table><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f"<footer>zfsmgr {html.escape(__version__)}, {stamp}</footer></body></html>\n")
