"""Errors a user can cause, and dslaunch's own failures: plain exceptions, no click.

Node and rank processes import this too, so it must stay free of the CLI's dependencies; only
`dslaunch.cli` turns these into one `Error:` line and an exit code.
"""

from __future__ import annotations


class DslaunchError(Exception):
    """Base of dslaunch's errors; `message` is one line meant for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UserError(DslaunchError):
    """A mistake in input or environment that the user can fix (bad flag, dead host, ...)."""


class HostfileError(UserError):
    """A hostfile or host filter problem; the message names the file and line, or the flag."""


class RemoteError(UserError):
    """A node could not be reached or refused what was asked; the message names the host."""


class NodeOpError(DslaunchError):
    """A node operation (`python -m dslaunch.node.ctl OP`) refused or failed; raised on the node.

    nodectl prints it as `{"error": message, **details}` with exit status 3, and the launch host's
    NodeClient raises it again as a RemoteError naming the host.
    """

    EXIT_STATUS = 3

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class NodeOpFailed(RemoteError):
    """The launch host's side of a NodeOpError: which host, why, and what the node added."""

    def __init__(self, host: str, reason: str, details: dict[str, object]) -> None:
        super().__init__(f"{host}: {reason}")
        self.host = host
        self.reason = reason
        self.details = details
