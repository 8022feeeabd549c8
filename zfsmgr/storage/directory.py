"""The directory store: objects as files under STORAGE_DIR, written atomically.

Uploads stage into STORAGE_DIR/.uploads/<id>/ (one data file appended part by part, and a parts
list written atomically after each part), so a restarted server finds them again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import threading
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Set, Tuple

from zfsmgr.files import CHUNK, fsync_dir, hand_over, temp_sibling, write_atomic
from zfsmgr.protocol import Manifest, manifest_key, validate_client_id, validate_upload_id
from zfsmgr.storage.base import (CountingReader, Download, NotFound, OutOfOrder, PartInfo,
                                 StorageError, StorageFull, Store, is_full)

log = logging.getLogger("zfsmgr.storage.directory")


WRITEBACK_EVERY = 8 << 20


def release_pages(stream, offset: int, length: int) -> None:
    """Start writing `length` bytes at `offset` to disk now, without waiting, and drop the
    pages of that range already on disk from the page cache (POSIX_FADV_DONTNEED does both on
    Linux; elsewhere nothing is lost: commit fsyncs).

    Written as parts arrive, the commit's fsync finds little left to do. Dropped, stored
    streams (written once, read rarely) do not fill the server's memory: with gigabytes of
    them cached, every later page-cache write cost the server up to 50% more CPU."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or length <= 0:
        return
    stream.flush()
    try:
        advise(stream.fileno(), offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _release_window(out, flushed: int, end: int) -> int:
    """Send [flushed, end) to disk and drop what the three windows before it have written."""
    start = max(0, flushed - 3 * WRITEBACK_EVERY)
    release_pages(out, start, end - start)
    return end


class Staging:
    """Upload parts staged on the server's own disk: one data file and a list of parts.

    Parts are not fsync'd one by one (that stalled every upload), so after a power loss the
    list may name bytes the disk never kept. The first time this process touches an upload
    it started before, it reads the data back against each part's CRC-32 and keeps the parts
    that are intact; the client sends the others again."""

    def __init__(self, root: Path):
        self.root = root
        self._checked: Set[str] = set()  # uploads whose staged bytes this process vouches for
        self._locks: Dict[str, threading.Lock] = {}  # one per upload being checked
        self._lock = threading.Lock()

    def folder(self, upload_id: str) -> Path:
        return self.root / validate_upload_id(upload_id)

    def parts(self, upload_id: str) -> List[PartInfo]:
        if upload_id not in self._checked:
            with self._lock:
                lock = self._locks.setdefault(upload_id, threading.Lock())
            with lock:  # reading one upload back does not hold up the others
                if upload_id not in self._checked and self.folder(upload_id).is_dir():
                    self._intact(upload_id, self._listed(upload_id))
                    self._checked.add(upload_id)  # until discard(): an upload that exists
            with self._lock:
                self._locks.pop(upload_id, None)
        return self._listed(upload_id)

    def _listed(self, upload_id: str) -> List[PartInfo]:
        listing = self.folder(upload_id) / "parts.json"
        try:
            return [PartInfo(**p) for p in json.loads(listing.read_bytes())]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as exc:
            raise StorageError(f"staged parts of upload {upload_id} are unreadable: {exc}")

    def _intact(self, upload_id: str, parts: List[PartInfo]) -> None:
        """Keep the leading parts whose bytes match their recorded size and CRC-32."""
        if not parts:
            return
        good: List[PartInfo] = []
        try:
            with open(self.folder(upload_id) / "data", "rb") as data:
                for part in parts:
                    reader = CountingReader(data, part.size)
                    while reader.read(CHUNK):
                        pass
                    if (reader.size, reader.crc32) != (part.size, part.crc32):
                        break
                    good.append(part)
        except FileNotFoundError:
            pass
        if len(good) < len(parts):
            log.warning("upload %s: %d of %d staged parts did not survive; they will be sent"
                        " again", upload_id, len(parts) - len(good), len(parts))
            write_atomic(self.folder(upload_id) / "parts.json",
                         json.dumps([p.__dict__ for p in good]).encode(), durable=False)

    def stage(self, upload_id: str, index: int, source: BinaryIO, size: int) -> PartInfo:
        folder = self.folder(upload_id)
        folder.mkdir(parents=True, exist_ok=True)
        parts = self.parts(upload_id)
        if index < len(parts) - 1 or index > len(parts):
            raise OutOfOrder(f"part {index} out of order: {len(parts)} parts"
                             " are staged", len(parts))
        if index == len(parts) - 1:
            parts.pop()  # a resend of the last part replaces it
        offset = sum(p.size for p in parts)
        reader = CountingReader(source, size)
        try:
            with open(folder / "data", "ab") as out:
                out.truncate(offset)  # drop a torn write of a part that was never recorded
                out.seek(offset)
                flushed = offset
                while True:
                    chunk = reader.read(CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    if offset + reader.size - flushed >= WRITEBACK_EVERY:
                        flushed = _release_window(out, flushed, offset + reader.size)
                _release_window(out, flushed, offset + reader.size)
            if reader.size != size:
                raise StorageError(f"part {index} ended after {reader.size} of {size} bytes")
            part = PartInfo(index, size, reader.crc32)
            # Not fsync'd per part (that stalled every upload): a process crash keeps the page
            # cache; after a power loss `parts` finds which parts survived. Commit fsyncs.
            write_atomic(folder / "parts.json",
                         json.dumps([p.__dict__ for p in parts + [part]]).encode(),
                         durable=False)
        except BaseException:
            try:  # what the failed part wrote goes at once: a full disk gets its room back
                os.truncate(folder / "data", offset)
            except OSError:
                pass
            raise
        return part

    def data_path(self, upload_id: str) -> Path:
        data = self.folder(upload_id) / "data"
        if not data.exists():
            raise NotFound(f"upload {upload_id} has no staged data")
        os.truncate(data, sum(p.size for p in self.parts(upload_id)))
        return data

    def discard(self, upload_id: str) -> None:
        """Remove an upload's staging; frees its space even on a full disk (truncate and
        unlink need none), and raises StorageError if anything stays."""
        folder = self.folder(upload_id)
        try:
            os.truncate(folder / "data", 0)
        except OSError:
            pass
        shutil.rmtree(folder, ignore_errors=True)
        self._checked.discard(upload_id)
        if folder.exists():
            raise StorageError(f"cannot remove the staged upload {folder}")

    def uploads(self) -> List[Tuple[str, float]]:
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            try:  # an upload committed or aborted meanwhile is gone: not one to list
                info = path.stat()
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(info.st_mode):
                found.append((path.name, info.st_mtime))
        return found


class DirectoryStore(Store):
    """Backups as files: ROOT/<client>/<name>.zfs.gz with <name>.zfs.gz.manifest.json."""

    kind = "dir"

    def __init__(self, root: str):
        self.root = Path(root).absolute()
        self.staging = Staging(self.root / ".uploads")

    @classmethod
    def from_settings(cls, settings, homes=dict) -> "DirectoryStore":
        """The store of STORAGE_DIR."""
        return cls(settings.storage_dir)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents or ".uploads" in path.parts:
            raise StorageError(f"key {key!r} escapes the store")
        return path

    def check(self) -> None:
        try:
            if not self.root.exists():
                self.root.mkdir(parents=True)
                hand_over(self.root)  # made by an admin command run as root: the server's
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            if not is_full(exc):  # a full store still serves, aborts and deletes
                raise StorageError(f"directory store {self.root} is not writable: {exc}") \
                    from exc

    def free_bytes(self) -> Optional[int]:
        try:
            stat = os.statvfs(self.root)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    def _full(self, what: str, needed: int) -> StorageFull:
        return StorageFull(f"directory store {self.root} is full: {what} needs {needed} bytes,"
                           f" {self.free_bytes() or 0} are free")

    def stage_part(self, upload_id, index, source, size):
        try:
            return self.staging.stage(upload_id, index, source, size)
        except OSError as exc:
            if is_full(exc):
                raise self._full(f"part {index} of upload {upload_id}", size) from None
            raise StorageError(f"cannot stage part {index}: {exc.strerror}") from exc

    def staged_parts(self, upload_id):
        return self.staging.parts(upload_id)

    def commit(self, upload_id, manifest):
        """Publish the staged stream and its manifest. Each step that needs room (the client's
        folder, the manifest, the renames) either completes or leaves the upload staged as it
        was, so a commit that found the disk full (StorageFull) can be retried."""
        target = self._path(manifest.key)
        meta = self._path(manifest_key(manifest.key))
        pending = temp_sibling(meta, upload_id)
        data = self.staging.data_path(upload_id)
        body = json.dumps(manifest.to_dict(), indent=1).encode()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(data, "rb+") as stream:
                os.fsync(stream.fileno())
                release_pages(stream, 0, os.fstat(stream.fileno()).st_size)  # all clean now
            write_atomic(pending, body)
            os.replace(data, target)
        except OSError as exc:
            _unlink(pending)
            if is_full(exc):
                raise self._full(f"the commit of {manifest.key}", len(body)) from None
            raise StorageError(f"cannot commit {manifest.key}: {exc.strerror}") from exc
        try:
            os.replace(pending, meta)
            fsync_dir(target.parent)
        except OSError as exc:
            try:  # put the stream back where a retry finds it
                os.replace(target, data)
            except OSError:
                _unlink(target)  # never an object without its manifest
            _unlink(pending)
            if is_full(exc):
                raise self._full(f"the commit of {manifest.key}", len(body)) from None
            raise StorageError(f"cannot commit {manifest.key}: {exc.strerror}") from exc
        self.staging.discard(upload_id)
        return manifest

    def discard(self, upload_id):
        self.staging.discard(upload_id)

    def finish_commit(self, upload_id, key):
        """The object published and the manifest still under its temporary name (the server
        stopped between commit's two renames): put the manifest in place."""
        meta = self._path(manifest_key(key))
        pending = temp_sibling(meta, upload_id)
        try:
            if pending.is_file() and self._path(key).is_file() and not meta.exists():
                os.replace(pending, meta)
                fsync_dir(meta.parent)
                log.info("finished the commit of %s, which a stopped server left halfway", key)
                self.staging.discard(upload_id)  # as the commit would have
        except OSError as exc:
            raise StorageError(f"cannot finish the commit of {key}: {exc.strerror}") from exc

    def staged_uploads(self):
        return self.staging.uploads()

    def sweep(self, max_age, now, is_open=lambda upload_id: False):
        """A commit stopped between its two renames left the object and its manifest under a
        temporary name (`.<manifest>.<upload id>.tmp`): while its upload is open, the manifest
        is put in place (the expiry then records the backup); else (the client aborted) both
        go. A deletion stopped between its two unlinks left an object with no manifest: it
        goes. Only the clients' folders are looked at (not `.uploads-local`, `lost+found`, …),
        each on its own; age by ctime, which each rename sets."""
        done: List[str] = []
        if not self.root.is_dir():
            return done
        for folder in sorted(self.root.iterdir()):
            try:
                validate_client_id(folder.name)
            except ValueError:
                continue
            try:
                if folder.is_dir() and not folder.is_symlink():
                    done += self._sweep_folder(folder, max_age, now, is_open)
            except OSError as exc:  # this folder only: the others are looked at
                done.append(f"{folder.name}: not looked at ({exc.strerror or exc})")
        return done

    def _sweep_folder(self, folder: Path, max_age: float, now: float, is_open) -> List[str]:
        done = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and \
                    entry.is_file() and now - entry.stat().st_ctime > max_age:
                done.append(self._mend_pending(folder / entry.name, is_open))
        names = {e.name for e in os.scandir(folder)}
        for name in sorted(names):
            path = folder / name
            if name.startswith(".") or name.endswith(".manifest.json") or \
                    name + ".manifest.json" in names:
                continue
            try:
                if not path.is_file() or now - path.stat().st_ctime <= max_age:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            done.append(f"removed {folder.name}/{name}: published, but no manifest was put"
                        " beside it (a deletion or a commit stopped halfway)")
        return done

    def _mend_pending(self, path: Path, is_open) -> str:
        """A temporary file of a commit: its manifest put in place if its upload is still open
        and its object is there; else removed (its object then goes as one with no
        manifest)."""
        found = re.search(r"\.([0-9a-f]{32})\.tmp$", path.name)
        manifest = None
        if found and is_open(found.group(1)):
            try:
                manifest = Manifest.from_dict(json.loads(path.read_bytes()))
                target, meta = self._path(manifest.key), self._path(manifest_key(manifest.key))
            except (ValueError, OSError, StorageError):
                manifest = None
        if manifest is not None and target.parent == path.parent and target.exists() and \
                not meta.exists():
            os.replace(path, meta)
            fsync_dir(path.parent)
            return f"finished the commit of {manifest.key}, which a stopped server left halfway"
        _unlink(path)
        return f"removed {path.parent.name}/{path.name}, left by a stopped server"

    def open(self, manifest, offset=0):
        path = self._path(manifest.key)
        try:
            stream = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{manifest.key} is missing from the directory store") from None
        size = os.fstat(stream.fileno()).st_size
        stream.seek(offset)
        return Download(stream, max(0, size - offset), self.describe(manifest))

    def manifests(self, client_id=None):
        folders = [self.root / client_id] if client_id else [
            p for p in sorted(self.root.iterdir()) if p.is_dir() and p.name != ".uploads"] \
            if self.root.is_dir() else []
        for folder in folders:
            for path in sorted(folder.glob("*.manifest.json")) if folder.is_dir() else []:
                try:
                    yield Manifest.from_dict(json.loads(path.read_bytes()))
                except (ValueError, OSError) as exc:
                    raise StorageError(f"manifest {path} is unreadable: {exc}") from exc

    def read_manifest(self, key):
        """One file, where the listing of the client's folder would read them all."""
        path = self._path(manifest_key(key))
        try:
            return Manifest.from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise NotFound(f"no manifest for {key}") from None
        except (ValueError, OSError) as exc:
            raise StorageError(f"manifest {path} is unreadable: {exc}") from exc

    def delete(self, manifest):
        for key in (manifest_key(manifest.key), manifest.key):
            try:
                self._path(key).unlink()
            except FileNotFoundError:
                pass
        try:
            fsync_dir(self._path(manifest.key).parent)
        except FileNotFoundError:  # the client's folder is gone too: nothing to make durable
            pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
