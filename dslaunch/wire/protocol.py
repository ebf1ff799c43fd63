"""The front's wire format, shared by the front and the client: newline-delimited JSON.

One UTF-8 JSON object per line in each direction. Every request carries an `id` that its
answers echo, so many requests can be in flight on one connection. Answers are
`{"id": ..., "ok": true, ...}` or `{"id": ..., "ok": false, "error": {"code": ..., "message": ...}}`
with a code from `ERROR_CODES`; a bad request never closes the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from dslaunch.wire import genfields
from dslaunch.wire.lines import LineReader as LineReader  # part of the wire format, for its users
from dslaunch.wire.serve import ServeSpec

_DEFAULTS = ServeSpec()  # the defaults of `up`'s serving flags live there

# Stable error codes: clients may branch on them.
BAD_REQUEST = "bad_request"  # malformed JSON, unknown op or field, wrong type, out of range
TOO_LARGE = "too_large"  # the line is longer than --max-request-bytes
OVERLOADED = "overloaded"  # the queue is full (--max-queue): retry later
UNAVAILABLE = "unavailable"  # the job is starting or stopping: retry
TIMEOUT = "timeout"  # the request's time-out passed before it was answered
UNAUTHORIZED = "unauthorized"  # the front wants a token and none (or a wrong one) came
INTERNAL = "internal"  # a bug or a failed rank; the message says which
ERROR_CODES = (BAD_REQUEST, TOO_LARGE, OVERLOADED, UNAVAILABLE, TIMEOUT, UNAUTHORIZED, INTERNAL)

WORK_OPS = ("generate", "embed", "infer")
OPS = (*WORK_OPS, "health", "stats", "auth")
MAX_STOP = 16
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows
PENALTY_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens",
                  "ignore_eos")  # fmt: skip
# beside the penalties, forwarded by the router when set
EXTRA_FIELDS = (*PENALTY_FIELDS, "logprobs", "prompt_logprobs", "response_format")
MAX_ID_CHARS = 256


class ProtocolError(Exception):
    """A request the front refuses, with its stable code; `id` is echoed when it was readable."""

    def __init__(self, code: str, message: str, id: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.ran = False  # set once the request was queued: its work may have run


@dataclass(frozen=True)
class Limits:
    """What the front accepts; set from `dslaunch up` flags."""

    max_request_bytes: int = _DEFAULTS.max_request_bytes
    max_prompts: int = _DEFAULTS.max_batch_size  # per request; at most --max-batch-size
    max_new_tokens: int = _DEFAULTS.max_new_tokens
    default_max_new_tokens: int = 32
    max_timeout: float = 3600.0


@dataclass(frozen=True)
class GenParams:
    """Per-prompt generation settings; temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # penalties and limits, as OpenAI and vLLM define them (engine.penalties applies them)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # the chosen token's log probability and this many alternatives
    # each prompt token's log probability (the first has none) and this many alternatives: what
    # log-likelihood scoring needs (OpenAI's `echo` with `logprobs`); with it, max_new_tokens may be 0
    prompt_logprobs: int | None = None
    # structured output: OpenAI's response_format (json_object or json_schema) as JSON text,
    # None for plain text (engine.grammar compiles it on rank 0)
    response_format: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Request:
    id: Any
    op: str
    inputs: list[Any] = field(default_factory=list)  # prompts, texts, or handler inputs
    single: bool = True  # the input was one item, not a list: answer with one result
    params: GenParams = field(default_factory=GenParams)
    stream: bool = False
    deep: bool = False
    timeout: float | None = None
    token: str | None = None
    challenge: str | None = None  # health: proves the front knows this job's nonce
    ids: list[list[int]] | None = None  # prompt token ids: set on rank 0 by the engine's check, never sent
    family: str | None = None  # the samples of one request (`n`): a router keeps them together; never sent


_COMMON = {"id", "op", "token", "timeout"}
_FIELDS = {
    "generate": _COMMON
    | {"prompt", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", *EXTRA_FIELDS},
    "embed": _COMMON | {"input"},
    "infer": _COMMON | {"input"},
    "health": _COMMON | {"deep", "challenge"},
    "stats": _COMMON,
    "auth": _COMMON,
}


def parse_request(line: bytes | str, limits: Limits) -> Request:
    """Decode and validate one request line, or raise ProtocolError naming the field."""
    return request_from(load_json(line), limits)


def load_json(data: bytes | str) -> Any:
    """json.loads that refuses what would break later: invalid UTF-8, lone surrogates, deep nesting.

    JSON's `\\ud800` escape decodes to a str that cannot be encoded again; caught here, at parse
    time, it is a `bad_request` instead of an exception while answering.
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(BAD_REQUEST, f"not valid JSON: {e}") from None
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, "JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")):
        _check_unicode(obj)
    return obj


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _check_unicode(obj: Any) -> None:
    """Raise bad_request (unauthorized for the token) if any string holds a lone surrogate."""
    top = obj if isinstance(obj, dict) else {"": obj}
    token = top.get("token")
    rid = top.get("id")
    rid = rid if isinstance(rid, int) or (isinstance(rid, str) and _valid(rid)) else None
    if isinstance(token, str) and not _valid(token):
        raise ProtocolError(UNAUTHORIZED, "'token' is not valid Unicode", rid)
    for key, value in top.items():
        stack = [key, value]
        while stack:
            o = stack.pop()
            if isinstance(o, str):
                if not _valid(o):
                    where = f"field {key!r}" if _valid(key) else "a field name"
                    raise ProtocolError(BAD_REQUEST, f"{where} is not valid Unicode (a lone surrogate)", rid)
            elif isinstance(o, dict):
                stack.extend(o.keys())
                stack.extend(o.values())
            elif isinstance(o, list):
                stack.extend(o)


def _valid(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def request_from(obj: Any, limits: Limits) -> Request:
    """Validate a decoded request object (NDJSON, or one the HTTP front built)."""
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "a request is a JSON object")
    rid = obj.get("id")
    if rid is None:
        raise ProtocolError(BAD_REQUEST, "missing 'id' (a string or an integer)")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and len(rid) > MAX_ID_CHARS):
        raise ProtocolError(BAD_REQUEST, f"'id' must be a string (at most {MAX_ID_CHARS} characters) or an integer")
    try:
        return _parse(obj, rid, limits)
    except ProtocolError as e:
        e.id = rid
        raise


def _parse(obj: dict[str, Any], rid: Any, limits: Limits) -> Request:
    op = obj.get("op")
    if op not in OPS:
        raise ProtocolError(BAD_REQUEST, f"unknown op {op!r}: one of {', '.join(OPS)}")
    unknown = sorted(set(obj) - _FIELDS[op])
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown field {unknown[0]!r} for op {op!r}")
    req = Request(id=rid, op=op)
    token = obj.get("token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError(BAD_REQUEST, "'token' must be a string")
    req.token = token
    if "timeout" in obj:
        req.timeout = _number(obj, "timeout", 0.0, limits.max_timeout, lo_open=True)
    if op == "generate":
        req.inputs, req.single = _prompts(obj, limits.max_prompts)
        req.params = _gen_params(obj, limits)
        req.stream = _bool(obj, "stream")
    elif op == "embed":
        req.inputs, req.single = _texts(obj, "input", limits.max_prompts)
    elif op == "infer":
        if "input" not in obj:
            raise ProtocolError(BAD_REQUEST, "missing 'input'")
        value = obj["input"]
        req.single = not isinstance(value, list)
        req.inputs = [value] if req.single else list(value)
        if not req.inputs or len(req.inputs) > limits.max_prompts:
            raise ProtocolError(BAD_REQUEST, f"'input' must have 1 to {limits.max_prompts} items")
    elif op == "health":
        req.deep = _bool(obj, "deep")
        challenge = obj.get("challenge")
        if challenge is not None and (not isinstance(challenge, str) or not 16 <= len(challenge) <= 128):
            raise ProtocolError(BAD_REQUEST, "'challenge' must be a string of 16 to 128 characters")
        req.challenge = challenge
    return req


def _texts(obj: dict[str, Any], key: str, most: int) -> tuple[list[str], bool]:
    if key not in obj:
        raise ProtocolError(BAD_REQUEST, f"missing {key!r} (a string or a list of strings)")
    value = obj[key]
    single = isinstance(value, str)
    items = [value] if single else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ProtocolError(BAD_REQUEST, f"{key!r} must be a string or a list of strings")
    if not 1 <= len(items) <= most:
        raise ProtocolError(BAD_REQUEST, f"{key!r} has {len(items)} items; send 1 to {most} per request")
    for i, s in enumerate(items):
        if not s:
            raise ProtocolError(BAD_REQUEST, f"{key!r} item {i} is empty")
    return list(items), single


def _prompts(obj: dict[str, Any], most: int) -> tuple[list[Any], bool]:
    """`prompt`: a string, a list of token ids, or a list of either (strings or id lists)."""
    value = obj.get("prompt")
    if isinstance(value, list) and value and all(_token_id(t) for t in value):
        return [list(value)], True
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        for i, ids in enumerate(value):
            if not ids or not all(_token_id(t) for t in ids):
                raise ProtocolError(BAD_REQUEST, f"'prompt' item {i} must be a non-empty list of token ids")
        if len(value) > most:
            raise ProtocolError(BAD_REQUEST, f"'prompt' has {len(value)} items; send 1 to {most} per request")
        return [list(ids) for ids in value], False
    try:
        return _texts(obj, "prompt", most)
    except ProtocolError as e:
        e.message = e.message.replace("a list of strings", "a list of strings, token ids or lists of token ids")
        raise


def _token_id(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31


def _gen_params(obj: dict[str, Any], limits: Limits) -> GenParams:
    stop = obj.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise ProtocolError(BAD_REQUEST, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them")
    seed = obj.get("seed")
    if seed is not None:
        seed = _int(obj, "seed", 0, 2**63 - 1)
    prompt_lps = None if obj.get("prompt_logprobs") is None else _int(obj, "prompt_logprobs", 0, MAX_LOGPROBS)
    least = 0 if prompt_lps is not None else 1  # scoring a prompt may generate nothing
    max_new = _int(obj, "max_new_tokens", least, limits.max_new_tokens, limits.default_max_new_tokens)
    if obj.get("min_tokens") and obj.get("response_format") not in (None, {"type": "text"}):
        raise ProtocolError(BAD_REQUEST, "'min_tokens' cannot go with a 'response_format' (or a forced "
                            "'tool_choice'): the grammar decides where the answer ends")  # fmt: skip
    return GenParams(
        max_new_tokens=max_new,
        temperature=_number(obj, "temperature", 0.0, 100.0, default=0.0),
        top_p=_number(obj, "top_p", 0.0, 1.0, default=1.0, lo_open=True),
        top_k=_int(obj, "top_k", 0, 1 << 20, 0),
        seed=seed,
        stop=tuple(stops),
        presence_penalty=_number(obj, "presence_penalty", -2.0, 2.0),
        frequency_penalty=_number(obj, "frequency_penalty", -2.0, 2.0),
        repetition_penalty=_number(obj, "repetition_penalty", 0.0, 10.0, default=1.0, lo_open=True),
        logit_bias=_structured(genfields.logit_bias, obj.get("logit_bias")),
        min_tokens=_int(obj, "min_tokens", 0, max_new, 0),
        ignore_eos=_bool(obj, "ignore_eos"),
        logprobs=None if obj.get("logprobs") is None else _int(obj, "logprobs", 0, MAX_LOGPROBS),
        prompt_logprobs=prompt_lps,
        response_format=_structured(genfields.response_format, obj.get("response_format")),
    )


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, default: int = 0) -> int:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(BAD_REQUEST, f"{key!r} must be an integer")
    if not lo <= v <= hi:
        raise ProtocolError(BAD_REQUEST, f"{key!r} is {v}; allowed {lo} to {hi}")
    return v


def _number(obj: dict[str, Any], key: str, lo: float, hi: float, default: float = 0.0, lo_open: bool = False) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(BAD_REQUEST, f"{key!r} must be a number")
    if v > hi or v < lo or (lo_open and v == lo):
        raise ProtocolError(BAD_REQUEST, f"{key!r} is {v}; allowed {'above' if lo_open else 'from'} {lo:g} to {hi:g}")
    return float(v)


def _bool(obj: dict[str, Any], key: str) -> bool:
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise ProtocolError(BAD_REQUEST, f"{key!r} must be true or false")
    return v


_PLAIN = GenParams()


def _structured(parse: Any, value: Any) -> Any:
    """A field with a structure of its own (`wire/genfields.py`), its ValueError a bad request."""
    try:
        return parse(value)
    except ValueError as e:
        raise ProtocolError(BAD_REQUEST, str(e)) from None


def _wire(key: str, value: Any) -> Any:
    """A GenParams field as its NDJSON value again."""
    if key == "logit_bias":
        return {str(t): b for t, b in value}
    return json.loads(value) if key == "response_format" else value


def request_line(req: Request, rid: Any, timeout: float | None = None) -> bytes:
    """A parsed request as a line again (the router forwarding it to a replica under its own id).

    Inputs always go as a list, so the answer is always the plural form (`results`,
    `embeddings`); the token is never forwarded (the link is authenticated on its own).
    """
    obj: dict[str, Any] = {"id": rid, "op": req.op}
    if timeout is not None:
        obj["timeout"] = timeout
    if req.op == "generate":
        p = req.params
        obj.update(prompt=list(req.inputs), max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                   top_p=p.top_p, top_k=p.top_k, stop=list(p.stop), stream=req.stream)  # fmt: skip
        if p.seed is not None:
            obj["seed"] = p.seed
        for key in EXTRA_FIELDS:
            if getattr(p, key) != getattr(_PLAIN, key):
                obj[key] = _wire(key, getattr(p, key))
    elif req.op in ("embed", "infer"):
        obj["input"] = list(req.inputs)
    elif req.op == "health":
        obj["deep"] = req.deep
    return encode(obj)


def encode(obj: dict[str, Any]) -> bytes:
    """One line on the wire; never raises for a str the encoder cannot write (it is escaped)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode() + b"\n"


def proof(nonce: str, challenge: str) -> str:
    """What a front answers to a `health` challenge: only one that knows the job's nonce can."""
    return hmac.new(nonce.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def ok(rid: Any, **fields: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, **fields}


def error(rid: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}
