"""Properties of streams sent without `-p` travel as a record: zfs-fuse sources to the dir, S3
and `local` stores, a tree restored with `--recursive` file by file and property by property;
the server refuses hostile records and stores nothing of them; SEND_PROPERTIES=false sends none;
a property the restoring host's zfs refuses is a warning, not a failed restore."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hostile
import rig
from test_many_datasets import backup_json, env_for, make_tree, restore_run, tree_server, zfs
from test_tree_restore import files
from zfsmgr import properties
from zfsmgr.errors import ValidationError

COMPARED = ("compression", "recordsize", "atime", "checksum", "org.example:owner",
            "org.zfsmgr:backup")


def own(dataset):
    """{property: value} of the properties set on the dataset itself."""
    out = zfs("get", "-Hp", "-s", "local,received", "-o", "property,value", "all", dataset)
    return {k: v for k, v in (line.split("\t") for line in out.splitlines()) if k in COMPARED}


def shown(dataset):
    """{property: value} of the compared properties, wherever their value comes from."""
    out = zfs("get", "-Hp", "-o", "property,value", ",".join(COMPARED), dataset)
    return dict(line.split("\t") for line in out.splitlines())


def catalog(server):
    status, answer, _ = hostile.request(server.url, "GET", "/snapshots", None,
                                        hostile.auth_of(server.client_env))
    assert status == 200, answer
    return answer["snapshots"]


# --- the record's rules (pure) -------------------------------------------------------------

def test_the_record_keeps_own_settable_properties_and_leaves_out_the_rest():
    warned = []
    listing = {"compression": ("gzip", "local"), "recordsize": ("16384", "received"),
               "atime": ("on", "default"), "checksum": ("on", "inherited from tank"),
               "mountpoint": ("/srv", "local"), "sharenfs": ("on", "local"),
               "used": ("1234", "local"), "org.example:owner": ("ann", "local"),
               "org.example:tab": ("a\tb", "local"), "org.example:long": ("x" * 2000, "local")}
    got = properties.record(listing, warned.append)
    assert got == {"compression": "gzip", "recordsize": "16384", "org.example:owner": "ann"}
    # never recorded is no news; what zfs had but the record cannot hold is
    assert len(warned) == 3 and not any("mountpoint" in w or "sharenfs" in w for w in warned)
    many = {f"org.example:p{i:03d}": ("v" * 60, "local") for i in range(100)}
    full = properties.record(many, warned.append)
    assert properties.size(full) <= properties.MAX_RECORD_BYTES
    assert len(full) <= properties.MAX_PROPERTIES
    assert properties.validate(full) == full


@pytest.mark.parametrize("record", [
    "compression=gzip", ["compression", "gzip"], {"compression": 9},
    {"mountpoint": "/etc"}, {"sharenfs": "rw"}, {"zoned": "on"}, {"used": "1"},
    {"Compression": "gzip"}, {"org.Example:owner": "x"}, {"../x": "y"}, {"a b": "c"},
    {"org.example:owner": "a\nb"}, {"org.example:owner": "a\x00b"}, {"org.example:o": ""},
    {"org.example:owner": "x" * 1025}, {f"org.example:p{i}": "v" for i in range(65)},
    {"org.zfsmgr:kind": "backup"}, {"org.zfsmgr:bases": "0123abcd"}, {"org.zfsmgr:base": "yes"},
    {f"org.example:p{i}": "v" * 1000 for i in range(5)}, {"x" * 70: "on"},
])
def test_hostile_records_are_refused(record):
    with pytest.raises(ValidationError):
        properties.validate(record)


SOURCES = ["local", "received", "default", "inherited from tank", "-"]


@given(st.dictionaries(st.text(st.sampled_from("abz09_.:-A \t\n"), min_size=1, max_size=80),
                       st.tuples(st.text(max_size=1500), st.sampled_from(SOURCES)),
                       max_size=120))
@settings(max_examples=200, deadline=None)
def test_every_record_the_client_makes_is_one_the_server_takes(listing):
    made = properties.record(listing)
    assert properties.validate(made) == made
    assert all(listing[name] == (value, listing[name][1]) for name, value in made.items())


def test_the_record_is_kept_with_the_manifest_and_survives_a_reindex(tmp_path):
    from test_catalog import _clients, _context
    from test_server_api import auth, call, upload
    from zfsmgr.server.app import make_app
    from zfsmgr.server.commands import reindex

    _clients(tmp_path, quota=0)
    ctx = _context(tmp_path)
    record = {"compression": "gzip", "org.example:owner": "ann"}
    assert upload(make_app(ctx), "alice", b"stream", properties=record)[0] == 200
    assert upload(make_app(ctx), "alice", b"other", when=1700000100)[0] == 200
    code, body, _ = call(make_app(ctx), "GET", "/snapshots", headers=auth("alice"))
    assert code == 200
    assert [m["properties"] for m in json.loads(body)["snapshots"]] == [record, None]
    assert reindex(ctx) == 0
    assert [m.properties for m in _context(tmp_path).catalog.list("alice")] == [record, None]


# --- on zfs-fuse, through the server ---------------------------------------------------------

@pytest.mark.zfs
@pytest.mark.parametrize("storage", ["dir", pytest.param("s3", marks=pytest.mark.s3), "local"])
def test_a_zfs_fuse_tree_restores_property_by_property(storage, pool, server_factory,
                                                       run_zfsmgr):
    server = tree_server(storage, pool, server_factory)
    root = make_tree(pool)  # a: compression=gzip-3, b: recordsize=16K, a/x: owner=ann
    zfs("set", "compression=gzip", root)
    zfs("set", "checksum=sha256", f"{root}/a/x")
    zfs("set", "atime=off", f"{root}/b")
    env = env_for(server, root)
    chosen = [root, f"{root}/a", f"{root}/a/x", f"{root}/b", f"{root}/c/on"]
    first = backup_json(run_zfsmgr, env)
    assert first["failed"] == 0 and first["sent"] == len(chosen)
    records = {m["dataset"]: m["properties"] for m in catalog(server)}
    assert records[root] == {"compression": "gzip"}
    assert records[f"{root}/a/x"] == {"checksum": "sha256", "org.example:owner": "ann"}
    assert records[f"{root}/b"] == {"atime": "off", "recordsize": "16384"}
    assert f"{root}/skip" not in records  # the excluded subtree: nothing at all

    # the second run's record wins: the restored snapshot's, not the chain's first
    zfs("set", "org.example:owner=bob", f"{root}/a/x")
    rig.write_files(pool.mountpoint(f"{root}/a/x"), seed=88, count=1, size=30_000)
    second = backup_json(run_zfsmgr, env)
    assert {d["dataset"]: d["status"] for d in second["datasets"]}[f"{root}/a/x"] == \
        "incremental"
    expected = {d: (own(d), shown(d), files(pool, d)) for d in chosen}
    assert expected[f"{root}/a/x"][0]["org.example:owner"] == "bob"

    if storage == "local":  # the server received the streams and applied none of it
        base = f"{pool.name}/srvbase"
        got = zfs("get", "-Hp", "-r", "-s", "local", "-o", "name,property,value",
                  "compression,recordsize,atime,checksum,org.example:owner", base)
        assert got.strip() == "", got
        for name in zfs("list", "-H", "-o", "name", "-r", base).split()[1:]:
            depth = name[len(base):].count("/")
            if depth == 3:  # BASE/<client>/<token>/<chain>
                assert zfs("get", "-H", "-o", "value", "canmount", name).strip() == "off"
            assert zfs("get", "-H", "-o", "value", "mounted", name).strip() == "no"

    target = f"{pool.name}/back"
    done = run_zfsmgr(["restore", "latest", target, "--recursive", "--source-dataset", root],
                      env=server.client_env)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    for d in chosen:
        copy = target + d[len(root):]
        assert own(copy) == expected[d][0], (d, own(copy))  # set on it, as on the source
        assert shown(copy) == expected[d][1], d  # and what it inherits, too
        assert files(pool, copy) == expected[d][2], d

    # `latest --all`: every dataset as POOL/TARGET/<source>, each with its record
    every = f"{pool.name}/every"
    done = run_zfsmgr(["restore", "latest", "--all", every], env=server.client_env)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    for d in chosen:
        assert own(f"{every}/{d}") == expected[d][0], d
    # `restore N --recursive` of the first run: that run's record (the owner was ann then)
    then = f"{pool.name}/then"
    restore_run(run_zfsmgr, server, root, first["snapshot"], then)
    assert own(f"{then}/a/x") == {"checksum": "sha256", "org.example:owner": "ann"}


@pytest.mark.zfs
def test_send_properties_false_sends_no_record(pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    root = pool.create("plain")
    zfs("set", "compression=gzip", root)
    zfs("set", "org.example:owner=ann", root)
    rig.write_files(pool.mountpoint(root), seed=3, count=1, size=20_000)
    env = {**server.client_env, "LOCAL_DATASET": root, "SEND_PROPERTIES": "false"}
    backup_json(run_zfsmgr, env)
    assert [m["properties"] for m in catalog(server)] == [None]
    target = f"{pool.name}/back"
    done = run_zfsmgr(["restore", "latest", target], env=server.client_env)
    assert done.returncode == 0, done.stderr
    assert own(target) == {}  # nothing travelled
    # with the default, the same dataset's next backup carries its record
    rig.write_files(pool.mountpoint(root), seed=5, count=1, size=20_000)
    time.sleep(1.1)
    backup_json(run_zfsmgr, {**env, "SEND_PROPERTIES": "true"})
    assert [m["properties"] for m in catalog(server)] == [
        None, {"compression": "gzip", "org.example:owner": "ann"}]


def _upload(server, dataset, snapshot_time, stream, record):
    """Open an upload of `stream` with `record`; (status, answer) of the open, or of the
    commit when the open succeeded."""
    auth = hostile.auth_of(server.client_env)
    status, session, _ = hostile.request(server.url, "POST", "/upload", {
        "dataset": dataset, "snapshot": "zfsmgr_2026-01-01_00:00:00", "type": "full",
        "compression": "none", "snapshot_time": snapshot_time,
        "estimated_size": len(stream), "properties": record}, auth)
    if status != 200:
        return status, session
    statuses, declaration = hostile.send_parts(server.url, auth, session, stream)
    assert set(statuses) == {200}, statuses
    return hostile.commit(server.url, auth, session, declaration)


@pytest.mark.zfs
def test_hostile_records_get_400_and_a_refused_property_is_a_restore_warning(
        pool, server_factory, run_zfsmgr):
    server = server_factory("dir")
    source = pool.create("src")
    rig.write_files(pool.mountpoint(source), seed=4, count=1, size=20_000)
    zfs("snapshot", f"{source}@zfsmgr_2026-01-01_00:00:00")
    stream = subprocess.run(["zfs", "send", f"{source}@zfsmgr_2026-01-01_00:00:00"],
                            check=True, capture_output=True).stdout
    for bad in ({"mountpoint": "/etc"}, {"org.example:x": "a\nb"}, {"org.example:x": "a\0b"},
                {f"org.example:p{i}": "v" * 900 for i in range(6)},
                {f"org.example:p{i}": "v" for i in range(200)}, {"Bad Name": "x"},
                "compression=gzip"):
        status, answer = _upload(server, "tank/data", 1767225600, stream, bad)
        assert status == 400 and not answer["success"], (bad, status, answer)
    assert catalog(server) == []
    stored = [p for p in server.storage_dir.rglob("*") if p.is_file()]
    assert stored == [], stored

    # a record this host's zfs cannot take in part: dnodesize is OpenZFS's, zstd too
    record = {"compression": "gzip-2", "dnodesize": "auto", "org.example:owner": "eve",
              "checksum": "nope"}
    status, answer = _upload(server, "tank/data", 1767225600, stream, record)
    assert status == 200, answer
    assert [m["properties"] for m in catalog(server)] == [record]
    target = f"{pool.name}/got"
    done = run_zfsmgr(["restore", "latest", target], env=server.client_env)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and any("dnodesize=auto" in w for w in warnings) and \
        any("checksum=nope" in w for w in warnings), done.stderr
    assert own(target) == {"compression": "gzip-2", "org.example:owner": "eve"}
    assert files(pool, target) == files(pool, source)
    assert json.loads(run_zfsmgr(["restore", "list", "--json"], env=server.client_env,
                                 check=True).stdout)[0]["properties"] == record

    # --force: the record goes on the temporary sibling, which then replaces the target
    zfs("set", "compression=off", target)
    zfs("inherit", "org.example:owner", target)
    again = run_zfsmgr(["restore", "latest", target, "--force"], env=server.client_env)
    assert again.returncode == 0, again.stderr
    assert own(target) == {"compression": "gzip-2", "org.example:owner": "eve"}
    assert set(zfs("list", "-H", "-o", "name", "-r", pool.name).split()) == {
        pool.name, source, target}  # no temporary sibling left
