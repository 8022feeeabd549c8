"""clients.json: who may back up, with which key (SHA-256 hex), quota, storage and policy.

The file is re-read when it changes, so edits take effect without a restart. One bad entry
never takes the fleet down: an invalid entry (the seed's literal `"hashed_key"` placeholder, a
non-boolean `enabled`, an unknown storage type, ...) refuses that client alone, and a file that
is not valid JSON keeps the last good configuration in force; both are logged once and listed
by `warnings()` (which /health shows).

`dataset` is what the seed means by it: the server-side dataset that holds the client's
backups (the `local` store receives under it). Which source datasets a client may send is the
optional `allowed_datasets` list (each entry also covers its children).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from zfsmgr.errors import Forbidden, Unauthorized, ZfsmgrError
from zfsmgr.protocol import validate_client_id, validate_dataset
from zfsmgr.retention import RetentionPolicy
from zfsmgr.server.filelock import FileLock
from zfsmgr.settings import as_duration
from zfsmgr.storage import registry
from zfsmgr.files import write_atomic

log = logging.getLogger("zfsmgr.server")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class ClientConfig:
    """One entry of clients.json."""

    client_id: str
    api_key: str  # sha256 hex of the raw key
    max_size_bytes: int = 0  # 0: no quota
    dataset: str = ""  # server-side home of the backups (the `local` store receives there)
    enabled: bool = True
    storage_type: str = ""
    rotation_policy: Optional[RetentionPolicy] = None
    max_incrementals: int = 0  # 0: chains are never cut by count
    max_chain_age_days: int = 0  # 0: chains are never cut by age
    append_only: Optional[bool] = None  # None: the server's APPEND_ONLY
    check_warn: float = 0.0  # seconds; 0: the server's CHECK_WARN
    check_crit: float = 0.0  # seconds; 0: the server's CHECK_CRIT
    previous_api_key: str = ""  # sha256 hex of the key before `rotate-key`, valid until:
    previous_key_expires: float = 0.0  # epoch seconds
    allowed_datasets: Tuple[str, ...] = ()  # empty: any source dataset
    extra: Dict[str, Any] = field(default_factory=dict)

    def may_back_up(self, dataset: str) -> bool:
        """Whether `allowed_datasets` lets this client send `dataset` (a child counts)."""
        return not self.allowed_datasets or any(
            dataset == allowed or dataset.startswith(allowed + "/")
            for allowed in self.allowed_datasets)


def hash_key(raw: str) -> str:
    """The SHA-256 hex that clients.json stores for a raw key."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def _duration(value: Any, what: str) -> float:
    """A threshold from clients.json: seconds as a number, or text such as "26h"."""
    if value in (None, "", 0):
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be a duration such as 26h")
    return as_duration(str(value))


def _count(entry: dict, name: str) -> int:
    value = entry.get(name, 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number (0 or more)")
    return value


def _parse(entry: Any) -> ClientConfig:
    """One entry of clients.json; ValueError naming the client and the key when invalid."""
    if not isinstance(entry, dict):
        raise ValueError("each client must be a JSON object")
    client_id = validate_client_id(entry.get("client_id"))
    try:
        key = entry.get("api_key")
        if not isinstance(key, str) or not _SHA256_HEX.fullmatch(key):
            raise ValueError("api_key must be the 64-hex SHA-256 of the raw key"
                             " (`zfsmgr server add-client` writes one)")
        enabled = entry.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be true or false, not {json.dumps(enabled)}")
        storage = entry.get("storage_type") or ""
        if storage not in ("",) + registry.KINDS:
            raise ValueError(f"storage_type {storage!r} is not {registry.kinds_text()}")
        allowed = entry.get("allowed_datasets") or []
        if not isinstance(allowed, list):
            raise ValueError("allowed_datasets must be a list of datasets")
        policy = entry.get("rotation_policy")
        append_only = entry.get("append_only")
        if append_only is not None and not isinstance(append_only, bool):
            raise ValueError("append_only must be true or false")
        previous = entry.get("previous_api_key") or ""
        if not isinstance(previous, str) or previous and len(previous) != 64:
            raise ValueError("previous_api_key must be a 64-hex SHA-256")
        return ClientConfig(
            client_id=client_id, api_key=key.lower(),
            max_size_bytes=_count(entry, "max_size_bytes"),
            dataset=validate_dataset(entry["dataset"]) if entry.get("dataset") else "",
            enabled=enabled, storage_type=storage,
            rotation_policy=RetentionPolicy.from_mapping(policy) if policy else None,
            max_incrementals=_count(entry, "max_incrementals"),
            max_chain_age_days=_count(entry, "max_chain_age_days"),
            append_only=append_only,
            check_warn=_duration(entry.get("check_warn"), "check_warn"),
            check_crit=_duration(entry.get("check_crit"), "check_crit"),
            previous_api_key=previous.lower(),
            previous_key_expires=float(entry.get("previous_key_expires", 0) or 0),
            allowed_datasets=tuple(validate_dataset(d) for d in allowed))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"client {client_id}: {exc}") from None


class ClientRegistry:
    """The clients of clients.json, reloaded whenever the file changes."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: Any = None
        self._clients: Dict[str, ClientConfig] = {}
        self._invalid: Dict[str, Tuple[str, str]] = {}  # client id -> (why refused, key hash)
        self._problems: List[str] = []

    def _load(self) -> Dict[str, ClientConfig]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            stat = None
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._reload(stat is not None)
            return self._clients

    def _reload(self, exists: bool) -> None:
        """Read the file again; keep the last good configuration if it is not a JSON list."""
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8") or "[]") \
                if exists else []
            if not isinstance(entries, list):
                raise ValueError("it must hold a JSON list of clients")
        except (OSError, ValueError) as exc:
            problem = (f"{self.path} is not usable ({exc}): the last good configuration"
                       f" ({len(self._clients)} clients) stays in force")
            log.error("%s", problem)
            self._problems = [problem]
            return
        clients: Dict[str, ClientConfig] = {}
        invalid: Dict[str, Tuple[str, str]] = {}
        problems: List[str] = []
        for number, entry in enumerate(entries, start=1):
            try:
                client = _parse(entry)
            except ValueError as exc:
                client_id = entry.get("client_id") if isinstance(entry, dict) else None
                if isinstance(client_id, str):
                    key = entry.get("api_key")
                    invalid[client_id] = (str(exc), key.lower() if isinstance(key, str)
                                          and _SHA256_HEX.fullmatch(key) else "")
                problems.append(f"{self.path} entry {number} is refused: {exc}")
                continue
            if client.client_id in clients:
                problems.append(f"{self.path} entry {number}: client {client.client_id}"
                                " is listed twice; the first entry counts")
                continue
            clients[client.client_id] = client
        for problem in problems:
            log.warning("%s", problem)
        self._clients, self._invalid, self._problems = clients, invalid, problems

    def warnings(self) -> List[str]:
        """What is wrong with clients.json now (entries refused, a file kept at its last good
        state); empty when all is well."""
        self._load()
        with self._lock:
            return list(self._problems)

    def stamp(self) -> Any:
        """What identifies the configuration in force (changes when clients.json does)."""
        self._load()
        with self._lock:
            return self._stamp, len(self._problems)

    def all(self) -> List[ClientConfig]:
        """Every configured (valid) client."""
        return list(self._load().values())

    def get(self, client_id: str) -> Optional[ClientConfig]:
        """A client by id, None if unknown."""
        return self._load().get(client_id)

    def authenticate(self, client_id: Optional[str], raw_key: Optional[str],
                     write: bool = True) -> ClientConfig:
        """The client if the key matches (in constant time); Unauthorized, or Forbidden for a
        disabled client unless the request only reads (`write=False`: list, restore, verify).

        After `rotate-key` the previous key is accepted too until its grace period ends."""
        client = self.get(client_id) if isinstance(client_id, str) else None
        expected = client.api_key if client else "0" * 64
        given = hash_key(raw_key) if isinstance(raw_key, str) else "1" * 64
        matches = hmac.compare_digest(expected, given)
        previous = client.previous_api_key if client else ""
        if previous and hmac.compare_digest(previous, given) \
                and time.time() < client.previous_key_expires:
            matches = True
        if not matches or client is None:
            if client is None and client_id in self._invalid:
                why, known = self._invalid[client_id]
                if known and not hmac.compare_digest(known, given):  # a wrong key learns
                    raise Unauthorized("unknown client or wrong API key")  # nothing more
                if not known:  # no key hash to check (the seed's placeholder): only that
                    why = "the server log says why"
                raise Forbidden(f"the server's clients.json entry for {client_id} is invalid:"
                                f" {why}")
            raise Unauthorized("unknown client or wrong API key")
        if write and not client.enabled:
            raise Forbidden(f"client {client.client_id} is disabled (it may list and restore its"
                            " backups, not upload)")
        return client


def add_client(path: str, client_id: str, quota: int = 0, storage: str = "",
               dataset: str = "", allowed: Sequence[str] = ()) -> str:
    """Add a client with a new random key to clients.json (atomically); return the raw key.

    `dataset` is the seed's: the server-side dataset that holds the client's backups."""
    validate_client_id(client_id)
    for name in ([dataset] if dataset else []) + list(allowed):
        validate_dataset(name)
    raw = secrets.token_urlsafe(32)
    target = Path(path)
    with FileLock(str(target) + ".lock"):
        entries = read_entries(target)
        if any(isinstance(e, dict) and e.get("client_id") == client_id for e in entries):
            raise ZfsmgrError(f"client {client_id} already exists in {path}")
        entry: Dict[str, Any] = {"client_id": client_id, "api_key": hash_key(raw),
                                 "max_size_bytes": quota, "dataset": dataset, "enabled": True}
        if storage:
            entry["storage_type"] = storage
        if allowed:
            entry["allowed_datasets"] = list(allowed)
        entries.append(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_entries(target, entries)
    return raw


def read_entries(path: Path) -> List[Any]:
    """clients.json's entries as they are on disk (none when there is no file); a file that
    is no JSON list of objects is a one-line error (an admin command must not rewrite it)."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8") or "[]")
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise ZfsmgrError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise ZfsmgrError(f"{path} must hold a JSON list of clients")
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ZfsmgrError(f"{path}: entry {number} is not a JSON object; mend the file")
    return entries


def write_entries(path: Path, entries: List[Any]) -> None:
    """Replace clients.json: readable by its owner only from its first byte, and still the
    owner's when root rewrites it (a server running as its own user must go on reading it)."""
    write_atomic(path, (json.dumps(entries, indent=2) + "\n").encode(), mode=0o600,
                 keep_owner=True)
