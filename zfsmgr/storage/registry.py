"""The storage backends: one table, kind -> the Store class and the settings that configure it.

Everything that lists or picks a backend derives from BACKENDS: the storage type names
(`STORAGE_TYPE`, `storage_type` in clients.json, `add-client --storage`), which backends a
server has settings for, its default, and how a store is built. Adding a backend is one module
with a Store subclass (with `from_settings`) and one line here. Data only: the classes are
imported on first use, so a server without S3 never imports minio.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Tuple


@dataclass(frozen=True)
class Backend:
    """One storage backend."""

    kind: str  # the name in settings, clients.json and manifests
    store: str  # "module:Class" of its Store, built with Class.from_settings(settings)
    configured_by: Tuple[str, ...]  # any one of these set: "configured" (none: always)
    default_by: Tuple[str, ...]  # any one of these set: the server's default
    probe_default: bool = False  # as the default only when its check() passes, else the next one
    help: str = ""

    def configured(self, settings: Any) -> bool:
        """Whether the server has settings for this backend."""
        return not self.configured_by or any(settings.get(n) for n in self.configured_by)

    def preferred(self, settings: Any) -> bool:
        """Whether the settings make this the server's default (subject to probe_default);
        the last backend of the table is the default when no other is."""
        return any(settings.get(n) for n in self.default_by)

    def load(self) -> type:
        """The Store class (imported now)."""
        module, name = self.store.split(":")
        return getattr(importlib.import_module(module), name)


BACKENDS = (  # the order of preference for the server's default; the last one always works
    Backend("s3", "zfsmgr.storage.s3:S3Store", ("S3_ENABLED", "S3_ENDPOINT"), ("S3_ENABLED",),
            help="S3-compatible object storage"),
    Backend("local", "zfsmgr.storage.zfslocal:ZfsLocalStore", ("ZFS_BASE_DATASET",),
            ("ZFS_BASE_DATASET",), probe_default=True, help="received into a local ZFS pool"),
    Backend("dir", "zfsmgr.storage.directory:DirectoryStore", (), (),
            help="files in a directory"),
)

KINDS = tuple(b.kind for b in BACKENDS)
BY_KIND = {b.kind: b for b in BACKENDS}


def marked(manifest, default_kind: str = ""):
    """`manifest` with `self_contained` as its store describes its download (Store.marked);
    as it is when its kind (or `default_kind`, for manifests that name none) is unknown."""
    backend = BY_KIND.get(manifest.storage_type or default_kind)
    return backend.load().marked(manifest) if backend else manifest


def kinds_text(last: str = "or") -> str:
    """The kinds for messages: "s3, local or dir"."""
    return f"{', '.join(KINDS[:-1])} {last} {KINDS[-1]}"
