"""From a login node, with no allocation: submit one, wait until Slurm runs it, and use it.

`up --launcher slurm --num-nodes N` outside an allocation submits a holder job (`sbatch --wrap
'sleep infinity'`, named `dslaunch-<name>`), shows while Slurm keeps it pending and why (squeue's
reason), and once it runs goes on as inside `salloc`, with the environment Slurm would have given
a batch script. The job is the job's: `down` (or a failed `up`, or Ctrl-C) cancels it. While it
pends there is no job record yet; a pending mark (`<name>.pending`) lets `status` and `down` find it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

from dslaunch.errors import UserError
from dslaunch.launch import store
from dslaunch.transport.slurm import hostnames, slurm
from dslaunch.wire.states import JobState


def submit(
    name: str,
    num_nodes: int | None,
    num_gpus: int | None,
    partition: str | None = None,
    time_limit: str | None = None,
    account: str | None = None,
) -> str:
    """Submit the holder job; its id. Slurm's refusal (partition, account, limits) is one line."""
    argv = ["sbatch", "--parsable", f"--job-name=dslaunch-{name}", f"--nodes={num_nodes or 1}",
            f"--ntasks-per-node={num_gpus or 1}", "--output=/dev/null"]  # fmt: skip
    if num_gpus:
        argv.append(f"--gpus-per-node={num_gpus}")
    for flag, value in (("--partition", partition), ("--time", time_limit), ("--account", account)):
        if value:
            argv.append(f"{flag}={value}")
    return slurm([*argv, "--wrap", "exec sleep infinity"]).strip().split(";")[0]


def wait_running(job: str, say: Callable[[str], None], poll_s: float = 1.0) -> dict[str, str]:
    """Wait while Slurm keeps the job pending (saying why, when that changes); then the job's
    environment as a batch script would see it (id, node list, tasks per node)."""
    last = ""
    while True:
        out = slurm(["squeue", "-h", "-j", job, "-o", "%T|%r|%N"]).strip()
        if not out:
            raise UserError(f"squeue: Slurm job {job} ended before it ran (see 'sacct -j {job}')")
        state, reason, nodelist = (out.splitlines()[0].split("|") + [""] * 3)[:3]
        if state == "RUNNING":
            per_node = _tasks_per_node(job)
            return {"SLURM_JOB_ID": job, "SLURM_JOB_NODELIST": nodelist,
                    "SLURM_TASKS_PER_NODE": f"{per_node}(x{len(hostnames(nodelist))})"}  # fmt: skip
        now = f"Slurm job {job} {state}" + (f": {reason}" if reason and reason != "None" else "")
        if now != last:
            say(f"{now} (Ctrl-C cancels it)")
            last = now
        time.sleep(poll_s)


def _tasks_per_node(job: str) -> int:
    out = slurm(["scontrol", "show", "job", "-o", job])
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    value = fields.get("NtasksPerN(B/S/C)", "1:0:*:*").split(":")[0]
    return int(value) if value.isdigit() and int(value) > 0 else 1


def cancel(job: str) -> None:
    """Cancel the submitted job, and wait (briefly) until Slurm no longer lists it."""
    with contextlib.suppress(UserError):
        slurm(["scancel", job])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(UserError):
            if not slurm(["squeue", "-h", "-j", job, "-o", "%T"]).strip():
                return
        time.sleep(0.3)


def allocate(
    name: str, num_nodes: int | None, num_gpus: int | None, partition: str | None, time_limit: str | None,
    account: str | None, say: Callable[[str], None],
) -> dict[str, str]:  # fmt: skip
    """Submit, mark the job pending (so `status` and `down` find it before any record exists),
    then wait until it runs; Ctrl-C (or any failure) while it waits cancels it. The caller calls
    `settled` once the job's record is written, or `abandon` when what follows fails."""
    held = pending(name)
    if held and held["up_alive"]:
        raise UserError(f"job {name!r}: an 'up' (pid {held['up_pid']}) is already waiting for Slurm job "
                        f"{held['slurm_job']}; wait for it, or 'dslaunch down --name {name}'")  # fmt: skip
    if held:  # an earlier up was killed while it waited: its job is ours, and nobody will use it
        cancel(held["slurm_job"])
        say(f"cancelled Slurm job {held['slurm_job']}, left pending by an earlier 'up' that is gone")
    job = submit(name, num_nodes, num_gpus, partition, time_limit, account)
    store.save_pending(name, {"slurm_job": job, "up_pid": os.getpid(), "submitted": time.time()})
    say(f"submitted Slurm job {job}")
    try:
        return wait_running(job, say)
    except BaseException:
        abandon(name, job, say)
        raise


def settled(name: str) -> None:
    """The job's record exists now: the pending mark has done its work."""
    store.remove_pending(name)


def abandon(name: str, job: str, say: Callable[[str], None]) -> None:
    cancel(job)
    store.remove_pending(name)
    say(f"cancelled Slurm job {job}")


def pending(name: str) -> dict[str, Any] | None:
    """The job an `up` of this name submitted and waits for, as `status --json` shows it: Slurm's
    state and reason, and whether that `up` still runs. None when there is none."""
    held = store.load_pending(name)
    if not held or not str(held.get("slurm_job", "")).isdigit():
        return None
    job, pid = str(held["slurm_job"]), int(held.get("up_pid") or 0)
    try:
        out = slurm(["squeue", "-h", "-j", job, "-o", "%T|%r"]).strip()
    except UserError as e:
        out = f"UNKNOWN|{e}"
    state, _, reason = (out.splitlines()[0] if out else "GONE|").partition("|")
    return {"name": name, "state": JobState.SUBMITTED.value, "launcher": "slurm", "slurm_job": job,
            "slurm_state": state, "reason": "" if reason == "None" else reason, "up_pid": pid,
            "up_alive": _alive(pid)}  # fmt: skip


def cancel_pending(name: str) -> dict[str, Any] | None:
    """`down` of a job that has no record yet: cancel what its `up` submitted. None if nothing."""
    held = pending(name)
    if held:
        cancel(held["slurm_job"])
        store.remove_pending(name)
    return held


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
