"""The link between the router and a replica leader: the leader dials, both prove the key.

The replica leader dials the router's link port (so no rank listens on any port, and nobody
without the job's replica key can send work to a rank). The handshake proves the shared key both
ways without sending it: the router sends a challenge; the leader answers with its HMAC proof, a
challenge of its own and its hello (replica, attempt, ranks, model, task, max_batch_size), which
the proof covers; the router checks it and answers its own proof; the leader checks that. After
that the connection is an NDJSON session in which the router is the client and the leader serves
requests with the front's own code (`serve_ndjson` in link mode).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dslaunch.serving.ndjson import serve_ndjson
from dslaunch.wire.protocol import encode

if TYPE_CHECKING:
    from dslaunch.serving.front import Front

HANDSHAKE_S = 10.0  # each side's whole handshake, from connect
HELLO_S = 3.0  # the router waits this long for a leader's hello (a leader sends it at once)
MAX_HANDSHAKES = 64  # handshakes in progress at the router; a newcomer then evicts one (HandshakePool)
HANDSHAKE_BYTES = 1 << 16
REDIAL_S = (0.2, 2.0)  # the leader's back-off between dials: first, most (the router may be restarting)
HELLO_INTS = ("replica", "attempt", "ranks", "max_batch_size")


class LinkRefused(Exception):
    """The other side did not prove the key, or said something a handshake does not."""


def _mac(key: str, *parts: str) -> str:
    return hmac.new(key.encode(), "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def _same(a: Any, b: str) -> bool:
    return isinstance(a, str) and hmac.compare_digest(a.encode(), b.encode())


def inert(text: Any, limit: int = 200) -> str:
    """A peer's text as one log-safe line: quoted, control characters escaped, bounded."""
    return json.dumps(str(text)[:limit])


async def _read(reader: asyncio.StreamReader, peer_errors: bool = True) -> dict[str, Any]:
    """One handshake line. `peer_errors`: a refusal's text is passed on (quoted, bounded); the router
    never passes on a leader's, since leaders send none and anyone can dial the link port."""
    line = await reader.readline()
    if not line:
        raise LinkRefused("the other side closed the connection during the handshake")
    try:
        msg = json.loads(line)
    except ValueError:
        raise LinkRefused("not a handshake line") from None
    if not isinstance(msg, dict):
        raise LinkRefused("not a handshake line")
    if "error" in msg:
        raise LinkRefused(f"refused: {inert(msg['error'])}" if peer_errors else "an error line, not a hello")
    return msg


async def offer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str, hello: dict[str, Any]) -> None:
    """The leader's side; raises LinkRefused unless the router proved the key."""
    theirs = (await _read(reader)).get("challenge")
    if not isinstance(theirs, str) or not 16 <= len(theirs) <= 128:
        raise LinkRefused("the router sent no challenge")
    mine = secrets.token_hex(16)
    body = json.dumps(hello, sort_keys=True)
    writer.write(encode({"proof": _mac(key, "leader", theirs, mine, body), "challenge": mine, "hello": hello}))
    answer = await _read(reader)
    if not _same(answer.get("proof"), _mac(key, "router", mine, theirs)):
        raise LinkRefused("the router did not prove the replica key")


async def accept(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str, judge: Callable[[dict[str, Any]], str]
) -> dict[str, Any]:
    """The router's side: the leader's checked hello, or LinkRefused (the leader is told why).

    `judge` names what is wrong with a proven hello (not this job's replica, an older attempt), or
    says nothing; a refused leader never sees the router's proof, so it never counts as linked."""
    mine = secrets.token_hex(16)
    writer.write(encode({"challenge": mine}))
    try:
        msg = await asyncio.wait_for(_read(reader, peer_errors=False), HELLO_S)
    except asyncio.TimeoutError:
        raise LinkRefused(f"no hello within {HELLO_S:g}s") from None
    hello, theirs = msg.get("hello"), msg.get("challenge")
    why = ""
    if not isinstance(hello, dict) or not isinstance(theirs, str) or not 16 <= len(theirs) <= 128:
        why = "not a hello"
    elif not _same(msg.get("proof"), _mac(key, "leader", mine, theirs, json.dumps(hello, sort_keys=True))):
        why = "wrong replica key"
    elif not all(isinstance(hello.get(k), int) and hello[k] >= 0 for k in HELLO_INTS):
        why = f"a hello needs the integers {', '.join(HELLO_INTS)}"
    else:
        why = judge(hello)  # type: ignore[arg-type]
    if why:
        writer.write(encode({"error": why}))
        raise LinkRefused(why)
    writer.write(encode({"proof": _mac(key, "router", theirs, mine)}))
    return hello  # type: ignore[return-value]


class HandshakePool:
    """The link port's handshakes in progress, bounded so that a flood cannot lock leaders out.

    Anyone may connect. When MAX_HANDSHAKES are in progress, a newcomer takes the slot of the oldest
    handshake of the peer address holding the most slots (that one is closed). A leader answers
    the router's challenge at once, so its handshake lasts milliseconds; a silent connection lasts
    HELLO_S at most, and under a flood it is evicted long before. A flood from one host thus
    evicts its own connections first, and leaders on other hosts are never evicted by it.
    """

    def __init__(self, cap: int = MAX_HANDSHAKES) -> None:
        self.cap = cap
        self.slots: dict[asyncio.StreamWriter, tuple[str, float]] = {}
        self.evicted = 0

    def enter(self, writer: asyncio.StreamWriter) -> str | None:
        """Take a slot; returns the peer whose handshake was closed to make room, if one was."""
        evicted = None
        if len(self.slots) >= self.cap:
            counts = Counter(peer for peer, _ in self.slots.values())
            most = max(counts.values())
            victim = min((w for w, (p, _) in self.slots.items() if counts[p] == most), key=lambda w: self.slots[w][1])
            evicted = self.slots.pop(victim)[0]
            self.evicted += 1
            victim.transport.abort()
        self.slots[writer] = (peer_host(writer), time.monotonic())
        return evicted

    def leave(self, writer: asyncio.StreamWriter) -> None:
        self.slots.pop(writer, None)


def peer_host(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else "?"


class PeerLog:
    """Log lines about what peers did: each distinct line at most once per WINDOW_S, at most LINES
    per window in all; the rest are counted and summed up in one line, so a flood of distinct junk
    can neither fill the log nor keep later refusals out of it for longer than a window."""

    WINDOW_S = 60.0
    LINES = 20

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.seen: set[str] = set()
        self.dropped = 0

    def __call__(self, what: str) -> None:
        self.flush()
        if what in self.seen or len(self.seen) >= self.LINES:
            self.dropped += 1
            return
        self.seen.add(what)
        print(what, flush=True)

    def flush(self) -> None:
        if time.monotonic() - self.t0 < self.WINDOW_S:
            return
        if self.dropped:
            print(f"({self.dropped} more lines like these in the last {self.WINDOW_S:g}s not shown)", flush=True)
        self.t0, self.seen, self.dropped = time.monotonic(), set(), 0


class Dialer:
    """The replica leader's side of the links: a Front in this mode serves the routers, not a port.

    One dial loop per router (the job's routers, a standby among them), each redialling on its own;
    every link serves with the same Front, and every answer tells that router the rows this leader
    has from all of them (`load`), so that routers sharing a replica do not overload it."""

    def __init__(self, routers: list[str] | str, key: str, hello: dict[str, Any]) -> None:
        self.routers = [routers] if isinstance(routers, str) else list(routers)
        self.key = key
        self.hello = hello
        self.address = ("router " if len(self.routers) == 1 else "routers ") + ", ".join(self.routers)
        self.up: set[str] = set()  # the routers a link is up to
        self.links: set[Any] = set()  # their NDJSON connections (serving.ndjson.Conn)
        self._said: dict[str, str] = {}

    @property
    def linked(self) -> bool:
        return bool(self.up)

    def _say(self, router: str, what: str) -> None:
        """One rank-log line per change and router, not one per dial."""
        if what != self._said.get(router):
            self._said[router] = what
            print(what, flush=True)

    async def run(self, front: Front) -> None:
        """Every router's dial loop, until cancelled."""
        await asyncio.gather(*(self._run(front, r) for r in self.routers))

    async def _run(self, front: Front, router: str) -> None:
        """Dial, handshake, serve; on any loss redial with a short back-off until cancelled."""
        host, _, port_s = router.rpartition(":")
        host, port = host.strip("[]"), int(port_s)
        pause = REDIAL_S[0]
        # `closing` as well as cancellation: asyncio.wait_for may swallow a cancel (Python < 3.12)
        while not front.closing:
            if not front.accepting:  # not started yet, or stopping: a router would get `unavailable`
                await asyncio.sleep(0.05)
                continue
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), HANDSHAKE_S)
                await asyncio.wait_for(offer(reader, writer, self.key, self.hello), HANDSHAKE_S)
                self._say(router, f"linked to the router {router}")
                pause = REDIAL_S[0]
                self.up.add(router)
                await serve_ndjson(front, reader, writer, b"", link=True, links=self.links)
                self._say(router, f"lost the link to the router {router}; redialling")
            except (OSError, asyncio.TimeoutError, LinkRefused, ValueError) as e:
                self._say(router, f"cannot link to the router {router}: {type(e).__name__}: {e}"[:300])
            finally:
                self.up.discard(router)
                if writer is not None:
                    writer.close()
            deadline = time.monotonic() + pause
            while not front.closing and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            pause = min(pause * 2, REDIAL_S[1])
