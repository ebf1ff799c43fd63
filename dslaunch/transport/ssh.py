"""SSH transport (paramiko), reaching each node the way `ssh NODE` would.

What a name means comes from OpenSSH (transport/sshconfig: `ssh -G`): HostName, Port, User,
IdentityFile, known-hosts files, HostKeyAlias, StrictHostKeyChecking, ProxyCommand, ProxyJump.
ProxyJump hops are chained as direct-tcpip channels, each hop logged in to with its own
configuration. Host keys are checked as in transport/hostkeys. No password or
keyboard-interactive authentication is tried: runs are unattended.
"""

from __future__ import annotations

import logging
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import paramiko

from dslaunch.errors import RemoteError
from dslaunch.transport.base import ConnectOptions, RunResult
from dslaunch.transport.hostkeys import HostKeyPolicy, strict_off_warning
from dslaunch.transport.sshconfig import SSHTarget, resolve
from dslaunch.wire.hosts import Node
from dslaunch.wire.keepalive import keep_alive

# paramiko logs transport errors to stderr by itself; dslaunch reports them once, in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False
SFTP_WINDOW = 64 << 20
MAX_HOPS = 8  # nested ProxyJump through jump hosts' own ProxyJump: deeper is a loop
ALIVE_S = 5  # ServerAliveInterval where the ssh config leaves it off: a job's links live for days


def _watch_silence(client: paramiko.SSHClient, t: SSHTarget) -> None:
    """ServerAliveInterval and ServerAliveCountMax, on by default: a node that drops off the
    network (nothing resets the connection) ends it after about interval x (count + 1) seconds, so
    a tunnel, a query or a command over it fails and moves on instead of waiting for ever. The
    kernel's keep-alive probes do the watching where the socket is ours (not a ProxyCommand's or
    a jump host's channel); SSH keep-alive messages keep idle middleboxes from forgetting it."""
    transport = client.get_transport()
    if transport is None:
        return
    interval = t.alive_interval or ALIVE_S
    transport.set_keepalive(interval)
    if isinstance(transport.sock, socket.socket) and t.alive_count > 0:
        keep_alive(transport.sock, idle_s=interval, interval_s=interval, count=t.alive_count)


class SSHTransport:
    """One node over SSH. Connects on first use; one connection carries every command."""

    def __init__(self, node: Node, opts: ConnectOptions) -> None:
        self.node = node
        self.opts = opts
        self._client: paramiko.SSHClient | None = None
        self._hops: list[paramiko.SSHClient] = []
        self._lock = threading.Lock()
        self._channels: list[paramiko.Channel] = []
        self.target: SSHTarget = resolve(node.host, node.user)
        self.hostname = self.target.hostname
        self.port = self.target.port
        self.user = self.target.user
        # said once by the caller (pre-flight): an ssh config that turns host-key checks off
        self.warnings: list[str] = [w for w in [strict_off_warning(node.host, self.target)] if w]

    @property
    def where(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    @property
    def proxied(self) -> bool:
        """Reached through a ProxyCommand or ProxyJump: the socket's peer is not the node."""
        return bool(self.target.proxy_command or self.target.proxy_jump)

    def _connect(self) -> paramiko.SSHClient:
        try:
            return self._reach(self.target, self.node.host, 0)
        except BaseException:
            self._close_hops()
            raise

    def _reach(self, t: SSHTarget, label: str, depth: int) -> paramiko.SSHClient:
        """Log in to `t`, through its ProxyJump hops or its ProxyCommand."""
        if depth > MAX_HOPS:
            raise RemoteError(f"{label}: more than {MAX_HOPS} nested ProxyJump hops (a loop in the ssh config?)")
        sock: Any = None
        if t.proxy_jump:
            prev: paramiko.SSHClient | None = None
            for hop in t.proxy_jump:
                ht = resolve(hop.host, hop.user, hop.port)
                hop_label = f"{self.node.host} (jump host {hop.host})"
                if prev is None:  # the first hop is reached as `ssh HOP` would reach it
                    prev = self._reach(ht, hop_label, depth + 1)
                else:  # later ones through the previous hop, as `ssh -J a,b` does
                    ht.proxy_jump, ht.proxy_command = [], None
                    prev = self._login(ht, self._channel(prev, ht, hop_label), hop_label)
                self._hops.append(prev)
            assert prev is not None
            sock = self._channel(prev, t, label)
        elif t.proxy_command:
            # OpenSSH runs it with the user's shell and `exec`; paramiko would split it itself
            sock = paramiko.ProxyCommand(shlex.join(["/bin/sh", "-c", f"exec {t.proxy_command}"]))
        return self._login(t, sock, label)

    def _channel(self, via: paramiko.SSHClient, t: SSHTarget, label: str) -> paramiko.Channel:
        transport = via.get_transport()
        assert transport is not None
        try:
            return transport.open_channel(
                "direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0), timeout=self.opts.connect_timeout
            )
        except (paramiko.SSHException, OSError, EOFError) as e:
            peer = transport.getpeername()
            jump = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "the jump host"
            raise RemoteError(f"{label}: the jump host {jump} cannot reach {t.hostname}:{t.port} ({e})") from None

    def _login(self, t: SSHTarget, sock: Any, label: str) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        policy = HostKeyPolicy(label, t, self.opts.accept_new_host_keys, self.warnings)
        policy.prime(client)
        client.set_missing_host_key_policy(policy)
        to = self.opts.connect_timeout
        keys = [f for f in t.identity_files if os.path.isfile(f)]
        where = f"{t.hostname}:{t.port}"
        try:
            client.connect(
                t.hostname, port=t.port, username=t.user, key_filename=keys or None, timeout=to, banner_timeout=to,
                auth_timeout=to, channel_timeout=to, allow_agent=t.use_agent and not t.identities_only,
                look_for_keys=False, sock=sock,
            )  # fmt: skip
        except RemoteError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            name = t.known_hosts_name
            raise RemoteError(
                f"{label}: HOST KEY CHANGED for {name} (someone may be intercepting the connection, or the host "
                f"was reinstalled); got {e.key.get_name()} {e.key.get_fingerprint().hex()}, which differs from "
                f"the key in {policy.source_of(e.key.get_name())}; if expected, remove the old key with "
                f"ssh-keygen -R {shlex.quote(name)}"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise RemoteError(
                f"{label}: authentication failed as {t.user} at {where} (keys and ssh-agent tried; password "
                "login is not used)"
            ) from None
        except TimeoutError:
            client.close()
            raise RemoteError(f"{label}: no answer from {where} within {to:g}s (--connect-timeout)") from None
        except socket.gaierror as e:
            client.close()
            raise RemoteError(f"{label}: cannot resolve {t.hostname} ({e.strerror})") from None
        except paramiko.SSHException as e:
            client.close()
            msg = str(e)
            # A peer that never speaks SSH shows up as a banner time-out, or (when paramiko goes
            # on to authenticate over the dead transport) as "No existing session".
            if any(w in msg.lower() for w in ("banner", "timeout", "no existing session")):
                msg = f"no SSH answer from {where} within {to:g}s (--connect-timeout)"
            raise RemoteError(f"{label}: {msg}") from None
        except OSError as e:
            client.close()
            reason = e.strerror or str(e)
            raise RemoteError(f"{label}: cannot connect to {where} ({reason})") from None
        _watch_silence(client, t)
        return client

    def client(self) -> paramiko.SSHClient:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _open(self, argv: list[str]) -> paramiko.Channel:
        transport = self.client().get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError(f"{self.node.host}: SSH connection to {self.where} was lost")
        try:
            chan = transport.open_session(timeout=self.opts.connect_timeout)
            chan.exec_command(shlex.join(argv))
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(f"{self.node.host}: cannot run a command over SSH ({e})") from None
        return chan

    def run(self, argv: list[str], stdin: str = "", timeout: float | None = None) -> RunResult:
        timeout = timeout or self.opts.command_timeout
        chan = self._open(argv)
        deadline = time.monotonic() + timeout
        out, err = bytearray(), bytearray()
        try:
            if stdin:
                chan.sendall(stdin.encode())
            chan.shutdown_write()
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                    continue
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    continue
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteError(
                        f"{self.node.host}: {argv[-1] if argv else 'command'} did not finish within "
                        f"{timeout:g}s (--command-timeout)"
                    )
                select.select([chan], [], [], min(left, 0.2))
            code = chan.recv_exit_status()
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise RemoteError(f"{self.node.host}: SSH connection lost during command ({e})") from None
        finally:
            chan.close()
        return RunResult(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def stream(self, argv: list[str], stdin: str = "") -> Iterator[str]:
        chan = self._open(argv)
        self._channels.append(chan)
        try:
            if stdin:
                chan.sendall(stdin.encode())
            buf = b""
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
        except (OSError, EOFError, paramiko.SSHException):
            return
        finally:
            chan.close()

    def tunnel(self, host: str, port: int) -> paramiko.Channel:
        """A socket-like channel to host:port as seen from the node (SSH direct-tcpip forwarding)."""
        transport = self.client().get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError(f"{self.node.host}: SSH connection to {self.where} was lost")
        try:
            return transport.open_channel(
                "direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=self.opts.connect_timeout
            )
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(f"{self.node.host}: cannot tunnel to {host}:{port} over SSH ({e})") from None

    def sftp(self) -> paramiko.SFTPClient:
        """An SFTP session on this node's one connection (for copying the model in)."""
        transport = self.client().get_transport()
        if transport is None or not transport.is_active():
            raise RemoteError(f"{self.node.host}: SSH connection to {self.where} was lost")
        try:  # a wide window keeps pipelined writes flowing (paramiko's default is 2 MiB)
            return paramiko.SFTPClient.from_transport(transport, window_size=SFTP_WINDOW)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise RemoteError(
                f"{self.node.host}: cannot open SFTP over SSH ({e}; does its sshd enable the sftp subsystem?)"
            ) from None

    def address(self) -> str | None:
        """The address SSH reached the node at; None through a proxy (the peer is the proxy)."""
        if self.proxied:
            return None
        transport = self.client().get_transport()
        if transport is None:
            raise RemoteError(f"{self.node.host}: not connected")
        peer = transport.getpeername()
        return str(peer[0]) if isinstance(peer, tuple) else None

    def _close_hops(self) -> None:
        for hop in reversed(self._hops):
            hop.close()
        self._hops.clear()

    def close(self) -> None:
        for chan in self._channels:
            chan.close()
        self._channels.clear()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
            self._close_hops()
