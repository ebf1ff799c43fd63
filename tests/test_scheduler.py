"""The paged engine's Scheduler without a model, as vLLM tests its scheduler: a simulated cache
(each slot holds the (token, position) written there) checks that every chunk attends over
exactly its row's tokens, shared blocks are never written, and the pool's accounting holds."""

from __future__ import annotations

import random
import zlib

import pytest

from dslaunch.engine.blocks import BlockPool
from dslaunch.engine.scheduler import Plan, Scheduler
from dslaunch.engine.stepcost import MIN_CHUNK, MIN_SAMPLES, StepCost

VOCAB = 50
EOS = 0


def next_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on every token before it."""
    return zlib.crc32(bytes(t % 256 for t in tokens)) % VOCAB


def solo(prompt: list[int], budget: int, eos: bool) -> list[int]:
    out: list[int] = []
    while len(out) < budget:
        t = next_token(prompt + out)
        if eos and t == EOS:
            break
        out.append(t)
    return out


class SimCache:
    """The slots of the pool: what (token, position) each holds; checks every chunk's reads."""

    def __init__(self, s: Scheduler) -> None:
        self.s = s
        self.slots: list[tuple[int, int] | None] = [None] * (s.pool.total * s.size)

    def run(self, plan: Plan) -> dict[int, int]:
        size, out = self.s.size, {}
        for c in plan.chunks:
            seq = self.s.seqs[c.key]
            for i, tok in enumerate(c.tokens):
                p = c.start + i
                block = c.table[p // size]
                assert self.s.pool.refs[block] == 1, "a shared block is written"
                self.slots[block * size + p % size] = (tok, p)
            end = c.start + len(c.tokens)
            assert len(c.table) * size >= end
            seen = [self.slots[c.table[p // size] * size + p % size] for p in range(end)]
            assert seen == [(t, p) for p, t in enumerate(seq.tokens[:end])], "a row read the wrong K/V"
            if c.sample:
                out[c.key] = next_token(seq.tokens[:end])
        return out


def drive(s: Scheduler, rows: dict[int, tuple[list[int], int]], rng: random.Random | None = None,
          eos: bool = False, arrive: dict[int, int] | None = None, cancel: set[int] | None = None,
          max_steps: int = 20000, budget: bool = False) -> tuple[dict[int, list[int]], list[Plan]]:  # fmt: skip
    """Run rows to completion through the scheduler and the simulated cache; `budget`: each step
    under a random cap, as rank 0's loop caps steps (`engine/stepcost.py`)."""
    cache, outs, plans = SimCache(s), {k: [] for k in rows}, []
    arrive = arrive or {k: 0 for k in rows}
    pending, step = dict(rows), 0
    while pending or s.seqs:
        for k in [k for k in pending if arrive[k] <= step]:
            s.add(k, *pending.pop(k))
        if cancel and rng is not None and s.seqs and rng.random() < 0.05:
            k = rng.choice(sorted(s.seqs))
            if k in cancel:
                s.finish(k)
                outs.pop(k, None)
        cap = rng.randint(1, s.step_tokens) if budget and rng is not None else s.step_tokens
        plan = s.schedule(cap)
        plans.append(plan)
        s.pool.check()
        assert 0 <= s.pool.used <= s.pool.total
        assert len(s.running) <= s.max_rows
        assert sum(len(c.tokens) for c in plan.chunks) <= cap
        for k in plan.preempted:
            assert k not in {c.key for c in plan.chunks}
        sampled = cache.run(plan)
        s.commit(plan)
        for k, t in sampled.items():
            done = (eos and t == EOS) or len(outs[k]) + 1 >= rows[k][1]
            if not (eos and t == EOS):
                outs[k].append(t)
            if done:
                s.finish(k)
            else:
                s.append(k, t)
        step += 1
        assert step < max_steps, "the scheduler stopped making progress"
    return outs, plans


def _prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    head = rng.choice(prefixes)[: rng.randint(0, 40)]
    return head + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 30))]


def test_pool_accounting_allocate_share_release_evict() -> None:
    pool = BlockPool(4, 2)
    a = pool.allocate(3)
    assert a is not None and pool.free == 1 and pool.allocate(2) is None and pool.free == 1
    pool.publish(a[0], b"h0")
    pool.release(a)
    assert pool.free == 4 and pool.used == 0
    assert pool.lookup([b"h0", b"h1"]) == [a[0]] and pool.refs[a[0]] == 1 and pool.free == 3
    assert pool.lookup([b"h0"]) == [a[0]] and pool.refs[a[0]] == 2
    pool.release([a[0]])
    pool.release([a[0]])
    assert pool.allocate(4) is not None  # the cached block is evicted to make room
    assert pool.cached == {} and pool.free == 0
    pool.check()
    with pytest.raises(RuntimeError):
        BlockPool(1, 1).release([0])


def test_admission_counts_blocks_needed_not_rows_times_longest() -> None:
    s = Scheduler(blocks=8, block_size=4, max_rows=8, step_tokens=64, prefix_caching=False)
    s.add(0, list(range(1, 25)), 4)  # 24 tokens: 6 blocks
    for k in range(1, 4):
        s.add(k, [k], 4)  # one block each, at first
    plan = s.schedule()
    # a padded cache would count 4 rows x 28 tokens = 28 blocks; here 6 + 1 (+ headroom)
    assert [c.key for c in plan.chunks] == [0, 1] and s.pool.used == 7
    assert not s.fits(29, 4) and s.fits(28, 4)
    with pytest.raises(ValueError):
        s.add(9, list(range(30)), 4)


def test_a_plan_that_no_later_step_can_change_is_told_stalled() -> None:
    s = Scheduler(blocks=4, block_size=4, max_rows=4, step_tokens=16, prefix_caching=False)
    s.add(0, [1, 2, 3], 2)
    assert not s.stalled(s.schedule())  # it joined
    s.finish(0)
    held = s.pool.allocate(4)  # blocks held outside the scheduler: nothing can ever join
    s.add(1, [1, 2, 3], 2)
    plan = s.schedule()
    assert not plan.chunks and s.stalled(plan)
    s.pool.release(held or [])
    assert not s.stalled(s.schedule())


def test_chunked_prefill_keeps_decoders_decoding_within_the_budget() -> None:
    s = Scheduler(blocks=64, block_size=4, max_rows=8, step_tokens=8, prefix_caching=False)
    rows = {0: ([1, 2], 30), 1: ([3, 4, 5], 30), 2: (list(range(1, 41)), 3)}
    outs, plans = drive(s, rows, arrive={0: 0, 1: 0, 2: 3})
    joined = next(i for i, p in enumerate(plans) if 2 in p.joined)
    prefill = [p for p in plans[joined:] if any(c.key == 2 and not c.sample for c in p.chunks)]
    assert len(prefill) >= 5  # 40 tokens in chunks of at most 6
    for p in prefill:
        assert {c.key for c in p.chunks} >= {0, 1}  # the decoders got their token in every step
        assert sum(len(c.tokens) for c in p.chunks) <= 8
    assert outs == {k: solo(*rows[k], eos=False) for k in rows}


def test_preemption_frees_the_newest_rows_and_their_output_is_unchanged() -> None:
    s = Scheduler(blocks=6, block_size=4, max_rows=4, step_tokens=16, prefix_caching=False)
    rows = {k: ([k + 1, k + 2, k + 3], 9) for k in range(4)}  # 12 tokens = 3 blocks each at the end
    outs, plans = drive(s, rows)
    preempted = [k for p in plans for k in p.preempted]
    assert preempted and 0 not in preempted  # the oldest row is never the one to go
    assert s.preemptions == len(preempted)
    assert outs == {k: solo(*rows[k], eos=False) for k in rows}
    assert s.pool.used == 0


def test_prefix_hits_skip_the_cached_blocks_and_give_the_same_tokens() -> None:
    s = Scheduler(blocks=32, block_size=4, max_rows=4, step_tokens=64)
    system = list(range(1, 14))  # 13 tokens: 3 full blocks
    rows = {0: ([*system, 20, 21], 5), 1: ([*system, 30], 5), 2: (system[:12], 3)}
    outs, plans = drive(s, rows, arrive={0: 0, 1: 2, 2: 4})
    first = {c.key: c.start for p in plans for c in p.chunks if c.key in p.joined}
    assert first == {0: 0, 1: 12, 2: 8}  # row 2's whole prompt is cached: its last block is recomputed
    assert s.hits == 3 + 2 and s.queries == 3 + 3 + 2
    assert outs == {k: solo(*rows[k], eos=False) for k in rows}
    assert s.stats()["prefix_cache_hits"] == 5 * 4 and s.stats()["kv_blocks_used"] == 0  # tokens, as vLLM counts


def test_samples_of_one_prompt_arriving_together_share_its_blocks() -> None:
    """`n` samples: the first computes the prompt, the others wait one step and take its blocks."""
    s = Scheduler(blocks=32, block_size=4, max_rows=4, step_tokens=64)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks
    rows = {k: (list(prompt), 4) for k in range(3)} | {3: ([40, 41, 42], 2)}  # and a stranger behind them
    outs, plans = drive(s, rows)
    assert plans[0].joined == [0, 3], "the twins wait; the row behind them does not"
    assert plans[1].joined == [1, 2]
    starts = {c.key: c.start for p in plans for c in p.chunks if c.key in p.joined}
    assert starts == {0: 0, 3: 0, 1: 8, 2: 8}, "each twin computes only what follows the shared blocks"
    assert s.hits == 2 + 2 and outs == {k: solo(*rows[k], eos=False) for k in rows}
    one = Scheduler(blocks=32, block_size=4, max_rows=4, step_tokens=64, prefix_caching=False)
    _, plans = drive(one, rows)
    assert plans[0].joined == [0, 1, 2, 3], "without the prefix cache there is nothing to wait for"


@pytest.mark.parametrize("seed", range(24))
def test_fuzzed_mixed_runs_leave_every_block_free_and_match_solo(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([1, 2, 4, 16])
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(40)] for _ in range(3)]
    rows = {k: (_prompt(rng, prefixes), rng.randint(1, 24)) for k in range(rng.randint(1, 24))}
    need = max(-(-(len(p) + b) // size) for p, b in rows.values())
    s = Scheduler(
        blocks=need + rng.randint(0, 3 * need), block_size=size, max_rows=rng.randint(1, 8),
        step_tokens=rng.choice([1, 3, 8, 64]), prefix_caching=rng.random() < 0.8,
    )  # fmt: skip
    arrive = {k: rng.randint(0, 40) for k in rows}
    cancel = {k for k in rows if rng.random() < 0.2}
    outs, _ = drive(s, rows, rng=rng, eos=True, arrive=arrive, cancel=cancel, budget=seed % 2 == 1)
    assert s.pool.used == 0 and s.pool.free == s.pool.total and not s.running and not s.waiting
    s.pool.check()
    for k, out in outs.items():
        assert out == solo(*rows[k], eos=True), k


def test_step_cost_caps_a_step_to_the_ratio_of_a_decode_step_from_the_fitted_line() -> None:
    cost = StepCost(ratio=2.0)
    assert cost.cap(8, 128) == 128, "no steps seen yet: the token budget alone"
    rng = random.Random(0)
    for _ in range(MIN_SAMPLES * 4):  # a step costs 10 ms + 0.5 ms per token, with 2% noise
        tokens = rng.choice([8, 8, 8, 9, 40, 136])
        cost.observe(tokens, (0.010 + 0.0005 * tokens) * rng.uniform(0.98, 1.02))
    a, b = cost.fit() or (0.0, 0.0)
    assert a == pytest.approx(0.010, rel=0.1) and b == pytest.approx(0.0005, rel=0.1)
    # 2 x (10 + 8 x 0.5) ms = 28 ms = 10 + 0.5 t  ->  t = 36 tokens
    assert 33 <= cost.cap(8, 128) <= 39
    assert cost.cap(0, 128) == 128, "nobody decodes: nobody waits"
    assert cost.cap(8, 20) == 20, "never above --max-step-tokens"
    assert cost.cap(100, 128) == 128 and StepCost(0).cap(8, 128) == 128  # the ratio allows it; off
    assert cost.cap(8, 128) < 128 and cost.capped == 0
    cost.observe(12, 0.016)  # a step under that cap that did not fill it: the cap held nothing back
    cost.observe(cost.cap(8, 128), 0.028)  # one that filled it (stats: steps_capped)
    assert cost.capped == 1
    few = StepCost(ratio=1.0)
    for _ in range(MIN_SAMPLES):
        few.observe(8, 0.014)
        few.observe(136, 0.078)
    assert few.cap(8, 128) == 8 + MIN_CHUNK, "a joining prompt still advances"


def test_step_cost_leaves_the_budget_where_tokens_cost_nothing_or_cannot_be_told_apart() -> None:
    flat, same = StepCost(ratio=2.0), StepCost(ratio=2.0)
    for i in range(MIN_SAMPLES * 2):
        flat.observe(8 if i % 2 else 128, 0.020)  # a GPU at small batches: the time is per pass
        same.observe(16, 0.020 + 0.001 * (i % 3))  # every step alike: no slope to read
    assert flat.cap(8, 128) == 128 and same.fit() is None and same.cap(8, 128) == 128
