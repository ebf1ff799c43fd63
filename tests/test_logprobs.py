"""Logprobs on a real engine in this process: the chosen tokens' log probabilities and their best
alternatives equal those of the plain transformers model on the same tokens (log-softmax of the
logits over the temperature), for greedy and seeded sampled rows sharing one batch."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.engine import tinymodel
from dslaunch.wire.protocol import ProtocolError
from tests.inproc import Served

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("models") / tinymodel.NAME)


@pytest.fixture(scope="module")
def served(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = Served(tiny, tmp_path_factory.mktemp("work"), max_batch_size=4, max_new_tokens=64, batch_wait_ms=300.0)
    try:
        yield s
    finally:
        s.close()


def _reference(model: Path, ids_out: list[int], temperature: float, k: int) -> tuple[list[float], list[list[int]]]:
    """Teacher-forced: each generated token's logprob and the best k ids, from the plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model)
    prompt = tok(PROMPT, return_tensors="pt")["input_ids"]
    ids = torch.cat([prompt, torch.tensor([ids_out])], dim=1)
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float()
    lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    chosen = lp.gather(1, torch.tensor(ids_out).unsqueeze(1)).squeeze(1).tolist()
    return chosen, torch.topk(lp, k, dim=-1).indices.tolist() if k else [[] for _ in ids_out]


def test_logprobs_equal_the_plain_model_for_greedy_and_sampled_rows(served: Served, tiny: Path) -> None:
    cases = [{"logprobs": 3}, {"logprobs": 0}, {"logprobs": 5, "temperature": 0.7, "seed": 11}, {}]
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        results[i] = served.ask({"id": i, "op": "generate", "prompt": PROMPT, "max_new_tokens": 10, **cases[i]})[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert "logprobs" not in results[3]
    assert results[0]["text"] == results[3]["text"], "asking for logprobs changes no token"
    for i, case in enumerate(cases[:3]):
        doc, k = results[i]["logprobs"], case["logprobs"]
        assert len(doc["token_ids"]) == len(doc["token_logprobs"]) == results[i]["tokens"] == 10
        want, top = _reference(tiny, doc["token_ids"], case.get("temperature", 0.0), k)
        assert doc["token_logprobs"] == pytest.approx(want, abs=1e-4)
        assert [[a["id"] for a in alts] for alts in doc["top_logprobs"]] == top
        assert all(a["logprob"] <= 0 for alts in doc["top_logprobs"] for a in alts)
        if not case.get("temperature"):  # greedy: the chosen token is the best alternative
            pairs = zip(doc["top_logprobs"], doc["token_ids"], strict=True)
            assert all(alts[0]["id"] == t for alts, t in pairs if alts)


@pytest.mark.parametrize("value", [21, -1, "3", True])
def test_a_logprobs_value_out_of_range_names_the_limit(served: Served, value: Any) -> None:
    with pytest.raises(ProtocolError) as e:
        served.ask({"id": 1, "op": "generate", "prompt": PROMPT, "logprobs": value})
    assert e.value.code == "bad_request" and "'logprobs'" in e.value.message
    if value == 21:
        assert "0 to 20" in e.value.message


def test_a_stream_carries_each_tokens_logprobs_with_its_text(served: Served) -> None:
    """Each chunk has the logprobs of the tokens its text completes; joined, they are the answer's."""
    ask = {"id": 1, "op": "generate", "prompt": PROMPT, "max_new_tokens": 12, "logprobs": 2, "stream": True}
    events = served.events(served.submit(ask))
    chunks, (kind, results) = events[:-1], events[-1]
    assert kind == "done" and chunks and all(e[0] == "chunk" for e in chunks)
    answer = results[0]["logprobs"]
    pieces = [e[3] for e in chunks if e[3] is not None]
    assert len(pieces) > 1, "logprobs come with the text as it is made, not only at the end"
    joined = {key: [v for p in pieces for v in p[key]] for key in ("token_ids", "token_logprobs", "tokens")}
    assert joined["token_ids"] == answer["token_ids"][: len(joined["token_ids"])]
    assert joined["token_logprobs"] == answer["token_logprobs"][: len(joined["token_ids"])]
    assert "".join(e[2] for e in chunks) == results[0]["text"]
    # the last chunk may be followed by tokens whose text never came out; none is missing or repeated
    assert len(joined["token_ids"]) <= len(answer["token_ids"]) == results[0]["tokens"]
    plain = served.events(served.submit({k: v for k, v in ask.items() if k != "logprobs"}))
    assert all(e[3] is None for e in plain[:-1]), "no logprobs asked: chunks carry none"
