"""Continuous batching through a real job (`dslaunch up` on localhost, 2 ranks, tensor parallel
over gloo): rows that join and leave mid-generation on both ranks, and no request, however odd
its parameters, makes the job restart."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dslaunch.client import Client
from dslaunch.engine.tinymodel import NAME as TINY
from tests.conftest import Cli, local_job, status_json

PROMPTS = ["Hello world", "The quick brown fox", "One command starts the job", "Numbers 0 1 2"]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cli, dict[str, Any]]]:
    yield from local_job(tmp_path_factory, "-H", "hostfiles/localhost", "--max-batch-size", "6",
                         "--batch-wait-ms", "0", "--max-new-tokens", "64")  # fmt: skip


@pytest.fixture(scope="module")
def port(job: tuple[Cli, dict[str, Any]]) -> int:
    return int(job[1]["front"]["port"])


@pytest.fixture(scope="module")
def reference(job: tuple[Cli, dict[str, Any]]) -> Any:
    from tests.inproc import reference as ref

    return ref(job[0].work_dir / "models" / TINY)


class Raw:
    """One connection that sends request lines as given and reads each final answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.file = self.sock.makefile("rb")

    def ask(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        while True:
            answer = json.loads(self.file.readline())
            if "chunk" not in answer:
                return answer

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_rows_joining_and_leaving_on_both_ranks_get_their_solo_text(port: int, reference: Any) -> None:
    asks = [(PROMPTS[i % 4], k) for i, k in enumerate([48, 2, 20, 7, 1, 33, 12, 5, 26, 3])]
    got: dict[int, str] = {}
    streamed: dict[int, str] = {}

    def one(i: int) -> None:
        prompt, k = asks[i]
        with Client("127.0.0.1", port, timeout=120, retry_for=0) as c:
            events = list(c.stream(prompt, max_new_tokens=k))
            streamed[i] = "".join(e.get("chunk", "") for e in events[:-1])
            got[i] = events[-1]["text"]

    threads = []
    for i in range(len(asks)):  # staggered: each joins a batch that is already decoding
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(0.04)
    for t in threads:
        t.join(180)
    for i, (prompt, k) in enumerate(asks):
        assert got[i] == streamed[i] == reference(prompt, k), (i, prompt, k)
    with Client("127.0.0.1", port) as c:
        stats = c.stats()
    assert stats["rows_per_step"]["max"] <= 6 and stats["rows_per_step"]["mean"] > 1
    # both ranks ran the packed steps over identical block pools; every block is free again
    assert stats["kv_cache"] == "paged" and stats["kv_blocks_total"] > 0 and stats["kv_blocks_used"] == 0


NUMBERS = [0, 1, -1, 1e-45, 5e-324, 1e-5, 0.5, 1, 1.0, 2, 100, 101, 1e308, 2**63 - 1, 2**63, 1 << 20, (1 << 20) + 1,
           "1", None, True, [], "NaN", "Infinity"]  # fmt: skip
FIELDS = {
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "seed": NUMBERS,
    "max_new_tokens": [*NUMBERS, 3, 6, 64, 65],
    "stop": ["", "x", " ", ["\n", "o"], [""], ["a"] * 17, 3, None, "\ud800"],
    "stream": [True, False, 1, None],
    "timeout": [0.001, 5, 0, -1, 1e9],
    "presence_penalty": [*NUMBERS, 1.5, -2],
    "frequency_penalty": [*NUMBERS, 0.5],
    "repetition_penalty": [*NUMBERS, 1.3, 0.5],
    "logit_bias": [{"5": 100}, {"2": -100, "3": 5}, {"99999999": 1}, {"x": 1}, {"5": 1e9}, [], None],
    "min_tokens": [*NUMBERS, 2, 6],
    "ignore_eos": [True, False, 1, None],
    "logprobs": [*NUMBERS, 3, 20],
    "prompt": [
        "Hello",
        "é✓🙂",
        "",
        ["a", "b"],
        ["x"] * 7,
        [],
        5,
        None,
        "<unk><pad></s>",
        "\u0000",
        "Hello " * 300,
        [5, 6, 7],
        [[5, 6], [7]],
        [[]],
        [-1],
        [10**9],
        [2**31],
        [1, "a"],
        [[1], "a"],
        [True],
        [0] * 70,
    ],
}


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    obj: dict[str, Any] = {"id": draw(st.integers(0, 1000)), "op": "generate", "prompt": "Hello"}
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=5, unique=True)):
        value = draw(st.sampled_from(FIELDS[key]))
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    if draw(st.booleans()):
        obj["max_new_tokens"] = draw(st.integers(1, 6))  # most valid requests stay short
    text = json.dumps(obj)
    for word in ("NaN", "Infinity"):  # JSON's non-standard numbers, which Python's parser accepts
        text = text.replace(f'"{word}"', word)
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=requests())
@example(line=b'{"id": 1, "op": "generate", "prompt": "Hello", "temperature": 1e-45}')
@example(line=b'{"id": 1, "op": "generate", "prompt": ["a", "b"], "temperature": 5e-324, "top_p": 1e-45, "seed": 0}')
@example(line=b'{"id": 1, "op": "generate", "prompt": "Hello", "temperature": 100, "top_k": 1048576, "stream": true}')
def test_no_generate_parameters_restart_the_job(port: int, line: bytes) -> None:
    raw = Raw(port)
    try:
        answer = raw.ask(line)
    finally:
        raw.close()
    if not answer["ok"]:
        assert answer["error"]["code"] in ("bad_request", "timeout"), (line, answer)
    else:
        results = answer.get("results") or [answer]
        assert all(r["finish_reason"] in ("length", "eos", "stop") for r in results), answer


def test_the_job_never_restarted(job: tuple[Cli, dict[str, Any]], port: int) -> None:
    st_ = status_json(job[0])
    assert [r["restarts"] for r in st_["ranks"]] == [0, 0], (
        st_.get("last_failure"),
        job[0]("logs", "--lines", "40").stdout,
    )
    with Client("127.0.0.1", port, retry_for=0) as c:
        assert c.health()["restarts"] == 0
        assert [r["rank"] for r in c.health(deep=True)["ranks"]] == [0, 1]
        stats = c.stats()
    assert "internal" not in stats["errors"] and "unavailable" not in stats["errors"], stats["errors"]
