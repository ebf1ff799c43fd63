"""From a login node, with no allocation: submit one, wait until Slurm runs it, and use it.

`up --launcher slurm --num-nodes N` outside an allocation submits a holder job (`sbatch --wrap
'sleep infinity'`, named `dslaunch-<name>`), shows while Slurm keeps it pending and why (squeue's
reason), and once it runs goes on as inside `salloc`, with the environment Slurm would have given
a batch script. The job is the job's: `down` (or a failed `up`, or Ctrl-C) cancels it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from dslaunch.errors import UserError
from dslaunch.transport.slurm import hostnames, slurm


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


def submit_and_wait(
    name: str, num_nodes: int | None, num_gpus: int | None, partition: str | None, time_limit: str | None,
    account: str | None, say: Callable[[str], None],
) -> dict[str, str]:  # fmt: skip
    """Submit, then wait until it runs; Ctrl-C (or any failure) while it waits cancels it."""
    job = submit(name, num_nodes, num_gpus, partition, time_limit, account)
    say(f"submitted Slurm job {job}")
    try:
        return wait_running(job, say)
    except BaseException:
        cancel(job)
        say(f"cancelled Slurm job {job}")
        raise
