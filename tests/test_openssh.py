"""Names resolve as OpenSSH resolves them (`ssh -G`, or paramiko's parser as the fallback), and
dslaunch then reaches real sshd nodes with them: Include, Match user, tokens, HostKeyAlias,
known-hosts files, StrictHostKeyChecking, /etc/ssh/ssh_config, ProxyJump and ProxyCommand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from dslaunch.errors import RemoteError
from dslaunch.transport.base import ConnectOptions
from dslaunch.transport.ssh import SSHTransport
from dslaunch.transport.sshconfig import Hop, parse_jump, resolve
from dslaunch.wire.hosts import Node
from tests import netns
from tests.simnodes import SimCluster, sshd_available

MODES = [pytest.param(True, id="ssh-G"), pytest.param(False, id="paramiko")]
HAVE_SSH = shutil.which("ssh") is not None


def _mode(openssh: bool) -> None:
    if openssh and not HAVE_SSH:
        pytest.skip("the OpenSSH client is not installed")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    (h / ".ssh" / "conf.d").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    return h


# -- resolution, without a server ------------------------------------------------------------------


@pytest.mark.parametrize("openssh", MODES)
def test_include_match_user_tokens_and_known_hosts_files(home: Path, openssh: bool) -> None:
    _mode(openssh)
    (home / ".ssh" / "conf.d" / "w.conf").write_text("Host w0\n  HostName 10.0.0.1\n  HostKeyAlias w0-key\n")
    (home / ".ssh" / "config").write_text(
        f"Include {home}/.ssh/conf.d/*.conf\n"
        "Host w0\n"
        f"  IdentityFile {home}/keys/id_%n_%r_%h_%%\n"
        f"  UserKnownHostsFile {home}/kh_%h {home}/kh_%n\n"
        "  GlobalKnownHostsFile /g/one /g/two\n"
        "Match user bob\n  Port 2222\n"
    )
    t = resolve("w0", "bob", openssh=openssh)
    assert (t.hostname, t.port, t.user, t.host_key_alias) == ("10.0.0.1", 2222, "bob", "w0-key")
    assert t.identity_files == [f"{home}/keys/id_w0_bob_10.0.0.1_%"]
    assert t.user_known_hosts == [f"{home}/kh_10.0.0.1", f"{home}/kh_w0"]
    assert t.global_known_hosts == ["/g/one", "/g/two"]
    assert t.known_hosts_name == "w0-key"
    other = resolve("w0", "alice", openssh=openssh)
    assert other.port == 22, "Match user is matched against the hostfile's user"


@pytest.mark.parametrize("openssh", MODES)
def test_defaults_live_under_home(home: Path, openssh: bool) -> None:
    _mode(openssh)
    t = resolve("plain-host", openssh=openssh)
    assert (t.hostname, t.port, t.strict) == ("plain-host", 22, "ask")
    assert t.user_known_hosts == [f"{home}/.ssh/known_hosts", f"{home}/.ssh/known_hosts2"]
    assert f"{home}/.ssh/id_ed25519" in t.identity_files
    assert t.global_known_hosts == ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2"]
    assert (
        t.known_hosts_name == "plain-host" and resolve("h", port=2200, openssh=openssh).known_hosts_name == "[h]:2200"
    )


@pytest.mark.parametrize("openssh", MODES)
def test_proxy_settings(home: Path, openssh: bool) -> None:
    _mode(openssh)
    (home / ".ssh" / "config").write_text(
        "Host direct\n  ProxyJump none\nHost jumped\n  ProxyJump u@j1:2200,ssh://j2\n"
        "Host cmd\n  ProxyCommand ssh -W %h:%p bastion\n  HostName 10.1.1.1\n"
        "Host *\n  ProxyJump default-jump\n"
    )
    assert resolve("direct", openssh=openssh).proxy_jump == []
    assert resolve("jumped", openssh=openssh).proxy_jump == [Hop("j1", "u", 2200), Hop("j2")]
    cmd = resolve("cmd", openssh=openssh)
    assert cmd.proxy_command == "ssh -W 10.1.1.1:22 bastion" and cmd.proxy_jump == []
    assert resolve("other", openssh=openssh).proxy_jump == [Hop("default-jump")]


def test_parse_jump() -> None:
    assert parse_jump("none") == parse_jump("") == []
    assert parse_jump("a,b@c:23,[::1]:2222,ssh://d@e") == [Hop("a"), Hop("c", "b", 23), Hop("::1", None, 2222),
                                                          Hop("e", "d")]  # fmt: skip
    with pytest.raises(RemoteError, match="cannot read the hop"):
        parse_jump("a:port")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
@pytest.mark.parametrize("openssh", MODES)
def test_system_ssh_config_is_read(home: Path, tmp_path: Path, openssh: bool) -> None:
    """/etc/ssh/ssh_config, replaced for one process only (its own mount namespace)."""
    _mode(openssh)
    fake = tmp_path / "ssh_config"
    fake.write_text("Host sys-*\n  HostName 10.7.7.7\n  Port 2022\n")
    code = f"from dslaunch.transport.sshconfig import resolve; t = resolve('sys-a', openssh={openssh}); " \
           "print(t.hostname, t.port)"  # fmt: skip
    script = f'mount --bind {fake} /etc/ssh/ssh_config && exec "$@"'
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["10.7.7.7", "2022"]


# -- against real sshd nodes ----------------------------------------------------------------------


class LoggedSim(SimCluster):
    """Simulated nodes whose sshd logs at DEBUG1: the jump host's log shows each direct-tcpip."""

    def _config(self, n):  # type: ignore[no-untyped-def]
        conf = super()._config(n)
        conf.write_text(conf.read_text().replace("LogLevel ERROR", "LogLevel DEBUG1"))
        return conf


@pytest.fixture
def sim4(tmp_path: Path) -> Iterator[SimCluster]:
    """node0..node2 have aliases; node3 (127.0.0.5) is known by address only, to the jump configs."""
    yield from _sim_logged(tmp_path, 4)


def _sim_logged(tmp_path: Path, n: int) -> Iterator[SimCluster]:
    if not sshd_available():
        if os.environ.get("CI"):
            pytest.fail("sshd is not installed (apt-get install openssh-server)")
        pytest.skip("sshd is not installed")
    cluster = LoggedSim(tmp_path / "sim", n).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _env(sim: SimCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in sim.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def _run(host: str, accept_new: bool = False, user: str | None = None) -> tuple[str, SSHTransport]:
    t = SSHTransport(Node(host, 1, user=user), ConnectOptions(connect_timeout=5, accept_new_host_keys=accept_new))
    try:
        res = t.run(["sh", "-c", "echo $SSH_CONNECTION"])
    finally:
        t.close()
    assert res.code == 0, res.stderr
    return res.stdout.strip(), t


def _base(sim: SimCluster) -> str:
    """The simulated nodes' ssh config, as SimCluster wrote it."""
    return (sim.ssh_dir / "config").read_text()


@pytest.mark.ssh
def test_include_match_user_and_tokens_reach_a_real_node(
    sim4: SimCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(sim4, monkeypatch)
    n = sim4.nodes[1]
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(sim4.ssh_dir / "id_ed25519", keys / f"id_w1_{sim4.user}")
    shutil.copy(sim4.ssh_dir / "known_hosts", tmp_path / f"kh_{n.addr}")
    (sim4.ssh_dir / "conf.d").mkdir()
    (sim4.ssh_dir / "conf.d" / "w1.conf").write_text(f"Host w1\n  HostName {n.addr}\n")
    (sim4.ssh_dir / "config").write_text(
        f"Include {sim4.ssh_dir}/conf.d/*.conf\n"
        f"Host w1\n  IdentityFile {keys}/id_%n_%r\n  UserKnownHostsFile {tmp_path}/kh_%h\n"
        f"Match user {sim4.user}\n  Port {n.port}\n"
    )
    conn, _ = _run("w1", user=sim4.user)
    assert conn.split()[2] == n.addr


@pytest.mark.ssh
def test_host_key_alias_and_global_known_hosts(
    sim4: SimCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _env(sim4, monkeypatch)
    n = sim4.nodes[1]
    host_key = (sim4.etc / "host_ed25519.pub").read_text().split()
    glob1, glob2 = tmp_path / "global1", tmp_path / "global2"
    glob2.write_text(f"the-alias {host_key[0]} {host_key[1]}\n")
    (sim4.ssh_dir / "known_hosts").write_text("")
    (sim4.ssh_dir / "config").write_text(
        f"Host w1\n  HostName {n.addr}\n  Port {n.port}\n  IdentityFile {sim4.ssh_dir}/id_ed25519\n"
        f"  HostKeyAlias the-alias\n  GlobalKnownHostsFile {glob1} {glob2}\n"
    )
    _run("w1")  # the key is known only under the alias, only in the second global file
    assert (sim4.ssh_dir / "known_hosts").read_text() == "", "nothing recorded: the key was known"


@pytest.mark.ssh
def test_accept_new_reads_the_global_files_and_known_hosts2(
    sim4: SimCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A key that conflicts with a global or second file is changed, not new: OpenSSH's accept-new."""
    _env(sim4, monkeypatch)
    n = sim4.nodes[1]
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = other.with_suffix(".pub").read_text().split()
    name = f"[{n.addr}]:{n.port}"
    known = sim4.ssh_dir / "known_hosts"
    known.write_text("")
    glob = tmp_path / "ssh_known_hosts"
    glob.write_text(f"{name} {wrong[0]} {wrong[1]}\n")
    head = f"Host w1\n  HostName {n.addr}\n  Port {n.port}\n  IdentityFile {sim4.ssh_dir}/id_ed25519\n"
    (sim4.ssh_dir / "config").write_text(head + f"  GlobalKnownHostsFile {glob}\n")
    with pytest.raises(RemoteError) as e:
        _run("w1", accept_new=True)
    assert f"w1: HOST KEY CHANGED for {name}" in e.value.message and f"the key in {glob}" in e.value.message
    assert known.read_text() == "", "a conflicting key is never recorded"
    glob.write_text("")
    (sim4.ssh_dir / "known_hosts2").write_text(f"{name} {wrong[0]} {wrong[1]}\n")
    with pytest.raises(RemoteError, match=r"the key in .*known_hosts2"):
        _run("w1", accept_new=True)
    (sim4.ssh_dir / "known_hosts2").unlink()
    _run("w1", accept_new=True)  # unknown everywhere: recorded in the first user file (hashed here)
    assert paramiko.HostKeys(str(known)).lookup(name) is not None


@pytest.mark.ssh
def test_strict_host_key_checking_no_with_dev_null_is_honoured_with_a_warning(
    sim4: SimCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    _env(sim4, monkeypatch)
    n = sim4.nodes[1]
    (sim4.ssh_dir / "known_hosts").write_text("")
    (sim4.ssh_dir / "config").write_text(
        f"Host w1\n  HostName {n.addr}\n  Port {n.port}\n  IdentityFile {sim4.ssh_dir}/id_ed25519\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
    )
    _, t = _run("w1")
    assert t.warnings == ["w1: host keys are not checked (StrictHostKeyChecking no, UserKnownHostsFile /dev/null "
                          "in your ssh config): anyone on the path could pose as this node"]  # fmt: skip
    assert (sim4.ssh_dir / "known_hosts").read_text() == ""


def _jump_log(sim: SimCluster, i: int) -> str:
    return (sim.etc / f"{sim.nodes[i].alias}.log").read_text(errors="replace")


@pytest.mark.ssh
def test_proxy_jump_one_and_two_hops_and_none(sim4: SimCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    _env(sim4, monkeypatch)
    hidden = sim4.nodes[3]
    port = hidden.port
    (sim4.ssh_dir / "config").write_text(
        f"Host hidden\n  HostName {hidden.addr}\n  ProxyJump node0\n"
        f"Host hidden2\n  HostName {hidden.addr}\n  ProxyJump node0,{sim4.user}@node1\n"
        "Host node0 node1 node2\n  ProxyJump none\n"
        f"Host hidden hidden2\n  Port {port}\n  IdentityFile {sim4.ssh_dir}/id_ed25519\n"
        "Host *\n  ProxyJump nowhere.invalid\n" + _base(sim4)
    )
    known = sim4.ssh_dir / "known_hosts"
    key = (sim4.etc / "host_ed25519.pub").read_text().split()
    with known.open("a") as f:
        f.write(f"[{hidden.addr}]:{port} {key[0]} {key[1]}\n")

    conn, t = _run("hidden")
    assert conn.split()[2] == hidden.addr and t.proxied and t.address() is None
    assert f"target {hidden.addr} port {port}" in _jump_log(sim4, 0), "the jump host opened the channel"
    _run("hidden2")
    assert f"target {hidden.addr} port {port}" in _jump_log(sim4, 1), "the second hop opened the last channel"
    conn, t = _run("node2")  # ProxyJump none: direct, even with `Host *  ProxyJump ...` below
    assert conn.split()[2] == sim4.nodes[2].addr and not t.proxied

    sim4.stop_node(sim4.nodes[0])
    with pytest.raises(RemoteError) as e:
        _run("hidden")
    assert e.value.message.startswith("hidden (jump host node0): cannot connect to 127.0.0.2"), e.value.message


def proxy_command_config(sim: SimCluster, alias: str = "head", target: int = 0, via: int = 1) -> str:
    """`alias` reaches node `target` through `ssh -W` on node `via` (the bastion pattern)."""
    n = sim.nodes[target]
    return (
        f"Host {alias}\n  HostName {n.addr}\n  Port {n.port}\n  IdentityFile {sim.ssh_dir}/id_ed25519\n"
        f"  ProxyCommand ssh -F {sim.ssh_dir}/config -o BatchMode=yes "
        f"-o UserKnownHostsFile={sim.ssh_dir}/known_hosts -W %h:%p {sim.nodes[via].alias}\n"
    )


@pytest.mark.ssh
@pytest.mark.skipif(not HAVE_SSH, reason="the OpenSSH client is not installed")
def test_proxy_command_node0_tells_its_own_address(
    sim4: SimCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Behind a ProxyCommand the SSH peer is the proxy: node 0 is asked which address the others use."""
    from dslaunch.launch.preflight import connect_options, preflight
    from dslaunch.launch.spec import JobSpec
    from dslaunch.node.probe import route_source
    from dslaunch.transport.nodes import Cluster

    _env(sim4, monkeypatch)
    (sim4.ssh_dir / "config").write_text(proxy_command_config(sim4) + _base(sim4))
    for master in (None, "10.1.2.3"):
        spec = JobSpec(nodes=[Node("head", 1), Node("node2", 1)], python=sys.executable,
                       work_dir=str(tmp_path / "work"), master_addr=master)  # fmt: skip
        with Cluster(spec.nodes, connect_options(spec), spec.python) as cluster:
            facts = preflight(spec, cluster)
            assert cluster.clients[0].transport.address() is None  # type: ignore[attr-defined]
        want = master or route_source(sim4.nodes[2].addr)  # node 0's source address toward node 2
        assert facts.master_addr == facts.addresses[0] == want
        assert facts.addresses[1] == sim4.nodes[2].addr


@pytest.mark.parametrize("openssh", MODES)
def test_server_alive_settings_are_read(home: Path, openssh: bool) -> None:
    _mode(openssh)
    (home / ".ssh" / "config").write_text("Host quick\n  ServerAliveInterval 1m30s\n  ServerAliveCountMax 5\n")
    t = resolve("quick", openssh=openssh)
    assert (t.alive_interval, t.alive_count) == (90, 5)
    other = resolve("other", openssh=openssh)
    assert (other.alive_interval, other.alive_count) == (0, 3)
    if not openssh:  # OpenSSH refuses such a file itself, in its own words
        (home / ".ssh" / "config").write_text("Host bad\n  ServerAliveInterval soon\n")
        with pytest.raises(RemoteError, match="bad: ssh configuration: ServerAliveInterval 'soon'"):
            resolve("bad", openssh=False)


@pytest.mark.ssh
def test_a_node_gone_silent_ends_its_tunnel_after_server_alive_interval_times_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing resets the connection of a node that lost power or its link: without keep-alive a
    tunnel over it (`dslaunch tunnel`, `query` to a loopback router) would wait for ever."""
    why = netns.available() or ("" if sshd_available() else "sshd is not installed")
    if why:
        pytest.skip(why)
    sim = SimCluster(tmp_path / "sim", 1, netns=True).start()
    transport = None
    try:
        _env(sim, monkeypatch)
        node = sim.nodes[0]
        (sim.ssh_dir / "config").write_text(_base(sim) + "Host *\n  ServerAliveInterval 1\n  ServerAliveCountMax 2\n")
        transport = SSHTransport(Node(node.alias, 1), ConnectOptions(connect_timeout=5))
        chan = transport.tunnel(node.addr, node.port)  # to the node's own sshd, as seen from the node
        chan.settimeout(30)
        assert chan.recv(64).startswith(b"SSH-2.0-"), "the tunnel works"
        assert sim.network is not None
        sim.network.silence(0)
        t0 = time.monotonic()
        assert chan.recv(64) == b"", "the tunnel ends (no time-out)"
        assert time.monotonic() - t0 < 15, "ended after about 1 s x (2 + 1), not the 30 s time-out"
    finally:
        if transport is not None:
            transport.close()
        sim.stop()
