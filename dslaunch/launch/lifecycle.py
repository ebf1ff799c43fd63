"""The launch lifecycle: pre-flight, start, wait for ready, and teardown (`up` and `down`).

Whatever goes wrong after the first agent starts (a failing rank, a time-out, Ctrl-C), `up`
removes everything it started on every node before it returns, and says so.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dslaunch import __version__
from dslaunch.errors import RemoteError, UserError
from dslaunch.launch import store as state
from dslaunch.launch.hostfile import Node
from dslaunch.launch.plan import LaunchPlan, choose_backend, make_plan
from dslaunch.launch.spec import JobSpec
from dslaunch.launch.store import JobRecord, NodeRecord
from dslaunch.transport.nodes import Cluster, ConnectOptions, HostResult, NodeClient

# on_progress(node_index, stage, detail): stages are connecting, checked, started,
# rendezvous, ready, failed — shown live by the CLI.
Progress = Callable[[int, str, str], None]


def _quiet(_i: int, _stage: str, _detail: str) -> None:
    pass


class LaunchFailed(UserError):
    """`up` failed after starting something; everything was removed; `details` has log tails."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


@dataclass
class Facts:
    """What pre-flight learned from the nodes; the inputs that make the plan concrete."""

    master_addr: str
    master_port: int
    rdzv_port: int
    backend: str
    addresses: list[str]
    probes: list[dict[str, Any]] = field(default_factory=list)
    front_port: int | None = None


def connect_options(spec: JobSpec) -> ConnectOptions:
    return ConnectOptions(
        connect_timeout=spec.connect_timeout,
        command_timeout=spec.command_timeout,
        accept_new_host_keys=spec.accept_new_host_keys,
    )


def _raise_failures(results: list[HostResult[Any]], what: str) -> None:
    """One line per failed host; RemoteError messages already start with the host."""
    bad = [r for r in results if not r.ok]
    if not bad:
        return
    lines = [str(getattr(r.error, "message", r.error)) for r in bad]
    lines = [ln if ln.startswith(r.node.host) else f"{r.node.host}: {ln}" for ln, r in zip(lines, bad, strict=True)]
    raise UserError(f"{what} failed on {len(bad)} of {len(results)} node(s):\n  " + "\n  ".join(lines))


def _local_versions() -> tuple[str | None, str]:
    from importlib import metadata

    try:
        torch_v: str | None = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_v = None
    return torch_v, __version__


def _minor(v: str) -> str:
    return ".".join(v.split("+")[0].split(".")[:2])


def preflight(spec: JobSpec, cluster: Cluster, progress: Progress = _quiet) -> Facts:
    """Check every node in parallel before anything starts; raise one line per failing host."""
    nodes = spec.nodes
    if len(nodes) > 1 and any(n.is_local for n in nodes) and not spec.master_addr:
        raise UserError(
            "'localhost' in a hostfile with other nodes: they cannot reach it as 127.0.0.1; "
            "list this machine by a name the others can reach, or pass --master-addr"
        )
    for i in range(len(nodes)):
        progress(i, "connecting", "")

    def probe(c: NodeClient) -> dict[str, Any]:
        first = c is cluster.clients[0]
        args: dict[str, Any] = {"work_dir": spec.work_dir}
        if first:
            args["ports"] = [spec.master_port, spec.rdzv_port]
            args["front"] = {"bind": spec.serve.bind, "port": spec.serve.port}
        if spec.serve.model and spec.serve.model.startswith(("/", "~", ".")):
            args["model_dir"] = spec.serve.model
        out = c.call("probe", args, timeout=spec.connect_timeout + spec.command_timeout)
        out["address"] = c.transport.address()
        return out

    results = cluster.map(probe)
    for i, r in enumerate(results):
        progress(i, "checked" if r.ok else "failed", "" if r.ok else str(r.error))
    _raise_failures(results, "pre-flight")
    probes = [r.value or {} for r in results]
    torch_v, ds_v = _local_versions()
    problems: list[str] = []
    for n, p in zip(nodes, probes, strict=True):
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
    backend = choose_backend(spec.backend, [p.get("gpus", 0) for p in probes], [n.nprocs for n in nodes])
    if backend == "nccl":
        for n, p in zip(nodes, probes, strict=True):
            need = max(n.slot_ids) + 1
            if p.get("gpus", 0) < need:
                problems.append(
                    f"{n.host}{n.where}: {n.nprocs} slot(s) up to GPU {need - 1} but {p.get('gpus', 0)} GPU(s) visible"
                )
    if spec.serve.kernel_inject and backend != "nccl":
        problems.append("--kernel-inject needs GPUs (backend nccl); on CPU, leave it out (AutoTP is used)")
    front = probes[0].get("front", {})
    if "error" in front:
        flag = "--port" if spec.serve.port else "--bind"
        problems.append(f"{nodes[0].host}: the front {front['error']} ({flag})")
    busy = probes[0].get("busy_ports", [])
    for flag, port in (("--master-port", spec.master_port), ("--rdzv-port", spec.rdzv_port)):
        if port is not None and port in busy:
            problems.append(f"{nodes[0].host}: port {port} is in use ({flag}; leave it out to pick a free one)")
    if problems:
        raise UserError("pre-flight failed:\n  " + "\n  ".join(problems))
    if spec.init_method == "file":
        _check_shared_dir(spec, cluster)
    master_port, rdzv_port = probes[0]["ports"]
    addresses = [p["address"] for p in probes]
    master_addr = spec.master_addr or addresses[0]
    addresses[0] = master_addr
    return Facts(master_addr, master_port, rdzv_port, backend, addresses, probes, front.get("port"))


def _check_shared_dir(spec: JobSpec, cluster: Cluster) -> None:
    """Write a probe on node 0 and read it on every other node: the directory must be one."""
    head, rest = cluster.clients[0], cluster.clients[1:]
    wrote = head.call("rdzv-write", {"dir": spec.rdzv_dir})
    if "error" in wrote:
        raise UserError(f"{head.node.host}: --rdzv-dir {wrote['error']}")
    try:
        args = {"dir": spec.rdzv_dir, "path": wrote["path"], "token": wrote["token"]}
        results = cluster.map(lambda c: c.call("rdzv-read", args), rest)
        _raise_failures(results, "--rdzv-dir check")
        bad = [f"{r.node.host}: --rdzv-dir {(r.value or {})['error']}" for r in results if "error" in (r.value or {})]
        if bad:
            raise UserError("--init-method file needs one directory shared by all nodes:\n  " + "\n  ".join(bad))
    finally:
        with contextlib.suppress(RemoteError):
            head.call("remove", {"paths": [wrote["path"]]})


def new_record(spec: JobSpec, plan: LaunchPlan, facts: Facts) -> JobRecord:
    return JobRecord(
        name=spec.name,
        run_id=plan.run_id,
        job_id=plan.job_id,
        state="starting",
        world_size=plan.world_size,
        init_method=plan.init_method,
        backend=plan.backend,
        python=spec.python,
        master_addr=plan.master_addr,
        master_port=plan.master_port,
        rdzv_port=plan.rdzv_port,
        nodes=[
            NodeRecord(
                node_rank=np.node_rank,
                host=np.host,
                target=spec.nodes[np.node_rank].target,
                nprocs=np.nprocs,
                rank_offset=np.rank_offset,
                node_dir=np.node_dir,
                address=facts.addresses[np.node_rank],
            )
            for np in plan.nodes
        ],
        rdzv_glob=f"{spec.rdzv_dir.rstrip('/')}/{plan.job_id}-*" if spec.rdzv_dir else None,
        connect_timeout=spec.connect_timeout,
        command_timeout=spec.command_timeout,
        accept_new_host_keys=spec.accept_new_host_keys,
        keep_logs=spec.keep_logs,
        created=time.time(),
        extra={"front": front_record(spec, plan)},
    )


def front_record(spec: JobSpec, plan: LaunchPlan) -> dict[str, Any]:
    """Where `query` finds the front; the token lives only here (0600) and on node 0 (0600)."""
    token = spec.serve.token
    if token is None and not spec.serve.loopback:
        token = secrets.token_urlsafe(32)
    return {
        "bind": spec.serve.bind,
        "port": plan.front_port,
        "loopback": spec.serve.loopback,
        "task": "custom" if spec.serve.handler else spec.serve.task,
        "model": spec.serve.handler or spec.serve.model or "tiny-llama (built in)",
        "token": token,
        # the front proves it knows this before a client sends it the token (a squatter on the port cannot)
        "nonce": secrets.token_urlsafe(24),
    }


def up(spec: JobSpec, progress: Progress = _quiet) -> JobRecord:
    """Start the job on every node and wait until every rank is ready (or clean up and raise)."""
    with state.locked(spec.name):
        old = state.load(spec.name)
        if old is not None:
            raise UserError(
                f"a job named {spec.name!r} already exists (state {old.state}, {old.world_size} ranks "
                f"on {len(old.nodes)} node(s)); see it with 'dslaunch status --name {spec.name}', "
                f"remove it with 'dslaunch down --name {spec.name}', or pick another --name"
            )
        with Cluster(spec.nodes, connect_options(spec), spec.python, spec.parallelism) as cluster:
            facts = preflight(spec, cluster, progress)
            plan = make_plan(
                spec, uuid.uuid4().hex[:8], facts.master_addr, facts.master_port, facts.rdzv_port,
                facts.backend, facts.addresses, facts.front_port,
            )  # fmt: skip
            rec = new_record(spec, plan, facts)
            state.save(rec)
            try:
                _start(plan, cluster, rec, progress)
                wait_ready(rec, cluster, spec.ready_timeout, progress)
            except BaseException as e:
                with _no_interrupts():  # a second Ctrl-C must not cut the clean-up short
                    left = teardown(rec, cluster, spec.stop_grace)
                unclean = [rec.nodes[i].host for i, r in enumerate(left)
                           if not r.ok or (r.value or {}).get("survivors")]  # fmt: skip
                if not unclean:
                    state.remove(rec.name)
                else:
                    rec.state = "failed"
                    state.save(rec)
                if isinstance(e, LaunchFailed):
                    e.message += (
                        f"; could not clean {', '.join(unclean)}: the record is kept, run "
                        f"'dslaunch down --name {rec.name}' once it answers (everything else was removed)"
                        if unclean else "; everything it started was removed from every node"
                    )  # fmt: skip
                raise
            rec.state = "ready"
            state.save(rec)
            return rec


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
    from dslaunch.transport.ssh import load_ssh_config

    head = spec.nodes[0]
    addr = spec.master_addr or (
        "127.0.0.1" if head.is_local else load_ssh_config(None).lookup(head.host).get("hostname", head.host)
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
    return plan, "; ".join(open_)


def _start(plan: LaunchPlan, cluster: Cluster, rec: JobRecord, progress: Progress) -> None:
    token = rec.extra.get("front", {}).get("token")
    nonce = rec.extra.get("front", {}).get("nonce")
    # pre-flight found these free on node 0; the start checks them again
    ports = {"rendezvous port (--rdzv-port)": plan.rdzv_port}
    if plan.init_method in ("tcp", "env"):
        ports["master port (--master-port)"] = plan.master_port

    def start(c: NodeClient) -> dict[str, Any]:
        np = plan.nodes[cluster.clients.index(c)]
        head = np.node_rank == 0
        files = {k: v for k, v in (("front.token", token), ("front.nonce", nonce)) if v and head}
        return c.call(
            "start",
            {"job_id": plan.job_id, "node_rank": np.node_rank, "node_dir": np.node_dir,
             "argv": list(np.argv), "env": np.env, "files": files, "free_ports": ports if head else {}},
        )  # fmt: skip

    results = cluster.map(start)
    details: list[str] = []
    for i, r in enumerate(results):
        if r.ok and "error" not in (r.value or {}):
            rec.nodes[i].agent_pid = (r.value or {}).get("pid")
            progress(i, "started", f"agent pid {rec.nodes[i].agent_pid}")
        else:
            msg = str(r.error) if r.error else f"{r.node.host}: {(r.value or {})['error']}"
            progress(i, "failed", msg)
            details.append(msg)
            details += [f"  {ln}" for ln in (r.value or {}).get("log", [])]
    state.save(rec)
    if details:
        raise LaunchFailed(f"could not start the agent on every node: {details[0]}", details)


def node_summary(rec: JobRecord, i: int, st: dict[str, Any]) -> tuple[str, str]:
    """(stage, detail) of one node from its nodectl status answer."""
    ranks = [r for r in st.get("ranks", []) if r.get("alive")]
    ready = [r for r in ranks if r.get("stage") == "ready"]
    want = rec.nodes[i].nprocs
    agent = st.get("agent", {})
    if not agent.get("alive"):
        code = agent.get("exit_code")
        return "failed", f"agent exited ({'code ' + str(code) if code is not None else 'killed'})"
    restarts = max((r.get("restarts", 0) for r in st.get("ranks", [])), default=0)
    note = f", restart {restarts}" if restarts else ""
    if len(ready) == want and len({r.get("restarts") for r in ready}) == 1:
        return "ready", f"{want}/{want} ranks{note}"
    if any(r.get("stage") in ("rendezvous", "loading", "ready") for r in ranks):
        return "rendezvous", f"{len(ready)}/{want} ranks ready{note}"
    return "started", f"{len(ranks)}/{want} ranks up{note}"


def wait_ready(rec: JobRecord, cluster: Cluster, timeout: float, progress: Progress = _quiet) -> None:
    """Poll every node until all ranks are ready; a failed agent or the deadline ends the wait."""
    deadline = time.monotonic() + timeout
    args = lambda i, _c: {"node_dir": rec.nodes[i].node_dir, "job_id": rec.job_id, "node_rank": i}  # noqa: E731
    while True:
        results = cluster.call_all("status", args)
        stages: list[str] = []
        for i, r in enumerate(results):
            if not r.ok:
                progress(i, "failed", str(r.error))
                raise LaunchFailed(f"lost contact while starting: {r.error}")
            stage, detail = node_summary(rec, i, r.value or {})
            progress(i, stage, detail)
            stages.append(stage)
        if "failed" in stages:
            i = stages.index("failed")
            raise LaunchFailed(
                f"{rec.nodes[i].host}: the agent stopped before the job was ready",
                failure_details(rec, cluster),
            )
        ready_ranks = sum(rec.nodes[i].nprocs for i, s in enumerate(stages) if s == "ready")
        if ready_ranks == rec.world_size:
            return
        if time.monotonic() > deadline:
            raise LaunchFailed(
                f"not every rank was ready within {timeout:g}s (--timeout): {ready_ranks}/{rec.world_size} ready",
                failure_details(rec, cluster),
            )
        time.sleep(0.3)


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
            out.append(f"{host} agent log:")
            out += [f"    {ln}" for ln in st["agent_log"]]
    return out


def teardown(rec: JobRecord, cluster: Cluster, grace: float = 10.0) -> list[HostResult[dict[str, Any]]]:
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


def record_nodes(rec: JobRecord) -> list[Node]:
    """The recorded nodes as hostfile nodes again (user@host targets split back)."""
    nodes = []
    for n in rec.nodes:
        user, _, host = n.target.rpartition("@")
        nodes.append(Node(host=host, slots=n.nprocs, user=user or None))
    return nodes


def record_options(rec: JobRecord) -> ConnectOptions:
    return ConnectOptions(
        connect_timeout=rec.connect_timeout,
        command_timeout=rec.command_timeout,
        accept_new_host_keys=rec.accept_new_host_keys,
    )


def cluster_for(rec: JobRecord, parallelism: int = 32) -> Cluster:
    """Reconnect to a recorded job's nodes with the options it was started with."""
    return Cluster(record_nodes(rec), record_options(rec), rec.python, parallelism)


@dataclass
class DownReport:
    name: str
    found: int = 0
    killed: int = 0
    nodes: int = 0
    unreachable: list[str] = field(default_factory=list)
    survivors: dict[str, list[int]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.unreachable and not self.survivors


def down(name: str, grace: float = 10.0) -> DownReport | None:
    """Stop a job everywhere. None when there is no such job (a second `down` is fine)."""
    with state.locked(name):
        rec = state.load(name)
        if rec is None:
            return None
        rec.state = "stopping"
        state.save(rec)
        report = DownReport(name, nodes=len(rec.nodes))
        with cluster_for(rec) as cluster:
            for r in teardown(rec, cluster, grace):
                if not r.ok:
                    report.unreachable.append(str(r.error))
                    continue
                v = r.value or {}
                report.found += v.get("found", 0)
                report.killed += v.get("killed", 0)
                if v.get("survivors"):
                    report.survivors[r.node.host] = v["survivors"]
        if report.clean:
            state.remove(name)
        return report
