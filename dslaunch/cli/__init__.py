"""The `dslaunch` command line: parse flags, build a spec, call the core, render. No logic here."""

from dslaunch.cli import commands, query, sync  # noqa: F401  (registers the commands)
from dslaunch.cli.app import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
