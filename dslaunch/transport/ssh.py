"""SSH transport (paramiko) honouring ~/.ssh/config, keys, the agent and known_hosts.

Host keys are verified like OpenSSH's `StrictHostKeyChecking yes` by default; with
`--accept-new-host-keys` unknown keys are recorded (like `accept-new`); a changed key is always
refused. No password or keyboard-interactive authentication is tried: runs are unattended.
"""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko

from dslaunch.errors import RemoteError
from dslaunch.transport.base import ConnectOptions, RunResult
from dslaunch.wire.hosts import Node

# paramiko logs transport errors to stderr by itself; dslaunch reports them once, in one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
logging.getLogger("paramiko").propagate = False


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse unknown hosts, or record them in known_hosts when the user allowed it."""

    def __init__(self, node: Node, known_hosts: Path, accept_new: bool) -> None:
        self.node = node
        self.known_hosts = known_hosts
        self.accept_new = accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.accept_new:
            raise RemoteError(
                f"{self.node.host}: host key for {hostname} is not in {self.known_hosts}; "
                "check it and rerun with --accept-new-host-keys, or add it with ssh-keyscan"
            )
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # parallel connects append to the same file
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)


def load_ssh_config(path: str | None) -> paramiko.SSHConfig:
    p = Path(os.path.expanduser(path or "~/.ssh/config"))
    if not p.exists():
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_path(str(p))
    except Exception as e:  # paramiko raises several types for a malformed file
        raise RemoteError(f"{p}: cannot read ssh config ({e})") from None


class SSHTransport:
    """One node over SSH. Connects on first use; one connection carries every command."""

    def __init__(self, node: Node, opts: ConnectOptions) -> None:
        self.node = node
        self.opts = opts
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()
        self._channels: list[paramiko.Channel] = []
        cfg = load_ssh_config(None).lookup(node.host)
        self.hostname: str = cfg.get("hostname", node.host)
        self.port = int(cfg.get("port", 22))
        self.user: str = node.user or cfg.get("user") or getpass.getuser()
        self.identity_files: list[str] = [os.path.expanduser(p) for p in cfg.get("identityfile", [])]
        self.proxy_command: str | None = cfg.get("proxycommand")
        if cfg.get("proxyjump"):
            raise RemoteError(
                f"{node.host}: ProxyJump in ssh config is not supported; use ProxyCommand "
                "'ssh -W %h:%p JUMPHOST' instead"
            )
        files = cfg.get("userknownhostsfile", "~/.ssh/known_hosts").split()
        self.known_hosts = Path(os.path.expanduser(files[0]))
        self._known_files = [Path(os.path.expanduser(f)) for f in files]

    @property
    def where(self) -> str:
        return f"{self.user}@{self.hostname}:{self.port}"

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        for f in self._known_files:
            if f.exists():
                try:
                    client.load_host_keys(str(f))
                except (OSError, paramiko.SSHException) as e:
                    raise RemoteError(f"{self.node.host}: cannot read {f}: {e}") from None
        client.set_missing_host_key_policy(_HostKeyPolicy(self.node, self.known_hosts, self.opts.accept_new_host_keys))
        t = self.opts.connect_timeout
        kw: dict[str, Any] = {}
        if self.proxy_command:
            kw["sock"] = paramiko.ProxyCommand(self.proxy_command)
        host = self.node.host
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.user,
                key_filename=self.identity_files or None,
                timeout=t,
                banner_timeout=t,
                auth_timeout=t,
                channel_timeout=t,
                allow_agent=True,
                look_for_keys=True,
                **kw,
            )
        except RemoteError:
            client.close()
            raise
        except paramiko.BadHostKeyException as e:
            client.close()
            raise RemoteError(
                f"{host}: HOST KEY CHANGED for {self.hostname} (someone may be intercepting the "
                f"connection, or the host was reinstalled); got {e.key.get_name()} "
                f"{e.key.get_fingerprint().hex()}; if expected, remove the old key with "
                f"ssh-keygen -R {self.hostname}"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise RemoteError(
                f"{host}: authentication failed as {self.user} at {self.hostname}:{self.port} "
                "(keys and ssh-agent tried; password login is not used)"
            ) from None
        except TimeoutError:
            client.close()
            raise RemoteError(
                f"{host}: no answer from {self.hostname}:{self.port} within {t:g}s (--connect-timeout)"
            ) from None
        except socket.gaierror as e:
            client.close()
            raise RemoteError(f"{host}: cannot resolve {self.hostname} ({e.strerror})") from None
        except paramiko.SSHException as e:
            client.close()
            msg = str(e)
            # A peer that never speaks SSH shows up as a banner time-out, or (when paramiko goes
            # on to authenticate over the dead transport) as "No existing session".
            if any(w in msg.lower() for w in ("banner", "timeout", "no existing session")):
                msg = f"no SSH answer from {self.hostname}:{self.port} within {t:g}s (--connect-timeout)"
            raise RemoteError(f"{host}: {msg}") from None
        except OSError as e:
            client.close()
            reason = e.strerror or str(e)
            raise RemoteError(f"{host}: cannot connect to {self.hostname}:{self.port} ({reason})") from None
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

    def address(self) -> str:
        transport = self.client().get_transport()
        if transport is None:
            raise RemoteError(f"{self.node.host}: not connected")
        peer = transport.getpeername()
        return str(peer[0]) if isinstance(peer, tuple) else self.hostname

    def close(self) -> None:
        for chan in self._channels:
            chan.close()
        self._channels.clear()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
