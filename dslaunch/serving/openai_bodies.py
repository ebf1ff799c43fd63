"""The OpenAI answer bodies of one completion request: the result, and a stream's chunks.

On a stream each text chunk carries the logprobs of the tokens it completes (when asked), as
vLLM and OpenAI send them; the closing chunk has those of tokens whose text never came out (a
stop string's). A choice that may turn into a tool call keeps its logprobs for the closing chunk.
"""

from __future__ import annotations

import time
from typing import Any

from dslaunch.engine.logprobs import doc_tail
from dslaunch.serving import logprob_shapes
from dslaunch.serving.openai_api import FINISH, Ask


class Shaper:
    """Result and stream-chunk bodies of one completion request, in the OpenAI shapes."""

    def __init__(self, ask: Ask) -> None:
        self.ask = ask
        self.chat = ask.kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + ask.req.id
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.held: dict[int, str] = {}  # streamed text held back while it may be a tool call
        self.content: set[int] = set()  # choices whose streamed text is content, not a call
        self.lps_sent: dict[int, int] = {}  # per choice: tokens whose logprobs a chunk carried
        self.lps_chars: dict[int, int] = {}  # per choice: text_offset of its next token
        self.echoing: set[int] = set()  # choices whose echoed prompt waits for the engine's scores

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.ask.model}

    def usage(self, results: list[dict[str, Any]]) -> dict[str, int]:
        """Each prompt counted once, whatever its samples (`n`); every sample's tokens."""
        prompt = sum(int(r.get("prompt_tokens", 0)) for r in results[:: self.ask.n])
        done = sum(int(r.get("tokens", 0)) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def result(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for i, r in enumerate(results):
            finish = FINISH.get(r.get("finish_reason", ""), "stop")
            calls = self.ask.tools.calls(r["text"]) if self.ask.tools else None
            if calls:
                msg: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
                choices.append({"index": i, "message": msg, "logprobs": None, "finish_reason": "tool_calls"})
            elif self.chat:
                msg = {"role": "assistant", "content": r["text"]}
                lp = logprob_shapes.chat(r.get("logprobs"))
                choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": finish})
            elif self.ask.echo:
                prompt = self.ask.req.inputs[i // self.ask.n]
                scored = r.get("prompt_logprobs") or {}
                text = (prompt if isinstance(prompt, str) else scored.get("text", "")) + r["text"]
                asked = self.ask.req.params.logprobs is not None
                lp = logprob_shapes.completion(logprob_shapes.joined(scored, r.get("logprobs"))) if asked else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
            else:
                lp = logprob_shapes.completion(r.get("logprobs"))
                choices.append({"index": i, "text": r["text"], "logprobs": lp, "finish_reason": finish})
        return {**self._head(self.object), "choices": choices, "usage": self.usage(results)}

    def chunk(
        self, index: int, text: str | None, finish: str | None = None, role: bool = False,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        lp = self._shaped(index, logprobs) if logprobs is not None else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
            body = {**self._head("text_completion"), "choices": [choice]}
        if self.ask.include_usage:
            body["usage"] = None
        return body

    def echo_first(self) -> list[dict[str, Any]]:
        """A stream's echoed prompts that go first: all of them, unless the engine scores them
        (logprobs, or the text of token ids): then each waits for its choice's first chunk."""
        self.echoing = set(range(len(self.ask.req.inputs) * self.ask.n)) if self.ask.echo else set()
        if self.ask.req.params.prompt_logprobs is not None:
            return []
        out = [self.echoed(i, self.ask.req.inputs[i // self.ask.n]) for i in sorted(self.echoing)]
        self.echoing.clear()
        return out

    def streamed(self, index: int, text: str, lps: dict[str, Any] | None) -> list[dict[str, Any]]:
        """A chunk event's bodies: its choice's echo first when it waited for the prompt's scores
        (the chunk's logprobs carry them, as `prompt`), then the text."""
        scored = lps.get("prompt") if lps else None
        if scored is not None:
            lps = {k: v for k, v in lps.items() if k != "prompt"} or None  # type: ignore[union-attr]
        out = [self.echoed(index, self.ask.req.inputs[index // self.ask.n], scored)] if index in self.echoing else []
        self.echoing.discard(index)
        return out + self.stream(index, text, lps)

    def closing(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The echoes still waiting (no text came: `max_tokens: 0`), then the closing chunks."""
        out = [self.echoed(i, self.ask.req.inputs[i // self.ask.n], results[i].get("prompt_logprobs"))
               for i in sorted(self.echoing)]  # fmt: skip
        self.echoing.clear()
        return out + self.finals(results)

    def echoed(self, index: int, prompt: Any, scored: dict[str, Any] | None = None) -> dict[str, Any]:
        """An echoed prompt's chunk: its text (a token-id prompt's, as scored), with its logprobs
        when asked; the completion's text offsets start after it, as in the whole answer."""
        text = prompt if isinstance(prompt, str) else (scored or {}).get("text", "")
        body = self.chunk(index, text)
        if scored is not None and self.ask.req.params.logprobs is not None:
            body["choices"][0]["logprobs"] = logprob_shapes.completion(scored)
            self.lps_chars[index] = sum(len(t) for t in scored["tokens"])
        else:
            self.lps_chars[index] = len(text)
        return body

    def _shaped(self, index: int, doc: dict[str, Any]) -> dict[str, Any] | None:
        """A piece of a choice's logprobs in the OpenAI shape, counted as sent."""
        self.lps_sent[index] = self.lps_sent.get(index, 0) + len(doc["tokens"])
        if self.chat:
            return logprob_shapes.chat(doc)
        start = self.lps_chars.get(index, 0)
        self.lps_chars[index] = start + sum(len(t) for t in doc["tokens"])
        return logprob_shapes.completion(doc, start)

    def stream(self, index: int, text: str, logprobs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The chunks to send for streamed text: none while it may still become a tool call."""
        if self.ask.tools is None:
            return [self.chunk(index, text, logprobs=logprobs)]
        if index in self.content:
            return [self.chunk(index, text)]
        held = self.held.pop(index, "") + text
        if self.ask.tools.may_be_call(held):
            self.held[index] = held
            return []
        self.content.add(index)
        return [self.chunk(index, held)]

    def _held_out(self, index: int, finish: str) -> tuple[list[dict[str, Any]], str]:
        """What was held back, at the end: its tool calls as one delta, or its text."""
        held = self.held.pop(index, None)
        calls = self.ask.tools.calls(held) if held is not None and self.ask.tools else None
        if not calls:
            return ([self.chunk(index, held)] if held else []), finish
        delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
        body = {**self._head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}  # fmt: skip
        return [body], "tool_calls"

    def finals(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The closing chunks: one per choice with its finish reason (and the logprobs of its
        tokens that no chunk carried), then usage when asked for."""
        out = []
        for i, r in enumerate(results):
            chunks, finish = self._held_out(i, FINISH.get(r.get("finish_reason", ""), "stop"))
            doc, sent = r.get("logprobs"), self.lps_sent.get(i, 0)
            rest = doc_tail(doc, sent) if doc is not None and (not sent or len(doc["tokens"]) > sent) else None
            out += [*chunks, self.chunk(i, None, finish, logprobs=rest)]
        if self.ask.include_usage:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            out.append({**self._head(obj), "choices": [], "usage": self.usage(results)})
        return out
