"""From a job spec and resolved facts to a launch plan: pure functions, no I/O.

The plan says, for every node, the exact torchrun agent command and environment, and for every
rank which node, local rank and device it gets. Ranks are fixed by hostfile order (node 0 holds
ranks 0..S-1), and the worker uses this numbering rather than the agent's: torchrun's c10d
rendezvous may reorder nodes between restarts, and rank 0 must stay on node 0 where the front is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dslaunch.launch.spec import JobSpec
from dslaunch.wire.nodedir import node_dir_path
from dslaunch.wire.rankenv import EXPAND_ENV, LAUNCH_DIR_ENV, NodeEnv
from dslaunch.wire.serve import DEFAULT_FRONT_PORT

AGENT_MODULE = "torch.distributed.run"
WORKER_MODULE = "dslaunch.rank.worker"


@dataclass(frozen=True)
class RankPlan:
    rank: int
    node_rank: int
    local_rank: int
    host: str
    device: str


@dataclass(frozen=True)
class NodePlan:
    node_rank: int
    host: str
    nprocs: int
    rank_offset: int
    node_dir: str
    argv: tuple[str, ...]
    env: dict[str, str]


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


def job_id(name: str, run_id: str) -> str:
    return f"{name}-{run_id}"


def init_url(spec: JobSpec, jid: str, master_addr: str, master_port: int) -> str:
    """The worker's `init_process_group` URL; `{restart}` is filled in by the worker."""
    if spec.init_method == "tcp":
        host = f"[{master_addr}]" if ":" in master_addr else master_addr
        return f"tcp://{host}:{master_port}"
    if spec.init_method == "file":
        assert spec.rdzv_dir is not None
        return f"file://{spec.rdzv_dir.rstrip('/')}/{jid}-{{restart}}"
    return "env://"


def make_plan(
    spec: JobSpec,
    run_id: str,
    master_addr: str,
    master_port: int,
    rdzv_port: int,
    backend: str,
    local_addrs: list[str] | None = None,
    front_port: int | None = None,
) -> LaunchPlan:
    """Build the plan. `local_addrs[i]` is how the other nodes reach node i (torchrun --local-addr)."""
    jid = job_id(spec.name, run_id)
    serve = replace(spec.serve, port=front_port or spec.serve.port or DEFAULT_FRONT_PORT)
    url = init_url(spec, jid, master_addr, master_port)
    node_plans: list[NodePlan] = []
    ranks: list[RankPlan] = []
    offset = 0
    for i, node in enumerate(spec.nodes):
        ndir = node_dir_path(spec.work_dir, jid, i)
        for lr, slot in enumerate(node.slot_ids):
            device = f"cuda:{slot}" if backend == "nccl" else "cpu"
            ranks.append(RankPlan(offset + lr, i, lr, node.host, device))
        argv = agent_argv(spec, jid, i, master_addr, rdzv_port, None if local_addrs is None else local_addrs[i])
        node_env = NodeEnv(
            job_id=jid, name=spec.name, node_rank=i, host=node.host, node_dir=ndir, rank_offset=offset,
            world_size=spec.world_size, local_world_size=node.nprocs, nnodes=len(spec.nodes),
            init_method=spec.init_method, init_url=url, backend=backend, master_addr=master_addr,
            master_port=master_port, pg_timeout=spec.pg_timeout, restart_backoff=spec.restart_backoff,
            # torchrun would pin every rank to one thread; nodectl divides the cores instead
            auto_threads="OMP_NUM_THREADS" not in spec.env, serve=serve,
        )  # fmt: skip
        env = {**spec.env, **node_env.to_env()}
        if backend == "nccl":
            # always from the slots: a value inherited on the node would silently move the ranks
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in node.slot_ids)
        if spec.expand_env:
            env[EXPAND_ENV] = ",".join(spec.expand_env)
        if spec.launch_dir:
            env[LAUNCH_DIR_ENV] = spec.launch_dir
        node_plans.append(NodePlan(i, node.host, node.nprocs, offset, ndir, tuple(argv), env))
        offset += node.nprocs
    return LaunchPlan(
        job_id=jid, name=spec.name, run_id=run_id, world_size=spec.world_size, init_method=spec.init_method,
        init_url=url, backend=backend, master_addr=master_addr, master_port=master_port, rdzv_port=rdzv_port,
        front_port=serve.port or DEFAULT_FRONT_PORT, nodes=tuple(node_plans), ranks=tuple(ranks),
    )  # fmt: skip


def agent_argv(
    spec: JobSpec, jid: str, node_rank: int, master_addr: str, rdzv_port: int, local_addr: str | None
) -> list[str]:
    """The torchrun agent's command line on one node; c10d rendezvous hosted on node 0."""
    argv = [
        spec.python, "-m", AGENT_MODULE,
        "--nnodes", str(len(spec.nodes)),
        "--nproc-per-node", str(spec.nodes[node_rank].nprocs),
        "--node-rank", str(node_rank),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{_bracket(master_addr)}:{rdzv_port}",
        "--rdzv-id", jid,
        "--rdzv-conf", f"is_host={1 if node_rank == 0 else 0},join_timeout={int(spec.ready_timeout)}",
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
