"""The generate fields with a structure of their own, as the NDJSON protocol checks them:
`logit_bias`, and OpenAI's `response_format`, checked for shape only (the schema is the grammar
library's to judge, on rank 0: `engine/grammar.py`) and kept as JSON text, the schema's key
order kept (it is the order of the answer's keys), so that equal formats share one compiled
grammar. Errors are ValueErrors naming the field."""

from __future__ import annotations

import json
from typing import Any

MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_SCHEMA_BYTES = 64 * 1024  # a response_format's JSON schema, as JSON
_SHAPES = ("'response_format' must be {'type': 'text'}, {'type': 'json_object'} or "
           "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}")  # fmt: skip


def logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (a string of digits) to a bias from -100 to 100, sorted."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"'logit_bias' must map token ids to numbers (at most {MAX_LOGIT_BIAS})")
    out = []
    for key, bias in value.items():
        if not isinstance(key, str) or not key.isascii() or not key.isdigit() or len(key) > 10:
            raise ValueError(f"'logit_bias' key {key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"'logit_bias' for token {key} must be a number from -100 to 100")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def response_format(value: Any) -> str | None:
    """Text (None), `{"type": "json_object"}`, or `{"type": "json_schema", "json_schema":
    {"name", "schema", "strict", "description"}}` as JSON text; ValueError naming the field."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return json.dumps(value, sort_keys=True)
    spec = value.get("json_schema") if kind == "json_schema" and set(value) == {"type", "json_schema"} else None
    known = {"name", "schema", "strict", "description"}
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict) or set(spec) - known:
        raise ValueError(_SHAPES)
    out = json.dumps({"type": kind, "json_schema": {"schema": spec["schema"]}})
    if len(out) > MAX_SCHEMA_BYTES:
        raise ValueError(f"'response_format' schema is over {MAX_SCHEMA_BYTES} bytes")
    return out
