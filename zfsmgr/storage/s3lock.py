"""S3 Object Lock for the S3 store (S3_OBJECT_LOCK=governance|compliance): the bucket is made
with Object Lock, every committed object and manifest gets a retain-until, and the lock is
proven at start.

Object Lock can only be switched on when a bucket is created, and it makes the bucket
versioned: a plain DELETE then only hides an object behind a delete marker, so zfsmgr deletes
(and the service refuses to delete) the object's version itself. `prove()` is the startup
check: it writes a probe object retained for a minute, asks the service to delete that version,
and refuses to start unless the service says no, so a service that accepts the settings but
ignores them (or a bucket without the lock) is found before any backup relies on it. Probes
left by earlier starts are removed once their minute has passed.

How long: each backup is retained from its commit for the policy's shortest horizon (its
finest non-zero rule: keep_hourly hours, else keep_daily days, else keep_weekly weeks, else
keep_monthly months), and never less than MIN_RETAIN_DAYS. A base's retention is extended
before an incremental on it is committed, so a chain's base always outlives its increments.
"""

from __future__ import annotations

import contextlib
import io
import logging
import secrets
from datetime import datetime, timedelta, timezone
from typing import Optional

from zfsmgr.errors import Locked, StorageError
from zfsmgr.retention import RetentionPolicy

log = logging.getLogger("zfsmgr.storage.s3")
MODES = ("governance", "compliance")
PROBES = ".zfsmgr-lock-probe/"


@contextlib.contextmanager
def _reaching(what: str):
    """The calls that read S3's own refusals (S3Error) themselves: a service out of reach
    (urllib3, OSError, minio's other errors) is a StorageError there too, as in S3Store._call,
    not a traceback and a 500."""
    from minio.error import MinioException, S3Error
    from urllib3.exceptions import HTTPError

    try:
        yield
    except S3Error:
        raise
    except (MinioException, HTTPError, OSError) as exc:
        raise StorageError(f"S3 {what} failed: {type(exc).__name__}: {exc}") from None


def horizon(policy: Optional[RetentionPolicy], min_retain_days: float) -> timedelta:
    """How long a new backup is locked: the policy's shortest horizon, at least the floor."""
    policy = policy or RetentionPolicy()
    span = timedelta(0)
    for count, unit in ((policy.keep_hourly, timedelta(hours=1)),
                        (policy.keep_daily, timedelta(days=1)),
                        (policy.keep_weekly, timedelta(weeks=1)),
                        (policy.keep_monthly, timedelta(days=31))):
        if count:
            span = count * unit
            break
    return max(span, timedelta(days=min_retain_days))


class ObjectLock:
    """The Object Lock side of one bucket, in one mode."""

    def __init__(self, mode: str, client, bucket: str, call):
        if mode not in MODES:
            raise StorageError(f"S3_OBJECT_LOCK={mode}: expected governance or compliance")
        self.mode, self.client, self.bucket, self._call = mode, client, bucket, call
        self.proven = False

    def retention(self, until: datetime):
        """minio's Retention of this mode until `until`."""
        from minio.commonconfig import COMPLIANCE, GOVERNANCE
        from minio.retention import Retention

        return Retention(COMPLIANCE if self.mode == "compliance" else GOVERNANCE,
                         until.astimezone(timezone.utc).replace(microsecond=0))

    def make_bucket(self) -> None:
        """Create the bucket with Object Lock on (only possible at creation)."""
        self._call("bucket create", self.client.make_bucket, self.bucket, object_lock=True)
        log.info("created bucket %s with Object Lock (%s)", self.bucket, self.mode)

    def prove(self) -> None:
        """Refuse to start unless the service keeps a locked version from being deleted."""
        from minio.error import S3Error

        try:
            with _reaching(f"Object Lock configuration of {self.bucket}"):
                config = self.client.get_object_lock_config(self.bucket)
        except S3Error as exc:
            raise StorageError(f"S3_OBJECT_LOCK={self.mode}, but bucket {self.bucket} has no"
                               f" Object Lock ({exc.code}); it can only be enabled when a"
                               " bucket is created: use a new S3_BUCKET") from None
        del config  # its default retention is not used: zfsmgr sets each object's own
        self._tidy_probes()
        key = f"{PROBES}{secrets.token_hex(8)}"
        until = datetime.now(timezone.utc) + timedelta(minutes=1)
        written = self._call("Object Lock probe", self.client.put_object, self.bucket, key,
                             io.BytesIO(b"probe"), 5, retention=self.retention(until))
        try:
            with _reaching("Object Lock probe"):
                self.client.remove_object(self.bucket, key, version_id=written.version_id)
        except S3Error:
            self.proven = True
            log.info("Object Lock (%s) on bucket %s is enforced: a locked probe could not"
                     " be deleted", self.mode, self.bucket)
            return
        raise StorageError(f"S3_OBJECT_LOCK={self.mode}: the S3 service deleted a locked"
                           f" object in bucket {self.bucket}, so it does not enforce Object"
                           " Lock; refusing to start")

    def _tidy_probes(self) -> None:
        """Remove the probes of earlier starts whose retention has passed."""
        from minio.error import S3Error

        for obj in self._call("list", self.client.list_objects, self.bucket, prefix=PROBES,
                              recursive=True, include_version=True):
            try:
                with _reaching(f"delete of {obj.object_name}"):
                    self.client.remove_object(self.bucket, obj.object_name,
                                              version_id=obj.version_id)
            except S3Error:
                pass  # still retained: the next start tries again

    def retained_until(self, key: str) -> Optional[datetime]:
        """The retain-until of the current version of `key` (None: not retained)."""
        from minio.error import S3Error

        try:
            with _reaching(f"retention of {key}"):
                current = self.client.get_object_retention(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchObjectLockConfiguration",
                            "ObjectLockConfigurationNotFoundError"):
                return None
            raise StorageError(f"S3 retention of {key} failed: {exc.code}: {exc.message}") \
                from None
        return current.retain_until_date if current is not None else None

    def extend(self, key: str, until: datetime) -> None:
        """Retain the current version of `key` until at least `until`, and check that the
        service took it (some ignore the retention of a composed object)."""
        have = self.retained_until(key)
        if have is not None and have >= until.replace(microsecond=0):
            return
        self._call(f"retention of {key}", self.client.set_object_retention, self.bucket, key,
                   self.retention(until))
        have = self.retained_until(key)
        if have is None or have < until.replace(microsecond=0):
            raise StorageError(f"S3 did not retain {key} until {until.isoformat()}"
                               f" (it says {have})")

    def delete(self, key: str) -> None:
        """Delete every version of `key` (Locked while one is retained)."""
        from minio.error import S3Error

        versions = list(self._call("list", self.client.list_objects, self.bucket, prefix=key,
                                   include_version=True))
        for obj in versions:
            if obj.object_name != key:
                continue
            try:
                with _reaching(f"delete of {key}"):
                    self.client.remove_object(self.bucket, key, version_id=obj.version_id)
            except S3Error as exc:
                if exc.code in ("AccessDenied", "InvalidRequest", "ObjectLocked"):
                    raise Locked(f"{key} is under Object Lock ({self.mode}) and cannot be"
                                 " deleted yet") from None
                raise StorageError(f"S3 delete of {key} failed: {exc.code}: {exc.message}") \
                    from None

    def delete_prefix(self, prefix: str) -> None:
        """Delete every version of everything under `prefix` (staged parts carry no lock)."""
        from minio.deleteobjects import DeleteObject

        doomed = [DeleteObject(o.object_name, o.version_id) for o in self._call(
            "list", self.client.list_objects, self.bucket, prefix=prefix, recursive=True,
            include_version=True)]
        doomed.sort(key=lambda d: d.name.endswith("parts.json"))  # the listing goes last
        if doomed:
            for err in self._call("delete", self.client.remove_objects, self.bucket, doomed):
                raise StorageError(f"S3 delete of {err.name} failed: {err.message}")
