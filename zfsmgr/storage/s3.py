"""The S3 store (AWS, MinIO, SeaweedFS, B2, Wasabi) through the minio client.

Upload parts are staged as objects under `.zfsmgr-uploads/<id>/`, each written with bounded
memory; `commit` composes them server-side (UploadPartCopy) into the final key, so an object of
any size appears at its key at once, and nothing of it travels through the server twice.
With S3_OBJECT_LOCK, committed objects are retained (zfsmgr/storage/s3lock.py).
A provider that refuses a write for want of room (a quota, a full cluster, an object over its
size cap: PROVIDER_FULL) is a StorageFull (507) naming the bucket and the bytes the write
needed; the client then aborts, and the abort deletes what was staged (deletes still work).
SeaweedFS 4.48 cannot be told apart: an enforced bucket quota and full volumes both answer
500 InternalError with a generic message, which stays a StorageError (503).
Several servers may share one bucket (zfsmgr.storage.s3shared): the bucket holds the manifests,
the upload sessions (`<staging>/<id>/session.json`), a lease and a change marker per client.
"""

from __future__ import annotations

import json
import logging
import types
from datetime import datetime
from typing import Dict, Iterator, Optional

from zfsmgr.errors import Conflict, StorageFull
from zfsmgr.files import CHUNK
from zfsmgr.protocol import (MIN_S3_PART_SIZE, Manifest, ValidationError, manifest_key,
                             validate_upload_id)
from zfsmgr.storage.base import (CountingReader, Download, NotFound, OutOfOrder, PartInfo,
                                 StorageError, Store)
from zfsmgr.storage.s3shared import Coordination, PreconditionFailed

log = logging.getLogger("zfsmgr.storage.s3")
STAGING = ".zfsmgr-uploads/"
S3_PART = 16 << 20  # minio buffers one part of this size in memory while uploading
MAX_S3_OBJECT_SIZE = 5 << 40  # S3's largest object, and minio's limit on a compose
# What providers answer a write they have no room for: AWS's object size cap, Ceph RGW's and
# OpenStack's quotas, MinIO's full drives and bucket quota; any 507; B2's "storage cap exceeded".
PROVIDER_FULL = frozenset({"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull",
                           "XMinioAdminBucketQuotaExceeded", "InsufficientStorage",
                           "StorageFull"})
_FULL_WORDS = ("quota exceeded", "cap exceeded", "storage full", "insufficient storage")
# what OpenSSL says when https meets a plain-http endpoint
_PLAIN_HTTP_SIGNS = ("WRONG_VERSION_NUMBER", "wrong version number", "record layer failure",
                     "packet length too long", "http request")


def provider_full(exc) -> bool:
    """Whether an S3Error says the provider has no room for the write (PROVIDER_FULL)."""
    status = getattr(exc.response, "status", 0) if exc.response is not None else 0
    message = (exc.message or "").lower()
    return exc.code in PROVIDER_FULL or status == 507 or any(w in message for w in _FULL_WORDS)


def _client(endpoint: str, access_key: str, secret_key: str, secure: bool, region: str):
    from minio import Minio  # imported late: only S3 users pay for it

    for scheme in ("https://", "http://"):
        if endpoint.startswith(scheme):
            endpoint, secure = endpoint[len(scheme):], scheme == "https://"
    return Minio(endpoint.rstrip("/"), access_key=access_key, secret_key=secret_key,
                 secure=secure, region=region or None)


class _Body:
    """A minio/urllib3 response as a closable reader."""

    def __init__(self, response):
        self.response = response

    def read(self, size: int = CHUNK) -> bytes:
        return self.response.read(CHUNK if size is None or size < 0 else size)

    def close(self) -> None:
        self.response.close()
        self.response.release_conn()


class S3Store(Store):
    """Backups as objects `<client>/<name>.zfs.gz` with `<name>.zfs.gz.manifest.json`."""

    kind = "s3"
    shared = True
    min_part_size = MIN_S3_PART_SIZE  # S3's multipart minimum (UploadPartCopy at commit)
    max_object_size = MAX_S3_OBJECT_SIZE  # what a compose may make: minio refuses more

    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = True, region: str = "", object_lock: str = ""):
        if not endpoint:
            raise StorageError("S3_ENDPOINT is not set")
        self.bucket = bucket
        self.where = f"S3 bucket {bucket} on {endpoint}"
        self.refused_full = False  # the last write the provider refused for want of room
        self.secure = secure and not endpoint.startswith("http://")
        self.client = _client(endpoint, access_key, secret_key, secure, region)
        self.lock = None
        if object_lock:
            from zfsmgr.storage.s3lock import ObjectLock

            self.lock = ObjectLock(object_lock, self.client, bucket, self._call)
        self.coordination = Coordination(self)

    @classmethod
    def from_settings(cls, settings, homes=dict) -> "S3Store":
        """The store of the S3_* settings."""
        s = settings
        return cls(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_bucket, s.s3_use_ssl,
                   s.s3_region, s.get("S3_OBJECT_LOCK", ""))

    def _call(self, what: str, func, *args, needs: int = 0, **kwargs):
        """Call minio; S3's answers and transport trouble become StorageError/NotFound, and
        a write refused for want of room a StorageFull saying it `needs` that many bytes.
        A listing or bulk delete (a generator: minio asks S3 as it is read) is mapped the
        same way while it is read.

        Only those: anything else (a TypeError, our own bug) is not the storage's fault and
        propagates as it is, to be logged with its traceback."""
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError

        try:
            result = func(*args, **kwargs)
        except (MinioException, HTTPError, OSError) as exc:  # urllib3: endpoint unreachable
            raise self._failure(what, exc, needs) from None
        if needs:
            self.refused_full = False
        if isinstance(result, types.GeneratorType):
            return self._read(what, result)
        return result

    def _read(self, what: str, items: Iterator):
        from minio.error import MinioException
        from urllib3.exceptions import HTTPError

        try:
            yield from items
        except (MinioException, HTTPError, OSError) as exc:
            raise self._failure(what, exc, 0) from None

    def _failure(self, what: str, exc: Exception, needs: int) -> Exception:
        """The zfsmgr error for minio's or urllib3's `exc` in `what`."""
        from minio.error import S3Error

        if isinstance(exc, S3Error):
            if exc.code in ("NoSuchKey", "NoSuchUpload", "ResourceNotFound"):
                return NotFound(f"{what}: {exc.code}")
            if exc.code == "PreconditionFailed":
                return PreconditionFailed(f"S3 {what}: precondition failed")
            if provider_full(exc):
                self.refused_full = True
                need = f"needs {needs} bytes" if needs else "was refused"
                return StorageFull(f"{self.where} is full: {what} {need}"
                                   f" ({exc.code}: {exc.message})")
            return StorageError(f"S3 {what} failed: {exc.code}: {exc.message}")
        hint = ""
        if self.secure and any(sign in str(exc) for sign in _PLAIN_HTTP_SIGNS):
            hint = " (the endpoint does not speak TLS: set S3_USE_SSL=false for plain http)"
        return StorageError(f"S3 {what} failed: {type(exc).__name__}: {exc}{hint}")

    def check(self) -> None:
        if not self._call("bucket check", self.client.bucket_exists, self.bucket):
            if self.lock:
                self.lock.make_bucket()
            else:
                try:
                    self._call("bucket create", self.client.make_bucket, self.bucket)
                    log.info("created bucket %s", self.bucket)
                except StorageError as exc:  # another server sharing it created it meanwhile
                    if "BucketAlreadyOwnedByYou" not in str(exc):
                        raise
        if self.lock and not self.lock.proven:
            self.lock.prove()  # once per process: it writes a probe object
        self.coordination.probe_conditional()

    def free_bytes(self) -> Optional[int]:
        """0 while the provider's last answer to a write was "no room" (S3 tells no free
        space), else unknown."""
        return 0 if self.refused_full else None

    def _part_key(self, upload_id: str, index: int) -> str:
        return f"{STAGING}{validate_upload_id(upload_id)}/part-{index:06d}"

    def _list_key(self, upload_id: str) -> str:
        return f"{STAGING}{validate_upload_id(upload_id)}/parts.json"

    def put_small(self, key: str, data: bytes, headers: Optional[Dict[str, str]] = None,
                  retention=None) -> str:
        """Write a small JSON object (with preconditions in `headers`, retained until
        `retention` under S3_OBJECT_LOCK); returns its ETag."""
        from minio.helpers import genheaders

        sent = genheaders(None, None, None, retention, False)
        sent.update({"Content-Type": "application/json", **(headers or {})})
        result = self._call(f"put {key}", self.client._put_object, self.bucket, key, data, sent,
                            needs=len(data))
        return (result.etag or "").strip('"')

    def get_small_etag(self, key: str):
        """(ETag, bytes) of a small object."""
        response = self._call(f"get {key}", self.client.get_object, self.bucket, key)
        try:
            return response.headers.get("ETag", "").strip('"'), response.read(1 << 20)
        finally:
            response.close()
            response.release_conn()

    def _get_small(self, key: str) -> bytes:
        return self.get_small_etag(key)[1]

    def head_etag(self, key: str) -> str:
        """The ETag of an object (NotFound when absent)."""
        return self._call(f"stat {key}", self.client.stat_object, self.bucket, key).etag or ""

    def delete_key(self, key: str, headers: Optional[Dict[str, str]] = None) -> None:
        """Delete one object, with preconditions in `headers`; absent is fine."""
        self._call(f"delete of {key}", self.client._execute, "DELETE", self.bucket, key,
                   headers=headers or {})

    def _session_key(self, upload_id: str) -> str:
        return f"{STAGING}{validate_upload_id(upload_id)}/session.json"

    def save_session(self, upload_id, text):
        self.put_small(self._session_key(upload_id), text.encode())

    def load_session(self, upload_id):
        try:
            return self._get_small(self._session_key(upload_id)).decode()
        except NotFound:
            return None

    def change_marker(self, client_id):
        return self.coordination.marker(client_id)

    def mark_changed(self, client_id):
        return self.coordination.mark_changed(client_id)

    def client_lease(self, client_id):
        return self.coordination.lease(client_id)

    def reserve(self, client_id, upload_id, amount):
        self.coordination.reserve(client_id, upload_id, amount)

    def reservations(self, client_id, max_age):
        return self.coordination.reservations(client_id, max_age)

    def unreserve(self, client_id, upload_id):
        self.coordination.unreserve(client_id, upload_id)

    def listing(self, prefix: str):
        """(name, last-modified epoch) of the objects under `prefix`."""
        return [(o.object_name, o.last_modified.timestamp() if o.last_modified else 0.0)
                for o in self._call("list", self.client.list_objects, self.bucket,
                                    prefix=prefix, recursive=True)]

    def manifest_keys(self, client_id):
        suffix = ".manifest.json"
        return {o.object_name[:-len(suffix)] for o in self._call(
            "list", self.client.list_objects, self.bucket, prefix=f"{client_id}/",
            recursive=True) if o.object_name.endswith(suffix)}

    def read_manifest(self, key):
        try:
            return Manifest.from_dict(json.loads(self._get_small(manifest_key(key))))
        except ValueError as exc:
            raise StorageError(f"manifest of {key} is unreadable: {exc}") from exc

    def stage_part(self, upload_id, index, source, size):
        parts = self.staged_parts(upload_id)
        if index < len(parts) - 1 or index > len(parts):
            raise OutOfOrder(f"part {index} out of order: {len(parts)} parts"
                             " are staged", len(parts))
        parts = parts[:index]
        _check_sizes(parts)
        reader = CountingReader(source, size)
        self._call(f"part {index} of upload {upload_id}", self.client.put_object, self.bucket,
                   self._part_key(upload_id, index), reader, size,
                   part_size=S3_PART, num_parallel_uploads=1, needs=size)
        part = PartInfo(index, size, reader.crc32)
        self.put_small(self._list_key(upload_id),
                       json.dumps([p.__dict__ for p in parts + [part]]).encode())
        return part

    def staged_parts(self, upload_id):
        try:
            return [PartInfo(**p) for p in json.loads(self._get_small(self._list_key(upload_id)))]
        except NotFound:
            return []

    def commit(self, upload_id, manifest):
        from minio.commonconfig import ComposeSource

        parts = self.staged_parts(upload_id)
        if not parts:
            raise StorageError(f"upload {upload_id} has no parts to commit")
        _check_sizes(parts[:-1])
        sources = [ComposeSource(self.bucket, self._part_key(upload_id, p.index)) for p in parts]
        retention = self._retention(manifest)
        self._call(f"the commit of {manifest.key}", self.client.compose_object, self.bucket,
                   manifest.key, sources, retention=retention,
                   needs=sum(p.size for p in parts))
        if retention is not None:  # a composed object may have ignored it: set and check
            self.lock.extend(manifest.key, retention.retain_until_date)
        exclusive = {"If-None-Match": "*"} if self.coordination.conditional else {}
        try:
            self.put_small(manifest_key(manifest.key),
                           json.dumps(manifest.to_dict(), indent=1).encode(), exclusive,
                           retention)
        except PreconditionFailed:
            if self._stored(manifest) is not True:
                raise Conflict(f"a backup stored as {manifest.key} already exists (committed"
                               " by another server)") from None
            # this very manifest: minio sent the write again after its first answer was lost
            # (or a 5xx), and the first had been applied
        except StorageError:
            # a 503, a 507: unless it was written after all (its answer lost), the object
            # goes again (a retry composes it anew), where surely no manifest followed it
            stored = self._stored(manifest)
            if stored is not True:
                if stored is None:
                    self._unpublish(manifest.key)
                raise
        if retention is not None:
            self.lock.extend(manifest_key(manifest.key), retention.retain_until_date)
        self.mark_changed(manifest.client_id)
        self.discard(upload_id)
        return manifest

    def _unpublish(self, key: str) -> None:
        """Remove an object its manifest never followed (a commit that failed after the
        compose): it took room nothing counted, and no sweep would find it."""
        try:
            if self.lock:
                self.lock.delete(key)
            else:
                self._call(f"delete of {key}", self.client.remove_object, self.bucket, key)
        except StorageError as exc:
            log.warning("%s stays without its manifest: %s", key, exc)

    def _stored(self, manifest) -> Optional[bool]:
        """Whether the stored manifest of `manifest.key` is `manifest` itself; None when
        there is none; False for another, or when it cannot be read (then nothing is
        removed)."""
        try:
            return self.read_manifest(manifest.key).to_dict() == manifest.to_dict()
        except NotFound:
            return None
        except StorageError:
            return False

    def _retention(self, manifest):
        """The Object Lock retention a commit sets (None without S3_OBJECT_LOCK)."""
        if not self.lock:
            return None
        until = manifest.extra.get("retain_until")
        if not until:
            raise StorageError(f"S3_OBJECT_LOCK is set but {manifest.key} has no retain-until")
        return self.lock.retention(datetime.fromisoformat(until))

    @property
    def retains(self) -> bool:
        """Whether commits lock backups (S3_OBJECT_LOCK)."""
        return self.lock is not None

    def retain(self, manifest, until: datetime) -> None:
        """Keep a committed backup (object and manifest) at least until `until`."""
        if self.lock:
            for key in (manifest.key, manifest_key(manifest.key)):
                self.lock.extend(key, until)

    def discard(self, upload_id):
        from minio.deleteobjects import DeleteObject

        prefix = f"{STAGING}{validate_upload_id(upload_id)}/"
        if self.lock:  # a versioned bucket: every version goes, or the parts stay as data
            self.lock.delete_prefix(prefix)
            self._abort_multipart(prefix)
            return
        names = [o.object_name for o in self._call("list", self.client.list_objects,
                                                   self.bucket, prefix=prefix, recursive=True)]
        names.sort(key=lambda n: n.endswith("parts.json"))  # the listing goes last
        if names:
            errors = self._call("delete", self.client.remove_objects, self.bucket,
                                [DeleteObject(n) for n in names])
            for err in errors:
                raise StorageError(f"S3 delete of {err.name} failed: {err.message}")
        self._abort_multipart(prefix)

    def _abort_multipart(self, prefix: str) -> None:
        """Abort incomplete multipart uploads left by a part interrupted mid-way."""
        for upload in self._multipart_uploads(prefix):
            self._call("multipart abort", self.client._abort_multipart_upload, self.bucket,
                       upload.object_name, upload.upload_id)

    def _multipart_uploads(self, prefix: str = "") -> Iterator:
        """The incomplete multipart uploads under `prefix`, page after page (1000 a page)."""
        key_marker = upload_marker = None
        while True:
            page = self._call("multipart listing", self.client._list_multipart_uploads,
                              self.bucket, prefix=prefix or None, key_marker=key_marker,
                              upload_id_marker=upload_marker)
            yield from page.uploads
            if not page.is_truncated or not page.next_key_marker:
                return
            key_marker, upload_marker = page.next_key_marker, page.next_upload_id_marker

    def sweep(self, max_age, now, is_open=lambda upload_id: False):
        """A server stopped in a commit's compose left minio's multipart upload at the
        backup's key, which holds its copied parts and is never listed as an object: once
        older than `max_age` (no compose takes that long) it is aborted."""
        done = []
        for upload in self._multipart_uploads():
            name = upload.object_name
            started = upload.initiated_time.timestamp() if upload.initiated_time else now
            if name.startswith(STAGING) or now - started <= max_age:
                continue  # staging: its upload's own (discard, expiry)
            self._call("multipart abort", self.client._abort_multipart_upload, self.bucket,
                       name, upload.upload_id)
            done.append(f"aborted the unfinished compose of {name}")
        return done

    def staged_uploads(self):
        latest = {}
        for obj in self._call("list", self.client.list_objects, self.bucket, prefix=STAGING,
                              recursive=True):
            upload_id = obj.object_name[len(STAGING):].split("/", 1)[0]
            stamp = obj.last_modified.timestamp() if obj.last_modified else 0.0
            latest[upload_id] = max(latest.get(upload_id, 0.0), stamp)
        for upload in self._multipart_uploads(STAGING):  # a part whose upload died
            upload_id = upload.object_name[len(STAGING):].split("/", 1)[0]
            stamp = upload.initiated_time.timestamp() if upload.initiated_time else 0.0
            latest[upload_id] = max(latest.get(upload_id, 0.0), stamp)
        return sorted(latest.items())

    def open(self, manifest, offset=0):
        response = self._call(f"download of {manifest.key}", self.client.get_object,
                              self.bucket, manifest.key, offset=offset)
        length = response.headers.get("Content-Length")
        return Download(_Body(response), int(length) if length and length.isdigit() else None,
                        self.describe(manifest))

    def manifests(self, client_id=None):
        prefix = f"{client_id}/" if client_id else ""
        for obj in self._call("list", self.client.list_objects, self.bucket, prefix=prefix,
                              recursive=True):
            name = obj.object_name
            if name.startswith(".zfsmgr-") or not name.endswith(".manifest.json"):
                continue
            try:
                yield Manifest.from_dict(json.loads(self._get_small(name)))
            except ValueError as exc:
                raise StorageError(f"manifest {name} is unreadable: {exc}") from exc

    def delete(self, manifest):
        for key in (manifest_key(manifest.key), manifest.key):
            if self.lock:  # Locked while retained; both have the same retention
                self.lock.delete(key)
                continue
            try:
                self._call(f"delete of {key}", self.client.remove_object, self.bucket, key)
            except NotFound:  # gone already: what delete wants
                pass
        self.mark_changed(manifest.client_id)


def _check_sizes(parts) -> None:
    """S3 composes only parts of at least 5 MiB but the last: a smaller one that is not the
    last is the client's fault (400), found before it costs a failed compose."""
    for part in parts:
        if part.size < MIN_S3_PART_SIZE:
            raise ValidationError(f"part {part.index} is {part.size} bytes but not the last:"
                                  f" on S3 every part but the last takes at least"
                                  f" {MIN_S3_PART_SIZE} bytes")
