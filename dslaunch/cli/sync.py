"""`dslaunch sync` and `up --sync-model`'s copy step: the model to every node, with its progress
(rich bars per node and in total on a terminal, plain lines otherwise)."""

from __future__ import annotations

import os
import sys
import threading
import time

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from dslaunch.cli.app import err_console, main
from dslaunch.launch.hostfile import choose_nodes
from dslaunch.launch.modelsync import NodeSync, mb, sync_model
from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.launchers import get_launcher
from dslaunch.transport.nodes import Cluster
from dslaunch.wire.hosts import Node

PLAIN_EVERY_S = 5.0  # a plain progress line per node at most this often


class SyncView:
    """SyncEvents for a person: bars on a terminal, else a line per node now and then."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bars = console.is_terminal
        self._lock = threading.Lock()
        self._totals: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._said: dict[str, float] = {}
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self._tasks: dict[str, TaskID] = {}
        self._all: TaskID | None = None

    def __enter__(self) -> SyncView:
        if self.bars:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bars:
            self._progress.stop()

    def planned(self, host: str, total: int, files: int) -> None:
        with self._lock:
            self._totals[host] = self._totals.get(host, 0) + total
            self._done.setdefault(host, 0)
            if not self.bars:
                what = f"{files} file(s), {mb(total)} to send" if files else "identical, nothing to send"
                self.console.print(f"{host}: {what}", markup=False)
                return
            if host not in self._tasks:
                self._tasks[host] = self._progress.add_task(host, total=total)
            else:
                self._progress.update(self._tasks[host], total=self._totals[host])
            if self._all is None:
                self._all = self._progress.add_task("total", total=0)
            self._progress.update(self._all, total=sum(self._totals.values()))

    def sent(self, host: str, n: int) -> None:
        with self._lock:
            self._done[host] += n
            if self.bars:
                self._progress.advance(self._tasks[host], n)
                if self._all is not None:
                    self._progress.advance(self._all, n)
                return
            now = time.monotonic()
            if self._done[host] >= self._totals[host] or now - self._said.get(host, 0.0) >= PLAIN_EVERY_S:
                self._said[host] = now
                self.console.print(f"{host}: {mb(self._done[host])} of {mb(self._totals[host])} sent", markup=False)


def summary(results: list[NodeSync], launcher: str) -> list[str]:
    """One line per node, and the shared-filesystem note when no node needed a copy."""
    lines = []
    for r in results:
        if r.identical:
            lines.append(f"{r.host}: identical, nothing sent")
        else:
            resumed = f", {mb(r.resumed)} continued from an interrupted copy" if r.resumed else ""
            lines.append(f"{r.host}: {len(r.files)} file(s) copied, {mb(r.bytes_sent)} sent{resumed}")
    if results and all(r.identical for r in results):
        shared = " (a shared filesystem)" if launcher == "slurm" else ""
        lines.append(f"every node already holds this model{shared}: no copy needed")
    return lines


def run_sync(nodes: list[Node], model: str, launcher: str, python: str, opts: ConnectOptions) -> None:
    """Copy `model` to every node and say what happened (raises one line per failed node)."""
    with Cluster(nodes, opts, python, launcher=get_launcher(launcher)) as cluster, SyncView(err_console) as view:
        results = sync_model(cluster, model, view)
    for line in summary(results, launcher):
        err_console.print(line, markup=False)


@main.command()
@click.option("--hostfile", "-H", type=click.Path(dir_okay=False), required=True, help="DeepSpeed-style hostfile.")
@click.option("--model", "-m", required=True, help="The model directory here, to copy to the same path on every node.")
@click.option("--include", "-i", default=None, help="Only these hosts, e.g. 'node1@node2'.")
@click.option("--exclude", "-e", default=None, help="Leave out these hosts.")
@click.option("--launcher", default="ssh", show_default=True, help="How the nodes are reached (ssh, slurm).")
@click.option("--python", default=sys.executable, show_default=True, help="Python interpreter on the nodes.")
@click.option("--connect-timeout", type=float, default=10.0, show_default=True, help="SSH connect time-out.")
@click.option("--command-timeout", type=float, default=600.0, show_default=True,
              help="Time-out of each node command (hashing a large model takes a while the first time).")  # fmt: skip
@click.option("--accept-new-host-keys", is_flag=True, help="Record unknown SSH host keys (like OpenSSH accept-new).")
def sync(hostfile: str, model: str, include: str | None, exclude: str | None, launcher: str, python: str,
         connect_timeout: float, command_timeout: float, accept_new_host_keys: bool) -> None:  # fmt: skip
    """Make the model directory exist identically on every node: only files whose hash differs
    are sent, over SSH, to all nodes in parallel; an interrupted copy continues where it stopped.

    \b
    Examples:
      dslaunch sync -H hosts --model /data/llama-70b
    """
    nodes, _notes = choose_nodes(hostfile, include, exclude, None, None, os.environ.get("CUDA_VISIBLE_DEVICES"))
    run_sync(nodes, model, launcher, python, ConnectOptions(connect_timeout, command_timeout, accept_new_host_keys))
