"""How the ranks form their process group (`--init-method`): one class per method, in a registry.

Each method owns what differs between them, in one place: which flags it needs (`check_flags`),
the URL the ranks pass to `init_process_group` (`url`), what pre-flight must prove about the nodes
(`preflight`: one shared directory for `file`), which ports the head node must keep free, what
`down` removes, and the group initialisation itself (`init_group`). The launch host and the ranks
both look methods up here; a new one is a class and a `register_init_method` call.

Standard library only: the rank passes `torch.distributed` in, pre-flight passes its cluster.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Any, ClassVar

from dslaunch.errors import NodeOpFailed, RemoteError, UserError
from dslaunch.wire.restarts import ATTEMPT_FIELD


class InitMethod:
    """The base: a method that needs no flag, no pre-flight check and leaves nothing behind."""

    name: ClassVar[str] = ""
    uses_master_port: ClassVar[bool] = True  # rank 0 hosts a store on the planned master port

    def check_flags(self, rdzv_dir: str | None) -> None:
        """Reject flags this method cannot use, naming the flag."""
        if rdzv_dir:
            raise UserError(f"--rdzv-dir is only used with --init-method file (not {self.name})")

    def url(self, gang: str, master_addr: str, master_port: int, rdzv_dir: str | None) -> str:
        """The `init_process_group` URL; `{restart}` is filled in by the rank per attempt."""
        raise NotImplementedError

    def preflight(self, rdzv_dir: str | None, cluster: Any) -> None:
        """What must hold on the nodes before anything starts (raise UserError); nothing by default."""

    def leftovers(self, rdzv_dir: str | None, job_id: str) -> str | None:
        """A glob of files on node 0 that `down` removes, or None."""
        return None

    def init_group(self, dist: Any, cfg: Any, url: str) -> None:
        """`dist.init_process_group` for this rank (`cfg`: its GroupConfig)."""
        dist.init_process_group(cfg.backend, init_method=url, rank=cfg.rank, world_size=cfg.world_size,
                                timeout=timedelta(seconds=cfg.timeout_s))  # fmt: skip


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


class TcpInit(InitMethod):
    """Rank 0 hosts the store at `tcp://master:port`."""

    name = "tcp"

    def url(self, gang: str, master_addr: str, master_port: int, rdzv_dir: str | None) -> str:
        return f"tcp://{_bracket(master_addr)}:{master_port}"


class EnvInit(InitMethod):
    """`env://`: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the rank's environment."""

    name = "env"

    def url(self, gang: str, master_addr: str, master_port: int, rdzv_dir: str | None) -> str:
        return "env://"

    def init_group(self, dist: Any, cfg: Any, url: str) -> None:
        os.environ.update(RANK=str(cfg.rank), WORLD_SIZE=str(cfg.world_size), MASTER_ADDR=cfg.master_addr,
                          MASTER_PORT=str(cfg.master_port))  # fmt: skip
        dist.init_process_group(cfg.backend, init_method="env://", timeout=timedelta(seconds=cfg.timeout_s))


class FileInit(InitMethod):
    """A fresh file per attempt in a directory every node shares (NFS): no port at all."""

    name = "file"
    uses_master_port = False

    def check_flags(self, rdzv_dir: str | None) -> None:
        if not rdzv_dir:
            raise UserError("--init-method file needs --rdzv-dir: a directory every node sees (e.g. on NFS)")
        if not rdzv_dir.startswith("/"):
            raise UserError(f"--rdzv-dir {rdzv_dir!r}: must be an absolute path")

    def url(self, gang: str, master_addr: str, master_port: int, rdzv_dir: str | None) -> str:
        assert rdzv_dir is not None
        return f"file://{rdzv_dir.rstrip('/')}/{gang}-{ATTEMPT_FIELD}"

    def leftovers(self, rdzv_dir: str | None, job_id: str) -> str | None:
        return f"{rdzv_dir.rstrip('/')}/{job_id}-*" if rdzv_dir else None

    def preflight(self, rdzv_dir: str | None, cluster: Any) -> None:
        """Write a probe on node 0 and read it on every other node: the directory must be one."""
        head, rest = cluster.clients[0], cluster.clients[1:]
        try:
            wrote = head.call("rdzv-write", {"dir": rdzv_dir})
        except NodeOpFailed as e:
            raise UserError(f"{e.host}: --rdzv-dir {e.reason}") from None
        try:
            args = {"dir": rdzv_dir, "path": wrote["path"], "token": wrote["token"]}
            results = cluster.map(lambda c: c.call("rdzv-read", args), rest)
            if results.failed:
                why = [f"{r.node.host}: --rdzv-dir {getattr(r.error, 'reason', r.error)}" for r in results.failed]
                lines = "\n  ".join(why)
                raise UserError(f"--init-method file needs one directory shared by all nodes (--rdzv-dir):\n  {lines}")
        finally:
            with contextlib.suppress(RemoteError):
                head.call("remove", {"paths": [wrote["path"]]})


INIT_METHODS: dict[str, InitMethod] = {}


def register_init_method(method: InitMethod) -> InitMethod:
    """Make `--init-method NAME` mean `method` (on the launch host and in the ranks alike)."""
    INIT_METHODS[method.name] = method
    return method


for _m in (TcpInit(), FileInit(), EnvInit()):
    register_init_method(_m)


def init_method(name: str) -> InitMethod:
    """The method called `name`, or a UserError listing the choices."""
    try:
        return INIT_METHODS[name]
    except KeyError:
        raise UserError(f"--init-method {name!r}: choose one of {', '.join(INIT_METHODS)}") from None
