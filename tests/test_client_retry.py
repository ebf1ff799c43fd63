"""The client's retry rules against a real TCP server that answers as scripted.

Rules: `unavailable` is retried with a growing pause until `retry_for` runs out; a dropped
connection is reconnected and the request resent only if nothing of its answer came yet; a
time-out is never resent (the work may be running); other error codes are raised at once.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client, FrontError
from tests import netns

Script = Callable[[dict, socket.socket, int], bool]  # (request, conn, n) -> keep the connection open


@contextmanager
def scripted_front(script: Script) -> Iterator[tuple[int, list[dict]]]:
    """A loopback server that hands every request line (and how many came before) to `script`."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[dict] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                buf = b""
                while not stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        break
                    if not data:
                        break
                    buf += data
                    keep = True
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        req = json.loads(line)
                        seen.append(req)
                        keep = script(req, conn, len(seen) - 1)
                    if not keep:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        stop.set()
        t.join(5)
        srv.close()


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def test_unavailable_is_retried_until_the_job_is_back() -> None:
    def script(req: dict, conn: socket.socket, n: int) -> bool:
        if n < 2:
            _send(conn, {"id": req["id"], "ok": False, "error": {"code": "unavailable", "message": "restarting"}})
        else:
            _send(conn, {"id": req["id"], "ok": True, "text": "back"})
        return True

    with scripted_front(script) as (port, seen), Client("127.0.0.1", port, retry_for=10) as c:
        assert c.generate("x")["text"] == "back"
    assert len(seen) == 3 and len({r["id"] for r in seen}) == 3, "each retry is a new request id"


def test_unavailable_gives_up_after_retry_for() -> None:
    def script(req: dict, conn: socket.socket, n: int) -> bool:
        _send(conn, {"id": req["id"], "ok": False, "error": {"code": "unavailable", "message": "restarting"}})
        return True

    with scripted_front(script) as (port, seen), Client("127.0.0.1", port, retry_for=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(FrontError) as e:
            c.generate("x")
    assert e.value.code == "unavailable" and time.monotonic() - t0 < 3 and 2 <= len(seen) <= 4


def test_other_errors_are_not_retried() -> None:
    def script(req: dict, conn: socket.socket, n: int) -> bool:
        _send(conn, {"id": req["id"], "ok": False, "error": {"code": "bad_request", "message": "no"}})
        return True

    with (
        scripted_front(script) as (port, seen),
        Client("127.0.0.1", port, retry_for=10) as c,
        pytest.raises(FrontError, match="bad_request: no"),
    ):
        c.generate("x")
    assert len(seen) == 1


def test_a_dropped_connection_is_reconnected_before_any_answer_but_not_after_a_stream_began() -> None:
    def drop_first(req: dict, conn: socket.socket, n: int) -> bool:
        if n == 0:
            return False  # close without answering: nothing came, so the client may resend
        _send(conn, {"id": req["id"], "ok": True, "text": "ok"})
        return True

    with scripted_front(drop_first) as (port, seen), Client("127.0.0.1", port, retry_for=10) as c:
        assert c.generate("x")["text"] == "ok"
    assert len(seen) == 2

    def drop_mid_stream(req: dict, conn: socket.socket, n: int) -> bool:
        _send(conn, {"id": req["id"], "ok": True, "index": 0, "chunk": "partial"})
        return False

    with scripted_front(drop_mid_stream) as (port, seen), Client("127.0.0.1", port, retry_for=10) as c:
        events = c.stream("x")
        assert next(events)["chunk"] == "partial"
        with pytest.raises(ConnectionError):
            next(events)
    assert len(seen) == 1, "never resent once the answer had started"


def test_a_time_out_is_never_resent() -> None:
    def silent(req: dict, conn: socket.socket, n: int) -> bool:
        return True

    with (
        scripted_front(silent) as (port, seen),
        Client("127.0.0.1", port, timeout=0.5, retry_for=10) as c,
        pytest.raises(TimeoutError, match=r"no answer within 0\.5s"),
    ):
        c.generate("x")
    assert len(seen) == 1


HUSHED = """
import socket, sys, time
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = srv.accept()
while b"\\n" not in conn.recv(65536):
    pass
print("got it", flush=True)
time.sleep(600)
"""


def test_a_router_gone_silent_is_given_up_by_the_kernel_and_the_request_moves_on(tmp_path: Path) -> None:
    """A router whose host drops off the network mid-request resets nothing: without keep-alive
    the client would wait out its whole time-out (60 s here) and then not resend. Its TCP
    keep-alive ends the connection with ETIMEDOUT instead, and the request goes to the next
    router as it would for a reset one."""
    why = netns.available()
    if why:
        pytest.skip(why)
    net = netns.NodeNetwork(1)
    hushed = None
    try:
        hushed = subprocess.Popen([*net.exec_prefix(0), sys.executable, "-c", HUSHED, "7070"],
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert hushed.stdout is not None and hushed.stdout.readline() == "listening\n"

        def answer(req: dict, conn: socket.socket, n: int) -> bool:
            _send(conn, {"id": req["id"], "ok": True, "text": "from the other router"})
            return True

        with scripted_front(answer) as (port, seen), \
                Client(net.addrs[0], 7070, timeout=60, retry_for=30, also=[("127.0.0.1", port)]) as c:  # fmt: skip
            box: list[Any] = []
            t = threading.Thread(target=lambda: box.append(c.generate("x")))
            t.start()
            assert hushed.stdout.readline() == "got it\n"
            net.silence(0)
            t.join(50)
            assert box and box[0]["text"] == "from the other router", "answered by the other router"
            assert len(seen) == 1 and c.address == f"127.0.0.1:{port}"
    finally:
        if hushed is not None:
            hushed.kill()
            hushed.wait(10)
        net.close()
