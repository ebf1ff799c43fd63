"""The packed serving loop in this process (world size 1): a small block pool and step budget so
that long prompts are prefilled in chunks among decoding rows, rows are preempted and recomputed,
and a shared prefix is reused, and every row still gets its solo greedy text. Falcon, whose
attention does not go through transformers' interface, keeps the left-padded cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.engine import tinymodel
from dslaunch.serving.router import merge_engines
from tests.inproc import Served, reference, save_random

SYSTEM = "You are a helpful assistant. Answer briefly and plainly, in one line. " * 2


def _gen(prompt: str, k: int, **kw: Any) -> dict[str, Any]:
    return {"id": 1, "op": "generate", "prompt": prompt, "max_new_tokens": k, **kw}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("models") / tinymodel.NAME)


@pytest.fixture(scope="module")
def ref(tiny: Path) -> Any:
    return reference(tiny)


@pytest.fixture(scope="module")
def small(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A pool of 12 blocks (192 tokens) and 8 tokens per step, 4 rows."""
    s = Served(tiny, tmp_path_factory.mktemp("work"), max_batch_size=4, max_batch_tokens=192, max_step_tokens=8)
    try:
        yield s
    finally:
        s.close()


def _all(served: Served, asks: list[tuple[str, int]]) -> list[str]:
    texts: list[str] = [""] * len(asks)

    def run(i: int) -> None:
        texts[i] = served.ask(_gen(*asks[i]))[0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return texts


def test_chunks_preemption_and_prefix_hits_keep_every_row_exact(small: Served, ref: Any) -> None:
    assert small.engine.kv_path == "paged"
    asks = [(SYSTEM + q, k) for q, k in [("What is one?", 40), ("Name a colour.", 30), ("Count to 3.", 45),
                                         ("Why?", 35), ("Hello", 20), ("Numbers 0 1 2", 38)]]  # fmt: skip
    asks += [("Hi", 50), ("The quick brown fox jumps over the lazy dog " * 2, 12)]
    texts = _all(small, asks)
    assert texts == [ref(p, k) for p, k in asks]
    snap = small.stats.snapshot(0, 0)
    assert snap["kv_cache"] == "paged" and snap["kv_blocks_total"] == 12 and snap["kv_blocks_used"] == 0
    assert snap["prefix_cache_hits"] > 0 and snap["prefix_cache_queries"] >= snap["prefix_cache_hits"]
    assert snap["preemptions"] > 0, "the pool was too small for every row at once"
    assert snap["forward_passes"] == snap["steps"], "one forward pass per step"
    merged = merge_engines([snap, snap])
    assert merged["kv_blocks_total"] == 24 and merged["kv_cache"] == "paged"
    assert small.alive


def test_a_prefix_hit_gives_the_same_text_and_a_request_too_big_for_the_pool_is_refused(
    small: Served, ref: Any
) -> None:
    before = small.stats.snapshot(0, 0)["prefix_cache_hits"]
    first = small.ask(_gen(SYSTEM + "Again?", 10))[0]["text"]
    second = small.ask(_gen(SYSTEM + "Again?", 10))[0]["text"]
    assert first == second == ref(SYSTEM + "Again?", 10)
    assert small.stats.snapshot(0, 0)["prefix_cache_hits"] > before
    with pytest.raises(Exception, match="--max-batch-tokens"):
        small.ask(_gen("Hello", 400))
    assert small.alive


def test_a_pool_sized_in_memory_holds_what_that_memory_holds_of_this_model(
    tiny: Path, ref: Any, tmp_path: Path
) -> None:
    from dslaunch.engine.kvsize import token_bytes

    s = Served(tiny, tmp_path, max_batch_size=4, kv_cache_memory=1 << 20, max_batch_tokens=64)
    try:
        pool = s.engine.pool_size
        cfg = s.engine.config
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        per_token = 2 * cfg.num_hidden_layers * heads * (cfg.hidden_size // cfg.num_attention_heads) * 4  # fp32 K, V
        assert token_bytes(s.engine.model, "cpu")[1] == pool.token_bytes == per_token
        assert pool.blocks == (1 << 20) // (16 * per_token) and pool.source == "--kv-cache-memory"
        assert pool.status() == {"tokens": pool.tokens, "mib": round(pool.tokens * per_token / 2**20, 1),
                                 "from": "--kv-cache-memory"}  # fmt: skip
        assert pool.tokens > 64, "the memory, not --max-batch-tokens, sized it"
        assert s.ask(_gen("Hello", 12))[0]["text"] == ref("Hello", 12)
        assert s.alive
    finally:
        s.close()


def test_seeded_sampling_is_the_same_alone_and_among_chunked_rows(small: Served) -> None:
    seeded = _gen("Hello world", 20, temperature=0.9, top_k=50, seed=77)
    alone = small.ask(seeded)[0]["text"]
    crowd = [small.submit(_gen(SYSTEM + "Busy?", 30)), small.submit(_gen("Numbers", 25, temperature=1.2))]
    job = small.submit(seeded)
    assert small.events(job)[-1][1][0]["text"] == alone
    for j in crowd:
        assert small.events(j)[-1][0] == "done"


def _prompt_reference(model: Path, prompt: str, k: int) -> tuple[list[int], list[float], list[list[int]]]:
    """The plain model's log-likelihood of each prompt token given the ones before it (raw logits),
    and the best k ids at each position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model)(prompt)["input_ids"]
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model)(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
    return ids, chosen, torch.topk(lp, k, dim=-1).indices.tolist()


def test_prompts_are_scored_across_chunks_and_prefix_hits_as_the_plain_model_scores_them(
    small: Served, ref: Any, tiny: Path
) -> None:
    long = SYSTEM + "Score me, token by token."
    small.ask(_gen(long, 4))  # its blocks are in the prefix cache now: a scored row must not take them
    hits = small.stats.snapshot(0, 0)["prefix_cache_hits"]
    jobs = [small.submit(_gen(long, 0, prompt_logprobs=2)), small.submit(_gen(long, 6, prompt_logprobs=0)),
            small.submit(_gen(SYSTEM + "Busy?", 30)), small.submit(_gen("Hello", 0, prompt_logprobs=3))]  # fmt: skip
    ends = [small.events(j)[-1] for j in jobs]
    assert [e[0] for e in ends] == ["done"] * 4, ends
    scored, both, busy, short = [e[1][0] for e in ends]
    ids, want, top = _prompt_reference(tiny, long, 2)
    for res, k in ((scored, 2), (both, 0)):
        doc = res["prompt_logprobs"]
        assert doc["token_ids"] == ids and len(doc["tokens"]) == len(ids) and doc["text"]
        assert doc["token_logprobs"][0] is None and doc["top_logprobs"][0] is None
        assert doc["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        assert [[a["id"] for a in alts] for alts in doc["top_logprobs"][1:]] == [t[:k] for t in top]
    assert scored["tokens"] == 0 and scored["text"] == "" and scored["finish_reason"] == "length"
    assert both["text"] == ref(long, 6) and both["tokens"] == 6, "scoring the prompt changes no token"
    assert busy["text"] == ref(SYSTEM + "Busy?", 30) and "prompt_logprobs" not in busy
    s_ids, s_want, _ = _prompt_reference(tiny, "Hello", 3)
    assert short["prompt_logprobs"]["token_logprobs"][0] is None
    assert short["prompt_logprobs"]["token_logprobs"][1:] == pytest.approx(s_want, abs=1e-4)
    assert short["prompt_logprobs"]["token_ids"] == s_ids
    assert small.stats.snapshot(0, 0)["kv_blocks_used"] == 0
    assert small.stats.snapshot(0, 0)["prefix_cache_hits"] >= hits
    with pytest.raises(Exception, match="'max_new_tokens' is 0"):
        small.ask(_gen("Hello", 0))  # generating nothing is for scoring a prompt only
    assert small.alive


def build_falcon(out: Path) -> Path:
    from transformers import FalconConfig, FalconForCausalLM

    tok = tinymodel.build_tokenizer()
    cfg = FalconConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=True, num_kv_heads=2, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return save_random(lambda: FalconForCausalLM(cfg), tok, out)


def test_falcon_keeps_the_left_padded_cache_and_matches_its_solo_runs(tmp_path: Path) -> None:
    model = build_falcon(tmp_path / "falcon")
    ref = reference(model)
    s = Served(model, tmp_path, max_batch_size=4)
    try:
        assert s.engine.kv_path == "padded"
        asks = [("Hello world", 12), ("The quick brown fox jumps", 20), ("One", 5), ("Numbers 0 1 2 3", 16)]
        assert _all(s, asks) == [ref(p, k) for p, k in asks]
        assert s.stats.snapshot(0, 0)["kv_cache"] == "padded"
    finally:
        s.close()
