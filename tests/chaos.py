"""A chaos soak on a live job: mixed clients against every router while random faults follow one
another, every answer checked. Used by `benchmarks/chaos.py` (10 minutes) and by
tests/test_replicas.py (a minute, on its module's job).

The job is 2 simulated SSH nodes x 2 slots, `--tp 2`, two routers. Three kinds of client run the
whole time, each knowing both routers and retrying as the Python client does:

- greedy requests: the text must be the plain model's;
- seeded sampled streams: the chunks must add up to the final text, and both must be what the same
  request gave on the idle job before the first fault (a re-run never repeats or changes a chunk);
- unseeded sampled streams: cannot be re-run elsewhere once a chunk is out, so the README allows
  them one failure: `unavailable`, naming the seed, when their replica is lost mid-stream.

A request whose router is killed while it streams gets a connection error (README: "requests on
connections to the old one get a connection error"); that too is allowed, for streams only. Every
other failure, wrong text or duplicated chunk counts against the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from dslaunch.client import Client, FrontError
from tests.conftest import job_pids
from tests.simnodes import SimCluster, environ_of, node_job_pids

PROMPTS = ["Hello world", "The quick brown fox", "One command", "Numbers 0 1 2"]
K = 12
FAULTS = ("rank killed", "rank hung", "router killed", "link cut")
NET_FAULTS = ("partition", "node silent")  # on nodes in network namespaces (SimCluster(netns=True))
HOLD_S = (8.0, 15.0)  # how long a partition or a silent node lasts (uniform)
Router = tuple[str, int]  # where a client reaches one router: host, port


@dataclass
class Outcome:
    kind: str  # greedy, seeded, unseeded
    prompt: str
    start: float
    end: float
    text: str | None = None  # the answer's text (a stream's final answer)
    chunks: str | None = None  # a stream's chunks, joined
    error: str | None = None  # "ConnectionError: ...", "FrontError: unavailable: ..."
    code: str | None = None  # a FrontError's code


@dataclass
class Fault:
    name: str
    target: str
    at: float
    whole_again_s: float | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # corrupted or duplicated answers
    allowed: list[str] = field(default_factory=list)  # failures the README allows
    failed: list[str] = field(default_factory=list)  # failures it does not
    memory: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            row = out.setdefault(o.kind, {"answered": 0, "failed": 0})
            row["failed" if o.error else "answered"] += 1
        return out


class ClientThreads:
    """Client threads that run from `with` until its end: set `threads`; each watches `stop`."""

    stop: threading.Event
    threads: list[threading.Thread]
    join_s = 180.0

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.join_s)


class Clients(ClientThreads):
    """`per_kind` clients of each kind; `pause` seconds between one client's requests."""

    def __init__(self, routers: list[Router], prompts: list[str], per_kind: int = 2, pause: float = 0.0,
                 token: str | None = None) -> None:  # fmt: skip
        self.routers, self.prompts, self.pause, self.token = routers, prompts, pause, token
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        kinds = [k for k in ("greedy", "seeded", "unseeded") for _ in range(per_kind)]
        self.threads = [threading.Thread(target=self._run, args=(n, k), daemon=True) for n, k in enumerate(kinds)]

    def _run(self, n: int, kind: str) -> None:
        order = self.routers[n % len(self.routers) :] + self.routers[: n % len(self.routers)]
        with Client(*order[0], token=self.token, retry_for=60, timeout=120, also=order[1:]) as c:
            i = 0
            while not self.stop.is_set():
                prompt = self.prompts[(n + i) % len(self.prompts)]
                i += 1
                self.outcomes.append(_one(c, kind, prompt))
                self.stop.wait(self.pause)


def _one(c: Client, kind: str, prompt: str) -> Outcome:
    o = Outcome(kind, prompt, time.monotonic(), 0.0)
    try:
        if kind == "greedy":
            o.text = c.generate(prompt, max_new_tokens=K)["text"]
        else:
            params: dict[str, Any] = {"temperature": 1.0, **({"seed": seed_of(prompt)} if kind == "seeded" else {})}
            chunks = []
            for event in c.stream(prompt, max_new_tokens=K, **params):
                if "chunk" in event:
                    chunks.append(event["chunk"])
                else:
                    o.text = event["text"]
            o.chunks = "".join(chunks)
    except FrontError as e:
        o.error, o.code = f"FrontError: {e}", e.code
    except OSError as e:  # ConnectionError, TimeoutError
        o.error = f"{type(e).__name__}: {e}"
    o.end = time.monotonic()
    return o


def seed_of(prompt: str) -> int:
    return 1000 + sum(prompt.encode()) % 1000


def seeded_reference(router: Router, prompts: list[str], token: str | None = None) -> dict[str, str]:
    """Each prompt's seeded sample, asked alone of the idle job."""
    with Client(*router, token=token, retry_for=60, timeout=120) as c:
        return {p: c.generate(p, max_new_tokens=K, temperature=1.0, seed=seed_of(p))["text"] for p in prompts}


def judge(report: Report, greedy_ref: dict[str, str], seeded_ref: dict[str, str]) -> None:
    """Sort every outcome: right, wrong (corrupted, duplicated), or failed (allowed or not)."""
    # a router killed, or gone silent with its node: its streams lose their connection
    kills = [f.at for f in report.faults if f.name == "router killed" or f.name == "node silent"]
    for o in report.outcomes:
        what = f"{o.kind} {o.prompt!r}"
        if o.error:
            stream = o.kind != "greedy"
            lost_replica = o.kind == "unseeded" and o.code == "unavailable" and "seed" in o.error
            router_cut = stream and o.code is None and any(o.start - 1 <= t <= o.end for t in kills)
            (report.allowed if lost_replica or router_cut else report.failed).append(f"{what}: {o.error}")
        elif o.kind == "greedy" and o.text != greedy_ref[o.prompt]:
            report.wrong.append(f"{what}: {o.text!r} is not the plain model's {greedy_ref[o.prompt]!r}")
        elif o.kind != "greedy" and o.chunks != o.text:
            report.wrong.append(f"{what}: chunks {o.chunks!r} do not add up to the answer {o.text!r}")
        elif o.kind == "seeded" and o.text != seeded_ref[o.prompt]:
            report.wrong.append(f"{what}: {o.text!r} is not its sample on the idle job {seeded_ref[o.prompt]!r}")


class Chaos:
    """Faults on a live job (2 nodes, 2 replicas of `--tp 2`, a router per node): each drawn from
    `kinds`, or, with `in_order`, `kinds` one after the other; a rank fault strikes one of the
    ranks `ranks` keeps (all by default). On nodes in network namespaces the routers listen on
    every address (`--bind 0.0.0.0`, `token`) and are reached at their nodes' addresses."""

    def __init__(self, sim: SimCluster, status: Callable[[], dict[str, Any]], rec: dict[str, Any],
                 rng: random.Random, kinds: tuple[str, ...] = FAULTS, in_order: bool = False,
                 ranks: Callable[[dict[str, Any]], bool] = lambda r: True,
                 token: str | None = None) -> None:  # fmt: skip
        self.sim, self.status, self.rec, self.rng, self.kinds = sim, status, rec, rng, kinds
        self.in_order, self.ranks, self.struck, self.token = in_order, ranks, 0, token
        hosts = [n.addr for n in sim.nodes] if sim.network else ["127.0.0.1"] * len(sim.nodes)
        self.routers = [(hosts[k], int(p)) for k, p in enumerate(rec["front"]["ports"])]

    def whole(self) -> bool:
        """Both routers answer, each with both replicas ready."""
        for router in self.routers:
            try:
                with Client(*router, token=self.token, retry_for=0, timeout=5) as c:
                    reps = c.health()["replicas"]
            except (FrontError, OSError):
                return False
            if not reps or any(r["state"] != "ready" for r in reps):
                return False
        return True

    def until_whole(self, within: float = 300) -> float | None:
        t0 = time.monotonic()
        while not self.whole():
            if time.monotonic() - t0 > within:
                return None
            time.sleep(0.2)
        return time.monotonic() - t0

    def until_broken(self, within: float) -> None:
        deadline = time.monotonic() + within
        while self.whole() and time.monotonic() < deadline:
            time.sleep(0.2)

    def strike(self) -> Fault:
        name = self.kinds[self.struck % len(self.kinds)] if self.in_order else self.rng.choice(self.kinds)
        self.struck += 1
        if name in ("rank killed", "rank hung"):
            rank = self.rng.choice([r for r in self.status()["ranks"] if self.ranks(r)])
            target, pid = f"rank {rank['rank']} on {rank['host']}", int(rank["pid"])
            do = lambda: os.kill(pid, signal.SIGKILL if name == "rank killed" else signal.SIGSTOP)  # noqa: E731
        elif name in NET_FAULTS:
            return self._network_fault(name)
        else:
            k = self.rng.randrange(len(self.routers))
            pid, link_port = router_pid(self.rec["job_id"], self.sim.nodes[k].addr)
            target = f"router {k}"
            if name == "router killed":
                do = lambda: os.kill(pid, signal.SIGKILL)  # noqa: E731
            else:
                do = lambda: cut_links(self.sim, self.sim.nodes[k].addr, link_port)  # noqa: E731
        fault = Fault(name, target, time.monotonic())
        do()
        return fault

    def _network_fault(self, name: str) -> Fault:
        """A partition of the two nodes, or one node off the network, for HOLD_S; then it ends."""
        net = self.sim.network
        assert net is not None, f"{name} needs nodes in network namespaces"
        k = self.rng.randrange(len(self.sim.nodes))
        hold = self.rng.uniform(*HOLD_S)
        target = f"node 0 / node 1, {hold:.0f} s" if name == "partition" else f"node {k}, {hold:.0f} s"
        fault = Fault(name, target, time.monotonic())
        if name == "partition":
            net.partition(0, 1)
            time.sleep(hold)
            net.heal()
        else:
            net.silence(k)
            time.sleep(hold)
            net.unsilence(k)
        return fault


def cut_links(sim: SimCluster, addr: str, port: int) -> None:
    """`ss -K` every connection to addr:port (a router's link port), in each node's namespace (ss
    sees only its own) or on this machine's loopback."""
    prefixes = [sim.network.exec_prefix(i) for i in range(len(sim.nodes))] if sim.network else [[]]
    for prefix in prefixes:
        for dst in {addr, "127.0.0.1"}:
            subprocess.run([*prefix, "ss", "-K", "dst", dst, "dport", "=", f":{port}"], capture_output=True, check=True)


def router_pid(job_id: str, addr: str) -> tuple[int, int]:
    """The pid of the router on node `addr` (not its supervisor's), and its link port."""
    for pid in node_job_pids(job_id, addr):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"dslaunch.serving.router" in argv and b"dslaunch.node.supervise" not in argv:
            return pid, int(environ_of(pid)["DSLAUNCH_LINK_PORT"])
    raise RuntimeError(f"no router of job {job_id} on {addr}")


def job_rss(job_id: str) -> dict[int, tuple[str, int]]:
    """Each router's, agent's and rank's resident memory (bytes), by pid."""
    out: dict[int, tuple[str, int]] = {}
    for pid in job_pids(f"DSLAUNCH_JOB_ID={job_id}"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            role = ("router" if b"dslaunch.serving.router" in argv and b"supervise" not in argv
                    else "agent" if b"dslaunch.rank.torchrun" in argv or b"torch.distributed.run" in argv
                    else "rank" if b"dslaunch.rank.worker" in argv else None)  # fmt: skip
            if role:
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
                out[pid] = (role, pages * os.sysconf("SC_PAGE_SIZE"))
    return out


def growth(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, Any]:
    """Per role, the largest RSS growth of a process alive at both times (a restarted rank is a new
    process and starts afresh), and how many lived through."""
    out: dict[str, Any] = {}
    for role in ("router", "agent", "rank"):
        lived = [(before[p][1], after[p][1]) for p in before if p in after and before[p][0] == role]
        worst = max((a / b - 1 for b, a in lived), default=None)
        out[role] = {"lived_through": len(lived), "max_growth_pct": None if worst is None else round(100 * worst, 1)}
    return out


def soak(
    chaos: Chaos, clients: Clients, duration: float, every: tuple[float, float], warmup: float, min_faults: int = 0
) -> Report:
    """Run the clients for `duration` seconds with a fault every `every` seconds (uniform), each
    once the job is whole again; RSS is compared between `warmup` seconds in and the end. It goes
    on past `duration` (up to 4 times it) until `min_faults` have struck: on a slow machine the
    job takes longer to be whole again, and a short soak would otherwise see fewer faults."""
    report = Report()
    t0 = time.monotonic()
    mem0: dict[int, tuple[str, int]] | None = None

    def going() -> bool:
        now = time.monotonic() - t0
        return now < duration or (len(report.faults) < min_faults and now < 4 * duration)

    with clients:
        next_at = t0 + chaos.rng.uniform(*every)
        while going():
            if mem0 is None and time.monotonic() > t0 + warmup:
                mem0 = job_rss(chaos.rec["job_id"])
            if time.monotonic() >= next_at and chaos.whole():
                fault = chaos.strike()
                report.faults.append(fault)
                print(f"{fault.at - t0:6.1f}s  {fault.name}: {fault.target}", flush=True)
                time.sleep(1)
                if fault.name == "rank hung":  # nothing shows until --hang-timeout has passed
                    chaos.until_broken(within=120)
                whole = chaos.until_whole()
                fault.whole_again_s = None if whole is None else round(time.monotonic() - fault.at, 1)
                next_at = time.monotonic() + chaos.rng.uniform(*every)
            time.sleep(0.5)
        chaos.until_whole()
    report.outcomes = list(clients.outcomes)
    if mem0 is not None:
        report.memory = growth(mem0, job_rss(chaos.rec["job_id"]))
    return report


def summary(report: Report) -> dict[str, Any]:
    return {
        "requests": report.counts(),
        "faults": [{"fault": f.name, "target": f.target, "whole_again_s": f.whole_again_s} for f in report.faults],
        "wrong": report.wrong[:20],
        "failed_unexpectedly": report.failed[:20],
        "failed_as_allowed": len(report.allowed),
        "memory": report.memory,
    }


def dump(report: Report) -> str:
    return json.dumps(summary(report), indent=2)
