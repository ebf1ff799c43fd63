"""From a job spec and resolved facts to a launch plan: pure functions, no I/O.

The plan says, for every node, the exact torchrun agent command and environment, and for every
rank which node, local rank and device it gets. Ranks are fixed by hostfile order (node 0 holds
ranks 0..S-1), and the worker uses this numbering rather than the agent's: torchrun's c10d
rendezvous may reorder nodes between restarts, and rank 0 must stay on node 0 where the front is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dslaunch.launch.spec import JobSpec
from dslaunch.wire.serve import DEFAULT_FRONT_PORT

AGENT_MODULE = "torch.distributed.run"
WORKER_MODULE = "dslaunch.rank.worker"
# Marks every process a job starts; `down` finds leftovers by it, whatever their process group.
JOB_ENV = "DSLAUNCH_JOB_ID"
NODE_ENV = "DSLAUNCH_NODE_RANK"


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


def node_dir(work_dir: str, jid: str, node_rank: int) -> str:
    """Per-node directory; node rank is part of it so simulated nodes on one machine never collide."""
    return f"{work_dir.rstrip('/')}/{jid}/node{node_rank}"


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
    world = spec.world_size
    nnodes = len(spec.nodes)
    node_plans: list[NodePlan] = []
    ranks: list[RankPlan] = []
    offset = 0
    for i, node in enumerate(spec.nodes):
        ndir = node_dir(spec.work_dir, jid, i)
        for lr, slot in enumerate(node.slot_ids):
            device = f"cuda:{slot}" if backend == "nccl" else "cpu"
            ranks.append(RankPlan(offset + lr, i, lr, node.host, device))
        argv: list[str] = [
            spec.python, "-m", AGENT_MODULE,
            "--nnodes", str(nnodes),
            "--nproc-per-node", str(node.nprocs),
            "--node-rank", str(i),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{_bracket(master_addr)}:{rdzv_port}",
            "--rdzv-id", jid,
            "--rdzv-conf", f"is_host={1 if i == 0 else 0},join_timeout={int(spec.ready_timeout)}",
            "--max-restarts", str(spec.max_restarts),
            "--monitor-interval", "0.5",
            "--log-dir", "{node_dir}/elastic",
        ]  # fmt: skip
        if local_addrs is not None:
            argv += ["--local-addr", local_addrs[i]]
        argv += ["-m", WORKER_MODULE]
        env = dict(spec.env)
        env.update(
            {
                JOB_ENV: jid,
                NODE_ENV: str(i),
                "DSLAUNCH_NAME": spec.name,
                "DSLAUNCH_HOST": node.host,
                "DSLAUNCH_NODE_DIR": ndir,
                "DSLAUNCH_RANK_OFFSET": str(offset),
                "DSLAUNCH_WORLD_SIZE": str(world),
                "DSLAUNCH_INIT_METHOD": spec.init_method,
                "DSLAUNCH_INIT_URL": url,
                "DSLAUNCH_BACKEND": backend,
                "DSLAUNCH_PG_TIMEOUT": str(int(spec.pg_timeout)),
                "DSLAUNCH_RESTART_BACKOFF": f"{spec.restart_backoff:g}",
                "DSLAUNCH_MASTER_ADDR": master_addr,
                "DSLAUNCH_MASTER_PORT": str(master_port),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(node.nprocs),
                # DeepSpeed's CPU shared-memory all-reduce reads LOCAL_SIZE; unset, it crashes.
                "LOCAL_SIZE": str(node.nprocs),
                "CROSS_SIZE": str(nnodes),
                "PYTHONUNBUFFERED": "1",
                "DSLAUNCH_SERVE": serve.to_json(),
            }
        )
        if "OMP_NUM_THREADS" not in spec.env:
            # torchrun would pin every rank to one thread; the worker divides the cores instead.
            env["DSLAUNCH_AUTO_THREADS"] = "1"
        if backend == "nccl" and not node.all_slots and "CUDA_VISIBLE_DEVICES" not in spec.env:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(s) for s in node.slot_ids)
        node_plans.append(NodePlan(i, node.host, node.nprocs, offset, ndir, tuple(argv), env))
        offset += node.nprocs
    return LaunchPlan(
        job_id=jid,
        name=spec.name,
        run_id=run_id,
        world_size=world,
        init_method=spec.init_method,
        init_url=url,
        backend=backend,
        master_addr=master_addr,
        master_port=master_port,
        rdzv_port=rdzv_port,
        front_port=serve.port or DEFAULT_FRONT_PORT,
        nodes=tuple(node_plans),
        ranks=tuple(ranks),
    )


def choose_backend(requested: str, gpus_per_node: list[int], slots_per_node: list[int]) -> str:
    """`auto` means NCCL only when every node has a GPU for every slot, else gloo."""
    if requested != "auto":
        return requested
    if all(g >= s for g, s in zip(gpus_per_node, slots_per_node, strict=True)) and all(g > 0 for g in gpus_per_node):
        return "nccl"
    return "gloo"


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr
