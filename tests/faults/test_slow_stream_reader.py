"""A client that stops reading its stream, end to end over a real socket: the front cuts the stream
off at its buffer bound (`serving.batcher.STREAM_BUFFER_CHUNKS`), the rows leave the running batch,
the job keeps serving everyone else without a restart, and the reader, once it reads again, gets
what was buffered, the `overloaded` error and then the end of its connection.

The bound counts chunks produced but not yet taken by the front, which only happens once the
socket's buffers are full. The reader advertises a small segment size (as a client on an ordinary
network does), so the kernel holds about 100 kB for it rather than the megabytes loopback's 64 kB
segments allow; one request of 64 long rows then reaches the bound within a few seconds.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dslaunch.client import Client
from dslaunch.serving.batcher import STREAM_BUFFER_CHUNKS, STREAM_CUT
from tests.conftest import Cli, local_job

ROWS = 64
NEW_TOKENS = 440  # the tiny model has 512 positions: ROWS x (prompt + this) <= --max-batch-tokens


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # a long --write-timeout: what cuts the reader off must be the stream bound, not a stalled write
    args = ["--max-batch-size", str(ROWS), "--max-batch-tokens", "32768", "--write-timeout", "120",
            "--batch-wait-ms", "0"]  # fmt: skip
    job: Iterator[tuple[Cli, dict[str, Any]]] = local_job(tmp_path_factory, *args)
    for _, rec in job:
        yield int(rec["front"]["port"])


def _in_flight(c: Client) -> int:
    return int(c.stats()["in_flight"])


def test_a_stream_reader_that_stops_reading_is_cut_off_and_the_job_serves_on(port: int) -> None:
    prompts = [f"Reader row {i}: the quick brown fox" for i in range(ROWS)]
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1200)
    reader.settimeout(60)
    reader.connect(("127.0.0.1", port))
    with reader, Client("127.0.0.1", port, retry_for=0, timeout=120) as other:
        ask = {"id": 7, "op": "generate", "prompt": prompts, "max_new_tokens": NEW_TOKENS, "stream": True}
        reader.sendall(json.dumps(ask).encode() + b"\n")
        data = reader.recv(1)
        assert data, "the stream started"  # from here on the reader reads nothing
        while _in_flight(other) == 0:  # its rows have joined the running batch
            time.sleep(0.05)
        while _in_flight(other) != 0:  # ... and left it: finished, or cut off at the bound
            assert other.generate("Hello", max_new_tokens=2)["tokens"] >= 1, "others are served meanwhile"
        assert other.generate("Hello again", max_new_tokens=4)["tokens"] >= 1
        assert other.health()["restarts"] == 0

        # the reader reads again: what was buffered, then its answer, then the end of the connection
        while chunk := reader.recv(1 << 16):
            data += chunk
    lines = [json.loads(line) for line in data.split(b"\n")[:-1]]
    assert lines and data.endswith(b"\n"), "whole lines up to the end of the connection"
    last = lines[-1]
    assert last["id"] == 7 and last["ok"] is False and last["error"]["code"] == "overloaded", last
    assert last["error"]["message"].startswith(STREAM_CUT), last
    chunks = [line for line in lines if line.get("chunk") is not None]
    assert len(chunks) == len(lines) - 1, "chunks, then the error"
    assert len(chunks) < ROWS * NEW_TOKENS, "the rows stopped before their budget"
    assert len(chunks) > STREAM_BUFFER_CHUNKS, "everything produced up to the bound was delivered"
