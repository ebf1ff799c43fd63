"""Sync's tree fan-out: each round, this host and every node that already holds the model send it
to one node that lacks it, so the holders double each round and the launch host's uplink carries
one copy per round, not one per node.

Node-to-node copies run as two nodectl ops over the job's SSH connections (`node/relay.py`):
`model-receive` on the receiving node (it listens, takes one connection with a one-time token,
writes part files, checks hashes) and `model-send` on the sender. A node reached through a proxy
(no address the others can use) is sent to from this host.
"""

from __future__ import annotations

import json
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from dslaunch.errors import RemoteError
from dslaunch.launch.modelsync import Manifest, Need, NodeSync, SyncEvents, copy_sftp, plan_node
from dslaunch.transport.fanout import fan_out
from dslaunch.transport.nodes import Cluster, NodeClient
from dslaunch.wire.hosts import Node

SEND_TIMEOUT_S = 24 * 3600.0  # a node-to-node copy of a very large model; the receiver's stream ends it sooner


@dataclass
class Pair:
    node: Node  # the receiver (fan_out names results by it)
    need: Need
    src: NodeClient | None  # None: this host


def sync_tree(
    cluster: Cluster, clients: list[NodeClient], local: str, where: str, want: Manifest, ev: SyncEvents, opener: Any
) -> list[NodeSync]:
    planned = cluster.map(lambda c: plan_node(c, where, want, ev), clients)
    failed = [r for r in planned if not r.ok]
    needs = [r.value for r in planned if r.value is not None]
    done = [NodeSync(n.host) for n in needs if not n.todo]
    holders = [n.client for n in needs if not n.todo]
    pending = [n for n in needs if n.todo]
    while pending:
        pairs = [Pair(pending[0].client.node, pending.pop(0), None)]
        for h in holders:
            relayable = [n for n in pending if n.client.transport.address() is not None]
            if not relayable:
                break
            pending.remove(relayable[0])
            pairs.append(Pair(relayable[0].client.node, relayable[0], h))
        results = fan_out(pairs, lambda p: _copy(p, local, want, ev, opener), cluster.parallelism)
        for p, r in zip(pairs, results, strict=True):
            if r.ok and r.value is not None:
                done.append(r.value)
                holders.append(p.need.client)
            else:
                failed.append(r)
    if failed:
        lines = "\n  ".join(r.describe() for r in failed)
        raise RemoteError(f"model sync failed on {len(failed)} of {len(clients)} node(s):\n  {lines}")
    return done


def _copy(p: Pair, local: str, want: Manifest, ev: SyncEvents, opener: Any) -> NodeSync:
    if p.src is None:
        return copy_sftp(p.need, local, want, ev, opener)
    return relay(p.src, p.need, want, ev)


def relay(src: NodeClient, need: Need, want: Manifest, ev: SyncEvents) -> NodeSync:
    """`src` sends what `need`'s node lacks straight to it; the receiver checks every hash."""
    dst, host = need.client, need.host
    addr = dst.transport.address()
    token = secrets.token_hex(16)
    files = {rel: want[rel]["sha256"] for rel in need.todo}
    lines = dst.stream("model-receive", {"dir": need.root, "token": token, "files": files, "bind": addr})
    first = json.loads(next(iter(lines), "{}") or "{}")
    if "port" not in first:
        raise RemoteError(f"{host}: cannot receive the model from {src.node.host} ({first.get('error', 'no port')})")
    send_err: list[BaseException] = []
    sent: list[dict[str, Any]] = []
    order = [[rel, need.offsets[rel], int(want[rel]["size"])] for rel in need.todo]  # type: ignore[call-overload]

    def send() -> None:
        try:
            sent.append(src.call("model-send", {"dir": need.root, "to": [addr, first["port"]], "token": token,
                                                "files": order}, SEND_TIMEOUT_S))  # fmt: skip
        except BaseException as e:  # reported with the receiver's side
            send_err.append(e)

    t = threading.Thread(target=send, name=f"relay-{host}", daemon=True)
    t.start()
    end: dict[str, Any] = {}
    try:
        for line in lines:
            msg = json.loads(line)
            if "got" in msg:
                ev.sent(host, int(msg["got"]))
            else:
                end = msg
                break
    finally:
        lines.close()  # type: ignore[attr-defined]  # ends the receiver's channel
    t.join()
    if send_err or "error" in end or not end:
        why = str(send_err[0]) if send_err else end.get("error", "the receiving node stopped without an answer")
        raise RemoteError(f"{host}: copy from {src.node.host} failed: {why}")
    if end.get("bad"):
        raise RemoteError(f"{host}: {end['bad'][0]} from {src.node.host} arrived with a different hash")
    out = NodeSync(host, list(end["committed"]), int(sent[0]["sent"]) if sent else 0, sum(need.offsets.values()))
    out.source = src.node.host
    return out
