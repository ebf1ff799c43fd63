"""Simulated nodes on a network of their own: one network namespace per node.

On loopback every simulated node's connections leave from 127.0.0.1, so no packet filter can cut
one node off from another. Here each node is a network namespace joined to this one by a veth
pair: node i is 10.A.B.(4i+2), its end of the pair in this namespace 10.A.B.(4i+1), and traffic
between nodes is routed through this namespace. That gives the faults a real network has:

- `partition(i, j)`: the packets between two nodes vanish (policy rules of type blackhole on the
  forwarded path), while the launcher and the clients here still reach both;
- `silence(i)`: the node drops off the network without a word (its interface goes down);
  nothing resets its connections, as when a machine loses power or its switch port.

Needs root (CAP_NET_ADMIN) and `ip`; `available()` says whether this machine allows it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import subprocess
from pathlib import Path

FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> str:
    """Why namespaces cannot be made here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    name = f"dslprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        pair = _ip("link", "add", f"{name[:11]}h", "type", "veth", "peer", "name", "v", "netns", name, check=False)
        if pair.returncode != 0:
            return f"no veth pairs: {pair.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)  # takes the pair with it
    return ""


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.A.B.0/24 that no interface of this namespace uses."""
    used = [
        ipaddress.ip_interface(f.split()[3]).network
        for f in _ip("-o", "-4", "addr", "show").stdout.splitlines()
        if len(f.split()) > 3
    ]
    rng = random.SystemRandom()
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{rng.randrange(100, 250)}.{rng.randrange(0, 256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the simulated nodes")


class NodeNetwork:
    """n namespaces and their links; `close()` (also on any failure to make them) removes all."""

    def __init__(self, n: int) -> None:
        tag = f"dsl{os.getpid() % 100000}{random.randrange(36**2):02x}"[:10]  # interface names: 15 chars at most
        self.net = _free_subnet()
        self.names = [f"{tag}n{i}" for i in range(n)]
        self.host_ends = [f"{tag}h{i}" for i in range(n)]
        self.addrs = [str(self.net[4 * i + 2]) for i in range(n)]
        self._gateways = [str(self.net[4 * i + 1]) for i in range(n)]
        self._rules: list[tuple[str, ...]] = []
        self._forward = FORWARD.read_text().strip()
        try:
            for i in range(n):
                self._make(i)
            FORWARD.write_text("1\n")
        except BaseException:
            self.close()
            raise

    def _make(self, i: int) -> None:
        ns, host, node = self.names[i], self.host_ends[i], "eth0"
        _ip("netns", "add", ns)
        _ip("link", "add", host, "type", "veth", "peer", "name", node, "netns", ns)
        _ip("addr", "add", f"{self._gateways[i]}/30", "dev", host)
        _ip("link", "set", host, "up")
        _ip("-n", ns, "addr", "add", f"{self.addrs[i]}/30", "dev", node)
        _ip("-n", ns, "link", "set", "lo", "up")
        self._up(i)

    def _up(self, i: int) -> None:
        _ip("-n", self.names[i], "link", "set", "eth0", "up")
        _ip("-n", self.names[i], "route", "replace", "default", "via", self._gateways[i])

    def exec_prefix(self, i: int) -> list[str]:
        """What runs a command inside node i's namespace."""
        return ["ip", "netns", "exec", self.names[i]]

    # -- faults ------------------------------------------------------------------------------
    def partition(self, i: int, j: int) -> None:
        """Nodes i and j no longer reach each other, in either direction; nothing tells them."""
        for a, b in ((i, j), (j, i)):
            rule = ("iif", self.host_ends[a], "to", self.addrs[b], "blackhole")
            _ip("rule", "add", *rule)
            self._rules.append(rule)

    def heal(self) -> None:
        """Every partition ends."""
        while self._rules:
            _ip("rule", "del", *self._rules.pop(), check=False)

    def silence(self, i: int) -> None:
        """Node i drops off the network: its interface goes down, its sockets hear nothing more."""
        _ip("-n", self.names[i], "link", "set", "eth0", "down")

    def unsilence(self, i: int) -> None:
        self._up(i)

    def close(self) -> None:
        """Rules, namespaces (each takes its veth pair along) and ip_forward as they were.

        A namespace that still has processes lives on, unnamed, until they end: stop them first.
        ip_forward is put back only once no other cluster's namespaces are left (tests run at once)."""
        self.heal()
        for ns in self.names:
            _ip("netns", "del", ns, check=False)
        others = [line for line in _ip("netns", "list", check=False).stdout.splitlines() if line.startswith("dsl")]
        if not others:
            with contextlib.suppress(OSError):
                FORWARD.write_text(self._forward + "\n")
