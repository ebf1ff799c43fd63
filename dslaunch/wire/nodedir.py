"""The layout of one node's job directory, shared by the plan, nodectl, the worker and the front.

<work dir>/<job id>/node<N>/
    agent.pid agent.exit agent.log     the torchrun agent (written by nodectl start)
    ranks/rank<R>.json                 each rank's status, rewritten on every change
    ranks/rank<R>.attempt              the job-wide attempt this rank last used
    logs/rank<R>.log                   each rank's output, appended across restarts
    elastic/                           torchrun's own log directory
    front.json front.token             rank 0's front: its live status, and its token (0600)
    replica.secret                     a replica leader's key for the router link (0600)
<work dir>/<job id>/router/            the first router (the job's public front; router<K>/ on node K
                                       for router K), same layout:
    agent.pid agent.exit agent.log     its supervisor, started like an agent
    front.json front.token front.nonce its live status (replicas included) and the public token
    replica.secret drain               the link key; replicas to drain (JSON list, `restart`)
<work dir>/models/                     the built-in model, shared by every job
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def node_dir_path(work_dir: str, job_id: str, node_rank: int) -> str:
    """Where node `node_rank` keeps the job (unexpanded: `~` means the node's home).

    The node rank is part of it so that simulated nodes sharing one machine never collide.
    """
    return f"{work_dir.rstrip('/')}/{job_id}/node{node_rank}"


def router_dir_path(work_dir: str, job_id: str, index: int = 0) -> str:
    """Where a router's node keeps it (unexpanded): `router` for the first, `router<K>` for router K."""
    return f"{work_dir.rstrip('/')}/{job_id}/router{index or ''}"


@dataclass(frozen=True)
class NodeDir:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> NodeDir:
        """The node directory for a path as planned (`~` expanded on this node)."""
        return cls(Path(os.path.expanduser(str(path))))

    @property
    def work_dir(self) -> Path:
        return self.root.parent.parent

    @property
    def models(self) -> Path:
        return self.work_dir / "models"

    @property
    def ranks(self) -> Path:
        return self.root / "ranks"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def elastic(self) -> Path:
        return self.root / "elastic"

    @property
    def agent_pid(self) -> Path:
        return self.root / "agent.pid"

    @property
    def agent_exit(self) -> Path:
        return self.root / "agent.exit"

    @property
    def agent_log(self) -> Path:
        return self.root / "agent.log"

    @property
    def front_status(self) -> Path:
        return self.root / "front.json"

    @property
    def front_token(self) -> Path:
        return self.root / "front.token"

    @property
    def front_nonce(self) -> Path:
        return self.root / "front.nonce"

    def rank_status(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}.json"

    def rank_attempt(self, rank: int) -> Path:
        return self.ranks / f"rank{rank}.attempt"

    def rank_renewed(self, rank: int) -> Path:
        """The attempt that ran --restart-window long: the back-off counts from it."""
        return self.ranks / f"rank{rank}.renewed"

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def rank_logs(self, ranks: list[int] | None = None) -> dict[int, Path]:
        """Every rank log present here, by rank (only `ranks` when given)."""
        out: dict[int, Path] = {}
        for p in sorted(self.logs.glob("rank*.log")):
            r = p.stem.removeprefix("rank")
            if r.isdigit() and (ranks is None or int(r) in ranks):
                out[int(r)] = p
        return dict(sorted(out.items()))

    @property
    def replica_secret(self) -> Path:
        return self.root / "replica.secret"

    @property
    def drain(self) -> Path:
        return self.root / "drain"
