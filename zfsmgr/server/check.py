"""`zfsmgr server check`: one line in the Nagios plugin convention, for Icinga, Nagios, Zabbix.

    OK: 47 datasets backed up, newest backups at most 3.2h old | 'web1:tank/db'=11520s;...
    CRITICAL: 2/47 datasets stale: web1:tank/db 2.3d, web2:(no backup) never | ...

Exit 0 OK, 1 WARNING (a dataset's newest backup is older than --warn), 2 CRITICAL (older than
--crit, or an enabled client that never backed up), 3 UNKNOWN (the catalog or clients.json
cannot be read, or nothing matches). A client's `check_warn`/`check_crit` in clients.json
override the command's thresholds for that client; disabled clients are not reported.
Perfdata: each dataset's age in seconds with its warn and crit thresholds.
"""

from __future__ import annotations

import time
from typing import List, Sequence, Tuple

from zfsmgr.server.fleet import age_text
from zfsmgr.settings import as_duration, option_type

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_WORDS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

HELP = """  check [--client C] [--dataset D] [--warn 26h] [--crit 50h]
                      Nagios-style: one line with perfdata; exit 0 OK, 1 WARNING,
                      2 CRITICAL, 3 UNKNOWN"""


_duration = option_type(as_duration)


def register(commands) -> None:
    """Add `check` to `zfsmgr server`."""
    check = commands.add_parser("check", help="Nagios-style freshness check")
    check.add_argument("--client", default="", help="only this client")
    check.add_argument("--dataset", default="", help="only this dataset")
    check.add_argument("--warn", type=_duration, default=None,
                       help="WARNING past this age (default CHECK_WARN, 26h)")
    check.add_argument("--crit", type=_duration, default=None,
                       help="CRITICAL past this age (default CHECK_CRIT, 50h)")


def evaluate(rows: Sequence, now: float, problems: Sequence[str] = ()) -> Tuple[int, str]:
    """The exit status and the line for the selected rows (enabled clients only).

    `problems` of clients.json (refused entries are not monitored at all) make an OK a
    WARNING and are named in the line."""
    rows = [r for r in rows if r.enabled]
    if not rows:
        return UNKNOWN, "UNKNOWN: no enabled client or dataset matches" + _named(problems)
    critical, warning = [], []
    for row in rows:
        state = row.state(now)
        if state in ("critical", "never"):
            critical.append(row)
        elif state == "stale":
            warning.append(row)
    perf = " ".join(f"'{r.name}'={r.age(now):.0f}s;{r.warn:.0f};{r.crit:.0f};0"
                    for r in rows if r.age(now) is not None)
    late: List = critical + warning
    if late:
        status = CRITICAL if critical else WARNING
        listed = ", ".join(f"{r.name} {age_text(r.age(now)) if r.age(now) is not None else 'never'}"
                           for r in late[:10])
        more = f" and {len(late) - 10} more" if len(late) > 10 else ""
        text = f"{_WORDS[status]}: {len(late)}/{len(rows)} datasets stale: {listed}{more}"
    else:
        status = OK
        oldest = max(r.age(now) for r in rows)
        text = f"OK: {len(rows)} datasets backed up, newest backups at most {age_text(oldest)} old"
    if problems:
        status = max(status, WARNING)
        text = _WORDS[status] + text[text.index(":"):] + _named(problems)
    return status, f"{text} | {perf}" if perf else text


def _named(problems: Sequence[str]) -> str:
    if not problems:
        return ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"; {problems[0]}{more}"


def run(args, env_file) -> int:
    """Print the check's line; return its Nagios status."""
    from zfsmgr import settings as config
    from zfsmgr.errors import ZfsmgrError
    from zfsmgr.server.engine import require_sqlite

    try:
        require_sqlite()
        from zfsmgr.server.context import ServerContext
        from zfsmgr.server.fleet import fleet

        settings = config.load(config.SERVER, env_file)
        ctx = ServerContext(settings)
        rows = fleet(ctx, args.warn, args.crit)
        problems = ctx.clients.warnings()
    except (ZfsmgrError, OSError) as exc:
        print(f"UNKNOWN: cannot check: {exc}")
        return UNKNOWN
    rows = [r for r in rows if (not args.client or r.client_id == args.client)
            and (not args.dataset or r.dataset == args.dataset)]
    status, line = evaluate(rows, time.time(), problems)
    print(line)
    return status
