"""Property tests (hypothesis) of the pure parts: rotation under quota never breaks a chain,
storage keys round-trip, part schedules carry what they promise, chain_for over random parent
graphs, and the parallel gzip block format."""

from __future__ import annotations

import gzip
import io
import types
import zlib
from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zfsmgr import protocol
from zfsmgr.compress import GzipBlockCompressor, GzipDecompressor
from zfsmgr.errors import BrokenChain
from zfsmgr.protocol import Manifest
from zfsmgr.restore.chain import chain_for
from zfsmgr.retention import RetentionPolicy
from zfsmgr.server.rotation import parent_key, plan_rotation
from zfsmgr.server.uploads import Uploads

BASE = datetime(2024, 2, 13, tzinfo=timezone.utc)
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _manifest(dataset, index, when, parent, size=1000, alone=False, guid="", parent_guid=""):
    stamp = protocol.format_timestamp(BASE + timedelta(seconds=when))
    token = protocol.dataset_token(dataset)
    return Manifest(key=f"c/{token}_{stamp}.zfs.gz", client_id="c", dataset=dataset,
                    snapshot=f"s{index}", type="incremental" if parent else "full",
                    parent=parent, compression="gzip", raw_size=size, stored_size=size,
                    sha256="0" * 64, created="2024-02-13T00:00:00+00:00",
                    snapshot_time=(BASE + timedelta(seconds=when)).timestamp(), guid=guid,
                    parent_guid=parent_guid, self_contained=alone)


# -- rotation: retention plus quota never leaves a kept backup without its base ------------

@st.composite
def fleets(draw):
    backups = []
    for dataset in draw(st.lists(st.sampled_from(["tank/a", "tank/b", "pool/c"]),
                                 min_size=1, max_size=3, unique=True)):
        when = 0
        for index in range(draw(st.integers(1, 12))):
            when += draw(st.integers(60, 40 * 86400))
            full = index == 0 or draw(st.booleans())
            parent = None if full else f"s{draw(st.integers(0, index - 1))}"
            backups.append(_manifest(dataset, index, when, parent,
                                     size=draw(st.integers(1, 10_000)),
                                     alone=not full and draw(st.booleans())))
    policy = RetentionPolicy(*(draw(st.integers(0, 4)) for _ in range(4)))
    total = sum(m.stored_size for m in backups)
    quota = draw(st.integers(0, total * 2))
    needed = draw(st.integers(0, total))
    keep = draw(st.none() | st.sampled_from([m.key for m in backups]))
    now = max(m.snapshot_time for m in backups) + draw(st.integers(0, 90 * 86400))
    return backups, policy, quota, needed, keep, now


@FAST
@given(fleets())
def test_rotation_under_quota_never_breaks_a_chain(scenario):
    backups, policy, quota, needed, keep, now = scenario
    result = plan_rotation(backups, policy, now, quota=quota, needed=needed, keep=keep)
    kept = {m.key for m in result.keep}
    deleted = [m.key for m in result.delete]
    assert kept.isdisjoint(deleted) and kept | set(deleted) == {m.key for m in backups}
    for m in result.keep:  # a kept backup's base is kept
        parent = parent_key(m, backups)
        assert parent is None or parent in kept, (m.key, parent)
    for dataset in {m.dataset for m in backups}:  # the newest of each dataset stays
        newest = max((m for m in backups if m.dataset == dataset),
                     key=lambda m: m.snapshot_time)
        assert newest.key in kept
    assert keep is None or keep in kept
    position = {key: i for i, key in enumerate(deleted)}
    for m in result.delete:  # children go before their parents
        parent = parent_key(m, backups)
        if parent in position:
            assert position[m.key] < position[parent]
    used = sum(m.stored_size for m in result.keep)
    if quota:
        assert result.enough == (used + needed <= quota)


# -- keys ------------------------------------------------------------------------------------

client_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
components = st.from_regex(r"[A-Za-z0-9_.:][A-Za-z0-9_.:-]{0,12}", fullmatch=True).filter(
    lambda c: c not in (".", ".."))
datasets = st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True),
                     st.lists(components, max_size=3)).map(lambda t: "/".join([t[0], *t[1]]))
moments = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2099, 12, 31),
                       timezones=st.just(timezone.utc)).map(lambda d: d.replace(microsecond=0))


@FAST
@given(client_ids, datasets, moments, st.sampled_from(sorted(protocol.COMPRESSIONS)),
       st.sampled_from(sorted(protocol.ENCRYPTIONS)))
def test_keys_build_and_parse_round_trip(client, dataset, moment, codec, encryption):
    stamp = protocol.format_timestamp(moment)
    assert protocol.parse_timestamp(stamp) == moment
    key = protocol.build_key(client, dataset, stamp, codec, encryption=encryption)
    parsed = protocol.parse_key(key)
    assert (parsed.client_id, parsed.dataset_token, parsed.timestamp, parsed.compression,
            parsed.encryption) == (client, protocol.dataset_token(dataset), stamp, codec,
                                   encryption)
    assert str(parsed) == key
    assert protocol.key_stem(key) == f"{client}/{protocol.dataset_token(dataset)}_{stamp}"


# -- part sizes ------------------------------------------------------------------------------

@FAST
@given(st.integers(1, 64 << 20), st.integers(1, 3000), st.integers(1, 3000))
def test_part_sizes_grow_to_their_cap_and_add_up_to_the_capacity(base, every, parts):
    sizes = [protocol.part_size(i, base, every) for i in range(parts)]
    assert sizes[0] == min(base, protocol.MAX_PART_SIZE)
    assert all(a <= b <= protocol.MAX_PART_SIZE for a, b in zip(sizes, sizes[1:]))
    assert all(b in (a, 2 * a, protocol.MAX_PART_SIZE) for a, b in zip(sizes, sizes[1:]))
    assert protocol.schedule_capacity(base, every, parts) == sum(sizes)


@FAST
@given(st.integers(1, 64 << 20), st.sampled_from([1000, 10000]), st.integers(0, 6 << 40),
       st.sampled_from([1, protocol.MIN_S3_PART_SIZE]))
def test_the_schedule_of_an_upload_carries_twice_its_estimate(part_base, max_parts, estimate,
                                                              minimum):
    uploads = types.SimpleNamespace(part_base=part_base, max_parts=max_parts)
    store = types.SimpleNamespace(min_part_size=minimum)
    base, every = Uploads.schedule(uploads, store, estimate)
    assert base >= max(part_base, minimum) and every >= 1
    capacity = protocol.schedule_capacity(base, every, max_parts)
    assert capacity >= 2 * estimate or base >= protocol.MAX_PART_SIZE
    if base > max(part_base, minimum):  # doubled only while it was needed
        assert protocol.schedule_capacity(base // 2, every, max_parts) < 2 * estimate


# -- chains ------------------------------------------------------------------------------------

@st.composite
def parent_graphs(draw):
    count = draw(st.integers(1, 10))
    manifests = []
    for index in range(count):
        parent = draw(st.none() | st.sampled_from([f"s{i}" for i in range(count)] + ["gone"]))
        guids = st.sampled_from(["", "1", "2"])
        manifests.append(_manifest("tank/a", index, draw(st.integers(0, 10_000)) * 60 + index,
                                   parent, alone=draw(st.booleans()) and parent is not None,
                                   guid=draw(guids), parent_guid=draw(guids)))
    if draw(st.booleans()):  # an incremental that records no parent
        broken = _manifest("tank/a", count, 10_000 * 60 + count, "x")
        manifests.append(Manifest(**{**broken.to_dict(), "parent": None}))
    return manifests, draw(st.sampled_from(manifests))


@FAST
@given(parent_graphs())
def test_chain_for_over_random_parent_graphs(graph):
    manifests, target = graph
    try:
        chain = chain_for(manifests, target)
    except BrokenChain as exc:
        assert target.dataset in str(exc) and not target.restores_alone
        return
    assert chain[-1] == target and chain[0].restores_alone
    assert len({m.key for m in chain}) == len(chain)  # no loop
    assert not any(m.restores_alone for m in chain[1:])
    for base, child in zip(chain, chain[1:]):
        assert child.parent == base.snapshot and child.dataset == base.dataset
        assert base.snapshot_time <= child.snapshot_time
        if child.parent_guid and base.guid:
            assert child.parent_guid == base.guid
    if target.restores_alone:
        assert chain == [target]


# -- the gzip block format -------------------------------------------------------------------

pieces = st.one_of(st.binary(max_size=3000), st.integers(1, 20_000).map(lambda n: b"\0" * n),
                   st.text(max_size=200).map(lambda s: s.encode() * 20))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(pieces, max_size=12).map(b"".join), st.integers(1, 70_000),
       st.integers(0, 9), st.integers(1, 3))
def test_gzip_blocks_are_standard_deterministic_members(data, block, level, threads):
    def compress(threads):
        with GzipBlockCompressor(io.BytesIO(data), level=level, block_size=block,
                                 threads=threads) as comp:
            return b"".join(iter(lambda: comp.read(1 << 16), b""))

    out = compress(threads)
    assert gzip.decompress(out) == data  # any gunzip reads it
    assert out == compress(1)  # the same bytes whatever the threads: resumable uploads
    members, rest = 0, out
    while rest:  # independent members, one per block (at least one)
        inflater = zlib.decompressobj(31)
        inflater.decompress(rest)
        assert inflater.eof
        rest, members = inflater.unused_data, members + 1
    assert members == max(1, -(-len(data) // block))
    reader = GzipDecompressor(io.BytesIO(out))
    assert b"".join(iter(lambda: reader.read(4096), b"")) == data
