"""Launch and teardown side by side: dslaunch, DeepSpeed's launcher (pdsh) and torchrun by hand.

On 1, 2, 4 and 8 simulated SSH nodes (real sshd on 127.0.0.x, one slot each), every launcher
starts a worker that forms a gloo group and loads the built-in tiny model through DeepSpeed
`init_inference` (dslaunch: its own ranks; the others: `group_worker.py`, the same code up to
ready). Measured: start to every rank ready, then each tool's own stop (dslaunch `down`; Ctrl-C for
`deepspeed` and for the `ssh ... torchrun` commands a user starts by hand) to nothing left, and
what is still running 10 s after that stop.

    python benchmarks/launchers.py [--nodes 1,2,4,8] [--out benchmarks/results/launchers.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, dslaunch, table, write

from tests.conftest import job_pids, kill_marked
from tests.simnodes import SimCluster, free_port

WORKER = REPO / "benchmarks" / "group_worker.py"
LEFT_AFTER_S = 10.0
READY_TIMEOUT_S = 300.0


def _wait_gone(find: Callable[[], list[int]], limit: float) -> tuple[float, int]:
    """Seconds until nothing is found (or the limit), and how many are left then."""
    t0 = time.monotonic()
    while (left := find()) and time.monotonic() - t0 < limit:
        time.sleep(0.1)
    return time.monotonic() - t0, len(left)


def _wait_ready(ready: Path, n: int, procs: list[subprocess.Popen[bytes]]) -> float:
    t0 = time.monotonic()
    while len(list(ready.glob("rank*"))) < n:
        if time.monotonic() - t0 > READY_TIMEOUT_S:
            raise SystemExit(f"not every rank was ready within {READY_TIMEOUT_S:g}s")
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit(f"a launcher exited: {[p.returncode for p in procs]}")
        time.sleep(0.05)
    return time.monotonic() - t0


class Bench:
    def __init__(self, sim: Any, tmp: Path) -> None:
        self.sim = sim
        self.tmp = tmp
        self.work = tmp / "work"
        self.env = sim.env()
        known = sim.ssh_dir / "known_hosts"
        self.ssh_opts = ["-F", str(sim.ssh_dir / "config"), "-o", f"UserKnownHostsFile={known}",
                         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]  # fmt: skip
        # the same intra-op threads for every launcher (dslaunch reads .deepspeed_env too)
        (sim.home / ".deepspeed_env").write_text(f"OMP_NUM_THREADS=1\nPYTHONPATH={REPO}\n")

    def hosts(self, n: int) -> Path:
        return self.sim.hostfile(slots=1, nodes=self.sim.nodes[:n])

    def _worker_args(self, ready: Path, tag: str) -> list[str]:
        return [str(WORKER), "--work", str(self.work), "--ready", str(ready), "--tag", tag]

    def dslaunch(self, n: int) -> dict[str, Any]:
        t0 = time.monotonic()
        up = dslaunch(self.env, "up", "-H", str(self.hosts(n)), "--work-dir", str(self.work), "--name", f"b{n}")
        ready = time.monotonic() - t0
        if up.returncode != 0:
            raise SystemExit(up.stdout + up.stderr)
        marker = f"DSLAUNCH_NODE_DIR={self.work}/b{n}-"
        t0 = time.monotonic()
        down = dslaunch(self.env, "down", "--name", f"b{n}")
        stop = time.monotonic() - t0
        if down.returncode != 0:
            raise SystemExit(down.stdout + down.stderr)
        time.sleep(LEFT_AFTER_S)
        left = kill_marked(marker)
        return {"ready_s": ready, "stop_s": stop, "left": len(left)}

    def deepspeed(self, n: int) -> dict[str, Any]:
        tag, ready = self._fresh()
        env = dict(self.env, PDSH_SSH_ARGS=" ".join([*self.ssh_opts, "-l%u", "%h"]),
                   PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # fmt: skip
        argv = ["deepspeed", "--hostfile", str(self.hosts(n)), "--launcher", "pdsh", "--force_multi",
                "--no_ssh_check", "--no_local_rank", "--master_addr", self.sim.nodes[0].addr,
                "--master_port", str(free_port()), *self._worker_args(ready, tag)]  # fmt: skip
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            up = _wait_ready(ready, n, [proc])
            return {"ready_s": up, **self._ctrl_c([proc], tag)}
        finally:
            self._reap([proc], tag)

    def torchrun(self, n: int) -> dict[str, Any]:
        tag, ready = self._fresh()
        port = free_port()
        procs = []
        for i, node in enumerate(self.sim.nodes[:n]):
            remote = (f"cd {REPO} && OMP_NUM_THREADS=1 {sys.executable} -m torch.distributed.run --nnodes {n} "
                      f"--nproc-per-node 1 --node-rank {i} --rdzv-backend c10d --rdzv-endpoint "
                      f"{self.sim.nodes[0].addr}:{port} --rdzv-id {tag} --local-addr {node.addr} "
                      + " ".join(self._worker_args(ready, tag)))  # fmt: skip
            procs.append(subprocess.Popen(["ssh", *self.ssh_opts, node.alias, remote], env=self.env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))  # fmt: skip
        try:
            up = _wait_ready(ready, n, procs)
            return {"ready_s": up, **self._ctrl_c(procs, tag)}
        finally:
            self._reap(procs, tag)

    def _fresh(self) -> tuple[str, Path]:
        tag = f"dslbench{uuid.uuid4().hex[:10]}"
        ready = self.tmp / tag
        ready.mkdir()
        return tag, ready

    def _ctrl_c(self, procs: list[subprocess.Popen[bytes]], tag: str) -> dict[str, Any]:
        """Ctrl-C as a user would (SIGINT to the launcher's process group), then look again."""
        find = lambda: [p for p in job_pids(tag) if p not in {q.pid for q in procs}]  # noqa: E731
        for p in procs:
            os.killpg(p.pid, signal.SIGINT)
        stop, _ = _wait_gone(find, LEFT_AFTER_S)
        time.sleep(max(0.0, LEFT_AFTER_S - stop))
        return {"stop_s": stop if stop < LEFT_AFTER_S else None, "left": len(find())}

    def _reap(self, procs: list[subprocess.Popen[bytes]], tag: str) -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        kill_marked(tag)


LAUNCHERS = ["dslaunch", "deepspeed", "torchrun"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    if not shutil.which("pdsh"):
        raise SystemExit("pdsh is not installed (apt-get install pdsh): needed for DeepSpeed's launcher")
    from dslaunch.engine.loader import tiny_model

    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp_s:
        tmp = Path(tmp_s)
        sim = SimCluster(tmp / "sim", max(sizes)).start()
        try:
            bench = Bench(sim, tmp)
            tiny_model(bench.work)  # built once; every launcher loads the same files
            rows = []
            for n in sizes:
                for name in LAUNCHERS:
                    r = getattr(bench, name)(n)
                    rows.append({"launcher": name, "nodes": n, **r})
                    stop = "-" if r["stop_s"] is None else f"{r['stop_s']:.2f}"
                    print(f"{name:>9} {n} node(s): ready {r['ready_s']:.2f} s, stop {stop} s, left {r['left']}",
                          flush=True)  # fmt: skip
        finally:
            sim.stop()
    report(rows, sizes, args.out)


def report(rows: list[dict[str, Any]], sizes: list[int], out: str | None) -> None:
    by = {(r["launcher"], r["nodes"]): r for r in rows}
    heads = ["nodes"] + [f"{x} ready s" for x in LAUNCHERS] + ["dslaunch / deepspeed", "dslaunch / torchrun"]
    body = []
    for n in sizes:
        d, s, t = (by[(x, n)]["ready_s"] for x in LAUNCHERS)
        body.append([n, d, s, t, d / s, d / t])
    print(table(heads, body))
    print()
    heads = ["nodes"] + [f"{x} stop s / left" for x in LAUNCHERS]
    body = [[n] + [f"{'-' if by[(x, n)]['stop_s'] is None else round(by[(x, n)]['stop_s'], 2)} / "
                   f"{by[(x, n)]['left']}" for x in LAUNCHERS] for n in sizes]  # fmt: skip
    print(table(heads, body))
    one = by[("dslaunch", sizes[0])]["ready_s"]
    scale = {n: by[("dslaunch", n)]["ready_s"] / one for n in sizes}
    print(f"dslaunch ready time vs {sizes[0]} node(s): " + ", ".join(f"{n}: {v:.2f}x" for n, v in scale.items()))
    setup = ("simulated SSH nodes x 1 slot on one machine, gloo, built-in tiny model via DeepSpeed "
             f"init_inference, OMP_NUM_THREADS=1; 'left' = processes of the run still alive "
             f"{LEFT_AFTER_S:g} s after the stop")  # fmt: skip
    write("launchers", {"setup": setup, "rows": rows, "dslaunch_scale": scale}, out)


if __name__ == "__main__":
    main()
