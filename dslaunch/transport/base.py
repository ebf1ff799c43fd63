"""What every transport offers: run a command on one node, stream one, say its address."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from dslaunch.wire.hosts import Node


@dataclass(frozen=True)
class RunResult:
    code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach nodes: time-outs (seconds) and the host-key policy."""

    connect_timeout: float = 10.0
    command_timeout: float = 60.0
    accept_new_host_keys: bool = False


class Transport(Protocol):
    """A way to run a command on one node. Opens lazily; `close` is always safe."""

    node: Node

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> RunResult: ...

    def stream(self, argv: list[str], stdin: str = "") -> Iterator[str]: ...

    def address(self) -> str | None:
        """The address this host was reached at, what the other nodes should use too; None when
        the transport cannot know it (a proxy in between): then the node is asked."""
        ...

    def close(self) -> None: ...
