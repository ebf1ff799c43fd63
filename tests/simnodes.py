"""Simulated nodes: one real OpenSSH server per loopback address (127.0.0.2, 127.0.0.3, ...).

Everything lives in a throw-away directory: host key, user key, known_hosts, ssh_config (with an
alias `nodeI` per node) and a HOME that points at them. Used by the test suite and the benchmarks.

The nodes do not depend on the machine's shell start-up files: sshd runs every command through the
login's shell, and a user's ~/.bashrc (pyenv, conda, ...) can be slow, print, or wait on a lock a
killed session left behind. As root the nodes are reached as `dslaunch-sim`, a second name for
uid 0 (same file permissions) whose shell is /bin/sh and whose home is an empty directory of its
own; otherwise as the current user, with sshd setting SHLVL=1 so that bash skips ~/.bashrc.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import pwd
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.netns import NodeNetwork

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# What the nodes' sshd sets in every session (SetEnv): SHLVL (see _config); OpenMP threads that
# wait without spinning, since the nodes' ranks share this machine's cores (tests/conftest.py)
SESSION_ENV = {"SHLVL": "1", "OMP_WAIT_POLICY": "PASSIVE"}

# The login the nodes are reached as when the tests run as root. sshd takes HOME and the shell
# from the passwd entry, so the home is one fixed directory; nothing needs to be in it (keys are
# given by IdentityFile and AuthorizedKeysFile, the job's files go to --work-dir).
SIM_USER = "dslaunch-sim"
SIM_HOME = Path("/var/lib/dslaunch-sim")
SIM_SHELL = "/bin/sh"


def sshd_available() -> bool:
    return Path(SSHD).exists() and shutil.which("ssh-keygen") is not None


def _sim_user_ok(name: str) -> bool:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return False
    return (pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell) == (0, 0, str(SIM_HOME), SIM_SHELL)


def sim_login() -> tuple[str, Path]:
    """The user the nodes are reached as, and the HOME its commands get there.

    As root: `SIM_USER` (uid 0, gid 0, /bin/sh, `SIM_HOME`), created or corrected here when needed.
    Otherwise, or without useradd: the current user and their own home.
    """
    if os.geteuid() != 0 or not (shutil.which("useradd") and shutil.which("usermod")):
        return getpass.getuser(), Path(pwd.getpwuid(os.getuid()).pw_dir)
    SIM_HOME.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(SIM_HOME.parent / f".{SIM_USER}.lock", "w") as lock:  # several test processes at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _sim_user_ok(SIM_USER):
            # -o: a second name for uid 0; -p '*': no password, but not locked ('!'), which sshd
            # without PAM would refuse even for a key.
            flags = ["-o", "-u", "0", "-g", "0", "-d", str(SIM_HOME), "-s", SIM_SHELL, "-p", "*", SIM_USER]
            try:
                pwd.getpwnam(SIM_USER)
                subprocess.run(["usermod", *flags], check=True, capture_output=True)
            except KeyError:
                subprocess.run(["useradd", "-M", *flags], check=True, capture_output=True)
    if not _sim_user_ok(SIM_USER):
        raise RuntimeError(f"could not set up the login {SIM_USER!r} for the simulated nodes")
    return SIM_USER, SIM_HOME


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def node_port(addrs: list[str]) -> int:
    """A port free on every node address, outside the kernel's ephemeral range when it can be.

    A node's sshd gives its port up when a test stops or cuts the node; an ephemeral port could be
    handed meanwhile to any process's `bind(0)` or `connect` on the machine (a rank's store, a
    client), and the node (or a test's stand-in listener) could then not take it back. Above that
    range where it has room: below it is where pre-flight picks a job's rendezvous and master ports
    (`node/probe.py:_stable_port`), which a port a test gave up for a moment must not be.
    """
    lo, hi = _ephemeral_ports()
    ranges = [r for r in ((hi + 1, 65536),) if r[1] - r[0] > 1000] or [r for r in ((20000, lo),) if r[1] - r[0] > 1000]
    rng = random.SystemRandom()
    for _ in range(200 if ranges else 0):
        port = rng.randrange(*rng.choice(ranges))
        try:
            for addr in addrs:
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    return free_port()


def _listening(addr: str, port: int, pid: int | None = None) -> bool:
    """Whether a TCP socket listens on addr:port, read from /proc/net/tcp.

    Connecting to find out would leave sshd a connection to serve: the child it forks for it holds
    addr:port until it has given up on that client, and a test that stops the node and binds the
    port itself (a silent host) would find it taken.
    """
    try:  # a process's own view: its network namespace's sockets
        rows = Path(f"/proc/{pid}/net/tcp" if pid else "/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        with contextlib.suppress(OSError), socket.create_connection((addr, port), timeout=0.5):
            return True
        return False
    # the kernel prints the address as a native-endian 32-bit number, the port big-endian
    local = f"{struct.unpack('=I', socket.inet_aton(addr))[0]:08X}:{port:04X}"
    return any(len(f := row.split()) > 3 and f[1] == local and f[3] == "0A" for row in rows)  # 0A: LISTEN


def _wait_listening(addr: str, port: int, pid: int | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(addr, port, pid):
            return
        time.sleep(0.05)
    raise RuntimeError(f"sshd on {addr}:{port} did not start")


def _descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(b")", 1)[-1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


@dataclass
class SimNode:
    alias: str
    addr: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    private_dirs: list[str] = field(default_factory=list)


class SimCluster:
    """N nodes, each an sshd on its own 127.0.0.x address; `stop()` ends every one of them."""

    def __init__(
        self, root: Path, n: int, first_ip: int = 2, private_dirs: dict[int, list[str]] | None = None,
        private_sizes: dict[str, str] | None = None, netns: bool = False,
    ) -> None:  # fmt: skip
        """`private_dirs`: per node index, directories that node sees as its own empty tmpfs;
        `private_sizes`: a tmpfs size (`size=` of mount, e.g. "2m") per such directory; `netns`:
        each node in a network namespace of its own (`tests/netns.py`, made by `start`), where
        `self.network` can partition or silence it."""
        self.root = root
        self.private_sizes = private_sizes or {}
        self.home = root / "home"
        self.ssh_dir = self.home / ".ssh"
        self.etc = root / "sshd"
        self.user, self.node_home = sim_login()  # who the nodes run commands as, and their HOME
        self.n, self.netns = n, netns
        self.network: NodeNetwork | None = None
        addrs = [f"127.0.0.{first_ip + i}" for i in range(n)]
        port = 22 if netns else node_port(addrs)  # a namespace has every port to itself
        dirs = private_dirs or {}
        self.nodes = [SimNode(f"node{i}", a, port, private_dirs=dirs.get(i, [])) for i, a in enumerate(addrs)]

    # -- set-up ------------------------------------------------------------------------------
    def start(self) -> SimCluster:
        if self.netns:
            self.network = NodeNetwork(self.n)
            for node, addr in zip(self.nodes, self.network.addrs, strict=True):
                node.addr = addr
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.ssh_dir.mkdir(parents=True, mode=0o700)
        self.etc.mkdir(mode=0o700)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
        self._keygen(self.etc / "host_ed25519")
        self._keygen(self.ssh_dir / "id_ed25519")
        (self.etc / "authorized_keys").write_text((self.ssh_dir / "id_ed25519.pub").read_text())
        os.chmod(self.etc / "authorized_keys", 0o600)
        host_pub = (self.etc / "host_ed25519.pub").read_text().split()
        # OpenSSH and paramiko name a host on port 22 without brackets and port
        names = [n.addr if n.port == 22 else f"[{n.addr}]:{n.port}" for n in self.nodes]
        (self.ssh_dir / "known_hosts").write_text("".join(f"{h} {host_pub[0]} {host_pub[1]}\n" for h in names))
        (self.ssh_dir / "config").write_text(
            "".join(
                f"Host {n.alias}\n  HostName {n.addr}\n  Port {n.port}\n  User {self.user}\n"
                f"  IdentityFile {self.ssh_dir / 'id_ed25519'}\n"
                for n in self.nodes
            )
        )
        for n in self.nodes:
            self.start_node(n)

    def _keygen(self, path: Path) -> None:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)

    def _config(self, n: SimNode) -> Path:
        conf = self.etc / f"sshd_{n.alias}.conf"
        conf.write_text(
            f"ListenAddress {n.addr}:{n.port}\n"
            f"HostKey {self.etc / 'host_ed25519'}\n"
            f"PidFile {self.etc / f'{n.alias}.pid'}\n"
            f"AuthorizedKeysFile {self.etc / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nMaxSessions 64\nMaxStartups 64\n"
            "LogLevel ERROR\nPrintMotd no\nAcceptEnv none\n"
            # no ~/.ssh/rc; and bash (when it is the login's shell) reads ~/.bashrc for a command
            # from sshd only at SHLVL < 2: it counts this 1 up to 2
            "PermitUserRC no\nPermitUserEnvironment no\n"
            f"SetEnv {' '.join(f'{k}={v}' for k, v in SESSION_ENV.items())}\n"
            "Subsystem sftp internal-sftp\n"  # `dslaunch sync` copies over SFTP, as a stock sshd allows
        )
        return conf

    def start_node(self, n: SimNode) -> None:
        """Start (or restart) one node's sshd; private dirs get a tmpfs in its own mount namespace."""
        argv = [SSHD, "-D", "-e", "-f", str(self._config(n))]
        if n.private_dirs:
            mounts = " && ".join(
                f"mount -t tmpfs -o size={self.private_sizes.get(d, '50%')} dslaunch-private {shlex.quote(d)}"
                for d in n.private_dirs
            )
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *argv]
        if self.network is not None:
            argv = self.network.exec_prefix(self.nodes.index(n)) + argv
        log = open(self.etc / f"{n.alias}.log", "ab")  # noqa: SIM115 - owned by the child
        n.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        log.close()
        _wait_listening(n.addr, n.port, n.proc.pid if self.network else None)

    def stop_node(self, n: SimNode) -> None:
        if n.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(n.proc.pid, signal.SIGTERM)
        try:
            n.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(n.proc.pid, signal.SIGKILL)
            n.proc.wait()
        n.proc = None

    def cut_node(self, n: SimNode) -> None:
        """The node drops off the network: its sshd and every session it serves die at once.

        `stop_node` only stops the listener; sessions already open would keep working (sshd's
        per-connection processes run in their own sessions). Processes the node started detached
        (the job's agent) are not sessions and keep running, as on a partitioned machine.
        """
        if n.proc is None:
            return
        doomed = _descendants(n.proc.pid)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        n.proc.wait()
        n.proc = None

    def stop(self) -> None:
        """Every node's sshd and every session it still serves (a session whose client vanished,
        as on a silenced node, would wait hours for its TCP to give up); with `netns`, the
        namespaces too (stop the job's processes first)."""
        for n in self.nodes:
            self.cut_node(n)
        if self.network is not None:
            self.network.close()
            self.network = None

    # -- what tests use ----------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a dslaunch process that should see these nodes."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SSH_AUTH_SOCK", "DSLAUNCH_"))}
        env.update(HOME=str(self.home), DSLAUNCH_HOME=str(self.root / "dshome"), COLUMNS="200")
        env.update(extra)
        return env

    def hostfile(self, slots: int = 2, nodes: list[SimNode] | None = None, extra: str = "") -> Path:
        path = self.root / f"hosts-{len(nodes or self.nodes)}x{slots}"
        path.write_text("".join(f"{n.alias} slots={slots}\n" for n in nodes or self.nodes) + extra)
        return path


def environ_of(pid: int) -> dict[str, str]:
    """A process's environment ({} once it is gone or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_text(errors="replace")
    except OSError:
        return {}
    return dict(kv.partition("=")[::2] for kv in raw.split("\0"))


def node_job_pids(job_id: str, addr: str) -> list[int]:
    """The live processes of a job that simulated node `addr` started (their SSH_CONNECTION names
    it), zombies left out."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        env = environ_of(int(entry.name))
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        conn = env.get("SSH_CONNECTION", "").split()
        if env.get("DSLAUNCH_JOB_ID") == job_id and len(conn) == 4 and conn[2] == addr and ") Z" not in stat:
            out.append(int(entry.name))
    return out
