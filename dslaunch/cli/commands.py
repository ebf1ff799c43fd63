"""`up`, `status`, `down`, `logs` and `make-tiny-model`: parse, call the launch host, render."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from dslaunch.cli import render
from dslaunch.cli.app import _read_token, console, err_console, main
from dslaunch.cli.options import GRACE_DEFAULT, SERVE_OPTIONS, UP_EXAMPLES, UP_OPTIONS, apply, name_option
from dslaunch.cli.sync import run_sync
from dslaunch.errors import UserError
from dslaunch.launch import lifecycle as launch
from dslaunch.launch import logs as joblogs
from dslaunch.launch import slurmsubmit
from dslaunch.launch import status as jobstatus
from dslaunch.launch import store as state
from dslaunch.launch.hostfile import choose_nodes
from dslaunch.launch.preflight import connect_options
from dslaunch.launch.slurmalloc import choose_launcher, choose_slurm_nodes, srun_selection
from dslaunch.launch.spec import JobSpec, collect_user_env
from dslaunch.transport.launchers import get_launcher
from dslaunch.wire.serve import ServeSpec


@main.command(epilog=UP_EXAMPLES)
@apply(UP_OPTIONS)
@apply(SERVE_OPTIONS)
@name_option
def up(hostfile: str | None, include: str | None, exclude: str | None, num_nodes: int | None,
       num_gpus: int | None, init_method: str, rdzv_dir: str | None, master_addr: str | None,
       master_port: int | None, rdzv_port: int | None, max_restarts: int, restart_backoff: float,
       restart_window: float, rank_start: str, backend: str, python: str,
       work_dir: str, no_launch_dir: bool, env_pairs: tuple[str, ...], env_file: tuple[str, ...], timeout: float,
       connect_timeout: float, command_timeout: float, pg_timeout: float, accept_new_host_keys: bool,
       parallelism: int, keep_logs: bool, dry_run: bool, name: str, token_file: str | None, tp: int | None,
       routers: int | None, launcher: str, partition: str | None, time_limit: str | None, account: str | None,
       sync_model: bool,
       **serve_opts: Any) -> None:  # fmt: skip
    """Start a job on every node of the hostfile, load the model on every rank and serve it.

    The job's routers (node 0, and a standby on node 1 when there are two nodes) each answer on one
    socket front (newline-delimited JSON and the OpenAI-compatible HTTP API) and spread requests
    over the replicas (--tp ranks each).
    """
    model_check = not serve_opts.pop("skip_model_check")
    serve = ServeSpec(**serve_opts, token=_read_token(token_file))
    submitted: dict[str, str] = {}
    if choose_launcher(launcher, hostfile, os.environ, None) == "slurm" and not hostfile:
        launcher, alloc = "slurm", dict(os.environ)
        if not alloc.get("SLURM_JOB_ID") and not dry_run:  # a login node: submit the allocation first
            try:
                alloc = slurmsubmit.allocate(name, num_nodes, num_gpus, partition, time_limit, account, _say)
            except KeyboardInterrupt:
                sys.exit(130)  # the job was cancelled, and said so
            submitted, num_nodes = {"job": alloc["SLURM_JOB_ID"], "submitted": "1"}, None
        nodes, notes = choose_slurm_nodes(alloc, include, exclude, num_nodes, num_gpus), []
    elif partition or time_limit or account:
        raise UserError("--partition, --time and --account are for a job 'up' submits to Slurm (--launcher slurm)")
    else:
        nodes, notes = choose_nodes(hostfile, include, exclude, num_nodes, num_gpus,
                                    os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
        launcher = choose_launcher(launcher, hostfile, os.environ, nodes)
    env = collect_user_env(os.environ, env_pairs, env_file)
    spec = JobSpec(
        nodes=nodes, name=name, init_method=init_method, rdzv_dir=rdzv_dir, master_addr=master_addr,
        master_port=master_port, rdzv_port=rdzv_port, max_restarts=max_restarts, restart_backoff=restart_backoff,
        restart_window=restart_window, rank_start=rank_start,
        python=python,
        work_dir=work_dir, backend=backend, env=env.values, env_sources=env.sources, expand_env=env.expand,
        launch_dir=None if no_launch_dir else os.getcwd(), model_check=model_check,
        ready_timeout=timeout, connect_timeout=connect_timeout, command_timeout=command_timeout,
        pg_timeout=pg_timeout, accept_new_host_keys=accept_new_host_keys, parallelism=parallelism,
        keep_logs=keep_logs, serve=serve, tp=tp, routers=routers, launcher=launcher, launcher_meta=submitted,
    )  # fmt: skip
    for line in notes:
        err_console.print(f"note: {line}", markup=False)
    if dry_run:
        plan, note = launch.dry_plan(spec)
        lines = get_launcher(spec.launcher).describe()
        if spec.launcher == "slurm":  # the same selection in srun's terms, as DeepSpeed's Slurm runner says it
            lines.append(("srun selection", " ".join(srun_selection(nodes, include, exclude, num_nodes, num_gpus))))
        console.print(render.plan_view(plan, note, lines))
        return
    t0 = time.monotonic()
    if sync_model:  # before pre-flight, which then finds every copy identical
        if not serve.model:
            raise UserError("--sync-model copies --model to the nodes: give --model DIR")
        run_sync(spec.nodes, serve.model, spec.launcher, spec.python, connect_options(spec))
    units = [u for r in spec.replicas for u in r.units]
    tag = (lambda u: f" (replica {u.replica})") if len(spec.replicas) > 1 else (lambda u: "")
    view = render.UpView(
        console,
        [nodes[u.node].host + tag(u) for u in units]
        + [f"{nodes[k].host} (router{f' {k}' if spec.router_count > 1 else ''})" for k in range(spec.router_count)],
        [u.nprocs for u in units] + [0] * spec.router_count,
    )  # fmt: skip
    try:
        with view:
            rec = launch.up(
                spec, view.update, warn=lambda line: err_console.print(f"warning: {render.plain(line)}", markup=False),
                note=lambda line: err_console.print(f"note: {render.plain(line)}", markup=False),
            )  # fmt: skip
    except BaseException as e:
        if submitted:  # the job 'up' submitted goes with everything else it started
            slurmsubmit.abandon(name, submitted["job"], _say)
        if isinstance(e, launch.LaunchFailed):
            for line in e.details:
                err_console.print(render.plain(line), markup=False, style="dim")
        if isinstance(e, KeyboardInterrupt):
            err_console.print("interrupted: everything 'up' had started was removed from every node")
            sys.exit(130)
        raise
    if submitted:
        slurmsubmit.settled(name)
    console.print(render.up_summary(rec, time.monotonic() - t0))


def _say(line: str) -> None:
    err_console.print(line, markup=False)


@main.command()
@name_option
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
    held = slurmsubmit.pending(name) if state.load(name) is None else None
    if held:  # no record yet: Slurm has not run what 'up' submitted
        click.echo(json.dumps(held, indent=1) if as_json else render.pending_text(held))
        return
    rec = state.require(name)
    if as_json:
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
@name_option
@click.option(
    "--grace", type=float, default=GRACE_DEFAULT, show_default=True, help="Seconds between SIGTERM and SIGKILL."
)
def down(name: str, grace: float) -> None:
    """Stop every process the job started on every node, and verify that none is left.

    \b
    Examples:
      dslaunch down
      dslaunch down --name big --grace 30
    """
    rep = launch.down(name, grace)
    if rep is None:
        held = slurmsubmit.cancel_pending(name)
        if held:
            console.print(f"cancelled Slurm job {held['slurm_job']} ({held['slurm_state']}), which 'up' had "
                          f"submitted for job {name!r}", markup=False)  # fmt: skip
        else:
            console.print(f"no job named {name!r}: nothing to stop")
        return
    if not rep.clean:
        err_console.print(render.down_text(rep))
        sys.exit(1)
    console.print(render.down_text(rep))


@main.command()
@name_option
@click.option("--replica", "replicas", type=int, multiple=True, help="Only this replica (repeatable). Default: all.")
@click.option(
    "--drain-timeout", type=float, default=300.0, show_default=True,
    help="Seconds a replica may take to finish its work before its restart.",
)  # fmt: skip
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds for a replica to be ready.")
def restart(name: str, replicas: tuple[int, ...], drain_timeout: float, timeout: float) -> None:
    """Restart the job's replicas one at a time (a new model on disk, a leak), without failing requests.

    Each replica stops getting new work, finishes what it has, restarts and links to the router
    again before the next one starts. With one replica, requests wait in the router's queue.

    \b
    Examples:
      dslaunch restart
      dslaunch restart --name big --replica 1
    """
    from dslaunch.launch import restart as rolling

    rep = rolling.restart(
        name, list(replicas) or None, drain_timeout, timeout, say=lambda line: err_console.print(line, markup=False)
    )
    done = ", ".join(f"{r} ({rep.seconds[r]:g}s)" for r in rep.replicas)
    console.print(f"restarted job {name!r}: replica {done}")


@main.command()
@name_option
@click.option("--rank", "-r", "ranks", type=int, multiple=True, help="Only this rank (repeatable).")
@click.option("--lines", "-l", type=int, default=50, show_default=True, help="Lines per rank.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--router", "router", is_flag=True, help="The router's log instead (links, replicas up and down).")
def logs(name: str, ranks: tuple[int, ...], lines: int, follow: bool, router: bool) -> None:
    """Print the ranks' logs from every node, each line prefixed with its rank.

    \b
    Examples:
      dslaunch logs
      dslaunch logs --rank 1 -f
      dslaunch logs --router
    """
    rec = state.require(name)
    if router:
        for text in joblogs.router_log(rec, lines):
            console.print(render.plain(f"[router] {text}"), markup=False)
        return
    wanted = list(ranks) or None
    for r in wanted or []:
        if not 0 <= r < rec.world_size:
            raise UserError(f"--rank {r}: job {name!r} has ranks 0..{rec.world_size - 1}")
    if follow:
        try:
            for rank, text in joblogs.follow_logs(rec, wanted):
                console.print(render.log_line(rank, text), markup=False)
        except KeyboardInterrupt:
            pass
        return
    out, errors = joblogs.read_logs(rec, wanted, lines)
    for rank, text_lines in out.items():
        for text in text_lines:
            console.print(render.log_line(rank, text), markup=False)
    for e in errors:
        err_console.print(render.log_line(-1, e))
    if errors:
        sys.exit(1)


@main.command()
@name_option
@click.option(
    "--local-port", type=int, default=8000, show_default=True, help="Port on 127.0.0.1 to listen on (0: any)."
)
@click.option("--router", type=int, default=None, help="Forward to this router only (0, 1, ...). Default: fail over.")
def tunnel(name: str, local_port: int, router: int | None) -> None:
    """Keep a local port forwarded to the job's routers (over SSH when they listen on a node's
    loopback); each new connection goes to the first router that answers.

    \b
    Examples:
      dslaunch tunnel --local-port 8000 &
      OPENAI_BASE_URL=http://127.0.0.1:8000/v1 python my_openai_script.py
      dslaunch tunnel --router 1 --local-port 8001 &      # the standby router alone
    """
    from dslaunch import client as front_client

    rec = state.require(name)
    which = "front" if router is None else f"router {router}"

    def ready(port: int) -> None:
        console.print(f"forwarding 127.0.0.1:{port} to job {name!r}'s {which}; "
                      f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1 (Ctrl-C to stop)")  # fmt: skip
        sys.stdout.flush()

    try:
        front_client.forward(rec, local_port, ready, router)
    except OSError as e:
        raise UserError(f"--local-port {local_port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        pass


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
