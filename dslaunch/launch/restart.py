"""`dslaunch restart`: restart a job's replicas one at a time, without failing a request.

Per replica: the router stops giving it new work (drain) and it finishes what it has; its agents
are stopped and started again as they were (a new model on disk is loaded, a leak is gone, the
restart budget starts afresh); once its ranks are ready and its leader has linked to the router
again, it gets work again and the next replica follows. With one replica there is nowhere else to
send work: requests wait in the router's queue during the restart (bounded by their time-outs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dslaunch.errors import UserError
from dslaunch.launch import store
from dslaunch.launch.ready import LaunchFailed, failure_details, node_summary
from dslaunch.launch.records import cluster_for
from dslaunch.launch.watch import NodeWatch
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.records import JobRecord
from dslaunch.wire.states import DRAINED, LINKED, LinkState, NodeStage


@dataclass
class RestartReport:
    name: str
    replicas: list[int] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)


def restart(
    name: str,
    only: list[int] | None = None,
    drain_timeout: float = 300.0,
    ready_timeout: float = 300.0,
    say: Callable[[str], None] = lambda _line: None,
) -> RestartReport:
    """Restart the job's replicas (all, or `only`) one after the other; raise naming what failed."""
    with store.locked(name):
        rec = store.require(name)
        if rec.router is None:
            raise UserError(f"job {name!r} was started by an older dslaunch without a router; restart it with down/up")
        targets = list(range(rec.replicas)) if only is None else only
        bad = [r for r in targets if not 0 <= r < rec.replicas]
        if bad:
            raise UserError(f"--replica {bad[0]}: job {name!r} has replicas 0..{rec.replicas - 1}")
        report = RestartReport(name)
        with cluster_for(rec) as cluster:
            try:
                for r in targets:
                    t0 = time.monotonic()
                    restart_one(rec, cluster, r, drain_timeout, ready_timeout, say)
                    report.replicas.append(r)
                    report.seconds[r] = round(time.monotonic() - t0, 1)
            finally:
                _drain(rec, cluster, [])
        return report


def restart_one(
    rec: JobRecord, cluster: Cluster, replica: int, drain_timeout: float, ready_timeout: float,
    say: Callable[[str], None],
) -> None:  # fmt: skip
    """Drain, restart and wait for one replica, watching its nodes and the routers' (one stream per
    node, not a status call per node several times a second: on a small machine a poll takes
    the CPU from the ranks it waits for)."""
    units = [i for i, n in enumerate(rec.nodes) if n.kind == "agent" and n.replica == replica]
    routers = _routers(rec)
    args = lambda i, _c: {"node_dir": rec.nodes[i].node_dir, "job_id": rec.job_id, "node_rank": i}  # noqa: E731
    with NodeWatch(cluster, args, max_s=drain_timeout + ready_timeout + 120, only=units + routers) as watch:
        if rec.replicas > 1:
            say(f"replica {replica}: draining")
            _drain(rec, cluster, [replica])
            _wait(watch, lambda: _drained(_linked(watch, routers, replica)), drain_timeout,
                  f"replica {replica} still had work after {drain_timeout:g}s (--drain-timeout)")  # fmt: skip
        say(f"replica {replica}: restarting {len(units)} agent(s)")
        clients = [cluster.clients[i] for i in units]
        # every agent of the replica stops before any starts again: a new agent must never meet an
        # old one (its rendezvous store, its ports) that is still on its way out
        stops = cluster.map(lambda c: c.call("restart", {**args(cluster.clients.index(c), c), "hold": True}), clients)
        stops.raise_failures(f"restart of replica {replica}")
        again = {id(c): (r.value or {})["start_again"] for c, r in zip(clients, stops, strict=True)}
        results = cluster.map(lambda c: cluster.launcher.start(c, again[id(c)]), clients)
        results.raise_failures(f"restart of replica {replica}")
        # a node's answer counts once it is about the new agent: lines from before the restart
        # (the old agent ready, or none while it stopped) can still arrive after it returned
        new_pid = {i: (r.value or {}).get("pid") for i, r in zip(units, results, strict=True)}
        say(f"replica {replica}: waiting for its ranks and the router")

        def ready() -> bool:
            stages = []
            for i in units:
                if watch.errors[i] is not None:
                    raise LaunchFailed(f"lost contact with replica {replica} while restarting: {watch.errors[i]}")
                st = watch.latest[i]
                if st is None or (new_pid[i] is not None and (st.get("agent") or {}).get("pid") != new_pid[i]):
                    return False  # no answer yet, or one about the old agent
                stages.append(node_summary(rec.nodes[i].nprocs, st)[0])
            if NodeStage.FAILED in stages:
                raise LaunchFailed(f"replica {replica} failed while restarting", failure_details(rec, cluster))
            return all(s == NodeStage.READY for s in stages) and _all_in(_linked(watch, routers, replica), LINKED)

        late = f"replica {replica} was not ready again within {ready_timeout:g}s (--timeout)"
        _wait(watch, ready, ready_timeout, late)
        if rec.replicas > 1:
            _drain(rec, cluster, [])  # and wait until the router has read it: the next drain must not overlap
            _wait(watch, lambda: _all_in(_linked(watch, routers, replica), (LinkState.READY,)), 30,
                  f"the routers did not take replica {replica} back within 30s")  # fmt: skip
    say(f"replica {replica}: serving again")


def _drained(seen: list[dict[str, Any] | None]) -> bool:
    """Every router has read the drain (so nothing new goes there) and the replica has nothing left."""
    return bool(seen) and all(v is not None and v.get("state") in DRAINED and not v.get("in_flight") for v in seen)


def _all_in(seen: list[dict[str, Any] | None], states: Any) -> bool:
    return bool(seen) and all(v is not None and v.get("state") in states for v in seen)


def _routers(rec: JobRecord) -> list[int]:
    return [i for i, n in enumerate(rec.nodes) if n.kind == "router"]


def _drain(rec: JobRecord, cluster: Cluster, replicas: list[int]) -> None:
    """Every router's drain file; a router on a node that does not answer is left out (a lost node)."""
    routers = _routers(rec)
    args = {i: {"node_dir": rec.nodes[i].node_dir, "replicas": replicas} for i in routers}
    clients = [cluster.clients[i] for i in routers]
    results = cluster.map(lambda c: c.call("drain", args[cluster.clients.index(c)]), clients)
    if not any(r.ok for r in results):
        results.raise_failures("drain")


def _linked(watch: NodeWatch, routers: list[int], replica: int) -> list[dict[str, Any] | None]:
    """Each answering router's view of one replica, from its status file (rewritten every second);
    None for a router whose file is stale. Routers on nodes that do not answer are left out."""
    out: list[dict[str, Any] | None] = []
    for i in routers:
        st = watch.latest[i]
        if watch.errors[i] is not None or st is None:
            continue
        front = st.get("front") or {}
        fresh = front.get("alive") and float(front.get("age_s", 1e9)) < 5
        out.append(next((x for x in front.get("replicas", []) if x.get("id") == replica), None) if fresh else None)
    return out


def _wait(watch: NodeWatch, done: Callable[[], bool], timeout: float, why: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise LaunchFailed(why)
        watch.wait(timeout=1.0)
