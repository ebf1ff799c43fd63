"""The simulated nodes themselves: a command run there does not go through the machine's shell
start-up files (a slow or stuck ~/.bashrc must not slow or stall the SSH tests)."""

from __future__ import annotations

import os
import pwd
import shlex
from pathlib import Path

import pytest

from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.ssh import SSHTransport
from dslaunch.wire.hosts import Node
from tests.simnodes import SESSION_ENV, SIM_SHELL, SIM_USER, SimCluster

pytestmark = pytest.mark.ssh

# What sshd itself puts in a command's environment (without PAM), and what the shell adds.
SSHD_ENV = {"HOME", "LOGNAME", "USER", "MAIL", "PATH", "SHELL", "SSH_CLIENT", "SSH_CONNECTION", "TZ", *SESSION_ENV}
SHELL_ENV = {"PWD", "OLDPWD", "SHLVL", "_"}
RC_FILES = [".profile", ".shrc", ".bashrc", ".bash_profile", ".bash_login", ".kshrc", ".zshenv", ".ssh/rc"]


def _run(sim: SimCluster, monkeypatch: pytest.MonkeyPatch, command: str) -> str:
    """Run a command line on node0 over dslaunch's own SSH connection; the login shell reads it."""
    monkeypatch.setenv("HOME", str(sim.home))  # the launch side's ~/.ssh: keys, known_hosts
    t = SSHTransport(Node(sim.nodes[0].alias, 1), ConnectOptions(connect_timeout=10, command_timeout=30))
    try:
        _, stdout, stderr = t.client().exec_command(command, timeout=30)
        out, err = stdout.read().decode(), stderr.read().decode()
        assert stdout.channel.recv_exit_status() == 0, err
    finally:
        t.close()
    return out


def _env(out: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_a_remote_command_runs_without_the_machines_shell_start_up_files(
    sim: SimCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    me = pwd.getpwuid(os.getuid())
    root = os.geteuid() == 0 and sim.user == SIM_USER
    if not root and Path(me.pw_shell).name not in ("sh", "dash", "bash"):
        pytest.skip(f"not root and the login shell is {me.pw_shell}: only bash's ~/.bashrc is kept out")
    planted: list[Path] = []  # files and directories, removed afterwards (deepest first)
    if root:  # the home is the suite's own: plant start-up files that would leave a trace if run
        for name in RC_FILES:
            rc = sim.node_home / name
            if not rc.parent.exists():
                rc.parent.mkdir(mode=0o700)
                planted.append(rc.parent)
            ran = tmp_path / f"ran{name.replace('/', '_')}"
            rc.write_text(f"export DSLAUNCH_RC_MARKER={name}\ntouch {shlex.quote(str(ran))}\n")
            planted.append(rc)
    try:
        # $0: the login shell sshd ran the command line through
        out = _run(sim, monkeypatch, 'echo "$0"; id -u; env')
    finally:
        for path in reversed(planted):
            path.rmdir() if path.is_dir() else path.unlink()
    lines = out.splitlines()
    env = _env("\n".join(lines[2:]))
    assert "DSLAUNCH_RC_MARKER" not in env, f"{env['DSLAUNCH_RC_MARKER']} was run"
    assert not list(tmp_path.glob("ran*")), "a start-up file was run"
    assert set(env) <= SSHD_ENV | SHELL_ENV, f"set by a start-up file: {sorted(set(env) - SSHD_ENV - SHELL_ENV)}"
    assert not any(p.startswith(me.pw_dir + "/") for p in env["PATH"].split(":")), env["PATH"]
    assert env["USER"] == sim.user and env["HOME"] == str(sim.node_home)
    assert lines[1] == str(os.getuid()), "the same uid as the tests: the same file permissions"
    if root:
        assert lines[0] == Path(SIM_SHELL).name and env["SHELL"] == SIM_SHELL, lines[0]
        assert env["HOME"] != me.pw_dir, "not the machine's own home (and its start-up files)"
