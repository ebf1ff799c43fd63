"""Node-to-node model copies, for sync's tree fan-out: a node that holds the model sends it to a
node that lacks it, over the cluster network, so the launch host's uplink is not the limit.

`model-receive` (a streaming op on the receiving node) listens on one port, prints it, takes one
connection that presents the token it was given over SSH, writes each file into its part file,
prints progress, then renames the part files whose hash matches (as `model-commit`). `model-send`
(on the sending node) connects and streams the files with sendfile. Both end with their SSH
channel: nothing outlives the sync.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dslaunch.errors import NodeOpError
from dslaunch.node.modelfiles import op_model_commit
from dslaunch.wire.filehash import PART_SUFFIX

ACCEPT_S = 60.0  # the sender connects within this, or the receiver gives up
PROGRESS_EVERY = 8 << 20
BUF = 1 << 20


def _recv_line(conn: socket.socket, limit: int = 65536) -> bytes:
    out = bytearray()
    while not out.endswith(b"\n"):
        b = conn.recv(1)
        if not b:
            raise NodeOpError("the sending node closed the connection early")
        out += b
        if len(out) > limit:
            raise NodeOpError("a malformed header from the sending node")
    return bytes(out[:-1])


def receive(args: dict[str, Any]) -> Iterator[str]:
    """Lines: {"port"}, then {"got": bytes} now and then, then {"committed", "bad"} or {"error"}."""
    root = Path(args["dir"]).expanduser()
    token = str(args["token"]).encode()
    files: dict[str, str] = args["files"]  # rel -> sha256
    srv = socket.socket(socket.AF_INET6 if ":" in args.get("bind", "") else socket.AF_INET)
    srv.bind((args.get("bind", ""), 0))
    srv.listen(1)
    srv.settimeout(ACCEPT_S)
    yield json.dumps({"port": srv.getsockname()[1]})
    try:
        conn, _peer = srv.accept()
    except TimeoutError:
        yield json.dumps({"error": f"no sending node connected within {ACCEPT_S:g}s"})
        return
    finally:
        srv.close()
    buf = bytearray(BUF)
    try:
        with conn:
            conn.settimeout(ACCEPT_S)
            if not hmac.compare_digest(_recv_line(conn), token):
                yield json.dumps({"error": "a connection without the sync's token was refused"})
                return
            unsaid = 0
            while head := json.loads(_recv_line(conn) or b"{}"):
                rel, offset, left = str(head["rel"]), int(head["offset"]), int(head["size"]) - int(head["offset"])
                if rel not in files:
                    raise NodeOpError(f"the sending node offered {rel}, which was not asked for")
                with open(root / (rel + PART_SUFFIX), "r+b" if offset else "wb") as f:
                    f.seek(offset)
                    while left:
                        n = conn.recv_into(buf, min(left, BUF))
                        if not n:
                            raise NodeOpError(f"the sending node closed the connection inside {rel}")
                        f.write(buf[:n])
                        left -= n
                        unsaid += n
                        if unsaid >= PROGRESS_EVERY:
                            yield json.dumps({"got": unsaid})
                            unsaid = 0
            if unsaid:
                yield json.dumps({"got": unsaid})
    except (OSError, NodeOpError, ValueError) as e:
        yield json.dumps({"error": getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)})
        return
    yield json.dumps(op_model_commit({"dir": str(root), "files": files}))


def op_model_send(args: dict[str, Any]) -> dict[str, Any]:
    """Stream [rel, offset, size] files of `dir` to the receiving node; {"sent": bytes, "s": seconds}."""
    root = Path(args["dir"]).expanduser()
    host, port = args["to"]
    t0, sent = time.monotonic(), 0
    try:
        with socket.create_connection((host, int(port)), timeout=ACCEPT_S) as conn:
            conn.sendall(str(args["token"]).encode() + b"\n")
            for rel, offset, size in args["files"]:
                conn.sendall(json.dumps({"rel": rel, "offset": offset, "size": size}).encode() + b"\n")
                with open(root / rel, "rb") as f:
                    left, pos = int(size) - int(offset), int(offset)
                    while left:
                        n = os.sendfile(conn.fileno(), f.fileno(), pos, min(left, 64 << 20))
                        if n == 0:
                            raise NodeOpError(f"{rel} is shorter here than the launch host's copy")
                        pos, left, sent = pos + n, left - n, sent + n
            conn.sendall(b"{}\n")
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the receiver closes once it has read everything
    except OSError as e:
        raise NodeOpError(f"sending the model to {host}:{port} failed: {e.strerror or e}") from None
    return {"sent": sent, "s": time.monotonic() - t0}
