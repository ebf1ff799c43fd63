"""The engine's logprobs (`engine.generation`: per token its text, id, logprob and alternatives)
in the OpenAI shapes: completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`,
and chat's `content` list of `{token, logprob, bytes, top_logprobs}`."""

from __future__ import annotations

from typing import Any


def completion(doc: dict[str, Any] | None, start: int = 0) -> dict[str, Any] | None:
    """`start`: the first token's `text_offset` (a stream's later chunks continue the count)."""
    if doc is None:
        return None
    offsets, at = [], start
    for text in doc["tokens"]:
        offsets.append(at)
        at += len(text)
    tops = [None if top is None else {alt["token"]: alt["logprob"] for alt in top} for top in doc["top_logprobs"]]
    return {"tokens": doc["tokens"], "token_logprobs": doc["token_logprobs"], "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def joined(prompt: dict[str, Any], completion: dict[str, Any] | None) -> dict[str, Any]:
    """An echoed prompt's scores, then the completion's: one list of tokens, as OpenAI's legacy
    completions give them (the first prompt token has no logprob and no alternatives)."""
    parts = [prompt, completion or {}]
    keys = ("tokens", "token_logprobs", "top_logprobs")
    return {key: [v for part in parts for v in part.get(key, [])] for key in keys}


def chat(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    content = []
    for text, lp, top in zip(doc["tokens"], doc["token_logprobs"], doc["top_logprobs"], strict=True):
        alts = [{"token": a["token"], "logprob": a["logprob"], "bytes": list(a["token"].encode())} for a in top]
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": alts})
    return {"content": content, "refusal": None}
