"""The front under abuse: random bytes, deep JSON, huge lines, slow and idle clients, 200
connections at once. Every case gets an error or a closed connection; the job keeps answering."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslaunch.client import Client
from tests.conftest import Cli, local_job

ERROR_CODES = {"bad_request", "too_large", "overloaded", "unavailable", "timeout", "unauthorized", "internal"}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict[str, Any]]]:
    yield from local_job(tmp_path_factory, "--idle-timeout", "2", "--max-queue", "64", "--max-request-bytes", "65536")


@pytest.fixture(scope="module")
def front(job: tuple[Cli, dict[str, Any]]) -> tuple[Cli, int]:
    return job[0], job[1]["front"]["port"]


def _still_answers(port: int) -> None:
    with Client("127.0.0.1", port, retry_for=0, timeout=60) as c:
        assert c.generate("Hello", max_new_tokens=2)["tokens"] >= 1


def _received(port: int, payload: bytes, wait: float = 10.0) -> bytes:
    """Send bytes, half-close, and read everything until the front closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    return data


def _exchange(port: int, payload: bytes, wait: float = 10.0) -> list[dict[str, Any]]:
    """Every NDJSON answer line to `payload`."""
    return [json.loads(line) for line in _received(port, payload, wait).splitlines()]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(min_size=1, max_size=300))
def test_random_bytes_get_errors_and_the_front_stays_up(front: tuple[Cli, int], payload: bytes) -> None:
    _, port = front
    data = _received(port, payload + b"\n")
    if data.startswith(b"HTTP/1.1 "):  # bytes that open like an HTTP request get an HTTP error
        assert data[9:10] == b"4", data[:200]
        return
    for answer in (json.loads(line) for line in data.splitlines()):
        assert answer["ok"] is False and answer["error"]["code"] in ERROR_CODES, answer


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000 + b"\n",  # deep JSON
        b'{"id": 1, "op": "generate", "prompt": "x", "max_new_tokens": 1' + b"0" * 5000 + b"}\n",
        b'{"id": 1, "op": "generate", "prompt": "x", "max_new_tokens": 1e999}\n',
        b'{"id": 1, "op": "generate", "prompt": "\xff\xfe"}\n',  # invalid UTF-8
        b'{"id": 1, "op": "generate", "prompt": "x"',  # truncated, then EOF
        b"x" * (10 << 20) + b"\n",  # 10 MB line
    ],
)
def test_malformed_requests(front: tuple[Cli, int], payload: bytes) -> None:
    _, port = front
    answers = _exchange(port, payload, wait=60)
    assert all(a["ok"] is False and a["error"]["code"] in ("bad_request", "too_large") for a in answers), answers
    _still_answers(port)


def test_a_slow_client_does_not_block_others_and_idle_ones_are_closed(front: tuple[Cli, int]) -> None:
    _, port = front
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        line = b'{"id": "slow", "op": "health"}\n'
        for b in line[:10]:  # a byte at a time, slower than the others' whole requests
            slow.sendall(bytes([b]))
            t0 = time.monotonic()
            _still_answers(port)
            assert time.monotonic() - t0 < 30
            time.sleep(0.1)
        slow.sendall(line[10:])
        assert json.loads(slow.makefile("rb").readline())["id"] == "slow"
    finally:
        slow.close()
    idle = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        t0 = time.monotonic()
        assert idle.recv(10) == b"", "an idle connection is closed by the front"
        assert 1.5 < time.monotonic() - t0 < 20, "after --idle-timeout (2 s)"
    finally:
        idle.close()


def test_two_hundred_connections_are_answered_or_refused_with_overloaded(front: tuple[Cli, int]) -> None:
    cli, port = front
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()
    go = threading.Event()

    def one(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            go.wait()
            s.sendall(json.dumps({"id": i, "op": "generate", "prompt": "Hello", "max_new_tokens": 4}).encode() + b"\n")
            a = json.loads(s.makefile("rb").readline())
        with lock:
            answers.append(a)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(180)
    assert sorted(a["id"] for a in answers) == list(range(200)), "every connection got its own answer"
    refused = [a for a in answers if not a["ok"]]
    assert all(a["error"]["code"] == "overloaded" for a in refused), refused[:3]
    assert refused, "200 at once exceed --max-queue 64"
    assert len(refused) < 200
    st = json.loads(cli("status", "--json").stdout)
    rss = st["ranks"][0]["rss_mb"]
    print(f"rank 0 RSS after 200 connections: {rss} MiB")
    assert rss is not None and rss < 2048, "rank 0's memory stays bounded"
    _still_answers(port)
