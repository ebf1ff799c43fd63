"""Turning one row's tokens into safe text chunks, incrementally (rank 0 only).

Decoding a row's whole token list on every new token is O(n²) over a row. `TextStream` decodes a
small window instead (the prefix-offset method of TGI and vLLM, the same idea as `tokenizers`'
`DecodeStream`, but with any tokenizer's `decode` and with a `finish` that flushes what is held),
so each token costs O(1), and it keeps only the text not yet released to search for stop strings.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"
# A window that still ends in a replacement character after this many tokens holds a real one
# (random weights do emit invalid byte sequences): release it rather than let the window grow.
MAX_WINDOW = 16


class TextStream:
    """Text of one generated row, released in chunks that never run past a stop string.

    New tokens are decoded in a window that starts at the last token already turned into text, so
    byte-level tokens that form one character are released together. The text is cut at the
    first stop string. What is released is held back while its tail could still grow into a stop
    string or ends in half a UTF-8 character, so the chunks always concatenate to the final text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stops = stops
        self.tokens: list[int] = []
        self.stopped = False
        self._released: list[str] = []
        self._tail = ""  # decoded, not released: held back for a stop string or half a character
        self._prefix = 0  # tokens[_prefix:_read] were decoded last time: the context of the window
        self._read = 0
        self._prefix_text = ""

    @property
    def text(self) -> str:
        """The text so far (the final text once `finish` was called)."""
        return "".join(self._released) + self._tail

    def push(self, token: int) -> str:
        """Add a token; return the newly releasable text ('' when held back or stopped)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        return self._add(self._step(final=False))

    def finish(self) -> str:
        """The rest of the text, at the end of the row."""
        if not self.stopped:
            self._add(self._step(final=True))
        return self._release(len(self._tail))

    def _step(self, final: bool) -> str:
        """Text that the tokens since the last call add (prefix-offset incremental decode)."""
        if self._read == len(self.tokens):
            return ""
        new = self.decode(self.tokens[self._prefix :])
        complete = not new.endswith(REPLACEMENT) or len(self.tokens) - self._prefix > MAX_WINDOW
        if len(new) <= len(self._prefix_text) or not (complete or final):
            return ""
        added = new[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self._prefix_text = self.decode(self.tokens[self._prefix : self._read])
        return added

    def _add(self, text: str) -> str:
        if not text:
            return ""
        self._tail += text
        cut = self._first_stop(self._tail)
        if cut is not None:
            self._tail = self._tail[:cut]
            self.stopped = True
            return self._release(len(self._tail))
        return self._release(len(self._tail) - self._hold(self._tail))

    def _release(self, end: int) -> str:
        if end <= 0:
            return ""
        chunk, self._tail = self._tail[:end], self._tail[end:]
        self._released.append(chunk)
        return chunk

    def _first_stop(self, text: str) -> int | None:
        # released text never ends in a stop's proper prefix, so a match lies in the unreleased tail
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
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
