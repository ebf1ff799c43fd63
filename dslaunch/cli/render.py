"""Everything dslaunch shows a person: rich tables and the live `up` view. No logic.

Text from the nodes (log lines, errors, model output) goes through `plain` first: it is written
by the job, and escape sequences in it would reach the user's terminal (rewrite the screen, set
the title, hide lines). `--json` output is not rendered here and keeps the text as it is.
"""

from __future__ import annotations

import re
import shlex
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dslaunch.launch.lifecycle import DownReport
from dslaunch.launch.plan import LaunchPlan
from dslaunch.launch.ready import load_text
from dslaunch.launch.status import JobStatus
from dslaunch.wire.records import JobRecord
from dslaunch.wire.states import JobState, NodeStage, RankStage, ReplicaState, RouterState

# Every state dslaunch reports has a style here (a test checks that none is missing).
STAGE_STYLE: dict[str, str] = {
    NodeStage.WAITING: "dim",
    NodeStage.CONNECTING: "cyan",
    NodeStage.CHECKED: "cyan",
    NodeStage.STARTED: "blue",
    RankStage.PENDING: "dim",
    RankStage.STARTING: "blue",
    RankStage.BACKOFF: "magenta",
    RankStage.RENDEZVOUS: "yellow",
    RankStage.LOADING: "yellow",
    RankStage.READY: "green",
    RankStage.LOST_PEER: "bold yellow",
    RankStage.STOPPING: "magenta",
    RankStage.STOPPED: "dim",
    RankStage.FAILED: "bold red",
    RankStage.EXITED: "red",
}
STATE_STYLE: dict[str, str] = {
    JobState.READY: "bold green",
    JobState.STARTING: "bold yellow",
    JobState.DEGRADED: "bold red",
    JobState.FAILED: "bold red",
    JobState.GONE: "bold magenta",
    JobState.STOPPING: "bold magenta",
    JobState.SUBMITTED: "bold yellow",
}
RANK_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")

# Secrets never reach the terminal, even in a dry run.
_SECRET_HINTS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


# Whole escape sequences first (CSI, OSC/DCS/PM/APC strings, two-byte ESC x), 7- and 8-bit forms,
# then any control character left: C0 but tab and newline, DEL, and C1.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]P^_X]|[\x9d\x90\x9e\x9f\x98])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?"
)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(text: str) -> str:
    """`text` without escape sequences or control characters (newline and tab are kept)."""
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def _t(text: object, style: str = "") -> Text:
    """A table cell from untrusted text: never markup, never a control character."""
    return Text(plain(str(text)), style=style)


def _stage(s: str) -> Text:
    return _t(s, STAGE_STYLE.get(s, ""))


def plan_view(plan: LaunchPlan, facts_note: str = "", launcher: list[tuple[str, str]] | None = None) -> Group:
    """The dry-run output: job summary, nodes with their agent command, and every rank."""
    head = Table.grid(padding=(0, 2))
    head.add_row("job", f"{plan.name} ({plan.job_id})")
    for label, value in launcher or [("launcher", plan.launcher)]:
        head.add_row(label, Text(value))
    head.add_row("world size", str(plan.world_size))
    head.add_row("init method", Text(f"{plan.init_method}  {plan.init_url}"))
    head.add_row("backend", plan.backend)
    head.add_row("master", Text(f"{plan.master_addr}:{plan.master_port} (rendezvous port {plan.rdzv_port})"))
    if facts_note:
        head.add_row("note", facts_note)
    nodes = Table(title="nodes", title_justify="left")
    for col in ("node", "host", "ranks", "agent command", "environment"):
        nodes.add_column(col, overflow="fold")
    for n in plan.nodes:
        env = {k: ("***" if any(h in k.upper() for h in _SECRET_HINTS) else v) for k, v in sorted(n.env.items())}
        nodes.add_row(
            str(n.node_rank) + (f" (r{n.replica})" if len(plan.replicas) > 1 else ""),
            n.host,
            f"{n.rank_offset}..{n.rank_offset + n.nprocs - 1}",
            Text(shlex.join(n.argv)),
            Text("\n".join(f"{k}={v}" for k, v in env.items())),
        )
    ranks = Table(title="ranks", title_justify="left")
    for col in ("RANK", "LOCAL_RANK", "node", "host", "device", "replica"):
        ranks.add_column(col)
    for r in plan.ranks:
        ranks.add_row(str(r.rank), str(r.local_rank), str(r.node_rank), r.host, r.device, str(r.replica))
    reps = Table(title=f"replicas: {len(plan.replicas)} of {plan.tp} rank(s) (--tp)", title_justify="left")
    for col in ("replica", "ranks", "nodes", "rendezvous", "init"):
        reps.add_column(col, overflow="fold")
    for rp in plan.replicas:
        hosts = ", ".join(dict.fromkeys(plan.nodes[u].host for u in rp.units))
        reps.add_row(
            str(rp.replica), f"{rp.first_rank}..{rp.first_rank + rp.size - 1}", hosts,
            Text(f"{rp.master_addr}:{rp.rdzv_port}"), Text(rp.init_url),
        )  # fmt: skip
    parts: list[Any] = [head, nodes, ranks, reps]
    for rp in plan.routers:
        label = f"router {rp.index} " if len(plan.routers) > 1 else "router "
        parts.append(Text.assemble(
            (label, "bold"),
            Text(f"on {rp.host}: public front port {rp.front_port}, replica link "
                 f"{rp.link_addr}:{rp.link_port}, {rp.node_dir}; {shlex.join(rp.argv)}"),
        ))  # fmt: skip
    return Group(*parts)


class UpView:
    """Live per-node progress for `up`: connecting → started → rendezvous → ready."""

    def __init__(self, console: Console, hosts: list[str], slots: list[int]) -> None:
        self.console = console
        self.hosts = hosts
        self.slots = slots
        self.rows: list[tuple[str, str]] = [(NodeStage.WAITING, "") for _ in hosts]
        self.t0 = time.monotonic()
        self.live = Live(self._table(), console=console, refresh_per_second=8, transient=False)

    def _table(self) -> Table:
        t = Table(title=f"dslaunch up  {time.monotonic() - self.t0:5.1f}s", title_justify="left")
        for col in ("node", "host", "slots", "stage", "detail"):
            t.add_column(col, overflow="fold")
        for i, (h, (stage, detail)) in enumerate(zip(self.hosts, self.rows, strict=True)):
            t.add_row(str(i), _t(h), str(self.slots[i]), _stage(stage), _t(detail))
        return t

    def update(self, i: int, stage: str, detail: str) -> None:
        self.rows[i] = (stage, detail)
        self.live.update(self._table())

    def __enter__(self) -> UpView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.update(self._table())
        self.live.__exit__(*exc)
        if not self.console.is_terminal:
            self.console.line()  # a non-terminal Live leaves the last line open


QUERY_HINT = {"generate": 'query "Hello"', "embed": 'query --embed "Hello"', "custom": "query --infer '{...}'"}


def http_base(address: str) -> str:
    """The OpenAI-compatible base URL of a front listening on `address` (host:port)."""
    host, _, port = address.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "localhost", "") else f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/v1"


def router_urls(rec: JobRecord) -> list[tuple[str, str, bool]]:
    """Per router: (its host, its public address, whether it listens on a remote machine's loopback)."""
    front = rec.front
    if front is None:
        return []
    routers = rec.routers or rec.nodes[:1]
    out = []
    for n, port in zip(routers, front.router_ports, strict=False):
        remote = front.loopback and n.host not in ("localhost", "127.0.0.1")
        host = (n.address or n.host) if front.bind in ("0.0.0.0", "::") else front.bind
        out.append((n.host, f"{host}:{port}", remote))
    return out


def http_hint(rec: JobRecord) -> str:
    """An OPENAI_BASE_URL per router and a curl line to paste; tunnelled when a router is on a
    remote loopback (`dslaunch tunnel` fails over between routers by itself)."""
    front = rec.front
    if front is None or front.task != "generate":
        return ""
    n = "" if rec.name == "default" else f" --name {rec.name}"
    routers = router_urls(rec)
    many = len(routers) > 1
    lines: list[str] = []
    bases: list[str] = []
    for k, (host, address, remote) in enumerate(routers):
        if remote:
            lines.append(f"dslaunch tunnel{n}{f' --router {k}' if many else ''} --local-port {8000 + k} &   "
                         f"# {host}'s loopback, forwarded over SSH")  # fmt: skip
            bases.append(f"http://127.0.0.1:{8000 + k}/v1")
        else:
            bases.append(http_base(address))
    key = "  OPENAI_API_KEY=$DSLAUNCH_TOKEN" if front.token else ""
    for k, base in enumerate(bases):
        lines.append(f"export OPENAI_BASE_URL={base}{key}" + (f"   # router {k} on {routers[k][0]}" if many else ""))
    auth = ' -H "Authorization: Bearer $DSLAUNCH_TOKEN"' if front.token else ""
    lines.append(f"curl {bases[0]}/completions{auth} -H 'Content-Type: application/json' "
                 """-d '{"prompt": "Hello", "max_tokens": 16}'""")  # fmt: skip
    if many:
        lines.append("(either router serves every replica; a client may use both: see README 'Routers')")
    return "\n".join(lines) + "\n"


def _machines(rec: JobRecord) -> int:
    return len({(n.host, n.target) for n in rec.nodes})


def up_summary(rec: JobRecord, seconds: float) -> Text:
    front = rec.front
    n = "" if rec.name == "default" else f" --name {rec.name}"
    fronts = ", ".join(a for _h, a, _r in router_urls(rec))
    where = f"front {fronts} ({front.task}, {front.model})\n" + http_hint(rec) if front else ""
    return Text.assemble(
        ("ready", "bold green"),
        f": job {rec.name!r} — {rec.world_size} ranks on {_machines(rec)} node(s)"
        + (f" in {rec.replicas} replicas of {rec.tp}" if rec.replicas > 1 else "")
        + ", "
        f"init {rec.init_method}, backend {rec.backend}, master {rec.master_addr}:{rec.master_port} "
        f"({seconds:.1f}s)\n",
        where,
        ("next: ", "dim"),
        f"dslaunch {QUERY_HINT.get(front.task if front else '', 'status')}{n}  ·  dslaunch status{n}  ·  "
        f"dslaunch logs{n}  ·  dslaunch down{n}",
    )


def _age(created: float) -> str:
    s = max(0, int(time.time() - created))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def pending_text(p: dict[str, Any]) -> str:
    """A job whose Slurm allocation has not started: what Slurm says, and who waits for it."""
    why = f": {p['reason']}" if p.get("reason") else ""
    who = (f"'up' (pid {p['up_pid']}) is waiting for it; Ctrl-C there or 'dslaunch down' cancels it"
           if p.get("up_alive") else "the 'up' that submitted it is gone; 'dslaunch down' cancels it")  # fmt: skip
    return f"job {p['name']}: submitted, Slurm job {p['slurm_job']} {p['slurm_state']}{why}; {who}"


def status_view(st: JobStatus) -> Group:
    head = Text.assemble(
        (f"job {st.name}", "bold"), "  ", (st.state, STATE_STYLE.get(st.state, "")),
        f"  {plain(st.reason)}\n",
        f"world size {st.world_size} · init {st.init_method} · backend {st.backend} · "
        f"master {st.master} · run {st.run_id} · up {_age(st.created)}",
        *[f"\n{label} {value}" for label, value in st.launcher],
    )  # fmt: skip
    nodes = Table(title="nodes", title_justify="left")
    for col in ("#", "host", "runs", "reachable", "agent", "pid", "processes", "note"):
        nodes.add_column(col, overflow="fold")
    for n in st.nodes:
        runs = (
            (f"router {n.router}" if len(st.routers) > 1 else "router")
            if n.kind == "router"
            else f"replica {n.replica}"
        )
        agent = (
            Text("alive", "green") if n.agent_alive
            else Text("unreachable" if not n.reachable else
                      f"exited {n.exit_code}" if n.exit_code is not None else "not running", "red")
        )  # fmt: skip
        nodes.add_row(
            str(n.node_rank), _t(n.host), runs, "yes" if n.reachable else Text("no", "red"), agent,
            str(n.agent_pid or "-"), str(n.procs) if n.reachable else "?", _t(n.error or ""),
        )  # fmt: skip
    ranks = Table(title="ranks", title_justify="left")
    for col in ("rank", "host", "local", "pid", "stage", "restarts", "device", "memory", "error"):
        ranks.add_column(col, overflow="fold")
    for r in st.ranks:
        mem = f"{r.rss_mb:.0f} MiB" if r.rss_mb is not None else "-"
        if r.gpu_mem_mb is not None:
            mem += f" / gpu {r.gpu_mem_mb:.0f} MiB"
        if r.kv:
            mem += f" / kv {r.kv.get('mib', 0):.0f} MiB, {r.kv.get('tokens')} tokens"
        ranks.add_row(
            str(r.rank), _t(r.host), str(r.local_rank), str(r.pid or "-"),
            _stage(r.stage) + (f" {load_text([r.load])}" if r.load else ""),
            str(r.restarts), _t(r.device or "-"), mem, _t(r.error or ""),  # not markup: '[/path]' is common
        )  # fmt: skip
    parts: list[Any] = [head, nodes, ranks, replicas_table(st)]
    if st.last_failure:
        parts.append(failure_line(st.last_failure))
    if st.front:
        parts.append(front_line(st.front))
    if len(st.routers) > 1:
        parts.append(routers_table(st))
    for n in st.nodes:
        if n.log_tail:
            parts.append(_t(f"last lines of the agent log on {n.host}:", style="bold"))
            parts.append(_t("\n".join(f"  {ln}" for ln in n.log_tail), style="dim"))
    return Group(*parts)


def replicas_table(st: JobStatus) -> Table:
    """Per replica: its ranks and nodes, whether it serves, restarts, and the router's counts."""
    t = Table(title=f"replicas ({st.tp} ranks each)", title_justify="left")
    for col in ("replica", "ranks", "nodes", "state", "restarts", "router", "in flight", "served", "note"):
        t.add_column(col, overflow="fold")
    for r in st.replicas:
        span = f"{r.ranks[0]}..{r.ranks[-1]}" if r.ranks else "-"
        style = "green" if r.state == ReplicaState.READY else "yellow"
        t.add_row(
            str(r.replica), span, _t(", ".join(r.hosts)), Text(r.state, style), str(r.restarts), r.linked or "-",
            str(r.in_flight), str(r.served), _t(r.reason),
        )  # fmt: skip
    return t


def routers_table(st: JobStatus) -> Table:
    """Every router: its node, public address and state; clients fail over between them."""
    t = Table(title="routers (each serves every replica)", title_justify="left")
    for col in ("router", "host", "address", "state", "served", "errors", "queue"):
        t.add_column(col, overflow="fold")
    for r in st.routers:
        style = (
            "green" if r["state"] == RouterState.READY else "red" if r["state"] != RouterState.STARTING else "yellow"
        )
        t.add_row(
            str(r["router"]), _t(r["host"]), _t(r["address"]), Text(str(r["state"]), style),
            *(str(r.get(k, "-") if r.get(k) is not None else "-") for k in ("served", "errors", "queue")),
        )  # fmt: skip
    return t


def failure_line(f: dict[str, Any]) -> Text:
    """The last worker failure (why the job last restarted, or ended), kept across restarts."""
    words = f": {f['last_line']}" if f.get("last_line") else ""
    return Text.assemble(
        ("last failure ", "bold"),
        plain(f"rank {f['rank']} on {f['host']} (pid {f.get('pid')}) {f['cause']} at {f['when']}{words}"),
    )


def front_line(f: dict[str, Any]) -> Text:
    """One line on the front: where, whether it answers, and how busy and fast it is."""
    ready = Text("ready", "green") if f.get("ready") else Text("not serving", "yellow")
    ms = lambda v: "-" if v is None else f"{v:g} ms"  # noqa: E731
    return Text.assemble(
        ("front ", "bold"), plain(f"{f['address']} "), ready,
        plain(f"  {f.get('task')} · {f.get('model')}") + (" · token required" if f.get("auth") else ""),
        plain(f"\n      HTTP (OpenAI-compatible) {http_base(f['address'])}"),
        f"\n      served {f.get('served', 0)} · errors {f.get('errors', 0)} · queue {f.get('queue', 0)}"
        f" · p50 {ms(f.get('p50_ms'))} · p99 {ms(f.get('p99_ms'))} · {f.get('tokens_per_s') or 0:g} tokens/s",
    )  # fmt: skip


def down_text(rep: DownReport) -> Text:
    if rep.ended:
        return Text.assemble(("stopped", "bold green"), f": job {rep.name!r} — {rep.ended}; its record is removed")
    if rep.clean:
        return Text.assemble(
            ("stopped", "bold green"),
            f": job {rep.name!r} — {rep.found} process(es) on {rep.nodes} node(s) ended "
            f"({rep.killed} needed SIGKILL); verified: none left",
        )
    lines = [f"job {rep.name!r} is not fully stopped:"]
    lines += [f"  {u}" for u in rep.unreachable]
    lines += [f"  {h}: processes still running: {' '.join(map(str, p))}" for h, p in rep.survivors.items()]
    lines += [f"  still running: {x}" for x in rep.leftovers]
    lines.append(f"the record is kept; run 'dslaunch down --name {rep.name}' again once the node answers")
    return _t("\n".join(lines), style="red")


def log_line(rank: int, text: str) -> Text:
    """One log line as the rank wrote it, minus anything a terminal would act on."""
    if rank < 0:
        return _t(text, style="red")
    colour = RANK_COLOURS[rank % len(RANK_COLOURS)]
    return Text.assemble((f"[rank {rank}] ", colour), plain(text))


def answer_text(a: dict[str, Any]) -> Text:
    """A front answer for people: the text (one block per prompt), or a short view of vectors."""
    if "embedding" in a or "embeddings" in a:
        vecs = [a["embedding"]] if "embedding" in a else a["embeddings"]
        lines = [f"[{i}] dim {len(v)}: [" + ", ".join(f"{x:.4f}" for x in v[:6]) + ", …]" for i, v in enumerate(vecs)]
        return Text("\n".join(lines))
    if "results" in a:
        return _t("\n".join(f"[{i}] {r['text']}" for i, r in enumerate(a["results"])))
    return _t(a.get("text", ""))
