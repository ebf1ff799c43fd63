"""Run the test command, print its wall time against the suite's budget, and warn past it.

The budget is what the suite may take on the 2-core CI machine (DSLAUNCH_TEST_BUDGET_S, 600 s by
default). Going over it warns but does not fail: a slow machine should not turn a green suite red,
and the warning names the time so the next change can win it back. The exit status is the
command's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

BUDGET_S = float(os.environ.get("DSLAUNCH_TEST_BUDGET_S", "600"))


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: budget.py -- COMMAND...", file=sys.stderr)
        return 2
    start = time.monotonic()
    try:
        rc = subprocess.call(argv)
    except KeyboardInterrupt:
        rc = 130
    wall = time.monotonic() - start
    line = f"test wall time: {_mmss(wall)} ({wall:.0f} s) of a {_mmss(BUDGET_S)} budget"
    if wall > BUDGET_S:
        print(f"WARNING: {line}: over by {wall - BUDGET_S:.0f} s", flush=True)
    else:
        print(line, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
