"""Splitting the NDJSON byte stream into lines, with a bound on each line's length."""

from __future__ import annotations


class LineReader:
    """Split a byte stream into lines, refusing (once per line) any longer than `limit` bytes.

    asyncio's readline drops its buffer on an over-long line and then parses the rest of that line
    as a new one; this keeps discarding until the newline instead.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.discarding = False
        self.scanned = 0  # bytes of `buf` known to hold no newline: never searched twice

    def feed(self, data: bytes) -> list[bytes | None]:
        """Complete lines in order; None stands for a line that was too long."""
        out: list[bytes | None] = []
        self.buf += data
        while True:
            nl = self.buf.find(b"\n", self.scanned)
            if nl < 0:
                self.scanned = len(self.buf)
                if len(self.buf) > self.limit:
                    if not self.discarding:
                        out.append(None)
                    self.discarding = True
                    self.buf.clear()
                    self.scanned = 0
                return out
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            self.scanned = 0
            if self.discarding:
                self.discarding = False
            elif len(line) > self.limit:
                out.append(None)
            elif line.strip():
                out.append(line)
