"""OpenAI tool calling on /v1/chat/completions: the request's `tools` and `tool_choice`, the
conversation's tool turns, and the model's text read back as `tool_calls`.

The model's chat template renders the tools (`TextTools.chat`). `tool_choice` `required` or a
named function is forced through the grammar (`engine/grammar.py`): the answer is then a JSON
array of calls, or one call, `{"name": ..., "arguments": {...}}`, that always parses. With
`auto` the model chooses: a call is the whole answer as such JSON, or Hermes-style
`<tool_call>{...}</tool_call>` blocks (Qwen, Hermes and many fine-tunes write these), and only
to a function the request offered; anything else is content. `none` renders the tools and
never reads calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from dslaunch.wire import protocol as P
from dslaunch.wire.protocol import ProtocolError

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPEN = "<tool_call>"


def _bad(message: str, param: str) -> ProtocolError:
    e = ProtocolError(P.BAD_REQUEST, message)
    e.param = param  # type: ignore[attr-defined]
    return e


@dataclass
class ToolPlan:
    """What the request offered and asked: the tools (as the template takes them), the choice
    (`none`, `auto`, `required` or `named`), and the named function."""

    tools: list[dict[str, Any]]
    choice: str
    name: str | None = None
    parallel: bool = True  # parallel_tool_calls: false allows one call at most

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def forced_format(self) -> dict[str, Any] | None:
        """The response_format that forces a call (`required`, `named`), or None."""
        defs: dict[str, Any] = {}

        def call(i: int, tool: dict[str, Any]) -> dict[str, Any]:
            fn = tool["function"]
            params = _hoisted(fn.get("parameters") or {"type": "object", "properties": {}}, f"t{i}_", defs)
            return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"enum": [fn["name"]]}, "arguments": params}}  # fmt: skip

        if self.choice == "named":
            schema = call(0, next(t for t in self.tools if t["function"]["name"] == self.name))
        elif self.choice == "required":
            anyof = [call(i, t) for i, t in enumerate(self.tools)]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": anyof}}
            if not self.parallel:
                schema["maxItems"] = 1
        else:
            return None
        if defs:
            schema["$defs"] = defs
        return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": schema}}

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The answer as OpenAI `tool_calls`, or None when it is content."""
        if self.choice == "none":
            return None
        blocks = _BLOCK.findall(text)
        found: Any = None
        if blocks and not _BLOCK.sub("", text).strip():
            found = [_json(b) for b in blocks]
        elif text.strip()[:1] in ("{", "["):
            found = _json(text)
        items = found if isinstance(found, list) else [found]
        if not items or not all(isinstance(c, dict) and c.get("name") in self.names for c in items):
            return None
        args = [_arguments(c) for c in items]
        if any(a is None for a in args):
            return None
        pairs = list(zip(items, args, strict=True))[: None if self.parallel else 1]
        return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(a)}} for c, a in pairs]  # fmt: skip

    def may_be_call(self, text: str) -> bool:
        """Whether streamed text so far could still become a call (so is held back, not sent)."""
        head = text.lstrip()
        return self.choice != "none" and (head[:1] in ("", "{", "[") or head.startswith(OPEN) or OPEN.startswith(head))


def _arguments(call: dict[str, Any]) -> dict[str, Any] | None:
    """A call's arguments as an object: `arguments` (or Llama 3's `parameters`), an object or a
    JSON string of one; None when they are something else (then the text is content)."""
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        args = _json(args)
    return args if isinstance(args, dict) else None


def _hoisted(params: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A tool's parameters schema with its `$defs` (or `definitions`) moved into `defs` under
    `prefix`, and its references rewritten: nested under the call's `arguments`, `#/$defs/...`
    would no longer resolve."""
    params = dict(params)
    mine = {}
    for key in ("$defs", "definitions"):
        for name, schema in (params.pop(key, None) or {}).items():
            mine[prefix + name] = schema

    def fix(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
                node = {**node, "$ref": "#/$defs/" + prefix + ref.split("/", 2)[2]}
            return {k: fix(v) for k, v in node.items()}
        return [fix(v) for v in node] if isinstance(node, list) else node

    defs.update({name: fix(schema) for name, schema in mine.items()})
    return fix(params)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def plan(body: dict[str, Any]) -> ToolPlan | None:
    """`tools` and `tool_choice` checked, or None when the request has no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise _bad("'tools' must be a list of {'type': 'function', 'function': {...}}", "tools")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"'tools' item {i} must be {{'type': 'function', 'function': {{'name': ...}}}}", "tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad(f"'tools' item {i}: 'parameters' must be a JSON schema object", "tools")
    parallel = body.get("parallel_tool_calls")
    out = ToolPlan(
        [{"type": "function", "function": t["function"]} for t in tools], "auto", None, parallel is not False
    )
    if choice in (None, "auto", "none", "required"):
        out.choice = choice or "auto"
        return out
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name not in out.names:
        raise _bad("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}} naming one of 'tools'", "tool_choice")  # fmt: skip
    out.choice, out.name = "named", name
    return out


def messages(value: Any) -> list[dict[str, Any]]:
    """A chat conversation checked: text content (or its text parts), an assistant turn's
    `tool_calls`, a `tool` turn's `tool_call_id`; as the chat template takes them."""
    if not isinstance(value, list) or not value:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"'messages' item {i} needs a 'role'", "messages")
        extra = sorted(set(m) - {"role", "content", "name", "tool_calls", "tool_call_id"})
        if extra:
            raise _bad(f"'messages' item {i}: {extra[0]!r} is not supported", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):  # fmt: skip
                raise _bad(f"'messages' item {i}: only text content parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        calls = m.get("tool_calls")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)):
            raise _bad(f"'messages' item {i}: 'tool_calls' belong to an assistant turn, as a list", "messages")
        if not isinstance(content, str) and not (content is None and calls):
            raise _bad(f"'messages' item {i} needs text 'content'", "messages")
        turn: dict[str, Any] = {"role": m["role"], "content": content or ""}
        if calls:
            turn["tool_calls"] = [_call_in(c, i) for c in calls]
        if m.get("tool_call_id") is not None:
            turn["tool_call_id"] = str(m["tool_call_id"])
        out.append(turn)
    return out


def _call_in(call: Any, i: int) -> dict[str, Any]:
    """An earlier call in the history, its arguments as an object (what templates render)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad(f"'messages' item {i}: each of 'tool_calls' needs a 'function' with a 'name'", "messages")
    args = fn.get("arguments")
    parsed = _json(args) if isinstance(args, str) else args
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": parsed or {}}}
