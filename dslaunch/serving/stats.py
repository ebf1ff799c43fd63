"""Counters and a latency window for `stats`, `status` and the front's status file.

Generate jobs run step by step: `batches` then counts the groups of rows that joined the running
batch together (`batch_size`: rows per group), and `steps` / `rows_per_step` say how full each
forward pass was. Embed and handler jobs run whole batches, one step each.

`request_times` are the engine's per-request histograms (`serving.reqtimes`); the serving loop
sets `engine` to a reader of the engine's own counters (which KV cache path; for the paged one
`CACHE_FIELDS`, block size and preemptions), merged into the snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any

from dslaunch.serving.reqtimes import RequestTimes

# what an engine with a block pool or a prefix cache reports (counters, and blocks now in use)
CACHE_FIELDS = ("prefix_cache_queries", "prefix_cache_hits", "kv_blocks_used", "kv_blocks_total")


class Stats:
    """Counters and a latency window for `stats`, `status` and the front's status file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.time()
        self.served = 0
        self.errors: Counter[str] = Counter()
        self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self.latency: deque[float] = deque(maxlen=4096)
        self.tokens = 0
        self.busy_s = 0.0
        self.steps = 0
        self.forwards = 0
        self.step_rows = 0
        self.step_rows_max = 0
        self.engine: Any = None  # a callable: the engine's own counters (kv_cache, prefix cache, blocks)
        self.times = RequestTimes()

    def answered(self, seconds: float) -> None:
        with self.lock:
            self.served += 1
            self.latency.append(seconds)

    def failed(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def batch(self, rows: int, seconds: float, tokens: int) -> None:
        """A whole batch: one step of `rows` rows."""
        with self.lock:
            self.batches += 1
            self.batch_sizes[rows] += 1
            self._step(rows, seconds, tokens)

    def step(self, rows: int, seconds: float, tokens: int, joined: int, forwards: int | None = None) -> None:
        """One step of the running batch (`rows` rows in its forward passes, `joined` of them new).
        The padded cache runs one decode pass for the rows that were running and one prefill pass
        for the joiners; a packed step is one pass (`forwards`)."""
        with self.lock:
            if joined:
                self.batches += 1
                self.batch_sizes[joined] += 1
            if forwards is None:
                forwards = int(rows > joined) + int(joined > 0)
            self._step(rows, seconds, tokens, forwards)

    def _step(self, rows: int, seconds: float, tokens: int, forwards: int = 1) -> None:
        self.steps += 1
        self.forwards += forwards
        self.step_rows += rows
        self.step_rows_max = max(self.step_rows_max, rows)
        self.busy_s += seconds
        self.tokens += tokens

    def snapshot(self, queue: int, in_flight: int) -> dict[str, Any]:
        doc = self._snapshot(queue, in_flight)
        doc["request_times"] = self.times.doc()
        return doc

    def _snapshot(self, queue: int, in_flight: int) -> dict[str, Any]:
        with self.lock:
            lat = sorted(self.latency)
            sizes = dict(sorted(self.batch_sizes.items()))
            rows = sum(k * v for k, v in sizes.items())
            return {
                "served": self.served,
                "errors": dict(self.errors),
                "queue": queue,
                "in_flight": in_flight,
                "batches": self.batches,
                "batch_size": {
                    "mean": round(rows / self.batches, 3) if self.batches else 0.0,
                    "max": max(sizes, default=0),
                    "histogram": {str(k): v for k, v in sizes.items()},
                },
                "steps": self.steps,
                "forward_passes": self.forwards,
                "rows_per_step": {
                    "mean": round(self.step_rows / self.steps, 3) if self.steps else 0.0,
                    "max": self.step_rows_max,
                },
                "latency_ms": {f"p{q}": _percentile(lat, q) for q in (50, 90, 99)},
                "tokens_generated": self.tokens,
                "engine_busy_s": round(self.busy_s, 4),
                "tokens_per_s": round(self.tokens / self.busy_s, 1) if self.busy_s else 0.0,
                "uptime_s": round(time.time() - self.started, 1),
                **self._engine(),
            }

    def _engine(self) -> dict[str, Any]:
        """The paged engine's counters: kv_cache ("paged"), prefix_cache_queries/_hits,
        kv_blocks_used/_total, kv_block_size, preemptions, steps_capped; {} for other engines."""
        try:
            return dict(self.engine()) if self.engine is not None else {}
        except Exception:  # read from another thread while a step runs: skip this once
            return {}


def _percentile(sorted_s: list[float], q: int) -> float | None:
    if not sorted_s:
        return None
    i = min(len(sorted_s) - 1, max(0, round(q / 100 * len(sorted_s) + 0.5) - 1))
    return round(sorted_s[i] * 1000, 2)
