"""Abuse of a front that needs a token, over NDJSON and HTTP: slow or unauthenticated clients,
malformed HTTP, huge and endless bodies, pipelining, a stream nobody reads, a squatter on the
port. Each gets a clear answer or a closed connection, and the job goes on (issues 13 and 14)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client, FrontError, for_job
from dslaunch.launch.store import JobRecord
from tests.conftest import Cli, status_json
from tests.front.conftest import IDLE_S, TOKEN

AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()


def _still_answers(port: int) -> None:
    with Client("127.0.0.1", port, token=TOKEN, retry_for=0, timeout=60) as c:
        assert c.generate("Hello", max_new_tokens=2)["tokens"] >= 1


def _read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(1 << 16):
            data += chunk
    except OSError:
        pass
    return data


def _closed_within(s: socket.socket, seconds: float, trickle: bytes) -> float:
    """Send `trickle` one byte every 0.5 s until the front closes; returns when it did."""
    t0 = time.monotonic()
    s.settimeout(0.5)
    for b in trickle * 100:
        try:
            s.sendall(bytes([b]))
            if s.recv(1 << 16) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            pass
        except OSError:
            return time.monotonic() - t0
        if time.monotonic() - t0 > seconds:
            break
    raise AssertionError(f"still open after {seconds:g}s of one byte every 0.5 s")


def test_unauthenticated_connections_close_at_a_fixed_deadline(port: int) -> None:
    """One byte every 0.5 s used to restart the idle time-out forever."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        took = _closed_within(s, IDLE_S + 6, b'{"id": 1, "op": "health", "x": "' + b"a" * 200)
    assert took < IDLE_S + 4
    with socket.create_connection(("127.0.0.1", port)) as s:
        took = _closed_within(s, IDLE_S + 6, b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200)
    assert took < IDLE_S + 4
    _still_answers(port)


def test_before_the_token_one_line_is_read_and_the_connection_closed(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b'{"id": 1, "op": "generate", "prompt": "x"}\n' * 50)
        answers = [json.loads(ln) for ln in _read_all(s).splitlines()]
    assert [a["error"]["code"] for a in answers] == ["unauthorized"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b'{"id": 2, "op": "health", "token": "\\udc00"}\n{"id": "\\ud800", "op": "health"}\n')
        answers = [json.loads(ln) for ln in _read_all(s).splitlines()]
    assert [(a["id"], a["error"]["code"]) for a in answers] == [(2, "unauthorized")]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b'{"id": "\\ud800", "op": "health", "token": "%s"}\n' % TOKEN.encode())
        answers = [json.loads(ln) for ln in _read_all(s).splitlines()[:1]]
    assert answers[0]["id"] is None and answers[0]["error"]["code"] == "bad_request"


def test_the_client_checks_the_front_before_it_sends_the_token(job: tuple[Cli, dict[str, Any]]) -> None:
    """A program squatting on the front's port gets no token: it cannot answer the nonce challenge."""
    cli, raw = job
    got: list[bytes] = []
    squat = socket.create_server(("127.0.0.1", 0))
    squat_port = squat.getsockname()[1]

    def serve() -> None:
        conn, _ = squat.accept()
        with conn:
            data = conn.recv(1 << 16)
            got.append(data)
            rid = json.loads(data.splitlines()[0])["id"]
            conn.sendall(json.dumps({"id": rid, "ok": True, "status": "ready", "proof": "0" * 64}).encode() + b"\n")
            conn.settimeout(3)
            with contextlib.suppress(OSError):
                got.append(conn.recv(1 << 16))

    t = threading.Thread(target=serve)
    t.start()
    rec = JobRecord.from_dict(raw)
    assert rec.front is not None
    rec.front = dataclasses.replace(rec.front, port=squat_port, ports=[squat_port])
    try:
        with pytest.raises(FrontError) as e, for_job(dataclasses.replace(rec), timeout=10) as c:
            c.generate("Hello")
        assert e.value.code == "not_this_job"
    finally:
        t.join(10)
        squat.close()
    assert got and TOKEN.encode() not in b"".join(got), "the token never reached the squatter"
    q = cli("query", "Hello", "-k", "3")  # the real front proves the nonce
    assert q.returncode == 0, q.stderr


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1 extra words\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
        (b"GET /health HTTP/1.1\r\nhost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"content-length: 1000000000000\r\n\r\n", b"413"),
        (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"content-length: 5\r\n\r\n{oops", b"400"),
        (b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}", b"401"),
        (b"DELETE /v1/models HTTP/1.1\r\nhost: x\r\n" + AUTH + b"\r\n", b"405"),
    ],
)
def test_malformed_or_refused_http_gets_a_status(port: int, request_bytes: bytes, status: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request_bytes)
        head = _read_all(s).split(b"\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 " + status), head


def test_endless_chunked_bodies_are_cut_and_memory_stays_bounded(job: tuple[Cli, dict[str, Any]], port: int) -> None:
    pid = status_json(job[0])["ranks"][0]["pid"]
    rss = lambda: int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 1024  # noqa: E731
    base = rss()
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"transfer-encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # fast: over the size limit
        s.sendall(head)
        chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
        try:
            for _ in range(200):
                s.sendall(chunk)
        except OSError:
            pass
        assert _read_all(s).startswith(b"HTTP/1.1 413")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # slow: past the body deadline
        s.sendall(head)
        t0 = time.monotonic()
        answer = b""
        while time.monotonic() - t0 < IDLE_S + 10 and not answer:
            try:
                s.sendall(b"1\r\na\r\n")
                s.settimeout(0.5)
                answer = s.recv(1 << 16)
            except TimeoutError:
                pass
            except OSError:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert rss() - base < 50
    _still_answers(port)


def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0}).encode()
    post = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"content-length: %d\r\n\r\n" % len(body) + body
    get = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + AUTH + b"\r\n"
    last = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n" + AUTH + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(get + post + get + last)
        data = _read_all(s)
    assert data.count(b"HTTP/1.1 ") == data.count(b"HTTP/1.1 200 OK\r\n") == 4, data[:300]
    assert data.index(b'"object":"list"') < data.index(b"text_completion") < data.rindex(b'"object":"list"')
    assert data.rindex(b'"status":"ready"') > data.rindex(b'"object":"list"')


def test_a_stream_nobody_reads_ends_and_frees_its_rows(port: int) -> None:
    body = json.dumps({"prompt": "Hello", "max_tokens": 400, "stream": True, "temperature": 0}).encode()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n" + AUTH + b"content-length: %d\r\n\r\n" % len(body)
                  + body)  # fmt: skip
        assert s.recv(200).startswith(b"HTTP/1.1 200"), "the stream started"
        time.sleep(3 + 2)  # never read again: the front cuts it at --write-timeout, or it ends into buffers
        _still_answers(port)
    finally:
        s.close()
    deadline = time.monotonic() + 30
    with Client("127.0.0.1", port, token=TOKEN, timeout=60) as c:
        while c.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.stats()["in_flight"] == 0, "its rows stopped when the client went away"
