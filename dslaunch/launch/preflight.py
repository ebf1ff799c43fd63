"""Pre-flight: check every node in parallel before anything starts, and learn what the plan needs.

Every problem found on every node is reported at once, one line each naming the host and the
flag to change, so a user fixes them in one go instead of one `up` at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from dslaunch import __version__
from dslaunch.errors import NodeOpFailed, UserError
from dslaunch.launch.families import family_problem
from dslaunch.launch.modelcheck import local_manifest, mismatch_line, node_path
from dslaunch.launch.plan import choose_backend
from dslaunch.launch.replicas import heads_per_node
from dslaunch.launch.spec import JobSpec
from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.nodes import Cluster, NodeClient
from dslaunch.wire.serve import DEFAULT_FRONT_PORT
from dslaunch.wire.states import NodeStage

# on_progress(node_index, stage, detail): shown live by the CLI while `up` runs.
Progress = Callable[[int, NodeStage, str], None]
# A node whose shell takes longer than this to start slows every dslaunch operation on it.
SLOW_SHELL_S = 1.0
HASH_RATE = 100e6  # bytes/s a node hashes at least (a slow disk): the probe's extra time


def quiet(_i: int, _stage: NodeStage, _detail: str) -> None:
    pass


@dataclass
class Facts:
    """What pre-flight learned from the nodes; the inputs that make the plan concrete."""

    master_addr: str
    master_port: int
    rdzv_port: int
    backend: str
    addresses: list[str]
    front_port: int | None = None
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    gang_ports: list[tuple[int, int]] | None = None  # per replica: (master, rendezvous) on its head node
    link_port: int | None = None  # the first router's link port on node 0
    router_ports: list[tuple[int, int]] | None = None  # per router (public, link), router K on node K


def connect_options(spec: JobSpec) -> ConnectOptions:
    return ConnectOptions(
        connect_timeout=spec.connect_timeout,
        command_timeout=spec.command_timeout,
        accept_new_host_keys=spec.accept_new_host_keys,
    )


def preflight(spec: JobSpec, cluster: Cluster, progress: Progress = quiet) -> Facts:
    """Check every node in parallel before anything starts; raise one line per problem."""
    nodes = spec.nodes
    if len(nodes) > 1 and any(n.is_local for n in nodes) and not spec.master_addr:
        raise UserError(
            "'localhost' in a hostfile with other nodes: they cannot reach it as 127.0.0.1; "
            "list this machine by a name the others can reach, or pass --master-addr"
        )
    for i in range(len(nodes)):
        progress(i, NodeStage.CONNECTING, "")
    want = local_manifest(spec.serve.model)
    results = cluster.map(lambda c: _probe(spec, cluster, c, want))
    for i, r in enumerate(results):
        progress(i, NodeStage.CHECKED if r.ok else NodeStage.FAILED, "" if r.ok else str(r.error))
    results.raise_failures("pre-flight")
    probes = [r.value or {} for r in results]
    backend = choose_backend(spec.backend, [p.get("gpus", 0) for p in probes], [n.nprocs for n in nodes])
    problems = _node_problems(spec, probes) + _backend_problems(spec, probes, backend) + _head_problems(spec, probes)
    if want is not None:
        model = spec.serve.model or ""
        lines = [mismatch_line(n.host, model, want, p["model_files"]) for n, p in zip(nodes, probes, strict=True)
                 if p.get("model_files") is not None]  # fmt: skip
        problems += [line for line in lines if line]
    family = family_problem(
        spec.serve.model or "", probes[0].get("model_config"), spec.tp_size, spec.serve.kernel_inject,
        probes[0].get("deepspeed"),
    )  # fmt: skip
    if family:
        problems.insert(0, family)
    if problems:
        raise UserError("pre-flight failed:\n  " + "\n  ".join(problems))
    spec.method.preflight(spec.rdzv_dir, cluster)
    gang_ports = assign_ports(spec, [p.get("ports") or [] for p in probes])
    router_ports = [(int(p["front_port"]), int(p["link_port"])) for p in probes[: spec.router_count]]
    link_port = router_ports[0][1]
    master_port, rdzv_port = gang_ports[0]
    addresses = node_addresses(spec, cluster, [p["address"] for p in probes])
    master_addr = addresses[0]
    ssh_warnings = [w for c in cluster.clients for w in getattr(c.transport, "warnings", [])]
    slow = ssh_warnings + [
        f"{n.host}: its shell took {p['shell_s']:.1f}s to start (heavy shell start-up files slow every "
        "dslaunch command on it)"
        for n, p in zip(nodes, probes, strict=True)
        if p.get("shell_s", 0) > SLOW_SHELL_S
    ]
    notes = _launch_dir_note(spec, probes)
    return Facts(
        master_addr, master_port, rdzv_port, backend, addresses, probes[0].get("front_port"), tuple(slow), notes,
        gang_ports, link_port, router_ports,
    )  # fmt: skip


def port_requests(spec: JobSpec) -> list[list[int | None]]:
    """The ports each node is asked for (None: pick a free one): two per replica whose head it is,
    master and rendezvous; replica 0's first, on node 0 (the user's when given)."""
    heads = heads_per_node(spec.replicas, len(spec.nodes))
    out: list[list[int | None]] = [[None, None] * k for k in heads]
    out[0] = [spec.master_port, spec.rdzv_port, *out[0][2:]]
    return out


def assign_ports(spec: JobSpec, chosen: list[list[int]]) -> list[tuple[int, int]]:
    """Per replica (master, rendezvous), in replica order, from the probes' picks."""
    left = [list(c) for c in chosen]
    gang: list[tuple[int, int]] = []
    for rep in spec.replicas:
        ports = left[rep.head]
        gang.append((ports.pop(0), ports.pop(0)))
    return gang


def _launch_dir_note(spec: JobSpec, probes: list[dict[str, Any]]) -> tuple[str, ...]:
    """Say where the ranks run: DeepSpeed's launch directory (first on PYTHONPATH) where it exists."""
    if not spec.launch_dir:
        return ()
    missing = [n.host for n, p in zip(spec.nodes, probes, strict=True) if not p.get("launch_dir_exists")]
    if len(missing) == len(spec.nodes):
        return (f"the launch directory {spec.launch_dir} does not exist on the nodes: the ranks run in their node "
                "directories",)  # fmt: skip
    where = f"on every node but {', '.join(missing)}" if missing else "on every node"
    return (f"the ranks run in {spec.launch_dir}, first on PYTHONPATH, {where} (as with DeepSpeed; --no-launch-dir "
            "to leave it out)",)  # fmt: skip


def node_addresses(spec: JobSpec, cluster: Cluster, reached: list[str | None]) -> list[str]:
    """How the other nodes reach each node: `--master-addr` for node 0, else the address SSH
    reached it at; a node behind a proxy (ProxyCommand, ProxyJump) is asked itself, node 0 first."""
    out = list(reached)
    if spec.master_addr:
        out[0] = spec.master_addr
    single = len(spec.nodes) == 1

    def ask(i: int) -> str:
        toward = [a for j, a in enumerate(out) if a and j != i]
        try:
            ans = cluster.clients[i].call("address", {"toward": toward, "loopback_ok": single})
        except NodeOpFailed as e:
            raise UserError(f"{e.host}: cannot ask it for its address: {e.reason}") from None
        if not ans.get("address"):
            flag = "--master-addr" if i == 0 else "an address other nodes reach in the hostfile"
            raise UserError(
                f"{spec.nodes[i].host}: reached through a proxy, and it cannot tell which of its addresses the "
                f"other nodes reach ({flag})"
            )
        return str(ans["address"])

    if out[0] is None:
        out[0] = ask(0)
    rest = [c for i, c in enumerate(cluster.clients) if out[i] is None]
    if rest:
        index = {id(c): i for i, c in enumerate(cluster.clients)}
        results = cluster.map(lambda c: ask(index[id(c)]), rest)
        results.raise_failures("pre-flight")
        for c, r in zip(rest, results, strict=True):
            out[index[id(c)]] = r.value
    return [str(a) for a in out]


def _probe(spec: JobSpec, cluster: Cluster, c: NodeClient, local: dict[str, Any] | None = None) -> dict[str, Any]:
    """One node's facts; node 0 also picks the ports. Times the node's shell start-up too."""
    shell_s = 0.0
    if getattr(c.transport, "login_shell", True):  # a Slurm step runs no login shell: nothing to time
        t0 = time.monotonic()
        c.transport.run(["true"], timeout=spec.connect_timeout + spec.command_timeout)
        shell_s = time.monotonic() - t0
    args: dict[str, Any] = {"work_dir": spec.work_dir}
    index = cluster.clients.index(c)
    want = port_requests(spec)[index]
    if want:
        args["ports"] = want
    if index < spec.router_count:  # router K runs here: its public port (--port + K) and its link port
        n = spec.router_count
        args["ports"] = want
        args["front"] = {"bind": spec.serve.bind, "port": None if spec.serve.port is None else spec.serve.port + index,
                         "first": DEFAULT_FRONT_PORT + index, "step": n}  # fmt: skip
        args["link"] = True  # the router's link port, which replica leaders dial
    if index == 0 and spec.serve.model and not spec.serve.handler and spec.model_check:
        args["model_config"] = spec.serve.model
    if spec.serve.model and spec.serve.model.startswith(("/", "~", ".")):
        args["model_dir"] = spec.serve.model
    if spec.launch_dir:
        args["launch_dir"] = spec.launch_dir
    timeout = spec.connect_timeout + spec.command_timeout
    if local is not None and spec.serve.model:  # the nodes' hashes, to compare with this host's
        args["model_hashes"] = node_path(spec.serve.model)
        timeout += sum(int(f["size"]) for f in local.values()) / HASH_RATE  # a first hash reads every byte
    out = c.call("probe", args, timeout=timeout)
    out["address"] = c.transport.address()
    out["shell_s"] = shell_s
    return out


def _local_versions() -> tuple[str | None, str]:
    try:
        torch_v: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = None
    return torch_v, __version__


def _minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def _node_problems(spec: JobSpec, probes: list[dict[str, Any]]) -> list[str]:
    """Versions, interpreters, work and model directories, on every node."""
    torch_v, ds_v = _local_versions()
    problems: list[str] = []
    for n, p in zip(spec.nodes, probes, strict=True):
        if p.get("dslaunch") != ds_v:
            problems.append(f"{n.host}: dslaunch {p.get('dslaunch')} there, {ds_v} here (install the same version)")
        if p.get("torch") is None:
            problems.append(f"{n.host}: torch is not installed for {p.get('executable')} (--python)")
        elif torch_v and _minor(p["torch"]) != _minor(torch_v):
            problems.append(f"{n.host}: torch {p['torch']} there, {torch_v} here (use the same minor version)")
        if p.get("work_dir_error"):
            problems.append(f"{n.host}: cannot create the work directory {p['work_dir_error']} (--work-dir)")
        if p.get("model_dir_error"):
            problems.append(f"{n.host}: --model {p['model_dir_error']}")
        if p.get("deepspeed") is None and not spec.serve.handler:
            problems.append(f"{n.host}: deepspeed is not installed for {p.get('executable')} (--python)")
    return problems


def _backend_problems(spec: JobSpec, probes: list[dict[str, Any]], backend: str) -> list[str]:
    problems: list[str] = []
    if backend == "nccl":
        for n, p in zip(spec.nodes, probes, strict=True):
            need = max(n.slot_ids) + 1
            if p.get("gpus", 0) < need:
                problems.append(
                    f"{n.host}{n.where}: {n.nprocs} slot(s) up to GPU {need - 1} but {p.get('gpus', 0)} GPU(s) visible"
                )
    if spec.serve.kernel_inject and backend != "nccl":
        problems.append("--kernel-inject needs GPUs (backend nccl); on CPU, leave it out (AutoTP is used)")
    return problems


def _head_problems(spec: JobSpec, probes: list[dict[str, Any]]) -> list[str]:
    """The routers' public ports, and node 0's ports that the user fixed and are already taken."""
    host, head = spec.nodes[0].host, probes[0]
    problems: list[str] = []
    for k, (n, p) in enumerate(zip(spec.nodes[: spec.router_count], probes, strict=False)):
        if p.get("front_error"):
            flag = ("--port" + (f" (+{k} for router {k})" if k else "")) if spec.serve.port else "--bind"
            problems.append(f"{n.host}: the front {p['front_error']} ({flag})")
    busy = head.get("busy_ports", [])
    for flag, port in (("--master-port", spec.master_port), ("--rdzv-port", spec.rdzv_port)):
        if port is not None and port in busy:
            problems.append(f"{host}: port {port} is in use ({flag}; leave it out to pick a free one)")
    return problems
