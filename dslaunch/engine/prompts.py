"""Prompts to token ids, once, on the front's side of rank 0 (never on the other ranks).

The front checks and tokenizes each request off its event loop with a tokenizer instance of its
own: a fast tokenizer must not be used by two threads at once, and the serving loop decodes with
the engine's instance meanwhile. A prompt whose length in bytes alone proves it has too many
tokens is refused before it is tokenized at all.
"""

from __future__ import annotations

import json
import threading
from typing import Any

# Unicode normalisation shrinks text by at most about 3x (Hangul jamo composing into syllables).
NORMALISATION_SLACK = 4
_SAFE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Prepend"}
_SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts"}


class PromptTokenizer:
    """The front's own tokenizer: thread-safe `encode`, and the byte length that proves a prompt
    too long (`None` when this tokenizer can drop text, so that no such proof exists)."""

    def __init__(self, path: str, max_positions: int) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.lock = threading.Lock()
        self.max_bytes = byte_bound(self.tok, max_positions)

    def encode(self, text: str) -> list[int]:
        with self.lock:
            return list(self.tok(text)["input_ids"])


def byte_bound(tok: Any, max_positions: int) -> int | None:
    """Prompts longer than this many UTF-8 bytes have at least `max_positions` tokens.

    Every token stands for at most (its decoded length + 1) bytes of the normalised prompt (the
    1 is a Metaspace marker that decoding drops), normalisation shrinks text at most
    `NORMALISATION_SLACK` times, and nothing else may drop text: only byte-level or BPE models
    without fused unknowns, and only normalizers and pre-tokenizers known to keep every character.
    """
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None
    if not _keeps_text(spec.get("normalizer"), _SAFE_NORMALIZERS) or not _keeps_text(
        spec.get("pre_tokenizer"), _SAFE_PRE_TOKENIZERS
    ):
        return None
    pieces = backend.decode_batch([[i] for i in range(backend.get_vocab_size(with_added_tokens=True))], False)
    longest = max((len(p.encode("utf-8", "surrogatepass")) for p in pieces), default=0)
    return max_positions * (longest + 1) * NORMALISATION_SLACK


def _keeps_text(node: dict[str, Any] | None, safe: set[str]) -> bool:
    """True when a normalizer / pre-tokenizer never drops or collapses characters."""
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_keeps_text(n, safe) for n in node.get("normalizers", node.get("pretokenizers", [])))
    if kind == "Replace":  # e.g. ' ' -> '▁' in Llama 2: one character for one, never a pattern
        pattern = node.get("pattern") or {}
        return len(pattern.get("String", "xx")) == 1 and len(node.get("content", "")) >= 1
    if kind == "Split":
        return node.get("behavior") != "Removed"
    return kind in safe
