"""What the plan tells the ranks of one node: one typed object, carried as environment variables.

The launch host builds a NodeEnv per node (launch/plan), nodectl passes it to the torchrun agent,
and every rank reads it back with `NodeEnv.from_env()`; nothing else reads DSLAUNCH_* variables.
The marker pair (DSLAUNCH_JOB_ID, DSLAUNCH_NODE_RANK) is also how `down` finds every process of a
job on a node: DSLAUNCH_NODE_RANK carries the *unit* (one agent, or the router), so that two
replicas sharing a host are found and stopped separately. The torch conventions (MASTER_ADDR,
WORLD_SIZE, LOCAL_SIZE, ...) are set alongside.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from dslaunch.wire.serve import ServeSpec

JOB_ENV = "DSLAUNCH_JOB_ID"
NODE_ENV = "DSLAUNCH_NODE_RANK"
NODE_DIR_ENV = "DSLAUNCH_NODE_DIR"
AUTO_THREADS_ENV = "DSLAUNCH_AUTO_THREADS"
RESTART_WINDOW_ENV = "DSLAUNCH_RESTART_WINDOW"  # read by the agent (rank/torchrun.py) as well
# Read and removed by nodectl before the agent starts: the user variables whose `$VAR`s it expands
# against the node's environment (DeepSpeed's `.deepspeed_env`), and the launch directory.
EXPAND_ENV = "DSLAUNCH_EXPAND_ENV"
LAUNCH_DIR_ENV = "DSLAUNCH_LAUNCH_DIR"
GANG_NODE_ENV = "DSLAUNCH_GANG_NODE"


@dataclass(frozen=True)
class NodeEnv:
    job_id: str
    name: str
    node_rank: int
    host: str
    node_dir: str  # as planned (`~` unexpanded); nodectl replaces it with the node's own path
    rank_offset: int  # this node's first rank: ranks follow hostfile order, not the agent's RANK
    world_size: int
    local_world_size: int
    nnodes: int
    init_method: str
    init_url: str  # `{restart}` is filled in per attempt (file://)
    backend: str
    master_addr: str
    master_port: int
    pg_timeout: float = 1800.0
    restart_backoff: float = 1.0
    restart_window: float = 0.0  # the agent renews its restart budget after this long healthy; 0: never
    auto_threads: bool = True  # divide the node's cores among its ranks (OMP_NUM_THREADS unset)
    serve: ServeSpec = field(default_factory=ServeSpec)
    # Replicas: node_rank, rank_offset and world_size above are the replica's own (its gang); the
    # unit numbers the job's agents (the marker and the node directory); routers are where the
    # replica's leader dials each of the job's routers ("host:port"); none for a front inside rank 0.
    unit: int | None = None
    replica: int = 0
    replicas: int = 1
    routers: tuple[str, ...] = ()

    @property
    def marker(self) -> str:
        return str(self.node_rank if self.unit is None else self.unit)

    def to_env(self) -> dict[str, str]:
        env = {
            JOB_ENV: self.job_id,
            NODE_ENV: self.marker,
            GANG_NODE_ENV: str(self.node_rank),
            "DSLAUNCH_REPLICA": str(self.replica),
            "DSLAUNCH_REPLICAS": str(self.replicas),
            NODE_DIR_ENV: self.node_dir,
            "DSLAUNCH_NAME": self.name,
            "DSLAUNCH_HOST": self.host,
            "DSLAUNCH_RANK_OFFSET": str(self.rank_offset),
            "DSLAUNCH_WORLD_SIZE": str(self.world_size),
            "DSLAUNCH_INIT_METHOD": self.init_method,
            "DSLAUNCH_INIT_URL": self.init_url,
            "DSLAUNCH_BACKEND": self.backend,
            "DSLAUNCH_PG_TIMEOUT": f"{self.pg_timeout:g}",
            "DSLAUNCH_RESTART_BACKOFF": f"{self.restart_backoff:g}",
            RESTART_WINDOW_ENV: f"{self.restart_window:g}",
            "DSLAUNCH_MASTER_ADDR": self.master_addr,
            "DSLAUNCH_MASTER_PORT": str(self.master_port),
            "DSLAUNCH_SERVE": self.serve.to_json(),
            # the torch and DeepSpeed conventions
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            # DeepSpeed's CPU shared-memory all-reduce reads LOCAL_SIZE; unset, it crashes.
            "LOCAL_SIZE": str(self.local_world_size),
            "CROSS_SIZE": str(self.nnodes),
            "PYTHONUNBUFFERED": "1",
        }
        if self.auto_threads:
            env[AUTO_THREADS_ENV] = "1"
        if self.routers:
            env["DSLAUNCH_ROUTER"] = ",".join(self.routers)  # host:port, IPv6 hosts in brackets
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodeEnv:
        e = os.environ if env is None else env
        return cls(
            job_id=e[JOB_ENV],
            name=e.get("DSLAUNCH_NAME", ""),
            node_rank=int(e.get(GANG_NODE_ENV) or e[NODE_ENV]),
            host=e.get("DSLAUNCH_HOST", ""),
            node_dir=e[NODE_DIR_ENV],
            rank_offset=int(e["DSLAUNCH_RANK_OFFSET"]),
            world_size=int(e["DSLAUNCH_WORLD_SIZE"]),
            local_world_size=int(e.get("LOCAL_WORLD_SIZE", "1")),
            nnodes=int(e.get("CROSS_SIZE", "1")),
            init_method=e["DSLAUNCH_INIT_METHOD"],
            init_url=e["DSLAUNCH_INIT_URL"],
            backend=e.get("DSLAUNCH_BACKEND", "gloo"),
            master_addr=e["DSLAUNCH_MASTER_ADDR"],
            master_port=int(e["DSLAUNCH_MASTER_PORT"]),
            pg_timeout=float(e.get("DSLAUNCH_PG_TIMEOUT", "1800")),
            restart_backoff=float(e.get("DSLAUNCH_RESTART_BACKOFF", "0")),
            restart_window=float(e.get(RESTART_WINDOW_ENV, "0")),
            auto_threads=e.get(AUTO_THREADS_ENV) == "1",
            serve=ServeSpec.from_json(e.get("DSLAUNCH_SERVE", "{}")),
            unit=int(e[NODE_ENV]) if e[NODE_ENV].isdigit() else None,
            replica=int(e.get("DSLAUNCH_REPLICA", "0")),
            replicas=int(e.get("DSLAUNCH_REPLICAS", "1")),
            routers=tuple(r for r in e.get("DSLAUNCH_ROUTER", "").split(",") if r),
        )
