"""`POST /tokenize` and `POST /detokenize` in vLLM's request and answer shapes.

    /tokenize    {"prompt": str} or {"messages": [...]}  ->  {"count", "max_model_len", "tokens", "token_strs"}
    /detokenize  {"tokens": [int, ...]}                  ->  {"prompt": str}

The ids are those the engine runs for the same prompt (the same tokenizer, special tokens added
as the engine adds them; a chat is rendered with the template first), so `count` equals the
`usage.prompt_tokens` of a completion of that prompt. They run where the OpenAI routes' tokenizer
is (the router), off the event loop.
"""

from __future__ import annotations

from typing import Any

from dslaunch.serving.openai_api import TextTools, _bad, _check_model
from dslaunch.serving.tools_api import messages as _messages

_TOKENIZE = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"}
MAX_TOKENS = 1 << 20  # ids in one /detokenize


def tokenize(body: Any, model: str, text: TextTools) -> dict[str, Any]:
    """The /tokenize answer for a validated body (blocking: tokenizes)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for key in body:
        if key not in _TOKENIZE:
            raise _bad(f"unsupported field {key!r}", key)
    _check_model(body, model)
    for key in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
        if key in body and not isinstance(body[key], bool):
            raise _bad(f"{key!r} must be true or false", key)
    if body.get("add_generation_prompt") is False:
        raise _bad("'add_generation_prompt': false is not supported (chats are rendered for a reply)",
                   "add_generation_prompt")  # fmt: skip
    if ("prompt" in body) == ("messages" in body):
        raise _bad("send 'prompt' (a string) or 'messages', one of them", "prompt")
    if "messages" in body:
        prompt = text.chat(_messages(body["messages"]))
    else:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise _bad("'prompt' must be a string", "prompt")
    ids = text.tokenize(prompt, body.get("add_special_tokens", True))
    strs = text.token_strs(ids) if body.get("return_token_strs") else None
    return {"count": len(ids), "max_model_len": text.max_positions, "tokens": ids, "token_strs": strs}


def detokenize(body: Any, model: str, text: TextTools) -> dict[str, Any]:
    """The /detokenize answer for a validated body (blocking: decodes)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for key in body:
        if key not in {"model", "tokens"}:
            raise _bad(f"unsupported field {key!r}", key)
    _check_model(body, model)
    ids = body.get("tokens")
    vocab = text.vocab_size
    if not isinstance(ids, list) or len(ids) > MAX_TOKENS:
        raise _bad(f"'tokens' must be a list of at most {MAX_TOKENS} token ids", "tokens")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise _bad(f"'tokens' holds {t!r}, not a token id of this model (0 to {vocab - 1})", "tokens")
    return {"prompt": text.detokenize(ids)}
