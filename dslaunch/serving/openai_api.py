"""The OpenAI API's shapes: its request bodies turned into dslaunch requests, and results back.

Fields dslaunch cannot honour (`suffix`, `best_of`, the legacy `functions`) get a 400 naming the field,
never a silent ignore. Validation of what remains is the NDJSON protocol's own, so both paths
accept exactly the same values.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import struct
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from dslaunch.serving import tools_api
from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError, Request

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
# vLLM's extensions beside OpenAI's fields: top_k, repetition_penalty, min_tokens, ignore_eos
_PASSED = ("top_p", "top_k", "seed", "stop", *P.PENALTY_FIELDS)
_COMMON = {"model", "max_tokens", "temperature", "stream", "stream_options", "n", "logprobs", "user", *_PASSED}
FIELDS = {
    "completions": _COMMON | {"prompt", "echo", "best_of", "suffix", "response_format"},
    "chat": _COMMON
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "parallel_tool_calls",
        "response_format",
    },
}
# a value that does nothing is accepted; anything else is refused by name
_NO_OP = {"best_of": (None, 1), "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none"),
          "parallel_tool_calls": (None, False, True)}  # fmt: skip
_WHY = {
    "best_of": "one choice per prompt",
    "suffix": "no insertion",
    "functions": "the legacy form: send 'tools'",
    "function_call": "the legacy form: send 'tool_choice'",
}
_RENAME = {"'max_new_tokens'": "'max_tokens'", "'prompt'": "'prompt' (or 'messages')"}
_PARAM = {"max_new_tokens": "max_tokens"}  # the NDJSON field a message names -> the OpenAI one


@dataclass
class Ask:
    """A parsed completion request: the dslaunch request and how to shape its answer."""

    kind: str  # completions | chat
    req: Request
    model: str
    include_usage: bool = False
    messages: list[dict[str, Any]] | None = None  # chat: rendered with the template before queueing
    n: int = 1  # samples per prompt
    echo: bool = False  # completions: each choice's text (and logprobs) starts with its prompt
    tools: tools_api.ToolPlan | None = None  # chat: the tools offered, and how a call is chosen

    def samples(self) -> list[Request]:
        """One request per sample: sample j has seed + j (its own seed stream) when seeded."""
        if self.n == 1:
            return [self.req]
        p = self.req.params
        seeds = [None if p.seed is None else (p.seed + j) % (1 << 63) for j in range(self.n)]
        return [dataclasses.replace(self.req, id=f"{self.req.id}-{j}", family=str(self.req.id),
                                    params=dataclasses.replace(p, seed=seeds[j])) for j in range(self.n)]  # fmt: skip

    @staticmethod
    def interleave(outs: list[list[Any]]) -> list[Any]:
        """Per-sample results as choices, prompt by prompt: prompt i's sample j is i * n + j."""
        return [out[i] for i in range(len(outs[0])) for out in outs]


class TextTools:
    """Rank 0's tokenizer, for the chat template and token counts (shared with the engine: locked)."""

    def __init__(self, tok: Any, lock: Any, max_positions: int | None = None) -> None:
        self.tok = tok
        self.lock = lock
        self.max_positions = max_positions  # the model's context (max_model_len), when it is a generator
        self.vocab_size = len(tok)
        self.max_bytes: int | None = None
        if max_positions:
            # no token covers more than 4 bytes per character of its vocabulary string, so a prompt
            # longer than this cannot fit, and is refused without tokenizing it (which costs memory)
            longest = max((len(t) for t in tok.get_vocab()), default=1)
            self.max_bytes = max_positions * 4 * max(longest, 1)

    @classmethod
    def of(cls, engine: Any) -> TextTools | None:
        tok = getattr(engine, "tok", None)
        if tok is None:
            return None
        limit = getattr(engine, "max_positions", None) if getattr(engine, "task", "") == "generate" else None
        return cls(tok, getattr(engine, "tok_lock", None) or threading.Lock(), limit)

    def precheck(self, req: Request) -> None:
        """Refuse prompts that cannot fit the model before anything tokenizes them."""
        if self.max_bytes is None or req.op != "generate":
            return
        for i, text in enumerate(req.inputs):
            if isinstance(text, str) and len(text) > self.max_bytes // 4 and len(text.encode()) > self.max_bytes:
                raise ProtocolError(P.BAD_REQUEST, f"prompt {i} is far longer than this model's context")

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise ProtocolError(P.BAD_REQUEST, "this model has no chat template: use /v1/completions")
        try:
            with self.lock:
                return str(
                    self.tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
                )
        except Exception as e:  # jinja raises for conversations a template refuses
            raise ProtocolError(P.BAD_REQUEST, f"the chat template refused these messages: {e}"[:500]) from None

    def count(self, texts: list[str]) -> int:
        with self.lock:
            return sum(len(ids) for ids in self.tok(texts)["input_ids"])

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """The ids the engine runs for `text` (it adds special tokens as the tokenizer does)."""
        with self.lock:
            return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        with self.lock:
            return str(self.tok.decode(ids))

    def token_strs(self, ids: list[int]) -> list[str]:
        with self.lock:
            return [str(t) for t in self.tok.convert_ids_to_tokens(ids)]


def model_card(name: str, created: float, max_model_len: int | None = None) -> dict[str, Any]:
    card = {"id": name, "object": "model", "created": int(created), "owned_by": "dslaunch"}
    if max_model_len:
        card["max_model_len"] = max_model_len  # as vLLM's card has it
    return card


def error_body(message: str, code: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _bad(message: str, param: str | None = None) -> ProtocolError:
    e = ProtocolError(P.BAD_REQUEST, message)
    e.param = param  # type: ignore[attr-defined]
    return e


def completion(body: Any, kind: str, model: str, limits: P.Limits) -> Ask:
    """Validate a /v1/completions or /v1/chat/completions body."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for key in body:
        if key not in FIELDS[kind]:
            raise _bad(f"unsupported field {key!r}", key)
    for key, allowed in _NO_OP.items():
        if key in body and body[key] not in allowed:
            why = _WHY.get(key, "not honoured")
            raise _bad(f"{key!r} is not supported ({why}): leave it out", key)
    _check_model(body, model)
    stream = body.get("stream") or False
    opts = body.get("stream_options")
    if opts is not None and (not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
        raise _bad("'stream_options' takes {'include_usage': bool}, and only with 'stream': true", "stream_options")
    obj: dict[str, Any] = {"id": uuid.uuid4().hex, "op": "generate", "stream": stream}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        obj["max_new_tokens"] = max_tokens
    obj["temperature"] = 1.0 if body.get("temperature") is None else body["temperature"]  # OpenAI's default
    for key in (*_PASSED, "response_format"):
        if body.get(key) is not None:
            obj[key] = body[key]
    top = _logprobs(body, kind)
    if top is not None:
        obj["logprobs"] = top
    echo = _echo(body, obj, top)
    messages, tools = None, None
    if kind == "chat":
        messages = tools_api.messages(body.get("messages"))
        obj["prompt"] = "(chat)"  # replaced by the rendered template
        tools = tools_api.plan(body)
        forced = tools.forced_format() if tools else None
        if forced and body.get("response_format") not in (None, {"type": "text"}):
            raise _bad("'response_format' and a forced 'tool_choice' cannot both shape the answer", "tool_choice")
        if forced:
            obj["response_format"] = forced
    else:
        obj["prompt"] = body.get("prompt")  # text, token ids, or a list of either
    try:
        req = P.request_from(obj, limits)
    except ProtocolError as e:
        field = re.match(r"'(\w+)'", e.message)
        e.param = _PARAM.get(field.group(1), field.group(1)) if field else None  # type: ignore[attr-defined]
        for old, new in _RENAME.items():
            e.message = e.message.replace(old, new)
        raise
    include = bool(opts and opts.get("include_usage"))
    n = 1 if body.get("n") is None else body["n"]
    prompts = 1 if messages is not None else len(req.inputs)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n * prompts <= limits.max_prompts:
        raise _bad(f"'n' must be an integer, and n x prompts at most {limits.max_prompts} (--max-batch-size)", "n")
    return Ask(kind, req, model, include, messages, n, echo, tools)


def _echo(body: dict[str, Any], obj: dict[str, Any], top: int | None) -> bool:
    """`echo`: the prompt comes back before the completion. Its logprobs (log-likelihood scoring)
    and the text of token-id prompts come from the engine scoring the prompt (`prompt_logprobs`;
    on a stream, with each choice's first chunk); `max_tokens: 0` then only scores it."""
    echo = body.get("echo")
    if echo is None or echo is False:
        return False
    if not isinstance(echo, bool):
        raise _bad("'echo' must be true or false", "echo")
    prompt = body.get("prompt")
    texts = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
    if top is not None or not texts or obj.get("max_new_tokens") == 0:
        obj["prompt_logprobs"] = top or 0
    return True


def _logprobs(body: dict[str, Any], kind: str) -> int | None:
    """Alternatives per token asked for, or None: completions' `logprobs: k`, chat's
    `logprobs: true` with `top_logprobs: k` (the range is the NDJSON field's)."""
    if kind == "completions":
        value = body.get("logprobs")
        if value is None or value is False:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad("'logprobs' must be an integer (alternatives per token)", "logprobs")
        return value
    on, top = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise _bad("'logprobs' must be true or false", "logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= P.MAX_LOGPROBS):
        raise _bad(f"'top_logprobs' must be an integer from 0 to {P.MAX_LOGPROBS}", "top_logprobs")
    if top and not on:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if on else None


def param_of(message: str) -> str | None:
    """The request field an error message names first (`'field' ...`), in the OpenAI name: for
    errors from the engine's check, which come as a code and a message only."""
    m = re.match(r"'(\w+)'", message)
    name = _PARAM.get(m.group(1), m.group(1)) if m else None
    return name if name in FIELDS["completions"] | FIELDS["chat"] else None


def _check_model(body: dict[str, Any], model: str) -> None:
    name = body.get("model")
    if name is not None and name != model:
        e = ProtocolError("model_not_found", f"the model {name!r} does not exist: this job serves {model!r}")
        e.param = "model"  # type: ignore[attr-defined]
        raise e


def embedding(body: Any, model: str, limits: P.Limits) -> tuple[Request, bool]:
    """Validate a /v1/embeddings body: the request, and whether to answer in base64."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for key in body:
        if key not in {"model", "input", "encoding_format", "user", "dimensions"}:
            raise _bad(f"unsupported field {key!r}", key)
    if body.get("dimensions") is not None:
        raise _bad("'dimensions' is not supported: the model's own size is returned", "dimensions")
    _check_model(body, model)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("'encoding_format' is 'float' or 'base64'", "encoding_format")
    value = body.get("input")
    if isinstance(value, list) and value and not all(isinstance(x, str) for x in value):
        raise _bad("'input' as token ids is not supported: send text", "input")
    req = P.request_from({"id": uuid.uuid4().hex, "op": "embed", "input": value}, limits)
    return req, fmt == "base64"


def embedding_body(vectors: list[list[float]], b64: bool, model: str, tokens: int) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": _b64(v) if b64 else v} for i, v in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _b64(vector: list[float]) -> str:
    """float32 little-endian, as the official client decodes it (numpy.frombuffer, dtype float32)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
