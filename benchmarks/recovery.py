"""Recovery time: SIGKILL one rank of a serving job, time until the front answers again.

Two simulated SSH nodes (real sshd on 127.0.0.x), one slot each, the built-in tiny model. Each
round kills the rank on node 1 (a follower) and polls the front with a 2-token request every
50 ms; recovery is kill → first successful answer (the gang restart, model reload on every rank,
front rebind). The time to the front's first `unavailable` answer is the detection time.

    python benchmarks/recovery.py [--rounds 3] [--out benchmarks/results/recovery.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from common import dslaunch, table, write

from dslaunch.client import Client, FrontError
from tests.simnodes import SimCluster


def status(env: dict[str, str]) -> dict:
    return json.loads(dslaunch(env, "status", "--json").stdout)


def one_round(env: dict[str, str], port: int, restarts: int) -> dict[str, float]:
    victim = status(env)["ranks"][1]["pid"]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    detected = None
    while True:
        try:
            with Client("127.0.0.1", port, retry_for=0, timeout=30) as c:
                c.generate("Hello", max_new_tokens=2)
            if time.monotonic() - t0 > 0.5:  # an answer from before the kill took effect does not count
                break
        except (FrontError, OSError, ConnectionError):
            detected = detected or time.monotonic() - t0
        if time.monotonic() - t0 > 300:
            raise SystemExit("the job did not recover within 300 s")
        time.sleep(0.05)
    recovered = time.monotonic() - t0
    st = status(env)
    if {r["restarts"] for r in st["ranks"]} != {restarts}:
        raise SystemExit(f"expected every rank at restart {restarts}: {st['ranks']}")
    return {"detected_s": round(detected or 0.0, 2), "recovered_s": round(recovered, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dslaunch-bench-") as tmp:
        sim = SimCluster(Path(tmp), 2).start()
        env = sim.env()
        hosts = sim.hostfile(slots=1)
        work = Path(tmp) / "work"
        try:
            up = dslaunch(env, "up", "-H", str(hosts), "--work-dir", str(work),
                          "--max-restarts", str(args.rounds + 1))  # fmt: skip
            if up.returncode != 0:
                raise SystemExit(up.stdout + up.stderr)
            rec = json.loads((Path(env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
            port = rec["front"]["port"]
            rows = [one_round(env, port, i + 1) for i in range(args.rounds)]
        finally:
            dslaunch(env, "down", "--grace", "5")
            sim.stop()
    result = {
        "setup": "2 simulated SSH nodes x 1 slot, gloo, built-in tiny model; SIGKILL to rank 1",
        "rounds": rows,
        "median_recovered_s": statistics.median(r["recovered_s"] for r in rows),
        "median_detected_s": statistics.median(r["detected_s"] for r in rows),
    }
    print(table(["round", "first error (s)", "answering again (s)"],
                [[i, r["detected_s"], r["recovered_s"]] for i, r in enumerate(rows, 1)]))  # fmt: skip
    print(f"median: answering again {result['median_recovered_s']:.2f} s after the kill")
    write("recovery", result, args.out)


if __name__ == "__main__":
    main()
