"""Host keys checked as OpenSSH checks them: every UserKnownHostsFile and GlobalKnownHostsFile,
under the HostKeyAlias when there is one, with StrictHostKeyChecking as configured.

A key that differs from one recorded in any of those files is refused as changed, always, also
with `--accept-new-host-keys` (OpenSSH's `accept-new`) and with `StrictHostKeyChecking no`. An
unknown key is refused unless `--accept-new-host-keys`, `accept-new` or `no` says to record it;
it is written to the first user file (hashed with HashKnownHosts), never to a global one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import paramiko

from dslaunch.errors import RemoteError
from dslaunch.transport.sshconfig import SSHTarget

NULL = os.devnull


def known_keys(t: SSHTarget) -> dict[str, tuple[paramiko.PKey, str]]:
    """{key type: (key, file)} recorded for the target's name; the first file to name a type wins."""
    found: dict[str, tuple[paramiko.PKey, str]] = {}
    for f in [*t.user_known_hosts, *t.global_known_hosts]:
        if f == NULL or not os.path.isfile(f):
            continue
        keys = paramiko.HostKeys()
        try:
            keys.load(f)
        except (OSError, paramiko.SSHException) as e:
            raise RemoteError(f"{t.name}: cannot read {f}: {e}") from None
        for ktype, key in (keys.lookup(t.known_hosts_name) or {}).items():
            found.setdefault(ktype, (key, f))
    return found


def paramiko_name(t: SSHTarget) -> str:
    """The name paramiko looks the server's key up under, for the address it connects to."""
    return t.hostname if t.port == 22 else f"[{t.hostname}]:{t.port}"


class HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Prime a client with the target's known keys; decide about an unknown one like OpenSSH."""

    def __init__(self, label: str, t: SSHTarget, accept_new: bool, warnings: list[str]) -> None:
        self.label = label
        self.t = t
        self.accept_new = accept_new or t.strict in ("accept-new", "no")
        self.warnings = warnings
        self.known = known_keys(t)

    def prime(self, client: paramiko.SSHClient) -> None:
        """paramiko compares the server's key with these, preferring a type already known."""
        for ktype, (key, _f) in self.known.items():
            client.get_host_keys().add(paramiko_name(self.t), ktype, key)

    def source_of(self, ktype: str) -> str:
        return self.known.get(ktype, (None, "known_hosts"))[1]

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        t = self.t
        if not self.accept_new:
            files = ", ".join(f for f in t.user_known_hosts if f != NULL) or "known_hosts"
            raise RemoteError(
                f"{self.label}: host key for {t.known_hosts_name} is not in {files}; check it and rerun with "
                "--accept-new-host-keys, or add it with ssh-keyscan"
            )
        first = t.user_known_hosts[0] if t.user_known_hosts else NULL
        if first != NULL:
            record(Path(first), t.known_hosts_name, key, t.hash_known_hosts)
        client.get_host_keys().add(hostname, key.get_name(), key)


def record(path: Path, name: str, key: paramiko.PKey, hashed: bool) -> None:
    """Append `name key` to a known-hosts file; parallel connects append to the same file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    host = paramiko.HostKeys.hash_host(name) if hashed else name
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{host} {key.get_name()} {key.get_base64()}\n")


def strict_off_warning(label: str, t: SSHTarget) -> str | None:
    """`StrictHostKeyChecking no` (often with UserKnownHostsFile /dev/null) is honoured, and said."""
    if t.strict != "no":
        return None
    null = f", UserKnownHostsFile {NULL}" if all(f == NULL for f in t.user_known_hosts) else ""
    return (
        f"{label}: host keys are not checked (StrictHostKeyChecking no{null} in your ssh config): "
        "anyone on the path could pose as this node"
    )
