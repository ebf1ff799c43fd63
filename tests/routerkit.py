"""Real routers and real replicas on loopback for the router tests, every process ended after.

A replica here is one process at world size 1 (forked by tests/forkserver.py): a real engine (the
built-in tiny model, or the Echo handler below), rank 0's real loop, and the real front started
by `rank.session.start_front` in dial mode, so the link and the serving code are the product's.
The router is `python -m dslaunch.serving.router` with a RouterEnv environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dslaunch.client import Client
from dslaunch.wire.nodedir import NodeDir, node_dir_path, router_dir_path
from dslaunch.wire.rankenv import NodeEnv
from dslaunch.wire.routerenv import RouterEnv
from dslaunch.wire.serve import ServeSpec
from tests import forkserver
from tests.forkserver import Forked
from tests.simnodes import free_port, node_port

ROOT = Path(__file__).resolve().parent.parent
DELAY_ENV = "ROUTERKIT_DELAY"  # seconds: the Echo handler per batch, the tiny model per decode step


class Echo:
    """A handler that sleeps a fixed time per batch (so a test can catch work in flight)."""

    def load(self, ctx: Any) -> None:
        self.delay = float(os.environ.get(DELAY_ENV, "0"))

    def __call__(self, batch: list[Any]) -> list[Any]:
        time.sleep(self.delay)
        return [{"echo": x} for x in batch]


class Kit:
    """One job's worth of directories, ports and processes; `close` ends every process."""

    def __init__(self, work: Path, serve: ServeSpec, replicas: int = 2, key: str | None = None) -> None:
        self.work = work
        self.job = "job" + secrets.token_hex(3)
        # outside the ephemeral range: a restarted router takes them back, and no connect() has them
        self.serve = dataclasses.replace(serve, port=node_port(["127.0.0.1"]))
        self.replicas = replicas
        self.key = key or secrets.token_hex(16)
        self.link_port = node_port(["127.0.0.1"])
        self.router_dir = NodeDir.at(router_dir_path(str(work), self.job))
        self.router_dir.root.mkdir(parents=True)
        _secret(self.router_dir.replica_secret, self.key)
        self.router: subprocess.Popen[bytes] | None = None
        self.procs: dict[int, Forked] = {}
        self.attempts: dict[int, int] = {}
        self.token: str | None = None  # the front's token, when a test gave the router one

    @property
    def port(self) -> int:
        return self.serve.port

    def client(self, **kw: Any) -> Client:
        return Client("127.0.0.1", self.port, timeout=120, retry_for=0, **{"token": self.token, **kw})

    def start_router(self, wait: bool = True, supervised: bool = False) -> subprocess.Popen[bytes]:
        """The router; `supervised`: under `node.supervise`, as `up` runs it (self.router is the supervisor)."""
        env = RouterEnv(job_id=self.job, name="t", node_dir=str(self.router_dir.root), replicas=self.replicas, tp=1,
                        link_bind="127.0.0.1", link_port=self.link_port, serve=self.serve)  # fmt: skip
        log = open(self.router_dir.root / "router.log", "ab")  # noqa: SIM115
        keeper = [sys.executable, "-m", "dslaunch.node.supervise", "--"] if supervised else []
        self.router = subprocess.Popen([*keeper, sys.executable, "-m", "dslaunch.serving.router"], cwd=ROOT, stdout=log,
                                       stderr=subprocess.STDOUT, env={**os.environ, **env.to_env()})  # fmt: skip
        if not wait:
            return self.router
        _until(lambda: self.router_dir.front_status.exists() or self.router.poll() is not None, 60, self.logs)
        assert self.router.poll() is None, self.logs()
        return self.router

    def router_pid(self) -> int:
        """The supervised router's own pid (the supervisor's child)."""
        return int(json.loads((self.router_dir.root / "supervisor.json").read_text())["child_pid"])

    def router_log(self) -> str:
        return (self.router_dir.root / "router.log").read_text(errors="replace")

    def start_replica(self, r: int, key: str | None = None, delay: float = 0.0, wait: bool = True) -> Forked:
        """Replica `r`'s leader (attempt counted up on every start); returns once it has linked
        (`wait`; else at once, and `wait_state(r, "ready", ...)` waits)."""
        self.attempts[r] = attempt = self.attempts.get(r, -1) + 1
        nd = NodeDir.at(node_dir_path(str(self.work), self.job, r))
        nd.root.mkdir(parents=True, exist_ok=True)
        _secret(nd.replica_secret, key or self.key)
        node = NodeEnv(job_id=self.job, name="t", node_rank=0, host="localhost", node_dir=str(nd.root), rank_offset=0,
                       world_size=1, local_world_size=1, nnodes=1, init_method="tcp", init_url="",
                       backend="gloo", master_addr="127.0.0.1", master_port=free_port(), serve=self.serve,
                       unit=r, replica=r, replicas=self.replicas,
                       routers=(f"127.0.0.1:{self.link_port}",))  # fmt: skip
        env = {**os.environ, **node.to_env(), DELAY_ENV: str(delay), "ROUTERKIT_ATTEMPT": str(attempt)}
        env.pop("DSLAUNCH_AUTO_THREADS", None)
        # forked from this worker's warm interpreter: a replica start costs a model load, not imports
        p = forkserver.server().spawn("tests.routerkit:_replica_main", env, nd.root / "replica.log")
        self.procs[r] = p
        if wait and (key is None or key == self.key):
            # a new interpreter importing torch and transformers: minutes on a small machine under load
            self.wait_state(r, "ready", attempt, within=300)
        return p

    def stopped(self, r: int, within: float = 90) -> int:
        """Replica r's exit code once it ended by itself; one that does not end within `within`
        seconds fails the test with every thread's stack (faulthandler, on SIGUSR1) in its log."""
        p = self.procs.pop(r)
        try:
            return p.wait(within)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)
            time.sleep(2)
            p.kill()
            p.wait(10)
            raise AssertionError(f"replica {r} still ran {within:g}s later; its threads:\n{self.logs()}") from None

    def kill_replica(self, r: int) -> None:
        p = self.procs.pop(r)
        p.kill()
        p.wait(30)

    def health(self) -> dict[str, Any]:
        with self.client() as c:
            return c.health()

    def replica(self, r: int) -> dict[str, Any]:
        return next(x for x in self.health()["replicas"] if x["id"] == r)

    def wait_state(self, r: int, state: str, attempt: int | None = None, within: float = 120) -> None:
        def there() -> bool:
            assert all(p.poll() is None for p in self.procs.values()), self.logs()
            row = self.replica(r)
            return row["state"] == state and (attempt is None or row["attempt"] == attempt)

        _until(there, within, self.logs)

    def until(self, cond: Any, within: float = 120) -> None:
        _until(cond, within, self.logs)

    def logs(self) -> str:
        out = []
        for p in sorted(self.work.glob(f"{self.job}/*/*.log")):
            out.append(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for p in [*self.procs.values(), *([self.router] if self.router else [])]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.procs.values(), *([self.router] if self.router else [])]:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()


def _secret(path: Path, value: str) -> None:
    path.write_text(value)
    path.chmod(0o600)


def _until(cond: Any, within: float, logs: Any) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s\n{logs()}")
        time.sleep(0.05)


def _replica_main() -> None:
    """A replica leader at world size 1, serving the router through the product's own code."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that waits in vain asks where it is
    from dslaunch.engine.base import EngineContext
    from dslaunch.engine.loader import load_engine
    from dslaunch.rank.group import GroupConfig
    from dslaunch.rank.lockstep import Channel, lead
    from dslaunch.rank.session import start_front
    from tests.inproc import process_group

    node = NodeEnv.from_env()
    nd = NodeDir.at(node.node_dir)
    delay = float(os.environ.get(DELAY_ENV, "0"))
    cfg = GroupConfig(rank=0, world_size=1, local_rank=0, node_rank=0, init_method="tcp", init_url="", backend="gloo",
                      master_addr="127.0.0.1", master_port=node.master_port,
                      restart=int(os.environ["ROUTERKIT_ATTEMPT"]), timeout_s=60)  # fmt: skip
    ctx = EngineContext(rank=0, world_size=1, local_rank=0, device="cpu", multi_node=False, work_dir=nd.work_dir,
                        group=process_group(), options=node.serve)  # fmt: skip
    engine = load_engine(node.serve, ctx)
    if delay and hasattr(engine, "new_batch"):
        engine.new_batch = _slowed(engine.new_batch, delay)
    front = start_front(node, engine, [{"rank": 0, "host": "localhost", "device": "cpu"}], cfg, nd)
    signal.signal(signal.SIGTERM, lambda *_: front.stop_accepting())
    lead(engine, Channel(0, 1, 60), front.batcher, 0.5)
    front.close()


def _slowed(new_batch: Any, delay: float) -> Any:
    """Every decode step takes `delay` longer: a stream is still running when a test kills it."""

    def make() -> Any:
        kv = new_batch()
        step = kv.step

        def slow(*a: Any, **k: Any) -> Any:
            time.sleep(delay)
            return step(*a, **k)

        kv.step = slow
        return kv

    return make


if __name__ == "__main__":
    _replica_main()
