"""The tiny local model: deterministic (every node builds the same files) and loadable normally."""

from __future__ import annotations

import hashlib
from pathlib import Path

from dslaunch.engine import tinymodel


def _digest(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.suffix in (".safetensors", ".json") or p.name == "tokenizer.json"
    }


def test_two_builds_are_identical_and_generate(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = tinymodel.build(tmp_path / "a")
    b = tinymodel.build(tmp_path / "b")
    assert _digest(a) == _digest(b) and "model.safetensors" in _digest(a)
    tok = AutoTokenizer.from_pretrained(a, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(a)
    ids = tok(["Hello world", "The quick brown fox"], return_tensors="pt", padding=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, ids["input_ids"].shape[1] + 8)
    assert tok.decode(ids["input_ids"][1], skip_special_tokens=True) == "The quick brown fox"
    assert tinymodel.build(a) == a, "an existing complete copy is reused"
