"""Continuous batching on a real engine in this process (world size 1): rows join and leave the
running batch at every step, and every row still gets exactly its solo greedy text."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.engine import tinymodel
from dslaunch.engine.paged import PagedKV
from dslaunch.serving.batcher import Pending
from dslaunch.wire.protocol import ProtocolError
from tests.inproc import Served, build_gpt2, reference

PROMPTS = ["Hello world", "The quick brown fox jumps", "One command", "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("models") / tinymodel.NAME)


@pytest.fixture(scope="module")
def served(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tiny, tmp_path_factory.mktemp("work"), max_batch_size=4, max_new_tokens=200)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def ref(tiny: Path) -> Any:
    return reference(tiny)


def _gen(prompt: str, k: int, **kw: Any) -> dict[str, Any]:
    return {"id": 1, "op": "generate", "prompt": prompt, "max_new_tokens": k, **kw}


def test_rows_join_and_leave_mid_generation_and_match_their_solo_runs(served: Served, ref: Any) -> None:
    done_at: dict[int, float] = {}
    texts: dict[int, str] = {}

    def run(i: int, job: Pending) -> None:
        event = served.events(job)[-1]
        done_at[i] = time.monotonic()
        texts[i] = event[1][0]["text"]

    asks = [(PROMPTS[i % 4], k) for i, k in enumerate([40, 3, 17, 1, 25, 8, 2, 33, 12, 5, 29, 9])]
    steps = served.stats.steps
    first = served.submit(_gen(*asks[0], stream=True))
    threads = [threading.Thread(target=run, args=(0, first))]
    threads[0].start()
    while served.stats.steps < steps + 2:  # the long row is decoding: later rows join a running batch
        time.sleep(0.005)
    for wave in (asks[1:5], asks[5:9], asks[9:]):
        for prompt, k in wave:
            i = len(threads)
            threads.append(threading.Thread(target=run, args=(i, served.submit(_gen(prompt, k)))))
            threads[-1].start()
        time.sleep(0.03)
    for t in threads:
        t.join(120)
    for i, (prompt, k) in enumerate(asks):
        assert texts[i] == ref(prompt, k), (i, prompt, k)
    assert done_at[1] < done_at[0], "a short row that joined later left before the long one ended"
    snap = served.stats.snapshot(0, 0)
    assert snap["rows_per_step"]["max"] <= 4, "never more rows than --max-batch-size"
    assert snap["batches"] >= 3 and snap["rows_per_step"]["mean"] > 1


def test_absolute_positions_with_mixed_prompt_lengths(tmp_path: Path) -> None:
    """GPT-2 with a 64-position table: a long and a short prompt in one batch used to run the long
    row past the table (IndexError, a restarted job); now each row stops at its own end."""
    model = build_gpt2(tmp_path / "gpt2", positions=64)
    ref = reference(model)
    s = Served(model, tmp_path, max_batch_size=4)
    try:
        long = "The quick brown fox jumps over the lazy dog. " * 4  # 44 tokens
        longest = "Hello world! " * 15  # 60 tokens: 4 positions left
        jobs = [s.submit(_gen(long, 15)), s.submit(_gen("Hi", 50)), s.submit(_gen(longest, 30))]
        results = [s.events(j)[-1][1][0] for j in jobs]
        assert [r["text"] for r in results[:2]] == [ref(long, 15), ref("Hi", 50)]
        assert results[2]["tokens"] + results[2]["prompt_tokens"] <= 64
        assert results[2]["finish_reason"] in ("length", "eos")
        assert results[2]["text"] == ref(longest, 64 - results[2]["prompt_tokens"])
        with pytest.raises(ProtocolError, match="fewer than 64"):
            s.ask(_gen("Hello world! " * 40, 4))
        assert s.alive
    finally:
        s.close()


def test_seeded_sampling_does_not_depend_on_the_batch(served: Served) -> None:
    seeded = _gen("Hello world", 24, temperature=0.9, top_k=50, top_p=0.95, seed=123)
    alone = served.ask(seeded)[0]["text"]
    others = [
        _gen("The quick brown fox", 30, temperature=1.3, seed=9),
        _gen("One command", 5),
        _gen("Numbers 0 1 2 3", 40, temperature=0.7, top_p=0.8),
        _gen("Tensor parallel layers shard their weights", 12, top_k=3, temperature=2.0, seed=1),
    ]
    crowd = [served.submit(o) for o in others[:2]]
    job = served.submit(seeded)
    crowd += [served.submit(o) for o in others[2:]]
    assert served.events(job)[-1][1][0]["text"] == alone
    for j in crowd:
        assert served.events(j)[-1][0] == "done"
    assert served.ask({**seeded, "seed": 124})[0]["text"] != alone, "another seed, another sample"


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-45},
        {"temperature": 1e-30, "top_p": 1e-9},
        {"temperature": 100.0},
        {"temperature": 1.0, "top_k": 1},
        {"temperature": 1.0, "top_p": 1e-9},
        {"temperature": 5e-5, "top_k": 1 << 20, "seed": 0},
    ],
)
def test_degenerate_sampling_parameters_answer(served: Served, ref: Any, params: dict[str, Any]) -> None:
    result = served.ask(_gen("Hello world", 8, **params))[0]
    if params.get("top_k") == 1 or params.get("top_p", 1) < 1e-6 or params["temperature"] < 1e-4:
        assert result["text"] == ref("Hello world", 8), "these amount to greedy"
    assert served.alive


def test_a_failing_step_answers_its_rows_and_the_loop_goes_on(
    served: Served, ref: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert served.engine.kv_path == "paged"  # the tiny Llama's attention goes through the interface
    real, calls = PagedKV.step, [0]

    def flaky(self: PagedKV, layout: Any) -> Any:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected forward failure")
        return real(self, layout)

    monkeypatch.setattr(PagedKV, "step", flaky)
    with pytest.raises(ProtocolError) as e:
        served.ask(_gen("Hello world", 10))
    assert e.value.code == "internal" and "injected" in e.value.message
    assert served.ask(_gen("Hello world", 10))[0]["text"] == ref("Hello world", 10)
    assert served.alive


def test_a_stream_nobody_reads_is_cut_off_and_its_row_leaves(
    served: Served, ref: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Pending, "stream_bytes", 64)
    stalled = served.submit(_gen("Hello world", 150, stream=True))
    # nobody reads `stalled`; the others are served meanwhile
    assert served.ask(_gen("One command", 6))[0]["text"] == ref("One command", 6)
    deadline = time.monotonic() + 60
    while served.batcher.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.batcher.in_flight == 0, "the stalled row left the batch"
    events = served.events(stalled)
    assert events[-1][0] == "error" and events[-1][1] == "overloaded", events[-1]
    assert sum(len(e[2]) for e in events if e[0] == "chunk") <= 64 + 32, "no more than the bound was kept"


def test_deep_health_runs_between_steps(served: Served, ref: Any) -> None:
    job = served.submit(_gen("The quick brown fox jumps", 60, stream=True))
    while job.events.qsize() == 0:
        time.sleep(0.005)
    probe = served.ask({"id": 2, "op": "health", "deep": True})
    assert [r["rank"] for r in probe] == [0]
    assert served.events(job)[-1][1][0]["text"] == ref("The quick brown fox jumps", 60)


def test_admission_counts_the_blocks_rows_use(tiny: Path, tmp_path: Path, ref: Any) -> None:
    """The paged cache: 160 tokens are 10 blocks of 16, and a row holds the blocks it uses."""
    s = Served(tiny, tmp_path, max_batch_size=8, max_batch_tokens=160)
    try:
        jobs = [s.submit(_gen(PROMPTS[i % 2], 40)) for i in range(6)]  # each row ends at 42 or 45 tokens
        texts = [s.events(j)[-1][1][0]["text"] for j in jobs]
        assert texts == [ref(PROMPTS[i % 2], 40) for i in range(6)]
        assert s.stats.snapshot(0, 0)["kv_blocks_used"] == 0
        # a padded cache would count 4 rows x 62 tokens; here the long row's 4 blocks and one each
        steps = s.stats.steps
        long, short = s.submit(_gen("Hello world", 60)), [s.submit(_gen("One command", 8)) for _ in range(3)]
        assert s.events(long)[-1][1][0]["text"] == ref("Hello world", 60)
        assert [s.events(j)[-1][1][0]["text"] for j in short] == [ref("One command", 8)] * 3
        assert s.stats.steps - steps < 60 + 7, "the short rows ran beside the long one"
        with pytest.raises(ProtocolError, match="max-batch-tokens"):
            s.submit(_gen("Hello world", 170))
    finally:
        s.close()


def test_a_prompt_too_long_by_its_bytes_is_refused_before_tokenizing(served: Served) -> None:
    bound = served.engine.prompts.max_bytes
    assert bound is not None
    with pytest.raises(ProtocolError, match="bytes") as e:
        served.submit(_gen("x" * (bound + 1), 4))
    assert e.value.code == "bad_request"
    with pytest.raises(ProtocolError, match="tokens") as e:  # under the byte bound: tokenized, then refused
        served.submit(_gen("The quick brown fox " * 200, 4))


def test_queued_requests_wait_a_few_steps_to_join_together() -> None:
    from types import SimpleNamespace

    from dslaunch.rank.steps import JOIN_AFTER_STEPS, _hold

    def gen(*remaining: int) -> Any:
        return SimpleNamespace(remaining=lambda: list(remaining))

    assert not _hold(gen(), 0, 3, 8, 0), "nothing runs: join at once"
    assert _hold(gen(30, 3), 2, 1, 6, 0), "a row ends in 3 steps: its successor can share the prefill"
    assert not _hold(gen(30, 3), 2, 6, 6, 0), "the queue already fills the free rows"
    assert not _hold(gen(30, 3), 2, 1, 6, JOIN_AFTER_STEPS), "held long enough"
    assert _hold(gen(*[30] * 10), 10, 2, 22, 0), "2 waiting beside 10 running: wait for more"
    assert not _hold(gen(*[30] * 10), 10, 4, 22, 0), "a third of the running rows: join now"
