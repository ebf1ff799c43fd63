"""From a job spec and resolved facts to a launch plan: pure functions, no I/O.

The plan says, for every node, the exact torchrun agent command and environment, and for every
rank which node, local rank and device it gets. Ranks are fixed by hostfile order (node 0 holds
ranks 0..S-1), and the worker uses this numbering rather than the agent's: torchrun's c10d
rendezvous may reorder nodes between restarts, and rank 0 must stay on node 0 where the front is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dslaunch.launch.replicas import Replica, Unit
from dslaunch.launch.spec import JobSpec
from dslaunch.wire.nodedir import node_dir_path, router_dir_path
from dslaunch.wire.rankenv import EXPAND_ENV, LAUNCH_DIR_ENV, NodeEnv
from dslaunch.wire.routerenv import RouterEnv
from dslaunch.wire.serve import DEFAULT_FRONT_PORT

AGENT_MODULE = "dslaunch.rank.torchrun"  # torchrun's agent, with ranks forked warm where no GPU is
TORCHRUN_MODULE = "torch.distributed.run"  # --rank-start exec
WORKER_MODULE = "dslaunch.rank.worker"
SUPERVISOR_MODULE = "dslaunch.node.supervise"
ROUTER_MODULE = "dslaunch.serving.router"


@dataclass(frozen=True)
class RankPlan:
    rank: int
    node_rank: int
    local_rank: int
    host: str
    device: str
    replica: int = 0


@dataclass(frozen=True)
class NodePlan:
    """One agent (a unit: one replica's ranks on one node); with one replica, one per node."""

    node_rank: int  # the node's index in the hostfile
    host: str
    nprocs: int
    rank_offset: int
    node_dir: str
    argv: tuple[str, ...]
    env: dict[str, str]
    unit: int = 0
    replica: int = 0
    gang_offset: int = 0


@dataclass(frozen=True)
class ReplicaPlan:
    """One replica's gang: its rendezvous and process-group ports live on its head node."""

    replica: int
    head: int  # node index
    master_addr: str
    master_port: int
    rdzv_port: int
    init_url: str
    units: tuple[int, ...]
    first_rank: int
    size: int


@dataclass(frozen=True)
class RouterPlan:
    """One router: a public front of the job, its own supervised process on node `node` (router K
    on node K); every replica leader dials every router's link."""

    node_dir: str
    argv: tuple[str, ...]
    env: dict[str, str]
    link_addr: str
    link_port: int
    index: int = 0
    node: int = 0
    host: str = ""
    front_port: int = DEFAULT_FRONT_PORT
    unit: int = 0


@dataclass(frozen=True)
class LaunchPlan:
    job_id: str
    name: str
    run_id: str
    world_size: int
    init_method: str
    init_url: str
    backend: str
    master_addr: str
    master_port: int
    rdzv_port: int
    front_port: int
    nodes: tuple[NodePlan, ...]
    ranks: tuple[RankPlan, ...]
    tp: int = 0
    replicas: tuple[ReplicaPlan, ...] = ()
    routers: tuple[RouterPlan, ...] = ()
    launcher: str = "ssh"

    @property
    def router(self) -> RouterPlan | None:
        """The first router (on node 0)."""
        return self.routers[0] if self.routers else None


def job_id(name: str, run_id: str) -> str:
    return f"{name}-{run_id}"


def init_url(spec: JobSpec, jid: str, master_addr: str, master_port: int) -> str:
    """The worker's `init_process_group` URL; `{restart}` is filled in by the worker.

    `jid` is the gang's id: the job's, with `-r<N>` for replica N when there are several.
    """
    return spec.method.url(jid, master_addr, master_port, spec.rdzv_dir)


def gang_id(jid: str, replica: int, replicas: int) -> str:
    """The rendezvous id of one replica's gang; with one replica, the job's own id (as before)."""
    return jid if replicas == 1 else f"{jid}-r{replica}"


def make_plan(
    spec: JobSpec,
    run_id: str,
    master_addr: str,
    master_port: int,
    rdzv_port: int,
    backend: str,
    local_addrs: list[str] | None = None,
    front_port: int | None = None,
    gang_ports: list[tuple[int, int]] | None = None,
    link_port: int | None = None,
    router_ports: list[tuple[int, int]] | None = None,
) -> LaunchPlan:
    """Build the plan. `local_addrs[i]` is how the other nodes reach node i (torchrun --local-addr).

    `master_port`/`rdzv_port` are replica 0's; `gang_ports[r]` (master, rendezvous) the others',
    on each replica's head node; `router_ports[k]` (public, link) router K's, on node K (without
    them, as in a dry run: the next ports up).
    """
    jid = job_id(spec.name, run_id)
    serve = replace(spec.serve, port=front_port or spec.serve.port or DEFAULT_FRONT_PORT)
    layout = spec.replicas
    n_rep = len(layout)
    ports = gang_ports or [(master_port + r, rdzv_port + r) for r in range(n_rep)]
    ports[0] = (master_port, rdzv_port)
    addr_of = lambda i: local_addrs[i] if local_addrs is not None else (master_addr if i == 0 else spec.nodes[i].host)  # noqa: E731
    first_front = serve.port or DEFAULT_FRONT_PORT
    first_link = link_port or rdzv_port + n_rep
    rports = router_ports or [(first_front + k, first_link + k) for k in range(spec.router_count)]
    router_addrs = tuple(f"{_bracket(addr_of(k))}:{rports[k][1]}" for k in range(spec.router_count))
    replicas = tuple(_replica_plan(spec, jid, rep, addr_of(rep.head), *ports[rep.replica], n_rep) for rep in layout)
    node_plans: list[NodePlan] = []
    ranks: list[RankPlan] = []
    for rep, rp in zip(layout, replicas, strict=True):
        for u in rep.units:
            node_plans.append(_unit_plan(spec, jid, u, rp, backend, serve, n_rep, router_addrs,
                                         None if local_addrs is None else local_addrs[u.node]))  # fmt: skip
            for lr, slot in enumerate(u.slot_ids):
                device = f"cuda:{slot}" if backend == "nccl" else "cpu"
                ranks.append(RankPlan(u.rank_offset + lr, u.node, lr, spec.nodes[u.node].host, device, u.replica))
    node_plans.sort(key=lambda n: n.unit)
    ranks.sort(key=lambda r: r.rank)
    routers = tuple(
        router_plan(spec, jid, replace(serve, port=rports[k][0]), n_rep, addr_of(k), rports[k][1],
                    unit=len(node_plans) + k, index=k)
        for k in range(spec.router_count)
    )  # fmt: skip
    return LaunchPlan(
        job_id=jid, name=spec.name, run_id=run_id, world_size=spec.world_size, init_method=spec.init_method,
        init_url=replicas[0].init_url, backend=backend, master_addr=master_addr, master_port=master_port,
        rdzv_port=rdzv_port, front_port=rports[0][0], nodes=tuple(node_plans),
        ranks=tuple(ranks), tp=spec.tp_size, replicas=replicas, routers=routers, launcher=spec.launcher,
    )  # fmt: skip


def _replica_plan(
    spec: JobSpec, jid: str, rep: Replica, addr: str, master_port: int, rdzv_port: int, n_rep: int
) -> ReplicaPlan:
    url = init_url(spec, gang_id(jid, rep.replica, n_rep), addr, master_port)
    units = tuple(u.unit for u in rep.units)
    return ReplicaPlan(rep.replica, rep.head, addr, master_port, rdzv_port, url, units, rep.first_rank, spec.tp_size)


def _unit_plan(
    spec: JobSpec, jid: str, u: Unit, rp: ReplicaPlan, backend: str, serve: Any, n_rep: int,
    routers: tuple[str, ...], local_addr: str | None,
) -> NodePlan:  # fmt: skip
    node = spec.nodes[u.node]
    ndir = node_dir_path(spec.work_dir, jid, u.unit)
    argv = agent_argv(spec, gang_id(jid, u.replica, n_rep), u, len(rp.units), rp.master_addr, rp.rdzv_port,
                      local_addr)  # fmt: skip
    node_env = NodeEnv(
        job_id=jid, name=spec.name, node_rank=u.gang_node, host=node.host, node_dir=ndir,
        rank_offset=u.gang_offset, world_size=spec.tp_size, local_world_size=u.nprocs, nnodes=len(rp.units),
        init_method=spec.init_method, init_url=rp.init_url, backend=backend, master_addr=rp.master_addr,
        master_port=rp.master_port, pg_timeout=spec.pg_timeout, restart_backoff=spec.restart_backoff,
        restart_window=spec.restart_window,
        # torchrun would pin every rank to one thread; nodectl divides the cores instead
        auto_threads="OMP_NUM_THREADS" not in spec.env, serve=serve,
        unit=u.unit, replica=u.replica, replicas=n_rep, routers=routers,
    )  # fmt: skip
    env = {**spec.env, **node_env.to_env()}
    if backend == "nccl":
        # always from the slots: a value inherited on the node would silently move the ranks
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in u.slot_ids)
    if spec.expand_env:
        env[EXPAND_ENV] = ",".join(spec.expand_env)
    if spec.launch_dir:
        env[LAUNCH_DIR_ENV] = spec.launch_dir
    return NodePlan(u.node, node.host, u.nprocs, u.rank_offset, ndir, tuple(argv), env, u.unit, u.replica,
                    u.gang_offset)  # fmt: skip


def router_plan(
    spec: JobSpec, jid: str, serve: Any, n_rep: int, link_addr: str, link_port: int, unit: int, index: int = 0
) -> RouterPlan:
    """Router `index` under its supervisor (which restarts it on the same address if it crashes),
    on node `index`: routers run on different nodes, so a lost node leaves the others serving."""
    ndir = router_dir_path(spec.work_dir, jid, index)
    renv = RouterEnv(
        job_id=jid, name=spec.name, node_dir=ndir, replicas=n_rep, tp=spec.tp_size, link_bind=link_addr,
        link_port=link_port, serve=serve, unit=unit,
    )  # fmt: skip
    argv = (spec.python, "-m", SUPERVISOR_MODULE, "--", spec.python, "-m", ROUTER_MODULE)
    env = {**spec.env, **renv.to_env()}
    if spec.launch_dir:
        env[LAUNCH_DIR_ENV] = spec.launch_dir
    return RouterPlan(ndir, argv, env, link_addr, link_port, index, index, spec.nodes[index].host,
                      serve.port or DEFAULT_FRONT_PORT, unit)  # fmt: skip


def agent_argv(
    spec: JobSpec, gang: str, u: Unit, nnodes: int, master_addr: str, rdzv_port: int, local_addr: str | None
) -> list[str]:
    """One agent's command line: torchrun for one replica's ranks on one node, c10d rendezvous on
    the replica's head node."""
    argv = [
        spec.python, "-m", AGENT_MODULE if spec.rank_start == "fork" else TORCHRUN_MODULE,
        "--nnodes", str(nnodes),
        "--nproc-per-node", str(u.nprocs),
        "--node-rank", str(u.gang_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{_bracket(master_addr)}:{rdzv_port}",
        "--rdzv-id", gang,
        "--rdzv-conf", f"is_host={1 if u.gang_node == 0 else 0},join_timeout={int(spec.ready_timeout)}",
        "--max-restarts", str(spec.max_restarts),
        "--monitor-interval", "0.5",
        "--log-dir", "{node_dir}/elastic",
    ]  # fmt: skip
    if local_addr is not None:
        argv += ["--local-addr", local_addr]
    return [*argv, "-m", WORKER_MODULE]


def choose_backend(requested: str, gpus_per_node: list[int], slots_per_node: list[int]) -> str:
    """`auto` means NCCL only when every node has a GPU for every slot, else gloo."""
    if requested != "auto":
        return requested
    if all(g >= s for g, s in zip(gpus_per_node, slots_per_node, strict=True)) and all(g > 0 for g in gpus_per_node):
        return "nccl"
    return "gloo"


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr
