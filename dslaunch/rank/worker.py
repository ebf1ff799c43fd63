"""The per-rank entry point the torchrun agent starts: `python -m dslaunch.rank.worker`.

Phases, each written to the rank's status file so `dslaunch status` can show it:
  prepare    the rank's log file, parent-death signal, threads and status file (no torch yet)
  attempt    the job-wide attempt number, and the back-off before a repeated restart
  rendezvous the process group with the chosen init method, proven by an all-reduce
  serve      engine, front and lock-step loop, until stopped (rank/session.py)
How a rank ends each attempt, and what its gang does then, is the rule in wire/restarts.py.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from dslaunch.rank.group import GroupConfig
from dslaunch.rank.process import RankStatus, StopFlag, die_with_parent, redirect_output, threads
from dslaunch.wire.nodedir import NodeDir
from dslaunch.wire.rankenv import NodeEnv
from dslaunch.wire.restarts import PEER_LOSS_WAIT_S, backoff_delay
from dslaunch.wire.states import RankStage


@dataclass
class Rank:
    """This process as the agent started it: where it is, what it was told, how it reports."""

    node: NodeEnv
    cfg: GroupConfig
    nd: NodeDir
    status: RankStatus
    stop: StopFlag
    threads: int | None


def prepare() -> Rank:
    """Everything before distributed work: cheap, and it makes every later failure visible."""
    node = NodeEnv.from_env()
    cfg = GroupConfig.of(node, int(os.environ["LOCAL_RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    nd = NodeDir.at(node.node_dir)
    redirect_output(nd, cfg.rank)
    die_with_parent()
    n_threads = threads()
    status = RankStatus(
        nd,
        {
            "rank": cfg.rank, "local_rank": cfg.local_rank, "node_rank": cfg.node_rank,
            "host": node.host or socket.gethostname(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "device": cfg.device, "restarts": cfg.restart, "init_method": cfg.init_method,
            "backend": cfg.backend, "threads": n_threads, "started": time.time(),
        },
    )  # fmt: skip
    rank = Rank(node, cfg, nd, status, StopFlag(), n_threads)
    status.update(RankStage.STARTING)
    return rank


def main() -> int:
    rank = prepare()
    try:
        return _run(rank)
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        retry = getattr(e, "retry", True)
        rank.status.update(RankStage.FAILED, error=f"{type(e).__name__}: {e}".strip()[:2000], retry=retry)
        traceback.print_exc()
        if not retry:
            # RankEnd.SAME_EVERYWHERE: end the replica instead of restarting into the same
            # failure (the agent restarts only ranks that exit non-zero)
            print("not restarting: every rank failed the same way", flush=True)
            return 0
        raise


def _run(rank: Rank) -> int:
    from dslaunch.rank.group import with_agreed_attempt

    # inside the try and after the redirect: a failure to agree shows in status and the rank log
    rank.cfg = with_agreed_attempt(rank.cfg, rank.nd)
    cfg = rank.cfg
    rank.status.update(restarts=cfg.restart)
    print(f"--- rank {cfg.rank} pid {os.getpid()} attempt {cfg.restart} on {socket.gethostname()} ---", flush=True)
    if _back_off(rank):
        return 0
    _rendezvous(rank)
    from dslaunch.rank.session import PeerFailedStartup, shutdown, startup, watch

    _renew_after_window(rank)
    try:
        session = startup(rank.cfg, rank.node, rank.nd, rank.status, rank.stop)
    except PeerFailedStartup as e:
        # like a lost peer: the agent restarts every rank within moments; failing here as well
        # would make this rank look like the cause (and count a second failure)
        print(f"{e}; waiting for the agent's restart", flush=True)
        rank.status.update(RankStage.LOST_PEER, error=str(e)[:500])
        if rank.stop.event.wait(PEER_LOSS_WAIT_S):
            return 0
        raise
    return shutdown(session, watch(session))


def _renew_after_window(rank: Rank) -> None:
    """Once this attempt has run --restart-window long, the back-off counts from it again (the
    agent renews the restart budget on the same clock: rank/torchrun.py)."""
    window, memo, attempt = rank.node.restart_window, rank.nd.rank_renewed(rank.cfg.rank), rank.cfg.restart
    if window > 0 and attempt > 0:
        timer = threading.Timer(window, lambda: memo.write_text(str(attempt)))
        timer.daemon = True
        timer.start()


def _since_renewal(rank: Rank) -> int:
    """The attempt counted from the last one that ran --restart-window long (0: the first start)."""
    try:
        return rank.cfg.restart - int(rank.nd.rank_renewed(rank.cfg.rank).read_text())
    except (OSError, ValueError):
        return rank.cfg.restart


def _back_off(rank: Rank) -> bool:
    """Wait before a repeated restart (--restart-backoff); True when stopped meanwhile."""
    delay = backoff_delay(rank.node.restart_backoff, _since_renewal(rank))
    if not delay:
        return False
    print(f"backing off {delay:g}s before attempt {rank.cfg.restart}", flush=True)
    rank.status.update(RankStage.BACKOFF, backoff_s=delay)
    return rank.stop.event.wait(delay)


def _rendezvous(rank: Rank) -> None:
    """Form the process group and prove it; the built-in model is built before (see loader)."""
    import torch

    from dslaunch.engine.loader import tiny_model
    from dslaunch.rank.group import form_group, prove_group

    cfg, serve = rank.cfg, rank.node.serve
    if rank.threads:
        torch.set_num_threads(rank.threads)
    if not serve.model and not serve.handler:
        tiny_model(rank.nd.work_dir)
    rank.status.update(RankStage.RENDEZVOUS)
    print(f"forming the process group: {cfg.init_method} {cfg.url} backend={cfg.backend}", flush=True)
    form_group(cfg)
    total = prove_group(cfg)
    print(f"group ready: rank {cfg.rank}/{cfg.world_size}, all-reduce of ranks = {total}", flush=True)
    rank.status.update(RankStage.LOADING, allreduce=total)


def entry() -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())


if __name__ == "__main__":
    entry()
