"""The nodes of a Slurm allocation as a hostfile would list them, and the launcher a job gets.

Inside `salloc` or an `sbatch` script, Slurm says which nodes the job holds
(`SLURM_JOB_NODELIST`, expanded by `scontrol show hostnames`) and how much of each: GPUs per node
(`SLURM_GPUS_PER_NODE`) or else tasks per node (`SLURM_TASKS_PER_NODE`, `2(x3),1`). Those become
the slots, and `--include`, `--exclude`, `--num-nodes`, `--num-gpus` select from them exactly as
from a hostfile. `srun_selection` says the same selection in srun's terms, the way DeepSpeed's
Slurm runner does (`--nodelist`, `--nodes`, `--gpus-per-node`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dslaunch.errors import UserError
from dslaunch.launch.hostfile import Node, select_nodes
from dslaunch.transport.slurm import hostnames

_COUNT_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def per_node_counts(value: str, n: int) -> list[int]:
    """Slurm's compressed per-node counts (`2(x3),1`) for `n` nodes."""
    out: list[int] = []
    for part in value.split(","):
        m = _COUNT_RE.match(part.strip())
        if not m:
            raise UserError(f"cannot read Slurm's per-node count {value!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    if len(out) != n:
        raise UserError(f"Slurm's per-node count {value!r} is for {len(out)} node(s), the allocation has {n}")
    return out


def allocation_nodes(env: Mapping[str, str]) -> list[Node]:
    """The allocation's nodes, in Slurm's order, with their slots."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("--launcher slurm: SLURM_JOB_NODELIST is not set (run inside salloc or an sbatch script)")
    hosts = hostnames(nodelist)
    gpus = (env.get("SLURM_GPUS_PER_NODE") or "").rpartition(":")[2]
    if gpus.isdigit() and int(gpus) > 0:
        slots = [int(gpus)] * len(hosts)
    else:
        counts = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE") or "1"
        slots = per_node_counts(counts, len(hosts))
    return [Node(host=h, slots=s) for h, s in zip(hosts, slots, strict=True)]


def choose_slurm_nodes(
    env: Mapping[str, str],
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_gpus: int | None = None,
) -> list[Node]:
    return select_nodes(allocation_nodes(env), include, exclude, num_nodes, num_gpus)


def srun_selection(
    active: list[Node], include: str | None, exclude: str | None, num_nodes: int | None, num_gpus: int | None
) -> list[str]:
    """The selection as srun flags, in DeepSpeed's SlurmRunner's order: the surviving hosts when
    a filter was given, then `--nodes` and `--gpus-per-node` (per node, not a job total)."""
    flags = ["-n", str(sum(n.nprocs for n in active))]
    if include or exclude:
        flags += ["--nodelist", ",".join(n.host for n in active), "--nodes", str(len(active))]
    if num_nodes and num_nodes > 0:
        flags += ["--nodes", str(num_nodes)]
    if num_gpus and num_gpus > 0:
        flags += ["--gpus-per-node", str(num_gpus)]
    return flags


def choose_launcher(requested: str, hostfile: str | None, env: Mapping[str, str], nodes: list[Node] | None) -> str:
    """`auto`: slurm inside an allocation without a hostfile; local when every node is this
    machine; else ssh. Anything else is taken as asked."""
    if requested != "auto":
        return requested
    if env.get("SLURM_JOB_ID") and not hostfile:
        return "slurm"
    return "local" if nodes is not None and all(n.is_local for n in nodes) else "ssh"
