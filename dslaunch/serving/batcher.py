"""The batcher on rank 0's loop thread: queued requests in, batches of rows out, answers back.

It waits for the first request, then up to `--batch-wait-ms` for more (never more rows than
`--max-batch-size`). Answers and stream chunks travel back to the asyncio thread through each
request's own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from typing import Any

from dslaunch.engine.base import Work
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.stats import Stats
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError, Request

STOPPING = "the job is stopping or restarting; retry"


class Pending:
    """One request waiting for its answer; the loop thread and the asyncio thread share it."""

    def __init__(self, req: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.req = req
        self.kind = "probe" if req.op == "health" else req.op
        self.rows = len(req.inputs) if req.inputs else 1
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.t0 = time.monotonic()
        self.cancelled = False  # set by the asyncio thread (time-out, client gone), read by the engine

    def put(self, event: tuple[Any, ...]) -> None:
        """Thread-safe: events arrive in the order they were put (chunks before the answer)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class RowBatch:
    """A batch of requests flattened into rows; the engine's sink on rank 0."""

    def __init__(self, jobs: list[Pending]) -> None:
        self.jobs = jobs
        self.rows: list[tuple[Pending, int]] = [(j, i) for j in jobs for i in range(j.rows)]
        kind = jobs[0].kind
        if kind == "probe":
            self.work = Work("probe", [None])
        else:
            self.work = Work(kind, [x for j in jobs for x in j.req.inputs], [j.req.params for j, _ in self.rows])

    def chunk(self, row: int, text: str) -> None:
        job, index = self.rows[row]
        if job.req.stream:
            job.put(("chunk", index, text))

    def cancelled(self, row: int) -> bool:
        return self.rows[row][0].cancelled

    def resolve(self, results: list[Any]) -> None:
        if self.work.kind == "probe":
            self.jobs[0].put(("done", results))
            return
        start = 0
        for job in self.jobs:
            job.put(("done", results[start : start + job.rows]))
            start += job.rows

    def fail(self, code: str, message: str) -> None:
        for job in self.jobs:
            job.put(("error", code, message))


class Batcher:
    """Bounded queue of pending requests, cut into batches for rank 0's loop thread."""

    def __init__(self, cfg: FrontConfig, stats: Stats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.cv = threading.Condition()
        self.queue: deque[Pending] = deque()
        self.closed = False
        self.why = ""
        self.in_flight = 0

    @property
    def depth(self) -> int:
        return len(self.queue)

    def submit(self, job: Pending) -> None:
        with self.cv:
            if self.closed:
                raise ProtocolError(P.UNAVAILABLE, self.why)
            if len(self.queue) >= self.cfg.max_queue:
                raise ProtocolError(P.OVERLOADED, f"{len(self.queue)} requests queued (--max-queue); retry later")
            self.queue.append(job)
            self.cv.notify()

    def close(self, why: str = STOPPING) -> None:
        """Refuse new work and answer everything still queued with `unavailable`, saying why."""
        with self.cv:
            if self.closed:
                return  # the first reason stands (a lost rank, then the agent's SIGTERM)
            self.closed = True
            self.why = why
            left = list(self.queue)
            self.queue.clear()
            self.cv.notify_all()
        for job in left:
            job.put(("error", P.UNAVAILABLE, why))

    def next_batch(self, timeout: float) -> RowBatch | bool | None:
        wait_s = self.cfg.batch_wait_ms / 1000
        with self.cv:
            deadline = time.monotonic() + timeout
            while not self._drop_cancelled() and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cv.wait(left)
            if self.closed:
                return None
            head = self.queue[0]
            if head.kind != "probe":
                # once the first request is here, wait a little for more of the same kind
                until = head.t0 + wait_s
                while not self.closed and self._rows(head.kind) < self.cfg.max_batch_size:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
            jobs = self._take(head.kind)
            self.in_flight += sum(j.rows for j in jobs)
        return RowBatch(jobs) if jobs else False

    def ran(self, batch: Any, seconds: float, results: list[Any]) -> None:
        tokens = sum(r.get("tokens", 0) for r in results if isinstance(r, dict))
        self.stats.batch(len(batch.rows), seconds, tokens)
        with self.cv:
            self.in_flight -= len(batch.rows)

    def _drop_cancelled(self) -> bool:
        while self.queue and self.queue[0].cancelled:
            self.queue.popleft()
        return bool(self.queue)

    def _rows(self, kind: str) -> int:
        return sum(j.rows for j in self.queue if j.kind == kind and not j.cancelled)

    def _take(self, kind: str) -> list[Pending]:
        if kind == "probe":
            return [self.queue.popleft()]
        jobs: list[Pending] = []
        rows = 0
        keep: deque[Pending] = deque()
        while self.queue:
            job = self.queue.popleft()
            if job.cancelled:
                continue
            if job.kind == kind and rows + job.rows <= self.cfg.max_batch_size:
                jobs.append(job)
                rows += job.rows
            else:
                keep.append(job)
        self.queue = keep
        return jobs
