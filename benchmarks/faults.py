"""Failure detection: for each fault, how long until the job notices, until it serves again, and
what it cost the clients.

One job on 2 simulated SSH nodes x 2 slots, `--tp 2` (a replica per node), two routers (router K
on node K), `--hang-timeout` short. Four closed-loop greedy clients that know both routers and
retry as the Python client does run the whole time. The faults come one after the other, each
once the job is whole again:

| fault | how |
| --- | --- |
| rank killed | SIGKILL of replica 1's second rank |
| rank hung | SIGSTOP of replica 1's second rank |
| router killed | SIGKILL of router 0 (its supervisor starts it again) |
| link cut | `ss -K` of every leader's connection to router 0's link port |
| partition | the packets between node 0 and node 1 dropped for 20 s, both still reachable from here |
| node silent | node 1 off the network for 20 s (its interface down: nothing is reset) |
| node lost | every process of node 1 SIGKILLed and its sshd stopped (last: it does not come back) |

A probe asks both routers for `health` every 0.1 s: *noticed* is the first probe that shows the
fault (a replica not ready, a router not answering), *serving again* the first after it where
both routers answer with both replicas ready. Failed requests are the clients' errors between
the fault and 20 s after it was over (the README's failure table says which can fail).

For a partition and a silent node each simulated node needs a network namespace of its own
(`tests/netns.py`; root). Where that cannot be made, `--network loopback` runs the others on
127.0.0.x nodes. With namespaces the routers listen on every address (`--bind 0.0.0.0`, with a
token) and the clients reach them at their nodes' addresses.

    python benchmarks/faults.py [--hang-timeout 10] [--network netns|loopback] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import dslaunch, pick_network, public_front, sim_job_dirs, table, write

from dslaunch.client import Client, FrontError
from tests.chaos import cut_links, router_pid
from tests.conftest import job_pids
from tests.simnodes import node_job_pids

PROMPTS = ["Hello world", "The quick brown fox", "One command", "Numbers 0 1 2"]
AFTER_S = 20.0  # failures are counted this long after the job is whole again
HOLD_S = 20.0  # a partition or a silent node lasts this long


class Load:
    """Closed-loop clients with failover over both routers; every request's time and outcome."""

    def __init__(self, routers: list[tuple[str, int]], token: str | None, clients: int = 4) -> None:
        self.routers, self.token, self.clients = routers, token, clients
        self.stop = threading.Event()
        self.log: list[tuple[float, float, str | None]] = []  # start, end, error or None
        self.pool = concurrent.futures.ThreadPoolExecutor(clients)

    def __enter__(self) -> Load:
        self.runs = [self.pool.submit(self._run, n) for n in range(self.clients)]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        concurrent.futures.wait(self.runs, timeout=120)
        self.pool.shutdown(wait=False)

    def _run(self, n: int) -> None:
        order = self.routers[n % len(self.routers) :] + self.routers[: n % len(self.routers)]
        with Client(*order[0], token=self.token, retry_for=60, timeout=120, also=order[1:]) as c:
            i = 0
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    c.generate(PROMPTS[(n + i) % len(PROMPTS)], max_new_tokens=12)
                    err = None
                except (FrontError, OSError) as e:
                    err = f"{type(e).__name__}: {e}"[:200]
                self.log.append((t0, time.monotonic(), err))
                i += 1

    def between(self, t0: float, t1: float) -> tuple[int, list[str]]:
        """Requests that ended in [t0, t1]: how many, and the errors among them."""
        done = [e for s, end, e in self.log if t0 <= end <= t1]
        return len(done), [e for e in done if e]


View = dict[str, Any] | None  # one router's answer: its replicas' states and its uptime; None: no answer


class Probe:
    """Both routers' `health` every 0.1 s: (time, per router: its View)."""

    def __init__(self, routers: list[tuple[str, int]], token: str | None) -> None:
        self.routers, self.token = routers, token
        self.seen: list[tuple[float, list[View]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.pool = concurrent.futures.ThreadPoolExecutor(len(routers))  # a silent router delays no other

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.pool.shutdown(wait=False)

    def _ask(self, router: tuple[str, int]) -> View:
        try:
            with Client(*router, token=self.token, retry_for=0, timeout=1) as c:
                h = c.health()
            return {"states": [r["state"] for r in h["replicas"]], "uptime": float(h["uptime_s"])}
        except (FrontError, OSError):
            return None

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            t = time.monotonic()
            self.seen.append((t, list(self.pool.map(self._ask, self.routers))))

    def first(self, after: float, cond: Callable[[list[View]], bool], within: float) -> float | None:
        """When a probe after `after` first met `cond`, waiting up to `within` seconds for one."""
        deadline = time.monotonic() + within
        while True:
            for t, views in list(self.seen):
                if t >= after and cond(views):
                    return t
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


def whole(views: list[View]) -> bool:
    return all(v is not None and v["states"] and all(s == "ready" for s in v["states"]) for v in views)


def replica_down(r: int) -> Callable[[list[View]], bool]:
    """Some router shows replica r not ready."""
    return lambda views: any(v is not None and len(v["states"]) > r and v["states"][r] != "ready" for v in views)


def router_restarted(k: int, uptime: float) -> Callable[[list[View]], bool]:
    """Router K does not answer, or a new router process does (its supervisor holds the port, so
    clients mostly see a short wait, not a refusal)."""
    return lambda views: views[k] is None or views[k]["uptime"] < uptime


def router_lost_a_replica(k: int, r: int | None = None) -> Callable[[list[View]], bool]:
    """Router K answers, and shows replica `r` (any replica: None) not ready."""

    def cond(views: list[View]) -> bool:
        v = views[k]
        return v is not None and any(s != "ready" for i, s in enumerate(v["states"]) if r is None or i == r)

    return cond


def measure(sim: Any, env: dict[str, str], work: Path, hang_timeout: float) -> list[dict[str, Any]]:
    home, net = Path(env["DSLAUNCH_HOME"]), sim.network
    token, public = public_front(sim, work)
    up = dslaunch(env, "up", "-H", str(sim.hostfile(slots=2)), "--work-dir", str(work), "--tp", "2",
                  "--routers", "2", "--hang-timeout", f"{hang_timeout:g}", "--timeout", "400", *public,
                  timeout=500)  # fmt: skip
    if up.returncode != 0:
        raise SystemExit(f"up failed:\n{up.stdout}\n{up.stderr}")
    rec = json.loads((home / "jobs" / "default.json").read_text())
    jid, ports = rec["job_id"], [int(p) for p in rec["front"]["ports"]]
    routers = [(sim.nodes[k].addr if net else "127.0.0.1", port) for k, port in enumerate(ports)]
    rows: list[dict[str, Any]] = []
    try:
        with Load(routers, token) as load, Probe(routers, token) as probe:
            if probe.first(0, whole, 120) is None:
                raise SystemExit("the job never looked whole to both routers")
            time.sleep(3)

            def rank_pid(rank: int) -> int:
                st = json.loads(dslaunch(env, "status", "--json").stdout)
                return next(r["pid"] for r in st["ranks"] if r["rank"] == rank)

            def fault(name: str, do: Callable[[], None], noticed: Callable[..., bool], back: bool = True,
                      undo: Callable[[], None] | None = None) -> None:  # fmt: skip
                """`undo`: the fault ends HOLD_S after it began; serving again counts from then."""
                t0 = time.monotonic()
                do()
                seen = probe.first(t0, noticed, 300)
                over = t0
                if undo is not None:
                    time.sleep(max(0.0, t0 + HOLD_S - time.monotonic()))
                    over = time.monotonic()
                    undo()
                again = probe.first(max(over, seen or t0), whole, 300) if back and seen is not None else None
                end = (again or seen or over) + AFTER_S
                while time.monotonic() < end:
                    time.sleep(0.5)
                answered, errors = load.between(t0, end)
                since = lambda t: None if t is None else round(t - over if t >= over else t - t0, 2)  # noqa: E731
                rows.append({"fault": name, "noticed_s": None if seen is None else round(seen - t0, 2),
                             "serving_again_s": since(again), "held_s": round(over - t0, 1) if undo else None,
                             "answered": answered, "failed": len(errors),
                             "errors": sorted(set(errors))[:5]})  # fmt: skip
                print(f"{name}: {rows[-1]}", flush=True)
                time.sleep(3)

            # each target is found before its fault's clock starts (a `status` takes a second or two)
            victim = rank_pid(3)
            fault("rank killed (SIGKILL)", lambda: os.kill(victim, signal.SIGKILL), replica_down(1))
            victim = rank_pid(3)
            fault("rank hung (SIGSTOP)", lambda: os.kill(victim, signal.SIGSTOP), replica_down(1))
            node0 = sim.nodes[0].addr
            victim = router_pid(jid, node0)[0]
            up_s = probe.seen[-1][1][0]["uptime"] if probe.seen[-1][1][0] else 0.0
            fault("router killed (SIGKILL)", lambda: os.kill(victim, signal.SIGKILL), router_restarted(0, up_s))
            link_port = router_pid(jid, node0)[1]

            fault("link to router 0 cut (ss -K)", lambda: cut_links(sim, node0, link_port), router_lost_a_replica(0))
            if net:
                split = lambda v: router_lost_a_replica(0, 1)(v) or router_lost_a_replica(1, 0)(v)  # noqa: E731
                fault(f"partition of node 0 and node 1 ({HOLD_S:g} s)", lambda: net.partition(0, 1), split,
                      undo=net.heal)  # fmt: skip
                fault(f"node 1 silent ({HOLD_S:g} s, interface down)", lambda: net.silence(1),
                      router_lost_a_replica(0, 1), undo=lambda: net.unsilence(1))  # fmt: skip

            def lose_node1() -> None:
                for pid in node_job_pids(jid, sim.nodes[1].addr):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                sim.cut_node(sim.nodes[1])

            fault("node 1 lost (every process SIGKILLed, sshd stopped)", lose_node1, router_lost_a_replica(0, 1),
                  back=False)  # fmt: skip
    finally:
        if net:
            net.heal()
            net.unsilence(1)
        dslaunch(env, "down", "--grace", "3", timeout=120)
        sim.start_node(sim.nodes[1])
        dslaunch(env, "down", "--grace", "3", timeout=120)
        left = job_pids(f"DSLAUNCH_JOB_ID={jid}")
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            print(f"left over after down: {left}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hang-timeout", type=float, default=10.0, help="--hang-timeout of the job (s)")
    ap.add_argument("--network", choices=["netns", "loopback"], default=None,
                    help="nodes in network namespaces (default, where root can make them) or on 127.0.0.x")  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    network = pick_network(args.network)
    with sim_job_dirs("dslaunch-faults-", netns=network == "netns") as (sim, env, work):
        rows = measure(sim, env, work, args.hang_timeout)
    keys = ("fault", "noticed_s", "serving_again_s", "answered", "failed")
    heads = ["fault", "noticed (s)", "serving again (s; after the fault ended)", "answered", "failed"]
    print(table(heads, [[r[k] for k in keys] for r in rows]))
    setup = (
        f"2 simulated SSH nodes x 2 slots ({network}), --tp 2, --routers 2, --hang-timeout {args.hang_timeout:g}; "
        "4 closed-loop greedy clients (12 tokens) with failover over both routers; router health probed every 0.1 s"
    )
    write("faults", {"setup": setup, "faults": rows}, args.out)


if __name__ == "__main__":
    main()
