"""The paged, packed engine against the left-padded one, in process (one rank, the real batcher
and rank 0's real loop in a thread, no sockets), on the ~28M Llama built from a config:

- shared prefix: 16 streaming requests whose prompts share a ~290-token system prompt, then a
  distinct question, against distinct prefixes of the same length: time to first token p50;
- long prompts among decodes: 8 streaming decoders while a ~390-token prompt arrives every
  second: the decoders' inter-token gap p50 and p99 (with the defaults, where --max-step-tokens
  alone bounds a step, and with the step-time cap on, --max-itl-ratio 2);
- KV capacity at equal memory (no model: the scheduler's own accounting): prompts of 16-1024
  tokens with 64 new tokens each, how many rows run at once in a 16384-token pool, paged (blocks
  used) against padded (rows x the longest row).

Both engines are loaded side by side and measured in turn, for several rounds (medians).

    python benchmarks/paged.py [--rounds 3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import build_llama, pct, table, write

THREADS = 2
SYSTEM = "You are a careful assistant. Answer the question below in one short line, plainly. " * 5  # 275 tokens


class InProcess:
    """An engine behind the batcher and rank 0's loop; `stream` times each request's chunks."""

    def __init__(self, model: Path, work: Path, paged: bool, **spec: Any) -> None:
        import torch.distributed as dist

        import dslaunch.engine.causal as causal
        from dslaunch.engine.base import EngineContext
        from dslaunch.engine.loader import load_engine
        from dslaunch.rank.lockstep import Channel, lead
        from dslaunch.serving.batcher import Batcher
        from dslaunch.serving.config import FrontConfig
        from dslaunch.serving.stats import Stats
        from dslaunch.wire.protocol import Limits
        from dslaunch.wire.serve import ServeSpec

        if not dist.is_initialized():
            from socket import socket

            with socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.spec = ServeSpec(model=str(model), batch_wait_ms=0.0, max_new_tokens=4096, **spec)
        ctx = EngineContext(rank=0, world_size=1, local_rank=0, device="cpu", multi_node=False, work_dir=work,
                            group=dist.group.WORLD, options=self.spec)  # fmt: skip
        real = causal.supports_paged
        causal.supports_paged = real if paged else (lambda model: False)
        try:
            self.engine = load_engine(self.spec, ctx)
        finally:
            causal.supports_paged = real
        assert self.engine.kv_path == ("paged" if paged else "padded")
        self.limits = Limits(max_prompts=self.spec.max_batch_size, max_new_tokens=self.spec.max_new_tokens)
        self.stats = Stats()
        self.batcher = Batcher(FrontConfig(max_batch_size=self.spec.max_batch_size, batch_wait_ms=0.0,
                                           max_queue=1024), self.stats)  # fmt: skip
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self._lead = threading.Thread(target=lead, args=(self.engine, Channel(0, 1, 600), self.batcher, 0.5),
                                      daemon=True)  # fmt: skip
        self._lead.start()

    def stream(self, prompt: str, k: int) -> list[float]:
        """Submit a streaming request; the monotonic time of its start and of every chunk."""
        from dslaunch.serving.batcher import Pending
        from dslaunch.wire.protocol import parse_request

        req = parse_request(json.dumps({"id": 1, "op": "generate", "prompt": prompt, "max_new_tokens": k,
                                        "stream": True}), self.limits)  # fmt: skip
        t0 = time.monotonic()
        self.engine.check(req)
        job = Pending(req, self.loop)
        self.batcher.submit(job)

        async def collect() -> list[float]:
            times = [t0]
            while True:
                event = await job.events.get()
                if event[0] != "chunk":
                    job.cancelled = True
                    return times
                times.append(time.monotonic())

        return asyncio.run_coroutine_threadsafe(collect(), self.loop).result(600)

    def close(self) -> None:
        self.batcher.close()
        self._lead.join(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def together(fns: list[Any]) -> list[Any]:
    out: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    return out


def shared_prefix(s: InProcess, shared: bool, rnd: int) -> float:
    """TTFT p50 (ms) of 16 concurrent streams: one system prompt, or 16 of the same length."""

    def prompt(i: int) -> str:
        head = SYSTEM if shared else SYSTEM.replace("careful", f"careful{rnd}x{i}", 1)
        return f"{head}Question {rnd}-{i}: what is {i} plus {rnd}?"

    starts = together([lambda i=i: s.stream(prompt(i), 8) for i in range(16)])
    return 1000 * statistics.median(t[1] - t[0] for t in starts)


def long_among_decodes(s: InProcess, seconds: float) -> tuple[float, float]:
    """Inter-token gap p50 and p99 (ms) of 8 decoders while a ~390-token prompt comes every second."""
    long = "The quick brown fox jumps over the lazy dog and runs on. " * 20  # 380 tokens
    stop = time.monotonic() + seconds

    def joiners() -> None:
        i = 0
        while time.monotonic() < stop:
            threading.Thread(target=s.stream, args=(f"{i} {long}", 4), daemon=True).start()
            i += 1
            time.sleep(1.0)

    threading.Thread(target=joiners, daemon=True).start()
    k = min(400, 40 * int(seconds) + 40)
    runs = together([lambda i=i: s.stream(f"Decoder {i}: count slowly", k) for i in range(8)])
    gaps = [b - a for t in runs for a, b in itertools.pairwise(t[2:]) if a < stop]
    return 1000 * pct(gaps, 0.5), 1000 * pct(gaps, 0.99)


def capacity(pool: int = 16384, seed: int = 0) -> dict[str, float]:
    """Rows running at once at equal KV memory: the padded cache's admission against the paged one's."""
    from dslaunch.engine.scheduler import Scheduler

    rng = random.Random(seed)
    rows = [(rng.randint(16, 1024), 64) for _ in range(256)]
    padded, longest = 0, 0
    for p, k in rows:  # admitted in order while rows x the longest fits
        if (padded + 1) * max(longest, p + k) > pool:
            break
        padded, longest = padded + 1, max(longest, p + k)
    s = Scheduler(pool // 16, 16, max_rows=256, step_tokens=1 << 20, prefix_caching=False)
    for i, (p, k) in enumerate(rows):
        s.add(i, [1 + i] * p, k)
    s.schedule()
    return {"pool_tokens": pool, "padded_rows": padded, "paged_rows": len(s.running),
            "ratio": round(len(s.running) / max(1, padded), 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(THREADS)
    work = Path(tempfile.mkdtemp(prefix="dslaunch-paged-"))
    model = build_llama(work / "llama28m")
    systems = {
        "paged": InProcess(model, work, True, max_batch_size=32),
        "paged, --max-itl-ratio 2": InProcess(model, work, True, max_batch_size=32, max_itl_ratio=2.0),
        "padded": InProcess(model, work, False, max_batch_size=32),
    }
    for s in systems.values():  # warm alike
        together([lambda s=s: s.stream("warm up " * 20, 4) for _ in range(4)])
    res: dict[str, dict[str, list[float]]] = {n: {} for n in systems}
    for rnd in range(args.rounds):
        for name, s in systems.items():
            r = res[name]
            r.setdefault("ttft_shared_ms", []).append(shared_prefix(s, True, rnd))
            r.setdefault("ttft_distinct_ms", []).append(shared_prefix(s, False, rnd))
            p50, p99 = long_among_decodes(s, args.seconds)
            r.setdefault("itl_p50_ms", []).append(p50)
            r.setdefault("itl_p99_ms", []).append(p99)
            print(name, rnd, {k: round(v[-1], 1) for k, v in r.items()}, flush=True)
    # a round in which no gap was measured (nan) is left out of the median
    med = {n: {k: round(statistics.median([x for x in v if x == x] or [float("nan")]), 1) for k, v in r.items()}
           for n, r in res.items()}  # fmt: skip
    for n, s in systems.items():
        snap = s.stats.snapshot(0, 0)
        med[n].update({k: snap.get(k) for k in ("prefix_cache_hits", "prefix_cache_queries", "preemptions")})
        s.close()
    cap = capacity()
    rows = [[n, m["ttft_shared_ms"], m["ttft_distinct_ms"], round(m["ttft_shared_ms"] / m["ttft_distinct_ms"], 2),
             m["itl_p50_ms"], m["itl_p99_ms"], round(m["itl_p99_ms"] / m["itl_p50_ms"], 1)]
            for n, m in med.items()]  # fmt: skip
    print(table(["engine", "TTFT shared ms", "TTFT distinct ms", "ratio", "ITL p50 ms", "ITL p99 ms", "p99/p50"],
                rows))  # fmt: skip
    print(table(["pool tokens", "padded rows", "paged rows", "ratio"], [list(cap.values())]))
    write("paged", {"rounds": args.rounds, "seconds": args.seconds, "threads": THREADS, "engines": med,
                    "raw": res, "capacity": cap}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
