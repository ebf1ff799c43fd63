"""Resource abuse of rank 0's front on a live job with no token (the loopback default): a client
that never reads, too many requests on one connection, too many connections, lone surrogates.
Each test reproduces an attack that worked before the front had these limits (issue 13)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client
from tests.conftest import Cli, local_job, status_json

MAX_INFLIGHT = 4
MAX_CONNECTIONS = 12
WRITE_TIMEOUT = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict[str, Any]]]:
    limits = ["--max-inflight", str(MAX_INFLIGHT), "--max-connections", str(MAX_CONNECTIONS)]
    yield from local_job(tmp_path_factory, *limits, "--write-timeout", str(WRITE_TIMEOUT), "--idle-timeout", "30")


@pytest.fixture(scope="module")
def port(job: tuple[Cli, dict[str, Any]]) -> int:
    return int(job[1]["front"]["port"])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _still_answers(port: int) -> None:
    with Client("127.0.0.1", port, retry_for=0, timeout=60) as c:
        assert c.generate("Hello", max_new_tokens=2)["tokens"] >= 1


def test_a_client_that_never_reads_cannot_grow_rank0_memory(job: tuple[Cli, dict[str, Any]], port: int) -> None:
    """One connection, no token, 300 x 1 MB request lines, answers never read (was +800 MB, kept)."""
    pid = status_json(job[0])["ranks"][0]["pid"]
    _still_answers(port)
    base = peak = _rss_mb(pid)
    prompt = ("The quick brown fox jumps over the lazy dog. " * 22300)[: 1_000_000 - 64]
    sent = 0
    stop = time.monotonic() + 60
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for i in range(300):
            try:
                s.sendall(json.dumps({"id": i, "op": "generate", "prompt": prompt}).encode() + b"\n")
            except OSError:  # the front stopped reading this connection (at its cap) or cut it
                break
            sent += 1
            if i % 10 == 0:
                peak = max(peak, _rss_mb(pid))
            if time.monotonic() > stop:
                break
        for _ in range(6):
            peak = max(peak, _rss_mb(pid))
            time.sleep(0.5)
    time.sleep(2)  # the front gives freed memory back shortly after the client leaves
    after = _rss_mb(pid)
    print(f"rank 0 RSS: {base:.0f} MB before, {peak:.0f} MB peak, {after:.0f} MB after; {sent} lines sent")
    assert peak - base < 50, f"rank 0 grew by {peak - base:.0f} MB"
    assert after - base < 50
    _still_answers(port)


def test_reading_pauses_at_the_in_flight_cap_of_a_connection(job: tuple[Cli, dict[str, Any]], port: int) -> None:
    seen: list[int] = []
    done, watching = threading.Event(), threading.Event()

    def watch() -> None:
        with Client("127.0.0.1", port, timeout=60) as c:
            while not done.is_set():
                st = c.stats()
                seen.append(st["queue"] + st["in_flight"])
                watching.set()
                time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert watching.wait(60), "the watcher could not ask for stats"  # it watches before the load starts
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            # long enough rows that a watcher starved of CPU still sees some of them queued or running
            asks = [{"id": i, "op": "generate", "prompt": "Hello world", "max_new_tokens": 120, "ignore_eos": True}
                    for i in range(12)]  # fmt: skip
            s.sendall(b"".join(json.dumps(a).encode() + b"\n" for a in asks))
            f = s.makefile("rb")
            answers = [json.loads(f.readline()) for _ in asks]
    finally:
        done.set()
        watcher.join(60)
    assert sorted(a["id"] for a in answers) == list(range(12)) and all(a["ok"] for a in answers)
    assert max(seen) >= 2, "the watcher saw the requests queued or running"
    assert max(seen) <= MAX_INFLIGHT, f"at most --max-inflight {MAX_INFLIGHT} rows of one connection at once: {seen}"


def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout(port: int) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    try:
        asks = b"".join(b'{"id": %d, "op": "stats"}\n' % i for i in range(20000))
        deadline = time.monotonic() + WRITE_TIMEOUT + 30
        cut = False
        while time.monotonic() < deadline and not cut:
            try:
                s.sendall(asks)  # ~10 MB of answers, more than the socket buffers hold, never read
                asks = b'{"id": "more", "op": "health"}\n'
                time.sleep(0.5)
            except TimeoutError:
                pass  # the front stopped reading (at its cap): keep pushing
            except OSError:
                cut = True
        assert cut, "the front closed the connection of a client that does not read"
    finally:
        s.close()
    _still_answers(port)


def _healthy_connection(port: int) -> socket.socket:
    """A connection the front answered `health` on. Connections of earlier tests may still hold
    their places for a moment on a loaded machine (the front has not seen them close yet)."""
    deadline = time.monotonic() + 60
    while True:
        c = socket.create_connection(("127.0.0.1", port), timeout=30)
        c.sendall(b'{"id": 0, "op": "health"}\n')
        answer = json.loads(c.makefile("rb").readline())
        if answer["ok"]:
            return c
        c.close()
        assert answer["error"]["code"] == "overloaded" and time.monotonic() < deadline, answer
        time.sleep(0.2)


def test_connections_over_the_cap_are_answered_overloaded(port: int) -> None:
    held = []
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(_healthy_connection(port))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b'{"id": 1, "op": "health"}\n')
            answer = json.loads(s.makefile("rb").readline())
            assert answer["error"]["code"] == "overloaded" and "--max-connections" in answer["error"]["message"]
            assert s.recv(10) == b"", "then closed"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            head = s.makefile("rb").readline()
            assert head.startswith(b"HTTP/1.1 429"), head
    finally:
        for c in held:
            c.close()
    time.sleep(0.5)
    _still_answers(port)


def test_lone_surrogates_get_answers_and_do_not_flood_the_rank_log(job: tuple[Cli, dict[str, Any]], port: int) -> None:
    log = Path(job[1]["nodes"][0]["node_dir"]) / "logs" / "rank0.log"
    before = log.stat().st_size
    bad_id = b'{"id": "\\ud800", "op": "health"}\n'
    bad_prompt = b'{"id": 7, "op": "generate", "prompt": "x\\udfff"}\n'
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(bad_id * 500 + bad_prompt)
        f = s.makefile("rb")
        answers = [json.loads(f.readline()) for _ in range(501)]
    assert all(a["ok"] is False and a["error"]["code"] == "bad_request" for a in answers), answers[:2]
    assert answers[0]["id"] is None and answers[-1]["id"] == 7
    assert "Unicode" in answers[-1]["error"]["message"]
    grew = log.stat().st_size - before
    assert grew < 4096, f"the rank log grew by {grew} bytes for 15 KB of bad requests"
    _still_answers(port)
