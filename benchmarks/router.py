"""What the router process adds: the same replica leader reached through the router, and directly.

One replica at world size 1 (the `Echo` handler of tests/routerkit.py, answering at once) served
two ways in the same run: behind a router (client → router → link → leader, the product's path)
and listening on its own port (client → leader, the path before the router existed). Requests
alternate between the two, one at a time, so both see the same machine; the difference of the
medians is the router's cost (goal < 0.5 ms). A second table does the same with the built-in
tiny model and 1-token generate requests.

    python benchmarks/router.py [--samples 400] [--out benchmarks/results/router.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, pct, table, write

from dslaunch.client import Client
from dslaunch.wire.nodedir import NodeDir, node_dir_path
from dslaunch.wire.rankenv import NodeEnv
from dslaunch.wire.serve import ServeSpec
from tests.routerkit import DELAY_ENV, Kit
from tests.simnodes import free_port


def direct_replica(kit: Kit, r: int) -> tuple[subprocess.Popen[bytes], int]:
    """A replica leader listening on a port of its own (no router), like a front inside rank 0."""
    nd = NodeDir.at(node_dir_path(str(kit.work), kit.job, r))
    nd.root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    serve = dataclasses.replace(kit.serve, port=port)
    node = NodeEnv(job_id=kit.job, name="t", node_rank=0, host="localhost", node_dir=str(nd.root), rank_offset=0,
                   world_size=1, local_world_size=1, nnodes=1, init_method="tcp", init_url="", backend="gloo",
                   master_addr="127.0.0.1", master_port=free_port(), serve=serve, unit=r)  # fmt: skip
    env = {**os.environ, **node.to_env(), DELAY_ENV: "0", "ROUTERKIT_ATTEMPT": "0"}
    env.pop("DSLAUNCH_AUTO_THREADS", None)
    log = open(nd.root / "replica.log", "ab")  # noqa: SIM115
    p = subprocess.Popen([sys.executable, "-m", "tests.routerkit"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                         env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while True:
        try:
            with Client("127.0.0.1", port, retry_for=0, timeout=5) as c:
                c.health()
            return p, port
        except OSError:
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the direct replica did not start:\n{kit.logs()}") from None
            time.sleep(0.2)


def measure(serve: ServeSpec, samples: int, send: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp:
        kit = Kit(Path(tmp), serve, replicas=1)
        direct = None
        try:
            kit.start_router()
            kit.start_replica(0)
            direct, port = direct_replica(kit, 1)
            lat: dict[str, list[float]] = {"router": [], "direct": []}
            with Client("127.0.0.1", kit.port, retry_for=0, timeout=60) as via, \
                    Client("127.0.0.1", port, retry_for=0, timeout=60) as straight:  # fmt: skip
                for c in (via, straight):
                    for _ in range(20):  # warm-up: connections, caches, the first batches
                        send(c)
                for i in range(samples):
                    order = [("router", via), ("direct", straight)]
                    for name, c in order if i % 2 else order[::-1]:
                        t = time.perf_counter()
                        send(c)
                        lat[name].append(time.perf_counter() - t)
        finally:
            if direct is not None:
                direct.terminate()
                direct.wait(20)
            kit.close()
    out = {k: {"p50_ms": pct(v, 0.5) * 1e3, "p90_ms": pct(v, 0.9) * 1e3, "p99_ms": pct(v, 0.99) * 1e3}
           for k, v in lat.items()}  # fmt: skip
    out["added_p50_ms"] = out["router"]["p50_ms"] - out["direct"]["p50_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    echo = measure(ServeSpec(handler="tests.routerkit:Echo", batch_wait_ms=0), args.samples,
                   lambda c: c.infer({"x": 1}))  # fmt: skip
    tiny = measure(ServeSpec(batch_wait_ms=0), args.samples, lambda c: c.generate("Hello", max_new_tokens=1))
    rows = [[name, r["direct"]["p50_ms"], r["router"]["p50_ms"], r["added_p50_ms"], r["direct"]["p99_ms"],
             r["router"]["p99_ms"]] for name, r in (("echo handler", echo), ("tiny model, 1 token", tiny))]  # fmt: skip
    print(table(["request", "direct p50 ms", "via router p50 ms", "added p50 ms", "direct p99 ms", "via router p99 ms"],
                rows))  # fmt: skip
    write("router", {"setup": "one replica at world size 1 on localhost, reached via the router and directly, "
                     f"{args.samples} alternating requests each", "load_avg_at_start": load,
                     "echo": echo, "tiny_generate_1_token": tiny}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
