"""What client commands print: a line for people, or with --json one JSON document.

Each command's result goes through one small function here, so a command that grows (many
datasets, new fields) extends its printer instead of scattering prints. `-q` is handled by the
CLI (stdout goes nowhere on success); errors and warnings always go to stderr.
"""

from __future__ import annotations

import json
import sys
from typing import Iterable, List, Tuple, Union

from zfsmgr.client.snapshots import DESTROY_FAILED
from zfsmgr.progress import human


def emit_json(data) -> None:
    """One JSON document on stdout."""
    print(json.dumps(data, indent=1, sort_keys=True))


def backup(result, as_json: bool) -> None:
    """The outcome of one backup: the summary line cron mails, or its fields as JSON."""
    from zfsmgr.client.backup import summary

    if as_json:
        emit_json({"key": result.key, "type": result.type, "snapshot": result.snapshot,
                   "raw_size": result.raw_size, "stored_size": result.stored_size,
                   "seconds": round(result.seconds, 3)})
    else:
        print(summary(result))


def rotate_remote(result: dict, as_json: bool) -> None:
    """The server's rotation: what went (or would go), what stays, and how far over quota."""
    if as_json:
        emit_json({k: v for k, v in result.items() if k != "success"})
        return
    verb = "would delete" if result.get("dry_run") else "deleted"
    for key in result["deleted"]:
        print(f"{verb} {key}: {result['reasons'].get(key, '')}")
    print(f"{verb} {len(result['deleted'])} backups ({human(result['freed_bytes'])}),"
          f" kept {len(result['kept'])}")
    over = result.get("over_bytes") or 0
    if over:
        print(f"still {human(over)} over the quota of {human(result['quota_bytes'])}"
              f" ({human(result['used_bytes'])} used): the newest chain of each dataset is"
              " kept; raise max_size_bytes or forget a dataset on the server")


def local_rotation(actions: Iterable[Tuple[str, bool, str]], dry_run: bool, as_json: bool,
                   created: Union[str, List[str], None] = None) -> None:
    """`snapshot TYPE` / `rotate`: the snapshot(s) made (one name, or a list for several
    datasets), and each typed snapshot destroyed."""
    actions = list(actions)
    refused = [(name, reason) for name, keep, reason in actions
               if keep and reason.startswith(DESTROY_FAILED)]
    for name, reason in refused:  # on stderr: a missing `zfs allow destroy` must show
        print(f"zfsmgr: warning: {name} {reason[len('kept: '):]}", file=sys.stderr)
    if as_json:
        emit_json({"created": created, "dry_run": dry_run,
                   "destroyed": [{"snapshot": name, "reason": reason}
                                 for name, keep, reason in actions if not keep],
                   "kept": [name for name, keep, _ in actions if keep],
                   "not_destroyed": [{"snapshot": name, "reason": reason}
                                     for name, reason in refused]})
        return
    for name in [created] if isinstance(created, str) else created or []:
        print(f"created {name}")
    for name, keep, reason in actions:
        if not keep:
            print(f"{'would destroy' if dry_run else 'destroyed'} {name}: {reason}")
