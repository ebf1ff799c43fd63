"""The NDJSON side of the front: one JSON request per line, answers matched by id.

Limits: before the connection is authenticated (a request with the job's token, or `auth`) it is
read one line at a time and closed after `unauthorized`, and it must authenticate within a fixed
deadline that bytes do not extend. After that at most `--max-inflight` requests run at once; at
the cap, reading pauses, so a client that never reads its answers holds a bounded amount of memory
until the write time-out closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from dslaunch.serving.batcher import STREAM_CUT, Pending
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError, Request

if TYPE_CHECKING:
    from dslaunch.serving.front import Front

LINK_INFLIGHT = 1 << 16  # the router caps what it sends a replica; this only bounds a runaway peer
# A link's liveness: the router pings each link every PING_S and drops it when nothing came back
# for PING_LIMIT_S; the leader closes it when nothing (not even a ping) came for LINK_IDLE_S. A node
# that drops off the network resets nothing, so these bound how long its work waits to move on.
PING_S = 1.0
PING_LIMIT_S = 5.0
LINK_IDLE_S = PING_LIMIT_S + PING_S
LINK_SLACK = 4096


class Conn:
    """One client connection: its writer (sends are serialised and timed), auth state and open jobs."""

    def __init__(
        self, writer: asyncio.StreamWriter, authed: bool, write_timeout: float, peers: set[Conn] | None = None
    ) -> None:  # fmt: skip
        self.writer = writer
        self.authed = authed
        self.write_timeout = write_timeout
        self.lock = asyncio.Lock()
        self.jobs: set[Pending] = set()
        self.closing = False
        # a replica leader's links, this one among them: every answer on a link carries `load`, the
        # rows the leader has from all its routers, so that each router counts the others' share
        self.peers = peers

    def load(self) -> int:
        return sum(j.rows for c in self.peers or () for j in c.jobs)

    async def send(self, obj: dict[str, Any]) -> None:
        """Write one answer; a client that does not read it within --write-timeout is cut off."""
        if self.closing:
            raise ConnectionError("connection closing")
        async with self.lock:
            transport = self.writer.transport
            if transport.is_closing():
                raise ConnectionError("the connection is closing")
            self.writer.write(P.encode(obj if self.peers is None else {**obj, "load": self.load()}))
            if transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
                return  # below the high-water mark: drain() would return at once
            try:
                await asyncio.wait_for(self.writer.drain(), self.write_timeout)
            except asyncio.TimeoutError:
                self.closing = True
                transport.abort()
                raise ConnectionError("the client did not read its answers (--write-timeout)") from None


async def serve_ndjson(
    front: Front, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes, link: bool = False,
    links: set[Conn] | None = None,
) -> int:  # fmt: skip
    """Serve one NDJSON connection whose first bytes were already read; returns the bytes read.

    `link`: a router's connection to this replica leader, authenticated by its handshake. The
    router bounds its own work per replica, and pings it, so the link has no in-flight cap of its
    own and is closed only when nothing (not even a ping) came for LINK_IDLE_S. `links`: the
    leader's links to all its routers (this one joins it while it lasts), for the load it reports.
    """
    cfg = front.cfg
    conn = Conn(writer, authed=link or cfg.token is None, write_timeout=cfg.write_timeout, peers=links)
    if links is not None:
        links.add(conn)
    max_inflight = LINK_INFLIGHT if link else cfg.max_inflight
    # a forwarded line spells out every default: a little longer than the client's own
    lines = P.LineReader(cfg.limits.max_request_bytes + (LINK_SLACK if link else 0))
    tasks: set[asyncio.Task[None]] = set()
    auth_deadline = time.monotonic() + front.first_deadline()
    data, total = first, len(first)
    try:
        while True:
            for line in lines.feed(data):
                if line is None:
                    front.stats.failed(P.TOO_LARGE)
                    front.metrics.request("ndjson", "?", P.TOO_LARGE)
                    msg = f"request line over {cfg.limits.max_request_bytes} bytes (--max-request-bytes)"
                    await conn.send(P.error(None, P.TOO_LARGE, msg))
                    continue
                if link and line.startswith(b'{"cancel":'):
                    cancel(conn, line)
                    continue
                req = await _admit(front, conn, line)
                if conn.closing:
                    return total
                if req is None:
                    continue
                while len(tasks) >= max_inflight:  # at the cap: stop reading until one is answered
                    await asyncio.wait(set(tasks), return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.ensure_future(_request(front, conn, req))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                front.track(task)
            if not conn.authed:
                wait: float | None = auth_deadline - time.monotonic()  # fixed: bytes do not extend it
                if wait is not None and wait <= 0:
                    break
            elif link:
                wait = LINK_IDLE_S
            else:
                # a connection with nothing in flight may idle for --idle-timeout, then it is closed
                wait = cfg.idle_timeout if not tasks else None
            try:
                data = await asyncio.wait_for(reader.read(1 << 16), wait)
            except asyncio.TimeoutError:
                break
            total += len(data)
            if not data:
                if tasks:  # half-closed (e.g. `nc` after its input): still answer what was asked
                    await asyncio.wait(set(tasks))
                break
    except (ConnectionError, OSError):
        pass
    finally:
        if links is not None:
            links.discard(conn)
        for job in conn.jobs:
            job.cancelled = True  # the client is gone: stop generating for it
        for task in tasks:
            task.cancel()
    return total


def cancel(conn: Conn, line: bytes) -> None:
    """The router's client went away: `{"cancel": id}` ends that request here too (link only)."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        rid = json.loads(line)["cancel"]
        for job in list(conn.jobs):
            if job.req.id == rid:
                job.fail(P.UNAVAILABLE, "cancelled by the router")


async def _admit(front: Front, conn: Conn, line: bytes) -> Request | None:
    """Parse and authorise one line; answers refusals itself (None). Unauthorised: close after."""
    rid = None
    try:
        req = P.parse_request(line, front.cfg.limits)
        rid = req.id
        if not conn.authed:
            if req.op == "health" and req.challenge and not req.token and not req.deep:
                # before the token: a client checks that this is its job's front (and nothing else)
                await conn.send(P.ok(req.id, proof=front.proof(req.challenge)))
                return None
            if not front.authorised(req.token):
                raise ProtocolError(P.UNAUTHORIZED, "this front needs the job's token")
            if not front.gate.promote(conn.writer):  # out of the pre-auth pool, into --max-connections
                raise ProtocolError(P.OVERLOADED, front.overloaded())
            conn.authed = True
        elif req.token is not None and not front.authorised(req.token):
            # a wrong token is refused on an authenticated connection too, and ends it
            raise ProtocolError(P.UNAUTHORIZED, "wrong token for this front")
        return req
    except ProtocolError as e:
        front.stats.failed(e.code)
        front.metrics.request("ndjson", "?", e.code)
        await conn.send(P.error(e.id if rid is None else rid, e.code, e.message))
        if e.code == P.UNAUTHORIZED or (e.code == P.OVERLOADED and not conn.authed):
            conn.closing = True
        return None


async def _request(front: Front, conn: Conn, req: Request) -> None:
    """Answer one request; nothing raised here may escape (an `internal` answer is logged once)."""
    try:
        await _answer(front, conn, req)
        front.metrics.request("ndjson", req.op, "ok")
    except ProtocolError as e:
        front.stats.failed(e.code)
        front.metrics.request("ndjson", req.op, e.code)
        with contextlib.suppress(ConnectionError, OSError):
            await conn.send(P.error(req.id, e.code, e.message))
        if e.message.startswith(STREAM_CUT):  # the client stopped reading: its error, then the end
            conn.closing = True
            conn.writer.close()
    except (ConnectionError, OSError, asyncio.CancelledError):
        pass
    except Exception:
        msg = front.log_internal(f"op {req.op}")
        front.metrics.request("ndjson", req.op, P.INTERNAL)
        with contextlib.suppress(Exception):
            await conn.send(P.error(req.id, P.INTERNAL, msg))


async def _answer(front: Front, conn: Conn, req: Request) -> None:
    if req.op == "auth":
        await conn.send(P.ok(req.id))
        return
    if req.op == "stats":
        await conn.send(P.ok(req.id, stats=await front.stats_now()))
        return
    if req.op == "health" and not req.deep:
        extra = {"proof": front.proof(req.challenge)} if req.challenge else {}
        await conn.send(P.ok(req.id, **front.health(), **extra))
        return
    async with contextlib.aclosing(front.run(req, conn.jobs)) as events:
        async for event in events:
            if event[0] == "chunk":
                lps = {"logprobs": event[3]} if event[3] is not None else {}
                await conn.send(P.ok(req.id, index=event[1], chunk=event[2], **lps))
            else:
                await conn.send(_result(front, req, event[1]))


def _result(front: Front, req: Request, results: list[Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {"done": True} if req.stream else {}
    if req.op == "health":
        return P.ok(req.id, **front.deep_health(results))
    if req.op == "embed":
        dim = len(results[0])
        return P.ok(req.id, dim=dim, **({"embedding": results[0]} if req.single else {"embeddings": results}))
    if req.op == "generate" and req.single:
        return P.ok(req.id, **results[0], **extra)
    return P.ok(req.id, **({"result": results[0]} if req.single else {"results": results}), **extra)
