"""What `status` reads from the nodes of a recorded job, gathered in parallel, and how it judges it."""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from dslaunch.launch.records import cluster_for
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.records import JobRecord
from dslaunch.wire.states import JobState, RankStage, ReplicaState, RouterState, ranks_ready


@dataclass
class NodeStatus:
    node_rank: int
    host: str
    reachable: bool
    agent_pid: int | None = None
    agent_alive: bool = False
    exit_code: int | None = None
    procs: int = 0
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "agent"  # agent | router
    replica: int | None = None
    router: int | None = None  # router K (kind router)

    @property
    def what(self) -> str:
        return f"router {self.router}" if self.router is not None else f"replica {self.replica}" if (
            self.replica is not None) else ""  # fmt: skip


@dataclass
class RankStatus:
    rank: int
    host: str
    node_rank: int
    local_rank: int
    pid: int | None = None
    stage: str = RankStage.PENDING
    restarts: int = 0
    device: str | None = None
    alive: bool = False
    rss_mb: float | None = None
    gpu_mem_mb: float | None = None
    error: str | None = None
    replica: int = 0
    load: dict[str, int] | None = None  # while loading: {"read", "total", "rate"}, bytes and bytes/s
    kv: dict[str, Any] | None = None  # the paged KV pool, once ready: {"tokens", "mib", "from"}


@dataclass
class ReplicaStatus:
    """One replica: its ranks and nodes, whether it serves, and what the router sees of it."""

    replica: int
    ranks: list[int]
    hosts: list[str]
    state: ReplicaState  # judged from its ranks
    restarts: int = 0
    linked: str | None = None  # the first serving router's view (a LinkState value), None when none has one
    links: list[str | None] = field(default_factory=list)  # every router's view, router K at K
    served_by: list[int] = field(default_factory=list)  # what each router had it serve
    in_flight: int = 0
    served: int = 0
    errors: int = 0
    reason: str = ""


@dataclass
class JobStatus:
    name: str
    state: JobState
    world_size: int
    init_method: str
    backend: str
    run_id: str
    master: str
    created: float
    nodes: list[NodeStatus]
    ranks: list[RankStatus]
    reason: str = ""
    front: dict[str, Any] = field(default_factory=dict)
    last_failure: dict[str, Any] = field(default_factory=dict)
    tp: int = 0
    replicas: list[ReplicaStatus] = field(default_factory=list)
    launcher: list[tuple[str, str]] = field(default_factory=list)  # which launcher, and its own ids
    routers: list[dict[str, Any]] = field(default_factory=list)  # each: router, host, address, state, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rank_from(rec: JobRecord, node_rank: int, raw: dict[str, Any] | None, rank: int) -> RankStatus:
    n = rec.nodes[node_rank]
    rs = RankStatus(rank=rank, host=n.host, node_rank=node_rank, local_rank=rank - n.rank_offset, replica=n.replica)
    if raw is None:
        return rs
    rs.pid = raw.get("pid")
    rs.alive = bool(raw.get("alive"))
    stage = raw.get("stage", RankStage.PENDING)
    rs.stage = stage if rs.alive or stage == RankStage.FAILED else RankStage.EXITED
    rs.restarts = int(raw.get("restarts", 0))
    rs.device = raw.get("device")
    rs.rss_mb = raw.get("rss_mb")
    rs.gpu_mem_mb = raw.get("gpu_mem_mb")
    rs.error = raw.get("error")
    rs.load = raw.get("load") if rs.stage == RankStage.LOADING else None
    rs.kv = raw.get("kv")
    return rs


def classify(nodes: list[NodeStatus], ranks: list[RankStatus]) -> tuple[JobState, str]:
    """The job's state and a one-line reason, from what every node reported (see JobState)."""
    gone: dict[str, list[str]] = {}
    for n in nodes:
        if not n.reachable:
            gone.setdefault(n.host, []).extend([n.what] if n.what else [])
    unreachable = [h + (f" ({', '.join(w)})" if w else "") for h, w in gone.items()]
    dead = [n for n in nodes if n.reachable and not n.agent_alive]
    # the router alone does not keep a job alive: what serves is the agents' ranks
    alive = [n for n in nodes if n.reachable and n.agent_alive and n.kind == "agent"]
    dead_agents = [n for n in dead if n.kind == "agent"]
    if unreachable:
        state = JobState.FAILED if dead_agents and not alive else JobState.DEGRADED
        return state, f"unreachable: {', '.join(unreachable)}"
    if dead_agents and not alive:
        if all(n.exit_code is None and n.procs == 0 for n in dead):
            return JobState.GONE, "no process of this job is left on any node (stale record)"
        codes = ", ".join(
            dict.fromkeys(f"{n.host} exit {n.exit_code if n.exit_code is not None else 'killed'}" for n in dead_agents)
        )
        return JobState.FAILED, f"every agent has ended ({codes})"
    if dead:
        agents = list(dict.fromkeys(n.host for n in dead_agents))
        parts = [f"agent not running on {', '.join(agents)}"] if agents else []
        parts += [f"{n.what or 'router'} not running on {n.host}" for n in dead if n.kind == "router"]
        return JobState.DEGRADED, "; ".join(parts)
    # each replica is its own gang: "ready" (every rank alive, ready, same attempt) holds per replica
    by_replica: dict[int, list[RankStatus]] = {}
    for r in ranks:
        by_replica.setdefault(r.replica, []).append(r)
    serving = [k for k, rs in by_replica.items() if ranks_ready(((r.alive, r.stage, r.restarts) for r in rs), len(rs))]
    if by_replica and len(serving) == len(by_replica):
        many = f" in {len(serving)} replicas" if len(serving) > 1 else ""
        return JobState.READY, f"{len(ranks)} ranks ready{many}"
    if serving:
        down = [k for k in by_replica if k not in serving]
        failed = [r for r in ranks if r.stage == RankStage.FAILED]
        why = f" after rank {failed[0].rank} failed: {failed[0].error}" if failed else ""
        return JobState.DEGRADED, (
            f"replica {', '.join(map(str, down))} not serving{why}; {len(serving)}/{len(by_replica)} replicas serve"
        )
    restarts = max((r.restarts for r in ranks), default=0)
    failed = [r for r in ranks if r.stage == RankStage.FAILED]
    if failed:
        return JobState.STARTING, f"restarting after rank {failed[0].rank} failed: {failed[0].error}"
    ready = sum(r.alive and r.stage == RankStage.READY for r in ranks)
    return JobState.STARTING, f"{ready}/{len(ranks)} ranks ready" + (f" (restart {restarts})" if restarts else "")


def gather(rec: JobRecord, cluster: Cluster, tail: int = 8) -> JobStatus:
    """Ask every node at once; an unreachable node is reported as such, the others still are."""
    args = lambda i, _c: {  # noqa: E731
        "node_dir": rec.nodes[i].node_dir, "job_id": rec.job_id, "node_rank": i, "tail": tail, "failures": True,
    }  # fmt: skip
    results = cluster.call_all("status", args)
    nodes: list[NodeStatus] = []
    ranks: list[RankStatus] = []
    fronts: list[dict[str, Any] | None] = []  # each router's status file, router K at K
    router_of = {i: k for k, i in enumerate(j for j, x in enumerate(rec.nodes) if x.kind == "router")}
    front_raw: dict[str, Any] | None = None
    for i, r in enumerate(results):
        n = rec.nodes[i]
        replica = n.replica if n.kind == "agent" else None
        mine = range(n.rank_offset, n.rank_offset + n.nprocs)
        if not r.ok:
            nodes.append(NodeStatus(i, n.host, reachable=False, agent_pid=n.agent_pid, error=str(r.error),
                                    kind=n.kind, replica=replica, router=router_of.get(i)))  # fmt: skip
            if n.kind == "router":
                fronts.append(None)
            ranks += [_rank_from(rec, i, None, k) for k in mine]
            continue
        st = r.value or {}
        agent = st.get("agent", {})
        ns = NodeStatus(
            i, n.host, reachable=True,
            agent_pid=agent.get("pid") or n.agent_pid if st.get("present") else None,
            agent_alive=bool(agent.get("alive")), exit_code=agent.get("exit_code"),
            procs=int(st.get("procs", 0)), failures=list(st.get("failures", [])), kind=n.kind, replica=replica,
            router=router_of.get(i),
        )  # fmt: skip
        if not ns.agent_alive and st.get("agent_log"):
            ns.log_tail = st["agent_log"]
            ns.error = next((ln for ln in reversed(ns.log_tail) if "Error" in ln), None)
        nodes.append(ns)
        if n.kind == "router":
            fronts.append(st.get("front"))
        elif front_raw is None and i == 0 and rec.router is None:  # a record from before the router
            front_raw = st.get("front")
        # rank files carry the rank inside the replica
        by_rank = {int(x["rank"]) + n.rank_offset - n.gang_offset: x for x in st.get("ranks", [])}
        ranks += [_rank_from(rec, i, by_rank.get(k), k) for k in mine]
    if fronts:  # the front shown is the first router that serves (router 0 while its node is up)
        front_raw = next((f for f in fronts if _fresh(f) and f.get("ready")), None) or next(
            (f for f in fronts if f), None)  # fmt: skip
    state_, reason = classify(nodes, ranks)
    routers = router_rows(rec, nodes, fronts)
    if state_ is JobState.READY and any(x["state"] != RouterState.READY for x in routers):
        down = [f"router {x['router']} on {x['host']} {x['state']}" for x in routers if x["state"] != RouterState.READY]
        serving = sum(x["state"] == RouterState.READY for x in routers)
        if serving:
            state_, reason = JobState.DEGRADED, f"{'; '.join(down)}; {serving}/{len(routers)} routers serve"
    return JobStatus(
        name=rec.name, state=state_, world_size=rec.world_size, init_method=rec.init_method,
        backend=rec.backend, run_id=rec.run_id, master=f"{rec.master_addr}:{rec.master_port}",
        created=rec.created, nodes=nodes, ranks=ranks, reason=reason,
        front=front_status(rec, front_raw), last_failure=last_failure(rec, nodes), tp=rec.tp or rec.world_size,
        replicas=replica_status(rec, ranks, [(f or {}).get("replicas") or [] if _fresh(f) else [] for f in fronts]
                                or [(front_raw or {}).get("replicas") or []]),
        routers=routers,
    )  # fmt: skip


def _fresh(raw: dict[str, Any] | None) -> bool:
    """A status file its writer still rewrites (once a second)."""
    return bool(raw and raw.get("alive") and float(raw.get("age_s", 1e9)) < 10)


def router_rows(rec: JobRecord, nodes: list[NodeStatus], fronts: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Every router: where it is, its public address, its state (RouterState) and its counts."""
    out: list[dict[str, Any]] = []
    ports = rec.front.router_ports if rec.front else []
    for n, raw in zip([n for n in nodes if n.kind == "router"], fronts, strict=False):
        k = n.router or 0
        entry = rec.nodes[n.node_rank]
        bind = rec.front.bind if rec.front else "?"
        host = (entry.address or entry.host) if bind in ("0.0.0.0", "::") else bind
        address = f"{host}:{ports[k]}" if k < len(ports) else "?"
        if not n.reachable:
            state = RouterState.UNREACHABLE
        elif not n.agent_alive:
            state = RouterState.DOWN
        else:
            state = RouterState.READY if _fresh(raw) and (raw or {}).get("ready") else RouterState.STARTING
        row: dict[str, Any] = {"router": k, "host": n.host, "address": address, "state": state}
        if raw and _fresh(raw):
            row.update({key: raw.get(key) for key in ("served", "errors", "queue", "p50_ms", "p99_ms")})
        out.append(row)
    return out


def replica_status(
    rec: JobRecord, ranks: list[RankStatus], linked: list[list[dict[str, Any]]]
) -> list[ReplicaStatus]:  # fmt: skip
    """Each replica from its ranks (ready, starting, restarting) and from every router's view of it
    (`linked[K]`: router K's rows; the counts are summed over the routers)."""
    views = [{int(x.get("id", x.get("replica", -1))): x for x in rows if isinstance(x, dict)} for rows in linked]
    out: list[ReplicaStatus] = []
    for k in range(max(rec.replicas, 1)):
        mine = [r for r in ranks if r.replica == k]
        hosts = list(dict.fromkeys(n.host for n in rec.replica_units(k)))
        restarts = max((r.restarts for r in mine), default=0)
        failed = next((r for r in mine if r.stage == RankStage.FAILED or not r.alive), None)
        if ranks_ready(((r.alive, r.stage, r.restarts) for r in mine), len(mine)):
            state, reason = ReplicaState.READY, ""
        elif failed is not None and failed.stage == RankStage.FAILED:
            state, reason = ReplicaState.RESTARTING, f"rank {failed.rank} failed: {failed.error or ''}".strip()
        else:
            up = sum(r.stage == RankStage.READY and r.alive for r in mine)
            state, reason = ReplicaState.STARTING, f"{up}/{len(mine)} ready"
        mine_views = [v.get(k) for v in views]
        first = next((v for v in mine_views if v), {})
        count = lambda key, vs=mine_views: sum(int((v or {}).get(key, 0) or 0) for v in vs)  # noqa: E731
        out.append(ReplicaStatus(
            k, [r.rank for r in mine], hosts, state, restarts, first.get("state"),
            [(v or {}).get("state") for v in mine_views], [int((v or {}).get("served", 0) or 0) for v in mine_views],
            count("in_flight"), count("served"), count("errors"), reason,
        ))  # fmt: skip
    return out


def last_failure(rec: JobRecord, nodes: list[NodeStatus]) -> dict[str, Any]:
    """What caused the last restart (or the end): the first failure of the latest attempt.

    One lost rank makes its peers fail too, a little later ("lost a peer"); those are effects,
    so within an attempt the earliest failure is the cause.
    """
    found = []
    for n in nodes:
        for f in n.failures:
            rank, entry = f.get("rank"), rec.nodes[n.node_rank]
            # the rank logs number ranks inside their replica
            rank = entry.rank_offset + (int(f.get("local_rank", 0)) if rank is None else int(rank) - entry.gang_offset)
            found.append({**f, "rank": rank, "host": n.host, "cause": describe_exit(int(f["exit_code"]))})
    if not found:
        return {}
    latest = max(f.get("attempt") or 0 for f in found)
    return min((f for f in found if (f.get("attempt") or 0) == latest), key=lambda f: f["when"])


def describe_exit(code: int) -> str:
    """`killed by SIGKILL` for a negative code (torchrun's way of saying signal), else the code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def front_status(rec: JobRecord, raw: dict[str, Any] | None) -> dict[str, Any]:
    """The front as rank 0 last wrote it (once a second): address, ready, load and latency."""
    recorded = rec.front
    if recorded is None:
        return {}
    out: dict[str, Any] = {
        "address": recorded.address,
        "ready": False,
        "task": recorded.task,
        "model": recorded.model,
        "auth": bool(recorded.token),
    }
    if raw:
        keys = ("address", "served", "errors", "queue", "p50_ms", "p99_ms", "tokens_per_s")
        out.update({k: raw.get(k) for k in keys})
        out["ready"] = bool(raw.get("ready") and _fresh(raw))
    return out


def status(rec: JobRecord) -> JobStatus:
    with cluster_for(rec) as cluster:
        st = gather(rec, cluster)
        st.launcher = cluster.launcher.describe()
        return st
