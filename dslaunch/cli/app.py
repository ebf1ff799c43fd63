"""The click group, the consoles, and the one place dslaunch's errors become an `Error:` line."""

from __future__ import annotations

import os
from typing import Any

import click
from rich.console import Console

from dslaunch import __version__
from dslaunch.cli import render
from dslaunch.errors import DslaunchError, UserError


def _console(stderr: bool = False) -> Console:
    """Rich console; when piped (logs, CI) use a wide fixed width instead of wrapping at 80."""
    c = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c.width = 160
    return c


console = _console()
err_console = _console(stderr=True)


def _read_token(token_file: str | None) -> str | None:
    """The front's token from --token-file or DSLAUNCH_TOKEN; never from a command-line value."""
    if token_file:
        try:
            return open(token_file, encoding="utf-8").read().strip() or None
        except OSError as e:
            raise UserError(f"--token-file {token_file}: cannot read ({e.strerror})") from None
    return os.environ.get("DSLAUNCH_TOKEN") or None


class _Group(click.Group):
    """Turns dslaunch's own errors into click's one `Error:` line (exit 1), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DslaunchError as e:
            raise click.ClickException(render.plain(e.message)) from None  # may quote a node's words


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dslaunch")
def main() -> None:
    """Start, inspect and stop torch.distributed inference jobs on machines reachable over SSH."""
