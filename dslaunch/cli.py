"""The `dslaunch` command line: parse flags, build a spec, call the core, render. No logic here."""

from __future__ import annotations

import os
import sys
import time

import click
from rich.console import Console

from dslaunch import __version__, launch, render, state
from dslaunch import status as jobstatus
from dslaunch.errors import UserError
from dslaunch.hostfile import Node, load_hostfile, select_nodes
from dslaunch.spec import INIT_METHODS, JobSpec, collect_env


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


def _name_option(f):  # type: ignore[no-untyped-def]
    return click.option("--name", "-n", default="default", show_default=True, help="Job name.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@_name_option
def up(hostfile: str | None, include: str | None, exclude: str | None, num_nodes: int | None,
       num_gpus: int | None, init_method: str, rdzv_dir: str | None, master_addr: str | None,
       master_port: int | None, rdzv_port: int | None, max_restarts: int, backend: str, python: str,
       work_dir: str, env_pairs: tuple[str, ...], env_file: tuple[str, ...], timeout: float,
       connect_timeout: float, command_timeout: float, pg_timeout: float, accept_new_host_keys: bool,
       parallelism: int, keep_logs: bool, dry_run: bool, name: str) -> None:  # fmt: skip
    """Start a job on every node of the hostfile and wait until every rank is ready."""
    nodes = load_hostfile(hostfile) if hostfile else [Node("localhost", 1)]
    nodes = select_nodes(nodes, include, exclude, num_nodes, num_gpus)
    spec = JobSpec(
        nodes=nodes, name=name, init_method=init_method, rdzv_dir=rdzv_dir, master_addr=master_addr,
        master_port=master_port, rdzv_port=rdzv_port, max_restarts=max_restarts, python=python,
        work_dir=work_dir, backend=backend, env=collect_env(os.environ, env_pairs, env_file),
        ready_timeout=timeout, connect_timeout=connect_timeout, command_timeout=command_timeout,
        pg_timeout=pg_timeout, accept_new_host_keys=accept_new_host_keys, parallelism=parallelism,
        keep_logs=keep_logs,
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


@main.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False))
def make_tiny_model(directory: str) -> None:
    """Write a tiny random causal LM with its tokenizer to DIRECTORY (no download needed).

    \b
    Example:
      dslaunch make-tiny-model /tmp/tiny && ls /tmp/tiny
    """
    from dslaunch import tinymodel

    console.print(f"wrote {tinymodel.build(directory)}")


if __name__ == "__main__":
    main()
