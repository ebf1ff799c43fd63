"""torchrun whose ranks start warm: `python -m dslaunch.rank.torchrun <torchrun flags> -m MODULE`.

The same flags, parser, rendezvous and elastic agent as `python -m torch.distributed.run`; the
one difference is how a rank starts. torchrun executes a new interpreter per rank and attempt,
which imports torch, transformers and DeepSpeed again: most of a rank's start-up, and all of it
again on every restart of the gang. Here the agent imports them once, and each rank is forked
from it (torch elastic's `fork` start method), so a restart costs a fork and a model load.

Only where no accelerator is present: CUDA (and ROCm) cannot be used in a process forked after
the parent initialised it, and importing DeepSpeed probes the accelerator. On a node with one,
this is plain torchrun: each rank its own interpreter, as before.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import sys
from typing import Any

# what a rank imports before it can load a model: paid once per agent instead of once per attempt
WARM_IMPORTS = (
    "torch",
    "torch.distributed",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "deepspeed",
    "dslaunch.rank.worker",
    "dslaunch.rank.session",
    "dslaunch.engine.loader",
)
# the agent's own handlers (torch elastic raises on these) must not run in a rank
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def has_accelerator() -> bool:
    """A GPU device node on this machine (NVIDIA or AMD): then ranks must not be forked."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def rank_main(module: str) -> None:
    """A forked rank: the agent's signal handlers off, then the worker's entry point. Returns on
    success (torch elastic reads a return value); a failure exits with the worker's code."""
    for sig in _RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    sys.argv = [f"-m {module}"]
    # `ps` shows the rank as torchrun would have started it. Within the agent's own (longer)
    # argv only: the environment block must stay as it was, job markers and all (`down` finds
    # a job's processes by them)
    os.environ["SPT_NOENV"] = "1"
    try:
        from setproctitle import setproctitle

        setproctitle(f"{sys.executable} -u -m {module}")
    except ImportError:
        pass
    sys.stdout.reconfigure(line_buffering=True)  # as `python -u` for an executed rank
    sys.stderr.reconfigure(line_buffering=True)
    from dslaunch.rank.process import StopFlag
    from dslaunch.rank.worker import main

    code = main()
    if code:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    if StopFlag.received is not None:
        # stopped by the agent (down, a gang restart): it is closing its workers, not waiting
        # for return values; end now instead of in torch elastic's wait for the other ranks
        os._exit(0)
    # the replica ends (every rank failed the same way): torch elastic collects each rank's
    # return value, and a signal while it waits for the others ends this rank at once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _continue_before_close() -> None:
    """A stopped rank (SIGSTOP; a hung job's rank that someone paused) cannot act on SIGTERM
    until it runs again, and torch waits 30 s for it before a SIGKILL: where one rank of a gang
    failed (the spawn context's join), and where torch elastic stops the gang (a restart, `down`).
    Every worker still alive gets SIGCONT there, so a stopped one ends like the others, at once."""
    import importlib

    from torch.distributed.elastic.multiprocessing import api

    # the module: `from torch.multiprocessing import spawn` is a function of that name
    spawn = importlib.import_module("torch.multiprocessing.spawn")

    def wake(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    join = spawn.ProcessContext._join_procs_with_timeout

    def _join(self: Any, timeout: float) -> None:  # after the SIGTERM to every rank still alive
        wake([p.pid for p in self.processes if p.is_alive()])
        join(self, timeout)

    spawn.ProcessContext._join_procs_with_timeout = _join  # type: ignore[method-assign]

    def pids(ctx: Any) -> list[int]:
        if isinstance(ctx, api.MultiprocessContext):
            return [p.pid for p in (ctx._pc.processes if ctx._pc else []) if p.is_alive()]
        return [h.proc.pid for h in getattr(ctx, "subprocess_handlers", {}).values() if h.proc.poll() is None]

    for cls in (api.MultiprocessContext, api.SubprocessContext):
        close = cls._close

        def _close(self: Any, death_sig: signal.Signals, timeout: int = 30, _close: Any = close) -> None:
            wake(pids(self))
            _close(self, death_sig=death_sig, timeout=timeout)

        cls._close = _close  # type: ignore[method-assign]


def _renew_restart_budget(window_s: float) -> None:
    """torch elastic's --max-restarts is one budget for the agent's lifetime: a serving job that
    rides out a fault every few hours would still end at the fourth. Here an agent whose workers
    have run `window_s` healthy since their last (re)start gets the whole budget back, as a
    supervisor's restart intensity window does (the ranks count their back-off from there too:
    rank/worker.py). 0: torchrun's rule."""
    if window_s <= 0:
        return
    import time

    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers

    def _monitor(self: Any, worker_group: Any) -> Any:
        result = monitor(self, worker_group)
        now, since = time.monotonic(), getattr(self, "_dslaunch_healthy_since", None)
        if result.state != WorkerState.HEALTHY:
            self._dslaunch_healthy_since = None
        elif since is None:
            self._dslaunch_healthy_since = now
        elif now - since >= window_s and self._remaining_restarts < worker_group.spec.max_restarts:
            self._remaining_restarts = worker_group.spec.max_restarts
            print(f"restart budget renewed: {worker_group.spec.max_restarts} restarts again after {window_s:g}s "
                  "healthy (--restart-window)", flush=True)  # fmt: skip
        return result

    LocalElasticAgent._monitor_workers = _monitor  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    from torch.distributed import run

    from dslaunch.wire.rankenv import RESTART_WINDOW_ENV

    _continue_before_close()
    _renew_restart_budget(float(os.environ.get(RESTART_WINDOW_ENV, "0")))
    args = run.parse_args(argv if argv is not None else sys.argv[1:])
    if has_accelerator() or not args.module or args.training_script != "dslaunch.rank.worker":
        run.run(args)  # plain torchrun
        return
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    from torch.distributed.launcher.api import elastic_launch

    args.start_method = "fork"
    if args.master_port is None:  # as torchrun does (used by the static rendezvous only)
        args.master_port = 29500
    config, _cmd, _cmd_args = run.config_from_args(args)
    elastic_launch(config=config, entrypoint=rank_main)(args.training_script)


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
