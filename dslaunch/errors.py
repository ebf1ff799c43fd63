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
