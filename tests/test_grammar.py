"""Structured output on a real engine in this process (the random-weight built-in model, which
left alone writes anything but JSON): every answer to a schema of the corpus parses and
validates against it, greedy or sampled, among rows without a grammar; a schema the grammar
library refuses, or a malformed response_format, is an error naming the field."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.wire.protocol import ProtocolError
from tests.inproc import Served, reference, serve_tiny

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

# bounded schemas: the grammar forces every answer to end within the token budget
CORPUS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}, "tag": {"enum": ["p", "q"]}},
     "required": ["point", "tag"], "additionalProperties": False},
    {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_tiny(tmp_path_factory, max_batch_size=8, max_new_tokens=200, batch_wait_ms=200.0)


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_every_answer_parses_and_validates_against_its_schema(served: Served) -> None:
    asks = [{"response_format": _schema(s)} for s in CORPUS]
    asks += [{"response_format": _schema(s), "temperature": 1.0, "seed": 7 + i} for i, s in enumerate(CORPUS)]
    asks += [{}]  # a row without a grammar in the same batch
    results: dict[int, Any] = {}

    def one(i: int) -> None:
        req = {"id": i, "op": "generate", "prompt": "Answer in JSON:", "max_new_tokens": 120, **asks[i]}
        results[i] = served.ask(req)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i in range(len(asks) - 1):
        res = results[i]
        assert res["finish_reason"] in ("stop", "eos"), res
        jsonschema.validate(json.loads(res["text"]), CORPUS[i % len(CORPUS)])
    plain = results[len(asks) - 1]["text"]
    assert plain == reference(Path(served.spec.model))("Answer in JSON:", 120), "a grammar elsewhere changes nothing"
    with pytest.raises(ValueError):
        json.loads(plain)  # the model alone does not write JSON: the grammar did
    assert served.alive


def test_json_object_starts_an_object_and_parses_when_it_ends(served: Served) -> None:
    res = served.ask({"id": 1, "op": "generate", "prompt": "{", "max_new_tokens": 150,
                      "response_format": {"type": "json_object"}})[0]  # fmt: skip
    assert res["text"].startswith("{")
    if res["finish_reason"] != "length":  # an unbounded object may outlast the budget
        assert isinstance(json.loads(res["text"]), dict)


def test_logprobs_under_a_grammar_are_finite_and_min_tokens_is_refused(served: Served) -> None:
    res = served.ask({"id": 1, "op": "generate", "prompt": "{", "max_new_tokens": 20, "logprobs": 5,
                      "response_format": _schema(CORPUS[0])})[0]  # fmt: skip
    alts = [a["logprob"] for top in res["logprobs"]["top_logprobs"] for a in top]
    assert all(-9999.0 <= v <= 0 for v in alts + res["logprobs"]["token_logprobs"]), "forbidden tokens are -9999"
    assert json.dumps(res, allow_nan=False)  # no -Infinity for a JSON reader to choke on
    with pytest.raises(ProtocolError, match="'min_tokens' cannot go with a 'response_format'"):
        served.ask(
            {"id": 2, "op": "generate", "prompt": "x", "min_tokens": 5, "response_format": {"type": "json_object"}}
        )
    assert served.alive


@pytest.mark.parametrize(
    ("fmt", "words"),
    [
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
            "minimum greater than maximum",
        ),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "refused"),
        ({"type": "json_schema", "json_schema": {"schema": "not an object"}}, "must be"),
        ({"type": "json_schema"}, "must be"),
        ({"type": "yaml"}, "must be"),
        ("json", "must be"),
    ],
)
def test_a_schema_or_format_it_cannot_honour_is_an_error_naming_the_field(served: Served, fmt: Any, words: str) -> None:
    with pytest.raises(ProtocolError) as e:
        served.ask({"id": 1, "op": "generate", "prompt": "x", "response_format": fmt})
    assert e.value.code == "bad_request" and "'response_format'" in e.value.message and words in e.value.message
    assert served.alive
