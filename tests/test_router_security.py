"""The router's surfaces under abuse, against a real supervised router (token set) and two real
replicas: the link port's handshake pool and its peers' text, idle strangers on the public port,
a wrong token on an authenticated connection, HTTP body framing, the drain file, and the ports
held across a router's death. One job for the module; each test leaves it serving."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dslaunch.serving import drainfile, link
from dslaunch.wire.serve import ServeSpec
from tests.routerkit import Kit, _secret

TOKEN = "tok-" + "5" * 28
SERVE = ServeSpec(handler="tests.routerkit:Echo", max_batch_size=2, batch_wait_ms=0, max_request_bytes=4096,
                  max_connections=12, bind="127.0.0.1")  # fmt: skip


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    k = Kit(tmp_path_factory.mktemp("sec"), SERVE, replicas=2)
    _secret(k.router_dir.front_token, TOKEN)
    k.token = TOKEN
    try:
        k.start_router(supervised=True)
        k.start_replica(0)
        k.start_replica(1)
        yield k
    finally:
        k.close()


def _conn(kit: Kit, port: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port or kit.port), timeout=30)
    return s


def _lines(s: socket.socket, n: int = 1) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        got = s.recv(65536)
        if not got:
            break
        buf += got
    return [json.loads(x) for x in buf.split(b"\n") if x.strip()]


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _served(kit: Kit) -> None:
    with kit.client(token=TOKEN) as c:
        assert c.infer(7) == {"echo": 7}


def test_a_wrong_token_on_an_authenticated_connection_is_unauthorized(kit: Kit) -> None:
    s = _conn(kit)
    s.sendall(json.dumps({"id": 1, "op": "infer", "input": 1, "token": TOKEN}).encode() + b"\n")
    assert _lines(s)[0]["ok"] is True
    s.sendall(json.dumps({"id": 2, "op": "infer", "input": 2, "token": "wrong"}).encode() + b"\n")
    answer = _lines(s)[0]
    assert answer["id"] == 2 and answer["error"]["code"] == "unauthorized"
    assert _closed(s)
    s.close()


def test_idle_strangers_do_not_crowd_out_clients_with_the_token(kit: Kit) -> None:
    strangers = [_conn(kit) for _ in range(3 * SERVE.max_connections)]  # never authenticate
    try:
        time.sleep(0.5)  # every one accepted (an event the test cannot see otherwise)
        _served(kit)  # before: `overloaded` until the strangers' 10 s deadline, again and again
        evicted = sum(_closed_now(s) for s in strangers)
        assert evicted >= 2 * SERVE.max_connections - 1, "the oldest strangers made room"
        # the authenticated pool is still capped by --max-connections
        members = [_conn(kit) for _ in range(SERVE.max_connections)]
        for m in members:
            m.sendall(json.dumps({"id": 0, "op": "auth", "token": TOKEN}).encode() + b"\n")
            assert _lines(m)[0]["ok"] is True
        extra = _conn(kit)
        extra.sendall(json.dumps({"id": 0, "op": "auth", "token": TOKEN}).encode() + b"\n")
        assert _lines(extra)[0]["error"]["code"] == "overloaded"
        for m in [*members, extra]:
            m.close()
    finally:
        for s in strangers:
            s.close()
    kit.until(lambda: _try_served(kit))


def _closed_now(s: socket.socket) -> bool:
    s.settimeout(0.2)  # an evicted one is closed already
    return _closed(s)


def _try_served(kit: Kit) -> bool:
    try:
        _served(kit)
        return True
    except Exception:
        return False


def test_http_body_framing_errors_are_400_and_quote_nothing(kit: Kit) -> None:
    auth = f"authorization: Bearer {TOKEN}\r\n".encode()
    s = _conn(kit)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + auth + b"transfer-encoding: chunked\r\n\r\n"
              b'{"prompt": "SECRET-PROMPT-TEXT"}\r\n')  # fmt: skip
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 400 ") and b"SECRET-PROMPT-TEXT" not in head
    s.close()
    s = _conn(kit)  # a client that leaves mid-body
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + auth + b'content-length: 100\r\n\r\n{"pro')
    s.close()
    s = _conn(kit)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + auth + b"transfer-encoding: chunked\r\n\r\n5\r\nab")
    s.close()
    _served(kit)  # after both: the router served on and logged nothing about them
    log = kit.router_log()
    assert "SECRET-PROMPT-TEXT" not in log and "Traceback" not in log and "internal error" not in log


@pytest.mark.parametrize("text", ["[true]", "[1.9]", '"01"', '[" 0 "]', "[1e400]", "[NaN]", "[2]", "", "{}", "[-1]"])
def test_the_drain_format_is_strict(text: str) -> None:
    with pytest.raises(drainfile.BadDrainFile):
        drainfile.parse(text.encode(), 2)
    assert drainfile.parse(b"[1, 0]", 2) == {0, 1} and drainfile.parse(b"[]", 2) == frozenset()


def test_a_bad_drain_file_keeps_the_drain_and_never_stalls_the_router(kit: Kit, tmp_path: Path) -> None:
    drain = kit.router_dir.drain
    said = lambda what: what in kit.router_log()  # noqa: E731
    drain.write_text("[1e400]")  # before: OverflowError ended the housekeeping (pings, drain) for good
    kit.until(lambda: said("is not a replica id"))
    drain.write_text("[0]")
    kit.wait_state(0, "draining")
    kit.until(lambda: said("draining [0] (was [])"))
    drain.unlink()
    os.mkfifo(drain)  # before: a blocking read froze the event loop
    kit.until(lambda: said("it is not a regular file"))
    assert kit.replica(0)["state"] == "draining" and kit.health()["status"] == "ready"
    drain.unlink()
    target = tmp_path / "elsewhere"
    target.write_text("[]")
    drain.symlink_to(target)  # not followed
    kit.until(lambda: said("a symbolic link is not followed"))
    drain.unlink()
    drain.write_text('[" 0 "]')
    kit.until(lambda: said('" 0 " is not a replica id'))
    assert kit.replica(0)["state"] == "draining", "a bad file does not undrain"
    drain.write_text("[]")
    kit.wait_state(0, "ready")
    _served(kit)


def test_peers_without_the_key_cannot_write_the_router_log(kit: Kit) -> None:
    forged = "replica 0 linked (attempt 9, 1 ranks)"
    for i in range(55):  # each with different text: before, 50 distinct lines silenced the log
        s = _conn(kit, kit.link_port)
        s.recv(4096)  # the challenge
        s.sendall(json.dumps({"error": f"junk {i}\n{forged}"}).encode() + b"\n")
        s.close()
    import asyncio

    async def wrong_key() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", kit.link_port)
        try:
            hello = {"replica": 0, "attempt": 0, "ranks": 1, "model": "m", "task": "custom", "max_batch_size": 2}
            await link.offer(reader, writer, "not-the-key-0123456789", hello)
        finally:
            writer.close()

    with pytest.raises(link.LinkRefused):
        asyncio.run(wrong_key())
    kit.until(lambda: "refused a link from 127.0.0.1: wrong replica key" in kit.router_log())
    log = kit.router_log()
    assert "junk" not in log and "attempt 9" not in log
    assert "refused a link from 127.0.0.1: an error line, not a hello" in log


class Flood:
    """Connections to the link port that never send a byte, reopened as soon as one closes."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        held: list[socket.socket] = []
        while not self.stop.is_set():
            for s in [s for s in held if _dead(s)]:
                held.remove(s)
                s.close()
            while len(held) < self.n and not self.stop.is_set():
                try:
                    held.append(socket.create_connection(("127.0.0.1", self.port), timeout=1))
                    self.opened += 1
                except OSError:
                    break
            time.sleep(0.02)
        for s in held:
            s.close()


def _dead(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(4096) == b"" and True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_the_ports_stay_held_and_a_link_flood_locks_no_leader_out(kit: Kit) -> None:
    flood = Flood(kit.link_port, 80)
    try:
        kit.until(lambda: flood.opened >= 80)
        before = kit.router_pid()
        os.kill(before, signal.SIGKILL)
        for port in (kit.link_port, kit.port):  # another user, in the moment the router is gone
            squat = socket.socket()
            squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as e:
                squat.bind(("127.0.0.1", port))
            assert e.value.errno == errno.EADDRINUSE
            squat.close()
        kit.until(lambda: kit.router_pid() != before and kit.router_dir.front_status.exists())
        # both leaders link again while the flood goes on (before: every slot held, 27 s locked out)
        kit.wait_state(0, "ready", within=60)
        kit.wait_state(1, "ready", within=60)
        assert not flood.stop.is_set() and flood.thread.is_alive()
        _served(kit)
        kit.until(lambda: "handshake pool full" in kit.router_log())
    finally:
        flood.stop.set()
        flood.thread.join(10)
    # killed again once it served: the back-off starts again (before: 1, 2, 4 s after 5 kills)
    again = kit.router_pid()
    os.kill(again, signal.SIGKILL)
    kit.until(lambda: kit.router_pid() != again)
    kit.until(lambda: _try_served(kit))
    assert kit.router_log().count("restarting in 0.5s") == 2
