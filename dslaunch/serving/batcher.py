"""The batcher on rank 0's loop thread: queued requests in, rows out, answers back.

Generate jobs run step by step: the loop asks `admit` at every step for requests that fit in the
free rows and KV-cache tokens (`--max-batch-size`, `--max-batch-tokens`), first come first
served, and each row answers through its request as soon as it finishes. Embed and handler jobs,
and deep health probes, run as whole batches (`next_batch`): the first request waits up to
`--batch-wait-ms` for company. Answers and stream chunks travel back to the asyncio thread
through each request's own queue, which is bounded for streams (`STREAM_BUFFER_BYTES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from dslaunch.engine.base import Work
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.stats import Stats
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError, Request

STOPPING = "the job is stopping or restarting; retry"
# A stream whose client stops reading is cut off once this much of its text waits unread.
STREAM_BUFFER_BYTES = 1 << 20
STREAM_BUFFER_CHUNKS = 8192
# How the answer of a stream cut off at that bound begins (the front then closes its connection).
STREAM_CUT = "stream cut off"


_outbox = threading.local()


@contextlib.contextmanager
def one_wakeup() -> Iterator[None]:
    """Events put by this thread inside reach their queues together, with one wake-up of each
    event loop: a step answering or streaming to 32 rows then costs one wake-up, not 32."""
    _outbox.items = []
    try:
        yield
    finally:
        items, _outbox.items = _outbox.items, None
        loops: dict[asyncio.AbstractEventLoop, list[tuple[Pending, tuple[Any, ...]]]] = {}
        for job, event in items:
            loops.setdefault(job.loop, []).append((job, event))
        for loop, batch in loops.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[Pending, tuple[Any, ...]]]) -> None:
    for job, event in batch:
        job.events.put_nowait(event)


class _Events(asyncio.Queue):  # type: ignore[type-arg]
    """The request's event queue; it tells its owner when the front has taken a chunk."""

    def __init__(self, owner: Pending) -> None:
        super().__init__()
        self.owner = owner

    def _get(self) -> Any:
        item = super()._get()
        if item[0] == "chunk":
            self.owner._taken(len(item[2]))
        return item


class Pending:
    """One request waiting for its answer; the loop thread and the asyncio thread share it."""

    stream_bytes = STREAM_BUFFER_BYTES
    stream_chunks = STREAM_BUFFER_CHUNKS

    def __init__(self, req: Request, loop: asyncio.AbstractEventLoop) -> None:
        self.req = req
        self.kind = "probe" if req.op == "health" else req.op
        self.rows = len(req.inputs) if req.inputs else 1
        self.loop = loop
        self.events: asyncio.Queue[tuple[Any, ...]] = _Events(self)
        self.t0 = time.monotonic()
        self.cancelled = False  # set by the asyncio thread (time-out, client gone), read by the engine
        self.results: list[Any] = [None] * self.rows
        self.left = self.rows  # rows not answered yet
        self.answered = False
        self.lock = threading.Lock()
        self.unread_bytes = 0
        self.unread_chunks = 0

    def put(self, event: tuple[Any, ...]) -> None:
        """Thread-safe: events arrive in the order they were put (chunks before the answer)."""
        pending = getattr(_outbox, "items", None)
        if pending is not None:
            pending.append((self, event))
            return
        if asyncio._get_running_loop() is self.loop:  # the loop's own thread (the router): no wake-up needed
            self.events.put_nowait(event)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    # -- rows (the loop thread) ----------------------------------------------------------------
    def row(self, index: int) -> RowOf:
        return RowOf(self, index)

    def chunk(self, index: int, text: str, logprobs: dict[str, Any] | None = None) -> None:
        """("chunk", index, text, logprobs or None) for a stream; nothing otherwise."""
        if not self.req.stream or self.answered:
            return
        with self.lock:
            self.unread_bytes += len(text)
            self.unread_chunks += 1
            over = self.unread_bytes > self.stream_bytes or self.unread_chunks > self.stream_chunks
        if over:
            why = f"{STREAM_CUT}: over {self.stream_bytes} bytes or {self.stream_chunks} chunks unread (not read)"
            self.fail(P.OVERLOADED, why)
            return
        self.put(("chunk", index, text, logprobs))

    def _taken(self, size: int) -> None:
        with self.lock:
            self.unread_bytes -= size
            self.unread_chunks -= 1

    def done(self, index: int, result: Any) -> None:
        if self.answered:
            return
        self.results[index] = result
        self.left -= 1
        if self.left == 0:
            self.answered = True
            self.put(("done", self.results))

    def fail(self, code: str, message: str) -> None:
        """Answer with an error once; the request's other rows stop at the next step."""
        if self.answered:
            return
        self.answered = True
        self.cancelled = True
        self.put(("error", code, message))


class RowOf:
    """One row of a request, as the engine sees it (`engine.base.RowSink`)."""

    def __init__(self, job: Pending, index: int) -> None:
        self.job, self.index = job, index

    @property
    def arrived(self) -> float:
        """When the request reached this front (monotonic): where its queue time starts."""
        return self.job.t0

    def chunk(self, text: str, logprobs: dict[str, Any] | None = None) -> None:
        self.job.chunk(self.index, text, logprobs)

    def cancelled(self) -> bool:
        return self.job.cancelled

    def done(self, result: dict[str, Any]) -> None:
        self.job.done(self.index, result)

    def fail(self, code: str, message: str) -> None:
        self.job.fail(code, message)


class RowBatch:
    """A whole batch of requests flattened into rows (embed, handlers, probes); the engine's sink."""

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
        job.chunk(index, text)

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
            job.fail(code, message)


class Batcher:
    """Bounded queue of pending requests, handed to rank 0's loop thread row by row or in batches."""

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

    @property
    def times(self) -> Any:
        """The request timings that rank 0's generation loop reports to (serving.reqtimes)."""
        return self.stats.times

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
            job.fail(P.UNAVAILABLE, why)

    # -- whole batches -------------------------------------------------------------------------
    def next_batch(self, timeout: float) -> RowBatch | bool | None:
        """A whole batch (the first request waits up to --batch-wait-ms for company); False after
        `timeout` with nothing to do; None once closed."""
        got = self.wait(timeout)
        if not got:
            return got
        with self.cv:
            if not self._drop_cancelled():
                return False
            jobs = self._take(self.queue[0].kind)
            self.in_flight += sum(j.rows for j in jobs)
        return RowBatch(jobs) if jobs else False

    def ran(self, batch: Any, seconds: float, results: list[Any]) -> None:
        tokens = sum(r.get("tokens", 0) for r in results if isinstance(r, dict))
        self.stats.batch(len(batch.rows), seconds, tokens)
        with self.cv:
            self.in_flight -= len(batch.rows)

    # -- step by step (generate) ---------------------------------------------------------------
    def wait(self, timeout: float) -> bool | None:
        """Block until work is queued: True; False after `timeout`; None once closed. A first
        request waits up to --batch-wait-ms (from its arrival) for company."""
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
                until = head.t0 + self.cfg.batch_wait_ms / 1000
                while not self.closed and self._rows(head.kind) < self.cfg.max_batch_size:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self.cv.wait(left)
            return None if self.closed else True

    def take_probe(self) -> RowBatch | None:
        """A deep-health probe waiting at the head of the queue, run between two steps."""
        with self.cv:
            if self._drop_cancelled() and self.queue[0].kind == "probe":
                return RowBatch([self.queue.popleft()])
        return None

    def queued_rows(self) -> int:
        """Rows of the generate requests waiting in the queue."""
        with self.cv:
            return self._rows("generate")

    def admit(self, fits: Callable[[Pending], bool]) -> list[Pending]:
        """Generate requests that fit (`fits` takes them into account when it says so), in arrival
        order: the first that does not fit waits, and so does everything behind it. A request
        that can never run (`fits` raises ProtocolError) is answered and skipped."""
        out: list[Pending] = []
        with self.cv:
            while self._drop_cancelled():
                job = self.queue[0]
                if job.kind == "probe":
                    break
                try:
                    if job.kind != "generate":
                        raise ProtocolError(P.BAD_REQUEST, f"this job serves op 'generate', not {job.req.op!r}")
                    if not fits(job):
                        break
                except ProtocolError as e:
                    self.queue.popleft()
                    job.fail(e.code, e.message)
                    continue
                self.queue.popleft()
                out.append(job)
            self.in_flight += sum(j.rows for j in out)
        return out

    def running(self, rows: int) -> None:
        """How many rows the running batch has now (for `stats` and `status`)."""
        self.in_flight = rows

    def events_together(self) -> contextlib.AbstractContextManager[None]:
        """Around one step of rank 0's loop: its answers and chunks go out with one wake-up."""
        return one_wakeup()

    def stepped(self, rows: int, seconds: float, tokens: int, joined: int, forwards: int | None = None) -> None:
        self.stats.step(rows, seconds, tokens, joined, forwards)

    def engine_stats(self, read: Callable[[], dict[str, Any]]) -> None:
        """The running engine's own counters (the paged cache's blocks, prefix hits), for `stats`."""
        self.stats.engine = read

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
