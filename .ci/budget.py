"""Run the test command, print its wall time against the suite's budget, and warn past it.

The budget is what the suite may take on the 2-core CI machine (DSLAUNCH_TEST_BUDGET_S, 600 s by
default). Going over it warns but does not fail: a slow machine should not turn a green suite red,
and the warning names the time so the next change can win it back. The exit status is the
command's own.

It also prints how busy the machine's CPUs were meanwhile (from /proc/stat, so the processes the
tests start on simulated nodes count too): a suite near 100% is bound by CPU, and only less work
makes it faster; one well below it waits on something, and the wait is what to shorten. Steal
time is CPU the machine's host gave to others.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

BUDGET_S = float(os.environ.get("DSLAUNCH_TEST_BUDGET_S", "600"))


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def _cpu() -> dict[str, float] | None:
    """Machine-wide CPU seconds so far, by kind (Linux only)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    hz = os.sysconf("SC_CLK_TCK")
    return {n: int(v) / hz for n, v in zip(names, fields, strict=False)}


def _cpu_line(before: dict[str, float] | None, after: dict[str, float] | None, wall: float) -> str | None:
    if not before or not after:
        return None
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    busy = sum(d.get(k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
    cap = wall * (os.cpu_count() or 1)
    return (
        f"machine CPU: {busy:.0f} s busy of {cap:.0f} s on {os.cpu_count()} CPUs ({100 * busy / cap:.0f}%; "
        f"user {d.get('user', 0):.0f} s, system {d.get('system', 0):.0f} s, steal {d.get('steal', 0):.0f} s)"
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: budget.py -- COMMAND...", file=sys.stderr)
        return 2
    start, cpu0 = time.monotonic(), _cpu()
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
    cpu = _cpu_line(cpu0, _cpu(), wall)
    if cpu:
        print(cpu, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
