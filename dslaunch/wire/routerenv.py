"""What the plan tells the router (the job's public front, its own process on node 0).

Carried as environment variables like NodeEnv; the router's marker is DSLAUNCH_NODE_RANK=<unit>,
the unit after the job's agents, so `down` finds it (and its supervisor) like any agent. The public
address, limits and model come from the job's ServeSpec; the link address is where replica leaders
dial in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from dslaunch.wire.rankenv import JOB_ENV, NODE_DIR_ENV, NODE_ENV
from dslaunch.wire.serve import ServeSpec


@dataclass(frozen=True)
class RouterEnv:
    job_id: str
    name: str
    node_dir: str  # as planned (`~` unexpanded); nodectl replaces it with the node's own path
    replicas: int
    tp: int  # ranks per replica
    link_bind: str  # the address replica leaders reach node 0 at
    link_port: int
    serve: ServeSpec = field(default_factory=ServeSpec)
    unit: int = 0  # its marker (DSLAUNCH_NODE_RANK): the unit after the job's agents

    @property
    def world_size(self) -> int:
        return self.replicas * self.tp

    def to_env(self) -> dict[str, str]:
        return {
            JOB_ENV: self.job_id,
            NODE_ENV: str(self.unit),
            NODE_DIR_ENV: self.node_dir,
            "DSLAUNCH_NAME": self.name,
            "DSLAUNCH_REPLICAS": str(self.replicas),
            "DSLAUNCH_TP": str(self.tp),
            "DSLAUNCH_LINK_BIND": self.link_bind,
            "DSLAUNCH_LINK_PORT": str(self.link_port),
            "DSLAUNCH_SERVE": self.serve.to_json(),
            "PYTHONUNBUFFERED": "1",
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterEnv:
        e = os.environ if env is None else env
        return cls(
            job_id=e[JOB_ENV],
            name=e.get("DSLAUNCH_NAME", ""),
            node_dir=e[NODE_DIR_ENV],
            replicas=int(e["DSLAUNCH_REPLICAS"]),
            tp=int(e["DSLAUNCH_TP"]),
            link_bind=e["DSLAUNCH_LINK_BIND"],
            link_port=int(e["DSLAUNCH_LINK_PORT"]),
            serve=ServeSpec.from_json(e.get("DSLAUNCH_SERVE", "{}")),
            unit=int(e[NODE_ENV]),
        )
