"""Each table once, and nothing of an ended upload left in the server's memory."""

from __future__ import annotations

import ast
import uuid
from pathlib import Path

from test_server_api import server, upload  # noqa: F401 (server: a fixture)
from zfsmgr import compress, crypt, files, protocol
from zfsmgr.restore.save import wanted_codec
from zfsmgr.settings import as_encryption

PACKAGE = Path(__file__).resolve().parent.parent / "zfsmgr"


def _assignments(name: str):
    """Every module-level assignment of `name` in the package."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                found.append(str(path.relative_to(PACKAGE)))
    return found


def test_each_shared_constant_is_defined_once():
    for name in ("CHUNK", "COMPRESSIONS", "TIMESTAMP_FORMAT", "PROPS", "PROPERTY_PREFIX",
                 "HEADER_SHA256", "HEADER_COMPRESSION", "HEADER_STORED_SIZE", "BACKENDS",
                 "ENCRYPTIONS"):
        assert len(_assignments(name)) == 1, (name, _assignments(name))
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for text in ('"%Y-%m-%d_%H:%M:%S"', '"%Y-%m-%d %H:%M:%S UTC"', '"org.zfsmgr:"'):
        assert sources.count(text) == 1, text  # the key stamp, the stamp people read
    for name in ("write_atomic", "fsync_dir"):
        defined = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if f"def {name}(" in p.read_text()]
        assert defined == ["files.py"], defined


def test_the_codec_table_is_protocols():
    assert compress.CODECS == tuple(protocol.COMPRESSIONS)
    for codec, ext in protocol.COMPRESSIONS.items():
        assert compress.extension(codec) == ext
        assert wanted_codec(f"/tmp/x{ext}") == codec
    assert wanted_codec("x.gz") == "gzip" and wanted_codec("x.zst") == "zstd"
    assert wanted_codec("x.tar") is None
    assert files.CHUNK == 1 << 20


def test_the_encryption_methods_are_protocols():
    assert crypt.METHODS == ("none", "age") and set(protocol.ENCRYPTIONS) == {"", "age"}
    for method in crypt.METHODS:
        assert crypt.Encryption(method, ("age1x",)).label in protocol.ENCRYPTIONS
        assert as_encryption(method) == method


def test_an_ended_upload_leaves_no_lock_behind(server):  # noqa: F811
    ctx, app = server
    code, body, session = upload(app, "alice", b"y" * 3000)
    assert code == 200, body
    assert ctx.uploads._session_locks == {}


def test_the_local_store_remembers_only_the_last_discarded_uploads(tmp_path):
    from zfsmgr.storage.zfslocal import DISCARDED_KEPT, ZfsLocalStore

    store = ZfsLocalStore("tank/base", str(tmp_path))
    ids = [uuid.uuid4().hex for _ in range(DISCARDED_KEPT + 50)]
    for upload_id in ids:
        store.discard(upload_id)  # unknown uploads: only remembered, nothing to undo
    assert len(store._discarded) == DISCARDED_KEPT
    assert ids[-1] in store._discarded and ids[0] not in store._discarded


def test_the_directory_store_vouches_only_for_uploads_that_exist(tmp_path):
    from zfsmgr.storage.directory import DirectoryStore

    store = DirectoryStore(str(tmp_path))
    for _ in range(20):
        assert store.staged_parts(uuid.uuid4().hex) == []
    assert store.staging._checked == set() and store.staging._locks == {}
