"""Per-request timings of one engine, with vLLM's semantics and buckets, as plain numbers.

Rank 0's generation loop (`engine.generation.Generation`, through its `observer`) reports, once
per step, the first tokens and the gaps between tokens of its rows, and each row when it ends.
This keeps them as bucket counts and sums under one lock: cheap on the loop thread, and plain
JSON in the `stats` answer, so the router can show each replica's and add them up
(`serving.metrics` turns them into Prometheus families).

What each one measures (as vLLM does; the clock is the replica leader's, from the moment the
request reached it):

- time to first token: arrival to the step that chose the row's first token;
- inter-token latency: between two consecutive tokens of a row (every token after the first);
- end-to-end latency: arrival to the row's end;
- queue time: arrival to the step the row joined the batch in.
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

# vLLM's buckets (vllm/v1/metrics/loggers.py), seconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
HISTOGRAMS = {"ttft": TTFT_BUCKETS, "itl": ITL_BUCKETS, "e2e": REQUEST_BUCKETS, "queue": REQUEST_BUCKETS}
# vLLM's finished_reason label values: eos and stop strings are both "stop"; a row that went away
# (client gone, time-out, cut off) or failed is "abort"
FINISHED = {"eos": "stop", "stop": "stop", "length": "length"}


class Hist:
    """Counts per bucket (the last one: above every bound) and the sum of what was observed."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def doc(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


class RequestTimes:
    """The engine's request histograms and token counters (rank 0; any thread may read)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hist = {name: Hist(bounds) for name, bounds in HISTOGRAMS.items()}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}

    def step(self, ttfts: list[float], gaps: list[float], prompt_tokens: int, generated: int) -> None:
        """One step: the rows that got their first token (seconds since arrival), the gaps of
        the others, the prompt tokens that were prefilled, the tokens generated."""
        with self.lock:
            for v in ttfts:
                self.hist["ttft"].observe(v)
            for v in gaps:
                self.hist["itl"].observe(v)
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated

    def ended(self, reason: str, e2e: float, queued: float) -> None:
        """A row ended (answered, or not: `reason` is then cancelled or error)."""
        with self.lock:
            label = FINISHED.get(reason, "abort")
            self.finished[label] = self.finished.get(label, 0) + 1
            self.hist["e2e"].observe(e2e)
            self.hist["queue"].observe(queued)

    def doc(self) -> dict[str, Any]:
        """What the `stats` answer carries (`merge` adds several up)."""
        with self.lock:
            return {
                **{name: h.doc() for name, h in self.hist.items()},
                "prompt_tokens": self.prompt_tokens,
                "generation_tokens": self.generation_tokens,
                "finished": dict(self.finished),
            }


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several engines' `doc()`s as one: bucket counts, sums and counters added."""
    out: dict[str, Any] = {"prompt_tokens": 0, "generation_tokens": 0, "finished": {}}
    for name, bounds in HISTOGRAMS.items():
        out[name] = {"counts": [0] * (len(bounds) + 1), "sum": 0.0}
    for d in docs:
        for name in HISTOGRAMS:
            h = d.get(name) or {}
            counts = h.get("counts") or []
            if len(counts) == len(out[name]["counts"]):
                out[name]["counts"] = [a + int(b) for a, b in zip(out[name]["counts"], counts, strict=True)]
                out[name]["sum"] += float(h.get("sum") or 0.0)
        out["prompt_tokens"] += int(d.get("prompt_tokens") or 0)
        out["generation_tokens"] += int(d.get("generation_tokens") or 0)
        for label, n in (d.get("finished") or {}).items():
            out["finished"][label] = out["finished"].get(label, 0) + int(n)
    return out
