"""Boxes of tensors read from a safetensors file with `pread`, into memory the rank owns.

safetensors' own reader maps the file: every page a slice touches is then resident in the rank
(its RSS counts the mapped checkpoint), and a slice across the columns of a row-major matrix
touches every page of it. Here the header is parsed (8 bytes of length, a JSON table of dtype,
shape and byte range per tensor) and each box is read as its contiguous runs: one run for a
block of rows, one per row for a block of columns, with runs closer than `GAP` bytes merged into
one read, since the pages between them would be read anyway.

A box of many runs that is not in the page cache (a read with RWF_NOWAIT says so) has its runs
all announced to the kernel (`posix_fadvise(WILLNEED)`) before they are read in order: from a
cold page cache, a quarter of each row-parallel matrix of a 2.6 GB Llama took 6.4 s read one run
after another, 2.4 s so, and only the runs' pages are read. (Announcing pages already cached is
not free: four ranks doing it at once doubled their loading time.)
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

GAP = 4 << 10  # runs closer than a page are read as one (the page between them comes in anyway)
CHUNK = 64 << 20  # the most one read asks for
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
          "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip


class SliceReader:
    """One safetensors file, open for reading boxes of its tensors."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        header = json.loads(os.pread(self.fd, n, 8))
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.tensors: dict[str, dict[str, Any]] = header
        self.bytes_read = 0

    def close(self) -> None:
        os.close(self.fd)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def itemsize(self, key: str) -> int:
        return self.torch_dtype(key).itemsize

    def torch_dtype(self, key: str) -> Any:
        import torch

        name = DTYPES.get(self.tensors[key]["dtype"])
        if name is None:
            raise ValueError(f"{key}: safetensors dtype {self.tensors[key]['dtype']} is not read here")
        return getattr(torch, name)

    def read(self, key: str, box: tuple[slice, ...] | None = None) -> Any:
        """The tensor `key`, or its box (one slice per dimension, steps of 1), as a new tensor."""
        import torch

        shape = self.shape(key)
        box = box or tuple(slice(0, n) for n in shape)
        out = torch.empty(tuple(s.stop - s.start for s in box), dtype=self.torch_dtype(key))
        self.read_into(key, box, out)
        return out

    def read_into(self, key: str, box: tuple[slice, ...], out: Any) -> None:
        """Read the box straight into `out`: a contiguous tensor of the box's shape and the
        checkpoint's dtype (a shard's own memory: no copy but the kernel's)."""
        shape, item = self.shape(key), self.itemsize(key)
        if out.numel() == 0:
            return
        import torch

        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        start = self.base + self.tensors[key]["data_offsets"][0]
        reads, at = [], 0
        for first, length, parts in _merged(runs(shape, box, item), GAP):
            reads.append((start + first, length, at, parts))
            at += length if parts is None else sum(n for _, n in parts)
        if at != len(view):
            raise ValueError(f"{key}: {len(view)} bytes to fill, and the box holds {at}")
        if len(reads) > 8 and not self._cached(reads[len(reads) // 2][0]):  # a row at a time from the
            for offset, length, _at, _parts in reads:  # disk: ask for them all, then read them in order
                os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        for r in reads:
            self._one(view, *r)

    def _cached(self, offset: int) -> bool:
        """Whether the page at `offset` is in the page cache (a read that may not wait for the disk)."""
        try:
            return os.preadv(self.fd, [bytearray(1)], offset, os.RWF_NOWAIT) == 1
        except (BlockingIOError, OSError, AttributeError):  # not cached, or no RWF_NOWAIT here
            return False

    def _one(self, view: memoryview, offset: int, length: int, at: int, parts: list[tuple[int, int]] | None) -> None:
        """One read: straight into place, or a span whose runs are copied out of it."""
        if parts is None:
            self._pread_into(view[at : at + length], offset)
            return
        span = bytearray(length)
        self._pread_into(memoryview(span), offset)
        first = parts[0][0]
        for run_at, n in parts:
            view[at : at + n] = span[run_at - first : run_at - first + n]
            at += n

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done : done + CHUNK]], offset + done)
            if n <= 0:
                raise OSError(f"safetensors file ends early, at byte {offset + done}")
            done += n
        self.bytes_read += len(buf)


def runs(shape: tuple[int, ...], box: tuple[slice, ...], item: int) -> list[tuple[int, int]]:
    """(byte offset, byte length) of each contiguous run of the box in the row-major tensor."""
    strides = [math.prod(shape[d + 1 :]) * item for d in range(len(shape))]
    k = len(shape)  # the dims from k on are whole in the box, so they are contiguous
    while k > 0 and box[k - 1].start == 0 and box[k - 1].stop == shape[k - 1]:
        k -= 1
    if k == 0:
        return [(0, math.prod(shape) * item)] if shape else [(0, item)]
    length = (box[k - 1].stop - box[k - 1].start) * strides[k - 1]
    out: list[tuple[int, int]] = []

    def walk(d: int, offset: int) -> None:
        if d == k - 1:
            out.append((offset + box[d].start * strides[d], length))
            return
        for i in range(box[d].start, box[d].stop):
            walk(d + 1, offset + i * strides[d])

    walk(0, 0)
    return out


def _merged(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int, list[tuple[int, int]] | None]]:
    """Runs closer than `gap` as one read: (first byte, length, the runs inside or None for one)."""
    out: list[tuple[int, int, list[tuple[int, int]] | None]] = []
    group: list[tuple[int, int]] = []
    for run in spans:
        if group and run[0] - (group[-1][0] + group[-1][1]) >= gap:
            out.append(_group(group))
            group = []
        group.append(run)
    if group:
        out.append(_group(group))
    return out


def _group(group: list[tuple[int, int]]) -> tuple[int, int, list[tuple[int, int]] | None]:
    first = group[0][0]
    if len(group) == 1:
        return first, group[0][1], None
    return first, group[-1][0] + group[-1][1] - first, group
