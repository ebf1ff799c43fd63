"""`dslaunch sync` / `up --sync-model`: make the launch host's model directory exist identically
on every node, copying only the files whose hash differs.

Each node's copy goes over its own SSH connection (SFTP), all nodes in parallel. A file is
written as `FILE.dslaunch-part` and renamed by nodectl only once its hash matches
(`node/modelfiles.py`), so an interrupted copy never leaves a file that looks complete, and the
next sync continues the part file instead of starting over.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from dslaunch.errors import RemoteError, UserError
from dslaunch.launch.modelcheck import node_path
from dslaunch.transport.launchers import SSHLauncher
from dslaunch.transport.nodes import Cluster, NodeClient
from dslaunch.wire.filehash import PART_SUFFIX, differences, manifest

CHUNK = 1 << 20
TREE_FROM = 4  # from this many nodes on, nodes that hold the model pass it on
Manifest = dict[str, dict[str, Any]]


class SyncEvents(Protocol):
    """What the CLI shows: each node's bytes to send, then every chunk sent."""

    def planned(self, host: str, total: int, files: int) -> None: ...

    def sent(self, host: str, n: int) -> None: ...


class Quiet:
    def planned(self, host: str, total: int, files: int) -> None:
        pass

    def sent(self, host: str, n: int) -> None:
        pass


@dataclass
class NodeSync:
    """What one node needed and got."""

    host: str
    files: list[str] = field(default_factory=list)  # copied (or finished) this time
    bytes_sent: int = 0
    resumed: int = 0  # bytes of part files continued rather than sent again
    source: str = ""  # who sent it: "" for this host, else the node that passed it on

    @property
    def identical(self) -> bool:
        return not self.files


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def sync_model(
    cluster: Cluster,
    model: str,
    events: SyncEvents | None = None,
    sftp_for: Callable[[NodeClient], Any] | None = None,
    tree_from: int = TREE_FROM,
) -> list[NodeSync]:
    """Copy `model` (a directory on this host) to every node of `cluster` that lacks it or holds
    another copy; one line per node that failed, all nodes tried. From `tree_from` nodes on, nodes
    that hold the model pass it on (launch/modeltree.py)."""
    local = os.path.expanduser(model)
    if not os.path.isdir(local):
        raise UserError(f"--model {model}: not a directory on this host (nothing to copy)")
    want = manifest(local)
    if not want:
        raise UserError(f"--model {model}: the directory is empty")
    where = node_path(model)
    ev = events or Quiet()
    opener = sftp_for or _sftp
    seen: set[tuple[str, str | None]] = set()
    clients = []
    for c in cluster.clients:  # one copy per machine
        if (c.node.host, c.node.user) not in seen:
            seen.add((c.node.host, c.node.user))
            clients.append(c)
    if len(clients) >= tree_from:
        from dslaunch.launch.modeltree import sync_tree

        return sync_tree(cluster, clients, local, where, want, ev, opener)
    results = cluster.map(lambda c: copy_sftp(plan_node(c, where, want, ev), local, want, ev, opener), clients)
    results.raise_failures("model sync")
    return [r.value for r in results if r.value is not None]


def _sftp(c: NodeClient) -> Any:
    """SFTP on the node's own SSH connection; a node reached otherwise (srun) gets one of its own."""
    t = c.transport
    if not hasattr(t, "sftp"):
        t = SSHLauncher().connect(c.node, getattr(t, "opts", None) or _default_opts())
        if not hasattr(t, "sftp"):
            raise RemoteError(f"{c.node.host}: cannot copy files to it (it is this host: the copy is the original)")
    return t.sftp()


def _default_opts() -> Any:
    from dslaunch.transport.base import ConnectOptions

    return ConnectOptions()


@dataclass
class Need:
    """What one node lacks: the files to send, where each part file stands, the node's directory."""

    client: NodeClient
    todo: list[str]
    offsets: dict[str, int]
    root: str = ""

    @property
    def host(self) -> str:
        return self.client.node.host


def plan_node(c: NodeClient, where: str, want: Manifest, ev: SyncEvents) -> Need:
    """Ask the node what it holds; check its free space; create the directories the copy needs."""
    host = c.node.host
    have = c.call("model-hashes", {"dir": where})
    todo = [rel for rel, _why in differences(want, have["files"])]
    parts = {rel: int(n) for rel, n in have.get("parts", {}).items() if rel in todo}
    offsets = {rel: parts.get(rel, 0) if parts.get(rel, 0) <= _size(want, rel) else 0 for rel in todo}
    need = sum(_size(want, rel) - offsets[rel] for rel in todo)
    ev.planned(host, need, len(todo))
    if not todo:
        return Need(c, [], {})
    if need > int(have["free"]):
        raise UserError(
            f"{host}: not enough disk space for --model {where}: {mb(need)} to copy, {mb(int(have['free']))} free "
            "there (nothing was copied)"
        )
    root = c.call("model-prepare", {"dir": where, "dirs": sorted({os.path.dirname(r) for r in todo})})["root"]
    return Need(c, todo, offsets, root)


def _size(want: Manifest, rel: str) -> int:
    return int(want[rel]["size"])  # type: ignore[call-overload]


def copy_sftp(need: Need, local: str, want: Manifest, ev: SyncEvents, opener: Callable[[NodeClient], Any]) -> NodeSync:
    """Send what the node lacks from this host over SFTP; commit; send again whole what failed its hash."""
    c, host, root = need.client, need.host, need.root
    out = NodeSync(host)
    if not need.todo:
        return out
    todo, offsets = list(need.todo), dict(need.offsets)
    sftp = opener(c)
    try:
        for attempt in range(2):
            for rel in todo:
                dst = f"{root}/{rel}{PART_SUFFIX}"
                size = _size(want, rel)
                src = os.path.join(local, rel)
                out.bytes_sent += _send(sftp, c, src, dst, offsets[rel], lambda n: ev.sent(host, n), size)
                out.resumed += offsets[rel]
            done = c.call("model-commit", {"dir": root, "files": {r: want[r]["sha256"] for r in todo}})
            out.files += done["committed"]
            todo, offsets = list(done["bad"]), {r: 0 for r in done["bad"]}
            if not todo:
                return out
            if attempt == 0:  # a part file that was not what it claimed: sent again, whole
                ev.planned(host, sum(_size(want, r) for r in todo), len(todo))
        raise RemoteError(f"{host}: {todo[0]} arrived with a different hash twice (is the file changing here?)")
    finally:
        sftp.close()


def _send(sftp: Any, c: NodeClient, src: str, dst: str, offset: int, sent: Callable[[int], None], size: int) -> int:
    """Write src[offset:] to the part file dst at offset; the bytes sent."""
    n = 0
    try:
        with open(src, "rb") as f, sftp.open(dst, "r+" if offset else "w") as out:
            out.set_pipelined(True)
            out.seek(offset)
            f.seek(offset)
            while chunk := f.read(CHUNK):
                out.write(chunk)
                n += len(chunk)
                sent(len(chunk))
    except OSError as e:
        if isinstance(e, FileNotFoundError) and e.filename == src:
            raise UserError(f"--model: {src} vanished during the copy") from None
        _explain_write_failure(sftp, c, dst, size - offset - n, e)
    return n


def _explain_write_failure(sftp: Any, c: NodeClient, dst: str, left: int, e: OSError) -> None:
    """A failed write: out of space (the part file is removed, so it takes no room), or else why."""
    try:
        free = int(c.call("model-hashes", {"dir": os.path.dirname(dst) + "/.dslaunch-none"})["free"])
    except RemoteError:
        free = -1
    if 0 <= free < max(left, 1) + CHUNK:
        with contextlib.suppress(OSError):
            sftp.remove(dst)
        raise UserError(f"{c.node.host}: the disk filled up while copying --model into {os.path.dirname(dst)} "
                        f"({mb(free)} free): free space there and run the sync again") from None  # fmt: skip
    raise RemoteError(f"{c.node.host}: writing {dst} failed ({e.strerror or e})") from None
