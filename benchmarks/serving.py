"""Serving overhead: the engine called directly (offline) vs the same engine behind `dslaunch up`.

Offline: two processes form a gloo group on this machine and run the engine in process with all
requests available at once: batch size = concurrency (1, 4, 16, 32), the same prompts and 32 new
tokens, greedy. Served: `dslaunch up` on two simulated SSH nodes (one rank each, tensor parallel
over gloo), closed-loop clients through the socket front at the same concurrency. For the
built-in tiny model and a ~28M-parameter Llama built from a config. From the front's own counters:
mean rows per step (how full each forward was) and the engine's busy share (time spent in steps
over wall time). Also measured: the front's own added latency (a 1-token request served minus the
same 1-token batch offline) and a `health` round trip, which never reaches the engine; and, with
--tp1, the same served run on one rank with both cores (what TP=2 over two nodes adds).

    python benchmarks/serving.py [--seconds 4] [--models tiny,llama28m] [--waits 5] [--tp1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, build_llama, closed_loop, dslaunch, pct, table, write

from dslaunch.client import Client

PROMPTS = [f"Request {i:02d}: the quick brown fox jumps over the lazy dog" for i in range(32)]
LEVELS = [1, 4, 16, 32]
NEW_TOKENS = 32
# One intra-op thread per rank, offline and served: the simulated nodes share this machine's cores,
# and two ranks each spinning on every core would measure contention, not dslaunch.
THREADS = 1
LATENCY_SAMPLES = 60


# -- offline: the engine, no front ------------------------------------------------------------
def offline_rank(rank: int, port: int, work: Path, model: str, seconds: float, out: Path) -> None:
    import torch
    import torch.distributed as dist

    from dslaunch.engine.base import EngineContext, Work
    from dslaunch.engine.loader import load_engine, tiny_model
    from dslaunch.wire.protocol import GenParams
    from dslaunch.wire.serve import ServeSpec

    torch.set_num_threads(THREADS)
    tiny_model(work)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    spec = ServeSpec(model=model or None, max_batch_size=32)
    ctx = EngineContext(rank=rank, world_size=2, local_rank=0, device="cpu", multi_node=True, work_dir=work,
                        group=dist.group.WORLD, options=spec)  # fmt: skip
    engine = load_engine(spec, ctx)

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
        rows[b] = {"batches": len(times), "tokens_per_s": tokens / sum(times), "batch_ms_p50": pct(times, 0.5) * 1e3}
    one, _ = timed(1, 1, seconds / 2)
    if rank == 0:
        out.write_text(json.dumps({"levels": rows, "one_token_ms_p50": pct(one, 0.5) * 1e3}))
    dist.destroy_process_group()


def offline(work: Path, model: str, seconds: float, tmp: Path) -> dict[str, Any]:
    from tests.simnodes import free_port

    port = free_port()
    out = tmp / "offline.json"
    procs = [subprocess.Popen([sys.executable, __file__, "--offline-rank", str(r), "--port", str(port), "--work",
                               str(work), "--model", model, "--seconds", str(seconds), "--offline-out", str(out)],
                              cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
             for r in range(2)]  # fmt: skip
    try:
        codes = [p.wait(timeout=900) for p in procs]
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
    def one(i: int, state: dict[str, Any]) -> tuple[int, None]:
        if "client" not in state:
            state["client"] = Client("127.0.0.1", port, retry_for=0, timeout=300)
            state["close"] = state["client"].close
        return state["client"].generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens)["tokens"], None

    return closed_loop(n, seconds, one)


def _engine_share(before: dict[str, Any], after: dict[str, Any], wall: float) -> dict[str, float]:
    """From the front's own counters: mean rows per forward step, and how busy the engine was."""
    steps = after["steps"] - before["steps"]
    rows = after["rows_per_step"]["mean"] * after["steps"] - before["rows_per_step"]["mean"] * before["steps"]
    busy = after["engine_busy_s"] - before["engine_busy_s"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    return {"rows_per_step": rows / max(steps, 1), "engine_busy": busy / wall, "steps": steps,
            "engine_tokens_per_s": tokens / busy if busy else 0.0}  # fmt: skip


def served(env: dict[str, str], hosts: Path | None, work: Path, model: str, wait_ms: float, seconds: float,
           threads: int = THREADS) -> dict[str, Any]:  # fmt: skip
    args = ["up", "--work-dir", str(work), "--max-batch-size", "32", "--batch-wait-ms", f"{wait_ms:g}",
            "--env", f"OMP_NUM_THREADS={threads}"]  # fmt: skip
    args += ["-H", str(hosts)] if hosts else []
    args += ["--model", model] if model else []
    up = dslaunch(env, *args)
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
        return {"batch_wait_ms": wait_ms, "ranks": 2 if hosts else 1, "threads_per_rank": threads, "levels": levels,
                "one_token_ms_p50": pct(one, 0.5) * 1e3, "health_ms_p50": pct(health, 0.5) * 1e3}  # fmt: skip
    finally:
        dslaunch(env, "down", "--grace", "5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="Measuring time per level.")
    ap.add_argument("--models", default="tiny,llama28m", help="Comma-separated: tiny, llama28m.")
    ap.add_argument("--waits", default="5", help="--batch-wait-ms values to serve with, comma-separated.")
    ap.add_argument("--tp1", action="store_true", help="Also serve on one rank with both cores.")
    ap.add_argument("--out", default=None)
    ap.add_argument("--offline-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--offline-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_rank is not None:
        offline_rank(args.offline_rank, args.port, Path(args.work), args.model, args.seconds, Path(args.offline_out))
        return
    from tests.simnodes import SimCluster

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp_s:
        tmp = Path(tmp_s)
        work = tmp / "work"
        work.mkdir()
        sim = SimCluster(tmp / "sim", 2).start()
        try:
            env = sim.env()
            for name in args.models.split(","):
                model = "" if name == "tiny" else str(build_llama(tmp / "models" / name))
                base = offline(work, model, args.seconds, tmp)
                runs = [served(env, sim.hostfile(slots=1), work, model, float(w), args.seconds)
                        for w in args.waits.split(",")]  # fmt: skip
                if args.tp1:
                    runs.append(served(env, None, work, model, float(args.waits.split(",")[0]), args.seconds, 2))
                results[name] = {"offline": base, "served": runs}
                report(name, base, runs)
        finally:
            sim.stop()
    setup = (f"offline: 2 ranks x {THREADS} thread, gloo, in process; served: dslaunch up on 2 simulated SSH nodes "
             f"x 1 slot; {NEW_TOKENS} new tokens, greedy, closed-loop clients, --max-batch-size 32")  # fmt: skip
    write("serving", {"setup": setup, "models": results}, args.out)


def report(name: str, base: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    rows = []
    for c in LEVELS:
        off = base["levels"][c]["tokens_per_s"]
        row: list[Any] = [c, off]
        for run in runs:
            lv = run["levels"][c]
            row += [lv["tokens_per_s"], lv["tokens_per_s"] / off, lv["p50_ms"], lv["rows_per_step"], lv["engine_busy"]]
        rows.append(row)
    heads = ["clients", "offline tok/s"]
    for run in runs:
        w = f"w{run['batch_wait_ms']:g}" + ("" if run["ranks"] == 2 else " tp1")
        heads += [f"served tok/s {w}", f"served/offline {w}", f"p50 ms {w}", f"rows/step {w}", f"busy {w}"]
    print(f"\n{name}")
    print(table(heads, rows))
    for run in runs:
        lv = run["levels"]
        run["ratio"] = {c: lv[c]["tokens_per_s"] / base["levels"][c]["tokens_per_s"] for c in LEVELS}
        run["front_added_ms_p50"] = run["one_token_ms_p50"] - base["one_token_ms_p50"]
        print(f"{name} w{run['batch_wait_ms']:g} ranks {run['ranks']}: worst served/offline "
              f"{min(run['ratio'].values()):.3f}, front added p50 {run['front_added_ms_p50']:.2f} ms "
              f"(1-token batch offline {base['one_token_ms_p50']:.2f} ms), "
              f"health p50 {run['health_ms_p50']:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
