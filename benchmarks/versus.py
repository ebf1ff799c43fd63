"""dslaunch next to `transformers serve --continuous-batching --device cpu`, side by side.

The same model directory, one rank / one server process each with both cores: closed-loop
clients (1, 16, 32), 32 new tokens, greedy. Both servers stay up and are measured in turn, level
by level, for several rounds; the tables give the median over rounds (this machine is shared and
its load changes by the minute, so only measurements taken close together are compared). Each
turn runs twice: answers in one piece (tokens/s, latency p50/p99), then streamed (time to the
first text chunk, p50/p99). dslaunch is reached through its NDJSON front, the peer through its
OpenAI-style `/v1/completions` (no chat template: the same raw prompt). Both count the tokens
they really generated (a row may end early at EOS). The models: the built-in tiny Llama and a
~28M-parameter Llama built from a config (random weights, no download).

    python benchmarks/versus.py [--seconds 4] [--rounds 3] [--models tiny,llama28m] [--cold-seconds 10]

Cold: after the warm rounds, each server is started afresh per level (16, 32 clients), one at
a time, and measured for its first --cold-seconds under load with no warm-up, then for the
--cold-seconds after those (the same server, now warm: cold / next compares the two).

Needs the peer's extras: pip install -e '.[bench]' (transformers[serving]).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import REPO, build_llama, closed_loop, dslaunch, table, write

from dslaunch.client import Client

PROMPTS = [f"Request {i:02d}: the quick brown fox jumps over the lazy dog" for i in range(32)]
LEVELS = [1, 16, 32]
COLD_LEVELS = [16, 32]
NEW_TOKENS = 32


# -- dslaunch ---------------------------------------------------------------------------------
def _ours(port: int, stream: bool) -> Any:
    def one(i: int, state: dict[str, Any]) -> tuple[int, float | None]:
        if "c" not in state:
            state["c"] = Client("127.0.0.1", port, retry_for=0, timeout=300)
            state["close"] = state["c"].close
        prompt = PROMPTS[i % len(PROMPTS)]
        if not stream:
            return state["c"].generate(prompt, max_new_tokens=NEW_TOKENS)["tokens"], None
        t0, first = time.perf_counter(), None
        for event in state["c"].stream(prompt, max_new_tokens=NEW_TOKENS):
            if first is None and event.get("chunk"):
                first = time.perf_counter() - t0
            if event.get("done"):
                return event["tokens"], first
        raise RuntimeError("the stream ended without an answer")

    return one


@contextlib.contextmanager
def dslaunch_server(env: dict[str, str], work: Path, model: Path) -> Iterator[Any]:
    """`dslaunch up` on this machine, one rank; yields the client factory."""
    up = dslaunch(
        env, "up", "--work-dir", str(work), "--model", str(model), "--max-batch-size", "32", "--batch-wait-ms", "0"
    )
    if up.returncode != 0:
        raise SystemExit(up.stdout + up.stderr)
    try:
        rec = json.loads((Path(env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
        port = rec["front"]["port"]
        factory = lambda stream: _ours(port, stream)  # noqa: E731
        factory.port = port  # type: ignore[attr-defined]
        yield factory
    finally:
        dslaunch(env, "down", "--grace", "5")


# -- transformers serve -----------------------------------------------------------------------
def _theirs(port: int, model: Path, stream: bool) -> Any:
    def one(i: int, state: dict[str, Any]) -> tuple[int, float | None]:
        if "c" not in state:
            state["c"] = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            state["close"] = state["c"].close
        body = {"model": str(model), "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": NEW_TOKENS,
                "temperature": 0, "stream": stream}  # fmt: skip
        t0, first = time.perf_counter(), None
        state["c"].request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = state["c"].getresponse()
        if resp.status != 200:
            raise RuntimeError(f"transformers serve answered {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            return json.loads(resp.read())["usage"]["completion_tokens"], None
        tokens = 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"transformers serve: {chunk['error']}")
            if first is None and chunk["choices"] and chunk["choices"][0].get("text"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return tokens, first

    return one


@contextlib.contextmanager
def peer_server(model: Path, tmp: Path) -> Iterator[Any]:
    """`transformers serve --continuous-batching --device cpu`; yields the client factory."""
    from tests.simnodes import free_port

    port = free_port()
    log = open(tmp / "peer.log", "w")  # noqa: SIM115 (closed below)
    code = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; main()"
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(model), "--continuous-batching", "--device",
                             "cpu", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(OSError):
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"transformers serve did not start; see {tmp / 'peer.log'}")
            time.sleep(0.5)
        yield lambda stream: _theirs(port, model, stream)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def measure(make: Any, n: int, seconds: float) -> dict[str, float]:
    """One turn at one level: in one piece, then streamed."""
    out = closed_loop(n, seconds, make(False))
    streamed = closed_loop(n, seconds, make(True))
    out.update(ttft_p50_ms=streamed["ttft_p50_ms"], ttft_p99_ms=streamed["ttft_p99_ms"],
               stream_tokens_per_s=streamed["tokens_per_s"],
               both_wall_s=out["wall_s"] + streamed["wall_s"])  # fmt: skip
    return out


def engine_share(make: Any, n: int, seconds: float) -> dict[str, float]:
    """dslaunch's turn, with rows per step, tokens per forward pass and busy share from its counters."""
    with Client("127.0.0.1", make.port, timeout=60) as c:
        before = c.stats()
        out = measure(make, n, seconds)
        after = c.stats()
    steps = max(after["steps"] - before["steps"], 1)
    rows = after["rows_per_step"]["mean"] * after["steps"] - before["rows_per_step"]["mean"] * before["steps"]
    tokens = after["tokens_generated"] - before["tokens_generated"]
    passes = max(after["forward_passes"] - before["forward_passes"], 1)
    out.update(rows_per_step=rows / steps, tokens_per_forward=tokens / passes,
               engine_busy=(after["engine_busy_s"] - before["engine_busy_s"]) / out["both_wall_s"])  # fmt: skip
    return out


def cold_start(env: dict[str, str], work: Path, model: Path, tmp: Path, seconds: float) -> dict[str, Any]:
    """Each server's first SECONDS under load right after it says it is ready, then the SECONDS
    after those on the same server (warm): fresh for every level, one server up at a time."""
    out: dict[str, Any] = {"dslaunch": {}, "transformers_serve": {}}
    for n in COLD_LEVELS:
        for who, server in (("dslaunch", lambda: dslaunch_server(env, work, model)),
                            ("transformers_serve", lambda: peer_server(model, tmp))):  # fmt: skip
            with server() as make:
                cold = closed_loop(n, seconds, make(False))
                warm = closed_loop(n, seconds, make(False))
            out[who][n] = {"cold": cold, "warm": warm, "cold_over_warm": cold["tokens_per_s"] / warm["tokens_per_s"]}
    return out


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds (and the rounds themselves, for the JSON)."""
    keys = rounds[0].keys()
    return {**{k: statistics.median(r[k] for r in rounds) for k in keys}, "rounds": rounds}  # type: ignore[dict-item]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="Measuring time per level, mode and round.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="tiny,llama28m")
    cold_help = "Also measure each fresh server's first seconds under load (0: skip)."
    ap.add_argument("--cold-seconds", type=float, default=10.0, help=cold_help)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from dslaunch.engine import tinymodel

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dslaunch-versus-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "work").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSLAUNCH_")}
        env["DSLAUNCH_HOME"] = str(tmp / "home")
        for name in args.models.split(","):
            if name == "tiny":
                model = tinymodel.build(tmp / "models" / tinymodel.NAME)
            else:
                model = build_llama(tmp / "models" / name)
            with dslaunch_server(env, tmp / "work", model) as ours, peer_server(model, tmp) as theirs:
                for make in (ours, theirs):
                    closed_loop(4, 2.0, make(False))  # warm-up (the peer builds its manager on first use)
                runs: dict[str, dict[int, list[dict[str, float]]]] = {"dslaunch": {}, "transformers_serve": {}}
                for _ in range(args.rounds):
                    for n in LEVELS:
                        for who, make in (("dslaunch", ours), ("transformers_serve", theirs)):
                            turn = engine_share if who == "dslaunch" else measure
                            runs[who].setdefault(n, []).append(turn(make, n, args.seconds))
            results[name] = {who: {n: median_of(r) for n, r in by.items()} for who, by in runs.items()}
            report(name, results[name]["dslaunch"], results[name]["transformers_serve"])
            if args.cold_seconds > 0:
                results[name]["cold"] = cold_start(env, tmp / "work", model, tmp, args.cold_seconds)
                report_cold(results[name])
    import transformers

    setup = (f"one rank / one server with {os.cpu_count()} threads each, CPU, {NEW_TOKENS} new tokens, greedy, "
             f"closed-loop clients; transformers {transformers.__version__} serve --continuous-batching --device cpu "
             "(defaults otherwise); dslaunch --max-batch-size 32 --batch-wait-ms 0; "
             f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s")  # fmt: skip
    write("versus", {"setup": setup, "models": results}, args.out)


def report(name: str, ours: dict[int, Any], theirs: dict[int, Any]) -> None:
    rows = []
    for n in LEVELS:
        a, b = ours[n], theirs[n]
        rows.append([n, a["tokens_per_s"], b["tokens_per_s"], a["tokens_per_s"] / b["tokens_per_s"],
                     f"{a['p50_ms']:.0f} / {b['p50_ms']:.0f}", f"{a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f}",
                     f"{a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f}"])  # fmt: skip
    print(f"\n{name}")
    print(table(["clients", "dslaunch tok/s", "transformers serve tok/s", "ratio", "p50 ms ours / peer",
                 "TTFT p50 ms ours / peer", "TTFT p99 ms ours / peer"], rows))  # fmt: skip
    share = [[n, ours[n]["rows_per_step"], ours[n]["tokens_per_forward"], ours[n]["engine_busy"]] for n in LEVELS]
    print(table(["clients", "dslaunch rows/step", "tokens/forward pass", "engine busy"], share))


def report_cold(result: dict[str, Any]) -> None:
    rows = []
    for n in COLD_LEVELS:
        ours, theirs = result["cold"]["dslaunch"][n], result["cold"]["transformers_serve"][n]
        row = [n]
        for side in (ours, theirs):
            row += [side["cold"]["tokens_per_s"], side["warm"]["tokens_per_s"], side["cold_over_warm"]]
        rows.append(row)
    print(table(["clients", "dslaunch cold tok/s", "next", "cold / next", "transformers serve cold tok/s", "next",
                 "cold / next"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
