"""Starting the torchrun agent detached, and stopping every process of the job on this node."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from dslaunch.errors import NodeOpError
from dslaunch.node.logs import tail
from dslaunch.node.probe import port_free
from dslaunch.node.procs import is_job_process, job_processes, signal_all, wait_gone
from dslaunch.wire.envscrub import without_own
from dslaunch.wire.jsonio import read_json, write_json_atomic
from dslaunch.wire.nodedir import NodeDir
from dslaunch.wire.rankenv import AUTO_THREADS_ENV, EXPAND_ENV, LAUNCH_DIR_ENV, NODE_DIR_ENV
from dslaunch.wire.safedir import make_private, shared_parent_reason, unsafe_reason

# The agent runs under a tiny shell that records its exit status: the agent is detached
# (own session, survives the SSH session), so nobody else would ever see it.
START_FILE = "start.json"
_AGENT_WRAPPER = '"$@"; rc=$?; echo $rc > "$0.tmp" && mv "$0.tmp" "$0"'


def op_start(args: dict[str, Any]) -> dict[str, Any]:
    """Start the torchrun agent detached (own session), logs to the node directory."""
    nd = NodeDir.at(args["node_dir"])
    ndir = nd.root
    jid, node_rank = args["job_id"], args["node_rank"]
    if job_processes(jid, node_rank):
        raise NodeOpError(f"job {jid} is already running on this node")
    for label, port in (args.get("free_ports") or {}).items():
        # pre-flight found these free, but anything may have taken them since: say so now rather
        # than let every restart fail on the same bind
        if not port_free(int(port)):
            raise NodeOpError(f"{label} {port} was taken after pre-flight; run 'up' again to pick free ports")
    _make_dirs(nd)
    with contextlib.suppress(FileNotFoundError):
        nd.agent_exit.unlink()
    # Not the caller's DSLAUNCH_* variables (DSLAUNCH_TOKEN above all): the job's come from the plan.
    env, cwd = job_env(without_own(os.environ), args["env"])
    env[NODE_DIR_ENV] = str(ndir)
    for name, text in (args.get("files") or {}).items():
        # secrets (the front's token) arrive on stdin and are written 0600, never in argv or env
        fd = os.open(ndir / Path(name).name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    if env.pop(AUTO_THREADS_ENV, None) == "1" and "OMP_NUM_THREADS" not in args["env"]:
        # torchrun pins every rank to one thread when several share a node; divide the cores.
        nprocs = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nprocs))
    # The plan cannot know how `~` expands here: it writes {node_dir} and we fill it in.
    argv = [a.replace("{node_dir}", str(ndir)) for a in args["argv"]]
    if args.get("foreground"):
        _exec_agent(nd, args, argv, env, cwd)  # never returns
    log = os.fdopen(os.open(nd.agent_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "ab")
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _AGENT_WRAPPER, str(nd.agent_exit), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd or str(ndir),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as e:
        raise NodeOpError(f"cannot start the agent: {e.strerror}") from None
    finally:
        log.close()
    nd.agent_pid.write_text(str(proc.pid))
    # what `restart` needs to start it again (the secrets stay in their own 0600 files)
    write_json_atomic(nd.root / START_FILE, {k: v for k, v in args.items() if k not in ("files", "free_ports")})
    # A missing interpreter or a bad flag fails at once: report it instead of a silent wait.
    time.sleep(float(args.get("settle", 0.3)))
    if proc.poll() is not None:
        raise NodeOpError("the agent exited at once", log=tail(nd.agent_log, 15))
    return {"pid": proc.pid, "launch_dir": cwd}


def _exec_agent(nd: NodeDir, args: dict[str, Any], argv: list[str], env: dict[str, str], cwd: str | None) -> None:
    """Become the agent (its wrapper) in this very process: the launcher made this process its own
    unit (a Slurm job step), which lives exactly as long as the agent. The answer goes out first."""
    import json
    import sys

    pid = os.getpid()
    with contextlib.suppress(OSError):
        os.setsid()  # a group of its own, as the detached agent has: `stop` signals the group
    nd.agent_pid.write_text(str(pid))
    write_json_atomic(nd.root / START_FILE, {k: v for k, v in args.items() if k not in ("files", "free_ports")})
    sys.stdout.write(json.dumps({"pid": pid, "launch_dir": cwd}) + "\n")
    sys.stdout.flush()
    log = os.open(nd.agent_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(cwd or str(nd.root))
    os.execve("/bin/sh", ["/bin/sh", "-c", _AGENT_WRAPPER, str(nd.agent_exit), *argv], env)


_VAR_RE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_vars(value: str, scope: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` as a shell expands them in an assignment (unset: empty); nothing runs."""
    return _VAR_RE.sub(lambda m: scope.get(m.group(1) or m.group(2), ""), value)


def job_env(node_env: dict[str, str], user: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The agent's environment and working directory: the node's, then the plan's.

    Values DeepSpeed would export through the node's shell (`PATH=/opt/bin:$PATH` in
    `.deepspeed_env`) are expanded against the node's own variables, in order. The launch
    directory, when it exists here, is the working directory and first on PYTHONPATH, as with
    DeepSpeed's launcher; the returned directory is None when it does not.
    """
    user = dict(user)
    expand = [k for k in user.pop(EXPAND_ENV, "").split(",") if k in user]
    launch_dir = user.pop(LAUNCH_DIR_ENV, None)
    scope = {**node_env, **{k: v for k, v in user.items() if k not in expand}}
    for k in expand:
        user[k] = scope[k] = expand_vars(user[k], scope)
    env = {**node_env, **user}
    if launch_dir and os.path.isdir(launch_dir):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (launch_dir, env.get("PYTHONPATH")) if p)
        return env, launch_dir
    return env, None


def _make_dirs(nd: NodeDir) -> None:
    """Create the job's directories 0700, refusing any that another user owns or may write into.

    `down` removes them with rmtree and the agent runs in them: nobody else may place or swap
    anything there.
    """
    work = nd.work_dir
    try:
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise NodeOpError(f"cannot create the work directory {work}: {e.strerror}") from None
    why = shared_parent_reason(work)
    if why:
        raise NodeOpError(f"work directory {work} {why}; fix that or pick another --work-dir")
    for d in (nd.root.parent, nd.root, nd.ranks, nd.logs, nd.elastic):
        why = make_private(d)
        if why:
            raise NodeOpError(f"{d} {why}; refusing to run a job in it")


def agent_state(nd: NodeDir, jid: str, node_rank: int | str) -> dict[str, Any]:
    """The agent's pid, whether it runs, and its exit code once its wrapper recorded one.

    `alive` only when that pid still carries the job's marker: after a reboot the recorded pid
    may belong to anything.
    """
    pid_s = nd.agent_pid.read_text().strip() if nd.agent_pid.exists() else ""
    pid = int(pid_s) if pid_s.isdigit() else None
    exit_s = nd.agent_exit.read_text().strip() if nd.agent_exit.exists() else ""
    return {
        "pid": pid,
        "alive": bool(pid and is_job_process(pid, jid, node_rank)),
        "exit_code": int(exit_s) if exit_s.lstrip("-").isdigit() else None,
    }


def op_restart(args: dict[str, Any]) -> dict[str, Any]:
    """Stop this unit's processes and start its agent again as it was started (a rolling restart).

    The directory, its logs and its secrets stay; the agent's restart budget starts afresh. With
    `hold` (and for an agent its launcher starts, a Slurm step), nothing is started: the answer's
    `start_again` is what the launcher starts once every agent of the replica has stopped.
    """
    nd = NodeDir.at(args["node_dir"])
    saved = read_json(nd.root / START_FILE)
    if saved is None:
        raise NodeOpError(f"{nd.root} has no record of how the agent was started; cannot restart it")
    stopped = _stop_processes(nd, args["job_id"], args["node_rank"], float(args.get("grace", 10.0)))
    if stopped["survivors"]:
        raise NodeOpError(f"processes {stopped['survivors']} did not stop; not starting again", **stopped)
    # a new agent counts attempts from 0 in its new store: the ranks' memory of the old count, and
    # their old status files, would make them wait for an attempt that never comes (and an old
    # renewal would put off their back-off)
    for f in [*nd.ranks.glob("rank*.attempt"), *nd.ranks.glob("rank*.json"), *nd.ranks.glob("rank*.renewed")]:
        with contextlib.suppress(OSError):
            f.unlink()
    if saved.get("foreground") or args.get("hold"):
        # its launcher starts it (for a Slurm step this op's process could not become it anyway)
        return {"stopped": stopped, "start_again": {k: v for k, v in saved.items() if k != "foreground"}}
    return {**op_start(saved), "stopped": stopped}


def op_drain(args: dict[str, Any]) -> dict[str, Any]:
    """Tell the router which replicas get no new work (a JSON list in its directory)."""
    nd = NodeDir.at(args["node_dir"])
    if not nd.root.is_dir():
        raise NodeOpError(f"{nd.root}: the router's directory is missing")
    write_json_atomic(nd.drain, [int(r) for r in args.get("replicas", [])])
    return {"drain": args.get("replicas", [])}


def op_stop(args: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM the agent's group, then stragglers, SIGKILL at the deadline; verify, then clean up."""
    nd = NodeDir.at(args["node_dir"])
    out = _stop_processes(nd, args["job_id"], args["node_rank"], float(args.get("grace", 10.0)))
    if not out["survivors"]:
        out["removed"] = _remove_run_files(nd, bool(args.get("keep_logs")), args.get("rdzv_glob"))
    return out


def _stop_processes(nd: NodeDir, jid: str, node_rank: int | str, grace: float) -> dict[str, Any]:
    ndir = nd.root
    found = job_processes(jid, node_rank)
    agent = agent_state(nd, jid, node_rank) if ndir.is_dir() else {"pid": None, "alive": False}
    start = time.monotonic()
    if agent["alive"]:  # a process group led by a process of this job, never a reused pid's
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(agent["pid"], signal.SIGTERM)
    # Give the agent half the grace to stop its workers itself (it forwards the signal).
    left = wait_gone(jid, node_rank, start + (grace / 2 if agent["alive"] else 0))
    signal_all(left, signal.SIGTERM)
    left = wait_gone(jid, node_rank, start + grace)
    killed = list(left)
    signal_all(left, signal.SIGKILL)
    left = wait_gone(jid, node_rank, time.monotonic() + 5)
    return {"found": len(found), "killed": len(killed), "survivors": left}


def _remove_run_files(nd: NodeDir, keep_logs: bool, rdzv_glob: str | None) -> bool:
    if rdzv_glob:
        for p in glob.glob(rdzv_glob):
            with contextlib.suppress(OSError):
                os.unlink(p)
    ndir = nd.root
    if not os.path.lexists(ndir):
        return False
    for d in (ndir.parent, ndir):
        why = unsafe_reason(d)
        if why:
            # every process is gone already; only the removal is refused
            raise NodeOpError(f"the job's processes are stopped, but {d} {why}: not removing it, check it by hand")
    if keep_logs:
        for child in ndir.iterdir():
            if child.name not in ("logs", nd.agent_log.name, "elastic"):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(ndir, ignore_errors=True)
        with contextlib.suppress(OSError):
            ndir.parent.rmdir()  # the job directory, once every node sharing it is gone
    return True
