"""The seed README's own examples, verbatim, on every store: its server `.env`, client `.env`,
restore `.env` and `clients.json` are read out of its fenced blocks (tests/fixtures holds a
byte-for-byte copy of the seed README) with only endpoints, credentials, hashes, pool names and
the store under test substituted; then every seed command and endpoint runs against a server
started from the built .pyz, and `/rotation-policy` is compared field by field with the seed's
response. The README's cron line runs under `env -i PATH=/usr/bin:/bin`."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

import rig
from zfsmgr.zfs import Zfs

pytestmark = [pytest.mark.zfs]

SEED = Path(__file__).parent / "fixtures" / "seed-README.md"
SEED_SHA256 = "c0dd13f53726928ce989691585a0329dee599c6ad46f813123f38341dc3026aa"
SEED_ORIGINAL = Path("/work/shared/seed/README.md")  # where the development machines keep it
SEED_KEY = "secret123"  # the raw key of the seed's example; its hash is what the seed shows


def blocks(text: str):
    """(heading, language, body) of every fenced block, under the last heading above it."""
    found, heading, lang, body = [], "", None, []
    for line in text.splitlines():
        if lang is None and line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        elif line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                found.append((heading, lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return found


def block(heading: str, lang: str, index: int = 0) -> str:
    matches = [b for h, lg, b in blocks(SEED.read_text()) if h == heading and lg == lang]
    return matches[index]


def seed_commands():
    """Every `zfs-client …` / `zfs-restore …` line of the seed's bash blocks, in order."""
    lines = []
    for _, lang, body in blocks(SEED.read_text()):
        if lang == "bash":
            lines += [ln.strip() for ln in body.splitlines()
                      if re.match(r"^zfs-(client|restore) ", ln.strip())]
    return lines


def seed_endpoints():
    """The seven endpoints the seed's server section lists: [(method, path)]."""
    body = block("Server", "bash")
    return re.findall(r"^# (GET|POST) (/\S*)", body, re.M)


def substitute(text: str, values: dict) -> str:
    """Replace `KEY=...` lines of a seed .env block (comments and order stay as written)."""
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0]
        out.append(f"{key}={values[key]}" if "=" in line and key in values else line)
    return "\n".join(out) + "\n"


def test_the_fixture_is_the_seed_readme_byte_for_byte():
    data = SEED.read_bytes()
    assert hashlib.sha256(data).hexdigest() == SEED_SHA256
    if SEED_ORIGINAL.exists():  # on the development machines: still the same seed
        assert SEED_ORIGINAL.read_bytes() == data


def test_the_seed_lists_what_this_module_runs():
    assert [c.split()[1] for c in seed_commands() if c.startswith("zfs-client")] == [
        "backup", "backup-full", "backup-incremental", "snapshot", "snapshot", "snapshot",
        "snapshot", "rotate", "rotate-remote", "status", "bookmarks", "help"]
    assert [c.split()[1] for c in seed_commands() if c.startswith("zfs-restore")] == [
        "list", "restore", "restore", "latest", "save", "mount"]
    assert seed_endpoints() == [
        ("POST", "/upload"), ("POST", "/upload-stream/"), ("GET", "/status"),
        ("POST", "/rotate"), ("GET", "/download"), ("GET", "/rotation-policy"),
        ("GET", "/health")]
    # the seed's own claim: its example hash is the SHA-256 of secret123
    assert hashlib.sha256(SEED_KEY.encode()).hexdigest() in SEED.read_text()


def test_the_readmes_examples_are_the_seeds():
    ours = [(lang, body) for _, lang, body in blocks((rig.ROOT / "README.md").read_text())]
    for heading, lang in (("Server Configuration", "env"), ("Client Configuration", "env"),
                          ("Restore Tool Configuration", "env"),
                          ("Client Configuration File", "json")):
        assert (lang, block(heading, lang)) in ours, heading


class SeedSite:
    """The seed's example files written to a server dir, a client dir and a restore dir."""

    def __init__(self, root: Path, pool, store: str, s3: dict):
        self.root, self.pool, self.store = root, pool, store
        self.port = rig.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server_dir, self.client_dir, self.restore_dir = (
            root / "server", root / "client", root / "restore")
        for folder in (self.server_dir, self.client_dir, self.restore_dir):
            folder.mkdir()
        self.base = f"{pool.name}/backup"  # the seed's `backup`, in a pool of the test's own
        (self.server_dir / ".env").write_text(substitute(
            block("Server Configuration", "env"), {
                "S3_ENDPOINT": s3["endpoint"], "S3_ACCESS_KEY": s3["access_key"],
                "S3_SECRET_KEY": s3["secret_key"], "S3_BUCKET": s3["bucket"],
                "S3_USE_SSL": "false", "ZFS_BASE_DATASET": self.base,
                "PORT": str(self.port)}))
        clients = block("Client Configuration File", "json")
        clients = clients.replace('"hashed_key"', json.dumps(
            hashlib.sha256(SEED_KEY.encode()).hexdigest()))
        clients = clients.replace('"backup/client1"', json.dumps(f"{self.base}/client1"))
        clients = clients.replace('"storage_type": "s3"', f'"storage_type": "{store}"')
        (self.server_dir / "clients.json").write_text(clients)
        self.dataset = f"{pool.name}/data"  # the seed's tank/data
        (self.client_dir / ".env").write_text(substitute(
            block("Client Configuration", "env"), {
                "SERVER_URL": self.url, "LOCAL_DATASET": self.dataset, "STORAGE_TYPE": store}))
        (self.restore_dir / ".env").write_text(substitute(
            block("Restore Tool Configuration", "env"), {"SERVER_URL": self.url}))
        self.state = {"STATE_DIR": str(root / "state")}  # not the tester's home

    def command(self, line: str) -> list:
        """A seed command line as zfsmgr's argv (pool and mount point are the test's own)."""
        program, *args = line.split()
        group = {"zfs-client": "client", "zfs-restore": "restore"}[program]
        mapped = []
        for arg in args:
            if arg.startswith("tank/"):
                arg = f"{self.pool.name}/{arg[5:]}"
            elif arg == "/mnt/restore":
                arg = str(self.root / "mnt-restore")
            mapped.append(arg)
        return [group, *mapped]

    def run(self, line: str):
        argv = self.command(line)
        cwd = self.client_dir if argv[0] == "client" else self.restore_dir
        done = rig.run_zfsmgr(argv, env=self.state, cwd=cwd)
        assert done.returncode == 0, f"{line}: {done.stdout}\n{done.stderr}"
        return done


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, json.loads(answer.read())


@pytest.mark.parametrize("store", ["dir", pytest.param("s3", marks=pytest.mark.s3), "local"])
def test_every_seed_command_and_endpoint_works_verbatim(store, pool, s3, tmp_path, pyz):
    site = SeedSite(tmp_path, pool, store, s3)
    rig.sh("zfs", "create", "-o", "mountpoint=none", site.base)
    rig.sh("zfs", "create", site.dataset)
    mnt = pool.mountpoint(site.dataset)
    server = rig.ServerProcess(site.server_dir, {"PORT": str(site.port)}).start()
    try:
        status, health = get_json(site.url.replace("127.0.0.1", "localhost") + "/health")
        assert status == 200 and health["success"] is True, health
        query = re.search(r"GET (/rotation-policy\?\S+)", block("API Endpoint", "bash"))
        status, policy = get_json(site.url + query.group(1))
        expected = json.loads(block("API Endpoint", "json"))
        assert status == 200 and set(policy) == set(expected)
        for field in expected:  # field by field, nested ones too
            assert policy[field] == expected[field], field

        commands = seed_commands()
        digests = {}
        for line in commands:
            words = line.split()
            if words[0] == "zfs-client" and words[1].startswith("backup"):
                digests[words[1]] = rig.write_files(mnt, seed=len(digests), count=2,
                                                    size=100_000)
                done = site.run(line)
                kind = {"backup": "full", "backup-full": "full",
                        "backup-incremental": "incremental"}[words[1]]
                assert f": {kind}," in done.stdout, done.stdout
                time.sleep(1.1)  # the next snapshot gets its own second
            elif words[0] == "zfs-client":
                done = site.run(line)
                _check_client_output(words[1:], done.stdout, site)
            elif words[1] == "latest":
                Zfs().destroy(f"{pool.name}/restored", recursive=True)  # latest makes it anew
                site.run(line)
            else:
                done = site.run(line)
                _check_restore_output(words[1:], done.stdout, site)

        restored = tmp_path / "mnt-restore"
        assert rig.tree_digest(restored) == digests["backup-incremental"]
        saved = site.restore_dir / "backup.zfs.gz"
        stream = gzip.decompress(saved.read_bytes())
        assert int.from_bytes(stream[8:16], "little") == 0x2F5BACBAC  # a zfs send stream
        log = server.log()
        for method, path in seed_endpoints():
            assert re.search(rf"INFO zfsmgr.server: {method} {re.escape(path)}\S* 200 ",
                             log), f"{method} {path} never answered 200"
    finally:
        server.stop()
        subprocess.run(["zfs", "umount", f"{pool.name}/restored"], capture_output=True)


def _check_client_output(words, stdout: str, site: SeedSite) -> None:
    if words[0] == "snapshot":
        assert f"created {site.dataset}@zfsmgr_{words[1]}_" in stdout
    elif words[0] == "rotate-remote":
        assert "backups" in stdout and "kept" in stdout
    elif words[0] == "status":
        assert f"client client1 ({site.store} storage)" in stdout
        assert "of 100.0 GiB" in stdout  # the seed's max_size_bytes, in binary units
    elif words[0] == "bookmarks":
        assert f"{site.dataset}" in stdout and "zfsmgr_" in stdout
    elif words[0] == "help":
        for command in ("backup", "backup-full", "backup-incremental", "snapshot TYPE",
                        "rotate", "rotate-remote", "status", "bookmarks", "help"):
            assert f"\n  {command}" in stdout, command


def _check_restore_output(words, stdout: str, site: SeedSite) -> None:
    if words[0] == "list":
        header = stdout.splitlines()[0].split()
        seed_header = block("`list`", "").splitlines()[0].split()
        assert header[:len(seed_header)] == seed_header  # then zfsmgr's type and dataset
        rows = stdout.splitlines()[1:]
        assert rows and all(re.match(rf"\s*\d+\s+client1/{site.dataset.replace('/', '_')}_20",
                                     row) for row in rows), stdout
    elif words[0] == "restore":
        assert f"restored {site.dataset}@zfsmgr_" in stdout
    elif words[0] == "save":
        assert "saved backup.zfs.gz (" in stdout
    elif words[0] == "mount":
        assert "is mounted at" in stdout


def cron_line() -> str:
    """The cron line the README gives (the part after the five time fields)."""
    readme = (rig.ROOT / "README.md").read_text()
    [line] = [ln.strip(" `") for ln in re.findall(r"`([^`]*\* \* \* \*[^`]*)`", readme)]
    return line.split(None, 5)[5]


def test_the_readmes_cron_line_works_under_crons_environment(pool, server_factory, tmp_path,
                                                             pyz):
    command = cron_line()
    assert " -q" in command and "/usr/local/bin/zfsmgr " in command, command
    server = server_factory("dir")
    dataset = pool.create("cron")
    rig.write_files(pool.mountpoint(dataset), seed=7, count=1, size=50_000)
    etc = tmp_path / "etc-zfsmgr"
    etc.mkdir()
    (etc / ".env").write_text("".join(f"{k}={v}\n" for k, v in {
        **server.client_env, "LOCAL_DATASET": dataset}.items()))
    launcher = tmp_path / "zfsmgr"  # stands for /usr/local/bin/zfsmgr: the built .pyz
    launcher.write_bytes(Path(pyz).read_bytes())
    launcher.chmod(0o755)
    shell = command.replace("/etc/zfsmgr", str(etc)).replace("/usr/local/bin/zfsmgr",
                                                             str(launcher))
    done = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "sh", "-c", shell],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # -q: nothing for cron to mail
    listing = json.loads(rig.run_zfsmgr(["restore", "list", "--json"], env=server.client_env,
                                        check=True).stdout)
    assert [m["dataset"] for m in listing] == [dataset]
