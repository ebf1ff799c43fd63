"""A real Slurm on this machine: munged, slurmctld and two slurmd (one per simulated node), on loopback.

Everything lives under one throw-away directory: the munge key and socket, slurm.conf, the state
and spool directories, the daemons' logs. Clients find it through `SLURM_CONF` (`env()`), so
nothing in /etc is used or changed and several clusters (one per test module and xdist worker)
run side by side. Debian's slurm-wlm and munge must be installed (`make slurm` does that as root).

Two slurmd run on one machine as nodes `sN1` and `sN2` (`NodeHostname` this machine, a port
each), which Debian's build allows: `slurmd -N NAME`. The daemons run as root; they are ended by
pid in `stop()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.simnodes import node_port

MUNGED = shutil.which("munged") or "/usr/sbin/munged"
SLURMCTLD = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd") or "/usr/sbin/slurmd"


def slurm_available() -> str | None:
    """None when a Slurm can be started here, else why not."""
    if os.geteuid() != 0:
        return "the Slurm tests start slurmd, which needs root"
    missing = [p for p in (MUNGED, SLURMCTLD, SLURMD) if not Path(p).exists()]
    missing += [c for c in ("srun", "salloc", "scontrol", "squeue", "scancel", "sbatch") if not shutil.which(c)]
    return f"missing {', '.join(missing)} (make slurm installs slurm-wlm and munge)" if missing else None


@dataclass
class SlurmSim:
    root: Path
    nodes: list[str]
    cpus: int = 2
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ctld_port: int = 0
    partition: str = "debug"

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose Slurm commands talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for k in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
            del env[k]
        return env

    def start(self) -> SlurmSim:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        sock = r / "munge" / "munge.socket"
        self._spawn([MUNGED, "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                     f"--pid-file={r / 'munge' / 'munged.pid'}", f"--seed-file={r / 'munge' / 'seed'}",
                     f"--log-file={r / 'log' / 'munged.log'}"])  # fmt: skip
        _wait(lambda: sock.exists(), 20, "munged did not create its socket")
        host = socket.gethostname().split(".")[0]
        ports = [node_port(["127.0.0.1"]) for _ in range(len(self.nodes) + 1)]
        self.ctld_port = ports[0]
        lines = [
            "ClusterName=dsl", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={self.ctld_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            "SlurmUser=root", "SlurmdUser=root", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'spool'}/slurmd-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0", "MinJobAge=2", "KillWait=2",
            "MessageTimeout=20", "TreeWidth=65533", "LaunchParameters=enable_nss_slurm",
        ]  # fmt: skip
        for name, port in zip(self.nodes, ports[1:], strict=True):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                         "RealMemory=1000 State=UNKNOWN")  # fmt: skip
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE "
                     "State=UP OverSubscribe=YES")  # fmt: skip
        self.conf.write_text("\n".join(lines) + "\n")
        env = self.env()
        self._spawn([SLURMCTLD, "-D", "-i", "-f", str(self.conf)], env)
        for name in self.nodes:
            (r / "spool" / name).mkdir(exist_ok=True)
            self._spawn([SLURMD, "-D", "-N", name, "-f", str(self.conf)], env)
        _wait(self._nodes_idle, 60, f"the Slurm nodes did not come up; see {r / 'log'}")
        return self

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env())
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a Slurm daemon exited ({p.args}); see {self.root / 'log'}")
        return len(states) == len(self.nodes) and all(s.startswith(("idle", "mix", "alloc")) for s in states.values())

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / "log" / f"{Path(argv[0]).name}-{len(self.procs)}.out", "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env, start_new_session=True))  # fmt: skip
        log.close()

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env(), check=check, timeout=timeout)

    def steps(self, job: str) -> list[str]:
        """The job's running steps as `squeue -s` lists them (id and name)."""
        out = self.run("squeue", "-h", "-s", "-j", job, "-o", "%i %j", check=False)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        """End the daemons (their own process groups), slurmd first, by pid."""
        for p in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise RuntimeError(what)


@dataclass
class Allocation:
    """A real `salloc` holding nodes, whose shell waits; `env` is the environment salloc gave it."""

    sim: SlurmSim
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    hold: Path  # the shell runs while this file exists

    @property
    def job(self) -> str:
        return self.env["SLURM_JOB_ID"]

    def release(self) -> None:
        """End salloc's shell: salloc then gives the allocation back, ending whatever still runs in it."""
        self.hold.unlink(missing_ok=True)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _wait(lambda: not self.sim.run("squeue", "-h", "-j", self.job, check=False).stdout.strip(), 30,
              f"Slurm job {self.job} did not end")  # fmt: skip


def allocate(sim: SlurmSim, tmp: Path, *args: str) -> Allocation:
    """`salloc ARGS sh -c 'env > FILE; wait'`: the allocation lives until `release()`."""
    envfile, hold = tmp / "salloc.env", tmp / "salloc.hold"
    envfile.unlink(missing_ok=True)
    hold.touch()
    cmd = f"env -0 > {envfile}.tmp && mv {envfile}.tmp {envfile} && while [ -e {hold} ]; do sleep 0.2; done"
    proc = subprocess.Popen(["salloc", *args, "sh", "-c", cmd], env=sim.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    _wait(lambda: envfile.exists() or proc.poll() is not None, 60, "salloc did not start its shell")
    if proc.poll() is not None:
        raise RuntimeError(f"salloc {' '.join(args)} failed (exit {proc.returncode})")
    env = dict(kv.split("=", 1) for kv in envfile.read_text().split("\0") if "=" in kv)
    return Allocation(sim, proc, env, hold)
