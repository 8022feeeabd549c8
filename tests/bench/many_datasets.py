"""Benchmark: one run over many datasets against a run over one (zfs-fuse, the built .pyz, a
directory-store server on loopback). Prints figures; asserts nothing.

    python3 tests/bench/many_datasets.py [--datasets 100] [--changed 20] [--size 64M]
                                         [--parallel 4] [--pool-size 4G] [--rounds 3]
                                         [--part-size 32M]

1. `--datasets` empty datasets, second run with nothing changed: wall time and `zfs`
   invocations (counted by a wrapper given as ZFSMGR_ZFS), per dataset and in all, against the
   same for one dataset (unchanged, and changed).
2. `--changed` datasets with `--size`/N of new data each: aggregate MiB/s of the incremental
   run, one dataset at a time, as many as the default (PARALLEL unset: two where the server's
   share allows) and `--parallel` at once, against one dataset with `--size` of new data; the
   pool's image is `--pool-size` (default: room for all of that). Single runs on a shared
   machine scatter by ±25%, so `--rounds` rounds run interleaved (the order of the modes
   turns), each ratio is against the one-dataset run of its own round, and medians are printed.
   The measured runs call `zfs` itself (a counting wrapper costs a shell per call, five times
   as many in the run over many datasets); each mode's calls are counted in one more run after
   the rounds. Where /proc is (Linux), each run's CPU is split into the client with its `zfs`
   processes, the server and the zfs-fuse daemon, and what each extra dataset costs is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import rig  # noqa: E402

ZFS = subprocess.run(["sh", "-c", "command -v zfs"], capture_output=True,
                     text=True).stdout.strip() or "/sbin/zfs"


def counting_zfs(folder: Path) -> tuple:
    """A zfs that logs each call: (program path, log path)."""
    log = folder / "zfs-calls.log"
    wrapper = folder / "zfs"
    wrapper.write_text(f"#!/bin/sh\necho \"$1\" >> {log}\nexec {ZFS} \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper), log


def server(folder: Path, parallel: int, part_size: str = ""):
    key = secrets.token_hex(16)
    (folder / "clients.json").write_text(json.dumps([{
        "client_id": "bench", "api_key": hashlib.sha256(key.encode()).hexdigest(),
        "max_size_bytes": 0, "dataset": "", "enabled": True, "storage_type": "dir"}]))
    env = {"PORT": str(rig.free_port()), "HOST": "127.0.0.1",
           "STORAGE_DIR": str(folder / "backups"),
           "CLIENT_MAX_REQUESTS": str(max(4, 2 * parallel))}  # room for PARALLEL uploads
    if part_size:  # else the server's default
        env["PART_SIZE"] = part_size
    proc = rig.ServerProcess(folder, env).start()
    return proc, {"CLIENT_ID": "bench", "API_KEY": key, "SERVER_URL": proc.url,
                  "STATE_DIR": str(folder / "state"), "COMPRESS": "none"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (0 where /proc is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid() -> int:
    found = subprocess.run(["pgrep", "-o", "zfs-fuse"], capture_output=True, text=True)
    return int(found.stdout.split()[0]) if found.stdout.strip() else 0


class Run:
    """One `client backup --json`: wall seconds, zfs calls (with the counting wrapper), the
    report, and CPU seconds {client: with its zfs processes, server, zfs-fuse}."""

    def __init__(self, env: dict, log: Path, server_pid: int):
        if log.exists():
            log.unlink()
        daemon, before = daemon_pid(), os.times()
        server, fuse = cpu_seconds(server_pid), cpu_seconds(daemon)
        started = time.monotonic()
        done = rig.run_zfsmgr(["client", "backup", "--json"], env=env, timeout=3600)
        self.took = time.monotonic() - started
        after = os.times()
        if done.returncode != 0:
            raise SystemExit(f"backup failed: {done.stderr[-2000:]}")
        self.cpu = {"client": after.children_user + after.children_system
                    - before.children_user - before.children_system,
                    "server": cpu_seconds(server_pid) - server,
                    "zfs-fuse": cpu_seconds(daemon) - fuse}
        self.calls = len(log.read_text().splitlines()) if log.exists() else 0
        self.report = json.loads(done.stdout)
        time.sleep(1.1)


def run(env: dict, log: Path) -> tuple:
    """One `client backup --json`: (seconds, zfs calls, report)."""
    done = Run(env, log, 0)
    return done.took, done.calls, done.report


def fill(path: Path, size: int, seed: int) -> None:
    with open(path / f"data{seed}.bin", "wb") as out:
        out.write(os.urandom(size))
    os.sync()


def refill(path: Path, size: int, seed: int) -> None:
    """New data in place of the last round's (the pool does not fill up)."""
    for old in path.glob("data*.bin"):
        old.unlink()
    with open(path / f"data{seed}.bin", "wb") as out:
        for _ in range(0, size, 8 << 20):
            out.write(os.urandom(min(8 << 20, size)))


def settle(pool) -> None:
    """Put what was written on the pool's disk before a measured run: zfs-fuse keeps writes
    in its open transaction for up to 30 s, and the run's `zfs snapshot` would write them."""
    os.sync()
    rig.sh("zfs", "set", f"bench:settled={time.monotonic_ns()}", pool.name)  # a pool sync


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", type=int, default=100)
    parser.add_argument("--changed", type=int, default=20)
    parser.add_argument("--size", default="64M")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--part-size", default="",
                        help="the server's PART_SIZE (default: the server's own default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of the changed runs (medians are printed)")
    parser.add_argument("--pool-size", default="",
                        help="the pool's image file (default: room for 4 x --size of data)")
    args = parser.parse_args()
    from zfsmgr.settings import as_size

    size = as_size(args.size)
    pool_size = args.pool_size or str(max(512 << 20, 5 * size + (256 << 20)))
    rig.ensure_zfs_daemon()
    subprocess.run([sys.executable, str(rig.ROOT / "build_zipapp.py")], check=True,
                   capture_output=True)
    rig.WORK.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-many-", dir=rig.WORK))
    pool = rig.Pool("bm", pool_size)
    srv = None
    try:
        wrapper, log = counting_zfs(folder)
        srv, client = server(folder, args.parallel, args.part_size)
        plain, client = client, {**client, "ZFSMGR_ZFS": wrapper}  # timed runs: plain

        one = pool.create("one")
        env_one = {**client, "LOCAL_DATASET": one}
        run(env_one, log)
        fill(pool.mountpoint(one), 1 << 20, 1)
        t_changed, c_changed, _ = run(env_one, log)
        t_one, c_one, _ = run(env_one, log)

        many = pool.create("many")
        for i in range(args.datasets):
            rig.sh("zfs", "create", "-o", "mountpoint=none", f"{many}/d{i:03d}")
        env_many = {**client, "LOCAL_DATASET": many, "RECURSIVE": "true"}
        t_first, c_first, _ = run(env_many, log)
        t_many, c_many, report = run(env_many, log)
        n = args.datasets + 1
        assert report["unchanged"] == n, report
        print(f"unchanged: {n} datasets {t_many:.2f}s, {c_many} zfs calls"
              f" ({c_many / n:.2f}/dataset); one dataset {t_one:.2f}s, {c_one} zfs calls;"
              f" ratio {t_many / t_one:.1f}x (target < 10x)")
        print(f"  one dataset changed (incremental): {t_changed:.2f}s, {c_changed} zfs calls;"
              f" first run of {n}: {t_first:.2f}s, {c_first} zfs calls")

        each = size // args.changed
        wide = pool.create("wide")
        for i in range(args.changed):
            rig.sh("zfs", "create", f"{wide}/d{i:02d}")
        big = pool.create("big")
        env_wide = {**plain, "LOCAL_DATASET": wide, "RECURSIVE": "true"}
        env_big = {**plain, "LOCAL_DATASET": big}
        for env in (env_wide, env_big):  # the full backups
            run(env, log)
        modes = [("one at a time", "1"), ("default", ""),
                 (f"PARALLEL={args.parallel}", str(args.parallel))]
        runs = {label: [] for label in ["one dataset"] + [m[0] for m in modes]}
        ratios = {label: [] for label, _ in modes}
        mib = 1 << 20

        def changed(parallel: str, seed: int, counted: bool = False) -> Run:
            for i in range(args.changed):
                refill(pool.mountpoint(f"{wide}/d{i:02d}"), each, seed)
            settle(pool)
            env = {**env_wide, **({"PARALLEL": parallel} if parallel else {}),
                   **({"ZFSMGR_ZFS": wrapper} if counted else {})}
            return Run(env, log, srv.proc.pid)

        for round_ in range(args.rounds):  # the modes' order turns each round: none always
            order = modes[round_ % len(modes):] + modes[:round_ % len(modes)]  # goes first
            refill(pool.mountpoint(big), each * args.changed, 10 + round_)
            settle(pool)
            one = Run(env_big, log, srv.proc.pid)
            runs["one dataset"].append(one)
            for label, parallel in order:
                done = changed(parallel, 100 + round_)
                runs[label].append(done)
                ratios[label].append(one.took / done.took)
        calls_of = {label: changed(parallel, 1000, counted=True).calls
                    for label, parallel in modes}

        def rate(label: str) -> float:
            return statistics.median(r.report["raw_size"] / r.took / mib for r in runs[label])

        def cpu(label: str, part: str) -> float:
            return statistics.median(r.cpu[part] for r in runs[label])

        parts, extra_n = ("client", "server", "zfs-fuse"), max(1, args.changed - 1)
        one_cpu = ", ".join(f"{part} {cpu('one dataset', part):.2f}" for part in parts)
        print(f"changed ({args.rounds} rounds, medians; each round's ratio against the one"
              f" dataset of that round): one dataset of {each * args.changed / mib:.0f} MiB:"
              f" {rate('one dataset'):.1f} MiB/s; CPU s: {one_cpu}")
        for label, _ in modes:
            extra = ", ".join(
                f"{part} {1000 * (cpu(label, part) - cpu('one dataset', part)) / extra_n:.0f}"
                for part in parts)
            print(f"  {args.changed} datasets x {each / mib:.1f} MiB, {label}"
                  f" ({calls_of[label]} zfs calls): {rate(label):.1f} MiB/s,"
                  f" ratio {statistics.median(ratios[label]):.2f} (target >= 0.9; rounds:"
                  f" {', '.join(f'{r:.2f}' for r in ratios[label])}); CPU ms per extra"
                  f" dataset: {extra}")
    finally:
        if srv:
            srv.stop()
        pool.destroy()
        shutil.rmtree(folder, ignore_errors=True)  # the server's backups: gigabytes


if __name__ == "__main__":
    main()
