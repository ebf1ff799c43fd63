"""Model sync throughput: `dslaunch sync` against `rsync` over the same SSH, to 2 simulated nodes.

A model directory of --size-mb MB (random bytes in --files safetensors-named files and a
config.json) is copied to 2 sim nodes, each of which sees the model path as a tmpfs of its own.
Measured in the same run: a fresh copy with dslaunch (SFTP on paramiko, both nodes in parallel)
and with `rsync -a` over OpenSSH (one rsync per node, in parallel); then a sync of identical
copies (dslaunch: every node hashes, cold and then from its cache; rsync: size and mtime).
MB/s counts the bytes that reach the nodes (model size x 2). Needs rsync (apt-get install rsync).

    python benchmarks/sync.py [--size-mb 2048] [--files 4] [--out benchmarks/results/sync.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table, write

from dslaunch.launch.modelsync import sync_model
from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.filehash import manifest
from dslaunch.wire.hosts import Node
from tests.simnodes import SimCluster


def make_model(d: Path, size_mb: int, files: int) -> int:
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    per = (size_mb << 20) // files
    for i in range(files):
        with open(d / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as f:
            for _ in range(per >> 24):
                f.write(os.urandom(16 << 20))
            f.write(os.urandom(per & ((16 << 20) - 1)))
    return sum(p.stat().st_size for p in d.iterdir())


def wipe(cluster: Cluster, d: Path) -> None:
    for c in cluster.clients:
        res = c.transport.run(["sh", "-c", f"rm -rf {d}/* {d}/.[!.]*; true"], timeout=120)
        assert res.code == 0, res.stderr


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def rsync_all(sim: SimCluster, d: Path) -> None:
    env = sim.env()
    # OpenSSH reads the passwd entry's home, not $HOME: name the sim's files
    ssh = f"ssh -F {sim.ssh_dir / 'config'} -o UserKnownHostsFile={sim.ssh_dir / 'known_hosts'} -o BatchMode=yes"
    procs = [
        subprocess.Popen(["rsync", "-a", "-e", ssh, f"{d}/", f"{n.alias}:{d}/"], env=env, stderr=subprocess.PIPE)
        for n in sim.nodes
    ]
    for p in procs:
        _, err = p.communicate(timeout=3600)
        if p.returncode:
            raise SystemExit(f"rsync failed: {err.decode()[-300:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not shutil.which("rsync"):
        raise SystemExit("rsync is not installed (apt-get install rsync)")
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-sync-") as tmp:
        model = Path(tmp) / "model"
        size = make_model(model, args.size_mb, args.files)
        tmpfs = f"{args.size_mb + 256}m"
        sim = SimCluster(Path(tmp) / "sim", 2, private_dirs={0: [str(model)], 1: [str(model)]},
                         private_sizes={str(model): tmpfs}).start()  # fmt: skip
        os.environ.update(HOME=str(sim.home), XDG_CACHE_HOME=str(Path(tmp) / "cache"))
        os.environ.pop("SSH_AUTH_SOCK", None)
        nodes = [Node(n.alias, 1) for n in sim.nodes]
        try:
            with Cluster(nodes, ConnectOptions(command_timeout=3600), sys.executable) as cluster:
                manifest(model)  # the launch host's hashes, cached before anything is timed
                wipe(cluster, model)
                ds_fresh = timed(lambda: sync_model(cluster, str(model)))
                ds_same_cold = timed(lambda: sync_model(cluster, str(model)))
                ds_same_warm = timed(lambda: sync_model(cluster, str(model)))
                wipe(cluster, model)
                rs_fresh = timed(lambda: rsync_all(sim, model))
                rs_same = timed(lambda: rsync_all(sim, model))
                wipe(cluster, model)
        finally:
            sim.stop()
    sent = 2 * size / 1e6
    rows = [
        ["fresh copy", round(ds_fresh, 2), round(sent / ds_fresh, 1), round(rs_fresh, 2), round(sent / rs_fresh, 1),
         round(rs_fresh / ds_fresh, 2)],
        ["identical (node hashes cold)", round(ds_same_cold, 2), "-", round(rs_same, 2), "-",
         round(rs_same / ds_same_cold, 2)],
        ["identical (node hashes cached)", round(ds_same_warm, 2), "-", round(rs_same, 2), "-",
         round(rs_same / ds_same_warm, 2)],
    ]  # fmt: skip
    print(f"model: {size / 1e6:.0f} MB in {args.files + 1} files, to 2 sim nodes (MB/s: bytes reaching the nodes)")
    print(table(["case", "dslaunch s", "dslaunch MB/s", "rsync s", "rsync MB/s", "rsync s / dslaunch s"], rows))
    note = "both nodes and the launch host share this machine's cores and memory"
    write("sync", {"size_bytes": size, "files": args.files + 1, "nodes": 2, "rows": rows, "note": note}, args.out)


if __name__ == "__main__":
    main()
