"""`zfsmgr restore …`: list, restore, latest, save, mount, verify."""

from __future__ import annotations

import argparse
import json
import os
import sys

from zfsmgr import protocol
from zfsmgr import settings as config
from zfsmgr.errors import UsageError, ZfsmgrError
from zfsmgr.protocol import Manifest
from zfsmgr.remote import ServerClient
from zfsmgr.restore import listing
from zfsmgr.restore.chain import chain_for, self_contained
from zfsmgr.zfs import zfs_from_settings

HELP = """commands:
  list [--json] [--dataset DS] [--tree]
                      the client's backups, newest first; the numbers are what the other
                      commands take (--dataset filters the list but keeps the numbers;
                      --tree groups the backups by the run that made them)
  restore NUMBER DATASET [--force|-f]
                      rebuild backup NUMBER as DATASET: its full base, then each incremental
                      in order; every stream is checked against its sha256 as it is received,
                      and a failed restore leaves nothing behind. An existing DATASET is refused
                      unless --force: then the chain is received beside it and replaces it only
                      once complete and verified
  restore NUMBER DATASET --recursive [--force]
                      restore backup NUMBER and, below DATASET, each descendant of its source
                      dataset (its newest backup no later than NUMBER), each with its chain;
                      --force replaces the whole tree only once every chain is in
  latest DATASET [--force|-f] [--source-dataset DS] [--recursive]
                      restore the newest backup (of source dataset DS; with its descendants)
  latest --all POOL/TARGET [--force]
                      every dataset of the client, each as POOL/TARGET/<source dataset>
  save NUMBER FILE [--chain] [--force|-f]
                      write backup NUMBER's stream to FILE once verified (.gz gzip, .zst
                      zstd, .zfs plain; other names: compressed as the backup was); an
                      existing FILE is replaced only with --force. An incremental
                      needs the streams before it: --chain saves every stream of the chain as
                      FILE.01-SNAP.zfs.gz, FILE.02-SNAP.zfs.gz, ... (FILE without extension),
                      to be received in that order:
                        for f in FILE.*; do gunzip -c "$f" | zfs recv -F DS; done
  mount DATASET MOUNTPOINT
                      set DATASET's mountpoint and mount it (MOUNTPOINT must not be busy)
  verify [NUMBER | --all] [--receive POOL/SCRATCH]
                      download backup NUMBER (default: all) and every stream its chain needs,
                      checking size and sha256 and that each chain is whole; --receive also
                      receives each chain into the scratch dataset (which must not exist) and
                      destroys it afterwards. Exit 0 only when all is well, else 5
  help                this text

settings (.env in the working directory or the environment):
  CLIENT_ID, API_KEY, SERVER_URL, CA_FILE (as for the client)"""


def _number(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a backup number (1, 2, ...)")
    return int(text)


def add_parser(sub) -> None:
    """Register `restore` and its commands."""
    parser = sub.add_parser("restore", help="list, restore, save, mount and verify backups",
                            description="Restore backups from the server.", epilog=HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    show = commands.add_parser("list", help="list the backups on the server")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--dataset", help="only backups of this source dataset")
    show.add_argument("--tree", action="store_true", help="group the backups by run")
    one = commands.add_parser("restore", help="restore backup NUMBER into DATASET")
    one.add_argument("number", type=_number)
    one.add_argument("dataset")
    one.add_argument("-f", "--force", action="store_true", help="replace an existing DATASET")
    one.add_argument("-r", "--recursive", action="store_true",
                     help="also the descendants of the backup's dataset, under DATASET")
    latest = commands.add_parser("latest", help="restore the newest backup into DATASET")
    latest.add_argument("dataset")
    latest.add_argument("-f", "--force", action="store_true", help="replace an existing DATASET")
    latest.add_argument("--source-dataset", help="the newest backup of this source dataset")
    latest.add_argument("-r", "--recursive", action="store_true",
                        help="also its descendants, under DATASET")
    latest.add_argument("--all", action="store_true",
                        help="every dataset of the client, as DATASET/<source dataset>")
    save = commands.add_parser("save", help="save backup NUMBER to a file")
    save.add_argument("number", type=_number)
    save.add_argument("filename")
    save.add_argument("--chain", action="store_true", help="save every stream of the chain")
    save.add_argument("-f", "--force", action="store_true", help="overwrite existing files")
    mount = commands.add_parser("mount", help="mount DATASET at MOUNTPOINT")
    mount.add_argument("dataset")
    mount.add_argument("mountpoint")
    verify = commands.add_parser("verify", help="check stored backups without restoring")
    verify.add_argument("number", type=_number, nargs="?")
    verify.add_argument("--all", action="store_true", help="every backup (the default)")
    verify.add_argument("--receive", metavar="POOL/SCRATCH",
                        help="also receive each chain into this scratch dataset")
    commands.add_parser("help", help="show the commands")
    parser.set_defaults(run=run, group_parser=parser)


def run(args, env_file) -> int:
    """Dispatch a restore command."""
    command = args.command
    if command in (None, "help"):
        args.group_parser.print_help(sys.stdout if command else sys.stderr)
        return 0 if command else 2
    zfs = zfs_from_settings(config.load(config.RESTORE, env_file,
                                        names=("ZFSMGR_ZFS", "ZFSMGR_ZPOOL")))
    if command == "mount":
        from zfsmgr.restore.mount import mount

        path = mount(zfs, args.dataset, args.mountpoint)
        print(f"{args.dataset} is mounted at {path}")
        return 0
    if command == "verify" and args.number and args.all:
        raise UsageError("verify takes a backup number or --all, not both")
    if getattr(args, "dataset", None) and command in ("restore", "latest"):
        protocol.validate_dataset(args.dataset)
    client = _client(env_file)
    manifests = fetch(client)
    rows = listing.numbered(manifests)
    if command == "list":
        return _list(rows, args)
    from zfsmgr.restore.receive import Target, progress_opener, restore_chain

    opener = progress_opener(client, identity=_identity(env_file))
    if command in ("restore", "latest") and (args.recursive or getattr(args, "all", False)):
        return _restore_tree(zfs, opener, manifests, rows, args, lambda: _heard(client))
    if command in ("restore", "latest"):
        target = listing.pick(rows, args.number) if command == "restore" else _latest(rows, args)
        chain = chain_for(manifests, target)  # a broken chain fails here, before any receive
        into = Target(zfs, args.dataset, args.force)
        into.check()
        what = f"{target.dataset}@{target.snapshot} ({listing.snapshot_id(target.key)})"
        steps = f" from {len(chain)} streams" if len(chain) > 1 else ""
        print(f"restoring {what} into {args.dataset}{steps}", file=sys.stderr)
        restore_chain(zfs, opener, chain, into)
        print(f"restored {what} into {args.dataset}")
        return 0
    if command == "save":
        from zfsmgr.restore.save import save

        target = listing.pick(rows, args.number)
        chain = chain_for(manifests, target) if args.chain else [target]
        if not args.chain and not self_contained(target):
            print(f"note: {target.key} is incremental: it needs the streams before it"
                  " (save them all with --chain)", file=sys.stderr)
        for name, size in save(opener, chain, args.filename, args.chain, args.force):
            print(f"saved {name} ({listing.human_size(size)})")
        return 0
    from zfsmgr.restore.verify import Report, verify

    selected = [listing.pick(rows, args.number)] if args.number else [m for _, m in rows]
    report = Report()
    try:
        verify(zfs, opener, manifests, selected, scratch=args.receive, report=report)
    finally:
        _report_verify(client, report)
    return 0


def _report_verify(client: ServerClient, report) -> None:
    """Tell the server what verify found (its status page and metrics show the last verify);
    a server that cannot take it costs a warning, not the verify's result."""
    if not report.results:
        return
    try:
        client.call("POST", protocol.VERIFY_REPORT, report.as_request())
    except ZfsmgrError as exc:
        print(f"zfsmgr: warning: could not report the verification to the server: {exc}",
              file=sys.stderr)


def _heard(client: ServerClient) -> dict[str, tuple[float, float]]:
    """When the server last heard of each dataset without a backup: (its newest check-in of
    "unchanged", its newest failed upload), 0 for none; empty from a server that does not
    say."""
    heard = {}
    for dataset, entry in (client.call("GET", protocol.STATUS).get("datasets") or {}).items():
        if isinstance(entry, dict):
            times = [entry.get(name) for name in ("last_checked", "last_failure")]
            checked, failed = [t if isinstance(t, (int, float)) else 0.0 for t in times]
            heard[dataset] = (float(checked), float(failed))
    return heard


def _restore_tree(zfs, opener, manifests, rows: listing.Numbered, args, heard) -> int:
    """`--recursive` (a dataset and its descendants) or `latest --all` (every dataset)."""
    from zfsmgr.progress import utc_text
    from zfsmgr.restore.receive import Target
    from zfsmgr.restore.tree import every_dataset, left_behind, restore_tree, subtree

    if getattr(args, "all", False):
        if args.recursive or args.source_dataset:
            raise UsageError("--all restores every dataset: without --recursive or"
                             " --source-dataset")
        if not rows:
            raise UsageError("the server holds no backups for this client")
        items = every_dataset(manifests)
    else:
        if args.command == "restore":
            top = listing.pick(rows, args.number)
            items = subtree(manifests, top.dataset, listing.moment(top))
        else:
            items = subtree(manifests, _latest(rows, args).dataset)
    into = Target(zfs, args.dataset, args.force)
    into.check()
    run = max(listing.moment(m) for _, m in items) if items else 0.0
    for manifest, why in left_behind(items, run, heard(), manifests):
        reason = ("its upload failed in that run or after it: what changed since that backup"
                  " is not in it" if why == "failed" else
                  "the server has heard nothing of it since (no check-in of \"unchanged\", no"
                  " failed upload): it may have been destroyed or left out since")
        print(f"zfsmgr: warning: {manifest.dataset}: its newest backup to restore"
              f" ({utc_text(listing.moment(manifest))}) is older than the run restored"
              f" ({utc_text(run)}), and {reason}; it is restored as of that backup",
              file=sys.stderr)
    restored = restore_tree(zfs, opener, manifests, items, into)
    print(f"restored {len(restored)} datasets into {args.dataset}")
    for (_, manifest), name in zip(items, restored):
        print(f"  {name}: {manifest.dataset}@{manifest.snapshot}")
    return 0


def _client(env_file) -> ServerClient:
    settings = config.load(config.RESTORE, env_file)
    settings.require("CLIENT_ID", "API_KEY", "SERVER_URL")
    return ServerClient(settings.server_url, settings.client_id, settings.api_key,
                        settings.ca_file, settings.request_timeout)


def _identity(env_file) -> str:
    """AGE_IDENTITY_FILE, checked to be readable when set."""
    path = config.load(config.RESTORE, env_file).age_identity_file
    if path and not os.access(path, os.R_OK):
        raise UsageError(f"AGE_IDENTITY_FILE {path} cannot be read")
    return path


def fetch(client: ServerClient) -> list[Manifest]:
    """The client's manifests from the server; unreadable entries are skipped with a warning."""
    found = []
    for entry in client.call("GET", protocol.SNAPSHOTS).get("snapshots", []):
        try:
            found.append(Manifest.from_dict(entry))
        except (ValueError, TypeError) as exc:
            key = entry.get("key") if isinstance(entry, dict) else entry
            print(f"zfsmgr: warning: skipping unreadable backup entry {key!r}: {exc}",
                  file=sys.stderr)
    return found


def _list(rows: listing.Numbered, args) -> int:
    rows = listing.only_dataset(rows, args.dataset)
    if args.json:
        print(json.dumps(listing.as_json(rows), indent=1))
    elif rows and args.tree:
        print(listing.format_tree(rows))
    elif not rows:
        print("no backups" + (f" of {args.dataset}" if args.dataset else ""), file=sys.stderr)
    else:
        print(listing.format_table(rows))
    return 0


def _latest(rows: listing.Numbered, args) -> Manifest:
    chosen = listing.only_dataset(rows, args.source_dataset)
    if not chosen:
        of = f" of {args.source_dataset}" if args.source_dataset else ""
        raise UsageError(f"the server holds no backups{of} for this client")
    sources = {m.dataset for _, m in rows}
    if not args.source_dataset and len(sources) > 1:
        print(f"note: backups of {len(sources)} datasets exist; restoring the newest of all"
              f" ({chosen[0][1].dataset}); pick one with --source-dataset", file=sys.stderr)
    return chosen[0][1]
