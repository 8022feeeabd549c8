"""`restore save`: stored streams to local files, written atomically once verified.

The file's extension picks its format: `.gz` gzip, `.zst` zstd, `.zfs` a plain stream; any
other name gets the backup's recorded compression (its key's extension). When that is the
stored format the bytes are copied verbatim, otherwise they are re-encoded on the way (still
checked against the stored sha256). Downloads from `local` storage arrive as plain streams and
are encoded the same way.

With --chain, every stream needed to rebuild the snapshot is saved, in the order to receive
them: `PREFIX.01-<snapshot>.zfs.gz`, `PREFIX.02-<snapshot>.zfs.gz`, ... where PREFIX is the
file name without its extension. Nothing is renamed into place until all of them are verified.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from zfsmgr.compress import compressor, decompressor
from zfsmgr.errors import UsageError, ZfsmgrError
from zfsmgr.files import CHUNK, fsync_dir, temp_sibling
from zfsmgr.protocol import COMPRESSIONS, ENCRYPTIONS, Manifest
from zfsmgr.restore.receive import StreamOpener
from zfsmgr.restore.stream import StoredStream, reported

# the extensions of protocol.COMPRESSIONS, and the plain ones (".gz") of the codecs that compress
_BY_SUFFIX = tuple(sorted({**{ext: codec for codec, ext in COMPRESSIONS.items()},
                           **{ext[len(".zfs"):]: codec for codec, ext in COMPRESSIONS.items()
                              if ext != ".zfs"}}.items(), key=lambda pair: -len(pair[0])))


def wanted_codec(filename: str) -> str | None:
    """The codec the file name asks for, None when it names none."""
    for suffix, codec in _BY_SUFFIX:
        if filename.endswith(suffix):
            return codec
    return None


def chain_names(filename: str, chain: Sequence[Manifest], codec: str | None) -> list[str]:
    """File names for each stream of a chain, numbered in the order to receive them."""
    prefix = filename
    for suffix, _ in _BY_SUFFIX:
        if prefix.endswith(suffix):
            prefix = prefix[:-len(suffix)]
            break
    width = max(2, len(str(len(chain))))
    names = []
    for index, manifest in enumerate(chain, start=1):
        ext = COMPRESSIONS[codec or manifest.compression] + ENCRYPTIONS[manifest.encryption]
        names.append(f"{prefix}.{index:0{width}d}-{manifest.snapshot}{ext}")
    return names


def _temp_for(path: Path) -> Path:
    return temp_sibling(path, str(os.getpid()))


def write_stream(source: StoredStream, path: Path, codec: str) -> int:
    """Write `source` to `path` (a temp file) in `codec`, fsync'd; verify; return its size."""
    reader = source
    if codec != source.compression and source.encryption:
        source.close()
        raise UsageError(f"{source.key} is encrypted with {source.encryption}: it is saved as"
                         f" stored ({COMPRESSIONS[source.compression]}"
                         f"{ENCRYPTIONS[source.encryption]}); decrypt it with age -d")
    if codec != source.compression:
        try:
            reader = compressor(codec, decompressor(source.compression, source))
        except (ValueError, RuntimeError) as exc:  # zstd needs its binary
            source.close()
            raise ZfsmgrError(f"cannot re-encode {source.key} as {codec}: {exc}") from exc
    written = 0
    try:
        with open(path, "wb") as out:
            while True:
                try:
                    chunk = reader.read(CHUNK)
                except (ValueError, RuntimeError) as exc:
                    source.blame()
                    raise ZfsmgrError(f"cannot re-encode {source.key}: {exc}") from exc
                if not chunk:
                    break
                out.write(chunk)
                written += len(chunk)
            source.check()
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        source.cancel()  # before the codec's close: its feeder may wait on a stalled download
        raise
    finally:
        if reader is not source:
            reader.close()
        source.close()
    return written


def save(open_stream: StreamOpener, chain: Sequence[Manifest], filename: str,
         whole_chain: bool, force: bool = False) -> list[tuple[str, int]]:
    """Save the target (chain[-1]) or, with `whole_chain`, every stream; return names, sizes.
    An existing file is refused (UsageError, nothing downloaded) unless `force`."""
    codec = wanted_codec(filename)
    if whole_chain:
        names = chain_names(filename, chain, codec)
        items = list(zip(chain, names))
    else:
        items = [(chain[-1], filename)]
        stored = chain[-1]
        if stored.encryption and not filename.endswith(ENCRYPTIONS[stored.encryption]):
            # saved as stored: age's ciphertext under a name that says gzip or zfs
            raise UsageError(f"{stored.key} is encrypted with {stored.encryption}: save it"
                             f" to a name ending in {COMPRESSIONS[stored.compression]}"
                             f"{ENCRYPTIONS[stored.encryption]} (decrypt it with age -d)")
    for _, name in items:
        folder = Path(name).absolute().parent
        if not folder.is_dir():
            raise UsageError(f"cannot save to {name}: {folder} is not a directory")
        if os.path.lexists(name) and not force:
            raise UsageError(f"{name} exists: pass --force to overwrite it")
        if os.path.isdir(name):  # --force replaces a file, never a directory
            raise UsageError(f"cannot save to {name}: it is a directory (name a file in it)")
    temps: list[Path] = []
    results = []
    try:
        for index, (manifest, name) in enumerate(items, start=1):
            temp = _temp_for(Path(name))
            temps.append(temp)
            label = f"[{index}/{len(items)}] {name}"
            with reported(open_stream(manifest, label), "saved") as source:
                size = write_stream(source, temp, codec or manifest.compression)
            results.append((name, size))
        for temp, (_, name) in zip(temps, items):
            os.replace(temp, name)
        _fsync_dirs(name for _, name in items)
    finally:
        for temp in temps:
            if temp.exists():
                temp.unlink()
    return results


def _fsync_dirs(names) -> None:
    for folder in {Path(name).absolute().parent for name in names}:
        fsync_dir(folder)
