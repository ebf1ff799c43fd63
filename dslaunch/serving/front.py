"""Rank 0's socket front: an asyncio server in its own thread, two protocols on one port.

A connection whose first byte is `{` speaks newline-delimited JSON (`serving.ndjson`); anything
else is HTTP/1.1 with the OpenAI-compatible routes (`serving.http`). Both end in `Front.run`,
which checks a request, queues it for the batcher (`serving.batcher`, drained by rank 0's loop
thread) and yields its events. Limits shared by both: `--max-connections`, a fixed deadline for
unauthenticated connections, `--max-inflight` per connection, a time-out on every write.

The same Front is the router's public front (`serving.router`, a dispatcher for a batcher), and
a replica leader's front in dial mode (`serving.link.Dialer`: it serves the router, no port).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hmac
import os
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dslaunch.engine.base import OP_FOR_TASK
from dslaunch.serving.batcher import STOPPING, Batcher, Pending
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.gate import Gate
from dslaunch.serving.metrics import Metrics
from dslaunch.serving.stats import Stats
from dslaunch.wire import held
from dslaunch.wire import protocol as P
from dslaunch.wire.jsonio import write_json_atomic
from dslaunch.wire.protocol import ProtocolError, Request
from dslaunch.wire.states import FrontState

DRAIN_S = 3.0  # on close, how long answers already decided may take to reach their clients
SNIFF_S = 1.0  # a refused connection waits this long for its first byte, to answer in its protocol
MAX_TRACEBACKS = 20  # distinct `internal` tracebacks written to the rank log; later ones are counted only


class Front:
    """The asyncio TCP server on rank 0 (own thread): accept, sniff, authorise, queue, answer."""

    def __init__(
        self,
        cfg: FrontConfig,
        info: dict[str, Any],
        check: Callable[[Request], None] | None,
        batcher: Batcher,
        stats: Stats,
        status_path: Path | None = None,
        text: Any = None,
        dial: Any = None,
    ) -> None:
        self.cfg = cfg
        self.info = info  # world_size, ranks, restarts, model, task
        self.check = check  # None: the work is checked where it runs (the router's replicas)
        self.dial = dial  # serving.link.Dialer: serve the router over a link it accepts; no listening
        self.text = text  # chat template and token counts (serving.openai_api.TextTools), or None
        self.batcher = batcher
        self.stats = stats
        self.metrics = Metrics()
        self.status_path = status_path
        self.accepting = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.address = dial.address if dial is not None else f"{cfg.bind}:{cfg.port}"
        self.gate = Gate(cfg.max_connections, preauth=cfg.token is not None)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._requests: set[asyncio.Task[Any]] = set()
        self._tracebacks: dict[str, int] = {}
        self._trim_pending = False
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="dslaunch-check")

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

    @property
    def closing(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _thread(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as e:
            self._error = e
        finally:
            self._started.set()
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await self._listen() if self.dial is None else None
        dialer = asyncio.ensure_future(self.dial.run(self)) if self.dial is not None else None
        self._started.set()
        ticker = asyncio.ensure_future(self._tick())
        try:
            await self._stop.wait()
            # answers already decided (results, `unavailable` for the queue) still go out
            if self._requests:
                await asyncio.wait(set(self._requests), timeout=DRAIN_S)
        finally:
            ticker.cancel()
            self._checks.shutdown(wait=False)
            if dialer is not None:
                dialer.cancel()
                await asyncio.wait([dialer], timeout=1.0)
            if server is not None:
                server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _listen(self, patience: float = 10.0) -> asyncio.Server:
        """Bind the port; after a gang restart the previous rank 0 may hold it for a moment."""
        sock = held.inherited(self.cfg.bind, self.cfg.port)  # a supervisor holds it across restarts
        if sock is not None:
            return await asyncio.start_server(self._accept, sock=sock)
        deadline = time.monotonic() + patience
        while True:
            try:
                return await asyncio.start_server(self._accept, self.cfg.bind, self.cfg.port, reuse_address=True)
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
        with contextlib.suppress(OSError):
            write_json_atomic(self.status_path, self.status_doc())

    def status_doc(self) -> dict[str, Any]:
        snap = self.stats_doc()
        return {
            "address": self.address,
            "ready": self.accepting,
            "auth": self.cfg.token is not None,
            "pid": os.getpid(),
            "served": snap["served"],
            "errors": sum(snap["errors"].values()),
            "queue": snap["queue"],
            "connections": len(self.gate),
            "p50_ms": snap["latency_ms"]["p50"],
            "p99_ms": snap["latency_ms"]["p99"],
            "tokens_per_s": snap["tokens_per_s"],
            "time": time.time(),
        }

    def stats_doc(self) -> dict[str, Any]:
        """What `stats` answers (and the status file summarises)."""
        return self.stats.snapshot(self.batcher.depth, self.batcher.in_flight)

    async def stats_now(self) -> dict[str, Any]:
        """What the `stats` op answers: the router asks its replicas' engines first."""
        return self.stats_doc()

    async def engine_docs(self) -> list[tuple[str, dict[str, Any]]]:
        """Each engine's stats for the `dslaunch:` metrics, by engine label: this front's own."""
        return [("0", self.stats_doc())]

    # -- connections ---------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: count it against --max-connections, sniff its protocol, serve it."""
        from dslaunch.serving.http import serve_http
        from dslaunch.serving.ndjson import serve_ndjson

        if not self.gate.enter(writer):
            await self._refuse(reader, writer)
            return
        got = 0
        try:
            first = await asyncio.wait_for(self._sniff(reader), self.first_deadline())
            got = len(first)
            if first:
                serve = serve_http if looks_like_http(first) else serve_ndjson
                got += await serve(self, reader, writer, first)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        except Exception:
            self.log_internal("connection")
        finally:
            self.gate.leave(writer)
            writer.close()
            if got > 1 << 20:
                self.trim_memory()

    @staticmethod
    async def _sniff(reader: asyncio.StreamReader) -> bytes:
        """The first bytes, enough to tell an HTTP request line from an NDJSON line."""
        data = await reader.read(1 << 16)
        while data and http_prefix(data):
            more = await reader.read(1 << 16)
            if not more:
                break
            data += more
        return data

    def first_deadline(self) -> float:
        """Seconds a connection may take before its first full request when it must authenticate."""
        return min(self.cfg.auth_timeout, self.cfg.idle_timeout) if self.cfg.token else self.cfg.idle_timeout

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Over --max-connections: answer `overloaded` (HTTP 429 to an HTTP client), then close."""
        msg = self.overloaded()
        self.stats.failed(P.OVERLOADED)
        self.metrics.refused += 1
        try:
            first = await asyncio.wait_for(reader.read(1), SNIFF_S)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            first = b""
        if first and (http_prefix(first) or looks_like_http(first)):
            from dslaunch.serving.http import refusal

            writer.write(refusal(429, msg))
        else:
            writer.write(P.encode(P.error(None, P.OVERLOADED, msg)))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.drain(), SNIFF_S)
        writer.close()

    def overloaded(self) -> str:
        return f"{len(self.gate.members)} connections open (--max-connections); retry later"

    def authorised(self, token: str | None) -> bool:
        if self.cfg.token is None:
            return True
        return bool(token) and hmac.compare_digest(token.encode(), self.cfg.token.encode())  # type: ignore[union-attr]

    def proof(self, challenge: str) -> str | None:
        """HMAC of a client's challenge with the job's nonce: shows the client this is its job's front."""
        return P.proof(self.cfg.nonce, challenge) if self.cfg.nonce else None

    def track(self, task: asyncio.Task[Any]) -> None:
        """Requests still answering when the front closes get DRAIN_S to finish."""
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    # -- work ----------------------------------------------------------------------------------
    async def run(self, req: Request, jobs: set[Pending]) -> AsyncIterator[tuple[Any, ...]]:
        """Queue one request and yield its events: ("chunk", index, text, logprobs) ..., then ("done", results).

        Raises ProtocolError for a refusal; one raised after the request was queued has `ran` set
        (the work may have run: an HTTP client must not retry it by itself).
        """
        want = OP_FOR_TASK.get(self.info.get("task", ""), "")
        if req.op != "health" and req.op != want:
            raise ProtocolError(P.BAD_REQUEST, f"this job serves task {self.info.get('task')!r}: use op {want!r}")
        if not self.accepting:
            raise ProtocolError(P.UNAVAILABLE, self.batcher.why or "the job is not serving yet; retry")
        assert self.loop is not None
        if req.op != "health":
            if self.text is not None:
                self.text.precheck(req)
            # off the event loop: it tokenizes, and waits while the engine holds the tokenizer. One
            # thread: checks wait for the tokenizer's lock anyway, and one thread keeps one malloc arena
            if self.check is not None:
                await self.loop.run_in_executor(self._checks, self.check, req)
        job = Pending(req, self.loop)
        self.batcher.submit(job)
        jobs.add(job)
        timeout = req.timeout or self.cfg.request_timeout
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise _ran(ProtocolError(P.TIMEOUT, f"no answer within {timeout:g}s")) from None
                if event[0] == "error":
                    raise _ran(ProtocolError(event[1], event[2]))
                if event[0] == "done":
                    self.stats.answered(time.monotonic() - job.t0)
                    self.metrics.latency(req.op, time.monotonic() - job.t0)
                yield event
                if event[0] == "done":
                    return
        finally:
            # answered, timed out, client gone (a failed write) or task cancelled: no more rows for it
            # (harmless when its batch is already over)
            job.cancelled = True
            jobs.discard(job)

    def health(self) -> dict[str, Any]:
        return {
            "status": FrontState.READY if self.accepting else FrontState.STOPPING,
            "world_size": self.info["world_size"],
            "ranks_ready": len(self.info.get("ranks", [])),
            "restarts": self.info.get("restarts", 0),
            "model": self.info.get("model"),
            "task": self.info.get("task"),
            **({"kv_cache": self.info["kv_cache"]} if self.info.get("kv_cache") else {}),
            "queue": self.batcher.depth,
            "uptime_s": round(time.time() - self.stats.started, 1),
        }

    def deep_health(self, results: list[Any]) -> dict[str, Any]:
        slowest = max(results, key=lambda r: r["ms"])
        return {**self.health(), "deep": True, "ranks": results, "slowest_rank": slowest["rank"]}

    # -- failures ------------------------------------------------------------------------------
    def log_internal(self, where: str) -> str:
        """Write the traceback of an unexpected error to the rank log, once per distinct place."""
        etype, exc, tb = sys.exc_info()
        frames = traceback.extract_tb(tb)[-3:]
        key = f"{where}:{etype.__name__ if etype else '?'}:" + ";".join(f"{f.filename}:{f.lineno}" for f in frames)
        seen = self._tracebacks.get(key, 0)
        if seen == 0 and len(self._tracebacks) < MAX_TRACEBACKS:
            print(f"front: internal error in {where} (later ones from here are counted, not printed):", flush=True)
            traceback.print_exc(limit=20)
            sys.stderr.flush()
        if seen or len(self._tracebacks) < MAX_TRACEBACKS:
            self._tracebacks[key] = seen + 1
        self.stats.failed(P.INTERNAL)
        return f"{etype.__name__ if etype else 'error'}: {str(exc)[:200]}"

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own reports (a callback that raised) are bounded like the front's."""
        exc = context.get("exception")
        key = f"loop:{type(exc).__name__}:{context.get('message', '')[:80]}"
        if key not in self._tracebacks and len(self._tracebacks) < MAX_TRACEBACKS:
            self._tracebacks[key] = 1
            loop.default_exception_handler(context)

    def trim_memory(self) -> None:
        """Give freed heap back to the system after a client that sent a lot left (glibc only)."""
        if self._trim_pending or self.loop is None:
            return
        self._trim_pending = True

        def trim() -> None:
            self._trim_pending = False
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)

        self.loop.call_later(0.5, lambda: self.loop.run_in_executor(None, trim))  # type: ignore[union-attr]


_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"TRACE ")


def looks_like_http(data: bytes) -> bool:
    """An HTTP request line starts with a method; anything else (`{`, garbage) is NDJSON, which
    answers each bad line with `bad_request` as before."""
    return data.startswith(_METHODS)


def http_prefix(data: bytes) -> bool:
    """Too few bytes to tell yet: they could still become an HTTP method."""
    return any(len(data) < len(m) and m.startswith(data) for m in _METHODS)


def _ran(e: ProtocolError) -> ProtocolError:
    e.ran = True
    return e
