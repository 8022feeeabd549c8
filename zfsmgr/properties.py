"""The property record: a dataset's own properties, kept with a backup whose stream lacks them.

A stream sent without `-p` (from zfs-fuse, whose `send -p` leaves a hold behind when killed, and
to the `local` store, which refuses property streams) carries no properties. The client then
records the dataset's own ones — those `zfs get` shows with source `local` or `received`, as
`send -p` would send — in the manifest's `properties` ({name: value}); the server checks the
record and keeps it, never applying it; restore applies it to the restored dataset.

This module is data and pure checks, shared by client, server and restore. The same rules run
on both ends: the client leaves out (and says so) what the server would refuse, so a refusal
(400) means a client that is not zfsmgr's.

What is never recorded, and so never applied by a restore (`NOT_RECORDED`): where a dataset
mounts and what it shares (`mountpoint`, `sharenfs`, `sharesmb`, `zoned`): a restored dataset
mounts below its target, never over a path of the restoring host; what only the stream or
`zfs create` decide (`volsize`, the encryption properties); zfs's read-only statistics; and
zfsmgr's marks on its own snapshots (`MARKS`), which a dataset's snapshots would inherit.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Mapping, Optional

from zfsmgr.errors import ValidationError

MAX_PROPERTIES = 64  # a dataset's own properties: a few native ones and user properties
MAX_VALUE = 1024  # characters of one value (user properties may be longer: those are left out)
MAX_RECORD_BYTES = 4096  # the record as JSON: the `local` store keeps the whole manifest in
# one user property of the received snapshot, which zfs limits to 8 KiB

NOT_RECORDED = frozenset({
    "mountpoint", "sharenfs", "sharesmb", "zoned",  # where it mounts, what it exports
    "volsize", "encryption", "keyformat", "keylocation", "pbkdf2iters",  # the stream's or
    # `zfs create`'s
})
READ_ONLY = frozenset({  # statistics and identity: never a dataset's own setting
    "type", "creation", "used", "available", "referenced", "compressratio", "mounted",
    "origin", "guid", "createtxg", "written", "logicalused", "logicalreferenced",
    "refcompressratio", "usedbysnapshots", "usedbydataset", "usedbychildren",
    "usedbyrefreservation", "userrefs", "defer_destroy", "clones", "objsetid",
    "encryptionroot", "keystatus", "receive_resume_token", "snapshot_count",
    "filesystem_count", "snapshots_changed", "redact_snaps", "inconsistent", "version",
})
MARKS = frozenset({"org.zfsmgr:kind", "org.zfsmgr:base", "org.zfsmgr:bases"})  # zfsmgr's own
# marks on its snapshots: set on a restored dataset, every snapshot of it would inherit them
_NATIVE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_USER = re.compile(r"[a-z0-9_.:-]{1,256}")


def refusal(name: Any, value: Any) -> Optional[str]:
    """Why `name=value` is not part of a record (None: it is)."""
    if not isinstance(name, str) or not isinstance(value, str):
        return "names and values are strings"
    shown = name if len(name) <= 64 else name[:61] + "..."
    if ":" in name:
        if not _USER.fullmatch(name) or name.startswith(":"):
            return (f"{shown!r} is not a user property name (lower-case letters, digits, and"
                    " '_.:-', at most 256)")
        if name in MARKS:
            return f"{name} is zfsmgr's mark on its own snapshots, never recorded"
    elif not _NATIVE.fullmatch(name):
        return f"{shown!r} is not a property name"
    elif name in NOT_RECORDED:
        return f"{name} is never recorded (a restore never applies it)"
    elif name in READ_ONLY:
        return f"{name} is read-only"
    if not value or len(value) > MAX_VALUE:
        return f"the value of {shown} must be 1 to {MAX_VALUE} characters"
    if not value.isprintable():
        return f"the value of {shown} holds control characters (a newline, a tab, a NUL...)"
    return None


def size(record: Mapping[str, str]) -> int:
    """The record's size as compact JSON with non-ASCII escaped: the most any store writes
    (the `local` store's user property holds it that way)."""
    return len(json.dumps(dict(record), separators=(",", ":")))


def validate(value: Any) -> Optional[Dict[str, str]]:
    """A record from a client: None (no record), or a mapping of at most MAX_PROPERTIES
    recordable properties in at most MAX_RECORD_BYTES; anything else is a ValidationError
    (400) naming the first problem."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError("properties must be an object of property names and values")
    if len(value) > MAX_PROPERTIES:
        raise ValidationError(f"properties: {len(value)} entries; at most {MAX_PROPERTIES}")
    for name, text in value.items():
        why = refusal(name, text)
        if why:
            raise ValidationError(f"properties: {why}")
    if size(value) > MAX_RECORD_BYTES:
        raise ValidationError(f"properties: {size(value)} bytes of JSON; at most"
                              f" {MAX_RECORD_BYTES}")
    return dict(value)


def record(listing: Mapping[str, tuple], warn=lambda text: None) -> Dict[str, str]:
    """The record of one dataset from its `zfs get` listing ({name: (value, source)}): its
    `local` and `received` properties that may be recorded, within the limits; what is left
    out is passed to `warn` (except what is never recorded, which is not news)."""
    chosen: Dict[str, str] = {}
    for name, (value, source) in sorted(listing.items()):
        if source not in ("local", "received") or name in NOT_RECORDED:
            continue
        why = refusal(name, value)
        if why:
            warn(f"property {name} is not recorded: {why}")
            continue
        if len(chosen) == MAX_PROPERTIES or size({**chosen, name: value}) > MAX_RECORD_BYTES:
            warn(f"property {name} is not recorded: the record is full (at most"
                 f" {MAX_PROPERTIES} properties, {MAX_RECORD_BYTES} bytes)")
            continue
        chosen[name] = value
    return chosen
