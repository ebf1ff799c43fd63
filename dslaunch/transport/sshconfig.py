"""What a host name means, as OpenSSH decides it: paramiko connects, OpenSSH resolves.

With the OpenSSH client installed, the effective configuration comes from `ssh -G` itself:
Include, Match (with the hostfile's `user@` passed as `-l`), tokens, defaults, and
/etc/ssh/ssh_config. Without it, paramiko's parser is the fallback, with Include inlined and the
hostfile's user applied first. `~` is $HOME, as for every other dslaunch file: when $HOME is not
the password database's home (OpenSSH's `~`), the configuration read is $HOME/.ssh/config and
the default known-hosts and key files are under $HOME too.
"""

from __future__ import annotations

import getpass
import glob
import hashlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from dslaunch.errors import RemoteError

SYSTEM_CONFIG = "/etc/ssh/ssh_config"
GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
DEFAULT_IDENTITIES = ("id_rsa", "id_ecdsa", "id_ecdsa_sk", "id_ed25519", "id_ed25519_sk", "id_xmss", "id_dsa")
# ssh -G prints StrictHostKeyChecking as true/false; the config file says yes/no
_STRICT = {"true": "yes", "false": "no", "off": "no", "on": "yes"}
_TOKEN_RE = re.compile(r"%.")
_TIME_RE = re.compile(r"(\d+)([smhdw]?)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Hop:
    """One ProxyJump hop: `[user@]host[:port]` or `ssh://[user@]host[:port]`."""

    host: str
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"


@dataclass
class SSHTarget:
    """Everything needed to reach one host the way `ssh HOST` would."""

    name: str  # as written (the hostfile's name, or a hop's): OpenSSH's %n
    hostname: str
    port: int
    user: str
    identity_files: list[str] = field(default_factory=list)
    identities_only: bool = False
    use_agent: bool = True
    user_known_hosts: list[str] = field(default_factory=list)
    global_known_hosts: list[str] = field(default_factory=lambda: list(GLOBAL_KNOWN_HOSTS))
    host_key_alias: str | None = None
    strict: str = "ask"  # yes | ask | accept-new | no
    hash_known_hosts: bool = False
    proxy_command: str | None = None
    proxy_jump: list[Hop] = field(default_factory=list)
    alive_interval: int = 0  # ServerAliveInterval (0: off in OpenSSH; dslaunch then uses its own)
    alive_count: int = 3  # ServerAliveCountMax
    source: str = "ssh -G"

    @property
    def known_hosts_name(self) -> str:
        """The name its host key is filed under: HostKeyAlias, else `host` or `[host]:port`."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def home() -> Path:
    return Path(os.path.expanduser("~"))


def resolve(name: str, user: str | None = None, port: int | None = None, openssh: bool | None = None) -> SSHTarget:
    """The effective configuration for `name`; `user`/`port` act like `ssh -l USER -p PORT`."""
    use_ssh = shutil.which("ssh") is not None if openssh is None else openssh
    opts = _ssh_g(name, user, port) if use_ssh else _paramiko(name, user, port)
    return _target(name, opts, "ssh -G" if use_ssh else "paramiko")


def parse_jump(spec: str) -> list[Hop]:
    """ProxyJump's comma-separated hops; `none` (or nothing) means a direct connection."""
    if not spec or spec.strip().lower() == "none":
        return []
    hops = []
    for part in spec.split(","):
        part = part.strip().removeprefix("ssh://")
        user, at, rest = part.rpartition("@")
        if rest.startswith("["):  # [v6 address]:port
            host, _, tail = rest[1:].partition("]")
            port_s = tail.removeprefix(":")
        else:
            host, _, port_s = rest.partition(":")
        if not host or (port_s and not port_s.isdigit()):
            raise RemoteError(f"ProxyJump {spec!r}: cannot read the hop {part!r}")
        hops.append(Hop(host, user if at else None, int(port_s) if port_s else None))
    return hops


def expand_tokens(value: str, t: SSHTarget, local_user: str | None = None) -> str:
    """OpenSSH's %-tokens (and a leading ~) in IdentityFile, known-hosts files, ProxyCommand."""
    lhost = socket.gethostname()
    luser = local_user or getpass.getuser()
    jump = ",".join(
        f"{h.user + '@' if h.user else ''}{h.host}{':' + str(h.port) if h.port else ''}" for h in t.proxy_jump
    )
    table = {
        "%%": "%", "%d": str(home()), "%h": t.hostname, "%n": t.name, "%p": str(t.port), "%r": t.user,
        "%u": luser, "%l": lhost, "%L": lhost.split(".")[0], "%i": str(os.getuid()), "%j": jump,
        "%k": t.host_key_alias or t.name,
        "%C": hashlib.sha1(f"{lhost}{t.hostname}{t.port}{t.user}{jump}".encode()).hexdigest(),
    }  # fmt: skip
    out = _TOKEN_RE.sub(lambda m: table.get(m.group(0), m.group(0)), value)
    return os.path.expanduser(out) if out.startswith("~") else out


def _target(name: str, opts: dict[str, list[str]], source: str) -> SSHTarget:
    def one(key: str, default: str | None = None) -> str | None:
        return opts[key][0] if opts.get(key) else default

    t = SSHTarget(
        name=name,
        hostname=one("hostname", name) or name,
        port=int(one("port", "22") or 22),
        user=one("user") or getpass.getuser(),
        identities_only=one("identitiesonly", "no") == "yes",
        use_agent=(one("identityagent", "") or "").lower() != "none",
        host_key_alias=one("hostkeyalias"),
        strict=_strict(one("stricthostkeychecking", "ask") or "ask"),
        hash_known_hosts=one("hashknownhosts", "no") == "yes",
        proxy_jump=parse_jump(one("proxyjump", "") or ""),
        alive_interval=_seconds(name, "ServerAliveInterval", one("serveraliveinterval", "0") or "0"),
        alive_count=_seconds(name, "ServerAliveCountMax", one("serveralivecountmax", "3") or "3", units=False),
        source=source,
    )
    command = one("proxycommand")
    if command and command.lower() != "none":
        t.proxy_command = expand_tokens(command, t)
        t.proxy_jump = []  # exclusive in OpenSSH (ssh -G shows one); paramiko may return both
    ids = opts.get("identityfile", [])
    t.identity_files = [expand_tokens(f, t) for f in ids] or [str(home() / ".ssh" / n) for n in DEFAULT_IDENTITIES]
    user_files = " ".join(opts.get("userknownhostsfile", [])).split()
    default_user = [str(home() / ".ssh" / "known_hosts"), str(home() / ".ssh" / "known_hosts2")]
    t.user_known_hosts = [expand_tokens(f, t) for f in user_files] or default_user
    global_files = " ".join(opts.get("globalknownhostsfile", [])).split()
    t.global_known_hosts = [expand_tokens(f, t) for f in global_files] or list(GLOBAL_KNOWN_HOSTS)
    return t


def _seconds(name: str, key: str, value: str, units: bool = True) -> int:
    """An ssh_config count, or a time as OpenSSH writes one (`90`, `1m30s`; `ssh -G` prints seconds)."""
    value = value.strip().lower()
    if value.isdigit():
        return int(value)
    parts = _TIME_RE.findall(value) if units else []
    if not parts or "".join(n + u for n, u in parts) != value:
        raise RemoteError(f"{name}: ssh configuration: {key} {value!r} is not a number of seconds")
    return sum(int(n) * _UNITS[u or "s"] for n, u in parts)


def _strict(value: str) -> str:
    value = value.lower()
    return _STRICT.get(value, value)


def _parse_g(text: str) -> dict[str, list[str]]:
    opts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            opts.setdefault(key.lower(), []).append(value.strip())
    return opts


def _ssh_g(name: str, user: str | None, port: int | None) -> dict[str, list[str]]:
    """`ssh -G`: OpenSSH's own answer. Its `~` is the password database's home, so when $HOME
    differs it reads $HOME/.ssh/config (and the system file) through a small wrapper config."""
    argv = ["ssh", "-G"]
    argv += ["-l", user] if user else []
    argv += ["-p", str(port)] if port else []
    wrapper = None
    h = home()
    if _pw_home() != h:
        wrapper = tempfile.NamedTemporaryFile("w", prefix="dslaunch-ssh-", suffix=".conf", delete=False)  # noqa: SIM115
        with wrapper:
            wrapper.write(
                f'Include "{h / ".ssh" / "config"}"\nInclude "{SYSTEM_CONFIG}"\n'
                # defaults under $HOME, read only where nothing above set them (first value wins)
                f'Host *\n  UserKnownHostsFile "{h}/.ssh/known_hosts" "{h}/.ssh/known_hosts2"\n'
            )
        argv += ["-F", wrapper.name]
    try:
        res = subprocess.run([*argv, "--", name], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RemoteError(f"{name}: cannot run 'ssh -G' to read its ssh configuration ({e})") from None
    finally:
        if wrapper is not None:
            os.unlink(wrapper.name)
    if res.returncode != 0:
        why = [ln for ln in res.stderr.splitlines() if ln.strip() and "Pseudo-terminal" not in ln]
        raise RemoteError(f"{name}: ssh configuration: {why[-1] if why else f'ssh -G exit {res.returncode}'}")
    return _parse_g(res.stdout)


def _pw_home() -> Path | None:
    try:
        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        return None


def _inline_includes(path: Path, base: Path, depth: int = 0) -> str:
    """A config file's text with its Include lines replaced by the files they name (paramiko
    ignores Include). Relative names are under `base` (~/.ssh, or /etc/ssh for the system file)."""
    if depth > 16:
        raise RemoteError(f"{path}: Include nested too deeply")
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise RemoteError(f"{path}: cannot read ssh config ({e.strerror})") from None
    out = []
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if words and words[0].lower() == "include" and len(words) == 2:
            for pattern in words[1].split():
                pattern = os.path.expanduser(pattern.strip('"'))
                full = pattern if os.path.isabs(pattern) else str(base / pattern)
                out += [_inline_includes(Path(p), base, depth + 1) for p in sorted(glob.glob(full))]
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def _paramiko(name: str, user: str | None, port: int | None) -> dict[str, list[str]]:
    """The fallback without OpenSSH: paramiko's parser on the user's then the system's file.

    `-l`/`-p` become a leading `Host *` block, so they win (first value wins) and `Match user`
    sees the hostfile's user, as with OpenSSH. paramiko expands only some tokens, some differently
    (%l): they are hidden from it and expanded by `expand_tokens` like ssh -G's output.
    """
    head = "".join(["Host *\n", f"  User {user}\n" if user else "", f"  Port {port}\n" if port else ""])
    text = head + _inline_includes(home() / ".ssh" / "config", home() / ".ssh")
    text += "Host *\n" + _inline_includes(Path(SYSTEM_CONFIG), Path(SYSTEM_CONFIG).parent)
    try:
        found = paramiko.SSHConfig.from_text(text.replace("%", "\0")).lookup(name)
    except Exception as e:  # paramiko raises several types for a malformed file
        raise RemoteError(f"{name}: cannot read ssh config ({e})") from None
    return {k: [str(x).replace("\0", "%") for x in (v if isinstance(v, list) else [v])] for k, v in found.items()}
