"""OpenZFS test tier: tests that need real OpenZFS 2.3, run inside the QEMU VM.

run-tier.sh boots the VM and runs pytest on this folder with ZFSMGR_IN_VM=1.
Anywhere else (the host has zfs-fuse or no ZFS) nothing here is collected, so
the project's normal pytest run ignores this folder. Inside the VM every test
here is marked `openzfs`, a wrong OpenZFS version is an error, and a skipped
test counts as a failure: the tier never passes by not running.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

IN_VM = os.environ.get("ZFSMGR_IN_VM") == "1"
REQUIRED_SERIES = "2.3"
HERE = Path(__file__).resolve().parent

if not IN_VM:
    # Relative to this folder; fnmatch's "*" also matches "/", so subfolders too.
    collect_ignore_glob = ["*"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "openzfs: needs real OpenZFS 2.3; runs only in the VM of tests/openzfs/run-tier.sh",
    )


def _in_tier(item: pytest.Item) -> bool:
    path = item.path if hasattr(item, "path") else Path(str(item.fspath))  # pytest >= 7 / older
    return HERE in Path(path).resolve().parents


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test of this folder `openzfs` before `-m openzfs` deselects anything."""
    for item in items:
        if _in_tier(item):
            item.add_marker(pytest.mark.openzfs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Inside the VM a skip is a failure: the tier exists to run these tests."""
    outcome = yield
    report = outcome.get_result()
    if IN_VM and report.skipped and not hasattr(report, "wasxfail") and _in_tier(item):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped inside the OpenZFS VM, which the tier does not allow: {reason}"


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session", autouse=True)
def openzfs_version() -> dict[str, str]:
    """`zfs version` of userland and kernel module; both must be OpenZFS 2.3.x."""
    proc = _run(["zfs", "version"])
    if proc.returncode != 0:
        pytest.fail(f"`zfs version` failed ({proc.returncode}): {proc.stderr.strip()}")
    versions = {}
    for line in proc.stdout.split():
        if line.startswith("zfs-kmod-"):
            versions["kmod"] = line[len("zfs-kmod-") :]
        elif line.startswith("zfs-"):
            versions["userland"] = line[len("zfs-") :]
    for part in ("userland", "kmod"):
        if not versions.get(part, "").startswith(REQUIRED_SERIES + "."):
            said = proc.stdout.strip()
            pytest.fail(f"need OpenZFS {REQUIRED_SERIES}.x ({part}); `zfs version` says {said!r}")
    return versions


@dataclasses.dataclass(frozen=True)
class Pool:
    """A throw-away file-backed pool; str() is the pool name."""

    name: str
    mountpoint: str
    vdev: str

    def __str__(self) -> str:
        return self.name


def _destroy(pool: Pool) -> None:
    for attempt in range(5):
        proc = _run(["zpool", "destroy", "-f", pool.name])
        if proc.returncode == 0 or _run(["zpool", "list", pool.name]).returncode != 0:
            break
        time.sleep(0.5 * (attempt + 1))  # a just-killed `zfs send`/`recv` may still hold it
    else:
        raise RuntimeError(f"cannot destroy pool {pool.name}: {proc.stderr.strip()}")
    Path(pool.vdev).unlink(missing_ok=True)


@pytest.fixture
def openzfs_pool_factory(openzfs_version):
    """Create pools: factory(size="512M") -> Pool; all destroyed after the test."""
    pools: list[Pool] = []
    base = Path("/var/tmp")  # ext4 scratch disk in the VM (tmpfs /tmp would eat RAM)

    def create(size: str = "512M") -> Pool:
        name = "zt" + uuid.uuid4().hex[:10]
        pool = Pool(name=name, mountpoint=f"/mnt/{name}", vdev=str(base / f"{name}.img"))
        proc = _run(["truncate", "-s", size, pool.vdev])
        assert proc.returncode == 0, proc.stderr
        proc = _run(
            [
                "zpool",
                "create",
                "-O",
                "atime=off",
                "-O",
                f"mountpoint={pool.mountpoint}",
                name,
                pool.vdev,
            ]
        )
        if proc.returncode != 0:
            Path(pool.vdev).unlink(missing_ok=True)
            raise RuntimeError(f"zpool create {name} failed: {proc.stderr.strip()}")
        pools.append(pool)
        return pool

    yield create
    for pool in reversed(pools):
        _destroy(pool)


@pytest.fixture
def openzfs_pool(openzfs_pool_factory) -> Pool:
    """A fresh 512 MiB file-backed OpenZFS pool mounted at /mnt/<name>, destroyed after."""
    return openzfs_pool_factory()
