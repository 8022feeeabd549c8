#!/usr/bin/env python3
"""Two servers on one SeaweedFS bucket (a script, not a test): prints figures, asserts nothing.

    python3 tests/bench/two_servers_bench.py [--clients 8] [--rounds 20] [--restore 3]

Each round every client writes new files into its zfs-fuse dataset and runs `zfsmgr client
backup` through server A or B, alternating (client n uses (round + n) % 2), several clients at
once. Afterwards: errors, lost backups (each client's listing should hold one per round),
broken chains (an incremental whose parent is not listed), and a sample of clients restored
with `restore latest` (the whole chain, through the other server) and compared with the files.
Needs root, zfs-fuse, SeaweedFS and dist/zfsmgr.pyz.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import rig  # noqa: E402


def servers_on(seaweed: rig.Seaweed, bucket: str, keys: dict, root: Path):
    entries = [{"client_id": c, "api_key": hashlib.sha256(k.encode()).hexdigest(),
                "max_size_bytes": 0, "enabled": True, "storage_type": "s3"}
               for c, k in keys.items()]
    servers = []
    for name in ("a", "b"):
        workdir = root / f"server-{name}"
        workdir.mkdir(parents=True)
        (workdir / "clients.json").write_text(json.dumps(entries))
        servers.append(rig.ServerProcess(workdir, {
            "PORT": str(rig.free_port()), "HOST": "127.0.0.1", "PART_SIZE": "5M",
            "STORAGE_DIR": str(workdir / "backups"), "S3_ENABLED": "true",
            "S3_ENDPOINT": seaweed.endpoint, "S3_ACCESS_KEY": seaweed.access_key,
            "S3_SECRET_KEY": seaweed.secret_key, "S3_BUCKET": bucket,
            "S3_USE_SSL": "false"}).start())
    return servers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--restore", type=int, default=3, help="clients restored and compared")
    parser.add_argument("--parallel", type=int, default=4, help="clients backing up at once")
    args = parser.parse_args()
    if not rig.PYZ.exists():
        subprocess.run([sys.executable, str(rig.ROOT / "build_zipapp.py")], check=True)
    rig.ensure_zfs_daemon()
    seaweed, pool = rig.Seaweed(), rig.Pool("zb")
    servers = []
    try:
        keys = {f"host{n:02d}": secrets.token_hex(16) for n in range(args.clients)}
        servers = servers_on(seaweed, "zfsmgr-two-servers", keys, pool.dir)
        datasets = {c: pool.create(f"d{c}") for c in keys}
        expected, errors, seconds = {}, [], []

        def env(n, client, server):
            return {"CLIENT_ID": client, "API_KEY": keys[client], "SERVER_URL": server.url,
                    "STATE_DIR": str(pool.dir / f"state-{client}"),
                    "LOCAL_DATASET": datasets[client]}

        def backup(round_, n, client):
            expected[client] = rig.write_files(pool.mountpoint(datasets[client]),
                                               seed=round_ * 100 + n, count=2, size=60_000)
            done = rig.run_zfsmgr(["client", "backup"],
                                  env=env(n, client, servers[(round_ + n) % 2]))
            if done.returncode != 0:
                errors.append(f"round {round_} {client}: {done.stderr.strip()[-300:]}")

        with ThreadPoolExecutor(args.parallel) as pool_of_clients:
            for round_ in range(args.rounds):
                started = time.monotonic()
                list(pool_of_clients.map(lambda item: backup(round_, *item),
                                         enumerate(keys)))
                seconds.append(time.monotonic() - started)
                time.sleep(max(0.0, 1.1 - seconds[-1]))  # distinct snapshot timestamps
        lost, broken, fulls = 0, 0, 0
        for n, client in enumerate(keys):
            listed = json.loads(rig.run_zfsmgr(["restore", "list", "--json"], check=True,
                                               env=env(n, client, servers[n % 2])).stdout)
            lost += max(0, args.rounds - len(listed))
            snapshots = {m["snapshot"] for m in listed}
            fulls += sum(1 for m in listed if m["type"] == "full")
            broken += sum(1 for m in listed if m["type"] == "incremental"
                          and m["parent"] not in snapshots)
        restored = []
        for n, client in enumerate(list(keys)[:args.restore]):
            target = f"{pool.name}/back{n}"
            done = rig.run_zfsmgr(["restore", "latest", target],
                                  env=env(n, client, servers[(n + 1) % 2]))
            if done.returncode != 0:
                restored.append(f"{client}: restore failed: {done.stderr.strip()[-200:]}")
                continue
            rig.sh("zfs", "set", f"mountpoint={pool.dir}/check{n}", target)
            rig.sh("zfs", "mount", target, check=False)
            same = rig.tree_digest(pool.mountpoint(target)) == expected[client]
            restored.append(f"{client}: {'identical' if same else 'DIFFERENT'}")
        total = args.clients * args.rounds
        print(f"two servers, one bucket: {args.clients} clients x {args.rounds} rounds ="
              f" {total} backups alternating A/B; errors {len(errors)}, lost {lost}, broken"
              f" chains {broken}; {fulls} full and {total - lost - fulls} incremental;"
              f" {sum(seconds) / len(seconds):.1f}s per round", flush=True)
        print("restored (whole chain, latest): " + "; ".join(restored), flush=True)
        refreshed = sum(s.log().count("refreshed from s3") for s in servers)
        adopted = sum(s.log().count("opened by another server") for s in servers)
        print(f"catalog refreshes from the bucket: {refreshed}; uploads continued on the"
              f" other server: {adopted}", flush=True)
        for line in errors[:10]:
            print("  error: " + line)
    finally:
        for server in servers:
            server.stop()
        pool.destroy()
        seaweed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
