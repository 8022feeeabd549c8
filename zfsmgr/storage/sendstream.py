"""The head of a `zfs send` stream (its DRR_BEGIN record), read before `zfs recv` sees a byte.

The `local` store receives only what a client's backup sends: one plain substream, full or
incremental. A compound stream — what `zfs send -R`, `-p`, `-I`, `-b` and `-h` write — carries
an nvlist of properties (mountpoints, shares, `canmount`) and of other datasets, which `zfs recv`
would apply on the server; it is refused, as is anything that is not a zfs stream at all. This
holds on every zfs, including zfs-fuse, whose `recv` has no `-o`/`-x` to override properties.

The record (little-endian on the wire from x86; zfs recv also takes byte-swapped streams):
drr_type u32 (0: BEGIN), drr_payloadlen u32, then drr_begin: magic u64, versioninfo u64 (low
two bits: 1 substream, 2 compound; the rest: feature flags), creation_time u64, type u32
(the object set's: 2 a file system, 3 a volume, which the store refuses: received, it would
be a block device on the server that udev, LVM or md may probe), flags u32, toguid u64,
fromguid u64, toname char[256].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from zfsmgr.errors import ValidationError

BEGIN_SIZE = 312  # sizeof(dmu_replay_record_t)
MAGIC = 0x2F5BACBAC
SUBSTREAM, COMPOUNDSTREAM = 1, 2
OST_ZFS, OST_ZVOL = 2, 3  # dmu_objset_type_t: a file system, a volume


@dataclass(frozen=True)
class StreamHead:
    """What the DRR_BEGIN record says."""

    toguid: int
    fromguid: int
    features: int
    toname: str


def parse_head(head: bytes) -> StreamHead:
    """The DRR_BEGIN record of a stream's first BEGIN_SIZE bytes; ValidationError when the
    bytes are not the head of a plain zfs substream."""
    if len(head) < BEGIN_SIZE:
        raise ValidationError(f"not a zfs send stream: it ends after {len(head)} bytes")
    for order in "<>":
        kind, magic, info = struct.unpack_from(order + "I4xQQ", head, 0)
        if magic == MAGIC:
            break
    else:
        raise ValidationError("not a zfs send stream (no DRR_BEGIN magic at its start)")
    if kind != 0:
        raise ValidationError("not a zfs send stream (its first record is not DRR_BEGIN)")
    if info & 3 == COMPOUNDSTREAM:
        raise ValidationError("a replication or property stream (zfs send -R, -p, -I, -b or"
                              " -h) carries properties and other datasets the server would"
                              " apply: send a plain full or -i incremental stream")
    if info & 3 != SUBSTREAM:
        raise ValidationError(f"not a zfs send stream (header type {info & 3})")
    objset, = struct.unpack_from(order + "I", head, 32)
    if objset == OST_ZVOL:
        raise ValidationError("the stream is of a volume: the local store keeps file systems"
                              " only (a volume received here would be a block device on the"
                              " backup server); back volumes up to a dir or s3 store")
    if objset != OST_ZFS:
        raise ValidationError(f"not the stream of a file system (object set type {objset})")
    toguid, fromguid = struct.unpack_from(order + "QQ", head, 40)
    name = head[56:BEGIN_SIZE].split(b"\0", 1)[0].decode("utf-8", "replace")
    return StreamHead(toguid, fromguid, info >> 2, name)


def check_head(head: bytes, incremental: bool, guid: str = "", parent_guid: str = "",
               resumed: bool = False) -> StreamHead:
    """parse_head, and the stream is what the upload declared: full or incremental, of the
    declared snapshot (and base) where the client sent their guids."""
    parsed = parse_head(head)
    if not resumed and bool(parsed.fromguid) != incremental:
        raise ValidationError("the stream is an incremental, the upload a full backup"
                              if parsed.fromguid else
                              "the stream is a full stream, the upload an incremental")
    if guid and parsed.toguid != int(guid):
        raise ValidationError(f"the stream is of snapshot guid {parsed.toguid}, the upload"
                              f" declared {guid}")
    if parent_guid and incremental and not resumed and parsed.fromguid != int(parent_guid):
        raise ValidationError(f"the stream's base is guid {parsed.fromguid}, the upload"
                              f" declared {parent_guid}")
    return parsed
