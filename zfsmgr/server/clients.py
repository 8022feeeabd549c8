"""clients.json: who may back up, with which key (SHA-256 hex), quota, storage and policy.

The file is re-read when it changes, so edits take effect without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from zfsmgr.errors import Forbidden, Unauthorized, ZfsmgrError
from zfsmgr.protocol import STORAGE_TYPES, validate_client_id, validate_dataset
from zfsmgr.retention import RetentionPolicy
from zfsmgr.server.filelock import FileLock
from zfsmgr.settings import as_duration
from zfsmgr.storage.directory import write_atomic


@dataclass(frozen=True)
class ClientConfig:
    """One entry of clients.json."""

    client_id: str
    api_key: str  # sha256 hex of the raw key
    max_size_bytes: int = 0  # 0: no quota
    dataset: str = ""
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
    extra: Dict[str, Any] = field(default_factory=dict)


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


def _parse(entry: Any, where: str) -> ClientConfig:
    if not isinstance(entry, dict):
        raise ZfsmgrError(f"{where}: each client must be a JSON object")
    try:
        client_id = validate_client_id(entry.get("client_id"))
        key = entry.get("api_key")
        if not isinstance(key, str) or len(key) != 64:
            raise ValueError(f"client {client_id}: api_key must be the 64-hex SHA-256 of the key")
        storage = entry.get("storage_type") or ""
        if storage not in ("",) + STORAGE_TYPES:
            raise ValueError(f"client {client_id}: storage_type must be s3, local or dir")
        quota = entry.get("max_size_bytes", 0) or 0
        if not isinstance(quota, int) or quota < 0:
            raise ValueError(f"client {client_id}: max_size_bytes must be a whole number")
        policy = entry.get("rotation_policy")
        append_only = entry.get("append_only")
        if append_only is not None and not isinstance(append_only, bool):
            raise ValueError(f"client {client_id}: append_only must be true or false")
        previous = entry.get("previous_api_key") or ""
        if not isinstance(previous, str) or previous and len(previous) != 64:
            raise ValueError(f"client {client_id}: previous_api_key must be a 64-hex SHA-256")
        return ClientConfig(
            client_id=client_id, api_key=key.lower(), max_size_bytes=quota,
            dataset=validate_dataset(entry["dataset"]) if entry.get("dataset") else "",
            enabled=entry.get("enabled", True) is not False, storage_type=storage,
            rotation_policy=RetentionPolicy.from_mapping(policy) if policy else None,
            max_incrementals=int(entry.get("max_incrementals", 0) or 0),
            max_chain_age_days=int(entry.get("max_chain_age_days", 0) or 0),
            append_only=append_only,
            check_warn=_duration(entry.get("check_warn"), f"client {client_id}: check_warn"),
            check_crit=_duration(entry.get("check_crit"), f"client {client_id}: check_crit"),
            previous_api_key=previous.lower(),
            previous_key_expires=float(entry.get("previous_key_expires", 0) or 0))
    except (ValueError, TypeError) as exc:
        raise ZfsmgrError(f"{where}: {exc}") from None


class ClientRegistry:
    """The clients of clients.json, reloaded whenever the file changes."""

    def __init__(self, path: str):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: Any = None
        self._clients: Dict[str, ClientConfig] = {}

    def _load(self) -> Dict[str, ClientConfig]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    entries = json.loads(self.path.read_text(encoding="utf-8") or "[]")
                except ValueError as exc:
                    raise ZfsmgrError(f"{self.path} is not valid JSON: {exc}") from None
                if not isinstance(entries, list):
                    raise ZfsmgrError(f"{self.path} must hold a JSON list of clients")
                parsed = [_parse(e, str(self.path)) for e in entries]
                self._clients = {c.client_id: c for c in parsed}
                self._stamp = stamp
            return self._clients

    def all(self) -> List[ClientConfig]:
        """Every configured client."""
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
            raise Unauthorized("unknown client or wrong API key")
        if write and not client.enabled:
            raise Forbidden(f"client {client.client_id} is disabled (it may list and restore its"
                            " backups, not upload)")
        return client


def add_client(path: str, client_id: str, quota: int = 0, storage: str = "",
               dataset: str = "") -> str:
    """Add a client with a new random key to clients.json (atomically); return the raw key."""
    validate_client_id(client_id)
    if dataset:
        validate_dataset(dataset)
    raw = secrets.token_urlsafe(32)
    target = Path(path)
    with FileLock(str(target) + ".lock"):
        entries = json.loads(target.read_text(encoding="utf-8") or "[]") \
            if target.exists() else []
        if any(e.get("client_id") == client_id for e in entries):
            raise ZfsmgrError(f"client {client_id} already exists in {path}")
        entry: Dict[str, Any] = {"client_id": client_id, "api_key": hash_key(raw),
                                 "max_size_bytes": quota, "dataset": dataset, "enabled": True}
        if storage:
            entry["storage_type"] = storage
        entries.append(entry)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, (json.dumps(entries, indent=2) + "\n").encode())
        os.chmod(target, 0o600)
    return raw
