"""How ranks start: `--rank-start fork` (the warm agent, dslaunch.rank.torchrun) against `exec`
(plain torchrun: a new interpreter per rank), measured in the same run on this machine.

One cycle per mode and trial: `up` of a local job (hostfiles/localhost: 2 ranks, the built-in
model), SIGKILL of rank 1, wait until the gang restarted and is ready again, `down`. Reported:
the time to ready, the time from the kill to ready again, and the CPU seconds the whole machine
spent on the cycle (from /proc/stat: run it on an otherwise quiet machine).

    python benchmarks/rankstart.py [--trials 2] [--out benchmarks/results/rankstart.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from common import dslaunch, table, write


def _cpu_s() -> float:
    with open("/proc/stat") as f:
        user, nice, system = (int(v) for v in f.readline().split()[1:4])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def _status(env: dict[str, str]) -> dict[str, Any]:
    res = dslaunch(env, "status", "--json")
    return json.loads(res.stdout) if res.returncode == 0 else {}


def cycle(mode: str, root: Path) -> dict[str, float]:
    env = {**os.environ, "DSLAUNCH_HOME": str(root / "home")}
    work = root / "work"
    cpu0, t0 = _cpu_s(), time.monotonic()
    up = dslaunch(env, "up", "-H", "hostfiles/localhost", "--rank-start", mode, "--work-dir", str(work))
    if up.returncode != 0:
        raise SystemExit(f"up --rank-start {mode} failed:\n{up.stderr}")
    ready = time.monotonic() - t0
    try:
        os.kill(_status(env)["ranks"][1]["pid"], signal.SIGKILL)
        t1 = time.monotonic()
        deadline = t1 + 300
        while time.monotonic() < deadline:
            st = _status(env)
            if st.get("state") == "ready" and all(r["restarts"] == 1 for r in st["ranks"]):
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"--rank-start {mode}: the gang did not come back within 300 s")
        restart = time.monotonic() - t1
    finally:
        down = dslaunch(env, "down")
    if down.returncode != 0:
        raise SystemExit(f"down failed:\n{down.stderr}")
    return {"ready_s": ready, "restart_s": restart, "cycle_cpu_s": _cpu_s() - cpu0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"exec": [], "fork": []}
    for _ in range(args.trials):
        for mode in runs:  # interleaved: a machine that slows down mid-run slows both alike
            with tempfile.TemporaryDirectory(prefix="rankstart-") as tmp:
                runs[mode].append(cycle(mode, Path(tmp)))
    best = {m: {k: min(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    ratio = {k: best["fork"][k] / best["exec"][k] for k in best["exec"]}
    rows = [[m, best[m]["ready_s"], best[m]["restart_s"], best[m]["cycle_cpu_s"]] for m in runs]
    rows.append(["fork / exec", ratio["ready_s"], ratio["restart_s"], ratio["cycle_cpu_s"]])
    print(table(["rank start", "up to ready s", "kill to ready s", "cycle CPU s"], rows))
    write("rankstart", {"trials": args.trials, "runs": runs, "best": best, "fork_over_exec": ratio}, args.out)


if __name__ == "__main__":
    main()
