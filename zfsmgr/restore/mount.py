"""`restore mount`: show a restored dataset's files at a chosen directory."""

from __future__ import annotations

import os

from zfsmgr.errors import ZfsmgrError
from zfsmgr.protocol import validate_dataset
from zfsmgr.zfs import Zfs, ZfsError


def mount(zfs: Zfs, dataset: str, mountpoint: str) -> str:
    """Set `dataset`'s mountpoint to `mountpoint` and mount it there; return the path.

    Refuses, with one line, a dataset that does not exist or cannot mount, and a mountpoint
    that is busy: something already mounted there, or a directory that is not empty.
    """
    validate_dataset(dataset)
    path = os.path.abspath(mountpoint)
    what = f"cannot mount {dataset} on {path}"
    if not zfs.exists(dataset):
        raise ZfsmgrError(f"{what}: there is no dataset {dataset}")
    props = zfs.props([dataset], ["type", "canmount", "mountpoint", "mounted"])[dataset]
    if props.get("type") != "filesystem":
        raise ZfsmgrError(f"{what}: it is a {props.get('type')}, not a filesystem")
    if props.get("mounted") == "yes" and props.get("mountpoint") == path:
        return path
    if props.get("canmount") == "off":
        raise ZfsmgrError(f"{what}: its canmount property is off (zfs set canmount=on)")
    if os.path.ismount(path):
        raise ZfsmgrError(f"{what}: the mountpoint is busy (something is mounted there)")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ZfsmgrError(f"{what}: the mountpoint exists and is not a directory")
        if os.listdir(path):
            raise ZfsmgrError(f"{what}: the mountpoint is busy (the directory is not empty)")
    try:
        zfs.set(dataset, "mountpoint", path)  # remounts a mounted dataset at the new place
        if zfs.get(dataset, "mounted") != "yes":
            zfs.mount(dataset)
    except ZfsError as exc:  # with the command line and zfs's own message
        raise ZfsmgrError(f"{what}: {exc}") from exc
    return path
