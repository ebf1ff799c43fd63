"""Forming the workers' process group with the chosen init method, and proving it works.

The agent (torchrun) provides RANK/WORLD_SIZE/MASTER_* for its own store; dslaunch's workers
form their group themselves so that `--init-method tcp|file|env` means what it says and rank
numbering follows the hostfile (rank 0 always on node 0, whatever the rendezvous order).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

from dslaunch.wire.initmethods import INIT_METHODS
from dslaunch.wire.nodedir import NodeDir
from dslaunch.wire.rankenv import NodeEnv
from dslaunch.wire.restarts import attempt_url


@dataclass(frozen=True)
class GroupConfig:
    """This rank's place in the job: its rank by hostfile order, and how to form the group."""

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    init_method: str
    init_url: str
    backend: str
    master_addr: str
    master_port: int
    restart: int
    timeout_s: float

    @classmethod
    def of(cls, node: NodeEnv, local_rank: int, restart: int = 0) -> GroupConfig:
        """No I/O: the job-wide attempt is settled afterwards by `with_agreed_attempt`."""
        return cls(
            rank=node.rank_offset + local_rank,
            world_size=node.world_size,
            local_rank=local_rank,
            node_rank=node.node_rank,
            init_method=node.init_method,
            init_url=node.init_url,
            backend=node.backend,
            master_addr=node.master_addr,
            master_port=node.master_port,
            restart=restart,
            timeout_s=node.pg_timeout,
        )

    @property
    def url(self) -> str:
        """The init URL for this attempt: the file method gets a fresh file per restart."""
        return attempt_url(self.init_url, self.restart)

    @property
    def device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


def agree_attempt(env: dict[str, str] | os._Environ, rank: int, memo: Path, timeout_s: float = 120.0) -> int | None:
    """A job-wide attempt number, the same on every rank and new after every gang restart.

    torchrun's TORCHELASTIC_RESTART_COUNT counts only a node's own failures (a node restarted
    because another failed keeps 0), so it cannot name a per-restart rendezvous file that every
    node agrees on. Rank 0 bumps a counter in the agent's store (hosted on node 0); every other
    rank waits for a value above the one it used last time (kept in `memo`). None when the agent
    shares no store (older torch): the caller falls back to the restart count.
    """
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import time

    from torch.distributed import TCPStore

    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=timeout_s))  # fmt: skip
    key = "dslaunch/attempt"
    if rank == 0:
        attempt = store.add(key, 1) - 1
    else:
        last = int(memo.read_text()) if memo.exists() else -1
        deadline = time.monotonic() + timeout_s
        while (attempt := store.add(key, 0) - 1) <= last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not start attempt {last + 1} within {timeout_s:g}s")
            time.sleep(0.05)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(str(attempt))
    return attempt


def with_agreed_attempt(cfg: GroupConfig, nd: NodeDir) -> GroupConfig:
    """`cfg` with `restart` replaced by the job-wide attempt (kept as is without an agent store)."""
    attempt = agree_attempt(os.environ, cfg.rank, nd.rank_attempt(cfg.rank))
    return cfg if attempt is None else replace(cfg, restart=attempt)


def form_group(cfg: GroupConfig) -> None:
    """`init_process_group` with the configured method; rank 0 hosts the store for tcp and env."""
    import torch
    import torch.distributed as dist

    # The agent tells workers to use its store; ours is on the planned master port instead.
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    if cfg.backend == "nccl":
        torch.cuda.set_device(cfg.local_rank)
    INIT_METHODS[cfg.init_method].init_group(dist, cfg, cfg.url)
    if dist.get_rank() != cfg.rank or dist.get_world_size() != cfg.world_size:
        raise RuntimeError(
            f"process group has rank {dist.get_rank()}/{dist.get_world_size()}, expected {cfg.rank}/{cfg.world_size}"
        )


def prove_group(cfg: GroupConfig) -> int:
    """All-reduce the ranks: the sum must be n(n-1)/2, or the group is not what it claims."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([cfg.rank], dtype=torch.int64, device=cfg.device)
    dist.all_reduce(t)
    got = int(t.item())
    want = cfg.world_size * (cfg.world_size - 1) // 2
    if got != want:
        raise RuntimeError(f"all-reduce of ranks gave {got}, expected {want}")
    return got


def leave_group() -> None:
    """Destroy the group on the way out; NCCL can hang at exit otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
