"""A chaos soak: 10 minutes of mixed clients against both routers while random faults follow one
another, every answer checked (the engine and its rules: tests/chaos.py).

One job on 2 simulated SSH nodes x 2 slots, `--tp 2` (a replica per node), two routers (router K
on node K), `--hang-timeout 10`, `--max-restarts 100` (torch elastic's budget is for the agent's
lifetime: with the default 3, the fourth fault on one replica ends it). Two clients of each kind
(greedy; seeded sampled streams; unseeded sampled streams) know both routers and retry as the
Python client does, back to back.
Every 20-40 s (once the job is whole again) one fault drawn from: a rank SIGKILLed, a rank
SIGSTOPped, a router SIGKILLed, a leader's link to a router cut (`ss -K`); and with each node in a
network namespace of its own (`tests/netns.py`, root; `--network loopback` leaves them out): a
partition between the two nodes, or one node off the network (interface down), each for 8-15 s.
There the routers listen on every address with a token, and the clients reach them at their
nodes' addresses.

It reports the requests per kind, the wrong answers (text other than the plain model's or the
idle job's seeded sample; chunks that do not add up to the answer: a duplicated or lost chunk),
the failures the README allows and those it does not, the restarts, the routers' and ranks' RSS
growth from the end of the warm-up to the end (processes that lived through it), and what is left
after `down`.

Not drawn: a node lost for good (the job serves on, but nothing brings the node's replica and
router back within the soak: `benchmarks/faults.py` measures it).

    python benchmarks/chaos.py [--minutes 10] [--seed 1] [--network netns|loopback] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

from common import dslaunch, pick_network, public_front, sim_job_dirs, table, write

from dslaunch.engine.tinymodel import NAME
from tests import chaos
from tests.conftest import job_pids, plain_generate
from tests.simnodes import SimCluster


def run(sim: SimCluster, env: dict[str, str], work: Path, minutes: float, seed: int) -> dict[str, Any]:
    token, public = public_front(sim, work)
    up = dslaunch(env, "up", "-H", str(sim.hostfile(slots=2)), "--work-dir", str(work), "--tp", "2",
                  "--routers", "2", "--hang-timeout", "10", "--max-restarts", "100", "--timeout", "400", *public,
                  timeout=500)  # fmt: skip
    if up.returncode != 0:
        raise SystemExit(f"up failed:\n{up.stdout}\n{up.stderr}")
    rec = json.loads((Path(env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
    try:
        greedy = dict(zip(chaos.PROMPTS, plain_generate(work / "models" / NAME, chaos.PROMPTS, chaos.K), strict=True))
        status = lambda: json.loads(dslaunch(env, "status", "--json").stdout)  # noqa: E731
        kinds = chaos.FAULTS + (chaos.NET_FAULTS if sim.network else ())
        monkey = chaos.Chaos(sim, status, rec, random.Random(seed), kinds, token=token)
        seeded = chaos.seeded_reference(monkey.routers[0], chaos.PROMPTS, token)
        clients = chaos.Clients(monkey.routers, chaos.PROMPTS, per_kind=2, token=token)
        report = chaos.soak(monkey, clients, minutes * 60, every=(20, 40), warmup=60)
        chaos.judge(report, greedy, seeded)
        st = status()
        restarts = {"replicas": [r["restarts"] for r in st["replicas"]],
                    "router_kills": sum(f.name == "router killed" for f in report.faults)}  # fmt: skip
    finally:
        down = dslaunch(env, "down", "--grace", "3", timeout=180)
        left = job_pids(f"DSLAUNCH_JOB_ID={rec['job_id']}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return {**chaos.summary(report), "restarts": restarts, "down_rc": down.returncode, "left_after_down": len(left)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1, help="the faults' random draw")
    ap.add_argument("--network", choices=["netns", "loopback"], default=None,
                    help="nodes in network namespaces (default, where root can make them) or on 127.0.0.x")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    network = pick_network(args.network)
    with sim_job_dirs("dslaunch-chaos-", netns=network == "netns") as (sim, env, work):
        out = run(sim, env, work, args.minutes, args.seed)
    rows = [[kind, c["answered"], c["failed"]] for kind, c in sorted(out["requests"].items())]
    print(table(["requests", "answered", "failed"], rows))
    faults: dict[str, int] = {}
    for f in out["faults"]:
        faults[f["fault"]] = faults.get(f["fault"], 0) + 1
    print(table(["fault", "times"], [[k, v] for k, v in sorted(faults.items())]))
    mem = out["memory"]
    print(table(["check", "result"], [
        ["wrong answers (corrupted, duplicated)", len(out["wrong"])],
        ["failures the README does not allow", len(out["failed_unexpectedly"])],
        ["failures it allows (unseeded stream lost mid-way, stream on a killed router)", out["failed_as_allowed"]],
        ["replica restarts", out["restarts"]["replicas"]],
        ["router RSS growth after warm-up (%)", mem.get("router", {}).get("max_growth_pct")],
        ["agent RSS growth after warm-up (%)", mem.get("agent", {}).get("max_growth_pct")],
        ["rank RSS growth after warm-up (%, ranks never restarted)", mem.get("rank", {}).get("max_growth_pct")],
        ["processes left after down", out["left_after_down"]],
    ]))  # fmt: skip
    for line in out["wrong"] + out["failed_unexpectedly"]:
        print("  ", line)
    setup = (f"2 simulated SSH nodes x 2 slots ({network}), --tp 2, --routers 2, --hang-timeout 10, "
             "--max-restarts 100; "
             f"{args.minutes:g} min; "
             f"2 clients each of greedy, seeded streams, unseeded streams, back to back, failover over both "
             f"routers; a fault every 20-40 s (seed {args.seed})")  # fmt: skip
    write("chaos", {"setup": setup, **out}, args.out)


if __name__ == "__main__":
    main()
