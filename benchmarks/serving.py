"""Serving overhead: the engine called directly (offline) vs the same engine behind `dslaunch up`.

Offline: two processes form a gloo group on this machine and call `dslaunch.engine` directly, with
the same model (the built-in tiny one), world size 2, prompts and `max_new_tokens`, at batch sizes
1, 4, 16 and 32: the physical limit. Served: `dslaunch up` on two simulated SSH nodes, closed-loop
clients through the socket front at concurrency 1, 4, 16 and 32. Also measured: the front's own
added latency (a 1-token request served minus the same 1-token batch offline, and a `health`
round trip that never reaches the engine), the batching gain (served concurrency 16 over 1) and the
simplest alternative, one request at a time with no batching (offline batch 1, no front at all).
Run with the default --batch-wait-ms 0 and with 5 ms.

    python benchmarks/serving.py [--seconds 3] [--out benchmarks/results/serving.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, dslaunch, table, write

from dslaunch.client import Client

PROMPTS = [f"Request {i:02d}: the quick brown fox jumps over the lazy dog" for i in range(32)]
LEVELS = [1, 4, 16, 32]
NEW_TOKENS = 32
# One intra-op thread per rank, offline and served: the simulated nodes share this machine's cores,
# and two ranks each spinning on every core would measure contention, not dslaunch.
THREADS = 1
LATENCY_SAMPLES = 60


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# -- offline: the engine, no front ------------------------------------------------------------
def offline_rank(rank: int, port: int, work: Path, seconds: float, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from dslaunch.engine.base import EngineContext, Work
    from dslaunch.engine.loader import load_engine, tiny_model
    from dslaunch.wire.protocol import GenParams
    from dslaunch.wire.serve import ServeSpec

    torch.set_num_threads(THREADS)
    tiny_model(work)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = EngineContext(rank=rank, world_size=2, local_rank=0, device="cpu", multi_node=True, work_dir=work,
                        group=dist.group.WORLD, options=ServeSpec())  # fmt: skip
    engine = load_engine(ctx.options, ctx)

    def timed(batch: int, new_tokens: int, budget: float) -> tuple[list[float], int]:
        work_ = Work("generate", PROMPTS[:batch], [GenParams(max_new_tokens=new_tokens)] * batch)
        engine.run(work_, None)  # warm-up
        times: list[float] = []
        tokens = 0
        t0 = time.perf_counter()
        while True:
            go = torch.tensor([int(time.perf_counter() - t0 < budget)])
            dist.broadcast(go, 0)  # every rank runs the same number of batches
            if not go.item():
                return times, tokens
            t = time.perf_counter()
            res = engine.run(work_, None)
            times.append(time.perf_counter() - t)
            tokens += sum(r["tokens"] for r in res or [])

    rows = {}
    for b in LEVELS:
        times, tokens = timed(b, NEW_TOKENS, seconds)
        rows[b] = {"batches": len(times), "tokens_per_s": tokens / sum(times), "batch_ms_p50": _pct(times, 0.5) * 1e3}
    one, _ = timed(1, 1, seconds / 2)
    if rank == 0:
        out.write_text(json.dumps({"levels": rows, "one_token_ms_p50": _pct(one, 0.5) * 1e3}))
    dist.destroy_process_group()


def offline(work: Path, seconds: float, tmp: Path) -> dict[str, Any]:
    from tests.simnodes import free_port

    port = free_port()
    out = tmp / "offline.json"
    procs = [subprocess.Popen([sys.executable, __file__, "--offline-rank", str(r), "--port", str(port), "--work",
                               str(work), "--seconds", str(seconds), "--offline-out", str(out)], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
             for r in range(2)]  # fmt: skip
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes != [0, 0]:
        raise SystemExit(f"offline ranks failed: {codes}")
    data = json.loads(out.read_text())
    data["levels"] = {int(k): v for k, v in data["levels"].items()}
    return data


# -- served: dslaunch up, clients through the front -------------------------------------------
def clients(port: int, n: int, seconds: float, new_tokens: int = NEW_TOKENS) -> dict[str, float]:
    lat: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with Client("127.0.0.1", port, retry_for=0, timeout=300) as c:
                start.wait()
                deadline = time.perf_counter() + seconds
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    r = c.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens)
                    with lock:
                        lat.append(time.perf_counter() - t)
                        tokens[0] += r["tokens"]
        except BaseException as e:  # reported below; a benchmark with failed requests is void
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a client failed: {errors[0]!r}")
    return {"tokens_per_s": tokens[0] / wall, "requests_per_s": len(lat) / wall, "wall_s": wall,
            "p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3, "requests": len(lat)}  # fmt: skip


def _engine_share(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, float]:
    """From the front's own counters: mean rows per batch, how busy the engine was, and its speed
    while busy. Served tokens/s = busy share x engine tokens/s at the batch sizes that formed."""
    d = lambda key: after[key] - before[key]  # noqa: E731
    rows = after["batch_size"]["mean"] * after["batches"] - before["batch_size"]["mean"] * before["batches"]
    busy = d("engine_busy_s")
    return {"mean_batch": rows / max(d("batches"), 1), "engine_busy": busy / wall,
            "engine_tokens_per_s": d("tokens_generated") / busy if busy else 0.0}  # fmt: skip


def served(env: dict[str, str], hosts: Path, work: Path, wait_ms: float, seconds: float) -> dict[str, Any]:
    up = dslaunch(env, "up", "-H", str(hosts), "--work-dir", str(work), "--max-batch-size", "32",
                  "--batch-wait-ms", f"{wait_ms:g}", "--env", f"OMP_NUM_THREADS={THREADS}")  # fmt: skip
    if up.returncode != 0:
        raise SystemExit(up.stdout + up.stderr)
    try:
        rec = json.loads((Path(env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
        port = rec["front"]["port"]
        clients(port, 4, 1.0)  # warm-up
        levels = {}
        with Client("127.0.0.1", port, timeout=60) as c:
            for n in LEVELS:
                before = c.stats()
                levels[n] = clients(port, n, seconds)
                levels[n].update(_engine_share(before, c.stats(), levels[n]["wall_s"]))
            one, health = [], []
            for _ in range(LATENCY_SAMPLES):
                t = time.perf_counter()
                c.generate(PROMPTS[0], max_new_tokens=1)
                one.append(time.perf_counter() - t)
                t = time.perf_counter()
                c.health()
                health.append(time.perf_counter() - t)
        return {"batch_wait_ms": wait_ms, "levels": levels, "one_token_ms_p50": _pct(one, 0.5) * 1e3,
                "health_ms_p50": _pct(health, 0.5) * 1e3}  # fmt: skip
    finally:
        dslaunch(env, "down", "--grace", "5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="Measuring time per level.")
    ap.add_argument("--out", default=None)
    ap.add_argument("--offline-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--offline-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_rank is not None:
        offline_rank(args.offline_rank, args.port, Path(args.work), args.seconds, Path(args.offline_out))
        return
    from tests.simnodes import SimCluster

    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp_s:
        tmp = Path(tmp_s)
        work = tmp / "work"
        work.mkdir()
        base = offline(work, args.seconds, tmp)
        sim = SimCluster(tmp / "sim", 2).start()
        try:
            env = sim.env()
            runs = [served(env, sim.hostfile(slots=1), work, w, args.seconds) for w in (0.0, 5.0)]
        finally:
            sim.stop()
    report(base, runs, args.out)


def report(base: dict[str, Any], runs: list[dict[str, Any]], out: str | None) -> None:
    rows = []
    for c in LEVELS:
        off = base["levels"][c]["tokens_per_s"]
        row = [c, off]
        for run in runs:
            lv = run["levels"][c]
            row += [
                lv["tokens_per_s"],
                lv["tokens_per_s"] / off,
                lv["p50_ms"],
                lv["p99_ms"],
                lv["mean_batch"],
                lv["engine_busy"],
            ]
        rows.append(row)
    heads = ["concurrency", "offline tok/s"]
    for run in runs:
        w = f"w{run['batch_wait_ms']:g}"
        heads += [f"served tok/s {w}", f"ratio {w}", f"p50 ms {w}", f"p99 ms {w}", f"mean batch {w}", f"busy {w}"]
    print(table(heads, rows))
    naive = base["levels"][1]["tokens_per_s"]
    summary = []
    for run in runs:
        lv = run["levels"]
        run["ratio"] = {c: lv[c]["tokens_per_s"] / base["levels"][c]["tokens_per_s"] for c in LEVELS}
        run["front_added_ms_p50"] = run["one_token_ms_p50"] - base["one_token_ms_p50"]
        run["batching_gain_16_over_1"] = lv[16]["tokens_per_s"] / lv[1]["tokens_per_s"]
        run["over_one_at_a_time_16"] = lv[16]["tokens_per_s"] / naive
        summary.append([f"{run['batch_wait_ms']:g}", min(run["ratio"].values()), run["front_added_ms_p50"],
                        run["health_ms_p50"], run["batching_gain_16_over_1"],
                        run["over_one_at_a_time_16"]])  # fmt: skip
    print()
    print(table(["batch wait ms", "worst served/offline", "front added p50 ms", "health p50 ms",
                 "batching gain c16/c1", "c16 / one-at-a-time"], summary))  # fmt: skip
    print(f"offline 1-token batch p50 {base['one_token_ms_p50']:.2f} ms; one at a time (offline batch 1) "
          f"{naive:.0f} tok/s")  # fmt: skip
    setup = (f"2 simulated SSH nodes x 1 slot, gloo, built-in tiny model, {NEW_TOKENS} new tokens, greedy, "
             "closed-loop clients")  # fmt: skip
    write("serving", {"setup": setup, "offline": base, "served": runs}, out)


if __name__ == "__main__":
    main()
