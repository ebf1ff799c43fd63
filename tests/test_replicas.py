"""Replicas behind two routers, on simulated SSH nodes: 2 nodes x 2 slots with `--tp 2` (two
nodes: a router on each, as by default, router 0 on node 0 and its standby on node 1).

One job for the module (each `up` costs tens of seconds on 2 cores); the tests run in order and
each leaves the job serving: answers, spread over replicas and routers, a rank killed under load,
a rolling restart, a router killed, a client failing over, then node 0 lost under load (the job
serves on through router 1), and finally `down`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dslaunch.client import Client, FrontError
from dslaunch.engine.tinymodel import NAME
from tests import chaos
from tests.conftest import PROMPTS, Cli, job_pids, plain_generate, ssh_job, status_json, wait_status
from tests.simnodes import SimCluster, environ_of, free_port, node_job_pids

pytestmark = pytest.mark.ssh

K = 12


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimCluster, Cli, dict[str, Any]]]:
    up = ("--tp", "2", "--routers", "2", "--timeout", "240")
    for sim, cli, _res in ssh_job(tmp_path_factory, *up, nodes=2, slots=2):
        rec = json.loads((Path(cli.env["DSLAUNCH_HOME"]) / "jobs" / "default.json").read_text())
        yield sim, cli, rec


@pytest.fixture(scope="module")
def want(job: tuple[SimCluster, Cli, dict[str, Any]]) -> dict[str, str]:
    _sim, cli, _rec = job
    prompts = [*PROMPTS, "One command", "Numbers 0 1 2"]
    return dict(zip(prompts, plain_generate(cli.work_dir / "models" / NAME, prompts, K), strict=True))


def _port(rec: dict[str, Any], router: int = 0) -> int:
    return int(rec["front"]["ports"][router])


class Load(chaos.ClientThreads):
    """Clients that do not retry: every failure is recorded, none is hidden.

    Each waits `pause` between its requests: a fault test needs requests arriving all the time, not
    a saturated job, whose every spare CPU cycle the rest of the suite (on 2 cores) then waits for.
    `in_flight` says whether one is on the way when a test strikes (`until_in_flight`).

    `failover`: clients that know both routers (odd ones start on router 1) and retry as the
    client does by default, so a lost router's requests go to the other."""

    def __init__(
        self, port: int, want: dict[str, str], clients: int = 4, failover: int | None = None, pause: float = 0.25
    ) -> None:
        self.port, self.want, self.failover, self.pause = port, want, failover, pause
        self.stop = threading.Event()
        self.ok = 0
        self.in_flight = 0
        self.done: list[float] = []  # when each answer came (monotonic)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(clients)]
        self.join_s = 120.0

    def _run(self, n: int) -> None:
        prompts = list(self.want)
        i = 0
        ports = [self.port] if self.failover is None else [self.port, self.failover][:: -1 if n % 2 else 1]
        also = [("127.0.0.1", p) for p in ports[1:]]
        with Client("127.0.0.1", ports[0], retry_for=0 if self.failover is None else 60, timeout=120, also=also) as c:
            while not self.stop.is_set():
                p = prompts[(n + i) % len(prompts)]
                i += 1
                with self._lock:
                    self.in_flight += 1
                try:
                    text = c.generate(p, max_new_tokens=K)["text"]
                except (FrontError, OSError) as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                    return
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if text != self.want[p]:
                    self.failures.append(f"wrong text for {p!r}: {text!r}")
                self.ok += 1
                self.done.append(time.monotonic())
                self.stop.wait(self.pause)

    def until_in_flight(self, within: float = 30) -> None:
        """Until a request is on its way (the moment to strike)."""
        deadline = time.monotonic() + within
        while not self.in_flight:
            assert time.monotonic() < deadline, "no request went out"
            time.sleep(0.005)


def _replicas(cli: Cli) -> list[dict[str, Any]]:
    return status_json(cli)["replicas"]


def test_two_replicas_answer_like_the_plain_model_and_share_the_load(job, want) -> None:
    _sim, cli, rec = job
    reps = _replicas(cli)
    assert [(r["replica"], r["ranks"], r["state"], r["linked"]) for r in reps] == [
        (0, [0, 1], "ready", "ready"), (1, [2, 3], "ready", "ready"),
    ]  # fmt: skip
    assert reps[0]["hosts"] != reps[1]["hosts"], "one replica per node: each fits in its node's slots"
    q = cli("query", *want, "-k", str(K), "--json")
    assert q.returncode == 0, q.stderr
    assert [r["text"] for r in json.loads(q.stdout)["results"]] == list(want.values())
    with Load(_port(rec), want, clients=6) as load:
        time.sleep(4)
    assert not load.failures and load.ok > 0
    served = [r["served"] for r in wait_status(cli, lambda s: all(r["served"] for r in s["replicas"]), 10)["replicas"]]
    assert all(s > 0 for s in served), f"both replicas took work: {served}"
    with Client("127.0.0.1", _port(rec), retry_for=0) as c:
        h = c.health()
    assert h["world_size"] == 4 and len(h["replicas"]) == 2


def test_the_samples_of_one_request_stay_on_one_replica(job) -> None:
    """`n` samples share their prompt's KV blocks only on one replica: the router keeps them
    together (spread by load alone, four idle samples would go two and two)."""
    _sim, _cli, rec = job

    def served() -> list[int]:
        with Client("127.0.0.1", _port(rec), retry_for=0) as c:
            return [r["served"] for r in c.health()["replicas"]]

    body = json.dumps({"prompt": "Numbers 0 1 2", "max_tokens": 4, "temperature": 1.0, "seed": 3, "n": 4}).encode()
    for _ in range(2):
        before = served()
        ask = urllib.request.Request(f"http://127.0.0.1:{_port(rec)}/v1/completions", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(ask, timeout=120) as r:
            assert len(json.loads(r.read())["choices"]) == 4
        moved = [a - b for a, b in zip(served(), before, strict=True)]
        assert sorted(moved) == [0, 4], moved


def test_two_routers_serve_every_replica_and_status_lists_both(job, want) -> None:
    _sim, cli, rec = job
    routers = [n for n in rec["nodes"] if n["kind"] == "router"]
    assert [(n["host"], n["node_dir"].rsplit("/", 1)[1]) for n in routers] == [
        ("node0", "router"),
        ("node1", "router1"),
    ]
    with Load(_port(rec), want, clients=4, failover=_port(rec, 1)) as load:  # two clients start on each router
        time.sleep(5)
    assert not load.failures and load.ok > 0
    st = wait_status(cli, lambda s: all(all(r["served_by"]) for r in s["replicas"]), 15)
    assert [r["links"] for r in st["replicas"]] == [["ready", "ready"]] * 2
    assert all(all(r["served_by"]) for r in st["replicas"]), f"each replica took work from both routers: {st}"
    assert [(r["router"], r["host"], r["address"], r["state"]) for r in st["routers"]] == [
        (0, "node0", f"127.0.0.1:{_port(rec)}", "ready"), (1, "node1", f"127.0.0.1:{_port(rec, 1)}", "ready"),
    ]  # fmt: skip
    text = cli("status").stdout
    assert "routers (each serves every replica)" in text and f"127.0.0.1:{_port(rec, 1)}" in text, text
    q = cli("query", PROMPTS[0], "-k", str(K), "--router", "1", "--json")
    assert q.returncode == 0 and json.loads(q.stdout)["text"] == want[PROMPTS[0]], q.stderr


def test_the_python_client_fails_over_from_a_router_that_does_not_answer(job, want) -> None:
    _sim, _cli, rec = job
    dead = free_port()  # nothing listens there: a router that is gone
    with Client("127.0.0.1", dead, retry_for=30, timeout=60, also=[("127.0.0.1", _port(rec, 1))]) as c:
        assert c.generate(PROMPTS[0], max_new_tokens=K)["text"] == want[PROMPTS[0]]
        assert c.address == f"127.0.0.1:{_port(rec, 1)}", "it stays with the router that answered"
        events = list(c.stream(PROMPTS[1], max_new_tokens=K))
    assert "".join(e.get("chunk", "") for e in events) == want[PROMPTS[1]]
    with pytest.raises(ConnectionError), Client("127.0.0.1", dead, retry_for=0) as c:
        c.generate(PROMPTS[0], max_new_tokens=K)  # without retries, no failover either


def test_a_rank_killed_under_load_restarts_only_its_replica_and_no_request_fails(job, want) -> None:
    _sim, cli, rec = job
    st = status_json(cli)
    victim = next(r for r in st["ranks"] if r["rank"] == 3)
    with Load(_port(rec), want, clients=4) as load:
        time.sleep(1.5)
        load.until_in_flight()
        os.kill(victim["pid"], signal.SIGKILL)
        st = wait_status(cli, lambda s: s["state"] == "ready" and s["replicas"][1]["restarts"] == 1, 150)
        time.sleep(1)
    assert not load.failures, load.failures[:3]
    assert load.ok > 0
    reps = st["replicas"]
    assert (reps[0]["restarts"], reps[1]["restarts"]) == (0, 1), reps
    assert st["last_failure"]["rank"] == 3 and "SIGKILL" in st["last_failure"]["cause"]


def test_a_minute_of_random_faults_loses_and_corrupts_nothing(job, want) -> None:
    """The chaos soak (`benchmarks/chaos.py`, tests/chaos.py) for a minute, paced: a rank
    SIGKILLed, a router SIGKILLed and a link cut, 15-25 s apart, under greedy, seeded-stream and
    unseeded-stream clients on both routers. (A hung rank is test_hang_and_backoff's: this job
    keeps the default --hang-timeout.)"""
    sim, cli, rec = job
    # one of each, in this order; the rank killed is replica 1's: one restart more is within its
    # budget (3), which the rolling restart below renews, and replica 0 keeps its count of 0
    kinds = ("rank killed", "router killed", "link cut")
    monkey = chaos.Chaos(sim, lambda: status_json(cli), rec, random.Random(3), kinds, in_order=True,
                         ranks=lambda r: r["rank"] >= 2)  # fmt: skip
    assert monkey.until_whole(120) is not None
    seeded = chaos.seeded_reference(monkey.routers[0], list(want))
    clients = chaos.Clients(monkey.routers, list(want), per_kind=1, pause=1.0)
    report = chaos.soak(monkey, clients, 60, every=(15, 25), warmup=10, min_faults=len(kinds))
    chaos.judge(report, want, seeded)
    counts = report.counts()
    assert [f.name for f in report.faults] == list(kinds), chaos.dump(report)
    assert all(f.whole_again_s is not None for f in report.faults), chaos.dump(report)
    assert not report.wrong and not report.failed, chaos.dump(report)
    assert all(counts.get(k, {}).get("answered", 0) > 10 for k in ("greedy", "seeded", "unseeded")), counts
    assert wait_status(cli, lambda s: s["state"] == "ready", 120)["state"] == "ready"


def test_a_rolling_restart_under_load_fails_no_request(job, want) -> None:
    _sim, cli, rec = job
    with Load(_port(rec), want, clients=4) as load:
        res = cli("restart", "--replica", "1", timeout=400)  # every replica in turn: the same, twice as long
    assert res.returncode == 0, res.stdout + res.stderr
    assert "restarted job 'default': replica 1 (" in res.stdout
    assert not load.failures, load.failures[:3]
    st = status_json(cli)
    assert st["state"] == "ready" and all(r["linked"] == "ready" for r in st["replicas"])


def test_the_router_killed_comes_back_on_its_port_and_the_job_goes_on(job, want) -> None:
    _sim, cli, rec = job
    child = [
        p
        for p in job_pids(f"DSLAUNCH_JOB_ID={rec['job_id']}")
        if _is_router(p) and environ_of(p).get("DSLAUNCH_NODE_DIR", "").endswith("/router")
    ]  # not router1's
    assert len(child) == 1, "one router process, under its supervisor"
    caught: list[BaseException] = []

    def in_flight() -> None:  # a long request on the router when it dies: a clear error, no hang
        try:
            with Client("127.0.0.1", _port(rec), retry_for=0, timeout=60) as c:
                c.generate(PROMPTS[0], max_new_tokens=400)
        except (FrontError, OSError) as e:
            caught.append(e)

    asker = threading.Thread(target=in_flight, daemon=True)
    asker.start()
    time.sleep(0.5)
    for p in child:
        os.kill(p, signal.SIGKILL)
    asker.join(60)
    assert caught and "closed the connection" in str(caught[0]), caught
    deadline = time.monotonic() + 60
    while True:
        try:
            with Client("127.0.0.1", _port(rec), retry_for=0, timeout=60) as c:
                text = c.generate(PROMPTS[0], max_new_tokens=K)["text"]
            break
        except (FrontError, OSError):
            assert time.monotonic() < deadline, "the router did not come back"
            time.sleep(0.3)
    assert text == want[PROMPTS[0]]
    st = wait_status(cli, lambda s: s["state"] == "ready" and s["front"]["ready"], 60)
    assert st["front"]["address"] == f"127.0.0.1:{_port(rec)}"
    assert [r["restarts"] for r in st["replicas"]] == [0, 0], "ranks are untouched by a router crash"
    log = cli("logs", "--router")
    assert log.returncode == 0 and "router 0: " in log.stdout and "router 1: " in log.stdout, log.stdout
    assert "killed by signal 9" in log.stdout and "replica 1 linked" in log.stdout, log.stdout


def test_losing_node_0_under_load_fails_no_request_and_the_job_serves_on_through_router_1(job, want) -> None:
    """Every process of node 0 (router 0, its supervisor, replica 0's agent and ranks) SIGKILLed and
    its sshd stopped, under retrying clients that know both routers: none fails (README, Replicas)."""
    sim, cli, rec = job
    node0 = sim.nodes[0]
    with Load(_port(rec), want, clients=4, failover=_port(rec, 1)) as load:
        time.sleep(3)
        doomed = node_job_pids(rec["job_id"], node0.addr)
        load.until_in_flight()
        assert len(doomed) >= 5, f"router, supervisor, agent and ranks on node 0: {doomed}"
        for p in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        sim.cut_node(node0)
        cut = time.monotonic()
        while time.monotonic() < cut + 60 and sum(t > cut + 2 for t in load.done) < 12:
            time.sleep(0.5)
    assert not load.failures, load.failures[:3]
    after = sum(t > cut for t in load.done)
    assert after >= 12, f"the job serves on through router 1: {after} answers after the cut"
    st = status_json(cli)
    assert st["state"] == "degraded" and "node0" in st["reason"] and "router 0" in st["reason"], st["reason"]
    assert [r["state"] for r in st["routers"]] == ["unreachable", "ready"]
    q = cli("query", PROMPTS[0], "-k", str(K), "--json")  # router 0's tunnel fails: router 1 answers
    assert q.returncode == 0 and json.loads(q.stdout)["text"] == want[PROMPTS[0]], q.stderr


def test_down_cleans_the_nodes_that_answer_and_names_the_lost_one(job) -> None:
    sim, cli, rec = job
    down = cli("down", "--grace", "3")
    assert down.returncode != 0 and "node0" in down.stdout + down.stderr, down.stdout + down.stderr
    assert node_job_pids(rec["job_id"], sim.nodes[1].addr) == [], "node 1 is clean"
    sim.start_node(sim.nodes[0])  # the node answers again: a second `down` ends the job
    assert cli("down").returncode == 0
    assert job_pids(f"DSLAUNCH_JOB_ID={rec['job_id']}") == []


def _is_router(pid: int) -> bool:
    """The router itself, not its supervisor (whose command line names the router too)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"dslaunch.serving.router" in argv and b"dslaunch.node.supervise" not in argv
