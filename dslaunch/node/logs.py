"""Reading rank logs on this node: bounded tails, and `follow` for `dslaunch logs -f`."""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dslaunch.wire.nodedir import NodeDir


def tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file (bounded read: logs can be large)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:] if lines > 0 else []


def op_logs(args: dict[str, Any]) -> dict[str, Any]:
    nd = NodeDir.at(args["node_dir"])
    if args.get("agent"):  # the process the unit's agent runs (the router's own log, say)
        return {"agent": tail(nd.agent_log, int(args.get("lines", 100)))}
    files = nd.rank_logs(args.get("ranks"))
    return {"logs": {k: tail(p, int(args.get("lines", 100))) for k, p in files.items()}}


def follow(args: dict[str, Any]) -> Iterator[str]:
    """Yield `rank<TAB>line` for new lines of every rank log until stdin closes (client gone)."""
    nd = NodeDir.at(args["node_dir"])
    offsets: dict[str, int] = {}
    partial: dict[str, bytes] = {}
    first = True
    while True:
        for rank, path in nd.rank_logs(args.get("ranks")).items():
            try:
                with open(path, "rb") as f:
                    if rank not in offsets:
                        f.seek(0, os.SEEK_END)
                        end = f.tell()
                        # on the first pass start near the end (like tail -f), later from 0
                        offsets[rank] = max(0, end - 8192) if first else 0
                    f.seek(offsets[rank])
                    data = f.read(1 << 20)
                    offsets[rank] += len(data)
            except OSError:
                continue
            buf = partial.get(rank, b"") + data
            *lines, partial[rank] = buf.split(b"\n")
            for line in lines:
                yield f"{rank}\t{line.decode('utf-8', 'replace')}"
        first = False
        ready, _, _ = select.select([sys.stdin], [], [], 0.25)
        if ready and not sys.stdin.buffer.read1(4096):
            return
