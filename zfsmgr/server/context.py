"""Everything a running server holds: settings, clients, catalog, stores, uploads."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Set

from zfsmgr import __version__
from zfsmgr.errors import ZfsmgrError
from zfsmgr.server import deletion
from zfsmgr.server.catalog import Catalog, catalog_path
from zfsmgr.progress import human
from zfsmgr.protocol import Manifest
from zfsmgr.server.clients import ClientConfig, ClientRegistry, Forbidden
from zfsmgr.server.database import Database
from zfsmgr.server.gate import Shares
from zfsmgr.server.ledger import Ledger
from zfsmgr.server.notify import Notifier, Outcomes
from zfsmgr.server.rotation import FREES_SPACE, RotationPlan, plan_rotation
from zfsmgr.server.sessions import Session, SessionTable
from zfsmgr.server.uploads import Uploads
from zfsmgr.settings import Settings
from zfsmgr.storage.base import QuotaExceeded, StorageError, Store
from zfsmgr.storage import registry

log = logging.getLogger("zfsmgr.server")
FULL_BELOW = 1 << 20  # a store with less room than this reports itself full


class ServerContext:
    """The state shared by all requests of one server process."""

    def __init__(self, settings: Settings, open_catalog: bool = True):
        self.settings = settings
        self.version = __version__
        self.clients = ClientRegistry(settings.config_file)
        self.catalog_path = catalog_path(settings.metadata_file, settings.catalog_db)
        self.notifier = Notifier(settings.notify_url)
        self._stores: Dict[str, Store] = {}
        self._default = ""  # the server's default store kind, once probed (default_kind)
        self._lock = threading.Lock()  # _stores, held for moments only
        self._making: Dict[str, threading.Lock] = {}  # per kind: one creation at a time
        self.working = Shares(self.client_max_requests, "requests")  # worker threads in use
        if open_catalog:  # `reindex` builds a new one instead
            self.open_catalog()

    def open_catalog(self) -> None:
        """Open (or create, importing a JSON catalog once) and check the database."""
        settings = self.settings
        self.db = Database(str(self.catalog_path))
        self.catalog = Catalog(self.db)
        self.sessions = SessionTable(self.db)
        self.ledger = Ledger(self.db)
        self.outcomes = Outcomes(self.ledger, self.notifier, known=lambda client_id, dataset: (
            self.catalog.newest(client_id, dataset) is not None))
        if self.db.created:
            self._import_json(Path(settings.metadata_file).absolute())
        self.uploads = Uploads(self.sessions, self.catalog, settings.part_size,
                               settings.s3_max_parts, settings.upload_expiry_hours * 3600.0,
                               settings.client_max_uploads, adopt=self._adopt)
        self.uploads.quota.usage = self.used_bytes
        self.uploads.quota.version = self.catalog.version
        self.uploads.quota.make_room = self.make_room

    def _import_json(self, metadata_file: Path) -> None:
        """A new database takes over the JSON catalog and session files of an older server."""
        if metadata_file == self.db.path or metadata_file.suffix != ".json":
            return
        self.catalog.import_json(metadata_file, mark=registry.marked)
        self.sessions.import_folder(Path(str(metadata_file) + ".uploads"), time.time())

    @property
    def client_max_requests(self) -> int:
        """Requests one client may have in the server at once: its share of the threads."""
        return self.settings.client_max_requests or max(2, self.settings.threads // 3)

    def client_store(self, client: ClientConfig) -> Store:
        """The store a client's backups go to."""
        return self.store_named(self.default_kind(client))

    def refresh(self, client: ClientConfig, strict: bool = True) -> None:
        """Before a decision on a client's backups: where other servers share its store, take
        what they changed (one HEAD of its change marker, a listing only when it moved).

        Not `strict` (a listing, not a decision): with the store unreachable, say so and
        answer from the cache."""
        try:
            self.catalog.refresh(self.client_store(client), client.client_id)
        except StorageError as exc:
            if strict:
                raise
            log.warning("catalog of %s not refreshed from storage: %s", client.client_id, exc)

    def _adopt(self, client_id: str, upload_id: str) -> Optional[Session]:
        """An upload another server opened in a store both share: continue it here."""
        client = self.clients.get(client_id)
        if client is None:
            return None
        store = self.client_store(client)
        text = store.load_session(upload_id) if store.shared else None
        if text is None:
            return None
        try:
            session = Session.from_json(text)
        except (ValueError, TypeError):
            log.warning("upload %s: the session in %s storage is unreadable", upload_id,
                        store.kind)
            return None
        if session.client_id != client_id or session.storage_type != store.kind:
            return None
        log.info("upload %s of client %s was opened by another server: continuing it here",
                 upload_id, client_id)
        return session

    def may_adopt(self, client_id: str) -> bool:
        """Whether an upload of the client that this server does not hold may be in its store
        (shared by several servers), answered without a store check or any I/O: True unless
        the client's store is known (made already) and not shared."""
        client = self.clients.get(client_id)
        if client is None:
            return False
        kind = client.storage_type or self._default
        store = self._stores.get(kind) if kind else None  # not under _lock: _make checks
        return store is None or store.shared

    def configured_kinds(self) -> List[str]:
        """Backends this server has settings for."""
        return [b.kind for b in registry.BACKENDS if b.configured(self.settings)]

    def default_kind(self, client: Optional[ClientConfig] = None) -> str:
        """The client's storage_type, else the first backend of the registry that the settings
        prefer (one that must probe only if its check passes: local ZFS when usable)."""
        if client and client.storage_type:
            return client.storage_type
        if not self._default:  # probed once; health() probes again when a store fails
            self._default = self._probe_default()
        return self._default

    def _probe_default(self) -> str:
        for backend in registry.BACKENDS:
            if not backend.preferred(self.settings):
                continue
            if not backend.probe_default:
                return backend.kind
            try:
                self.store_named(backend.kind).check()
                return backend.kind
            except ZfsmgrError:
                pass
        return registry.BACKENDS[-1].kind

    def store_named(self, kind: str) -> Store:
        """The store of one kind, created and checked on first use. Those asking for the same
        kind meanwhile wait for that check; those asking for another do not (a check of an
        unreachable S3 endpoint or a hung pool may take minutes: a /health that checked one
        under the lock every request takes held every client of every store as long)."""
        with self._lock:
            store = self._stores.get(kind)
            if store is not None:
                return store
            making = self._making.setdefault(kind, threading.Lock())
        with making:
            with self._lock:
                store = self._stores.get(kind)
            if store is None:
                store = self._make(kind)
                with self._lock:
                    self._stores[kind] = store
            return store

    def _make(self, kind: str) -> Store:
        if kind not in registry.BY_KIND:
            raise StorageError(f"unknown storage type {kind!r}")
        store: Store = registry.BY_KIND[kind].load().from_settings(self.settings, self._homes)
        store.check()
        return store

    def _homes(self) -> Dict[str, str]:
        """The clients whose `dataset` names the server-side home of their backups."""
        return {c.client_id: c.dataset for c in self.clients.all() if c.dataset}

    def needed_kinds(self) -> Set[str]:
        """The stores some enabled client uses now (its storage_type, or the default)."""
        enabled = [c for c in self.clients.all() if c.enabled]
        kinds = {c.storage_type for c in enabled if c.storage_type}
        if any(not c.storage_type for c in enabled):
            kinds.add(self.default_kind())
        return kinds

    def described(self, client: ClientConfig, manifests: List[Manifest]) -> List[Manifest]:
        """The manifests with `self_contained` set as their stores describe their downloads."""
        found, default = [], ""
        for m in manifests:
            if not m.storage_type and not default:  # old manifests: asked once, not per entry
                default = self.default_kind(client)
            found.append(registry.marked(m, default))
        return found

    def backups(self, client: ClientConfig) -> List[Manifest]:
        """A client's backups from the catalog, oldest first, described by their stores."""
        return self.described(client, self.catalog.list(client.client_id))

    def store_for(self, client: ClientConfig, requested: str) -> Store:
        """The store a client's upload goes to; a client may not pick another one."""
        kind = self.default_kind(client)
        if requested and requested != kind:
            raise Forbidden(f"the server stores {client.client_id}'s backups in {kind};"
                            f" STORAGE_TYPE={requested} does not match")
        return self.store_named(kind)

    def stores(self) -> Dict[str, Store]:
        """Every store created so far."""
        with self._lock:
            return dict(self._stores)

    def health(self) -> Dict[str, dict]:
        """Reachability of every configured backend (`needed`: some client uses it), and whether
        it is full (a full store stays in service: it serves, aborts and deletes, and takes
        data once there is room)."""
        checks: Dict[str, dict] = {}
        needed = self.needed_kinds()
        for kind in self.configured_kinds():
            try:
                store = self.store_named(kind)
                store.check()
                checks[kind] = {"ok": True, "needed": kind in needed}
                free = store.free_bytes()
                if free is not None:
                    checks[kind].update(free_bytes=free, full=free < FULL_BELOW)
            except (StorageError, ZfsmgrError) as exc:
                with self._lock:
                    self._stores.pop(kind, None)
                self._default = ""
                checks[kind] = {"ok": False, "needed": kind in needed, "error": str(exc)}
        return checks

    def health_report(self) -> dict:
        """The /health body: healthy unless a store some client needs is unreachable; a store
        no client uses and a bad clients.json entry are warnings."""
        checks = self.health()
        healthy = all(c["ok"] for c in checks.values() if c["needed"])
        warnings = [f"{kind} storage is unusable ({c['error']}); no client uses it now"
                    for kind, c in checks.items() if not c["ok"] and not c["needed"]]
        problems = self.clients.warnings()  # /health is open: which entries, only in the log
        if problems:  # and to `zfsmgr server clients` and the status page
            warnings.append(f"clients.json: {len(problems)} problem{'s' * (len(problems) > 1)};"
                            " `zfsmgr server clients` and the server log say which")
        full = sorted(kind for kind, c in checks.items() if c.get("full"))
        warnings += [f"{kind} storage is full: uploads get 507 until there is room"
                     for kind in full]
        return {"success": healthy, "message": "ok" if healthy else "storage unreachable",
                "status": ("full" if full else "healthy" if not warnings else "warning")
                if healthy else "degraded", "version": self.version, "storage": checks,
                "warnings": warnings}

    def sizes(self, client_id: str, backups: Optional[List[Manifest]] = None
              ) -> Dict[str, int]:
        """What each of a client's backups takes in its store, by key (the `local` store
        counts the space on the pool, the others the stored stream)."""
        backups = self.catalog.list(client_id) if backups is None else backups
        by_kind: Dict[str, List[Manifest]] = {}
        for m in backups:
            by_kind.setdefault(m.storage_type or "dir", []).append(m)
        sizes = {m.key: m.stored_size for m in backups}
        for kind, manifests in by_kind.items():
            try:
                sizes.update(self.store_named(kind).footprint(manifests))
            except (StorageError, ZfsmgrError) as exc:
                log.warning("sizes of %s's %s backups: %s", client_id, kind, exc)
        return sizes

    def _stored_sizes_count(self, client_id: str) -> bool:
        """Whether every store holding the client's backups counts them at their stored size
        (then the catalog's sums answer, without reading a manifest)."""
        for kind in self.catalog.kinds(client_id):
            try:
                if type(self.store_named(kind)).footprint is not Store.footprint:
                    return False
            except ZfsmgrError:
                return False
        return True

    def used_bytes(self, client_id: str) -> int:
        """What a client's backups take, as its quota counts it."""
        if self._stored_sizes_count(client_id):
            return self.catalog.used_bytes(client_id)
        return sum(self.sizes(client_id).values())

    def status(self, client: ClientConfig) -> dict:
        """Usage and backups of one client, per dataset."""
        self.refresh(client, strict=False)
        datasets = self.catalog.summary(client.client_id)
        if not self._stored_sizes_count(client.client_id):
            backups = self.catalog.list(client.client_id)
            sizes = self.sizes(client.client_id, backups)
            for entry in datasets.values():
                entry["used_bytes"] = 0
            for m in backups:
                datasets[m.dataset]["used_bytes"] += sizes[m.key]
        events = self.ledger.of_client(client.client_id)
        for dataset, entry in datasets.items():  # what a restore of a tree asks: was it there
            seen = events.get(dataset, {})  # at a run that sent it nothing?
            entry["last_checked"] = seen.get("last_checked")
            entry["last_failure"] = seen.get("last_failure")
        used = sum(d["used_bytes"] for d in datasets.values())
        quota = client.max_size_bytes
        return {"client_id": client.client_id, "storage_type": self.default_kind(client),
                "used_bytes": used, "quota_bytes": quota,
                "free_bytes": max(0, quota - used) if quota else None,
                "snapshot_count": sum(d["snapshot_count"] for d in datasets.values()),
                "last_backup": max((d["last_backup"] for d in datasets.values()), default=None),
                "datasets": datasets,
                "rotation_policy": client.rotation_policy.to_mapping()
                if client.rotation_policy else None,
                "max_incrementals": client.max_incrementals,
                "max_chain_age_days": client.max_chain_age_days,
                "client_max_requests": self.client_max_requests,
                "client_max_uploads": self.settings.client_max_uploads}

    def append_only(self, client: ClientConfig) -> bool:
        """Whether the client may not delete backups (clients.json, else APPEND_ONLY)."""
        if client.append_only is not None:
            return client.append_only
        return bool(self.settings.append_only)

    def plan(self, client: ClientConfig, needed: int = 0,
             keep: Optional[str] = None) -> RotationPlan:
        """What rotation would delete: retention, then old chains while over the quota."""
        backups = self.backups(client)
        by_snapshot = {(m.dataset, m.snapshot): m.key for m in backups}
        bases = {by_snapshot[(s.dataset, s.parent)]: f"the base of the open upload"
                 f" {s.upload_id}" for s in self.sessions.of_client(client.client_id)
                 if s.parent and (s.dataset, s.parent) in by_snapshot}
        return plan_rotation(backups, client.rotation_policy, time.time(),
                             quota=client.max_size_bytes, needed=needed, keep=keep,
                             min_retain_days=self.settings.min_retain_days,
                             sizes=self.sizes(client.client_id, backups), bases=bases)

    def retain_chain(self, client: ClientConfig, store: Store, dataset: str,
                     parent: Optional[str]) -> Optional[datetime]:
        """Where the store locks backups: the retain-until of a backup committed now, after
        extending the retention of each base it needs (its parent, the parent's parent, ...)
        to at least that, so a chain's base always outlives its increments. None elsewhere."""
        if not store.retains:
            return None
        from zfsmgr.storage.s3lock import horizon

        until = datetime.now(timezone.utc) + horizon(client.rotation_policy,
                                                     self.settings.min_retain_days)
        by_snapshot = {m.snapshot: m for m in self.catalog.list(client.client_id, dataset)}
        while parent and parent in by_snapshot:
            base = by_snapshot.pop(parent)
            store.retain(base, until)
            parent = base.parent
        return until

    def rotate(self, client: ClientConfig, dry_run: bool = False,
               needed: int = 0, keep: Optional[str] = None, by_server: bool = False,
               plan: Optional[RotationPlan] = None) -> dict:
        """Apply the client's retention to its stored backups (and free `needed` bytes).

        An append-only client's own request may only plan (dry run): deleting is then left to
        the server's `zfsmgr server rotate` (`by_server`)."""
        if not dry_run and not by_server and self.append_only(client):
            raise Forbidden(f"client {client.client_id} is append-only: it may not delete"
                            " backups (the server rotates them: zfsmgr server rotate)")
        home = self.client_store(client)
        with home.client_lease(client.client_id):  # servers sharing the store: one at once
            self.refresh(client)
            if plan is None or home.shared:  # planned before the lease: plan again under it
                plan = self.plan(client, needed, keep)
            if not dry_run:
                plan = deletion.apply(self, client, plan)
        if not dry_run:
            self.ledger.record_rotation(client.client_id, len(plan.delete))
        result = {"dry_run": dry_run, "deleted": [m.key for m in plan.delete],
                  "kept": [m.key for m in plan.keep], "reasons": plan.reasons,
                  "freed_bytes": plan.freed_bytes,
                  "enough": plan.enough, "used_bytes": plan.used_after,
                  "quota_bytes": client.max_size_bytes, "over_bytes": plan.over_bytes}
        if plan.over_bytes and not needed:
            log.warning("client %s stays %d bytes over its quota after rotation (the newest"
                        " chain of each dataset is kept)", client.client_id, plan.over_bytes)
        return result

    def delete(self, manifest: Manifest, store: Store) -> str:
        """Delete one backup, the one way every deletion goes (zfsmgr.server.deletion.delete):
        '' when deleted, else why it stays. The caller holds the client's lease."""
        return deletion.delete(self, manifest, store)

    def make_room(self, client: ClientConfig, needed: int, parent_key: Optional[str]) -> None:
        """Make `needed` more bytes fit the quota: with AUTO_ROTATE, plan a rotation and apply
        it only when the plan makes room; otherwise (or when it would not) refuse, deleting
        nothing."""
        if not client.max_size_bytes:
            return
        self.refresh(client)
        used = self.used_bytes(client.client_id)
        if used + needed <= client.max_size_bytes:
            return
        quota = client.max_size_bytes
        if not self.settings.auto_rotate or self.append_only(client):
            # an append-only client's uploads never rotate its history away
            raise QuotaExceeded(f"quota exceeded for {client.client_id}: used {human(used)} +"
                                f" needed {human(needed)} > quota {human(quota)}; "
                                + FREES_SPACE)
        plan = self.plan(client, needed=needed, keep=parent_key)
        if not plan.enough:
            raise QuotaExceeded(
                f"quota exceeded for {client.client_id}: used {human(used)} + needed"
                f" {human(needed)} > quota {human(quota)}, and AUTO_ROTATE can free only"
                f" {human(used - plan.used_after)} (the newest chain of each dataset and the"
                f" new backup's base stay); nothing was deleted; raise max_size_bytes or"
                f" delete backups of other datasets")
        done = self.rotate(client, needed=needed, keep=parent_key, by_server=True, plan=plan)
        if not done["enough"]:  # something planned stayed (a base that became needed)
            raise QuotaExceeded(
                f"quota exceeded for {client.client_id}: used {human(done['used_bytes'])} +"
                f" needed {human(needed)} > quota {human(quota)} after AUTO_ROTATE deleted"
                f" {len(done['deleted'])} backups: what else it planned to delete stays (the"
                f" base of a backup or an open upload)")
