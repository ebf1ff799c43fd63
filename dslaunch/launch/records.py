"""The job record as the launch host builds and uses it: from spec and plan, and back to nodes."""

from __future__ import annotations

import secrets
import time

from dslaunch.launch.plan import LaunchPlan
from dslaunch.launch.preflight import Facts
from dslaunch.launch.spec import JobSpec
from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.launchers import Launcher, get_launcher
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.records import FrontRecord, JobRecord, NodeRecord
from dslaunch.wire.states import JobState


def new_record(spec: JobSpec, plan: LaunchPlan, facts: Facts, launcher_meta: dict[str, str] | None = None) -> JobRecord:
    return JobRecord(
        name=spec.name,
        run_id=plan.run_id,
        job_id=plan.job_id,
        state=JobState.STARTING,
        world_size=plan.world_size,
        init_method=plan.init_method,
        backend=plan.backend,
        python=spec.python,
        master_addr=plan.master_addr,
        master_port=plan.master_port,
        rdzv_port=plan.rdzv_port,
        nodes=[
            NodeRecord(
                node_rank=np.unit,
                host=np.host,
                target=spec.nodes[np.node_rank].target,
                nprocs=np.nprocs,
                rank_offset=np.rank_offset,
                node_dir=np.node_dir,
                address=facts.addresses[np.node_rank],
                replica=np.replica,
                gang_offset=np.gang_offset,
            )
            for np in plan.nodes
        ]
        + router_entries(spec, plan, facts),
        rdzv_glob=spec.method.leftovers(spec.rdzv_dir, plan.job_id),
        connect_timeout=spec.connect_timeout,
        command_timeout=spec.command_timeout,
        accept_new_host_keys=spec.accept_new_host_keys,
        keep_logs=spec.keep_logs,
        created=time.time(),
        front=front_record(spec, plan),
        tp=plan.tp,
        replicas=len(plan.replicas),
        launcher=spec.launcher,
        launcher_meta=dict(spec.launcher_meta if launcher_meta is None else launcher_meta),
    )


def router_entries(spec: JobSpec, plan: LaunchPlan, facts: Facts) -> list[NodeRecord]:
    """The routers, each recorded like an agent (no ranks) so that status, logs and down find it."""
    return [
        NodeRecord(
            node_rank=rp.unit, host=spec.nodes[rp.node].host, target=spec.nodes[rp.node].target, nprocs=0,
            rank_offset=plan.world_size, node_dir=rp.node_dir, address=facts.addresses[rp.node], kind="router",
        )
        for rp in plan.routers
    ]  # fmt: skip


def front_record(spec: JobSpec, plan: LaunchPlan) -> FrontRecord:
    """Where `query` finds the front; the token lives only here (0600) and on node 0 (0600)."""
    token = spec.serve.token
    if token is None and not spec.serve.loopback:
        token = secrets.token_urlsafe(32)
    return FrontRecord(
        bind=spec.serve.bind,
        port=plan.front_port,
        loopback=spec.serve.loopback,
        task="custom" if spec.serve.handler else spec.serve.task,
        model=spec.serve.handler or spec.serve.model or "tiny-llama (built in)",
        token=token,
        nonce=secrets.token_urlsafe(24),
        link_key=secrets.token_urlsafe(32),
        ports=[rp.front_port for rp in plan.routers],
    )


def record_options(rec: JobRecord) -> ConnectOptions:
    """The connection options the job was started with."""
    return ConnectOptions(rec.connect_timeout, rec.command_timeout, rec.accept_new_host_keys)


def cluster_for(rec: JobRecord, parallelism: int = 32) -> Cluster:
    """Reconnect to a recorded job's agents and router (one connection per machine) with the
    options it was started with."""
    return Cluster(rec.node_list(), record_options(rec), rec.python, parallelism, launcher_of(rec))


def launcher_of(rec: JobRecord) -> Launcher:
    """The launcher the job was started with, with the ids it recorded."""
    return get_launcher(rec.launcher, rec.launcher_meta)
