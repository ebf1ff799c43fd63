"""Pure parts of the step loop: the control message layout, the batched sampler, and streaming
text through a real byte-level tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dslaunch.engine.decode import TextStream
from dslaunch.engine.sampling import RowSampling, choose, uniform
from dslaunch.rank.channel import HEADER, STEP, Message


def test_a_step_message_round_trips_through_its_fixed_layout() -> None:
    msg = Message(STEP, 7, rows=5, leave=[1, 3], tokens=[11, 12, 13], joins=[4, 9], payload=13)
    t = msg.pack(8)
    assert t.dtype == torch.int64 and t.shape == (HEADER + 3 * 8,)
    back = Message.unpack(t, 8)
    assert (back.op, back.seq, back.rows, back.payload) == (STEP, 7, 5, 13)
    assert (back.leave, back.tokens, back.joins) == ([1, 3], [11, 12, 13], [4, 9])


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 3))
    assert choose(logits, [RowSampling()] * 3, [0, 0, 0]) == [0, 0, 0]
    counts = [0, 0, 0]
    for seed in range(3000):
        counts[choose(logits[:1], [RowSampling(temperature=1.0, seed=seed)], [0])[0]] += 1
    assert [round(c / 3000, 1) for c in counts] == [0.5, 0.3, 0.2]
    top2 = {choose(logits[:1], [RowSampling(temperature=1.0, top_k=2, seed=s)], [0])[0] for s in range(200)}
    assert top2 == {0, 1}
    nucleus = {choose(logits[:1], [RowSampling(temperature=1.0, top_p=0.6, seed=s)], [0])[0] for s in range(200)}
    assert nucleus == {0, 1}, "0.5 is not enough mass: the next token joins, the last does not"


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**63 - 1),
    step=st.integers(0, 5000),
    others=st.lists(st.tuples(st.floats(0, 3), st.integers(0, 50), st.floats(0.01, 1)), max_size=6),
    at=st.integers(0, 6),
)
def test_a_seeded_row_draws_the_same_token_whatever_shares_its_batch(
    seed: int, step: int, others: list[tuple[float, int, float]], at: int
) -> None:
    gen = torch.Generator().manual_seed(seed % 1000)
    vocab = 300
    mine = torch.randn(vocab, generator=gen) * 3
    row = RowSampling(temperature=0.8, top_k=40, top_p=0.9, seed=seed)
    alone = choose(mine.unsqueeze(0), [row], [step])[0]
    at = min(at, len(others))
    rows = [RowSampling(temperature=t, top_k=k, top_p=p, seed=i) for i, (t, k, p) in enumerate(others)]
    rows.insert(at, row)
    logits = torch.randn(len(rows), vocab, generator=gen) * 3
    logits[at] = mine
    assert choose(logits, rows, [step] * len(rows))[at] == alone


def test_degenerate_logits_and_temperatures_never_raise() -> None:
    bad = torch.tensor([[float("nan"), 1.0, float("inf")], [float("-inf")] * 3, [float("nan")] * 3, [1.0, 2.0, 3.0]])
    rows = [RowSampling(temperature=t, top_p=p, top_k=k, seed=1) for t, p, k in
            [(1.0, 0.5, 0), (1.0, 1.0, 2), (0.5, 0.9, 1), (1e-3, 1.0, 0)]]  # fmt: skip
    out = choose(bad, rows, [0] * 4)
    assert out[0] == 2 and out[3] == 2 and all(0 <= t < 3 for t in out)
    assert RowSampling(temperature=1e-45).greedy


def test_the_draw_is_uniform_and_never_0_or_1() -> None:
    draws = [uniform(42, s) for s in range(20000)]
    assert min(draws) > 0 and max(draws) < 1
    mean = sum(draws) / len(draws)
    var = sum((d - mean) ** 2 for d in draws) / len(draws)
    assert abs(mean - 0.5) < 0.01 and abs(math.sqrt(var) - 0.2887) < 0.01
    assert uniform(1, 0) != uniform(2, 0) != uniform(1, 1)


@pytest.fixture(scope="module")
def byte_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE with few merges: multi-byte characters split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(["héllo wörld ✓ 日本語 naïve café", "hello world"] * 4, trainer)
    return tok


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="abc é✓日本\n🙂", min_size=1, max_size=40), stop=st.sampled_from(["", "✓", "é b", "\n"]))
def test_streamed_chunks_of_a_byte_level_tokenizer_add_up_to_its_decode(byte_tokenizer, text: str, stop: str) -> None:  # type: ignore[no-untyped-def]
    ids = byte_tokenizer.encode(text).ids
    ts = TextStream(byte_tokenizer.decode, (stop,) if stop else ())
    chunks = [ts.push(i) for i in ids] + [ts.finish()]
    full = byte_tokenizer.decode(ids)
    want = full[: full.index(stop)] if stop and stop in full else full
    assert "".join(chunks) == ts.text == want
    assert all("\ufffd" not in c for c in chunks), "half characters are never released"
