"""Rank 0's socket front and the batcher that feeds the lock-step loop.

The front is an asyncio server in its own thread: it reads request lines, answers `health` and
`stats` itself, and queues work for the batcher. The batcher runs on rank 0's loop thread: it
waits for the first request, then up to `--batch-wait-ms` for more (never more rows than
`--max-batch-size`), and hands the batch to every rank. Answers and stream chunks travel back to
the asyncio thread through each request's own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dslaunch.engine.base import OP_FOR_TASK, Work
from dslaunch.node.ctl import write_json_atomic
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import Limits, ProtocolError, Request

STOPPING = "the job is stopping or restarting; retry"
DRAIN_S = 3.0  # on close, how long answers already decided may take to reach their clients


@dataclass(frozen=True)
class FrontConfig:
    bind: str = "127.0.0.1"
    port: int = 7070
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout: float = 300.0
    idle_timeout: float = 300.0
    token: str | None = None


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

    def answered(self, seconds: float) -> None:
        with self.lock:
            self.served += 1
            self.latency.append(seconds)

    def failed(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1

    def batch(self, rows: int, seconds: float, tokens: int) -> None:
        with self.lock:
            self.batches += 1
            self.batch_sizes[rows] += 1
            self.busy_s += seconds
            self.tokens += tokens

    def snapshot(self, queue: int, in_flight: int) -> dict[str, Any]:
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
                "latency_ms": {f"p{q}": _percentile(lat, q) for q in (50, 90, 99)},
                "tokens_generated": self.tokens,
                "engine_busy_s": round(self.busy_s, 4),
                "tokens_per_s": round(self.tokens / self.busy_s, 1) if self.busy_s else 0.0,
                "uptime_s": round(time.time() - self.started, 1),
            }


def _percentile(sorted_s: list[float], q: int) -> float | None:
    if not sorted_s:
        return None
    i = min(len(sorted_s) - 1, max(0, round(q / 100 * len(sorted_s) + 0.5) - 1))
    return round(sorted_s[i] * 1000, 2)


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


class Front:
    """The asyncio TCP server on rank 0 (own thread): parse, authorise, queue, answer."""

    def __init__(
        self,
        cfg: FrontConfig,
        info: dict[str, Any],
        check: Callable[[Request], None],
        batcher: Batcher,
        stats: Stats,
        status_path: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.info = info  # world_size, ranks, restarts, model, task
        self.check = check
        self.batcher = batcher
        self.stats = stats
        self.status_path = status_path
        self.accepting = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.address = f"{cfg.bind}:{cfg.port}"
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._requests: set[asyncio.Task[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        """Bind and start serving; raise OSError naming the address when it cannot bind."""
        self.thread = threading.Thread(target=self._thread, name="dslaunch-front", daemon=True)
        self.thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the front did not start within {timeout:g}s")
        if self._error is not None:
            raise OSError(f"cannot listen on {self.address}: {self._error}") from self._error
        self.accepting = True
        self._write_status()

    def stop_accepting(self, why: str = STOPPING) -> None:
        """New work gets `unavailable`; queued work is answered so now, saying why."""
        self.accepting = False
        self.batcher.close(why)
        self._write_status()

    def close(self, timeout: float = 5.0) -> None:
        self.accepting = False
        if self.loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stop.set)
        if self.thread is not None:
            self.thread.join(timeout)
        if self.status_path is not None:
            with contextlib.suppress(OSError):
                self.status_path.unlink()

    def _thread(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:
            self._error = e
        finally:
            self._started.set()
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await self._listen()
        self._started.set()
        ticker = asyncio.ensure_future(self._tick())
        try:
            await self._stop.wait()
            # answers already decided (results, `unavailable` for the queue) still go out
            if self._requests:
                await asyncio.wait(set(self._requests), timeout=DRAIN_S)
        finally:
            ticker.cancel()
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _listen(self, patience: float = 10.0) -> asyncio.Server:
        """Bind the port; after a gang restart the previous rank 0 may hold it for a moment."""
        deadline = time.monotonic() + patience
        while True:
            try:
                return await asyncio.start_server(self._connection, self.cfg.bind, self.cfg.port, reuse_address=True)
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self._write_status)

    def _write_status(self) -> None:
        """`<node dir>/front.json`, read by `dslaunch status` through nodectl (no token in it)."""
        if self.status_path is None:
            return
        snap = self.stats.snapshot(self.batcher.depth, self.batcher.in_flight)
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.status_path,
                {
                    "address": self.address,
                    "ready": self.accepting,
                    "auth": self.cfg.token is not None,
                    "pid": os.getpid(),
                    "served": snap["served"],
                    "errors": sum(snap["errors"].values()),
                    "queue": snap["queue"],
                    "p50_ms": snap["latency_ms"]["p50"],
                    "p99_ms": snap["latency_ms"]["p99"],
                    "tokens_per_s": snap["tokens_per_s"],
                    "time": time.time(),
                },
            )

    # -- connections ---------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, authed=self.cfg.token is None)
        lines = P.LineReader(self.cfg.limits.max_request_bytes)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                # a connection with nothing in flight may idle for --idle-timeout, then it is closed
                idle = self.cfg.idle_timeout if not tasks else None
                try:
                    data = await asyncio.wait_for(reader.read(1 << 16), idle)
                except asyncio.TimeoutError:
                    break
                if not data:
                    if tasks:  # half-closed (e.g. `nc` after its input): still answer what was asked
                        await asyncio.wait(set(tasks))
                    break
                for line in lines.feed(data):
                    if line is None:
                        self.stats.failed(P.TOO_LARGE)
                        limit = self.cfg.limits.max_request_bytes
                        msg = f"request line over {limit} bytes (--max-request-bytes)"
                        await conn.send(P.error(None, P.TOO_LARGE, msg))
                        continue
                    task = asyncio.ensure_future(self._request(conn, line))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    self._requests.add(task)
                    task.add_done_callback(self._requests.discard)
        except (ConnectionError, OSError):
            pass
        finally:
            for job in conn.jobs:
                job.cancelled = True  # the client is gone: stop generating for it
            for task in tasks:
                task.cancel()
            writer.close()

    async def _request(self, conn: _Conn, line: bytes) -> None:
        rid = None
        try:
            req = P.parse_request(line, self.cfg.limits)
            rid = req.id
            await self._answer(conn, req)
        except ProtocolError as e:
            self.stats.failed(e.code)
            await conn.send(P.error(e.id if rid is None else rid, e.code, e.message))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception as e:
            self.stats.failed(P.INTERNAL)
            await conn.send(P.error(rid, P.INTERNAL, f"{type(e).__name__}: {e}"))

    async def _answer(self, conn: _Conn, req: Request) -> None:
        if self.cfg.token is not None and not conn.authed:
            if not (req.token and hmac.compare_digest(req.token.encode(), self.cfg.token.encode())):
                raise ProtocolError(P.UNAUTHORIZED, "this front needs the job's token")
            if req.op == "auth":
                conn.authed = True
        if req.op == "auth":
            await conn.send(P.ok(req.id))
            return
        if req.op == "stats":
            await conn.send(P.ok(req.id, stats=self.stats.snapshot(self.batcher.depth, self.batcher.in_flight)))
            return
        if req.op == "health" and not req.deep:
            await conn.send(P.ok(req.id, **self._health()))
            return
        await self._work(conn, req)

    def _health(self) -> dict[str, Any]:
        return {
            "status": "ready" if self.accepting else "stopping",
            "world_size": self.info["world_size"],
            "ranks_ready": len(self.info.get("ranks", [])),
            "restarts": self.info.get("restarts", 0),
            "model": self.info.get("model"),
            "task": self.info.get("task"),
            "queue": self.batcher.depth,
            "uptime_s": round(time.time() - self.stats.started, 1),
        }

    async def _work(self, conn: _Conn, req: Request) -> None:
        want = OP_FOR_TASK.get(self.info.get("task", ""), "")
        if req.op != "health" and req.op != want:
            raise ProtocolError(P.BAD_REQUEST, f"this job serves task {self.info.get('task')!r}: use op {want!r}")
        if not self.accepting:
            raise ProtocolError(P.UNAVAILABLE, self.batcher.why or "the job is not serving yet; retry")
        if req.op != "health":
            # off the event loop: it tokenizes, and waits while the engine holds the tokenizer
            await asyncio.to_thread(self.check, req)
        assert self.loop is not None
        job = Pending(req, self.loop)
        self.batcher.submit(job)
        conn.jobs.add(job)
        timeout = req.timeout or self.cfg.request_timeout
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ProtocolError(P.TIMEOUT, f"no answer within {timeout:g}s") from None
                if event[0] == "chunk":
                    await conn.send(P.ok(req.id, index=event[1], chunk=event[2]))
                elif event[0] == "error":
                    raise ProtocolError(event[1], event[2])
                else:
                    self.stats.answered(time.monotonic() - job.t0)
                    await conn.send(self._result(req, event[1]))
                    return
        finally:
            # answered, timed out, client gone (a failed write) or task cancelled: no more rows for it
            # (harmless when its batch is already over)
            job.cancelled = True
            conn.jobs.discard(job)

    def _result(self, req: Request, results: list[Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"done": True} if req.stream else {}
        if req.op == "health":
            slowest = max(results, key=lambda r: r["ms"])
            return P.ok(req.id, **self._health(), deep=True, ranks=results, slowest_rank=slowest["rank"])
        if req.op == "embed":
            dim = len(results[0])
            return P.ok(req.id, dim=dim, **({"embedding": results[0]} if req.single else {"embeddings": results}))
        if req.op == "generate" and req.single:
            return P.ok(req.id, **results[0], **extra)
        return P.ok(req.id, **({"result": results[0]} if req.single else {"results": results}), **extra)


class _Conn:
    """One client connection: its writer (sends are serialised), auth state and open requests."""

    def __init__(self, writer: asyncio.StreamWriter, authed: bool) -> None:
        self.writer = writer
        self.authed = authed
        self.lock = asyncio.Lock()
        self.jobs: set[Pending] = set()

    async def send(self, obj: dict[str, Any]) -> None:
        async with self.lock:
            self.writer.write(P.encode(obj))
            await self.writer.drain()
