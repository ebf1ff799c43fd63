"""Replicas behind one router: throughput scaling, and availability while a replica restarts.

Scaling: a handler that sleeps a fixed time per batch (so the 2 cores do not cap it), served by
1, 2 and 4 replicas of one rank each on localhost, under the same closed-loop load; the ratio is
throughput over the 1-replica throughput measured in the same run (goal >= 0.9 x replicas).

Availability: the built-in tiny model, clients that do not retry, one rank SIGKILLed mid-run,
with 1 replica and with 2: failed requests (goal 0), p50/p99 latency during the event against
the steady state before it, and the time until the killed replica serves again.

    python benchmarks/replicas.py [--seconds 6] [--sleep-ms 50] [--out benchmarks/results/replicas.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import closed_loop, dslaunch, pct, table, write

from dslaunch.client import Client, FrontError

HANDLER = '''
import time

class Sleep:
    """Sleeps a fixed time per batch: the work of a replica, without using a core."""

    def load(self, ctx):
        self.ctx = ctx

    def __call__(self, batch):
        time.sleep(SLEEP_S)
        return list(batch)
'''


class Job:
    """One `dslaunch up` on localhost in a private home and work dir, ended on the way out."""

    def __init__(self, root: Path, name: str, slots: int, *args: str, env: dict[str, str] | None = None) -> None:
        self.root = root / name
        self.root.mkdir(parents=True)
        hosts = self.root / "hosts"
        hosts.write_text(f"localhost slots={slots}\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DSLAUNCH_")}
        self.env.update(DSLAUNCH_HOME=str(self.root / "home"), COLUMNS="200", **(env or {}))
        self.args = ["up", "-H", str(hosts), "--work-dir", str(self.root / "work"), "--timeout", "300", *args]

    def __enter__(self) -> Job:
        up = dslaunch(self.env, *self.args, timeout=400)
        if up.returncode != 0:
            dslaunch(self.env, "down", "--grace", "3")
            raise SystemExit(up.stdout + up.stderr)
        rec = json.loads((self.root / "home" / "jobs" / "default.json").read_text())
        self.port = int(rec["front"]["port"])
        return self

    def __exit__(self, *exc: object) -> None:
        dslaunch(self.env, "down", "--grace", "5")

    def status(self) -> dict[str, Any]:
        return json.loads(dslaunch(self.env, "status", "--json").stdout)


def scaling(root: Path, seconds: float, sleep_ms: float, clients: int, batch: int) -> list[dict[str, Any]]:
    mod = root / "handlers"
    mod.mkdir()
    (mod / "sleeper.py").write_text(HANDLER.replace("SLEEP_S", repr(sleep_ms / 1000)))
    rows = []
    for replicas in (1, 2, 4):
        args = ("--handler", "sleeper:Sleep", "--env", f"PYTHONPATH={mod}", "--tp", "1",
                "--max-batch-size", str(batch), "--batch-wait-ms", "0")  # fmt: skip
        with Job(root, f"scale{replicas}", replicas, *args) as job:

            def one(_i: int, state: dict[str, Any], port: int = job.port) -> tuple[int, None]:
                if "c" not in state:
                    state["c"] = Client("127.0.0.1", port, retry_for=0, timeout=60)
                    state["close"] = state["c"].close
                state["c"].infer({"x": 1})
                return 1, None

            closed_loop(clients, 1.0, one)  # warm-up
            res = closed_loop(clients, seconds, one)
            served = [r["served"] for r in job.status()["replicas"]]
        rows.append({"replicas": replicas, **res, "served_per_replica": served})
    base = rows[0]["requests_per_s"]
    for r in rows:
        r["speedup"] = r["requests_per_s"] / base
        r["efficiency"] = r["speedup"] / r["replicas"]
    return rows


def availability(root: Path, replicas: int, seconds: float, clients: int = 4, k: int = 8) -> dict[str, Any]:
    """Steady load, a SIGKILL to the last replica's rank, load until it serves again + 2 s."""
    with Job(root, f"avail{replicas}", replicas, "--tp", "1", "--batch-wait-ms", "0") as job:
        lat: list[tuple[float, float]] = []  # (end time, latency)
        failures: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client(n: int) -> None:
            with Client("127.0.0.1", job.port, retry_for=0, timeout=120) as c:
                while not stop.is_set():
                    t = time.monotonic()
                    try:
                        c.generate(f"Hello {n}", max_new_tokens=k)
                    except (FrontError, OSError) as e:
                        with lock:
                            failures.append(repr(e))
                        return
                    with lock:
                        lat.append((time.monotonic(), time.monotonic() - t))

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        victim = next(r for r in job.status()["ranks"] if r["replica"] == replicas - 1)["pid"]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        while True:
            reps = job.status()["replicas"]
            if reps[-1]["restarts"] >= 1 and reps[-1]["state"] == "ready" and reps[-1]["linked"] == "ready":
                break
            if time.monotonic() - t_kill > 300:
                raise SystemExit("the replica did not come back within 300 s")
            time.sleep(0.2)
        rejoin = time.monotonic() - t_kill
        time.sleep(2)
        t_end = time.monotonic()
        stop.set()
        for t in threads:
            t.join(120)
    steady = [x for e, x in lat if e < t_kill]
    event = [x for e, x in lat if t_kill <= e <= t_end]
    return {
        "replicas": replicas, "failed": len(failures), "failures": failures[:5], "rejoin_s": round(rejoin, 2),
        "steady_p50_ms": pct(steady, 0.5) * 1e3, "steady_p99_ms": pct(steady, 0.99) * 1e3,
        "event_p50_ms": pct(event, 0.5) * 1e3, "event_p99_ms": pct(event, 0.99) * 1e3,
        "event_requests": len(event), "max_ms": max(event, default=float("nan")) * 1e3,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--sleep-ms", type=float, default=50)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp:
        root = Path(tmp)
        scale = scaling(root, args.seconds, args.sleep_ms, args.clients, args.batch)
        avail = [availability(root, n, args.seconds) for n in (1, 2)]
    print(table(["replicas", "requests/s", "speedup", "per replica", "p50 ms", "p99 ms", "served per replica"],
                [[r["replicas"], r["requests_per_s"], r["speedup"], r["efficiency"], r["p50_ms"], r["p99_ms"],
                  r["served_per_replica"]] for r in scale]))  # fmt: skip
    print()
    print(table(["replicas", "failed", "steady p50 ms", "steady p99 ms", "event p50 ms", "event p99 ms",
                 "slowest ms", "rejoin s"],
                [[a["replicas"], a["failed"], a["steady_p50_ms"], a["steady_p99_ms"], a["event_p50_ms"],
                  a["event_p99_ms"], a["max_ms"], a["rejoin_s"]] for a in avail]))  # fmt: skip
    write("replicas", {
        "setup": f"localhost, 1 rank per replica; scaling: handler sleeping {args.sleep_ms:g} ms per batch, "
                 f"--max-batch-size {args.batch}, {args.clients} closed-loop clients; availability: built-in tiny "
                 "model, 4 clients without retries, SIGKILL to the last replica's rank",
        "load_avg_at_start": load, "scaling": scale, "availability": avail,
    }, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
