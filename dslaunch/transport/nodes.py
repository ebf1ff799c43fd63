"""The job's nodes as one cluster: `python -m dslaunch.node.ctl OP` on each, in parallel."""

from __future__ import annotations

import contextlib
import json
import shlex
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dslaunch.errors import NodeOpError, NodeOpFailed, RemoteError
from dslaunch.transport.base import ConnectOptions, RunResult, Transport
from dslaunch.transport.fanout import HostResults, fan_out
from dslaunch.transport.launchers import Launcher, SSHLauncher
from dslaunch.wire.hosts import Node

T = TypeVar("T")

NODECTL = "dslaunch.node.ctl"
# `python -m` puts the working directory first on sys.path: a `json.py` in the caller's directory
# (local transport) or in the home directory (SSH) would be imported instead of the standard
# library's. `-P` fixes that only from Python 3.11; this works on every version: `-c` adds ''
# after site initialisation, so it is dropped here before anything else is imported.
_SAFE_RUN = (
    "import sys; sys.path[:1] == [''] and sys.path.pop(0); import runpy; del sys.argv[0]; "
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"
)


def connect(node: Node, opts: ConnectOptions, launcher: Launcher | None = None) -> Transport:
    """The transport for a node, as the job's launcher reaches it (by default: local for
    `localhost`, SSH for everything else)."""
    return (launcher or SSHLauncher()).connect(node, opts)


class NodeClient:
    """Calls `python -m dslaunch.node.ctl OP` on one node through its transport."""

    def __init__(self, node: Node, transport: Transport, python: str, timeout: float) -> None:
        self.node = node
        self.transport = transport
        self.python = python
        self.timeout = timeout
        self._lock = threading.Lock()

    def argv(self, op: str) -> list[str]:
        """`python -m dslaunch.node.ctl OP`, without the working directory on sys.path."""
        return [self.python, "-c", _SAFE_RUN, NODECTL, op]

    def call(self, op: str, args: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Run one op; decode its JSON answer or raise a RemoteError naming the host."""
        with self._lock:  # one SSH channel at a time per node keeps paramiko simple
            res = self.transport.run(self.argv(op), json.dumps(args) + "\n", timeout or self.timeout)
        host = self.node.host
        if res.code not in (0, NodeOpError.EXIT_STATUS):
            raise RemoteError(f"{host}: {explain_failure(res, self.python)}")
        try:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RemoteError(f"{host}: unexpected answer from dslaunch.node.ctl {op}: {res.stdout[:200]!r}") from None
        if res.code == NodeOpError.EXIT_STATUS:
            reason = str(out.pop("error", "refused"))
            raise NodeOpFailed(host, reason, out)
        return out

    def stream(self, op: str, args: dict[str, Any]) -> Iterator[str]:
        return self.transport.stream(self.argv(op), json.dumps(args) + "\n")


def explain_failure(res: RunResult, python: str) -> str:
    """One line for a failed node command: the likely cause first, then the remote's last words."""
    err = res.stderr.strip()
    if res.code == -1 and not err:  # paramiko: the channel closed without an exit status
        return "the connection was lost before the command finished (is the node down?)"
    last = err.splitlines()[-1] if err else f"exit status {res.code}"
    if res.code == 127 or ("not found" in last and python in last):
        return f"python {shlex.quote(python)} not found there (pass --python with the node's interpreter)"
    if "No module named 'dslaunch'" in err or "No module named dslaunch" in err:
        return f"dslaunch is not installed for {python} there (install the same version on every node)"
    return last


class Cluster:
    """The job's nodes, each with its lazily opened transport: fan-out of nodectl ops to all."""

    def __init__(
        self, nodes: list[Node], opts: ConnectOptions, python: str, parallelism: int = 32,
        launcher: Launcher | None = None,
    ) -> None:  # fmt: skip
        self.opts = opts
        self.python = python
        self.parallelism = parallelism
        self.launcher: Launcher = launcher or SSHLauncher()
        # one connection per machine: the agents of two replicas on one node share it
        conns: dict[tuple[str, str | None], Any] = {}
        for n in nodes:
            if (n.host, n.user) not in conns:
                conns[(n.host, n.user)] = self.launcher.connect(n, opts)
        self.clients = [NodeClient(n, conns[(n.host, n.user)], python, opts.command_timeout) for n in nodes]

    def view(self, nodes: list[Node]) -> Cluster:
        """The same machines seen as other entries (the job's agents and router), sharing the
        connections; closing the view closes nothing."""
        conns = {(c.node.host, c.node.user): c.transport for c in self.clients}
        out = Cluster.__new__(Cluster)
        out.opts, out.python, out.parallelism, out.launcher = self.opts, self.python, self.parallelism, self.launcher
        out.clients = [NodeClient(n, conns[(n.host, n.user)], self.python, self.opts.command_timeout) for n in nodes]
        out._view = True
        return out

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, fn: Callable[[NodeClient], T], clients: list[NodeClient] | None = None) -> HostResults[T]:
        return fan_out(self.clients if clients is None else clients, fn, self.parallelism)

    def call_all(
        self,
        op: str,
        args_for: Callable[[int, NodeClient], dict[str, Any]],
        timeout: float | None = None,
    ) -> HostResults[dict[str, Any]]:
        """Run `op` on every node; `args_for(node_index, client)` gives each node's arguments."""
        index = {id(c): i for i, c in enumerate(self.clients)}
        return self.map(lambda c: c.call(op, args_for(index[id(c)], c), timeout))

    _view = False

    def close(self) -> None:
        if self._view:
            return
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.transport.close()
