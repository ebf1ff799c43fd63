"""What the benchmark scripts share: the repo on sys.path, running dslaunch, the machine, output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def dslaunch(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m dslaunch ARGS` as a user runs it; the caller checks the return code."""
    return subprocess.run([sys.executable, "-m", "dslaunch", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain right-aligned text table (also valid Markdown) for the terminal and the README."""
    cells = [[str(h) for h in headers]] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |"]
                     + [line(r) for r in cells[1:]])  # fmt: skip


def write(name: str, result: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nan when empty."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def build_llama(out: Path, hidden: int = 512, layers: int = 8) -> Path:
    """A Llama built from a config with random weights and the built-in model's tokenizer (no
    download): with the defaults about 28M parameters, enough that compute, not Python, is what
    a forward pass costs on a CPU."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dslaunch.engine import tinymodel

    tok = tinymodel.build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(cfg)
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def closed_loop(n: int, seconds: float, one: Any) -> dict[str, float]:
    """`n` clients, each sending its next request as soon as its last one is answered, for
    `seconds`. `one(client_index, state)` sends one request and returns (tokens, first-token s
    or None); `state` is the client's own dict (for its connection). Errors void the run."""
    import threading
    import time

    lat: list[float] = []
    ttft: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    start = threading.Barrier(n + 1)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        state: dict[str, Any] = {}
        try:
            start.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                got, first = one(i, state)
                with lock:
                    lat.append(time.perf_counter() - t)
                    tokens[0] += got
                    if first is not None:
                        ttft.append(first)
        except BaseException as e:
            errors.append(e)
            start.abort()
        finally:
            if state.get("close"):
                state["close"]()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"a client failed: {errors[0]!r}")
    out = {"tokens_per_s": tokens[0] / wall, "requests_per_s": len(lat) / wall, "wall_s": wall,
           "p50_ms": pct(lat, 0.5) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "requests": len(lat)}  # fmt: skip
    if ttft:
        out.update(ttft_p50_ms=pct(ttft, 0.5) * 1e3, ttft_p99_ms=pct(ttft, 0.99) * 1e3)
    return out


def public_front(sim: Any, work: Path) -> tuple[str | None, list[str]]:
    """The token and `up` flags that let clients outside the nodes' network namespaces reach the
    routers (every address, with a token); none on loopback nodes."""
    if sim.network is None:
        return None, []
    token = os.urandom(12).hex()
    (work / "token").write_text(token)
    return token, ["--bind", "0.0.0.0", "--token-file", str(work / "token")]


def pick_network(asked: str | None) -> str:
    """`netns` (nodes in network namespaces, where partitions can be made) or `loopback`: what
    was asked, else netns where this machine allows it."""
    from tests import netns

    why_not = netns.available()
    if asked == "netns" and why_not:
        raise SystemExit(f"--network netns: {why_not}")
    if asked is None and why_not:
        print(f"nodes on loopback, so no partition or silent node: {why_not}", flush=True)
    return asked or ("loopback" if why_not else "netns")


@contextlib.contextmanager
def sim_job_dirs(prefix: str, nodes: int = 2, netns: bool = False) -> Iterator[tuple[Any, dict[str, str], Path]]:
    """Simulated SSH nodes in a throw-away directory, the environment a user's shell would have
    for them (its own DSLAUNCH_HOME) and a work directory: for a benchmark that runs a job. A
    SIGTERM still ends the job and the nodes' sshd on the way out. `netns`: each node in a network
    namespace of its own (`tests/netns.py`)."""
    from tests.simnodes import SimCluster

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "work").mkdir()
        sim = SimCluster(tmp / "sim", nodes, netns=netns).start()
        try:
            yield sim, {**sim.env(), "COLUMNS": "200", "DSLAUNCH_HOME": str(tmp / "home")}, tmp / "work"
        finally:
            sim.stop()
