"""The `dslaunch` command line: parse flags, build a spec, call the core, render. No logic here."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
from rich.console import Console

from dslaunch import __version__
from dslaunch.cli import render
from dslaunch.errors import DslaunchError, UserError
from dslaunch.launch import lifecycle as launch
from dslaunch.launch import status as jobstatus
from dslaunch.launch import store as state
from dslaunch.launch.hostfile import Node, load_hostfile, select_nodes
from dslaunch.launch.spec import INIT_METHODS, JobSpec, collect_env
from dslaunch.wire.serve import DTYPES, TASKS, ServeSpec


def _console(stderr: bool = False) -> Console:
    """Rich console; when piped (logs, CI) use a wide fixed width instead of wrapping at 80."""
    c = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c.width = 160
    return c


console = _console()
err_console = _console(stderr=True)

UP_EXAMPLES = """
\b
Examples:
  dslaunch up                                       # localhost, 1 rank, no sshd needed
  dslaunch up --hostfile hostfiles/localhost        # localhost, 2 ranks
  dslaunch up -H hosts --init-method tcp            # every node of the hostfile
  dslaunch up -H hosts --init-method file --rdzv-dir /nfs/rdzv
  dslaunch up -H hosts --include 'node1:0,1@node2' --name small
  dslaunch up -H hosts --dry-run                    # print the plan, touch nothing
"""


SERVE_OPTIONS = [
    click.option("--model", "-m", default=None,
                 help="Model directory on every node (or a hub name). Default: a tiny model built locally."),
    click.option("--task", type=click.Choice(TASKS), default="generate", show_default=True,
                 help="generate: causal LM, prompts to text. embed: encoder, texts to vectors."),
    click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
                 help="auto: fp32 on CPU, the model's own half precision on GPU."),
    click.option("--kernel-inject", is_flag=True, help="DeepSpeed's fused GPU kernels instead of AutoTP."),
    click.option("--handler", default=None, metavar="MODULE:CLASS",
                 help="Your own model code: load(ctx) and __call__(batch); importable on every node."),
    click.option("--shm-allreduce", is_flag=True,
                 help="DeepSpeed's shared-memory CPU all-reduce (one node only; built on first use)."),
    click.option("--bind", default="127.0.0.1", show_default=True,
                 help="Front address on node 0; anything but loopback requires a token."),
    click.option("--port", type=int, default=None, help="Front port. Default: 7070 or the next free one."),
    click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                 help="File holding the front's token (or set DSLAUNCH_TOKEN). Generated off loopback."),
    click.option("--max-batch-size", type=int, default=8, show_default=True,
                 help="Most rows (prompts) in one forward batch."),
    click.option("--max-batch-tokens", type=int, default=16384, show_default=True,
                 help="Most KV cache tokens in flight (prompt + max_new_tokens of every running row); "
                      "requests beyond it wait in the queue."),
    click.option("--batch-wait-ms", type=float, default=5.0, show_default=True,
                 help="How long the first request of a batch waits for company."),
    click.option("--max-queue", type=int, default=256, show_default=True,
                 help="Queued requests beyond which new ones get 'overloaded'."),
    click.option("--max-request-bytes", type=int, default=1 << 20, show_default=True,
                 help="Longest request line accepted."),
    click.option("--request-timeout", type=float, default=300.0, show_default=True,
                 help="Default per-request time-out (a request may ask for less or more)."),
    click.option("--idle-timeout", type=float, default=300.0, show_default=True,
                 help="Seconds a client connection may stay silent with nothing in flight."),
    click.option("--max-new-tokens", type=int, default=1024, show_default=True,
                 help="Most tokens one prompt may ask for."),
    click.option("--heartbeat", "heartbeat_s", type=float, default=5.0, show_default=True,
                 help="Seconds between rank 0's idle heartbeats to the other ranks."),
    click.option("--hang-timeout", type=float, default=120.0, show_default=True,
                 help="Seconds a serving rank may go without progress before the job restarts (0: never)."),
]  # fmt: skip


def _serve_options(f):  # type: ignore[no-untyped-def]
    for opt in reversed(SERVE_OPTIONS):
        f = opt(f)
    return f


def _read_token(token_file: str | None) -> str | None:
    """The front's token from --token-file or DSLAUNCH_TOKEN; never from a command-line value."""
    if token_file:
        try:
            return open(token_file, encoding="utf-8").read().strip() or None
        except OSError as e:
            raise UserError(f"--token-file {token_file}: cannot read ({e.strerror})") from None
    return os.environ.get("DSLAUNCH_TOKEN") or None


def _name_option(f):  # type: ignore[no-untyped-def]
    return click.option("--name", "-n", default="default", show_default=True, help="Job name.")(f)


class _Group(click.Group):
    """Turns dslaunch's own errors into click's one `Error:` line (exit 1), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DslaunchError as e:
            raise click.ClickException(e.message) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dslaunch")
def main() -> None:
    """Start, inspect and stop torch.distributed inference jobs on machines reachable over SSH."""


@main.command(epilog=UP_EXAMPLES)
@click.option(
    "--hostfile",
    "-H",
    type=click.Path(dir_okay=False),
    default=None,
    help="DeepSpeed-style hostfile ('host slots=N' per line). Default: localhost, 1 slot.",
)
@click.option("--include", "-i", default=None, help="Only these hosts/slots, e.g. 'node1:0,2@node2'.")
@click.option("--exclude", "-e", default=None, help="Leave out these hosts/slots (same syntax).")
@click.option("--num-nodes", type=int, default=None, help="Use only the first N nodes.")
@click.option("--num-gpus", type=int, default=None, help="Use only the first N slots of each node.")
@click.option(
    "--init-method",
    type=click.Choice(INIT_METHODS),
    default="tcp",
    show_default=True,
    help="How workers form their process group.",
)
@click.option("--rdzv-dir", default=None, help="Directory shared by every node (NFS), for --init-method file.")
@click.option(
    "--master-addr", default=None, help="Address the other nodes use to reach node 0. Default: the one SSH reached."
)
@click.option("--master-port", type=int, default=None, help="Process-group port on node 0. Default: a free one.")
@click.option("--rdzv-port", type=int, default=None, help="torchrun rendezvous port on node 0. Default: a free one.")
@click.option(
    "--max-restarts", type=int, default=3, show_default=True, help="Gang restarts before the job is declared failed."
)
@click.option(
    "--restart-backoff",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds before the 2nd restart, doubling for each later one (the 1st is immediate).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "nccl", "gloo"]),
    default="auto",
    show_default=True,
    help="auto: nccl when every node has a GPU per slot, else gloo.",
)
@click.option(
    "--python",
    default=sys.executable,
    show_default=True,
    help="Python interpreter on the nodes (with dslaunch and torch installed).",
)
@click.option(
    "--work-dir",
    default="~/.dslaunch/run",
    show_default=True,
    help="Where each node keeps the job's logs and status files.",
)
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VAL", help="Set on every node (repeatable).")
@click.option("--env-file", multiple=True, type=click.Path(dir_okay=False), help="KEY=VAL file (repeatable).")
@click.option(
    "--timeout", type=float, default=300, show_default=True, help="Seconds to wait for every rank to be ready."
)
@click.option("--connect-timeout", type=float, default=10, show_default=True, help="SSH connect time-out.")
@click.option(
    "--command-timeout", type=float, default=60, show_default=True, help="Time-out for each command run on a node."
)
@click.option(
    "--pg-timeout", type=float, default=1800, show_default=True, help="Collective time-out of the process group."
)
@click.option(
    "--accept-new-host-keys",
    is_flag=True,
    help="Record unknown SSH host keys (like OpenSSH accept-new); changed keys are refused.",
)
@click.option("--parallelism", type=int, default=32, show_default=True, help="Nodes contacted at once.")
@click.option("--keep-logs", is_flag=True, help="Keep the nodes' logs after 'down'.")
@click.option("--dry-run", is_flag=True, help="Print the launch plan and exit without touching a node.")
@_serve_options
@_name_option
def up(hostfile: str | None, include: str | None, exclude: str | None, num_nodes: int | None,
       num_gpus: int | None, init_method: str, rdzv_dir: str | None, master_addr: str | None,
       master_port: int | None, rdzv_port: int | None, max_restarts: int, restart_backoff: float, backend: str,
       python: str,
       work_dir: str, env_pairs: tuple[str, ...], env_file: tuple[str, ...], timeout: float,
       connect_timeout: float, command_timeout: float, pg_timeout: float, accept_new_host_keys: bool,
       parallelism: int, keep_logs: bool, dry_run: bool, name: str, token_file: str | None,
       **serve_opts: Any) -> None:  # fmt: skip
    """Start a job on every node of the hostfile, load the model on every rank and serve it.

    Rank 0 answers on a socket front (newline-delimited JSON; see 'dslaunch query').
    """
    serve = ServeSpec(**serve_opts, token=_read_token(token_file))
    nodes = load_hostfile(hostfile) if hostfile else [Node("localhost", 1)]
    nodes = select_nodes(nodes, include, exclude, num_nodes, num_gpus)
    spec = JobSpec(
        nodes=nodes, name=name, init_method=init_method, rdzv_dir=rdzv_dir, master_addr=master_addr,
        master_port=master_port, rdzv_port=rdzv_port, max_restarts=max_restarts, restart_backoff=restart_backoff,
        python=python,
        work_dir=work_dir, backend=backend, env=collect_env(os.environ, env_pairs, env_file),
        ready_timeout=timeout, connect_timeout=connect_timeout, command_timeout=command_timeout,
        pg_timeout=pg_timeout, accept_new_host_keys=accept_new_host_keys, parallelism=parallelism,
        keep_logs=keep_logs, serve=serve,
    )  # fmt: skip
    if dry_run:
        plan, note = launch.dry_plan(spec)
        console.print(render.plan_view(plan, note))
        return
    t0 = time.monotonic()
    view = render.UpView(console, [n.host for n in nodes], [n.nprocs for n in nodes])
    try:
        with view:
            rec = launch.up(spec, view.update)
    except launch.LaunchFailed as e:
        for line in e.details:
            err_console.print(line, markup=False, style="dim")
        raise
    except KeyboardInterrupt:
        err_console.print("interrupted: everything 'up' had started was removed from every node")
        sys.exit(130)
    console.print(render.up_summary(rec, time.monotonic() - t0))


@main.command()
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--watch", "-w", is_flag=True, help="Refresh every --interval seconds until Ctrl-C.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes.")
def status(name: str, as_json: bool, watch: bool, interval: float) -> None:
    """Show the job: its state, every node (agent alive?) and every rank (pid, stage, restarts).

    \b
    Examples:
      dslaunch status
      dslaunch status --name big --json
      dslaunch status --watch
    """
    rec = state.require(name)
    if as_json:
        import json

        click.echo(json.dumps(jobstatus.status(rec).to_json(), indent=1))
        return
    if not watch:
        console.print(render.status_view(jobstatus.status(rec)))
        return
    from rich.live import Live

    try:
        with Live(render.status_view(jobstatus.status(rec)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render.status_view(jobstatus.status(rec)), refresh=True)
    except KeyboardInterrupt:
        pass


@main.command()
@_name_option
@click.option("--grace", type=float, default=10.0, show_default=True, help="Seconds between SIGTERM and SIGKILL.")
def down(name: str, grace: float) -> None:
    """Stop every process the job started on every node, and verify that none is left.

    \b
    Examples:
      dslaunch down
      dslaunch down --name big --grace 30
    """
    rep = launch.down(name, grace)
    if rep is None:
        console.print(f"no job named {name!r}: nothing to stop")
        return
    if not rep.clean:
        err_console.print(render.down_text(rep))
        sys.exit(1)
    console.print(render.down_text(rep))


@main.command()
@_name_option
@click.option("--rank", "-r", "ranks", type=int, multiple=True, help="Only this rank (repeatable).")
@click.option("--lines", "-l", type=int, default=50, show_default=True, help="Lines per rank.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
def logs(name: str, ranks: tuple[int, ...], lines: int, follow: bool) -> None:
    """Print the ranks' logs from every node, each line prefixed with its rank.

    \b
    Examples:
      dslaunch logs
      dslaunch logs --rank 1 -f
    """
    rec = state.require(name)
    wanted = list(ranks) or None
    for r in wanted or []:
        if not 0 <= r < rec.world_size:
            raise UserError(f"--rank {r}: job {name!r} has ranks 0..{rec.world_size - 1}")
    if follow:
        try:
            for rank, text in jobstatus.follow_logs(rec, wanted):
                console.print(render.log_line(rank, text), markup=False)
        except KeyboardInterrupt:
            pass
        return
    out, errors = jobstatus.read_logs(rec, wanted, lines)
    for rank, text_lines in out.items():
        for text in text_lines:
            console.print(render.log_line(rank, text), markup=False)
    for e in errors:
        err_console.print(render.log_line(-1, e))
    if errors:
        sys.exit(1)


@main.command()
@click.argument("prompts", nargs=-1)
@_name_option
@click.option("--max-new-tokens", "-k", type=int, default=None, help="Tokens to generate (front default: 32).")
@click.option("--temperature", "-t", type=float, default=None, help="0 (default) is greedy; above 0 samples.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=None, help="Sample among the k likeliest tokens.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop before this string (repeatable).")
@click.option("--stream", "-s", is_flag=True, help="Print text as it is generated.")
@click.option("--embed", is_flag=True, help="Embed the texts instead (jobs started with --task embed).")
@click.option("--infer", "infer_json", default=None, metavar="JSON", help="Send this input to a --handler job.")
@click.option("--health", is_flag=True, help="Ask the front how the job is; with --deep, through every rank.")
@click.option("--deep", is_flag=True, help="With --health: a one-token forward on every rank.")
@click.option("--stats", "want_stats", is_flag=True, help="Requests served, queue, batch sizes, latency.")
@click.option("--json", "as_json", is_flag=True, help="Print the front's answer as JSON.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the answer.")
def query(prompts: tuple[str, ...], name: str, max_new_tokens: int | None, temperature: float | None,
          top_p: float | None, top_k: int | None, seed: int | None, stop: tuple[str, ...], stream: bool,
          embed: bool, infer_json: str | None, health: bool, deep: bool, want_stats: bool, as_json: bool,
          timeout: float) -> None:  # fmt: skip
    """Send prompts (or texts, or a health check) to the job's front and print the answer.

    The front is found from the job record; when it listens on node 0's loopback and node 0 is
    remote, the request goes through an SSH tunnel. A PROMPT of '-' reads standard input.

    \b
    Examples:
      dslaunch query "The quick brown fox"
      dslaunch query -k 64 --stream "Once upon a time"
      dslaunch query "a" "b" --json                   # two prompts in one request
      dslaunch query --embed "first text" "second text"
      dslaunch query --health --deep
    """
    from dslaunch import client as front_client

    texts = [sys.stdin.read() if p == "-" else p for p in prompts]
    params = {k: v for k, v in {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                                "top_k": top_k, "seed": seed}.items() if v is not None}  # fmt: skip
    if stop:
        params["stop"] = list(stop)
    asks = sum([bool(texts) and not infer_json, bool(infer_json), health, want_stats])
    if asks != 1:
        raise UserError("give prompts (or --embed texts), --infer JSON, --health or --stats: exactly one of them")
    rec = state.require(name)
    with front_client.for_job(rec, timeout=timeout) as c:
        try:
            answer = _ask(c, texts, params, stream, embed, infer_json, health, deep, want_stats, as_json)
        except front_client.FrontError as e:
            raise UserError(f"front {c.address}: {e.code}: {e.message}") from None
        except (ConnectionError, TimeoutError, OSError) as e:
            raise UserError(f"{e} (is the job serving? see 'dslaunch status --name {name}')") from None
        except KeyboardInterrupt:
            click.echo()
            sys.exit(130)  # the front notices the closed connection and stops generating for it
    if answer is not None:
        if as_json or health or want_stats or infer_json:
            click.echo(json.dumps(answer, indent=1, ensure_ascii=False))
        else:
            console.print(render.answer_text(answer), markup=False, highlight=False)


def _ask(c: Any, texts: list[str], params: dict[str, Any], stream: bool, embed: bool, infer_json: str | None,
         health: bool, deep: bool, want_stats: bool, as_json: bool) -> dict[str, Any] | None:  # fmt: skip
    """One request to the front; streamed text is printed here as it arrives."""
    if health:
        return c.health(deep=deep)
    if want_stats:
        return c.stats()
    if infer_json is not None:
        try:
            value = json.loads(infer_json)
        except ValueError as e:
            raise UserError(f"--infer: not valid JSON ({e})") from None
        return c.request("infer", input=value)
    one = texts[0] if len(texts) == 1 else texts
    if embed:
        return c.request("embed", input=one)
    if not stream:
        return c.generate(one, **params)
    if len(texts) != 1:
        raise UserError("--stream takes one prompt")
    final = None
    for event in c.stream(texts[0], **params):
        if "chunk" in event and not as_json:
            click.echo(event["chunk"], nl=False)
            sys.stdout.flush()
        elif "chunk" not in event:
            final = event
    if not as_json:
        click.echo()
        return None
    return final


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
def make_tiny_model(directory: str) -> None:
    """Write a tiny random causal LM with its tokenizer to DIRECTORY (no download needed).

    \b
    Example:
      dslaunch make-tiny-model /tmp/tiny && ls /tmp/tiny
    """
    from dslaunch.engine import tinymodel

    console.print(f"wrote {tinymodel.build(directory)}")


if __name__ == "__main__":
    main()
