"""The gang-restart rule, in one place: what a replica does when one of its ranks fails.

Each replica is one torchrun gang: one agent per node it spans, their c10d rendezvous on the
replica's head node, and its own restart budget (`--max-restarts`, `launch/plan.py:agent_argv`).
The loop is torchrun's elastic agent; dslaunch's ranks decide how they leave it, so that one
failure costs one gang restart and a failure that would repeat ends the replica instead.

Each agent of a gang runs (torchrun's `SimpleElasticAgent`, with --monitor-interval 0.5)::

    restarts_left = max_restarts
    while True:
        rendezvous()              # every agent of the gang joins the next round
        start_workers()           # this node's ranks: python -m dslaunch.rank.worker
        while all workers run:
            sleep(0.5)
            if they ran --restart-window since they started:
                restarts_left = max_restarts   # dslaunch's (rank/torchrun.py): a budget per run
                                               # of failures, not per agent lifetime
        if every worker exited 0:
            return SUCCEEDED      # the agent leaves; its replica is over (see RankEnd: ranks exit
                                  # 0 only when told to stop, or when a restart would not help)
        if restarts_left == 0:    # some worker exited non-zero
            return FAILED         # `status` shows the replica failed
        restarts_left -= 1
        stop_workers()            # SIGTERM, then SIGKILL: this node's ranks
                                  # the gang's other agents see the new round and do the same

Each rank, per attempt (`rank/worker.py`, `rank/session.py`)::

    attempt = agreed attempt      # a counter in the agent's store (rank/group.py): the same on
                                  # every rank of the gang, one more after every gang restart
    sleep(backoff_delay(--restart-backoff, attempt - renewed))  # 0 for the first start and first
                                  # restart; `renewed`: the last attempt that ran --restart-window
    init_process_group(attempt_url(init_url, attempt))  # file://: a fresh file per attempt
    start up (every step checked on every rank), serve, and end as one of RankEnd

The router (`serving/dispatch.py`) takes each replica's newest attempt: a leader linking with
an older attempt than the one linked (a gang on its way out) is refused, and what a replica had
in flight when its link dropped goes back to the router's queue.
"""

from __future__ import annotations

from enum import Enum

HUNG_EXIT = 75  # the exit code of a rank that ended itself because its gang stopped making progress
PEER_LOSS_WAIT_S = 20.0  # after a lost peer, how long a rank waits for its agent's SIGTERM
MAX_BACKOFF_S = 60.0  # the longest --restart-backoff delay
ATTEMPT_FIELD = "{restart}"  # in an init URL: the attempt number (a fresh rendezvous file each)


class RankEnd(Enum):
    """How a rank leaves an attempt, and so what its gang does next (the agent's loop above)."""

    SIGNALLED = "signalled"  # SIGTERM (`down`, `restart`, or a gang restart): exit 0, the loop decides
    LOST_PEER = "lost_peer"  # a collective failed with a peer gone: wait up to PEER_LOSS_WAIT_S for
    #                          the agent's SIGTERM (the failed rank's own exit restarts the gang, once),
    #                          then raise: non-zero, restart
    HUNG = "hung"  # no progress for hang_limit: answer the batch `unavailable`, exit HUNG_EXIT: restart
    #                (the agent's stop_workers kills the stuck rank too)
    SAME_EVERYWHERE = "same_everywhere"  # a start-up step failed identically on every rank: exit 0,
    #                                      the replica ends (a restart would fail the same way)
    OWN_ERROR = "own_error"  # anything else raised in this rank: non-zero, restart


def backoff_delay(base: float, attempt: int) -> float:
    """Seconds to wait before job-wide attempt `attempt` (0 is the first start).

    The first restart is immediate: one lost rank should cost as little as possible. Later ones
    double from `base`, so a rank that crashes at once cannot spin the whole job in a tight loop.
    """
    if attempt <= 1 or base <= 0:
        return 0.0
    return min(MAX_BACKOFF_S, base * 2 ** (attempt - 2))


def hang_limit(hang_timeout: float, rank: int, world_size: int) -> float:
    """Seconds without progress after which a rank ends itself (RankEnd.HUNG); 0: never.

    Rank 0 judges first; the others wait twice as long, so they act only when rank 0 itself hangs.
    """
    if world_size <= 1:
        return 0.0
    return hang_timeout * (1 if rank == 0 else 2)


def attempt_url(init_url: str, attempt: int) -> str:
    """The init URL of one attempt: a file:// URL names a fresh file per attempt."""
    return init_url.replace(ATTEMPT_FIELD, str(attempt))
