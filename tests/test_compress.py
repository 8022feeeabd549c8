"""Tests for zfsmgr.compress: parallel deterministic gzip, zstd via the binary, passthrough."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import shutil
import subprocess
import zlib

import pytest

from zfsmgr import compress
from zfsmgr.compress import (
    GzipBlockCompressor,
    GzipDecompressor,
    ZstdCompressor,
    ZstdDecompressor,
    compressor,
    decompressor,
    extension,
)

BS = 64 * 1024  # small blocks keep the tests fast while still making many members
needs_zstd = pytest.mark.skipif(not compress.zstd_available(), reason="zstd binary not on PATH")


def mixed_data(size: int, seed: int = 0) -> bytes:
    """Return size bytes: a third random, a third zeros, a third repetitive text."""
    rng = random.Random(seed)
    third = size // 3
    text = b"zfs send stream of tank/data@hourly-0001 " * (size // 40 + 1)
    return rng.randbytes(third) + bytes(third) + text[: size - 2 * third]


class TrickleSource:
    """A pipe-like source that returns short reads of random length."""

    def __init__(self, data: bytes, seed: int = 1, eof: bytes | str = b"") -> None:
        self._data = io.BytesIO(data)
        self._rng = random.Random(seed)
        self._eof = eof

    def read(self, size: int) -> bytes | str:
        data = self._data.read(self._rng.randint(1, max(1, min(size, 5000))))
        return data if data else self._eof


class FailingSource:
    """Yields limit bytes of zeros in the sizes asked for, then raises OSError."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.given = 0

    def read(self, size: int) -> bytes:
        if self.given >= self.limit:
            raise OSError("disk on fire")
        size = min(size, self.limit - self.given)
        self.given += size
        return bytes(size)


def read_all(reader, size: int = 100_000) -> bytes:
    """Drain a reader with sized reads, checking each read honours its size."""
    parts = []
    while True:
        data = reader.read(size)
        assert len(data) <= size
        if not data:
            return b"".join(parts)
        parts.append(data)


def gzip_compress(data: bytes, **kwargs) -> bytes:
    with GzipBlockCompressor(io.BytesIO(data), **kwargs) as comp:
        out = read_all(comp)
        assert comp.raw_bytes == len(data)
    return out


def gunzip_binary(data: bytes) -> bytes:
    done = subprocess.run(["gunzip", "-c"], input=data, capture_output=True, check=True)
    return done.stdout


def member_offsets(blob: bytes) -> list[int]:
    """Offsets of the gzip members in blob, found by decompressing member by member."""
    import zlib

    offsets, pos = [], 0
    while pos < len(blob):
        offsets.append(pos)
        inflater = zlib.decompressobj(31)
        inflater.decompress(blob[pos:])
        assert inflater.eof
        pos = len(blob) - len(inflater.unused_data)
    return offsets


def test_codecs_and_extensions():
    assert compress.CODECS == ("gzip", "zstd", "none")
    assert [extension(c) for c in compress.CODECS] == [".zfs.gz", ".zfs.zst", ".zfs"]
    assert compress.zstd_available() == (shutil.which("zstd") is not None)
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        extension("lz4")
    with pytest.raises(ValueError, match="unknown codec"):
        compressor("lz4", io.BytesIO(b""))
    with pytest.raises(ValueError, match="unknown codec"):
        decompressor("bzip2", io.BytesIO(b""))


@pytest.mark.parametrize("size", [0, 1, BS - 1, BS, BS + 1, 5 * BS + 123, 3 * 1024 * 1024 + 7])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_gzip_round_trip(size, threads):
    data = mixed_data(size, seed=size)
    blob = gzip_compress(data, block_size=BS, threads=threads)
    assert gzip.decompress(blob) == data
    assert read_all(GzipDecompressor(io.BytesIO(blob))) == data
    assert len(member_offsets(blob)) == max(1, -(-size // BS))


@pytest.mark.parametrize("size", [0, 1, BS + 1, 2 * 1024 * 1024])
def test_gzip_output_is_read_by_gunzip_binary(size):
    data = mixed_data(size, seed=3)
    assert gunzip_binary(gzip_compress(data, block_size=BS, threads=2)) == data


def test_gzip_default_block_size_round_trip_through_gunzip():
    data = mixed_data(5 * 1024 * 1024 + 11, seed=5)
    blob = gzip_compress(data)
    assert len(member_offsets(blob)) == 6
    assert gunzip_binary(blob) == data


def test_gzip_is_deterministic_across_runs_threads_and_read_patterns():
    data = mixed_data(2 * 1024 * 1024 + 999, seed=7)
    first = gzip_compress(data, block_size=BS, threads=1)
    assert gzip_compress(data, block_size=BS, threads=1) == first
    assert gzip_compress(data, block_size=BS, threads=4) == first
    # Short reads from a pipe must not change the block boundaries.
    with GzipBlockCompressor(TrickleSource(data), block_size=BS, threads=3) as comp:
        assert read_all(comp, size=777) == first
    # A different block size gives different (but valid) bytes: the size must stay fixed.
    other = gzip_compress(data, block_size=2 * BS, threads=2)
    assert other != first
    assert gzip.decompress(other) == data


def test_gzip_member_headers_carry_no_time_or_name():
    blob = gzip_compress(mixed_data(3 * BS, seed=9), block_size=BS, threads=2)
    offsets = member_offsets(blob)
    assert len(offsets) == 3
    for pos in offsets:
        assert blob[pos:pos + 3] == b"\x1f\x8b\x08"
        assert blob[pos + 3] == 0  # FLG: no FNAME, FCOMMENT, FEXTRA
        assert blob[pos + 4:pos + 8] == b"\0\0\0\0"  # MTIME 0


SEGMENT, PROBE = compress._SEGMENT_SIZE, compress._PROBE_SIZE
BLOCK = 4 * SEGMENT  # several segments per block, so a block can switch between stored and deflated


def random_data(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def text_data(size: int, seed: int = 0) -> bytes:
    """Log lines with varying numbers: level 1 shrinks them to about 40%."""
    rng, lines, total = random.Random(seed), [], 0
    words = [b"send", b"recv", b"tank/data", b"snapshot", b"error", b"resumed", b"txg", b"scrub"]
    while total < size:
        line = b"2024-05-%02d %02d:%02d:%02d host%d %s %s id=%d bytes=%d\n" % (
            rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59),
            rng.randint(1, 9), rng.choice(words), rng.choice(words), rng.randint(0, 10**6),
            rng.randint(0, 10**9))
        lines.append(line)
        total += len(line)
    return b"".join(lines)[:size]


def striped_runs(size: int, seed: int = 0) -> list[tuple[str, int]]:
    """Runs of random, text and zeros of uneven lengths, so changes fall inside segments."""
    rng, runs, total = random.Random(seed), [], 0
    while total < size:
        run = min(rng.randint(1000, 3 * SEGMENT), size - total)
        runs.append((("random", "text", "zeros")[len(runs) % 3], run))
        total += run
    return runs


def striped_data(size: int, seed: int = 0) -> bytes:
    makers = {"random": random_data, "text": text_data, "zeros": lambda n, seed: bytes(n)}
    return b"".join(makers[kind](run, seed=i) for i, (kind, run) in
                    enumerate(striped_runs(size, seed)))


def gzip_dc(data: bytes) -> bytes:
    done = subprocess.run(["gzip", "-dc"], input=data, capture_output=True, check=True)
    return done.stdout


def plain_level_1_size(data: bytes, block_size: int) -> int:
    """Size of the same blocks as whole-block zlib level 1 members (the output before probing)."""
    return sum(len(gzip.compress(data[pos:pos + block_size], 1, mtime=0))
               for pos in range(0, len(data), block_size))


class CountingDeflaters:
    """Stands in for zlib.compressobj and counts the bytes every deflater is given."""

    def __init__(self) -> None:
        self.fed = []
        self._real = zlib.compressobj

    def __call__(self, *args, **kwargs):
        deflater, fed = self._real(*args, **kwargs), self.fed

        class Counted:
            def compress(self, data):
                fed.append(len(data))
                return deflater.compress(data)

            def flush(self, *mode):
                return deflater.flush(*mode)

        return Counted()


def assert_stored(blob: bytes, data: bytes, start: int) -> int:
    """Assert the segment at start is in blob as a 4 KiB probe and a verbatim stored rest."""
    rest = data[start + PROBE:start + SEGMENT]
    size = len(rest).to_bytes(2, "little")
    stored = b"\0" + size + (len(rest) ^ 0xFFFF).to_bytes(2, "little")  # BFINAL=0, BTYPE=00
    assert stored + rest in blob, f"segment at {start} is not stored"
    return blob.index(stored + rest)


@pytest.mark.parametrize("kind", ["random", "text", "striped"])
@pytest.mark.parametrize("size", [
    0, 1, PROBE - 1, PROBE, PROBE + 1, SEGMENT - 1, SEGMENT, SEGMENT + PROBE + 1,
    BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + SEGMENT + 777,
])
def test_gzip_probed_round_trip(kind, size):
    maker = {"random": random_data, "text": text_data, "striped": striped_data}[kind]
    data = maker(size, seed=size)
    blob = gzip_compress(data, block_size=BLOCK, threads=2)
    assert read_all(GzipDecompressor(io.BytesIO(blob))) == data
    assert gzip_dc(blob) == data
    assert len(member_offsets(blob)) == max(1, -(-size // BLOCK))
    assert gzip_compress(data, block_size=BLOCK, threads=1) == blob


def test_gzip_probed_is_deterministic_at_the_default_block_size():
    data = striped_data(3 * 1024 * 1024 + 4321, seed=31)
    first = gzip_compress(data)
    assert gzip_compress(data) == first
    assert gzip_compress(data, threads=1) == first
    with GzipBlockCompressor(TrickleSource(data), threads=2) as comp:
        assert read_all(comp, size=4097) == first
    assert gzip_dc(first) == data


def test_random_segments_are_stored_not_deflated(monkeypatch):
    data = random_data(3 * BLOCK + 1000, seed=37)
    counter = CountingDeflaters()
    monkeypatch.setattr(zlib, "compressobj", counter)
    blob = gzip_compress(data, block_size=BLOCK, threads=2)
    monkeypatch.undo()
    segments = -(-len(data) // SEGMENT)
    assert sum(counter.fed) <= segments * PROBE  # only the probes went through deflate
    assert len(blob) <= len(data) + 24 * segments + 32 * 4  # a few header bytes a segment
    assert len(blob) <= plain_level_1_size(data, BLOCK)
    last = -1
    for start in range(0, 3 * BLOCK, SEGMENT):
        pos = assert_stored(blob, data, start)
        assert pos > last
        last = pos
    assert gzip.decompress(blob) == data


def test_block_switches_between_deflated_and_stored(monkeypatch):
    text = text_data(100_000, seed=41)
    data = text + random_data(1024 * 1024 - 100_000, seed=43)  # one default-size block
    counter = CountingDeflaters()
    monkeypatch.setattr(zlib, "compressobj", counter)
    blob = gzip_compress(data, threads=1)
    monkeypatch.undo()
    assert len(member_offsets(blob)) == 1
    # Segment 1 (text, then random) shrank and segment 2 (random) did not: from 3 on, stored.
    assert sum(counter.fed) <= 3 * SEGMENT + 13 * PROBE
    for start in range(3 * SEGMENT, len(data), SEGMENT):
        assert_stored(blob, data, start)
    assert len(blob) < len(data) - 100_000 // 2
    # And back: zeros after random are deflated again from the next segment on.
    data = random_data(70_000, seed=47) + bytes(1024 * 1024 - 70_000)
    blob = gzip_compress(data, threads=1)
    assert len(blob) < 70_000 + 2 * SEGMENT  # stored: segment 0 and the rest of segment 1
    assert gzip_dc(blob) == data


def test_compressible_data_still_compresses():
    data = text_data(2 * 1024 * 1024 + 99, seed=53)
    blob = gzip_compress(data)
    assert len(blob) < 0.5 * len(data)
    # Probing and the sync flush every segment cost almost nothing on compressible data.
    assert len(blob) <= 1.005 * plain_level_1_size(data, compress.DEFAULT_BLOCK_SIZE)
    assert gzip.decompress(blob) == data


def test_compression_lost_where_random_data_ends_is_at_most_a_segment():
    size = 2 * 1024 * 1024 + 99
    data = striped_data(size, seed=61)
    blob = gzip_compress(data)
    random_runs = sum(kind == "random" for kind, _ in striped_runs(size, seed=61))
    assert random_runs > 5
    plain = plain_level_1_size(data, compress.DEFAULT_BLOCK_SIZE)
    # After random data ends, the rest of its segment is stored; the next one is probed anew.
    assert len(blob) <= plain + random_runs * SEGMENT
    assert len(blob) < 0.75 * len(data)
    assert gzip.decompress(blob) == data


@pytest.mark.parametrize("level", range(10))
def test_gzip_every_level_round_trips(level):
    data = striped_data(BLOCK + 3 * SEGMENT + 5, seed=59)
    blob = gzip_compress(data, level=level, block_size=BLOCK, threads=2)
    assert gzip_dc(blob) == data
    assert read_all(GzipDecompressor(io.BytesIO(blob))) == data
    zlib_header = gzip.compress(b"", level, mtime=0)[:10]
    for pos in member_offsets(blob):
        assert blob[pos:pos + 9] == zlib_header[:9]  # XFL says fastest or best as zlib does
        assert blob[pos + 9] in (3, zlib_header[9])  # OS: Unix
    if level == 0:
        assert len(blob) > len(data)  # level 0 stores even what compresses
    else:
        assert len(blob) < 0.8 * len(data)


def test_str_eof_from_source_is_accepted():
    data = mixed_data(BS * 2 + 5, seed=11)
    with GzipBlockCompressor(TrickleSource(data, eof=""), block_size=BS, threads=2) as comp:
        assert gzip.decompress(read_all(comp)) == data


@pytest.mark.parametrize("codec", ["gzip", "zstd", "none"])
def test_whole_stream_reads_are_refused(codec):
    if codec == "zstd" and not compress.zstd_available():
        pytest.skip("zstd binary not on PATH")
    with compressor(codec, io.BytesIO(b"abc")) as reader:
        for bad in (-1, None):
            with pytest.raises(ValueError, match="needs a size"):
                reader.read(bad)
        with pytest.raises(ValueError, match="needs a size"):
            reader.read()
        assert reader.read(0) == b""
        read_all(reader)
    with pytest.raises(ValueError, match="needs a size"):
        GzipDecompressor(io.BytesIO(b"")).read(-1)


def test_gzip_decompressor_bounds_each_read():
    zeros = 64 * 1024 * 1024
    blob = gzip_compress(bytes(zeros), level=9, threads=2)
    assert len(blob) < zeros // 500  # a small input that expands a lot: a zip bomb in miniature
    reader = GzipDecompressor(io.BytesIO(blob))
    total = 0
    while True:
        data = reader.read(65536)
        assert len(data) <= 65536
        if not data:
            break
        assert not data.strip(b"\0")
        total += len(data)
    assert total == zeros


@pytest.mark.parametrize("size", [1, 7, 1000, 4096])
def test_gzip_decompressor_small_reads(size):
    data = bytes(300_000) + mixed_data(200_000, seed=size)
    blob = gzip_compress(data, block_size=BS, threads=2)
    assert read_all(GzipDecompressor(TrickleSource(blob)), size=size) == data


@pytest.mark.parametrize("cut", [1, 5, 10, 200, -200, -8, -1])
def test_gzip_truncated_stream_is_an_error(cut):
    blob = gzip_compress(mixed_data(3 * BS, seed=13), block_size=BS, threads=2)
    assert cut % len(blob) not in member_offsets(blob)  # a cut at a boundary looks complete
    with pytest.raises(ValueError, match="truncated gzip stream"):
        read_all(GzipDecompressor(io.BytesIO(blob[:cut])))


def test_gzip_empty_source_is_truncated():
    with pytest.raises(ValueError, match="truncated gzip stream"):
        GzipDecompressor(io.BytesIO(b"")).read(10)


@pytest.mark.parametrize("blob", [
    b"this is not gzip at all " * 100,
    b"\x1f\x8b\x08\x00garbage after a good-looking magic number" * 10,
    bytes(1000),
])
def test_gzip_garbage_is_an_error(blob):
    with pytest.raises(ValueError, match="not a gzip stream"):
        read_all(GzipDecompressor(io.BytesIO(blob)))


def test_gzip_trailing_garbage_and_corruption_are_errors():
    data = mixed_data(3 * BS, seed=17)
    blob = gzip_compress(data, block_size=BS, threads=2)
    with pytest.raises(ValueError, match="not a gzip stream"):
        read_all(GzipDecompressor(io.BytesIO(blob + b"junk")))
    corrupt = bytearray(blob)
    corrupt[len(blob) // 6] ^= 0xFF  # inside the first (random, stored) block
    with pytest.raises(ValueError, match="not a gzip stream"):
        read_all(GzipDecompressor(io.BytesIO(bytes(corrupt))))


@pytest.mark.parametrize("threads", [1, 3])
def test_source_error_reaches_the_reader(threads):
    source = FailingSource(limit=5 * BS + 100)
    comp = GzipBlockCompressor(source, block_size=BS, threads=threads)
    with pytest.raises(OSError, match="disk on fire"):
        read_all(comp)
    with pytest.raises(OSError, match="disk on fire"):
        comp.read(10)  # and it stays failed instead of reporting a clean EOF
    comp.close()


def test_worker_error_reaches_the_reader(monkeypatch):
    real = compress._gzip_member
    calls = []

    def flaky(block, level):
        calls.append(len(block))
        if len(calls) == 3:
            raise MemoryError("worker out of memory")
        return real(block, level)

    monkeypatch.setattr(compress, "_gzip_member", flaky)
    comp = GzipBlockCompressor(io.BytesIO(mixed_data(8 * BS)), block_size=BS, threads=2)
    with comp, pytest.raises(MemoryError, match="worker out of memory"):
        read_all(comp)
    assert len(calls) >= 3


def test_closed_compressor_refuses_reads():
    comp = GzipBlockCompressor(io.BytesIO(mixed_data(4 * BS)), block_size=BS, threads=2)
    assert comp.read(100)
    comp.close()
    with pytest.raises(ValueError, match="closed"):
        comp.read(100)


class GeneratedSource:
    """64 MiB produced on demand; records the compressor's in-flight count at every read."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bytes_read = 0
        self.comp: GzipBlockCompressor | None = None
        self.in_flight_seen: list[int] = []
        self._pattern = mixed_data(1 << 20, seed=21)

    def read(self, size: int) -> bytes:
        if self.comp is not None:
            self.in_flight_seen.append(self.comp.in_flight)
        size = min(size, self.total - self.bytes_read, 300_000)
        start = self.bytes_read % len(self._pattern)
        data = (self._pattern[start:] + self._pattern)[:size]
        self.bytes_read += len(data)
        return data


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_compressor_holds_a_bounded_number_of_blocks(threads):
    total, block = 64 * 1024 * 1024, 1 << 20
    source = GeneratedSource(total)
    comp = GzipBlockCompressor(source, block_size=block, threads=threads)
    source.comp = comp
    reader = GzipDecompressor(comp)
    digest, produced, worst_lag = hashlib.sha256(), 0, 0
    while True:
        data = reader.read(block)
        if not data:
            break
        digest.update(data)
        produced += len(data)
        # raw bytes read ahead of what came out: queued blocks plus the one being handed out
        worst_lag = max(worst_lag, source.bytes_read - produced)
    comp.close()
    assert produced == total == source.bytes_read == comp.raw_bytes
    assert comp.max_in_flight == 2 * threads
    assert max(source.in_flight_seen) <= comp.max_in_flight
    assert worst_lag <= (comp.max_in_flight + 1) * block
    assert worst_lag >= comp.max_in_flight * block - 300_000  # the pipeline did fill up
    expected = hashlib.sha256()
    for start in range(0, total, len(source._pattern)):
        expected.update(source._pattern)
    assert digest.hexdigest() == expected.hexdigest()


@needs_zstd
@pytest.mark.parametrize("size", [0, 1, 100_000, 3 * 1024 * 1024 + 5])
def test_zstd_round_trip(size):
    data = mixed_data(size, seed=size)
    with ZstdCompressor(TrickleSource(data), level=3) as comp:
        blob = read_all(comp, size=50_000)
        assert comp.raw_bytes == size
    assert blob[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    done = subprocess.run(["zstd", "-q", "-d", "-c"], input=blob, capture_output=True, check=True)
    assert done.stdout == data
    with ZstdDecompressor(io.BytesIO(blob)) as dec:
        assert read_all(dec) == data
    with compressor("zstd", io.BytesIO(data), level=1, threads=2) as comp:
        assert read_all(decompressor("zstd", io.BytesIO(read_all(comp)))) == data


@needs_zstd
@pytest.mark.parametrize("blob", [b"definitely not zstd" * 50, "truncated"])
def test_zstd_bad_input_is_a_runtime_error(blob):
    if blob == "truncated":
        with ZstdCompressor(io.BytesIO(mixed_data(500_000))) as comp:
            blob = read_all(comp)[:-100]
    dec = ZstdDecompressor(io.BytesIO(blob))
    with pytest.raises(RuntimeError, match=r"zstd -q -d -c exited with \d+: .+"):
        read_all(dec)
    assert dec._proc.returncode not in (None, 0)
    dec.close()


@needs_zstd
def test_zstd_source_error_reaches_the_reader():
    comp = ZstdCompressor(FailingSource(limit=3 * 1024 * 1024))
    with pytest.raises(OSError, match="disk on fire"):
        read_all(comp)
    assert comp._proc.returncode is not None
    comp.close()


@needs_zstd
def test_zstd_close_mid_stream_reaps_the_child():
    source = GeneratedSource(1 << 40)  # far more than will ever be read
    comp = ZstdCompressor(source)
    assert comp.read(1000)
    comp.close()
    assert comp._proc.returncode is not None
    assert not comp._feeder.is_alive()
    assert comp.read(1000) == b""
    assert source.bytes_read < 1 << 30


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="zstd level"):
        ZstdCompressor(io.BytesIO(b""), level=25)
    with pytest.raises(ValueError, match="gzip level"):
        GzipBlockCompressor(io.BytesIO(b""), level=11)
    with pytest.raises(ValueError, match="threads"):
        GzipBlockCompressor(io.BytesIO(b""), threads=0)


def test_none_is_a_passthrough():
    data = mixed_data(500_000, seed=23)
    with compressor("none", TrickleSource(data)) as reader:
        assert read_all(reader) == data
        assert reader.raw_bytes == len(data)
    with decompressor("none", io.BytesIO(data)) as reader:
        assert read_all(reader, size=4096) == data


def test_factory_returns_gzip_by_default_level():
    data = mixed_data(BS, seed=29)
    with compressor("gzip", io.BytesIO(data), threads=2) as comp:
        assert isinstance(comp, GzipBlockCompressor)
        blob = read_all(comp)
    assert blob == gzip_compress(data, level=1, threads=1)
    with decompressor("gzip", io.BytesIO(blob)) as dec:
        assert read_all(dec) == data
