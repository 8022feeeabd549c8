"""`zfsmgr client …`: the seed's client commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from zfsmgr import protocol
from zfsmgr import settings as config
from zfsmgr import systemd
from zfsmgr.client.locks import DatasetLock
from zfsmgr.errors import (LockedError, ServerError, ServerUnreachable, SettingsError,
                           ZfsmgrError)
from zfsmgr.files import write_atomic
from zfsmgr.progress import human
from zfsmgr.retention import SNAPSHOT_TYPES, RetentionPolicy

HELP = """commands:
  backup [--json]      snapshot the selected datasets (LOCAL_DATASET, RECURSIVE,
                       EXCLUDE_DATASETS, org.zfsmgr:backup) and send each (incremental when
                       this server has a base); --json: a summary per dataset
  backup-full [--json] send full backups
  backup-incremental [--json]
                       send incrementals from the bases (a dataset without one fails)
  datasets [--json]    what the next backup would back up, and why
  snapshot TYPE [--json]
                       create an hourly|daily|weekly|monthly snapshot of every selected
                       dataset, then rotate that type
  rotate [--dry-run] [--json]
                       rotate zfsmgr's typed snapshots by the retention policy
  rotate-remote [--dry-run] [--json]
                       ask the server to delete old backups: its retention policy, then the
                       oldest whole chains while over the quota
  status [--json]      storage used, quota, backups per dataset
  bookmarks [--json]   the incremental bases zfsmgr keeps (bookmarks or held snapshots)
  systemd-units [--install] [--unit-dir DIR] [--workdir DIR] [--on-calendar hourly]
                [--randomized-delay 15m]
                       print (or write) zfsmgr-backup.service and its .timer (hardened)
  help                 this text

options anywhere on the line: --env-file PATH, -q/--quiet (nothing on stdout on success, for
cron), -v/--verbose. zfs, zpool, zstd and age are looked up in PATH, then /sbin, /usr/sbin,
/usr/local/sbin, /usr/local/bin.

settings (.env in the working directory, or --env-file, or the environment):
  CLIENT_ID, API_KEY, SERVER_URL, LOCAL_DATASET, RECURSIVE, EXCLUDE_DATASETS,
  SEND_PROPERTIES, BACKUP_UNCHANGED, COMPRESS, STORAGE_TYPE, CA_FILE, STATE_DIR,
  KEEP_HOURLY, KEEP_DAILY, KEEP_WEEKLY, KEEP_MONTHLY"""


def add_parser(sub) -> None:
    """Register `client` and its commands (each listed once, in HELP)."""
    parser = sub.add_parser("client", help="back up this host", description="The ZFS host side.",
                            usage="zfsmgr client COMMAND [options]",
                            epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ("backup", "backup-full", "backup-incremental", "datasets", "snapshot", "rotate",
                 "rotate-remote", "status", "bookmarks"):
        command = commands.add_parser(name)
        command.add_argument("--json", action="store_true", help="one JSON document on stdout")
        if name == "snapshot":
            command.add_argument("type", choices=SNAPSHOT_TYPES)
        if name in ("rotate", "rotate-remote"):
            command.add_argument("--dry-run", action="store_true", help="show, delete nothing")
    units = commands.add_parser("systemd-units")
    systemd.add_arguments(units, "/etc/zfsmgr")
    units.add_argument("--on-calendar", default="hourly",
                       help="when to back up (systemd.time; default hourly)")
    units.add_argument("--randomized-delay", type=systemd.checked_delay, default="15m",
                       help="spread the fleet's runs by up to this (default 15m)")
    commands.add_parser("help")
    parser.set_defaults(run=run, group_parser=parser)


LOCK_WAIT = 120.0  # seconds a typed snapshot's rotation waits for a dataset's lock
ROOT_STATE_DIR = "/var/lib/zfsmgr-client"  # root's (systemd's StateDirectory= of the units)


def default_state_dir() -> Path:
    """Root's runs share one folder, whatever starts them (the timer's unit, cron, a shell), so
    their locks exclude one another; anyone else's is ~/.local/state/zfsmgr."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path(ROOT_STATE_DIR)
    return Path.home() / ".local" / "state" / "zfsmgr"


def state_dir(settings) -> Path:
    """STATE_DIR (`~` expanded; it must be absolute: a relative one would move with the
    working directory, and the locks with it), else default_state_dir()."""
    path = Path(settings.state_dir).expanduser() if settings.state_dir else default_state_dir()
    if not path.is_absolute():
        raise SettingsError(f"STATE_DIR={settings.state_dir} must be an absolute path (the"
                            " locks of every run must be in one place)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"STATE_DIR={path} cannot be used as a directory:"
                            f" {exc.strerror or exc}") from None
    return path


def _api(settings):
    from zfsmgr.remote import ServerClient

    settings.require("CLIENT_ID", "API_KEY", "SERVER_URL")
    protocol.validate_client_id(settings.client_id)
    return ServerClient(settings.server_url, settings.client_id, settings.api_key,
                        settings.ca_file, settings.request_timeout)


def run(args, env_file) -> int:
    """Dispatch a client command."""
    command = args.command
    if command in (None, "help"):
        args.group_parser.print_help(sys.stdout if command else sys.stderr)
        return 0 if command else 2
    if command == "systemd-units":
        units = systemd.client_units(args.python, args.program or systemd.program(),
                                     args.workdir, args.on_calendar, args.randomized_delay)
        return systemd.emit(units, args.install, args.unit_dir, ["zfsmgr-backup.timer"])
    settings = config.load(config.CLIENT, env_file)
    from zfsmgr.client import output
    from zfsmgr.zfs import zfs_from_settings

    zfs = zfs_from_settings(settings)
    if command == "status":
        return status(_api(settings), args.json)
    if command == "rotate-remote":
        result = _api(settings).call("POST", protocol.ROTATE, {"dry_run": args.dry_run})
        output.rotate_remote(result, args.json)
        return 0
    settings.require("LOCAL_DATASET")
    from zfsmgr.client import run as runs

    options = runs.Options.from_settings(settings, "")
    if command == "datasets":
        return datasets(zfs, options, args.json)
    if command == "bookmarks":
        return bookmarks(zfs, options, args.json)
    if command in ("snapshot", "rotate"):
        return snapshot_and_rotate(settings, zfs, options, command, args)
    return backup(settings, zfs, options, command, args.json)


def backup(settings, zfs, options, command: str, as_json: bool) -> int:
    """`backup`, `backup-full`, `backup-incremental` over the whole selection."""
    from dataclasses import replace

    from zfsmgr.client import output
    from zfsmgr.client import run as runs
    from zfsmgr.client.base import server_tag
    from zfsmgr.client.healthcheck import pinged
    from zfsmgr.client.locks import RunLock
    from zfsmgr.crypt import Encryption

    api = _api(settings)
    options = replace(options, tag=server_tag(settings.server_url, settings.client_id))
    mode = {"backup": "auto", "backup-full": "full", "backup-incremental": "incremental"}[
        command]
    folder = state_dir(settings)
    show = (lambda outcome: None) if as_json else (lambda outcome: print(outcome.line(),
                                                                         flush=True))
    sealing = Encryption(settings.encrypt, settings.age_recipients)
    what = f"zfsmgr client {command} {' '.join(options.roots)}"
    # the lock first: a run that finds another at work pings nothing (its /start and /fail
    # made the check "down" and reset the timing of the run that is working)
    with RunLock(folder, options.tag), pinged(settings.healthcheck_url, what) as ping:
        report = runs.Run(api, zfs, options, folder, mode, show, encryption=sealing).execute()
        for outcome in report.outcomes:
            (ping.failed if outcome.status == "failed" else ping.note)(outcome.line())
    if as_json:
        output.emit_json(report.as_dict())
        return report.exit_status()
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if len(report.outcomes) > 1:
        print(report.total_line())
    if len(report.outcomes) == 1 and report.failed:  # one dataset: its error, as ever
        print(f"zfsmgr: error: {report.failed[0].message}", file=sys.stderr)
    elif report.failed:
        for failure in report.failed:
            print(f"zfsmgr: error: {failure.dataset}: {failure.message}", file=sys.stderr)
        print(f"zfsmgr: error: {len(report.failed)} of {len(report.outcomes)} datasets failed",
              file=sys.stderr)
    return report.exit_status()


def datasets(zfs, options, as_json: bool) -> int:
    """What the next run backs up, and why."""
    from zfsmgr.client import run as runs

    _, choices = runs.plan(zfs, options)
    if as_json:
        from zfsmgr.client.output import emit_json

        emit_json([c.as_dict() for c in choices])
        return 0
    for c in choices:
        print(f"{c.name}\t{'backed up' if c.selected else 'left out'}\t{c.reason}")
    return 0


def bookmarks(zfs, options, as_json: bool) -> int:
    """The incremental bases of every selected dataset."""
    from zfsmgr.client import run as runs
    from zfsmgr.client.base import list_bases
    from zfsmgr.client.selection import selected

    _, choices = runs.plan(zfs, options)
    bases = []
    for name in selected(choices):
        found = list_bases(zfs, name, zfs.features(name))
        bases += found
        if not found and not as_json:
            print(f"no incremental base for {name}: the next backup is full")
    if as_json:
        print(json.dumps(bases, indent=1))
        return 0
    for b in bases:
        server = f"\tserver {b['server']}" if b.get("server") else ""
        print(f"{b['name']}\t{b['type']}\tguid {b['guid']}{server}")
    return 0


def status(api, as_json: bool) -> int:
    """Print the server's view of this client."""
    data = api.call("GET", protocol.STATUS)
    if as_json:
        print(json.dumps({k: v for k, v in data.items() if k != "success"}, indent=1))
        return 0
    quota = human(data["quota_bytes"]) if data["quota_bytes"] else "unlimited"
    print(f"client {data['client_id']} ({data['storage_type']} storage)")
    print(f"used {human(data['used_bytes'])} of {quota}, {data['snapshot_count']} backups,"
          f" last {data['last_backup'] or 'never'}")
    for name, ds in sorted(data["datasets"].items()):
        print(f"  {name}: {ds['snapshot_count']} backups, {human(ds['used_bytes'])},"
              f" last {ds['last_backup']} ({ds['latest_snapshot']})")
    return 0


def policy_for(settings) -> RetentionPolicy:
    """The server's policy if it manages one (cached), else the local settings.

    Raises ServerUnreachable when the server is down and no server policy was ever cached:
    nothing is deleted under a guess.
    """
    cache = state_dir(settings) / f"policy-{settings.client_id or 'local'}.json"
    local = RetentionPolicy(settings.keep_hourly, settings.keep_daily, settings.keep_weekly,
                            settings.keep_monthly)
    try:
        answer = _api(settings).call("GET", protocol.ROTATION_POLICY)
    except ServerUnreachable:
        if cache.exists():
            try:
                data = json.loads(cache.read_text())
                cached = RetentionPolicy.from_mapping(data) if data else local
            except (ValueError, TypeError) as exc:  # not what this client wrote: trust none
                raise ServerUnreachable(f"the server is unreachable and its cached policy"
                                        f" {cache} is unreadable ({exc})") from None
            print("zfsmgr: warning: server unreachable; using its last policy", file=sys.stderr)
            return cached
        raise
    managed = answer.get("server_managed") and answer.get("rotation_policy")
    try:  # checked before it is cached: a bad one must not be reused when the server is down
        policy = RetentionPolicy.from_mapping(answer["rotation_policy"]) if managed else local
    except (ValueError, TypeError) as exc:
        raise ServerError(200, f"the server's rotation policy is malformed: {exc}",
                          answer) from None
    write_atomic(cache, json.dumps(answer["rotation_policy"] if managed else None).encode(),
                 durable=False)
    return policy


def snapshot_and_rotate(settings, zfs, options, command, args) -> int:
    """`snapshot TYPE` of every selected dataset (one atomic snapshot per pool where zfs
    can), then rotate that type; or `rotate` all types, dataset by dataset."""
    import contextlib

    from zfsmgr.client import output
    from zfsmgr.client import run as runs
    from zfsmgr.client import snapshots
    from zfsmgr.client.selection import selected

    pools, choices = runs.plan(zfs, options)
    missing = [c.name for c in choices if c.reason == "does not exist"]
    names = selected(choices)
    kinds, created = SNAPSHOT_TYPES, None
    if command == "snapshot":  # one zfs snapshot: no lock needed, whatever runs meanwhile
        kinds = (args.type,)
        modern = {pool: info.features.modern for pool, info in pools.items()}
        made = snapshots.create_many(zfs, names, args.type, modern)
        created = made[0] if len(made) == 1 else made  # one dataset: the name, as before
    with contextlib.ExitStack() as locks:
        try:  # cron starts hourly, daily, weekly and monthly at the same minute: in turn
            for name in names:
                locks.enter_context(DatasetLock(state_dir(settings), name, wait=LOCK_WAIT))
        except LockedError as exc:
            if command != "snapshot":
                raise
            print(f"zfsmgr: warning: snapshots made, not rotated now: {exc}; the next"
                  f" `snapshot {args.type}` rotates them", file=sys.stderr)
            output.local_rotation([], False, args.json, created)
            return _missing(missing)
        dry = getattr(args, "dry_run", False)
        try:
            policy = policy_for(settings)
        except ZfsmgrError as exc:
            print(f"zfsmgr: warning: no retention policy ({exc}); nothing rotated",
                  file=sys.stderr)
            output.local_rotation([], False, args.json, created)
            return _missing(missing) if command == "snapshot" else (_missing(missing) or 1)
        actions, failures = [], []
        for dataset in names:  # one dataset's zfs error stops only that dataset's rotation
            try:
                actions += snapshots.rotate(zfs, dataset, policy, kinds, dry_run=dry)
            except ZfsmgrError as exc:
                failures.append(f"{dataset}: not rotated: {exc}")
        output.local_rotation(actions, dry, args.json, created)  # what was done, first
    for failure in failures:
        print(f"zfsmgr: error: {failure}", file=sys.stderr)
    return _missing(missing) or (1 if failures else 0)


def _missing(names) -> int:
    """Say which selected datasets do not exist (on every way out); 1 if any."""
    for name in names:
        print(f"zfsmgr: error: dataset {name} does not exist", file=sys.stderr)
    return 1 if names else 0
