"""Tool calling's request checks and its reading of model text, on their own: what a call is
(the whole answer as JSON, or Hermes-style blocks, to an offered function only), what a forced
choice's grammar allows, and what a stream holds back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dslaunch.serving import tools_api
from dslaunch.wire.protocol import ProtocolError

jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "now"}}


def test_auto_reads_whole_json_calls_and_hermes_blocks_to_offered_functions_only() -> None:
    plan = tools_api.plan({"tools": [WEATHER, CLOCK]})
    assert plan is not None and plan.choice == "auto" and plan.forced_format() is None
    one = plan.calls('{"name": "get_weather", "arguments": {"city": "Rome"}}')
    assert one and one[0]["type"] == "function" and one[0]["id"].startswith("call_")
    assert one[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    blocks = plan.calls('<tool_call>{"name": "now"}</tool_call>\n<tool_call>{"name": "get_weather", '
                        '"arguments": {"city": "Paris"}}</tool_call>')  # fmt: skip
    assert [c["function"]["name"] for c in blocks or []] == ["now", "get_weather"]
    for content in ('{"name": "delete_everything"}', "It is sunny.", '{"city": "Rome"}', "<tool_call>{oops",
                    'Sure: <tool_call>{"name": "now"}</tool_call>', "[1, 2]", "{"):  # fmt: skip
        assert plan.calls(content) is None, content
    assert tools_api.plan({"tools": [CLOCK], "tool_choice": "none"}).calls('{"name": "now"}') is None


def test_forced_choices_are_schemas_whose_answers_parse_as_calls() -> None:
    named = tools_api.plan(
        {"tools": [WEATHER, CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    )
    schema = named.forced_format()["json_schema"]["schema"]
    answer = {"name": "get_weather", "arguments": {"city": "Paris"}}
    jsonschema.validate(answer, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "now", "arguments": {}}, schema)
    assert named.calls(json.dumps(answer))[0]["function"]["name"] == "get_weather"
    required = tools_api.plan({"tools": [WEATHER, CLOCK], "tool_choice": "required"})
    both = [answer, {"name": "now", "arguments": {}}]
    jsonschema.validate(both, required.forced_format()["json_schema"]["schema"])
    assert [c["function"]["name"] for c in required.calls(json.dumps(both))] == ["get_weather", "now"]


def test_arguments_are_an_object_however_the_model_wrote_them() -> None:
    plan = tools_api.plan({"tools": [WEATHER]})
    as_text = plan.calls('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}')
    assert json.loads(as_text[0]["function"]["arguments"]) == {"city": "Rome"}, "a JSON string, not encoded twice"
    llama = plan.calls('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert json.loads(llama[0]["function"]["arguments"]) == {"city": "Paris"}, "Llama 3 writes 'parameters'"
    assert plan.calls('{"name": "get_weather", "arguments": [1]}') is None
    assert plan.calls('{"name": "get_weather", "arguments": "not json"}') is None


def test_a_forced_call_keeps_the_references_of_its_parameters() -> None:
    """Parameters as pydantic writes a nested model: `$defs` and `$ref`, which must still resolve
    once the call wraps them."""
    params = {"type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}}, "required": ["where"],
              "$defs": {"Place": {"type": "object", "properties": {"city": {"enum": ["Paris"]}},
                                  "required": ["city"]}}}  # fmt: skip
    tool = {"type": "function", "function": {"name": "go", "parameters": params}}
    for choice in ("required", {"type": "function", "function": {"name": "go"}}):
        plan = tools_api.plan({"tools": [CLOCK, tool], "tool_choice": choice})
        schema = plan.forced_format()["json_schema"]["schema"]
        call = {"name": "go", "arguments": {"where": {"city": "Paris"}}}
        jsonschema.validate([call] if choice == "required" else call, schema)
        with pytest.raises(jsonschema.ValidationError):
            bad = {"name": "go", "arguments": {"where": {"city": "Rome"}}}
            jsonschema.validate([bad] if choice == "required" else bad, schema)


def test_a_stream_holds_back_only_what_may_still_be_a_call() -> None:
    plan = tools_api.plan({"tools": [CLOCK]})
    assert all(plan.may_be_call(t) for t in ("", " ", "{", ' {"na', "<tool", "<tool_call>{", "["))
    assert not any(plan.may_be_call(t) for t in ("Hello", " The", "<b>", "tools"))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": "f"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools"),
        ({"tools": [CLOCK], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [CLOCK], "tool_choice": {"type": "function", "function": "now"}}, "tool_choice"),
        ({"tools": [CLOCK], "tool_choice": {"type": "function", "function": None}}, "tool_choice"),
    ],
)
def test_bad_tools_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(ProtocolError) as e:
        tools_api.plan(body)
    assert e.value.code == "bad_request" and e.value.param == param  # type: ignore[attr-defined]


def test_tool_turns_in_the_history_are_kept_for_the_template() -> None:
    turns = tools_api.messages(
        [
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    )
    assert turns[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    for bad in (
        [{"role": "user", "content": "x", "tool_calls": []}],
        [{"role": "assistant", "content": None}],
        [{"role": "assistant", "tool_calls": [{"function": {}}]}],
        [{"role": "user", "content": 3}],
    ):
        with pytest.raises(ProtocolError):
            tools_api.messages(bad)
