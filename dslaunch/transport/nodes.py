"""How commands reach a node: one small Transport interface, a local and an SSH implementation,
and a bounded parallel fan-out that returns a result or an error for every host, never stopping
half-way.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from dslaunch.errors import RemoteError
from dslaunch.launch.hostfile import Node

T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach nodes: time-outs (seconds), host-key policy, ssh_config location."""

    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    accept_new_host_keys: bool = False
    ssh_config: str | None = None


class Transport(Protocol):
    """A way to run a command on one node. Opens lazily; `close` is always safe."""

    node: Node

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> RunResult: ...

    def stream(self, argv: list[str], stdin: str = "") -> Iterator[str]: ...

    def address(self) -> str:
        """The address this host was reached at: what the other nodes should use too."""
        ...

    def close(self) -> None: ...


class LocalTransport:
    """`localhost` without sshd: the same commands, run as child processes."""

    def __init__(self, node: Node, opts: ConnectOptions) -> None:
        self.node = node
        self.opts = opts
        self._streams: list[subprocess.Popen[str]] = []

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> RunResult:
        timeout = timeout or self.opts.command_timeout
        try:
            p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RemoteError(
                f"{self.node.host}: command did not finish within {timeout:g}s (--command-timeout)"
            ) from None
        except FileNotFoundError:
            return RunResult(127, "", f"{argv[0]}: not found")
        return RunResult(p.returncode, p.stdout, p.stderr)

    def stream(self, argv: list[str], stdin: str = "") -> Iterator[str]:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._streams.append(p)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(stdin)
        p.stdin.flush()
        try:
            yield from (line.rstrip("\n") for line in p.stdout)
        finally:
            self._end(p)

    @staticmethod
    def _end(p: subprocess.Popen[str]) -> None:
        if p.stdin:
            with contextlib.suppress(OSError):
                p.stdin.close()
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def address(self) -> str:
        return "127.0.0.1"

    def close(self) -> None:
        for p in self._streams:
            if p.poll() is None:
                self._end(p)
        self._streams.clear()


def connect(node: Node, opts: ConnectOptions) -> Transport:
    """The transport for a node: local for `localhost`, SSH for everything else."""
    if node.is_local:
        return LocalTransport(node, opts)
    from dslaunch.transport.ssh import SSHTransport

    return SSHTransport(node, opts)


@dataclass
class HostResult(Generic[T]):
    node: Node
    value: T | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fan_out(items: list[Any], fn: Callable[[Any], T], parallelism: int = 32) -> list[HostResult[T]]:
    """Call `fn(item)` for every item (each has `.node`) in parallel; one result per item, in order.

    A Ctrl-C in the caller still waits for calls under way, so the caller knows exactly what was
    done on every host before it cleans up.
    """
    results: list[HostResult[T]] = [HostResult(item.node) for item in items]
    if not items:
        return results

    def one(i: int) -> None:
        try:
            results[i].value = fn(items[i])
        except Exception as e:
            results[i].error = e

    pool = ThreadPoolExecutor(max_workers=min(parallelism, len(items)), thread_name_prefix="fanout")
    futures = [pool.submit(one, i) for i in range(len(items))]
    try:
        for f in futures:
            f.result()
    finally:
        pool.shutdown(wait=True)
    return results


class NodeClient:
    """Calls `python -m dslaunch.node.ctl OP` on one node through its transport."""

    def __init__(self, node: Node, transport: Transport, python: str, timeout: float) -> None:
        self.node = node
        self.transport = transport
        self.python = python
        self.timeout = timeout
        self._lock = threading.Lock()

    def argv(self, op: str) -> list[str]:
        return [self.python, "-m", "dslaunch.node.ctl", op]

    def call(self, op: str, args: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Run one op; decode its JSON answer or raise a RemoteError naming the host."""
        with self._lock:  # one SSH channel at a time per node keeps paramiko simple
            res = self.transport.run(self.argv(op), json.dumps(args) + "\n", timeout or self.timeout)
        host = self.node.host
        if res.code != 0:
            raise RemoteError(f"{host}: {explain_failure(res, self.python)}")
        try:
            out = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RemoteError(f"{host}: unexpected answer from dslaunch.node.ctl {op}: {res.stdout[:200]!r}") from None
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

    def __init__(self, nodes: list[Node], opts: ConnectOptions, python: str, parallelism: int = 32):
        self.opts = opts
        self.parallelism = parallelism
        self.clients = [NodeClient(n, connect(n, opts), python, opts.command_timeout) for n in nodes]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, fn: Callable[[NodeClient], T], clients: list[NodeClient] | None = None) -> list[HostResult[T]]:
        return fan_out(self.clients if clients is None else clients, fn, self.parallelism)

    def call_all(
        self,
        op: str,
        args_for: Callable[[int, NodeClient], dict[str, Any]],
        timeout: float | None = None,
    ) -> list[HostResult[dict[str, Any]]]:
        """Run `op` on every node; `args_for(node_index, client)` gives each node's arguments."""
        index = {id(c): i for i, c in enumerate(self.clients)}
        return self.map(lambda c: c.call(op, args_for(index[id(c)], c), timeout))

    def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.transport.close()
