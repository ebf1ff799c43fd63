"""Waiting for a starting job: every node's stage as `up` shows it, and the rank logs on failure."""

from __future__ import annotations

import time
from typing import Any

from dslaunch.errors import UserError
from dslaunch.launch.preflight import Progress, quiet
from dslaunch.launch.watch import NodeWatch
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.records import JobRecord
from dslaunch.wire.states import GROUP_FORMED, LinkState, NodeStage, RankStage, ranks_ready


class LaunchFailed(UserError):
    """`up` failed after starting something; `details` has the failing ranks' last log lines."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


def load_text(loads: list[dict[str, Any]]) -> str:
    """Ranks' loading progress as one phrase: "37% of 2.4 GB (by rank: 40% 35%), 310 MB/s" (the
    rate summed over the ranks)."""
    read, total = sum(x.get("read", 0) for x in loads), sum(x.get("total", 0) for x in loads)
    rate = sum(x.get("rate", 0) for x in loads)
    pct = int(100 * read // total) if total else 0
    each = [f"{int(100 * x.get('read', 0) // x['total'])}%" for x in loads if x.get("total")]
    ranks = f" (by rank: {' '.join(each)})" if len(each) > 1 else ""
    return f"{pct}% of {_size(total)}{ranks}, {_size(rate)}/s"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def node_summary(want: int, st: dict[str, Any]) -> tuple[NodeStage, str]:
    """(stage, detail) of one node of `want` ranks, from its nodectl status answer."""
    agent = st.get("agent", {})
    if not agent.get("alive"):
        code = agent.get("exit_code")
        return NodeStage.FAILED, f"agent exited ({'code ' + str(code) if code is not None else 'killed'})"
    ranks = st.get("ranks", [])
    alive = [r for r in ranks if r.get("alive")]
    ready = [r for r in alive if r.get("stage") == RankStage.READY]
    restarts = max((r.get("restarts", 0) for r in ranks), default=0)
    note = f", restart {restarts}" if restarts else ""
    if ranks_ready(((bool(r.get("alive")), r.get("stage", ""), r.get("restarts", 0)) for r in ranks), want):
        return NodeStage.READY, f"{want}/{want} ranks{note}"
    if any(r.get("stage") in GROUP_FORMED for r in alive):
        loads = [r["load"] for r in alive if r.get("stage") == RankStage.LOADING and r.get("load")]
        loading = f", loading {load_text(loads)}" if loads else ""
        return NodeStage.RENDEZVOUS, f"{len(ready)}/{want} ranks ready{loading}{note}"
    return NodeStage.STARTED, f"{len(alive)}/{want} ranks up{note}"


def router_summary(st: dict[str, Any], replicas: int) -> tuple[NodeStage, str]:
    """(stage, detail) of the router: ready once its front listens and every replica dialed in."""
    if not st.get("agent", {}).get("alive"):
        code = st.get("agent", {}).get("exit_code")
        return NodeStage.FAILED, f"router exited ({'code ' + str(code) if code is not None else 'killed'})"
    front = st.get("front") or {}
    if not (front.get("alive") and front.get("ready")):
        return NodeStage.STARTED, "router starting"
    ready = sum(1 for r in front.get("replicas", []) if r.get("state") == LinkState.READY)
    if ready >= replicas:
        return NodeStage.READY, f"router on {front.get('address')}, {ready}/{replicas} replicas"
    return NodeStage.RENDEZVOUS, f"{ready}/{replicas} replicas linked"


def entry_summary(rec: JobRecord, i: int, st: dict[str, Any]) -> tuple[NodeStage, str]:
    n = rec.nodes[i]
    return router_summary(st, rec.replicas) if n.kind == "router" else node_summary(n.nprocs, st)


def wait_ready(rec: JobRecord, cluster: Cluster, timeout: float, progress: Progress = quiet) -> None:
    """Watch every node until all ranks are ready; a failed agent, a lost node or the deadline
    ends the wait."""
    deadline = time.monotonic() + timeout
    args = lambda i, _c: {"node_dir": rec.nodes[i].node_dir, "job_id": rec.job_id, "node_rank": i}  # noqa: E731
    with NodeWatch(cluster, args, max_s=timeout + 60) as watch:
        while True:
            watch.wait(timeout=1.0)
            stages: list[NodeStage] = []
            for i, (st, err) in enumerate(zip(watch.latest, watch.errors, strict=True)):
                if err is not None:
                    progress(i, NodeStage.FAILED, err)
                    raise LaunchFailed(f"lost contact while starting: {err}")
                if st is None:  # no answer yet from this node
                    stages.append(NodeStage.STARTED)
                    continue
                stage, detail = entry_summary(rec, i, st)
                progress(i, stage, detail)
                stages.append(stage)
            if NodeStage.FAILED in stages:
                watch.close()
                i = stages.index(NodeStage.FAILED)
                details = failure_details(rec, cluster)
                # the first rank's error names the cause (e.g. a model family DeepSpeed cannot shard)
                cause = next((": " + d.split(": ", 1)[1] for d in details if " rank " in d and ": " in d), "")
                what = "the router" if rec.nodes[i].kind == "router" else "the agent"
                raise LaunchFailed(f"{rec.nodes[i].host}: {what} stopped before the job was ready{cause}", details)
            if all(s == NodeStage.READY for s in stages):
                return
            if time.monotonic() > deadline:
                watch.close()
                ready_ranks = sum(rec.nodes[i].nprocs for i, s in enumerate(stages) if s == NodeStage.READY)
                raise LaunchFailed(
                    f"not every rank was ready within {timeout:g}s (--timeout): {ready_ranks}/{rec.world_size} ready"
                    + ("" if ready_ranks < rec.world_size else "; the router never saw every replica"),
                    failure_details(rec, cluster),
                )


def failure_details(rec: JobRecord, cluster: Cluster, lines: int = 12) -> list[str]:
    """The last log lines of failed ranks (or of the agent) on every node, for the user to read."""
    args = lambda i, _c: {"node_dir": rec.nodes[i].node_dir, "job_id": rec.job_id, "node_rank": i, "tail": lines}  # noqa: E731
    out: list[str] = []
    for i, r in enumerate(cluster.call_all("status", args)):
        st = r.value or {}
        host = rec.nodes[i].host
        for rk in st.get("ranks", []):
            if rk.get("error"):
                out.append(f"{host} rank {rk['rank']}: {rk['error']}")
                out += [f"    {ln}" for ln in st.get("rank_logs", {}).get(str(rk["rank"]), [])]
        if not (st.get("agent") or {}).get("alive") and st.get("agent_log"):
            out.append(f"{host} {'router' if rec.nodes[i].kind == 'router' else 'agent'} log:")
            out += [f"    {ln}" for ln in st["agent_log"]]
    return out
