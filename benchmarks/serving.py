"""Serving overhead: the engine called directly (offline) vs the same engine behind `dslaunch up`.

Offline: two processes form a gloo group on this machine and run the engine in process with all
requests available at once: batch size = concurrency (1, 4, 16, 32), the same prompts and 32 new
tokens, greedy. Served: `dslaunch up` on two simulated SSH nodes (one rank each, tensor parallel
over gloo), closed-loop clients through the socket front at the same concurrency. For the
built-in tiny model and a ~28M-parameter Llama built from a config. From the front's own
counters: mean rows per step (how full each forward was) and the engine's busy share (time in
steps over wall time). Also: the front's own added latency (a 1-token request served minus the
same 1-token batch offline), a `health` round trip (never reaches the engine), and with --tp1
the same served run on one rank with both cores (what TP=2 over two nodes adds).

Everything stays up and the systems are measured in turn, level by level, for several rounds;
the tables give medians over rounds. This machine is shared and its load changes by the minute:
only measurements taken close together are compared.

    python benchmarks/serving.py [--seconds 4] [--rounds 3] [--models tiny,llama28m] [--tp1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
LATENCY_SAMPLES = 30
RESULT = "@@ "  # marks rank 0's answer lines among the libraries' own output


# -- offline: the engine, no front ------------------------------------------------------------
def offline_rank(rank: int, port: int, work: Path, model: str) -> None:
    """One offline rank: rank 0 reads `batch new_tokens seconds` lines and tells rank 1."""
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
    if rank == 0:
        print(RESULT + "{}", flush=True)  # loaded
    while True:
        cmd = torch.zeros(3, dtype=torch.int64)
        if rank == 0:
            line = sys.stdin.readline().split()
            cmd = torch.tensor([int(x) for x in line] if line else [0, 0, 0], dtype=torch.int64)
        dist.broadcast(cmd, 0)
        batch, new_tokens, ms = cmd.tolist()
        if not batch:
            break
        work_ = Work("generate", PROMPTS[:batch], [GenParams(max_new_tokens=new_tokens)] * batch)
        engine.run(work_, None)  # warm-up
        times: list[float] = []
        tokens = 0
        t0 = time.perf_counter()
        while True:
            go = torch.tensor([int(time.perf_counter() - t0 < ms / 1000)])
            dist.broadcast(go, 0)  # every rank runs the same number of batches
            if not go.item():
                break
            t = time.perf_counter()
            res = engine.run(work_, None)
            times.append(time.perf_counter() - t)
            tokens += sum(r["tokens"] for r in res or [])
        if rank == 0:
            out = {"batches": len(times), "tokens_per_s": tokens / sum(times), "batch_ms_p50": pct(times, 0.5) * 1e3}
            print(RESULT + json.dumps(out), flush=True)
    dist.destroy_process_group()


class Offline:
    """The two offline ranks, kept up between turns."""

    def __init__(self, work: Path, model: str) -> None:
        from tests.simnodes import free_port

        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        args = ["--port", str(port), "--work", str(work), "--model", model]
        self.lead = subprocess.Popen([sys.executable, __file__, "--offline-rank", "0", *args], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.other = subprocess.Popen([sys.executable, __file__, "--offline-rank", "1", *args], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL)  # fmt: skip
        self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.lead.stdout is not None
        for line in self.lead.stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise SystemExit(f"the offline ranks ended: {self.lead.wait()}, {self.other.wait()}")

    def run(self, batch: int, new_tokens: int, seconds: float) -> dict[str, Any]:
        assert self.lead.stdin is not None
        self.lead.stdin.write(f"{batch} {new_tokens} {int(seconds * 1000)}\n")
        self.lead.stdin.flush()
        return self._answer()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.lead.stdin is not None
            self.lead.stdin.close()
        for p in (self.lead, self.other):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- served: dslaunch up, clients through the front -------------------------------------------
def clients(port: int, n: int, seconds: float, new_tokens: int = NEW_TOKENS) -> dict[str, float]:
    def one(i: int, state: dict[str, Any]) -> tuple[int, None]:
        if "client" not in state:
            state["client"] = Client("127.0.0.1", port, retry_for=0, timeout=300)
            state["close"] = state["client"].close
        return state["client"].generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=new_tokens)["tokens"], None

    return closed_loop(n, seconds, one)


def served_level(port: int, n: int, seconds: float) -> dict[str, float]:
    """One turn at one level, with mean rows per step and busy share from the front's counters."""
    with Client("127.0.0.1", port, timeout=60) as c:
        before = c.stats()
        out = clients(port, n, seconds)
        after = c.stats()
    steps = after["steps"] - before["steps"]
    rows = after["rows_per_step"]["mean"] * after["steps"] - before["rows_per_step"]["mean"] * before["steps"]
    busy = after["engine_busy_s"] - before["engine_busy_s"]
    passes = after["forward_passes"] - before["forward_passes"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    out.update(rows_per_step=rows / max(steps, 1), engine_busy=busy / out["wall_s"], steps=steps,
               tokens_per_forward=tokens / max(passes, 1))  # fmt: skip
    return out


def latency(port: int) -> dict[str, float]:
    """A 1-token request and a `health` round trip, one at a time."""
    one, health = [], []
    with Client("127.0.0.1", port, timeout=60) as c:
        for _ in range(LATENCY_SAMPLES):
            t = time.perf_counter()
            c.generate(PROMPTS[0], max_new_tokens=1)
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.health()
            health.append(time.perf_counter() - t)
    return {"one_token_ms_p50": pct(one, 0.5) * 1e3, "health_ms_p50": pct(health, 0.5) * 1e3}


@contextlib.contextmanager
def served(env: dict[str, str], name: str, hosts: Path | None, work: Path, model: str, wait_ms: float,
           threads: int) -> Iterator[int]:  # fmt: skip
    """A job up for the whole run; yields its front's port."""
    # a generous --command-timeout: on this shared machine starting an agent over SSH can take a minute
    args = ["up", "--name", name, "--work-dir", str(work), "--command-timeout", "240", "--timeout", "600",
            "--max-batch-size", "32", "--batch-wait-ms", f"{wait_ms:g}",
            "--env", f"OMP_NUM_THREADS={threads}"]  # fmt: skip
    args += ["-H", str(hosts)] if hosts else []
    args += ["--model", model] if model else []
    up = dslaunch(env, *args, timeout=900)
    if up.returncode != 0:
        raise SystemExit(up.stdout + up.stderr)
    try:
        rec = json.loads((Path(env["DSLAUNCH_HOME"]) / "jobs" / f"{name}.json").read_text())
        port = int(rec["front"]["port"])
        clients(port, 4, 1.0)  # warm-up
        yield port
    finally:
        dslaunch(env, "down", "--name", name, "--grace", "5")


def median_of(rounds: list[dict[str, float]]) -> dict[str, Any]:
    return {**{k: statistics.median(r[k] for r in rounds) for k in rounds[0]}, "rounds": rounds}


def measure(name: str, model: str, env: dict[str, str], hosts: Path, work: Path, args: Any) -> dict[str, Any]:
    off = Offline(work, model)
    try:
        with contextlib.ExitStack() as stack:
            systems = {"tp2": stack.enter_context(served(env, "tp2", hosts, work, model, args.wait, THREADS))}
            if args.tp1:
                systems["tp1"] = stack.enter_context(served(env, "tp1", None, work, model, args.wait, 2))
            runs: dict[str, dict[int, list[dict[str, float]]]] = {"offline": {}, **{k: {} for k in systems}}
            lat: dict[str, list[dict[str, float]]] = {"offline": [], **{k: [] for k in systems}}
            for _ in range(args.rounds):
                for n in LEVELS:
                    runs["offline"].setdefault(n, []).append(off.run(n, NEW_TOKENS, args.seconds))
                    for key, port in systems.items():
                        runs[key].setdefault(n, []).append(served_level(port, n, args.seconds))
                one = off.run(1, 1, args.seconds / 2)["batch_ms_p50"]
                lat["offline"].append({"one_token_ms_p50": one})
                for key, port in systems.items():
                    lat[key].append(latency(port))
    finally:
        off.close()
    out: dict[str, Any] = {}
    for key, by in runs.items():
        out[key] = {"levels": {n: median_of(r) for n, r in by.items()}, **median_of(lat[key])}
        if key != "offline":
            out[key]["ratio"] = {n: statistics.median(s["tokens_per_s"] / o["tokens_per_s"]
                                                      for s, o in zip(by[n], runs["offline"][n], strict=True))
                                 for n in LEVELS}  # fmt: skip
            out[key]["front_added_ms_p50"] = out[key]["one_token_ms_p50"] - out["offline"]["one_token_ms_p50"]
    report(name, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="Measuring time per level, system and round.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="tiny,llama28m", help="Comma-separated: tiny, llama28m.")
    ap.add_argument("--wait", type=float, default=5.0, help="--batch-wait-ms of the served jobs.")
    ap.add_argument("--tp1", action="store_true", help="Also serve on one rank with both cores.")
    ap.add_argument("--out", default=None)
    ap.add_argument("--offline-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.offline_rank is not None:
        offline_rank(args.offline_rank, args.port, Path(args.work), args.model)
        return
    from tests.simnodes import SimCluster

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp_s:
        tmp = Path(tmp_s)
        work = tmp / "work"
        work.mkdir()
        sim = SimCluster(tmp / "sim", 2).start()
        try:
            for name in args.models.split(","):
                model = "" if name == "tiny" else str(build_llama(tmp / "models" / name))
                results[name] = measure(name, model, sim.env(), sim.hostfile(slots=1), work, args)
        finally:
            sim.stop()
    setup = (f"offline: 2 ranks x {THREADS} thread, gloo, in process; tp2: dslaunch up on 2 simulated SSH nodes x 1 "
             f"slot x {THREADS} thread; tp1: dslaunch up on localhost, 1 rank x 2 threads; {NEW_TOKENS} new tokens, "
             f"greedy, closed-loop clients, --max-batch-size 32, --batch-wait-ms {args.wait:g}; medians of "
             f"{args.rounds} interleaved rounds of {args.seconds:g} s")  # fmt: skip
    write("serving", {"setup": setup, "models": results}, args.out)


def report(name: str, out: dict[str, Any]) -> None:
    served_keys = [k for k in out if k != "offline"]
    rows = []
    for c in LEVELS:
        row: list[Any] = [c, out["offline"]["levels"][c]["tokens_per_s"]]
        for key in served_keys:
            lv = out[key]["levels"][c]
            row += [lv["tokens_per_s"], out[key]["ratio"][c], lv["p50_ms"], lv["rows_per_step"],
                    lv["tokens_per_forward"], lv["engine_busy"]]  # fmt: skip
        rows.append(row)
    heads = ["clients", "offline tok/s"]
    for key in served_keys:
        heads += [f"{key} tok/s", f"{key}/offline", f"{key} p50 ms", f"{key} rows/step", f"{key} tok/fwd",
                  f"{key} busy"]  # fmt: skip
    print(f"\n{name}")
    print(table(heads, rows))
    for key in served_keys:
        worst = min(out[key]["ratio"].values())
        print(f"{name} {key}: worst served/offline {worst:.3f}, front added p50 {out[key]['front_added_ms_p50']:.2f} "
              f"ms (1-token batch offline {out['offline']['one_token_ms_p50']:.2f} ms), "
              f"health p50 {out[key]['health_ms_p50']:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
