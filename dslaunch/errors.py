"""Errors a user can cause: printed as one line by click, never as a traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A mistake in input or environment that the user can fix (bad flag, dead host, ...)."""


class HostfileError(UserError):
    """A hostfile or host filter problem; the message names the file and line, or the flag."""


class RemoteError(UserError):
    """A node could not be reached or refused what was asked; the message names the host."""
