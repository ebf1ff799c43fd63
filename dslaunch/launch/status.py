"""What `status` and `logs` read from the nodes of a recorded job, gathered in parallel."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from dslaunch.launch.lifecycle import cluster_for
from dslaunch.launch.store import JobRecord
from dslaunch.transport.nodes import Cluster

# Job states: starting (not all ranks ready yet, or restarting), ready, degraded (a node or agent
# gone while others run), failed (every agent ended with an error), gone (no process is left:
# the record is stale, e.g. after a reboot; `down` clears it).
JOB_STATES = ("starting", "ready", "degraded", "failed", "gone")


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


@dataclass
class RankStatus:
    rank: int
    host: str
    node_rank: int
    local_rank: int
    pid: int | None = None
    stage: str = "pending"
    restarts: int = 0
    device: str | None = None
    alive: bool = False
    rss_mb: float | None = None
    gpu_mem_mb: float | None = None
    error: str | None = None


@dataclass
class JobStatus:
    name: str
    state: str
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rank_from(rec: JobRecord, node_rank: int, raw: dict[str, Any] | None, rank: int) -> RankStatus:
    n = rec.nodes[node_rank]
    rs = RankStatus(rank=rank, host=n.host, node_rank=node_rank, local_rank=rank - n.rank_offset)
    if raw is None:
        return rs
    rs.pid = raw.get("pid")
    rs.alive = bool(raw.get("alive"))
    stage = raw.get("stage", "pending")
    rs.stage = stage if rs.alive or stage == "failed" else "exited"
    rs.restarts = int(raw.get("restarts", 0))
    rs.device = raw.get("device")
    rs.rss_mb = raw.get("rss_mb")
    rs.gpu_mem_mb = raw.get("gpu_mem_mb")
    rs.error = raw.get("error")
    return rs


def classify(rec: JobRecord, nodes: list[NodeStatus], ranks: list[RankStatus]) -> tuple[str, str]:
    """The job's state and a one-line reason, from what every node reported."""
    unreachable = [n.host for n in nodes if not n.reachable]
    dead = [n for n in nodes if n.reachable and not n.agent_alive]
    alive = [n for n in nodes if n.reachable and n.agent_alive]
    if unreachable and not alive:
        return "degraded" if not dead else "failed", f"unreachable: {', '.join(unreachable)}"
    if unreachable:
        return "degraded", f"unreachable: {', '.join(unreachable)}"
    if dead and not alive:
        if all(n.exit_code is None and n.procs == 0 for n in dead):
            return "gone", "no process of this job is left on any node (stale record)"
        codes = ", ".join(f"{n.host} exit {n.exit_code if n.exit_code is not None else 'killed'}" for n in dead)
        return "failed", f"every agent has ended ({codes})"
    if dead:
        hosts = ", ".join(n.host for n in dead)
        return "degraded", f"agent not running on {hosts}"
    if all(r.alive and r.stage == "ready" for r in ranks) and len({r.restarts for r in ranks}) == 1:
        return "ready", f"{len(ranks)} ranks ready"
    restarts = max((r.restarts for r in ranks), default=0)
    failed = [r for r in ranks if r.stage == "failed"]
    if failed:
        return "starting", f"restarting after rank {failed[0].rank} failed: {failed[0].error}"
    ready = sum(r.alive and r.stage == "ready" for r in ranks)
    return "starting", f"{ready}/{len(ranks)} ranks ready" + (f" (restart {restarts})" if restarts else "")


def gather(rec: JobRecord, cluster: Cluster, tail: int = 8) -> JobStatus:
    """Ask every node at once; an unreachable node is reported as such, the others still are."""
    args = lambda i, _c: {  # noqa: E731
        "node_dir": rec.nodes[i].node_dir, "job_id": rec.job_id, "node_rank": i, "tail": tail, "failures": True,
    }  # fmt: skip
    results = cluster.call_all("status", args)
    nodes: list[NodeStatus] = []
    ranks: list[RankStatus] = []
    for i, r in enumerate(results):
        n = rec.nodes[i]
        if not r.ok:
            nodes.append(NodeStatus(i, n.host, reachable=False, agent_pid=n.agent_pid, error=str(r.error)))
            ranks += [_rank_from(rec, i, None, k) for k in range(n.rank_offset, n.rank_offset + n.nprocs)]
            continue
        st = r.value or {}
        agent = st.get("agent", {})
        ns = NodeStatus(
            i, n.host, reachable=True,
            agent_pid=agent.get("pid") or n.agent_pid if st.get("present") else None,
            agent_alive=bool(agent.get("alive")), exit_code=agent.get("exit_code"),
            procs=int(st.get("procs", 0)), failures=list(st.get("failures", [])),
        )  # fmt: skip
        if not ns.agent_alive and st.get("agent_log"):
            ns.log_tail = st["agent_log"]
            ns.error = next((ln for ln in reversed(ns.log_tail) if "Error" in ln), None)
        nodes.append(ns)
        by_rank = {int(x["rank"]): x for x in st.get("ranks", [])}
        ranks += [_rank_from(rec, i, by_rank.get(k), k) for k in range(n.rank_offset, n.rank_offset + n.nprocs)]
    state_, reason = classify(rec, nodes, ranks)
    head = results[0].value or {} if results and results[0].ok else {}
    return JobStatus(
        name=rec.name, state=state_, world_size=rec.world_size, init_method=rec.init_method,
        backend=rec.backend, run_id=rec.run_id, master=f"{rec.master_addr}:{rec.master_port}",
        created=rec.created, nodes=nodes, ranks=ranks, reason=reason,
        front=front_status(rec, head.get("front")), last_failure=last_failure(rec, nodes),
    )  # fmt: skip


def last_failure(rec: JobRecord, nodes: list[NodeStatus]) -> dict[str, Any]:
    """What caused the last restart (or the end): the first failure of the latest attempt.

    One lost rank makes its peers fail too, a little later ("lost a peer"); those are effects,
    so within an attempt the earliest failure is the cause.
    """
    found = []
    for n in nodes:
        for f in n.failures:
            rank = f.get("rank")
            if rank is None:
                rank = rec.nodes[n.node_rank].rank_offset + int(f.get("local_rank", 0))
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
    recorded = rec.extra.get("front") or {}
    if not recorded:
        return {}
    out: dict[str, Any] = {
        "address": f"{recorded['bind']}:{recorded['port']}",
        "ready": False,
        "task": recorded.get("task"),
        "model": recorded.get("model"),
        "auth": bool(recorded.get("token")),
    }
    if raw:
        fresh = raw.get("alive") and float(raw.get("age_s", 1e9)) < 10
        keys = ("address", "served", "errors", "queue", "p50_ms", "p99_ms", "tokens_per_s")
        out.update({k: raw.get(k) for k in keys})
        out["ready"] = bool(raw.get("ready") and fresh)
    return out


def status(rec: JobRecord) -> JobStatus:
    with cluster_for(rec) as cluster:
        return gather(rec, cluster)


def _ranks_on(rec: JobRecord, ranks: list[int] | None) -> list[int]:
    """Node indices that hold any of the wanted ranks."""
    if ranks is None:
        return list(range(len(rec.nodes)))
    return [i for i, n in enumerate(rec.nodes) if any(n.rank_offset <= r < n.rank_offset + n.nprocs for r in ranks)]


def read_logs(rec: JobRecord, ranks: list[int] | None, lines: int) -> tuple[dict[int, list[str]], list[str]]:
    """The last `lines` lines of each wanted rank's log, and one error line per unreachable node."""
    out: dict[int, list[str]] = {}
    errors: list[str] = []
    with cluster_for(rec) as cluster:
        want = _ranks_on(rec, ranks)
        clients = [cluster.clients[i] for i in want]
        results = cluster.map(
            lambda c: c.call("logs", {"node_dir": rec.nodes[cluster.clients.index(c)].node_dir,
                                      "ranks": ranks, "lines": lines}),
            clients,
        )  # fmt: skip
        for r in results:
            if not r.ok:
                errors.append(str(r.error))
                continue
            for k, v in (r.value or {}).get("logs", {}).items():
                out[int(k)] = v
    return dict(sorted(out.items())), errors


def follow_logs(rec: JobRecord, ranks: list[int] | None) -> Iterator[tuple[int, str]]:
    """(rank, line) as lines are written on any node, until the caller stops iterating."""
    q: queue.Queue[tuple[int, str] | None] = queue.Queue(maxsize=10000)
    cluster = cluster_for(rec)
    want = _ranks_on(rec, ranks)
    stop = threading.Event()

    def pump(i: int) -> None:
        c = cluster.clients[i]
        try:
            for line in c.stream("follow", {"node_dir": rec.nodes[i].node_dir, "ranks": ranks}):
                rank, _, text = line.partition("\t")
                if stop.is_set():
                    break
                if rank.isdigit():
                    q.put((int(rank), text))
        except Exception as e:
            q.put((-1, f"{rec.nodes[i].host}: {e}"))
        finally:
            q.put(None)

    threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in want]
    for t in threads:
        t.start()
    open_streams = len(threads)
    try:
        while open_streams:
            item = q.get()
            if item is None:
                open_streams -= 1
                continue
            yield item
    finally:
        stop.set()
        cluster.close()
        deadline = time.monotonic() + 3
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
