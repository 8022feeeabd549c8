"""`zfsmgr client …`: the seed's client commands."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import urllib.parse
from pathlib import Path

from zfsmgr import protocol
from zfsmgr import settings as config
from zfsmgr import systemd
from zfsmgr.errors import LockedError, ServerUnreachable, ZfsmgrError
from zfsmgr.progress import human
from zfsmgr.retention import SNAPSHOT_TYPES, RetentionPolicy

HELP = """commands:
  backup [--json]      snapshot LOCAL_DATASET and send it (incremental when a base exists)
  backup-full [--json] send a full backup
  backup-incremental [--json]
                       send an incremental from the base (error when there is none)
  snapshot TYPE [--json]
                       create an hourly|daily|weekly|monthly snapshot, then rotate that type
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
cron), -v/--verbose. zfs and zpool are looked up in PATH, then /sbin, /usr/sbin, /usr/local/sbin.

settings (.env in the working directory, or --env-file, or the environment):
  CLIENT_ID, API_KEY, SERVER_URL, LOCAL_DATASET, COMPRESS, STORAGE_TYPE, CA_FILE, STATE_DIR,
  KEEP_HOURLY, KEEP_DAILY, KEEP_WEEKLY, KEEP_MONTHLY"""


def add_parser(sub) -> None:
    """Register `client` and its commands (each listed once, in HELP)."""
    parser = sub.add_parser("client", help="back up this host", description="The ZFS host side.",
                            usage="zfsmgr client COMMAND [options]",
                            epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in ("backup", "backup-full", "backup-incremental", "snapshot", "rotate",
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


def state_dir(settings) -> Path:
    """STATE_DIR, else ~/.local/state/zfsmgr."""
    path = Path(settings.state_dir or Path.home() / ".local" / "state" / "zfsmgr")
    path.mkdir(parents=True, exist_ok=True)
    return path


class DatasetLock:
    """One zfsmgr run per dataset at a time (flock, released when the process dies)."""

    def __init__(self, folder: Path, dataset: str):
        # the real name, escaped: tank/a_b and tank/a/b must not share a lock
        self.path = folder / ("lock-" + urllib.parse.quote(dataset, safe=""))

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LockedError(f"another zfsmgr run is working on this dataset ({self.path})")\
                from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _api(settings):
    from zfsmgr.remote import ServerClient

    settings.require("CLIENT_ID", "API_KEY", "SERVER_URL")
    protocol.validate_client_id(settings.client_id)
    return ServerClient(settings.server_url, settings.client_id, settings.api_key,
                        settings.ca_file)


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
    settings.require("LOCAL_DATASET")
    dataset = protocol.validate_dataset(settings.local_dataset)
    if command == "bookmarks":
        from zfsmgr.client.base import list_bases

        bases = list_bases(zfs, dataset, zfs.features(dataset))
        if args.json:
            print(json.dumps(bases, indent=1))
        else:
            for b in bases:
                print(f"{b['name']}\t{b['type']}\tguid {b['guid']}")
            if not bases:
                print(f"no incremental base for {dataset}: the next backup is full")
        return 0
    if command == "rotate-remote":
        result = _api(settings).call("POST", protocol.ROTATE, {"dry_run": args.dry_run})
        output.rotate_remote(result, args.json)
        return 0
    with DatasetLock(state_dir(settings), dataset):
        if command in ("snapshot", "rotate"):
            return snapshot_and_rotate(settings, zfs, dataset, command, args)
        from zfsmgr.client.backup import Backup, summary
        from zfsmgr.client.healthcheck import pinged

        mode = {"backup": "auto", "backup-full": "full", "backup-incremental": "incremental"}[
            command]
        from zfsmgr.crypt import Encryption

        sealing = Encryption(settings.encrypt, settings.age_recipients)
        with pinged(settings.healthcheck_url, f"zfsmgr client {command} {dataset}") as run:
            result = Backup(_api(settings), zfs, dataset, settings.compress,
                            settings.compress_level, settings.storage_type,
                            encryption=sealing).run(mode)
            output.backup(result, args.json)
            run.note(summary(result))
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
            data = json.loads(cache.read_text())
            print("zfsmgr: warning: server unreachable; using its last policy", file=sys.stderr)
            return RetentionPolicy.from_mapping(data) if data else local
        raise
    managed = answer.get("server_managed") and answer.get("rotation_policy")
    cache.write_text(json.dumps(answer["rotation_policy"] if managed else None))
    return RetentionPolicy.from_mapping(answer["rotation_policy"]) if managed else local


def snapshot_and_rotate(settings, zfs, dataset, command, args) -> int:
    """`snapshot TYPE` then rotate that type; or `rotate` all types."""
    from zfsmgr.client import output, snapshots

    kinds, created = SNAPSHOT_TYPES, None
    if command == "snapshot":
        created = snapshots.create(zfs, dataset, args.type)
        kinds = (args.type,)
    try:
        policy = policy_for(settings)
    except ZfsmgrError as exc:
        print(f"zfsmgr: warning: no retention policy ({exc}); nothing rotated", file=sys.stderr)
        output.local_rotation([], False, args.json, created)
        return 0 if command == "snapshot" else 1
    dry = getattr(args, "dry_run", False)
    output.local_rotation(snapshots.rotate(zfs, dataset, policy, kinds, dry_run=dry), dry,
                          args.json, created)
    return 0
