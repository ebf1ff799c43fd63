"""The wire format, the stop-aware text stream and the batcher: pure parts, tested directly."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dslaunch.engine.decode import TextStream
from dslaunch.serving.batcher import Batcher, Pending
from dslaunch.serving.config import FrontConfig
from dslaunch.serving.stats import Stats
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import Limits, ProtocolError, parse_request

LIMITS = Limits(max_prompts=4, max_new_tokens=100)


def _code(line: str) -> tuple[str, object]:
    with pytest.raises(ProtocolError) as e:
        parse_request(line, LIMITS)
    return e.value.code, e.value.id


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("[1, 2]", "a request is a JSON object"),
        ('{"op": "stats"}', "missing 'id'"),
        ('{"id": true, "op": "stats"}', "'id' must be"),
        ('{"id": 1, "op": "generate"}', "missing 'prompt'"),
        ('{"id": 1, "op": "generate", "prompt": []}', "has 0 items"),
        ('{"id": 1, "op": "generate", "prompt": ["a", "b", "c", "d", "e"]}', "has 5 items"),
        ('{"id": 1, "op": "generate", "prompt": [""]}', "item 0 is empty"),
        ('{"id": 1, "op": "generate", "prompt": "a", "max_new_tokens": 101}', "allowed 1 to 100"),
        ('{"id": 1, "op": "generate", "prompt": "a", "max_new_tokens": 2.5}', "must be an integer"),
        ('{"id": 1, "op": "generate", "prompt": "a", "temperature": "hot"}', "must be a number"),
        ('{"id": 1, "op": "generate", "prompt": "a", "top_p": 1.5}', "'top_p' is 1.5"),
        ('{"id": 1, "op": "generate", "prompt": "a", "stop": [""]}', "'stop' must be"),
        ('{"id": 1, "op": "generate", "prompt": "a", "stream": 1}', "true or false"),
        ('{"id": 1, "op": "generate", "prompt": "a", "timeout": 0}', "'timeout' is 0"),
        ('{"id": 1, "op": "embed", "input": 3}', "'input' must be"),
        ('{"id": 1, "op": "health", "deep": "yes"}', "true or false"),
        ('{"id": 1, "op": "stats", "verbose": true}', "unknown field 'verbose'"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(line: str, why: str) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(line, LIMITS)
    assert e.value.code == P.BAD_REQUEST and why in e.value.message


def test_the_id_is_echoed_when_it_could_be_read() -> None:
    assert _code('{"id": "abc", "op": "nope"}') == (P.BAD_REQUEST, "abc")
    assert _code("{broken") == (P.BAD_REQUEST, None)


def test_good_requests_parse_with_defaults() -> None:
    r = parse_request('{"id": 7, "op": "generate", "prompt": "hi", "stop": "\\n", "seed": 3}', LIMITS)
    assert r.inputs == ["hi"] and r.single and r.params.stop == ("\n",) and r.params.seed == 3
    assert r.params.greedy and r.params.max_new_tokens == LIMITS.default_max_new_tokens
    r = parse_request('{"id": "x", "op": "embed", "input": ["a", "b"]}', LIMITS)
    assert r.inputs == ["a", "b"] and not r.single
    assert parse_request('{"id": 1, "op": "infer", "input": {"k": 1}}', LIMITS).inputs == [{"k": 1}]


def test_line_reader_refuses_long_lines_once_and_resyncs() -> None:
    lr = P.LineReader(limit=10)
    assert lr.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert lr.feed(b"x" * 20) == [None]  # over the limit before its newline
    assert lr.feed(b"y" * 20) == []  # still the same line: refused once
    assert lr.feed(b'zz\n{"c":3}\n') == [b'{"c":3}']
    assert lr.feed(b"0123456789AB\n") == [None]  # complete but too long


class _CountingBuffer(bytearray):
    """A line buffer that counts the bytes each newline search has to look at."""

    looked = 0

    def find(self, sub: bytes, start: int = 0, *args: int) -> int:  # type: ignore[override]
        _CountingBuffer.looked += len(self) - start
        return super().find(sub, start, *args)


def test_line_reader_keeps_its_place_so_a_byte_at_a_time_is_linear() -> None:
    """1 MiB fed one byte at a time took 9.6 s when every read rescanned the whole buffer.

    Counted rather than timed: each read looks only at the bytes that are new, so feeding a line
    one byte at a time looks at each byte about once (a rescan would look at n^2/2 of them).
    """
    size = 256 << 10
    lr = P.LineReader(limit=2 << 20)
    lr.buf = _CountingBuffer()
    _CountingBuffer.looked = 0
    data = b"y" * size + b"\nab\n"
    out = [line for i in range(len(data)) for line in lr.feed(data[i : i + 1])]
    assert out == [b"y" * size, b"ab"]
    assert _CountingBuffer.looked <= 2 * len(data), f"{_CountingBuffer.looked} bytes looked at for {len(data)}"


@pytest.mark.parametrize(
    ("line", "code", "rid"),
    [
        (b'{"id": "\\ud800", "op": "health"}', "bad_request", None),
        (b'{"id": 3, "op": "health", "token": "\\udc00"}', "unauthorized", 3),
        (b'{"id": 4, "op": "generate", "prompt": ["ok", "\\udbff"]}', "bad_request", 4),
        (b'{"id": 5, "op": "generate", "prompt": "x", "\\ud800": 1}', "bad_request", 5),
    ],
)
def test_lone_surrogates_are_refused_at_parse_time(line: bytes, code: str, rid: object) -> None:
    with pytest.raises(ProtocolError) as e:
        parse_request(line, Limits())
    assert (e.value.code, e.value.id) == (code, rid)
    assert P.encode(P.error(e.value.id, e.value.code, e.value.message))  # the answer can be written
    assert P.parse_request(b'{"id": 6, "op": "generate", "prompt": "\\ud83d\\ude00"}', Limits()).inputs == [
        "\U0001f600"
    ]


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(["a", "b", "ab", " ", "\n", "é", "STOP", "S", "TO", "P"]), max_size=30),
    stop=st.sampled_from(["STOP", "ab", "\n", "zz"]),
)
def test_text_stream_chunks_add_up_and_never_pass_a_stop(pieces: list[str], stop: str) -> None:
    vocab = sorted(set(pieces)) or ["a"]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    ts = TextStream(decode, (stop,))
    chunks = [ts.push(vocab.index(p)) for p in pieces]
    chunks.append(ts.finish())
    full = "".join(pieces)
    want = full[: full.index(stop)] if stop in full else full
    assert "".join(chunks) == ts.text == want
    assert ts.stopped == (stop in full)


def test_text_stream_holds_back_half_characters() -> None:
    table = {0: "a", 1: "\ufffd", 2: "é"}
    ts = TextStream(lambda ids: "".join(table[i] for i in ids).replace("\ufffdé", "é"))
    assert ts.push(0) == "a"
    assert ts.push(1) == "", "a trailing replacement character may be half a character"
    assert ts.push(2) == "é"


def _job(loop: asyncio.AbstractEventLoop, op: str = "generate", n: int = 1) -> Pending:
    prompt = '"x"' if n == 1 else "[" + ",".join(['"x"'] * n) + "]"
    key = "input" if op == "embed" else "prompt"
    return Pending(parse_request(f'{{"id": 1, "op": "{op}", "{key}": {prompt}}}', LIMITS), loop)


def test_batcher_waits_for_company_caps_rows_and_keeps_kinds_apart() -> None:
    loop = asyncio.new_event_loop()
    try:
        b = Batcher(FrontConfig(max_batch_size=4, batch_wait_ms=50, max_queue=10), Stats())
        assert b.next_batch(0.05) is False, "nothing queued: a heartbeat is due"
        jobs = [_job(loop, n=2), _job(loop, "embed"), _job(loop, n=1), _job(loop, n=2)]
        for j in jobs:
            b.submit(j)
        first = b.next_batch(1.0)
        assert first and [j for j in first.jobs] == [jobs[0], jobs[2]], "same kind, at most 4 rows"
        assert b.next_batch(1.0).jobs == [jobs[1]]
        assert b.next_batch(1.0).jobs == [jobs[3]]
        # a request alone waits for company (a window far longer than the test): the next one
        # joins it, and the batch goes as soon as it is full rather than at the window's end
        waiting = Batcher(FrontConfig(max_batch_size=4, batch_wait_ms=60_000, max_queue=10), Stats())
        waiting.submit(_job(loop, n=2))
        threading.Timer(0.02, lambda: waiting.submit(_job(loop, n=2))).start()
        t0 = time.monotonic()
        got = waiting.next_batch(1.0)
        assert len(got.jobs) == 2 and time.monotonic() - t0 < 30, "the second request joined within the wait"
    finally:
        loop.close()


def test_batcher_refuses_beyond_the_queue_and_when_closed() -> None:
    loop = asyncio.new_event_loop()
    try:
        b = Batcher(FrontConfig(max_queue=2), Stats())
        b.submit(_job(loop))
        b.submit(_job(loop))
        with pytest.raises(ProtocolError) as e:
            b.submit(_job(loop))
        assert e.value.code == P.OVERLOADED
        b.close()
        assert b.next_batch(0.1) is None
        with pytest.raises(ProtocolError) as e:
            b.submit(_job(loop))
        assert e.value.code == P.UNAVAILABLE
    finally:
        loop.close()


@pytest.mark.parametrize(
    "line",
    [
        '{"id": 1, "op": "generate", "prompt": "hi"}',
        '{"id": "a", "op": "generate", "prompt": ["x", "y"], "max_new_tokens": 7, "temperature": 0.5, '
        '"top_p": 0.9, "top_k": 3, "seed": 11, "stop": ["\\n", "."], "stream": true, "timeout": 4}',
        '{"id": 2, "op": "embed", "input": "one text"}',
        '{"id": 3, "op": "infer", "input": {"values": [1, 2]}}',
        '{"id": 4, "op": "infer", "input": [[1], [2]]}',
        '{"id": 5, "op": "health", "deep": true, "token": "secret"}',
    ],
)
def test_request_line_round_trips_as_the_plural_form(line: str) -> None:
    """The router forwards a parsed request as a line: the same request under its own id, inputs
    always as a list (so the answer is always plural), and never the client's token."""
    req = parse_request(line, LIMITS)
    again = parse_request(P.request_line(req, 99, timeout=req.timeout), LIMITS)
    assert again.id == 99 and again.token is None and (not again.single or req.op == "health")
    assert (again.op, again.inputs, again.params, again.stream, again.deep, again.timeout) == (
        req.op, req.inputs, req.params, req.stream, req.deep, req.timeout,
    )  # fmt: skip
