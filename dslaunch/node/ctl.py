"""Node-side operations, run on every node as `python -m dslaunch.node.ctl OP` (JSON in, JSON out).

Standard library only, so it starts in milliseconds: the launch host polls it while waiting for a
job. Each op gets its arguments as one JSON object on stdin and prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

from dslaunch.errors import NodeOpError
from dslaunch.node.agent import op_drain, op_restart, op_start, op_stop
from dslaunch.node.logs import follow, op_logs
from dslaunch.node.modelfiles import op_model_commit, op_model_hashes, op_model_prepare
from dslaunch.node.probe import op_address, op_probe, op_rdzv_read, op_rdzv_write, op_remove
from dslaunch.node.relay import op_model_send, receive
from dslaunch.node.report import op_status, watch

OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "probe": op_probe,
    "address": op_address,
    "rdzv-write": op_rdzv_write,
    "rdzv-read": op_rdzv_read,
    "remove": op_remove,
    "start": op_start,
    "status": op_status,
    "stop": op_stop,
    "restart": op_restart,
    "drain": op_drain,
    "logs": op_logs,
    "model-hashes": op_model_hashes,
    "model-prepare": op_model_prepare,
    "model-commit": op_model_commit,
    "model-send": op_model_send,
}
# ops that answer with lines as they go, until done or until stdin closes
STREAMS: dict[str, Callable[[dict[str, Any]], Iterator[str]]] = {
    "follow": follow,
    "model-receive": receive,
    "watch": watch,
}


def main(argv: list[str] | None = None) -> int:
    """Run one op: its JSON answer on stdout; a refusal is `{"error": ...}` with exit status 3."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or (argv[0] not in OPS and argv[0] not in STREAMS):
        print(f"usage: python -m dslaunch.node.ctl {{{','.join([*OPS, *STREAMS])}}}", file=sys.stderr)
        return 2
    line = sys.stdin.readline()
    args = json.loads(line) if line.strip() else {}
    if argv[0] in STREAMS:
        try:
            for out in STREAMS[argv[0]](args):
                sys.stdout.write(out + "\n")
                sys.stdout.flush()
        except (BrokenPipeError, KeyboardInterrupt):
            pass
        return 0
    try:
        out, status = OPS[argv[0]](args), 0
    except NodeOpError as e:
        out, status = {"error": e.message, **e.details}, NodeOpError.EXIT_STATUS
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
