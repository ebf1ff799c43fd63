"""Fan-out cost: connect + pre-flight probe on 1, 2, 4, 8 simulated SSH nodes, parallel vs serial.

Each round opens fresh SSH connections (handshake included) and runs `dslaunch.node.ctl probe` on
every node, as `up` does before it starts anything. The baseline is the same work done one node
at a time (`--parallelism 1`), measured in the same run. Goal: 8 nodes within 1.3x of 1 node.

    python benchmarks/fanout.py [--rounds 5] [--out benchmarks/results/fanout.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import table, write

from dslaunch.launch.hostfile import Node
from dslaunch.transport.nodes import Cluster, ConnectOptions
from tests.simnodes import SimCluster


def one_round(nodes: list[Node], parallelism: int) -> float:
    t0 = time.perf_counter()
    with Cluster(nodes, ConnectOptions(), sys.executable, parallelism) as cluster:
        results = cluster.map(lambda c: c.call("probe", {}))
    took = time.perf_counter() - t0
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise SystemExit(f"probe failed: {bad[0]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sizes = [1, 2, 4, 8]
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp:
        sim = SimCluster(Path(tmp), max(sizes)).start()
        old_home = os.environ.get("HOME")
        os.environ["HOME"] = str(sim.home)
        try:
            nodes = [Node(n.alias, 1) for n in sim.nodes]
            one_round(nodes[:1], 1)  # warm the page cache: first interpreter starts are slower
            rows = []
            for n in sizes:
                par = statistics.median(one_round(nodes[:n], 32) for _ in range(args.rounds))
                ser = statistics.median(one_round(nodes[:n], 1) for _ in range(args.rounds))
                rows.append({"nodes": n, "parallel_s": round(par, 4), "serial_s": round(ser, 4)})
        finally:
            if old_home is not None:
                os.environ["HOME"] = old_home
            sim.stop()
    base = rows[0]["parallel_s"]
    for r in rows:
        r["parallel_vs_1_node"] = round(r["parallel_s"] / base, 2)
        r["serial_vs_1_node"] = round(r["serial_s"] / base, 2)
    print(table(["nodes", "parallel s", "x 1 node", "serial s", "x 1 node"],
                [[r["nodes"], r["parallel_s"], r["parallel_vs_1_node"], r["serial_s"], r["serial_vs_1_node"]]
                 for r in rows]))  # fmt: skip
    goal = rows[-1]["parallel_vs_1_node"] <= 1.3
    print(f"goal (8 nodes within 1.3x of 1): {'met' if goal else 'NOT met'}; cores here: {os.cpu_count()}")
    if not goal:
        print(
            "note: every simulated node's sshd and probe interpreter runs on this machine's cores, so the "
            "work of 8 nodes competes for them; on real nodes that work runs on each node's own CPU"
        )
    write("fanout", {"rounds": args.rounds, "rows": rows, "goal_met": goal}, args.out)


if __name__ == "__main__":
    main()
