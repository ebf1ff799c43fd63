"""The router's dispatcher: the Front's queue, sent to replica leaders over their links.

It stands where rank 0's Batcher stands (`submit`, `close`, `why`, `depth`, `in_flight`), and
answers each Pending with the same events. One link per replica (`serving.link`); requests are
multiplexed on it under the router's own ids and forwarded with `protocol.request_line`.

- Balancing: least outstanding rows among the ready replicas that are not draining, each capped
  at CAP_BATCHES x its max batch size, so that work waits here, where it can still go anywhere.
  A replica's rows from the job's other routers count too: every answer on its link says how
  many rows it has from all routers (`load`), and the share that is not ours is added.
  With no replica ready, requests wait (bounded by their own time-out), they do not fail.
- No request lost to a replica failure: when a link drops (or its leader answers `unavailable`:
  it is stopping), what it had goes back to the head of the queue. A stream that already sent
  text is re-run only when its output is deterministic (greedy or seeded), and what its client
  already has is not sent again; a sampled stream without a seed ends with `unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dslaunch.serving import drainfile
from dslaunch.serving import link as L
from dslaunch.serving.batcher import STOPPING, Pending
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.ndjson import PING_LIMIT_S, PING_S
from dslaunch.serving.replicaview import (
    DOWN,
    DRAINING,
    READY,
    Job,
    Link,
    Replica,
    deterministic,
    results_of,
)
from dslaunch.wire import held
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError

CAP_BATCHES = 2  # a replica holds at most this many batches of rows at once; the rest wait here
ANSWER_BYTES = 1 << 28  # the longest answer line a replica may send (a batch of embeddings)


class Dispatcher:
    """The router's queue and its replicas; everything but `close` runs on the Front's loop."""

    def __init__(
        self, cfg: FrontConfig, key: str, replicas: int, task: str, drain: Path | None = None,
        on_link: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:  # fmt: skip
        self.cfg = cfg
        self.key = key
        self.task = task
        self.drain_path = drain
        self.on_link = on_link  # called with each hello (the router loads its tokenizer then)
        self.replicas = {i: Replica(i) for i in range(replicas)}
        self.queue: deque[Job] = deque()
        self.closed = False
        self.why = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._families: OrderedDict[str, int] = OrderedDict()  # a request's samples: the replica of its first
        self._say = L.PeerLog()
        self._handshakes = L.HandshakePool()
        self.drained: frozenset[int] = frozenset()
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Future[None] | None = None
        self._asked: dict[str, asyncio.Future[dict[str, Any]]] = {}

    # -- what the Front uses -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.queue)

    @property
    def in_flight(self) -> int:
        return sum(r.outstanding for r in self.replicas.values())

    def submit(self, pending: Pending) -> None:
        if self.closed:
            raise ProtocolError(P.UNAVAILABLE, self.why)
        if len(self.queue) >= self.cfg.max_queue:
            self._prune()
            if len(self.queue) >= self.cfg.max_queue:
                raise ProtocolError(P.OVERLOADED, f"{len(self.queue)} requests queued (--max-queue); retry later")
        timeout = pending.req.timeout or self.cfg.request_timeout
        self.queue.append(Job(pending, pending.t0 + timeout))
        self._pump()

    def close(self, why: str = STOPPING) -> None:
        """Refuse new work and answer the queue with `unavailable` (any thread); in flight goes on."""
        if self.closed:
            return
        self.why, self.closed = why, True
        if self.loop is None:
            return
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._fail_queue)

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.replicas.values()]

    async def ask_all(self, op: str, timeout: float = 2.0) -> dict[int, dict[str, Any]]:
        """Every linked leader's own answer to `op` (e.g. its engine's `stats`); the slow ones left out."""
        assert self.loop is not None
        asked: dict[int, asyncio.Future[dict[str, Any]]] = {}
        for rep in self.replicas.values():
            if rep.link is not None and not rep.link.dead:
                rid = f"{op}-{next(self._ids)}"
                asked[rep.id] = self._asked[rid] = self.loop.create_future()
                rep.link.writer.write(P.encode({"id": rid, "op": op}))
        if asked:
            await asyncio.wait(asked.values(), timeout=timeout)
        for rid in [k for k, f in self._asked.items() if f.done() or f in asked.values()]:
            self._asked.pop(rid, None)
        return {r: f.result() for r, f in asked.items() if f.done() and not f.cancelled()}

    # -- the link listener ---------------------------------------------------------------------
    async def listen(self, bind: str, port: int, patience: float = 10.0) -> asyncio.Server:
        """Where replica leaders dial in; a restarted router may wait for its predecessor's port."""
        self.loop = asyncio.get_running_loop()
        deadline = time.monotonic() + patience
        sock = held.inherited(bind, port)  # the supervisor holds it: never free between two routers
        while True:
            try:
                if sock is not None:
                    server = await asyncio.start_server(self._accept, sock=sock)
                else:
                    server = await asyncio.start_server(self._accept, bind, port, reuse_address=True)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        self._server, self._ticker = server, asyncio.ensure_future(self._tick())
        return server

    async def shut(self) -> None:
        """Stop listening and drop every link (what was still in flight gets `unavailable`)."""
        self.close()
        self._fail_queue()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for rep in self.replicas.values():
            if rep.link is not None:
                self._lost(rep.link, "the router is stopping")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        evicted = self._handshakes.enter(writer)  # anyone may connect; when full, the biggest holder's oldest goes
        if evicted is not None:
            self._say(f"handshake pool full ({L.MAX_HANDSHAKES}): closed the oldest handshake from {evicted}")
        try:
            hello = await asyncio.wait_for(L.accept(reader, writer, self.key, self._judge), L.HANDSHAKE_S)
            rep = self.replicas[hello["replica"]]
        except (L.LinkRefused, OSError, asyncio.TimeoutError, ValueError) as e:
            why = str(e) if isinstance(e, L.LinkRefused) else type(e).__name__  # our words, never the peer's
            self._say(f"refused a link from {L.peer_host(writer)}: {why}")
            writer.close()
            return
        finally:
            self._handshakes.leave(writer)
        if rep.link is not None:
            self._lost(rep.link, "replaced by a new link from the same replica")
        link = Link(rep, reader, writer)
        rep.link, rep.attempt, rep.ranks = link, hello["attempt"], hello["ranks"]
        rep.cap = CAP_BATCHES * max(1, hello["max_batch_size"])
        rep.set(DRAINING if rep.draining else READY)
        print(f"replica {rep.id} linked (attempt {rep.attempt}, {rep.ranks} ranks)", flush=True)
        if self.on_link is not None:
            self.on_link(hello)
        self._pump()
        try:
            await self._read(link)
        except (OSError, ValueError):
            pass
        finally:
            self._lost(link, "its link closed")

    def _judge(self, hello: dict[str, Any]) -> str:
        """Why a leader that proved the key may still not link ("" when it may)."""
        rep = self.replicas.get(hello["replica"])
        if rep is None or hello.get("task") != self.task:
            return f"replica {hello['replica']} with task {hello.get('task')!r} is not one of this job's"
        if rep.link is not None and hello["attempt"] < rep.attempt:  # a gang on its way out
            return f"replica {rep.id} is linked with attempt {rep.attempt}, after {hello['attempt']}"
        return ""

    async def _read(self, link: Link) -> None:
        lines = P.LineReader(ANSWER_BYTES)
        while True:
            data = await link.reader.read(1 << 16)
            if not data:
                return
            link.heard = time.monotonic()
            for line in lines.feed(data):
                if line is None:
                    raise ValueError("an answer line over the limit")
                self._answer(link, json.loads(line))

    def _answer(self, link: Link, answer: dict[str, Any]) -> None:
        asked = self._asked.pop(answer.get("id"), None)  # type: ignore[arg-type]
        if asked is not None:
            if not asked.done():
                asked.set_result(answer)
            return
        if "load" in answer:  # the rows it has from every router (the job's other routers' share)
            link.replica.note_load(answer["load"])
        job = link.flights.get(answer.get("id"))  # type: ignore[arg-type]
        if job is None:
            return  # a ping's answer, or a request already given up on
        rep, req = link.replica, job.pending.req
        if answer.get("ok") and "chunk" in answer and not answer.get("done"):
            self._chunk(job, int(answer.get("index", 0)), str(answer["chunk"]), answer.get("logprobs"))
            return
        del link.flights[answer["id"]]
        rep.outstanding -= job.pending.rows
        if answer.get("ok"):
            rep.served += 1
            if job.live:
                job.pending.answered = True
                job.pending.put(("done", results_of(req, answer)))
        else:
            err = answer.get("error") or {}
            code, msg = str(err.get("code", P.INTERNAL)), str(err.get("message", ""))
            if code == P.UNAVAILABLE:  # the leader is stopping: nothing new until it dials in again
                rep.set(DOWN)
                self._retry(job, rep, f"replica {rep.id} is stopping: {msg}")
            else:
                rep.errors += 1
                job.pending.fail(code, msg)
        self._pump()

    def _chunk(self, job: Job, index: int, text: str, lps: dict[str, Any] | None) -> None:
        """Pass on the text the client does not have yet (a re-run repeats what it already sent),
        and the logprobs of tokens it has none for (a re-run gives the same tokens again)."""
        got = job.got.get(index, "") + text
        job.got[index] = got
        sent = job.sent.get(index, "")
        if not (got.startswith(sent) if len(got) >= len(sent) else sent.startswith(got)):
            job.pending.fail(P.UNAVAILABLE, "the stream's re-run on another replica gave different text; retry")
            return
        new_lps = job.new_logprobs(index, lps)
        if (len(got) > len(sent) or new_lps is not None) and job.live:
            job.sent[index] = max(got, sent, key=len)
            job.pending.chunk(index, got[len(sent) :], new_lps)

    # -- failures ------------------------------------------------------------------------------
    def _lost(self, link: Link, why: str) -> None:
        """A link is gone: its replica is down, and its work goes back to the head of the queue."""
        if link.dead:
            return
        link.dead = True
        link.writer.close()
        rep = link.replica
        if rep.link is link:
            rep.link = None
            rep.set(DOWN)
            print(f"replica {rep.id} down: {why}", flush=True)
        jobs = list(link.flights.values())
        link.flights.clear()
        for job in reversed(jobs):  # the oldest ends up first
            rep.outstanding -= job.pending.rows
            self._retry(job, rep, f"replica {rep.id} failed: {why}")
        self._pump()

    def _retry(self, job: Job, rep: Replica, why: str) -> None:
        if not job.live:
            return
        if self.closed:
            job.pending.fail(P.UNAVAILABLE, self.why)
        elif any(job.sent.values()) and not deterministic(job.pending.req):
            job.pending.fail(
                P.UNAVAILABLE,
                f"{why}, after this stream had sent text; sampled output without a seed cannot be resumed "
                "on another replica: retry (a seed or temperature 0 makes a stream resumable)",
            )
        else:
            job.got, job.lps_got = {}, {}
            self.queue.appendleft(job)

    def _fail_queue(self) -> None:
        left, self.queue = list(self.queue), deque()
        for job in left:
            job.pending.fail(P.UNAVAILABLE, self.why)

    # -- sending -------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Send queued work, oldest first, to the least loaded replica that has room."""
        while self.queue and not self.closed:
            job = self.queue[0]
            if not job.live:
                self.queue.popleft()
                continue
            rows = job.pending.rows
            # the load counts the other routers' rows on a replica too (its own report); with none of
            # ours on it, one may go regardless: its answers bring fresh reports, nobody starves
            ready = [r for r in self.replicas.values() if r.state == READY and r.link is not None
                     and (r.load + rows <= r.cap or r.outstanding == 0)]  # fmt: skip
            if not ready:
                return
            # the samples of one request go where the first went, if it has room: they share its prompt blocks
            fam = job.pending.req.family
            rep = next((r for r in ready if fam and r.id == self._families.get(fam)), None) or min(
                ready, key=lambda r: (r.load, r.last_sent))  # fmt: skip
            if fam:
                self._families[fam] = rep.id
                while len(self._families) > 4096:
                    self._families.popitem(last=False)
            self.queue.popleft()
            self._send(rep, job)

    def _send(self, rep: Replica, job: Job) -> None:
        assert rep.link is not None
        rid = next(self._ids)
        left = min(max(job.deadline - time.monotonic(), 0.001), P.Limits.max_timeout)
        rep.link.flights[rid] = job
        rep.outstanding += job.pending.rows
        rep.last_sent = time.monotonic()
        rep.link.writer.write(P.request_line(job.pending.req, rid, timeout=round(left, 3)))

    def _cancel(self, link: Link, rid: int) -> None:
        """Its client went away (or timed out): the replica stops working for it, and it stops counting."""
        job = link.flights.pop(rid)
        link.replica.outstanding -= job.pending.rows
        link.writer.write(P.encode({"cancel": rid}))

    # -- once a second -------------------------------------------------------------------------
    async def _tick(self) -> None:
        """Housekeeping; one failed round is logged (bounded) and the next one runs regardless."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._read_drain()
                self._tick_once()
            except Exception as e:
                self._say(f"router housekeeping failed: {type(e).__name__}: {L.inert(e)}")
            self._say.flush()

    def _tick_once(self) -> None:
        """Cancel what clients gave up on, ping the links, drop the silent ones, send queued work."""
        now = time.monotonic()
        self._prune()
        for rep in self.replicas.values():
            link = rep.link
            if link is None:
                continue
            for rid in [rid for rid, job in link.flights.items() if not job.live]:
                self._cancel(link, rid)
            if now - link.heard > PING_LIMIT_S:
                self._lost(link, f"no answer to pings for {PING_LIMIT_S:g}s")
            elif now - link.pinged >= PING_S:
                link.pinged = now
                link.writer.write(P.encode({"id": "ping", "op": "health"}))
        self._pump()

    async def _read_drain(self) -> None:
        """The replicas `dslaunch restart` drains: they get no new work and finish what they have.

        Read off the loop (`drainfile`: strict, no links, no FIFOs); a bad file keeps the set."""
        if self.drain_path is None:
            return
        try:
            ids = await asyncio.to_thread(drainfile.read, self.drain_path, len(self.replicas))
        except drainfile.BadDrainFile as e:
            self._say(f"drain file {self.drain_path} refused: {e}; still draining {sorted(self.drained)}")
            return
        if ids != self.drained:
            print(f"drain file {self.drain_path}: draining {sorted(ids)} (was {sorted(self.drained)})", flush=True)
            self.drained = ids
        for rep in self.replicas.values():
            rep.draining = rep.id in ids
            if rep.link is not None and rep.state in (READY, DRAINING):
                rep.set(DRAINING if rep.draining else READY)

    def _prune(self) -> None:
        """Requests whose client went away or timed out leave the queue."""
        if any(not j.live for j in self.queue):
            self.queue = deque(j for j in self.queue if j.live)
