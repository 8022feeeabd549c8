#!/usr/bin/env python3
"""zfsmgr throughput and memory benchmark (a script, not a test): prints figures, asserts nothing.

    python3 tests/bench/bench.py [--size 1G] [--rss-sizes 1G,4G] [--skip-gzip-ref]
                                 [--repeat 3] [--cases gzip,text,uncompressed,...]

Needs root, zfs-fuse and the built dist/zfsmgr.pyz. For each case it prints MiB/s of the raw
`zfs send` stream, the ratio to that case's baseline measured in the same run, and the peak RSS
of the client and server processes (sampled from /proc every 20 ms, children included). The
single-client backups also show the CPU each side spent per GiB of stream (core-seconds: the
client's with its `zfs send`), which says what each side needs when they run on separate
machines.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import rig  # noqa: E402
from zfsmgr.compress import GzipBlockCompressor  # noqa: E402
from zfsmgr.settings import as_size  # noqa: E402

MIB = 1 << 20
CASES = ("gzip", "text", "uncompressed", "https", "restore", "four", "rss")


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants.

    A descendant still running the root's own executable is a fork that has not exec'd yet
    (subprocess forks, then runs `zfs`): it shares the parent's pages, and adding its RSS
    would count them twice."""
    total, todo = 0, [pid]
    try:
        image = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return 0
    while todo:
        p = todo.pop()
        try:
            if p == pid or os.readlink(f"/proc/{p}/exe") != image:
                with open(f"/proc/{p}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def process_cpu(pid: int) -> float:
    """Core-seconds a running process (all its threads, reaped children) has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class PeakRss(threading.Thread):
    """Samples the RSS of a process tree until stopped; .peak is the maximum seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, tree_rss(self.pid))

    def finish(self) -> int:
        self.stop.set()
        self.join()
        return self.peak


def mixed_file(path: Path, size: int, seed: int = 1) -> None:
    """1/3 random, 1/3 zeros, 1/3 text-like, interleaved in 1 MiB blocks."""
    rng = random.Random(seed)
    words = [b"zfs", b"snapshot", b"backup", b"dataset", b"pool", b"stream", b"block"]
    text = b" ".join(rng.choice(words) for _ in range(MIB // 5))[:MIB]
    with open(path, "wb") as out:
        for i in range(size // MIB):
            out.write((rng.randbytes(MIB), bytes(MIB), text)[i % 3])


def text_file(path: Path, size: int, seed: int = 2) -> None:
    """Compressible text only (16 different 1 MiB blocks in turn): no segment is stored."""
    rng = random.Random(seed)
    words = [b"zfs", b"snapshot", b"backup", b"dataset", b"pool", b"stream", b"block"]
    blocks = [b"".join(b"%s %s %d\n" % (rng.choice(words), rng.choice(words), n)
                       for n in range(i * 60000, (i + 1) * 60000))[:MIB] for i in range(16)]
    with open(path, "wb") as out:
        for i in range(size // MIB):
            out.write(blocks[i % 16])


def zlib_limit(path: Path, cores: int) -> float:
    """Seconds for plain zlib level 1 (one gzip member per MiB) on all cores in one process."""
    def member(block: bytes) -> int:
        deflater = zlib.compressobj(1, zlib.DEFLATED, 31)
        return len(deflater.compress(block) + deflater.flush())

    start = time.monotonic()
    with open(path, "rb") as src, ThreadPoolExecutor(cores) as pool:
        pending: collections.deque = collections.deque()
        for block in iter(lambda: src.read(MIB), b""):
            pending.append(pool.submit(member, block))
            if len(pending) >= 2 * cores:
                pending.popleft().result()
        for future in pending:
            future.result()
    return time.monotonic() - start


def timed(argv, **kwargs) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True, **kwargs)
    return time.monotonic() - start


def _free(dataset: str) -> None:
    """Destroy a dataset to make room; zfs-fuse may still call it busy for a moment, and the
    pool goes at the end anyway."""
    subprocess.run(["zfs", "destroy", "-r", dataset], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def median_cpu(runs) -> tuple:
    """(client, server) core-seconds: the medians over backups' (seconds, rss, cpu)."""
    return tuple(statistics.median(r[2][side] for r in runs) for side in (0, 1))


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / max(seconds, 1e-9)


class Bench:
    def __init__(self, args):
        self.args, self.rows = args, []
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        rig.WORK = self.work
        rig.ensure_zfs_daemon()
        self.pool = rig.Pool("zbench")
        subprocess.run(["zpool", "destroy", self.pool.name], check=True)
        need = max(as_size(s) for s in args.rss_sizes.split(",")) * 2 + as_size(args.size) * 6
        self.replay = self.work / "zfs-replay"  # `zfs send` replays the saved real stream
        self.replay.write_text("#!/bin/sh\nif [ \"$1\" = send ] && [ -n \"$BENCH_STREAM\" ];"
                               " then exec cat \"$BENCH_STREAM\"; fi\nexec zfs \"$@\"\n")
        self.replay.chmod(0o755)
        self.stream = None
        subprocess.run(["truncate", "-s", str(need), str(self.pool.image)], check=True)
        subprocess.run(["zpool", "create", "-o", "cachefile=none", "-O", "atime=off",
                        "-O", "compression=off", "-m", str(self.pool.mnt), self.pool.name,
                        str(self.pool.image)], check=True)

    def row(self, case, nbytes, seconds, baseline=None, client_rss=None, server_rss=None,
            cpu=None):
        """One printed row; `cpu`: (client, server) core-seconds for `nbytes`."""
        mibs = rate(nbytes, seconds)
        per_gib = [round(c * (1 << 30) / nbytes, 2) for c in cpu] if cpu else [None, None]
        self.rows.append({"case": case, "MiB/s": round(mibs, 1),
                          "ratio": round(mibs / baseline, 2) if baseline else None,
                          "client_rss_MiB": round(client_rss / MIB, 1) if client_rss else None,
                          "server_rss_MiB": round(server_rss / MIB, 1) if server_rss else None,
                          "client_cpu_s_per_GiB": per_gib[0],
                          "server_cpu_s_per_GiB": per_gib[1]})
        r = self.rows[-1]
        print(f"{case:<46} {r['MiB/s']:>8} MiB/s  ratio {r['ratio'] or '-':>5}  client"
              f" {r['client_rss_MiB'] or '-':>6} MiB  server {r['server_rss_MiB'] or '-':>6} MiB"
              + (f"  CPU/GiB client {per_gib[0]} s, server {per_gib[1]} s" if cpu else ""),
              flush=True)
        return mibs

    def dataset(self, name: str, size: int) -> str:
        ds = f"{self.pool.name}/{name}"
        subprocess.run(["zfs", "create", ds], check=True)
        mixed_file(self.pool.mountpoint(ds) / "data", size, seed=len(name))
        os.sync()
        subprocess.run(["zfs", "snapshot", f"{ds}@bench"], check=True)
        return ds

    def server(self, clients=1, name="srv", tls=None):
        workdir = self.work / name
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        keys = {f"c{i}": f"key-{i}-{os.urandom(8).hex()}" for i in range(clients)}
        (workdir / "clients.json").write_text(json.dumps([
            {"client_id": c, "api_key": hashlib.sha256(k.encode()).hexdigest(),
             "storage_type": "dir", "enabled": True} for c, k in keys.items()]))
        env = {"PORT": str(rig.free_port()), "HOST": "127.0.0.1",
               "STORAGE_DIR": str(workdir / "store")}
        if tls is not None:  # a rig.TestCA: HTTPS in the server itself
            cert, key = tls.issue(name)
            env.update({"TLS_CERT": str(cert), "TLS_KEY": str(key)})
        return rig.ServerProcess(workdir, env, str(tls.cert) if tls else "").start(), keys

    def backup(self, server, keys, datasets, compress):
        """Run one `client backup-full` per dataset at once; (seconds, client peak RSS,
        (client, server) core-seconds)."""
        procs, samplers = [], []
        cpu = children_cpu(), process_cpu(server.proc.pid)
        start = time.monotonic()
        for (client, key), ds in zip(keys.items(), datasets):
            env = rig.clean_env({"CLIENT_ID": client, "API_KEY": key, "SERVER_URL": server.url,
                                 "LOCAL_DATASET": ds, "COMPRESS": compress,
                                 "STATE_DIR": str(server.workdir / f"state-{client}"),
                                 "CA_FILE": server.ca_file})
            if self.stream and not self.args.live_send:
                env.update({"ZFSMGR_ZFS": str(self.replay), "BENCH_STREAM": str(self.stream)})
            p = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "client",
                                  "backup-full"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            procs.append(p)
            samplers.append(PeakRss(p.pid))
            samplers[-1].start()
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"backup failed: {err}")
        seconds = time.monotonic() - start
        cpu = children_cpu() - cpu[0], process_cpu(server.proc.pid) - cpu[1]
        return seconds, max(s.finish() for s in samplers), cpu

    def run(self):
        size = as_size(self.args.size)
        cores = os.cpu_count() or 1
        cases = self.args.cases
        print(f"# zfsmgr benchmark: {size // MIB} MiB mixed stream, {cores} cores,"
              f" {time.strftime('%Y-%m-%d %H:%M')}"
              + ("" if cases == set(CASES) else f", cases: {','.join(sorted(cases))}"))
        ds = self.dataset("one", size)
        stream = self.work / "stream.bin"
        with open(stream, "wb") as out:
            subprocess.run(["zfs", "send", f"{ds}@bench"], stdout=out, check=True)
        raw = stream.stat().st_size
        self.row("zfs send > /dev/null (zfs-fuse, for reference)", raw,
                 timed(["zfs", "send", f"{ds}@bench"], stdout=subprocess.DEVNULL))
        if not self.args.live_send:
            self.stream = stream  # the client's `zfs send` replays it: zfsmgr's own speed
        # each pair alternates baseline and backup `--repeat` times; rows show the medians
        gzip = None
        if cases & {"gzip", "restore"}:  # restore reads what the gzip backups stored
            gzip = self.case_gzip(ds, stream, raw, cores)
        if "text" in cases and self.stream:
            self.case_text(ds, size // 2, cores)
        if "uncompressed" in cases:
            self.case_uncompressed(ds, stream, raw)
        if "https" in cases:
            self.case_https(ds, raw)
        if gzip:
            if "restore" in cases:
                self.case_restore(*gzip, raw)
            gzip[0].stop()
        with self.real_sends():  # the last cases read real sends of their own datasets
            if "four" in cases:
                self.case_four(size)
            if "rss" in cases:
                for text in self.args.rss_sizes.split(","):
                    self.case_rss(as_size(text))
        return self.rows

    def case_gzip(self, ds, stream, raw, cores):
        """gzip: the all-cores zlib limit, zfsmgr's compressor alone, pigz / gzip for
        reference, then backups; returns the server (for restore) and its keys."""
        limit = self.row(f"zlib -1 on {cores} cores, one process (limit)", raw,
                         zlib_limit(stream, cores))
        start = time.monotonic()
        with open(stream, "rb") as src, GzipBlockCompressor(src, 1, threads=cores) as comp:
            while comp.read(MIB):
                pass
        self.row("zfsmgr gzip alone (stores what won't shrink)", raw, time.monotonic() - start,
                 limit)
        if shutil.which("pigz"):
            with open(stream, "rb") as src:
                self.row(f"pigz -p{cores} -1 (reference)", raw,
                         timed(["pigz", f"-p{cores}", "-1"], stdin=src,
                               stdout=subprocess.DEVNULL), limit)
        if not self.args.skip_gzip_ref:
            with open(stream, "rb") as src:
                self.row("gzip -1 (reference)", raw,
                         timed(["gzip", "-1"], stdin=src, stdout=subprocess.DEVNULL), limit)
        server, keys = self.server()
        sampler = PeakRss(server.proc.pid)
        sampler.start()
        one_key = dict(list(keys.items())[:1])
        limits, runs = [], []
        for _ in range(self.args.repeat):
            limits.append(zlib_limit(stream, cores))
            runs.append(self.backup(server, one_key, [ds], "gzip"))
        limit = self.row(f"zlib -1 limit, median of {len(limits)}", raw,
                         statistics.median(limits))
        self.row("backup gzip -> server -> dir store", raw, statistics.median(r[0] for r in runs),
                 limit, max(r[1] for r in runs), sampler.finish(), median_cpu(runs))
        return server, keys

    def case_text(self, ds, size, cores):
        """gzip on a stream where every segment is worth deflating."""
        text = self.work / "text.bin"
        text_file(text, size)
        server_text, keys_text = self.server(name="srv-text")
        mixed, self.stream = self.stream, text
        limits, runs = [], []
        for _ in range(self.args.repeat):
            limits.append(zlib_limit(text, cores))
            runs.append(self.backup(server_text, keys_text, [ds], "gzip"))
        self.stream = mixed
        text_limit = self.row("zlib -1 limit, text-only stream", size,
                              statistics.median(limits))
        self.row("backup gzip, text-only stream", size,
                 statistics.median(r[0] for r in runs), text_limit)
        server_text.stop()
        shutil.rmtree(server_text.workdir, ignore_errors=True)
        text.unlink()

    def case_uncompressed(self, ds, stream, raw):
        """Uncompressed: against cat > file (+ fsync, as the store does) on the same disk."""
        copy = self.work / "copy.bin"
        server2, keys2 = self.server(name="srv-none")
        sampler = PeakRss(server2.proc.pid)
        sampler.start()
        copies, runs = [], []
        for _ in range(self.args.repeat):
            start = time.monotonic()
            with open(stream, "rb") as src, open(copy, "wb") as dst:
                shutil.copyfileobj(src, dst, MIB)
                dst.flush()
                os.fsync(dst.fileno())
            copies.append(time.monotonic() - start)
            copy.unlink()
            runs.append(self.backup(server2, keys2, [ds], "none"))
            for stored_none in (server2.workdir / "store").rglob("*.zfs"):
                stored_none.unlink()  # keep the disk as empty as for cat
        cat = self.row("cat stream > file, fsync (baseline)", raw, statistics.median(copies))
        self.row("backup uncompressed -> server -> dir store", raw,
                 statistics.median(r[0] for r in runs), cat, max(r[1] for r in runs),
                 sampler.finish(), median_cpu(runs))
        server2.stop()

    def case_https(self, ds, raw):
        """HTTPS in the server (TLS in waitress's channels) against plain HTTP, uncompressed:
        the upload path with nothing else to hide the cost of TLS."""
        ca = rig.TestCA(self.work / "pki")
        plain, plain_keys = self.server(name="srv-http")
        tls, tls_keys = self.server(name="srv-https", tls=ca)
        samplers = [PeakRss(plain.proc.pid), PeakRss(tls.proc.pid)]
        for sampler in samplers:
            sampler.start()
        runs = {"http": [], "https": []}
        for _ in range(self.args.repeat):
            for kind, server, keys in (("http", plain, plain_keys), ("https", tls, tls_keys)):
                runs[kind].append(self.backup(server, keys, [ds], "none"))
                for stored in (server.workdir / "store").rglob("*.zfs"):
                    stored.unlink()
        base = self.row("backup uncompressed over plain HTTP (baseline)", raw,
                        statistics.median(r[0] for r in runs["http"]), None,
                        max(r[1] for r in runs["http"]), samplers[0].finish(),
                        median_cpu(runs["http"]))
        self.row("the same over HTTPS (TLS in the server)", raw,
                 statistics.median(r[0] for r in runs["https"]), base,
                 max(r[1] for r in runs["https"]), samplers[1].finish(),
                 median_cpu(runs["https"]))
        plain.stop()
        tls.stop()

    def case_restore(self, server, keys, raw):
        """Restore: against gunzip -c stored | zfs recv."""
        stored = next((server.workdir / "store").rglob("*.zfs.gz"))
        start = time.monotonic()
        gunzip = subprocess.Popen(["gunzip", "-c", str(stored)], stdout=subprocess.PIPE)
        subprocess.run(["zfs", "recv", "-u", f"{self.pool.name}/base1"], stdin=gunzip.stdout,
                       check=True)
        gunzip.wait()
        base = self.row("gunzip -c stored | zfs recv (baseline)", raw, time.monotonic() - start)
        client, key = next(iter(keys.items()))
        env = rig.clean_env({"CLIENT_ID": client, "API_KEY": key, "SERVER_URL": server.url})
        start = time.monotonic()
        p = subprocess.Popen([sys.executable, "-I", "-S", str(rig.PYZ), "restore", "restore",
                              "1", f"{self.pool.name}/restored"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = PeakRss(p.pid)
        sampler.start()
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(f"restore failed: {err}")
        self.row("zfsmgr restore (download, verify, recv)", raw, time.monotonic() - start, base,
                 sampler.finish())
        for name in ("base1", "restored"):
            _free(f"{self.pool.name}/{name}")

    @contextlib.contextmanager
    def real_sends(self):
        """Clients send their own datasets (not the replayed stream) inside the block."""
        replay, self.stream = self.stream, None
        try:
            yield
        finally:
            self.stream = replay

    def case_four(self, size):
        """Four clients at once against one, each with a real send of its own dataset."""
        quarter = max(MIB * 3, size // 4 // (3 * MIB) * 3 * MIB)
        sets = [self.dataset(f"q{i}", quarter) for i in range(4)]
        qraw = [int(rig.sh("zfs", "get", "-Hp", "-o", "value", "referenced", f"{d}@bench"))
                for d in sets]
        server4, keys4 = self.server(clients=4, name="srv4")
        seconds, _, _ = self.backup(server4, dict(list(keys4.items())[:1]), sets[:1], "gzip")
        one = self.row("one client, 1/4 size, gzip", qraw[0], seconds)
        server4.stop()
        server4, keys4 = self.server(clients=4, name="srv4b")
        sampler = PeakRss(server4.proc.pid)
        sampler.start()
        seconds, client_rss, _ = self.backup(server4, keys4, sets, "gzip")
        self.row("four clients at once, aggregate", sum(qraw), seconds, one, client_rss,
                 sampler.finish())
        server4.stop()
        for d in sets:
            _free(d)

    def case_rss(self, n):
        """Peak RSS does not grow with the stream."""
        big = self.dataset(f"rss{n // MIB}", n)
        srv, k = self.server(name=f"srv-rss{n // MIB}")
        sampler = PeakRss(srv.proc.pid)
        sampler.start()
        seconds, client_rss, _ = self.backup(srv, k, [big], "gzip")
        self.row(f"peak RSS, {n // MIB} MiB stream, gzip", n, seconds, None, client_rss,
                 sampler.finish())
        srv.stop()
        _free(big)

    def close(self):
        self.pool.destroy()
        shutil.rmtree(self.work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="stream size for the throughput cases")
    parser.add_argument("--rss-sizes", default="1G,4G", help="stream sizes for peak RSS")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each baseline/backup pair (medians are shown)")
    parser.add_argument("--skip-gzip-ref", action="store_true", help="skip slow gzip -1")
    parser.add_argument("--workdir", default="/var/tmp/zfsmgr-bench")
    parser.add_argument("--live-send", action="store_true",
                        help="read zfs-fuse's own send (slow, CPU-hungry) instead of replaying"
                             " the saved real stream")
    parser.add_argument("--cases", default=",".join(CASES),
                        help="which cases to run, comma-separated (restore runs the gzip"
                             " backups it restores): %(default)s")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    args.cases = set(filter(None, args.cases.split(",")))
    if not args.cases or args.cases - set(CASES):
        parser.error(f"--cases: choose from {','.join(CASES)}")
    if not rig.PYZ.exists():
        subprocess.run([sys.executable, str(rig.ROOT / "build_zipapp.py")], check=True)
    bench = Bench(args)
    try:
        rows = bench.run()
    finally:
        bench.close()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
