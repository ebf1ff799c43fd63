"""Slurm as a launcher: nodectl ops and agents run as job steps of an allocation (`srun --overlap`).

- A node op is a short step on that node: `srun --overlap --jobid J --nodelist HOST -N1 -n1 python
  -m dslaunch.node.ctl OP` with its JSON on stdin. No SSH: many clusters allow none to compute nodes.
- An agent (or the router) is a step of its own that lives exactly as long as it: nodectl `start`
  in foreground mode prepares the node directory, answers, and becomes the agent. Slurm accounts
  for it and ends it with the allocation. The step's `srun` runs detached on the launch host (its
  own session), so it does not die with the shell that ran `up`.
- `down` stops the processes through nodectl as everywhere, then cancels any step of the job that
  is left (`scancel J.S`) and verifies that `squeue -s` lists none: only the job's own steps, never
  the user's allocation.

Every failing Slurm command is one line naming the command and Slurm's own message.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dslaunch.errors import NodeOpError, NodeOpFailed, RemoteError, UserError
from dslaunch.transport.base import ConnectOptions, RunResult
from dslaunch.transport.local import node_env
from dslaunch.wire.hosts import Node

if TYPE_CHECKING:
    from dslaunch.transport.nodes import NodeClient

STEP_PREFIX = "dslaunch-"
TROUBLE = ("drain", "down", "fail", "maint", "reboot", "not_responding", "unknown")  # sinfo %T words
NO_SRUN = "srun: not found (is this a Slurm cluster? the Slurm client commands must be on PATH)"


def slurm_env() -> dict[str, str]:
    """The environment of a Slurm command: the node command's, without the allocation's SLURM_*
    variables (its task counts and sizes would override the step's own flags); SLURM_CONF stays."""
    return {k: v for k, v in node_env().items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def slurm(argv: list[str], timeout: float = 60.0, stdin: str | None = None) -> str:
    """Run one Slurm command; its stdout, or a UserError naming the command and Slurm's message."""
    if shutil.which(argv[0]) is None:
        raise UserError(NO_SRUN.replace("srun", argv[0], 1))
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=slurm_env())
    except subprocess.TimeoutExpired:
        raise UserError(f"{argv[0]}: no answer within {timeout:g}s (is slurmctld reachable?)") from None
    if p.returncode != 0:
        said = _last_line(p.stderr).removeprefix(f"{argv[0]}: ").removeprefix("error: ")
        raise UserError(f"{argv[0]}: {said or f'exit status {p.returncode}'}")
    return p.stdout


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def hostnames(nodelist: str) -> list[str]:
    """A Slurm host list (`node[1-3],gpu7`) expanded by Slurm itself (`scontrol show hostnames`)."""
    return slurm(["scontrol", "show", "hostnames", nodelist]).split()


def step_argv(job: str, host: str, name: str, argv: list[str], unbound: bool = False) -> list[str]:
    """One task on one node of the allocation, sharing its resources with the job's other steps;
    `unbound`: not pinned to one CPU where the cluster binds tasks (an agent's ranks use them all)."""
    return ["srun", "--overlap", f"--jobid={job}", f"--nodelist={host}", "--nodes=1", "--ntasks=1",
            f"--job-name={name}", "--quiet", "--kill-on-bad-exit=0", *(["--cpu-bind=none"] if unbound else []),
            *argv]  # fmt: skip


class SlurmTransport:
    """Commands on one node of the allocation, each as a short step."""

    login_shell = False  # srun starts the command itself: pre-flight has no shell start-up to time

    def __init__(self, node: Node, opts: ConnectOptions, job: str) -> None:
        self.node = node
        self.opts = opts
        self.job = job
        self._addr: str | None = None
        self._streams: list[subprocess.Popen[str]] = []

    def _argv(self, argv: list[str]) -> list[str]:
        return step_argv(self.job, self.node.host, f"{STEP_PREFIX}op", argv)

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> RunResult:
        timeout = timeout or self.opts.command_timeout
        try:
            p = subprocess.run(self._argv(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
                               env=slurm_env())  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.node.host}: srun took over {timeout:g}s (--command-timeout)") from None
        except FileNotFoundError:
            raise UserError(NO_SRUN) from None
        err = p.stderr
        if p.returncode != 0 and "srun: error:" in err and not p.stdout.strip():
            raise RemoteError(f"{self.node.host}: srun: {_last_line(err).split('error:', 1)[-1].strip()}")
        return RunResult(p.returncode, p.stdout, err)

    def stream(self, argv: list[str], stdin: str = "") -> Iterator[str]:
        p = subprocess.Popen(self._argv(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=slurm_env())  # fmt: skip
        self._streams.append(p)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(stdin)
        p.stdin.close()
        try:
            yield from (line.rstrip("\n") for line in p.stdout)
        finally:
            _end(p)

    def address(self) -> str | None:
        """The node's address as Slurm knows it (NodeAddr), what the other nodes reach it at."""
        if self._addr is None:
            out = slurm(["scontrol", "show", "node", "-o", self.node.host])
            fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
            self._addr = fields.get("NodeAddr") or self.node.host
        return self._addr

    def tunnel(self, host: str, port: int) -> socket.socket:
        """A connection to HOST:PORT as seen from the node: a relay step's stdin and stdout."""
        relay = ("import os,socket,sys,threading;s=socket.create_connection((sys.argv[1],int(sys.argv[2])))\n"
                 "def up():\n while (b:=os.read(0,65536)):s.sendall(b)\n s.shutdown(1)\n"
                 "threading.Thread(target=up,daemon=True).start()\n"
                 "while (b:=s.recv(65536)):os.write(1,b)\n")  # fmt: skip
        p = subprocess.Popen(self._argv(["python3", "-u", "-c", relay, host, str(port)]), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=slurm_env(), bufsize=0)  # fmt: skip
        ours, theirs = socket.socketpair()
        threading.Thread(target=_pump_in, args=(theirs, p), daemon=True).start()
        threading.Thread(target=_pump_out, args=(theirs, p), daemon=True).start()
        return ours

    def close(self) -> None:
        for p in self._streams:
            if p.poll() is None:
                _end(p)
        self._streams.clear()


def _pump_in(sock: socket.socket, p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    with contextlib.suppress(OSError):
        while b := sock.recv(65536):
            p.stdin.write(b)
    with contextlib.suppress(OSError):
        p.stdin.close()


def _pump_out(sock: socket.socket, p: subprocess.Popen[bytes]) -> None:
    assert p.stdout is not None
    with contextlib.suppress(OSError):
        while b := p.stdout.read(65536):
            sock.sendall(b)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    p.wait()


def _end(p: subprocess.Popen[Any]) -> None:
    try:
        p.wait(timeout=2)
    except subprocess.TimeoutExpired:
        p.terminate()
        p.wait()


class SlurmLauncher:
    """Agents and the router as steps of the Slurm job `meta["job"]` (the user's allocation)."""

    name = "slurm"

    def __init__(self, meta: dict[str, str] | None = None) -> None:
        self.meta = dict(meta or {})
        if not self.meta.get("job"):
            job = os.environ.get("SLURM_JOB_ID")
            if not job:
                raise UserError("--launcher slurm: no allocation (SLURM_JOB_ID is not set); run it inside salloc "
                                "or an sbatch script")  # fmt: skip
            self.meta["job"] = job

    @property
    def job(self) -> str:
        return self.meta["job"]

    def connect(self, node: Node, opts: ConnectOptions) -> SlurmTransport:
        return SlurmTransport(node, opts, self.job)

    def step_name(self, job_id: str, unit: int) -> str:
        return f"{STEP_PREFIX}{job_id}-{unit}"

    def start(self, client: NodeClient, args: dict[str, Any]) -> dict[str, Any]:
        """The unit's own step, detached; returns nodectl's answer once it gave one."""
        host = client.node.host
        argv = step_argv(self.job, host, self.step_name(args["job_id"], args["node_rank"]), client.argv("start"),
                         unbound=True)  # fmt: skip
        fd, out_path = tempfile.mkstemp(prefix="dslaunch-step-", suffix=".out")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=fd, stderr=subprocess.STDOUT, text=True,
                                 env=slurm_env(), start_new_session=True)  # fmt: skip
        except FileNotFoundError:
            raise UserError(NO_SRUN) from None
        finally:
            os.close(fd)
        try:
            assert p.stdin is not None
            p.stdin.write(json.dumps({**args, "foreground": True}) + "\n")
            p.stdin.close()
            return self._answer(host, p, out_path, client.timeout)
        finally:
            os.unlink(out_path)

    def _answer(self, host: str, p: subprocess.Popen[str], path: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            done = p.poll() is not None
            with open(path) as f:
                text = f.read()
            for line in text.splitlines():
                if line.startswith("{"):
                    out = json.loads(line)
                    if "error" in out:
                        raise NodeOpFailed(host, str(out.pop("error")), out)
                    return out
            if done:
                if p.returncode == NodeOpError.EXIT_STATUS:
                    raise NodeOpFailed(host, "refused", {})
                raise RemoteError(f"{host}: srun: {_last_line(text).removeprefix('srun: error: ') or 'exited'}")
            if time.monotonic() > deadline:
                p.terminate()
                raise RemoteError(f"{host}: the agent's step did not start within {timeout:g}s (--command-timeout)")
            time.sleep(0.05)

    def steps(self, job_id: str | None = None) -> list[tuple[str, str]]:
        """(step id, name) of the allocation's running steps; only this dslaunch job's with `job_id`."""
        out = slurm(["squeue", "-h", "-s", "-j", self.job, "-o", "%i %j"])
        rows = [tuple(line.split(None, 1)) for line in out.splitlines() if line.strip()]
        pre = f"{STEP_PREFIX}{job_id}-" if job_id else STEP_PREFIX
        return [(r[0], r[1]) for r in rows if len(r) == 2 and r[1].startswith(pre)]

    def job_state(self) -> str:
        """The allocation's state (RUNNING, PENDING, ...), or GONE once Slurm no longer lists it."""
        try:
            out = slurm(["squeue", "-h", "-j", self.job, "-o", "%T"]).strip()
        except UserError as e:
            if "Invalid job id" in str(e):
                return "GONE"
            raise
        return out or "GONE"

    def end_of(self) -> str:
        """How Slurm ended the job, while `scontrol` still remembers it (MinJobAge), e.g.
        "NODE_FAIL, reason NodeDown"; "" once it does not."""
        try:
            out = slurm(["scontrol", "show", "job", "-o", self.job])
        except UserError:
            return ""
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        state, reason = fields.get("JobState", ""), fields.get("Reason", "None")
        return f"{state}, reason {reason}" if state and reason not in ("None", "(null)") else state

    def troubled_nodes(self) -> list[tuple[str, str]]:
        """(node, what sinfo says) for the allocation's nodes that Slurm drains, took down, or no
        longer hears from: their steps may run on, but the job cannot count on them."""
        nodes = slurm(["squeue", "-h", "-j", self.job, "-o", "%N"]).strip()
        if not nodes:
            return []
        said: dict[str, str] = {}
        for line in slurm(["sinfo", "-h", "-N", "-n", nodes, "-o", "%N|%T|%E"]).splitlines():
            name, state, reason = [*line.split("|", 2), "", ""][:3]
            if any(w in state for w in TROUBLE) or state.endswith("*"):
                said[name] = f"{state} (sinfo: {reason})" if reason.strip() not in ("", "none") else state
        return sorted(said.items())

    def describe(self) -> list[tuple[str, str]]:
        lines = [("launcher", "slurm")]
        try:
            state = self.job_state()
            steps = self.steps() if state != "GONE" else []
            troubled = self.troubled_nodes() if state != "GONE" else []
        except UserError as e:
            return [*lines, ("slurm job", f"{self.job} ({e})")]
        end = self.end_of() if state == "GONE" else ""
        lines.append(("slurm job", f"{self.job} {state}" + (f" (scontrol: {end})" if end else "")))
        lines.append(("slurm steps", ", ".join(f"{sid} {name}" for sid, name in steps) or "none"))
        lines += [(f"slurm node {name}", f"{what}: Slurm starts no new job there") for name, what in troubled]
        return lines

    def check(self) -> None:
        """The allocation must still be running: an ended one is one line, not a failure per node."""
        state = self.job_state()
        if state == "GONE":
            end = self.end_of()
            how = "the allocation ended or expired" + (f"; scontrol: {end}" if end else "")
            raise UserError(f"squeue: Slurm job {self.job} no longer exists ({how}); "
                            "start a new one (salloc) and run 'up' in it")  # fmt: skip
        if state != "RUNNING":
            raise UserError(f"squeue: Slurm job {self.job} is {state}, not RUNNING; run 'up' once it runs")

    def ended(self) -> str | None:
        if self.job_state() == "GONE":
            end = self.end_of()
            return (f"the Slurm job {self.job} had ended already" + (f" (scontrol: {end})" if end else "")
                    + ": Slurm stopped every process of it")  # fmt: skip
        return None

    def leftovers(self, job_id: str) -> list[str]:
        if self.job_state() == "GONE":
            return []
        return [f"step {sid} ({name})" for sid, name in self.steps(job_id)]

    def cleanup(self, job_id: str, timeout: float = 20.0) -> list[str]:
        """Cancel the job's steps that are left (its own only), then wait until squeue lists none."""
        if self.job_state() == "GONE":
            return []
        left = self.steps(job_id)
        for sid, _name in left:
            with contextlib.suppress(UserError):  # it may have ended in between
                slurm(["scancel", sid])
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.steps(job_id)
        out = [f"step {sid} ({name})" for sid, name in left]
        if self.meta.get("submitted"):  # `up` submitted the job for this one: it goes too
            with contextlib.suppress(UserError):
                slurm(["scancel", self.job])
            while self.job_state() != "GONE" and time.monotonic() < deadline:
                time.sleep(0.3)
            if self.job_state() != "GONE":
                out.append(f"Slurm job {self.job} (scancel did not end it)")
        return out
