"""The paged KV cache and its attention function, on tiny random models of each family whose
attention goes through transformers' AttentionInterface: driven by the Scheduler with rows
joining and leaving, prompts prefilled in chunks, rows preempted and prefixes reused, every
row's greedy tokens equal its solo run with plain transformers."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from dslaunch.engine.paged import PagedKV, StepLayout, supports_paged, use_paged
from dslaunch.engine.scheduler import Scheduler

torch = pytest.importorskip("torch")
VOCAB = 96


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny matrices: intra-op threads only contend with each other (and with other tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(kind: str) -> Any:
    import transformers as t

    base = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 256, "eos_token_id": None}  # fmt: skip
    cfg = {
        "llama": lambda: t.LlamaConfig(**base),
        "qwen2": lambda: t.Qwen2Config(**base, num_key_value_heads=2),
        "mistral": lambda: t.MistralConfig(**base, num_key_value_heads=1, sliding_window=24),
        "gpt-neox": lambda: t.GPTNeoXConfig(**base),
        "opt": lambda: t.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            eos_token_id=None,
        ),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, eos_token_id=None
        ),
    }[kind]()
    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = t.AutoModelForCausalLM.from_config(cfg)
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def solo(model: Any, prompt: list[int], k: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=k, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def run(
    model: Any, s: Scheduler, rows: dict[int, tuple[list[int], int]], arrive: dict[int, int]
) -> dict[int, list[int]]:
    kv = PagedKV(model, s.pool.total, s.size, "cpu")
    outs: dict[int, list[int]] = {k: [] for k in rows}
    pending, step = dict(rows), 0
    while pending or s.seqs:
        for k in [k for k in pending if arrive[k] <= step]:
            s.add(k, *pending.pop(k))
        plan = s.schedule()
        step += 1
        if not plan.chunks:
            continue
        layout = StepLayout(
            [t for c in plan.chunks for t in c.tokens], [c.start for c in plan.chunks],
            [len(c.tokens) for c in plan.chunks], [c.table for c in plan.chunks], [c.sample for c in plan.chunks],
        )  # fmt: skip
        with torch.inference_mode():
            logits = kv.step(layout)
        s.commit(plan)
        for c, token in zip([c for c in plan.chunks if c.sample], logits.argmax(-1).tolist(), strict=True):
            outs[c.key].append(token)
            if len(outs[c.key]) >= rows[c.key][1]:
                s.finish(c.key)
            else:
                s.append(c.key, token)
    assert s.pool.used == 0
    return outs


def workload(seed: int) -> tuple[dict[int, tuple[list[int], int]], dict[int, int]]:
    rng = random.Random(seed)
    system = [rng.randrange(1, VOCAB) for _ in range(37)]
    rows = {}
    for k in range(7):
        head = system[: rng.choice([0, 16, 33, 37])]
        rows[k] = (head + [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))], rng.randint(1, 14))
    return rows, {k: rng.randint(0, 12) for k in rows}


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "gpt-neox", "opt", "gpt2"])
def family(request: pytest.FixtureRequest) -> tuple[Any, Any, dict[int, list[int]], Any]:
    ref = build(request.param)
    model = copy.deepcopy(ref)
    assert supports_paged(model)
    use_paged(model)
    rows, arrive = workload(3)
    expect = {k: solo(ref, *rows[k]) for k in rows}
    return model, rows, expect, arrive


def test_every_row_matches_its_solo_run_across_chunks_preemption_and_prefix_hits(family: Any) -> None:
    model, rows, expect, arrive = family
    s = Scheduler(blocks=20, block_size=4, max_rows=4, step_tokens=7)
    assert run(model, s, rows, arrive) == expect
    assert s.hits > 0 and s.preemptions > 0  # the shared system prompt was reused; rows were recomputed


@pytest.mark.parametrize(
    ("blocks", "size", "step_tokens"), [(64, 16, 512), (90, 1, 5)], ids=["whole", "one-token-blocks"]
)
def test_llama_matches_with_whole_prompts_and_one_token_blocks(blocks: int, size: int, step_tokens: int) -> None:
    ref = build("llama")
    model = copy.deepcopy(ref)
    use_paged(model)
    rows, arrive = workload(5)
    assert run(model, Scheduler(blocks, size, 6, step_tokens), rows, arrive) == {k: solo(ref, *rows[k]) for k in rows}


def test_a_prefix_hit_gives_the_same_tokens_as_a_miss() -> None:
    ref = build("qwen2")
    model = copy.deepcopy(ref)
    use_paged(model)
    prompt = list(range(1, 41))
    rows = {0: (prompt, 6), 1: (prompt, 6), 2: ([*prompt[:32], 7, 8], 6)}
    cold = Scheduler(32, 8, 4, 64, prefix_caching=False)
    warm = Scheduler(32, 8, 4, 64)
    arrive = {0: 0, 1: 3, 2: 3}
    assert run(model, warm, rows, arrive) == run(model, cold, rows, arrive)
    assert warm.hits == 4 + 4 and cold.hits == 0


def test_the_probe_counts_every_layer_and_falcon_is_not_paged() -> None:
    from transformers import FalconConfig, FalconForCausalLM

    model = build("llama")
    use_paged(model)
    with torch.inference_mode():
        assert PagedKV(model, 2, 4, "cpu").probe() == 2
    falcon = FalconForCausalLM(
        FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    )
    assert not supports_paged(falcon)
