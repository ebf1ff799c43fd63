"""Rank 0's socket front: an asyncio server in its own thread.

It reads request lines, answers `health` and `stats` itself, and queues work for the batcher
(`serving.batcher`), which rank 0's loop thread drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dslaunch.engine.base import OP_FOR_TASK
from dslaunch.serving.batcher import STOPPING, Batcher, Pending
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.stats import Stats
from dslaunch.wire import protocol as P
from dslaunch.wire.jsonio import write_json_atomic
from dslaunch.wire.protocol import ProtocolError, Request

DRAIN_S = 3.0  # on close, how long answers already decided may take to reach their clients


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
