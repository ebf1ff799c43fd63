"""Structured output on rank 0: a request's `response_format` compiled to a grammar (xgrammar),
one matcher per row, and the batched token mask applied to the logits before sampling.

xgrammar, not llguidance or outlines-core: on the built-in model's tokenizer it filled a mask in
0.02 ms a token where llguidance took 96 ms, about 1% of a decode step of the ~28M Llama
(`benchmarks/grammar.py`), and it reads a transformers tokenizer as it is. Only rank 0 masks: the
other ranks never see logits, only the tokens it chose.

JSON has fixed separators (`", "` and `": "`, no other whitespace between tokens), so a model
that likes spaces cannot spin in the gaps of an object forever; a row whose grammar is complete
ends with `stop`. Schemas are strict (xgrammar's strict mode): an object takes no property its
schema does not declare, whatever the request's `strict` says.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

from dslaunch.wire.protocol import BAD_REQUEST, ProtocolError

CACHE = 64  # compiled grammars kept, by response_format


class Grammars:
    """The tokenizer's grammar compiler and a small cache of compiled response formats."""

    def __init__(self, tok: Any, vocab_size: int, eos: set[int] | None = None) -> None:
        self.tok, self.vocab_size, self.eos = tok, vocab_size, sorted(eos or ())
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _xgr(self) -> Any:
        import xgrammar

        if self._compiler is None:
            # the engine's end-of-sequence tokens (generation_config's), not only the tokenizer's
            info = xgrammar.TokenizerInfo.from_huggingface(self.tok, vocab_size=self.vocab_size,
                                                           stop_token_ids=self.eos or None)  # fmt: skip
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        return xgrammar

    def compile(self, spec: str) -> Any:
        """A `response_format` (its JSON, `wire/genfields.py`) compiled, or ProtocolError naming
        the field with the grammar library's message. The engine's check compiles it off the loop
        thread; the loop then finds it here (the lock guards the cache only, never a compile)."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
            try:
                self._xgr()
            except ImportError:
                raise ProtocolError(BAD_REQUEST, "'response_format' needs xgrammar on the job's nodes") from None
        fmt = json.loads(spec)
        try:
            # json_object is any JSON object (xgrammar's built-in JSON grammar is any value)
            schema = fmt["json_schema"]["schema"] if fmt["type"] == "json_schema" else {"type": "object"}
            compiled = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except Exception as e:  # the library's own words (less its log prefix): what it refused
            why = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e)).strip()
            raise ProtocolError(BAD_REQUEST, f"'response_format' schema refused: {why}"[:500]) from None
        with self._lock:
            self._cache[spec] = compiled
            if len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: str) -> Any:
        return self._xgr().GrammarMatcher(self.compile(spec))


def mask(logits: Any, matchers: list[Any]) -> Any:
    """The logits with every token each row's grammar does not allow next at -inf (a matcher of
    None: no grammar). A float32 copy: the forward's own logits are never written."""
    at = [i for i, m in enumerate(matchers) if m is not None]
    if not at:
        return logits
    import torch
    import xgrammar

    out = logits.to(torch.float32, copy=True)
    bitmask = xgrammar.allocate_token_bitmask(len(matchers), out.shape[-1])
    for i in at:
        matchers[i].fill_next_token_bitmask(bitmask, i)
    xgrammar.apply_token_bitmask_inplace(out, bitmask.to(out.device), indices=at)
    return out
