"""A small synchronous client for the front, used by `dslaunch query` and by user code.

    from dslaunch.client import Client
    with Client("127.0.0.1", 7070) as c:
        print(c.generate("Hello", max_new_tokens=16)["text"])
        for event in c.stream("Hello"):
            print(event.get("chunk", ""), end="")

It reconnects when the connection drops and retries `unavailable` answers (a job that is
starting, restarting after a lost rank, or stopping) for up to `retry_for` seconds, with a
growing pause. A request whose answer had started (a stream) or timed out is never resent.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from dslaunch.wire.protocol import UNAVAILABLE, encode


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
    ) -> None:
        self.address = f"{host}:{port}"
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for
        self._connect = connect or (lambda: socket.create_connection((host, port), timeout=min(timeout, 10.0)))
        self._cleanup = cleanup  # e.g. closing the SSH connection a tunnel runs over
        self._conn: Conn | None = None
        self._buf = b""
        self._ids = itertools.count(1)

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
        """Every answer line for one request; retried from the start only if nothing came yet."""
        pause = 0.2
        give_up = time.monotonic() + self.retry_for
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
            except TimeoutError:
                self.close()  # the answer may still come: never resend work that may be running
                raise TimeoutError(f"front {self.address}: no answer within {self.timeout:g}s") from None
            except (OSError, EOFError, ConnectionError) as e:
                self.close()
                if started or time.monotonic() + pause > give_up:
                    raise ConnectionError(f"front {self.address}: {e}") from None
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    def _send(self, data: bytes) -> None:
        if self._conn is None:
            self._conn = self._connect()
            self._conn.settimeout(self.timeout)
        self._conn.sendall(data)

    def _read(self, rid: int) -> dict[str, Any]:
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


def for_job(rec: Any, timeout: float = 300.0, token: str | None = None) -> Client:
    """A client for a recorded job's front, through an SSH tunnel when it listens on a remote loopback."""
    from dslaunch.errors import UserError
    from dslaunch.transport.base import ConnectOptions
    from dslaunch.transport.nodes import connect

    front = rec.front
    if front is None:
        raise UserError(f"job {rec.name!r} has no front recorded (was it started by an older dslaunch?)")
    port, bind = int(front.port), front.bind
    token = token or front.token
    node0 = rec.nodes[0].node()
    if front.loopback and not node0.is_local:
        opts = ConnectOptions(rec.connect_timeout, rec.command_timeout, rec.accept_new_host_keys)
        transport = connect(node0, opts)
        tunnel: Any = getattr(transport, "tunnel", None)
        return Client(f"{node0.host} → {bind}", port, token, timeout,
                      connect=lambda: tunnel(bind, port), cleanup=transport.close)  # fmt: skip
    host = bind
    if front.loopback:
        host = "127.0.0.1" if bind == "localhost" else bind
    elif bind in ("0.0.0.0", "::"):
        host = rec.nodes[0].address or node0.host
    return Client(host, port, token, timeout)
