"""Per-row decoding on rank 0: choosing the next token and turning tokens into safe text chunks.

Only rank 0 runs this; the tokens it picks are broadcast so every rank feeds the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dslaunch.wire.protocol import GenParams

REPLACEMENT = "\ufffd"


class TextStream:
    """Text of one generated row, released in chunks that never run past a stop string.

    The text decoded so far is cut at the first stop string. What is released is held back while
    its tail could still grow into a stop string or ends in half a UTF-8 character, so the chunks
    always concatenate to the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stops = stops
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly releasable text ('' when held back or stopped)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        cut = self._first_stop(self.text)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._hold(self.text))

    def finish(self) -> str:
        """The rest of the text, at the end of the row."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.sent:
            return ""
        chunk = self.text[self.sent : end]
        self.sent = end
        return chunk

    def _first_stop(self, text: str) -> int | None:
        # released text never ends in a stop's prefix, so a match can only start after it
        hits = [i for s in self.stops if (i := text.find(s, self.sent)) >= 0]
        return min(hits) if hits else None

    def _hold(self, text: str) -> int:
        """How many trailing characters to hold back."""
        hold = 0
        while hold < len(text) and text[len(text) - 1 - hold] == REPLACEMENT:
            hold += 1
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold


def make_generator(params: GenParams) -> Any:
    """A CPU generator for sampled rows: seeded when asked, fresh randomness otherwise."""
    import torch

    g = torch.Generator(device="cpu")
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def pick(logits: Any, params: GenParams, generator: Any | None) -> int:
    """The next token for one row: argmax when greedy, else temperature / top-k / top-p sampling."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.float().cpu() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # always keeps the top token
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=generator).item())
