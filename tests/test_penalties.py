"""Penalties, logit bias, min_tokens and ignore_eos on a real engine in this process, all rows in
one batch: each row's greedy text equals a plain transformers loop computing the same thing with
transformers' own logits processors (repetition, min new tokens, sequence bias) and OpenAI's
presence / frequency formula."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.engine import tinymodel
from dslaunch.wire.protocol import ProtocolError
from tests.inproc import Served

PROMPT = "Hello world"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("models") / tinymodel.NAME)


@pytest.fixture(scope="module")
def served(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tiny, tmp_path_factory.mktemp("work"), max_batch_size=8, max_new_tokens=64, batch_wait_ms=300.0)
    try:
        yield s
    finally:
        s.close()


class Reference:
    """Greedy decoding with the plain model, one token at a time, logits processed in the
    engine's order: bias, min_tokens, repetition, then presence / frequency."""

    def __init__(self, model: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model)
        self.lm = AutoModelForCausalLM.from_pretrained(model)
        eos = self.lm.generation_config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [self.tok.eos_token_id])

    def __call__(self, k: int, **p: Any) -> tuple[str, int]:
        import torch
        from transformers import (
            MinNewTokensLengthLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            SequenceBiasLogitsProcessor,
        )

        ids = self.tok(PROMPT, return_tensors="pt")["input_ids"]
        start = ids.shape[1]
        procs: list[Any] = []
        if p.get("logit_bias"):
            procs.append(SequenceBiasLogitsProcessor({(int(t),): float(b) for t, b in p["logit_bias"].items()}))
        if p.get("min_tokens"):
            procs.append(MinNewTokensLengthLogitsProcessor(start, p["min_tokens"], self.eos))
        if p.get("repetition_penalty", 1.0) != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(p["repetition_penalty"]))
        out: list[int] = []
        with torch.no_grad():
            for _ in range(k):
                logits = self.lm(input_ids=ids).logits[:, -1, :].float()
                for proc in procs:
                    logits = proc(ids, logits)
                if out:
                    counts = torch.bincount(torch.tensor(out), minlength=logits.shape[-1]).float()
                    logits = logits - p.get("frequency_penalty", 0.0) * counts
                    logits = logits - p.get("presence_penalty", 0.0) * (counts > 0).float()
                token = int(logits.argmax(-1))
                if token in self.eos and not p.get("ignore_eos"):
                    break
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return self.tok.decode(out, skip_special_tokens=True), len(out)


def test_each_row_equals_the_transformers_reference_in_one_batch(served: Served, tiny: Path) -> None:
    ref = Reference(tiny)
    plain, _ = ref(12)
    first = ref.tok(plain, add_special_tokens=False)["input_ids"][0]
    eos = str(ref.eos[0])
    cases: list[dict[str, Any]] = [
        {},
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.7},
        {"presence_penalty": 1.5, "frequency_penalty": 0.9},
        {"frequency_penalty": -0.5},
        {"logit_bias": {str(first): -100, "7": 4.5}},
        {"logit_bias": {eos: 100}, "min_tokens": 3},  # eos would come at once: held off for 3 tokens
        {"logit_bias": {eos: 100}, "ignore_eos": True},
        {"repetition_penalty": 1.3, "presence_penalty": 0.5, "logit_bias": {"11": 2}},
    ]
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = served.ask({"id": i, "op": "generate", "prompt": PROMPT, "max_new_tokens": 12, **cases[i]})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    steps = served.stats.steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert served.stats.steps - steps < 12 * len(cases), "the rows shared steps"
    for i, case in enumerate(cases):
        want_text, want_tokens = ref(12, **case)
        got = results[i][0]
        assert (got["text"], got["tokens"]) == (want_text, want_tokens), case
    assert results[6][0]["tokens"] == 3 and results[6][0]["finish_reason"] == "eos"
    assert results[7][0]["tokens"] == 12 and results[7][0]["finish_reason"] == "length"
    assert results[1][0]["text"] != plain


@pytest.mark.parametrize(
    "fields",
    [
        {"logit_bias": {"99999999": 1}},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {"1": 101}},
        {"logit_bias": [1]},
        {"presence_penalty": 2.5},
        {"frequency_penalty": "1"},
        {"repetition_penalty": 0},
        {"min_tokens": 13},
        {"min_tokens": -1},
        {"ignore_eos": 1},
    ],
)
def test_bad_penalty_values_are_refused_naming_the_field(served: Served, fields: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as e:
        served.ask({"id": 1, "op": "generate", "prompt": PROMPT, "max_new_tokens": 12, **fields})
    assert e.value.code == "bad_request" and repr(next(iter(fields))) in e.value.message
