"""The launch lifecycle: `up` (pre-flight, plan, start, wait for ready) and `down` (teardown).

Whatever goes wrong after the first agent starts (a failing rank, a time-out, Ctrl-C), `up`
removes everything it started on every node before it returns, and says so.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dslaunch.errors import NodeOpFailed, UserError
from dslaunch.launch import store
from dslaunch.launch.plan import LaunchPlan, NodePlan, make_plan
from dslaunch.launch.preflight import Progress, connect_options, preflight, quiet
from dslaunch.launch.ready import LaunchFailed, wait_ready
from dslaunch.launch.records import cluster_for, new_record
from dslaunch.launch.spec import JobSpec
from dslaunch.transport.fanout import HostResults
from dslaunch.transport.launchers import Launcher, get_launcher
from dslaunch.transport.nodes import Cluster, NodeClient
from dslaunch.wire.initmethods import init_method
from dslaunch.wire.records import JobRecord
from dslaunch.wire.states import JobState, NodeStage

__all__ = ["DownReport", "LaunchFailed", "down", "dry_plan", "teardown", "up"]


def up(
    spec: JobSpec,
    progress: Progress = quiet,
    warn: Callable[[str], None] | None = None,
    note: Callable[[str], None] | None = None,
) -> JobRecord:
    """Start the job on every node and wait until every rank is ready (or clean up and raise)."""
    with store.locked(spec.name):
        old = store.load(spec.name)
        if old is not None:
            raise UserError(
                f"a job named {spec.name!r} already exists (state {old.state.value}, {old.world_size} ranks "
                f"on {len(old.nodes)} node(s)); see it with 'dslaunch status --name {spec.name}', "
                f"remove it with 'dslaunch down --name {spec.name}', or pick another --name"
            )
        launcher = get_launcher(spec.launcher, spec.launcher_meta)
        launcher.check()
        with Cluster(spec.nodes, connect_options(spec), spec.python, spec.parallelism, launcher) as machines:
            facts = preflight(spec, machines, per_node(spec, progress))
            for line in facts.warnings:
                if warn is not None:
                    warn(line)
            for line in facts.notes:
                if note is not None:
                    note(line)
            plan = make_plan(
                spec, uuid.uuid4().hex[:8], facts.master_addr, facts.master_port, facts.rdzv_port,
                facts.backend, facts.addresses, facts.front_port, facts.gang_ports, facts.link_port,
                facts.router_ports,
            )  # fmt: skip
            rec = new_record(spec, plan, facts, launcher.meta)
            store.save(rec)
            cluster = machines.view(rec.node_list())  # one entry per agent, then the router
            try:
                _start(plan, cluster, rec, progress)
                wait_ready(rec, cluster, spec.ready_timeout, progress)
            except BaseException as e:
                _undo(rec, cluster, spec.stop_grace, e)
                raise
            rec.state = JobState.READY
            store.save(rec)
            return rec


def per_node(spec: JobSpec, progress: Progress) -> Progress:
    """Pre-flight reports per machine; `up` shows one row per agent and one per router (router K on node K)."""
    rows: dict[int, list[int]] = {}
    for rep in spec.replicas:
        for u in rep.units:
            rows.setdefault(u.node, []).append(u.unit)
    agents = sum(len(r.units) for r in spec.replicas)
    for k in range(spec.router_count):
        rows.setdefault(k, []).append(agents + k)

    def report(i: int, stage: NodeStage, detail: str) -> None:
        for row in rows.get(i, []):
            progress(row, stage, detail)

    return report


def _undo(rec: JobRecord, cluster: Cluster, grace: float, cause: BaseException) -> None:
    """Remove everything `up` started; keep the record only when some node could not be cleaned."""
    with _no_interrupts():  # a second Ctrl-C must not cut the clean-up short
        left = teardown(rec, cluster, grace)
    unclean = [rec.nodes[i].host for i, r in enumerate(left) if not r.ok or (r.value or {}).get("survivors")]
    if not unclean:
        store.remove(rec.name)
    else:
        rec.state = JobState.FAILED
        store.save(rec)
    if isinstance(cause, LaunchFailed):
        cause.message += (
            f"; could not clean {', '.join(unclean)}: the record is kept, run "
            f"'dslaunch down --name {rec.name}' once it answers (everything else was removed)"
            if unclean else "; everything it started was removed from every node"
        )  # fmt: skip


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def dry_plan(spec: JobSpec) -> tuple[LaunchPlan, str]:
    """The plan as far as it can be known without contacting a node, and what is still open."""
    from dslaunch.transport.sshconfig import resolve

    head = spec.nodes[0]
    via_ssh = spec.launcher == "ssh"
    addr = spec.master_addr or (
        "127.0.0.1" if head.is_local else resolve(head.host, head.user).hostname if via_ssh else head.host
    )
    backend = "gloo" if spec.backend == "auto" else spec.backend
    plan = make_plan(spec, "dryrun00", addr, spec.master_port or 29500, spec.rdzv_port or 29400, backend)
    open_ = []
    if spec.master_port is None or spec.rdzv_port is None:
        open_.append("ports marked 29500/29400 are picked free on node 0 at launch")
    if spec.backend == "auto":
        open_.append("backend auto: nccl if every node has a GPU per slot")
    if not spec.master_addr:
        open_.append("master address: the address SSH reaches node 0 at")
    if spec.launch_dir:
        open_.append(f"the ranks run in {spec.launch_dir}, first on PYTHONPATH, on nodes where it exists")
    return plan, "; ".join(open_)


def _start(plan: LaunchPlan, cluster: Cluster, rec: JobRecord, progress: Progress) -> None:
    """Start the routers, then one detached agent per unit; secrets travel on stdin."""
    front = rec.front
    token, nonce, key = (front.token, front.nonce, front.link_key) if front else (None, None, None)
    first = len(plan.nodes)

    def start(c: NodeClient) -> dict[str, Any]:
        i = cluster.clients.index(c)
        if i >= first:
            return start_router(plan, i - first, c, token, nonce, key, cluster.launcher)
        return start_unit(plan, plan.nodes[i], c, key, cluster.launcher)

    if plan.routers:  # first: their links listen before any replica leader dials
        routers = list(range(first, first + len(plan.routers)))
        _report_started(rec, routers, cluster.map(start, [cluster.clients[i] for i in routers]), progress)
    rest = cluster.map(start, cluster.clients[:first])
    _report_started(rec, list(range(first)), rest, progress)


def _report_started(rec: JobRecord, indices: list[int], results: HostResults[Any], progress: Progress) -> None:
    details: list[str] = []
    for i, r in zip(indices, results, strict=True):
        if r.ok:
            rec.nodes[i].agent_pid = (r.value or {}).get("pid")
            progress(i, NodeStage.STARTED, f"pid {rec.nodes[i].agent_pid}")
            continue
        progress(i, NodeStage.FAILED, str(r.error))
        details.append(str(r.error))
        if isinstance(r.error, NodeOpFailed):
            details += [f"  {ln}" for ln in r.error.details.get("log", []) or []]  # type: ignore[union-attr]
    store.save(rec)
    if details:
        what = "the router" if all(rec.nodes[i].kind == "router" for i in indices) else "the agent on every node"
        raise LaunchFailed(f"could not start {what}: {details[0]}", details)


def start_unit(plan: LaunchPlan, np: NodePlan, c: NodeClient, key: str | None, launcher: Launcher) -> dict[str, Any]:
    """One agent; a replica's head also checks its ports again, its leader gets the link key."""
    rp = plan.replicas[np.replica]
    head = np.unit == rp.units[0]
    ports = {"rendezvous port (--rdzv-port)": rp.rdzv_port}
    if init_method(plan.init_method).uses_master_port:
        ports["master port (--master-port)"] = rp.master_port
    files = {"replica.secret": key} if head and key else {}
    return launcher.start(
        c,
        {"job_id": plan.job_id, "node_rank": np.unit, "node_dir": np.node_dir, "argv": list(np.argv),
         "env": np.env, "files": files, "free_ports": ports if head else {}},
    )  # fmt: skip


def start_router(
    plan: LaunchPlan, k: int, c: NodeClient, token: str | None, nonce: str | None, key: str | None,
    launcher: Launcher,
) -> Any:  # fmt: skip
    """Router K under its supervisor, on node K; the public token and the link key on stdin."""
    rp = plan.routers[k]
    files = {n: v for n, v in (("front.token", token), ("front.nonce", nonce), ("replica.secret", key)) if v}
    return launcher.start(
        c,
        {"job_id": plan.job_id, "node_rank": rp.unit, "node_dir": rp.node_dir, "argv": list(rp.argv),
         "env": rp.env, "files": files, "free_ports": {"router link port": rp.link_port}},
    )  # fmt: skip


def teardown(rec: JobRecord, cluster: Cluster, grace: float = 10.0) -> HostResults[dict[str, Any]]:
    """Stop every process of the job on every node and verify that none is left."""

    def args(i: int, _c: NodeClient) -> dict[str, Any]:
        return {
            "node_dir": rec.nodes[i].node_dir,
            "job_id": rec.job_id,
            "node_rank": i,
            "grace": grace,
            "keep_logs": rec.keep_logs,
            "rdzv_glob": rec.rdzv_glob if i == 0 else None,
        }

    return cluster.call_all("stop", args, timeout=grace + rec.command_timeout)


@dataclass
class DownReport:
    name: str
    found: int = 0
    killed: int = 0
    nodes: int = 0
    unreachable: list[str] = field(default_factory=list)
    survivors: dict[str, list[int]] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)  # what the launcher still ran (Slurm steps)
    ended: str | None = None  # why nothing was left to stop (Slurm had ended the allocation)

    @property
    def clean(self) -> bool:
        return not self.unreachable and not self.survivors and not self.leftovers


def down(name: str, grace: float = 10.0) -> DownReport | None:
    """Stop a job everywhere. None when there is no such job (a second `down` is fine)."""
    with store.locked(name):
        rec = store.load(name)
        if rec is None:
            return None
        rec.state = JobState.STOPPING
        store.save(rec)
        report = DownReport(name, nodes=len({(n.host, n.target) for n in rec.nodes}))
        with cluster_for(rec) as cluster:
            report.ended = cluster.launcher.ended()
            if report.ended:  # nothing runs any more; only the record is left to remove
                store.remove(name)
                return report
            for r in teardown(rec, cluster, grace):
                if not r.ok:
                    report.unreachable.append(str(r.error))
                    continue
                v = r.value or {}
                report.found += v.get("found", 0)
                report.killed += v.get("killed", 0)
                if v.get("survivors"):
                    report.survivors[r.node.host] = v["survivors"]
            report.leftovers = cluster.launcher.cleanup(rec.job_id)
        if report.clean:
            store.remove(name)
        return report
