"""A small synchronous client for the front, used by `dslaunch query` and by user code.

    from dslaunch.client import Client
    with Client("127.0.0.1", 7070) as c:
        print(c.generate("Hello", max_new_tokens=16)["text"])
        for event in c.stream("Hello"):
            print(event.get("chunk", ""), end="")

It reconnects when the connection drops and retries `unavailable` answers (a job that is
starting, restarting after a lost rank, or stopping) for up to `retry_for` seconds, with a
growing pause. A request whose answer had started (a stream) or timed out is never resent.

Given the job's other routers (`also`), a request that got no answer is retried on the next
router under the same rules (at once; the pause comes once every router was tried), and the
client stays with the router that answered:

    with Client("10.0.0.1", 7070, also=[("10.0.0.2", 7071)]) as c: ...
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from dslaunch.wire.keepalive import connect_tcp
from dslaunch.wire.protocol import UNAVAILABLE, encode, proof


class Conn(Protocol):
    """A connected socket, or an SSH channel that behaves like one."""

    def sendall(self, data: bytes) -> Any: ...

    def recv(self, n: int) -> bytes: ...

    def settimeout(self, t: float | None) -> Any: ...

    def close(self) -> Any: ...


class FrontError(Exception):
    """An error answer from the front: `code` is one of protocol.ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """One connection to a front; requests are sent one at a time and matched by id."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 7070,
        token: str | None = None,
        timeout: float = 300.0,
        retry_for: float = 60.0,
        connect: Callable[[], Conn] | None = None,
        cleanup: Callable[[], None] | None = None,
        nonce: str | None = None,
        also: Sequence[tuple[str, int]] = (),
        targets: Sequence[tuple[str, Callable[[], Conn]]] | None = None,
    ) -> None:
        """`also`: the job's other routers (host, port), tried in turn; `targets`: every router as
        (label, connect), instead of host/port/connect/also (`for_job` tunnels to each)."""
        dial = lambda h, p: lambda: connect_tcp(h, p, timeout=min(timeout, 10.0))  # noqa: E731
        self._targets = list(targets or [(f"{host}:{port}", connect or dial(host, port)),
                                         *((f"{h}:{p}", dial(h, p)) for h, p in also)])  # fmt: skip
        self._at = 0
        self.token = token
        self.nonce = nonce  # the job's: each new connection checks the front knows it before the token goes
        self.timeout = timeout
        self.retry_for = retry_for
        self._cleanup = cleanup  # e.g. closing the SSH connection a tunnel runs over
        self._conn: Conn | None = None
        self._buf = b""
        self._ids = itertools.count(1)

    @property
    def address(self) -> str:
        """The router this client talks to now."""
        return self._targets[self._at][0]

    @property
    def addresses(self) -> list[str]:
        return [label for label, _ in self._targets]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._cleanup is not None:
            self._cleanup()

    def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
                self._buf = b""

    # -- operations ----------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], **params: Any) -> dict[str, Any]:
        """Text for one prompt (`text`, `tokens`, `finish_reason`) or for a list (`results`)."""
        return self.request("generate", prompt=prompt, **params)

    def stream(self, prompt: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Chunk events (`chunk`, `index`) as they are produced, then the final answer (`done`)."""
        yield from self._events("generate", {"prompt": prompt, "stream": True, **params})

    def embed(self, texts: str | list[str]) -> Any:
        """One vector for a string, a list of vectors for a list."""
        answer = self.request("embed", input=texts)
        return answer["embedding"] if isinstance(texts, str) else answer["embeddings"]

    def infer(self, inputs: Any) -> Any:
        """For jobs running a --handler: one input (not a list) or a list of inputs."""
        answer = self.request("infer", input=inputs)
        return answer["results"] if isinstance(inputs, list) else answer["result"]

    def health(self, deep: bool = False) -> dict[str, Any]:
        return self.request("health", deep=deep)

    def stats(self) -> dict[str, Any]:
        return self.request("stats")["stats"]

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its final answer; raise FrontError for an error answer."""
        answers = list(self._events(op, fields))
        return answers[-1]

    # -- plumbing ------------------------------------------------------------------------------
    def _events(self, op: str, fields: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every answer line for one request; retried from the start only if nothing came yet, on the
        next router when there are several (the pause once every router was tried)."""
        pause = 0.2
        give_up = time.monotonic() + self.retry_for
        tries = 0
        while True:
            rid = next(self._ids)
            msg = {"id": rid, "op": op, **fields}
            if self.token:
                msg["token"] = self.token
            started = False
            try:
                self._send(encode(msg))
                while True:
                    answer = self._read(rid)
                    if not answer.get("ok"):
                        err = answer.get("error") or {}
                        raise FrontError(err.get("code", "internal"), err.get("message", "no message"))
                    started = True
                    yield answer
                    if "chunk" not in answer:
                        return
            except FrontError as e:
                if e.code != UNAVAILABLE or started or time.monotonic() + pause > give_up:
                    raise
            except TimeoutError as e:
                self.close()
                if e.errno is None:  # our own time-out: the answer may still come, never resend running work
                    raise TimeoutError(f"front {self.address}: no answer within {self.timeout:g}s") from None
                # ETIMEDOUT: the kernel gave the router up (connect_tcp), as good as a reset connection
                if started or time.monotonic() + pause > give_up:
                    raise ConnectionError(f"front {self.address}: the router stopped answering") from None
            except (OSError, EOFError, ConnectionError) as e:
                self.close()
                if started or time.monotonic() + pause > give_up:
                    raise ConnectionError(f"front {self.address}: {e}") from None
            tries += 1
            if len(self._targets) > 1:  # no answer: the next router (this one may be gone)
                self.close()
                self._at = (self._at + 1) % len(self._targets)
            if tries % len(self._targets) == 0:
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _send(self, data: bytes) -> None:
        if self._conn is None:
            try:
                self._conn = self._targets[self._at][1]()
            except TimeoutError as e:  # nothing was sent: as safe to try elsewhere as a refusal
                raise ConnectionError(f"cannot connect: {e}") from None
            self._conn.settimeout(self.timeout)
            if self.nonce:
                self._verify()
        self._conn.sendall(data)

    def _verify(self) -> None:
        """Make the front prove it knows the job's nonce, so the token never reaches a squatter."""
        assert self._conn is not None
        challenge = secrets.token_hex(16)
        self._conn.sendall(encode({"id": "verify", "op": "health", "challenge": challenge}))
        answer = self._read("verify")
        if not hmac.compare_digest(str(answer.get("proof")), proof(self.nonce or "", challenge)):
            self.close()
            raise FrontError(
                "not_this_job",
                f"whatever listens on {self.address} is not this job's front (it cannot prove the job's nonce); "
                "the token was not sent",
            )

    def _read(self, rid: int | str) -> dict[str, Any]:
        """The next answer line for `rid` (lines for other ids, from an abandoned request, are skipped)."""
        assert self._conn is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                answer = json.loads(line)
                if answer.get("id") in (rid, None):
                    return answer
                continue
            data = self._conn.recv(1 << 16)
            if not data:
                raise ConnectionError("the front closed the connection")
            self._buf += data


def for_job(rec: Any, timeout: float = 300.0, token: str | None = None, router: int | None = None) -> Client:
    """A client for a recorded job's routers (each through an SSH tunnel when it listens on a remote
    loopback), failing over from one to the next; `router`: that one alone."""
    front = _front(rec)
    links = [connector(rec, k) for k in _router_choice(rec, router)]
    closers = [c for _label, _connect, c in links if c is not None]

    def cleanup() -> None:
        for close in closers:
            close()

    return Client(token=token or front.token, timeout=timeout, cleanup=cleanup, nonce=front.nonce,
                  targets=[(label, connect) for label, connect, _c in links])  # fmt: skip


def _front(rec: Any) -> Any:
    from dslaunch.errors import UserError

    front = rec.front
    if front is None:
        raise UserError(f"job {rec.name!r} has no front recorded (was it started by an older dslaunch?)")
    return front


def _router_choice(rec: Any, router: int | None) -> list[int]:
    from dslaunch.errors import UserError

    count = len(_front(rec).router_ports)
    if router is None:
        return list(range(count))
    if not 0 <= router < count:
        raise UserError(f"--router {router}: job {rec.name!r} has routers 0..{count - 1}")
    return [router]


def connector(rec: Any, k: int = 0) -> tuple[str, Callable[[], Conn], Callable[[], None] | None]:
    """Where router K of a job is ("host:port", for messages), how to open a connection, and what
    closes the SSH connection a tunnel runs over (None when it is reached directly). The SSH
    connection opens on first use, so a router whose node is gone costs nothing until tried."""
    front = _front(rec)
    routers = [n for n in rec.nodes if getattr(n, "kind", "agent") == "router"] or rec.nodes[:1]
    entry = routers[k]
    port, bind = int(front.router_ports[k]), front.bind
    node = entry.node()
    if front.loopback and not node.is_local:
        from dslaunch.transport.base import ConnectOptions
        from dslaunch.transport.launchers import get_launcher

        launcher = get_launcher(getattr(rec, "launcher", "ssh"), getattr(rec, "launcher_meta", None))
        opts = ConnectOptions(rec.connect_timeout, rec.command_timeout, rec.accept_new_host_keys)
        import threading

        opened: list[Any] = []
        lock = threading.Lock()  # `tunnel` serves each local connection from a thread of its own

        def tunnel() -> Conn:
            from dslaunch.errors import DslaunchError

            transport = None
            try:
                with lock:
                    if not opened:
                        opened.append(launcher.connect(node, opts))  # SSH, or an srun step on a Slurm node
                    transport = opened[0]
                return transport.tunnel(bind, port)  # type: ignore[no-any-return]
            except Exception as e:
                with lock:
                    if transport is not None and transport in opened:  # broken: the next try opens a new one
                        opened.remove(transport)
                        transport.close()
                if isinstance(e, DslaunchError):  # the node does not answer: a connection error, so the
                    raise ConnectionError(str(e)) from None  # client tries the next router
                raise

        def close() -> None:
            with lock:
                while opened:
                    opened.pop().close()

        return f"{node.host} → {bind}:{port}", tunnel, close
    host = bind
    if front.loopback:
        host = "127.0.0.1" if bind == "localhost" else bind
    elif bind in ("0.0.0.0", "::"):
        host = entry.address or node.host
    return f"{host}:{port}", lambda: connect_tcp(host, port, timeout=10.0), None


def forward(rec: Any, local_port: int, ready: Callable[[int], None] | None = None, router: int | None = None) -> None:
    """Forward 127.0.0.1:local_port to the job's routers until interrupted (`dslaunch tunnel`).

    Each local connection gets its own connection to a router (an SSH channel when tunnelled), so
    HTTP clients such as curl or the openai package reach a loopback front on a node. A router
    that cannot be reached is skipped for the next (failover), the last that answered tried first.
    """
    import threading

    links = [connector(rec, k) for k in _router_choice(rec, router)]
    server = socket.create_server(("127.0.0.1", local_port))
    if ready is not None:
        ready(server.getsockname()[1])
    order = list(range(len(links)))
    lock = threading.Lock()

    def connect() -> Conn:
        with lock:
            tried = list(order)
        last: BaseException | None = None
        for k in tried:
            try:
                conn = links[k][1]()
            except Exception as e:
                last = e
                continue
            with lock:
                order.sort(key=lambda i: i != k)  # the one that answered goes first
            return conn
        raise ConnectionError(f"no router answered: {last}")

    try:
        while True:
            local, _ = server.accept()
            threading.Thread(target=_splice, args=(local, connect), daemon=True).start()
    finally:
        server.close()
        for _label, _connect, close in links:
            if close is not None:
                close()


def _splice(local: socket.socket, connect: Callable[[], Conn]) -> None:
    """Copy bytes both ways between a local connection and a new connection to the front."""
    import threading

    try:
        remote = connect()
    except Exception:
        local.close()
        return

    def pump(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for end in (src, dst):
                with contextlib.suppress(Exception):
                    end.close()

    remote.settimeout(None)
    threading.Thread(target=pump, args=(remote, local), daemon=True).start()
    pump(local, remote)
