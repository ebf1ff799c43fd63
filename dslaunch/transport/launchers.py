"""How a job's processes reach its nodes, and how they are found and stopped again: the launchers.

A launcher answers three questions, and nothing else differs between SSH and Slurm:
- `connect`: how one nodectl op reaches a node (a Transport: a child process, SSH, an `srun` step);
- `start`: how one unit (an agent, or the router) is started so that it outlives the `up` that
  started it (nodectl `start` detaches it itself; Slurm makes it a job step of its own);
- `leftovers` / `cleanup`: what the launcher itself still holds once nodectl `stop` ended the
  unit's processes (Slurm: the job's steps), so that `down` ends them and verifies none is left.

`LAUNCHERS` maps `--launcher NAME` to a factory taking what the record keeps for it
(`launcher_meta`); a new launcher is one module with one `register_launcher` call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dslaunch.errors import UserError
from dslaunch.transport.base import ConnectOptions, Transport
from dslaunch.transport.slurm import SlurmLauncher
from dslaunch.wire.hosts import Node

if TYPE_CHECKING:
    from dslaunch.transport.nodes import NodeClient


class Launcher(Protocol):
    name: str
    meta: dict[str, str]  # kept in the job's record; the factory gets it back for status and down

    def connect(self, node: Node, opts: ConnectOptions) -> Transport: ...

    def check(self) -> None:
        """Before pre-flight: can this launcher start anything at all (raise UserError, one line)?"""
        ...

    def start(self, client: NodeClient, args: dict[str, Any]) -> dict[str, Any]:
        """Start one unit detached (nodectl `start`'s arguments); its answer has the agent's `pid`."""
        ...

    def describe(self) -> list[tuple[str, str]]:
        """(label, value) lines for `status` and `--dry-run`: which launcher, and its own ids."""
        ...

    def leftovers(self, job_id: str) -> list[str]:
        """What the launcher still runs for this job (after nodectl `stop`), one line each."""
        ...

    def cleanup(self, job_id: str) -> list[str]:
        """End those leftovers; return what is still there afterwards."""
        ...

    def ended(self) -> str | None:
        """Why every process of the job is known to be gone already (Slurm ended the allocation),
        or None: then `down` asks the nodes."""
        ...


class DirectLauncher:
    """Today's launchers: nodectl's `start` op detaches the agent into its own session."""

    name = "ssh"

    def __init__(self, meta: dict[str, str] | None = None) -> None:
        self.meta = dict(meta or {})

    def connect(self, node: Node, opts: ConnectOptions) -> Transport:
        """Local for `localhost`, SSH for everything else."""
        from dslaunch.transport.local import LocalTransport

        if node.is_local:
            return LocalTransport(node, opts)
        from dslaunch.transport.ssh import SSHTransport

        return SSHTransport(node, opts)

    def check(self) -> None:
        pass

    def start(self, client: NodeClient, args: dict[str, Any]) -> dict[str, Any]:
        return client.call("start", args)

    def describe(self) -> list[tuple[str, str]]:
        return [("launcher", self.name)]

    def leftovers(self, job_id: str) -> list[str]:
        return []

    def cleanup(self, job_id: str) -> list[str]:
        return []

    def ended(self) -> str | None:
        return None


class LocalLauncher(DirectLauncher):
    """Every node is this machine (`localhost`): child processes, no sshd."""

    name = "local"

    def connect(self, node: Node, opts: ConnectOptions) -> Transport:
        if not node.is_local:
            raise UserError(f"--launcher local runs on this machine only, not on {node.host} (use --launcher ssh)")
        return super().connect(node, opts)


class SSHLauncher(DirectLauncher):
    """Every node over SSH (paramiko); `localhost` still runs as a child process."""

    name = "ssh"


LAUNCHERS: dict[str, Callable[[dict[str, str]], Launcher]] = {}


def register_launcher(name: str, factory: Callable[[dict[str, str]], Launcher]) -> None:
    """Make `--launcher NAME` mean `factory(meta)`."""
    LAUNCHERS[name] = factory


def launcher_factory(name: str) -> Callable[[dict[str, str]], Launcher]:
    try:
        return LAUNCHERS[name]
    except KeyError:
        raise UserError(f"--launcher {name!r}: choose one of {', '.join(LAUNCHERS)}") from None


def get_launcher(name: str, meta: dict[str, str] | None = None) -> Launcher:
    """The launcher a job uses, given what its record keeps for it."""
    return launcher_factory(name)(dict(meta or {}))


register_launcher("local", LocalLauncher)
register_launcher("ssh", SSHLauncher)
register_launcher("slurm", SlurmLauncher)
