"""`zfsmgr server clients|enable|disable|rotate-key|remove-client|set-quota|delete|forget`.

Every change to clients.json is read-modify-write under its lock file and replaced atomically
(mode 0600); the running server re-reads the file when it changes, so a change takes effect
on the next request, without a restart. Deleting backups is chain-safe: `delete` refuses a
backup that another one is an incremental on, `forget` removes a dataset's backups newest
first, so no chain is ever left without its base half-way.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

from zfsmgr.errors import StorageError, UsageError
from zfsmgr.progress import human, utc_text
from zfsmgr.protocol import parse_key, validate_client_id, validate_dataset
from zfsmgr.settings import as_duration, as_size, option_type

COMMANDS = ("clients", "enable", "disable", "rotate-key", "remove-client", "set-quota",
            "delete", "forget", "admin-key")

HELP = """  clients [--json]    every client: enabled, quota, usage, backups, last backup
  enable NAME | disable NAME
                      a disabled client may still list and restore its backups, not upload
  rotate-key NAME [--grace 24h] [--force]
                      a new key (printed once); the old one keeps working for the grace period
                      (--force: rotate again while an earlier old key is still in its grace)
  remove-client NAME [--delete-backups]
                      refused while the client has backups, unless they are deleted with it
  set-quota NAME SIZE  e.g. 200G; 0 for none
  delete BACKUP       delete one backup by its key (refused while an incremental or an open
                      upload needs it)
  forget CLIENT DATASET
                      delete every backup of one dataset of a client
  admin-key           a new admin key for the status page (prints it once, and the
                      ADMIN_API_KEY line, its SHA-256, for the server's .env)"""


_duration = option_type(as_duration)


_size = option_type(as_size)


def register(commands) -> None:
    """Add the administration commands to `zfsmgr server`."""
    listing = commands.add_parser("clients", help="list the clients")
    listing.add_argument("--json", action="store_true")
    for name in ("enable", "disable"):
        commands.add_parser(name, help=f"{name} a client").add_argument("name")
    rotate = commands.add_parser("rotate-key", help="give a client a new key")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=_duration, default=24 * 3600.0,
                        help="how long the old key keeps working (default 24h)")
    rotate.add_argument("--force", action="store_true",
                        help="rotate again while an earlier old key is still in its grace")
    remove = commands.add_parser("remove-client", help="remove a client")
    remove.add_argument("name")
    remove.add_argument("--delete-backups", action="store_true")
    quota = commands.add_parser("set-quota", help="set a client's quota")
    quota.add_argument("name")
    quota.add_argument("size", type=_size)
    delete = commands.add_parser("delete", help="delete one backup")
    delete.add_argument("backup", metavar="BACKUP")
    forget = commands.add_parser("forget", help="delete a dataset's backups")
    forget.add_argument("client")
    forget.add_argument("dataset")
    commands.add_parser("admin-key", help="make a key for the status page")


class ClientsFile:
    """clients.json as a list of JSON objects, edited atomically under its lock file."""

    def __init__(self, path: str):
        self.path = Path(path)

    def read(self) -> List[Dict[str, Any]]:
        """The entries as they are on disk."""
        from zfsmgr.server.clients import read_entries

        return read_entries(self.path)

    def edit(self, name: str, change: Callable[[Dict[str, Any]], Any]) -> Any:
        """Apply `change` to one client's entry (None from it removes the entry)."""
        from zfsmgr.server.clients import write_entries
        from zfsmgr.server.filelock import FileLock

        validate_client_id(name)
        with FileLock(str(self.path) + ".lock"):
            entries = self.read()
            found = [e for e in entries if isinstance(e, dict) and e.get("client_id") == name]
            if not found:
                raise UsageError(f"no client {name} in {self.path}")
            result = change(found[0])
            if result is None:
                entries = [e for e in entries if e is not found[0]]
            write_entries(self.path, entries)
            return result


def run(args, settings) -> int:
    """Run one administration command."""
    from zfsmgr.server.engine import require_sqlite

    if args.command == "admin-key":
        return admin_key()
    clients = ClientsFile(settings.config_file)
    command = args.command
    if command in ("enable", "disable"):
        clients.edit(args.name, lambda e: e.update(enabled=command == "enable") or e)
        print(f"client {args.name} {command}d")
        return 0
    if command == "set-quota":
        clients.edit(args.name, lambda e: e.update(max_size_bytes=args.size) or e)
        print(f"client {args.name}: quota {human(args.size) if args.size else 'none'}")
        return 0
    if command == "rotate-key":
        return rotate_key(clients, args.name, args.grace, args.force)
    require_sqlite()
    from zfsmgr.server.context import ServerContext

    ctx = ServerContext(settings)  # the catalog: only for the commands that read it
    if command == "clients":
        return list_clients(ctx, args.json)
    if command == "remove-client":
        return remove_client(ctx, clients, args.name, args.delete_backups)
    if command == "delete":
        return delete_backup(ctx, args.backup)
    return forget(ctx, validate_client_id(args.client), validate_dataset(args.dataset))


def admin_key() -> int:
    """A new random admin key, and the setting that stores its SHA-256."""
    from zfsmgr.server.clients import hash_key

    raw = secrets.token_urlsafe(32)
    print(f"admin key: {raw}")
    print("(shown once: the password for the status page; put this line in the server's .env)")
    print(f"ADMIN_API_KEY={hash_key(raw)}")
    return 0


def rotate_key(clients: ClientsFile, name: str, grace: float, force: bool = False) -> int:
    """A new key for a client; the current one stays valid for `grace` seconds. There is one
    place for an old key: while one is in its grace, rotating again would end it at once,
    which needs `force`. A current key that is no SHA-256 (the seed's `hashed_key`
    placeholder) opens nothing and is not kept."""
    from zfsmgr.server.clients import hash_key

    raw = secrets.token_urlsafe(32)
    now = time.time()
    until = now + grace
    stamp = utc_text(until)  # before the file changes: the new key must not be lost

    def change(entry: Dict[str, Any]) -> bool:
        expires = entry.get("previous_key_expires")
        if entry.get("previous_api_key") and isinstance(expires, (int, float)) and \
                expires > now and not force:
            raise UsageError(f"client {name}'s previous key works until {utc_text(expires)}:"
                             " rotating again now ends it at once (pass --force to do so)")
        current = entry.get("api_key", "")
        kept = isinstance(current, str) and re.fullmatch(r"[0-9a-fA-F]{64}", current)
        if kept:
            entry["previous_api_key"], entry["previous_key_expires"] = current, until
        else:
            entry.pop("previous_api_key", None)
            entry.pop("previous_key_expires", None)
        entry["api_key"] = hash_key(raw)
        return bool(kept)
    if clients.edit(name, change):
        print(f"new key for client {name}; the old one works until {stamp}")
    else:
        print(f"new key for client {name}; its old entry held no key hash (nothing kept)")
    print(f"API_KEY={raw}")
    print("(shown once: put it in the client's .env; the server keeps only its SHA-256)")
    return 0


def _delete(ctx, manifests) -> None:
    """Delete backups in the order given (ServerContext.delete); the first the store refuses
    or fails to delete stops here, still stored and listed, with the store's own error; so does
    one that a committed backup or an open upload has as its base (since it was listed), with
    the reason (UsageError)."""
    for manifest in manifests:
        client = ctx.clients.get(manifest.client_id)
        store = ctx.store_named(manifest.storage_type
                                or (ctx.default_kind(client) if client else "dir"))
        try:
            with store.client_lease(manifest.client_id):  # not amid another server's commit
                why = ctx.delete(manifest, store)
        except StorageError as exc:
            raise StorageError(f"{manifest.key} not deleted, still listed: {exc}") from None
        if why:
            raise UsageError(f"{manifest.key} stays: it is {why} (let that upload finish or"
                             " abort it, or delete that backup first)")
        print(f"deleted {manifest.key}")


def newest_first(manifests) -> list:
    """Children before their parents: an incremental is never newer than its base."""
    return sorted(manifests, key=lambda m: (-m.snapshot_time, m.key))


def remove_client(ctx, clients: ClientsFile, name: str, delete_backups: bool) -> int:
    """Remove a client from clients.json, refusing while it has backups unless deleting them."""
    backups = ctx.catalog.list(validate_client_id(name))
    if backups and not delete_backups:
        raise UsageError(f"client {name} has {len(backups)} backups"
                         f" ({human(sum(m.stored_size for m in backups))}): remove them with"
                         " --delete-backups, or keep the client disabled instead")
    clients.edit(name, lambda e: e)  # fails now, before deleting anything, if name is unknown
    _delete(ctx, newest_first(backups))
    clients.edit(name, lambda e: None)
    ctx.ledger.forget(name)
    print(f"removed client {name}" + (f" and its {len(backups)} backups" if backups else ""))
    return 0


def delete_backup(ctx, key: str) -> int:
    """Delete one backup, unless another backup is an incremental on it."""
    from zfsmgr.server.rotation import parent_key

    client_id = parse_key(key).client_id
    backups = ctx.catalog.list(client_id)
    target = [m for m in backups if m.key == key]
    if not target:
        raise UsageError(f"no backup {key} in the catalog")
    needed_by = [m.key for m in backups if parent_key(m, backups) == key]
    if needed_by:
        raise UsageError(f"{key} is the base of {', '.join(needed_by)}: delete those first"
                         f" (or every backup of the dataset with `forget`)")
    _delete(ctx, target)
    return 0


def forget(ctx, client_id: str, dataset: str) -> int:
    """Delete every backup of one dataset of a client, newest first."""
    doomed = [m for m in ctx.catalog.list(client_id) if m.dataset == dataset]
    if not doomed:
        raise UsageError(f"client {client_id} has no backups of {dataset}")
    _delete(ctx, newest_first(doomed))
    ctx.ledger.forget(client_id, dataset)
    print(f"forgot {client_id}:{dataset} ({len(doomed)} backups)")
    return 0


def list_clients(ctx, as_json: bool) -> int:
    """Every client with its state and usage."""
    from zfsmgr.server.fleet import fleet

    rows = fleet(ctx)
    now = time.time()
    found = []
    for client in sorted(ctx.clients.all(), key=lambda c: c.client_id):
        mine = [r for r in rows if r.client_id == client.client_id]
        newest = max((r.newest_snapshot for r in mine if r.newest_snapshot), default=None)
        found.append({
            "client_id": client.client_id, "enabled": client.enabled,
            "quota_bytes": client.max_size_bytes,
            "used_bytes": sum(r.stored_bytes for r in mine),
            "backups": sum(r.backups for r in mine),
            "datasets": sorted(r.dataset for r in mine if r.backups),
            "newest_snapshot": newest,
            "previous_key_valid_until": client.previous_key_expires
            if client.previous_key_expires > now else None})
    problems = ctx.clients.warnings()
    if as_json:
        print(json.dumps({"clients": found, "problems": problems}, indent=1))
        return 0
    print(f"{'CLIENT':<20} {'STATE':<9} {'USED':>10} {'QUOTA':>10} {'BACKUPS':>7}  NEWEST")
    for c in found:
        age = f"{(now - c['newest_snapshot']) / 3600:.1f}h ago" if c["newest_snapshot"] \
            else "never"
        quota = human(c["quota_bytes"]) if c["quota_bytes"] else "none"
        state = "enabled" if c["enabled"] else "disabled"
        print(f"{c['client_id']:<20} {state:<9} {human(c['used_bytes']):>10} {quota:>10}"
              f" {c['backups']:>7}  {age}")
    for problem in problems:
        print(f"problem: {problem}")
    return 0
