"""Pre-flight on this node: versions, GPUs, cores, free ports, the model and work directories,
and the shared rendezvous directory check."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from dslaunch.errors import NodeOpError
from dslaunch.wire.filehash import manifest

PROBE_PREFIX = ".dslaunch-probe-"

# The agent runs under a tiny shell that records its exit status: the agent is detached
# (own session, survives the SSH session), so nobody else would ever see it.


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _front_port(
    bind: str, port: int | None, avoid: set[int], scan: int = 100, first: int = 7070, step: int = 1
) -> dict[str, Any]:
    """`front_port`: the one asked for, or the first free of first, first + step, ...; else
    `front_error`. Router K of N scans 7070 + K in steps of N, so routers sharing a machine never
    pick the same port.

    A fact for pre-flight to judge along with the others, not a failure of the probe itself.
    """
    fixed = port is not None
    first = port if port is not None else first
    for p in range(first, first + (1 if fixed else scan * step), step):
        if p in avoid or p > 65535:
            continue
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind, p))
            except OSError as e:
                if fixed or e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    return {"front_error": f"cannot listen on {bind}:{p}: {e.strerror}"}
                continue
        return {"front_port": p}
    return {"front_error": f"no free port on {bind} from {first} to {first + (scan - 1) * step}"}


def _stable_port(avoid: set[int]) -> int:
    """A free port below the kernel's ephemeral range, for a listener that others dial or redial:
    the rendezvous and master ports, the router's link.

    A port in the ephemeral range that is free when pre-flight looks can be any connect()'s source
    port by the time rank 0 binds it (seconds later; minutes, when a Slurm job pends): then the
    job fails with EADDRINUSE. And a client redialing a port in the ephemeral range while nothing
    listens there can be given that very port as its own source port and connect to itself (TCP
    simultaneous open on loopback), after which the listener cannot bind it again.
    """
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(max(1024, low // 2), low - 1)
        if port not in avoid and port_free(port):
            return port
    return _free_port(avoid)


def _free_port(avoid: set[int]) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("no free TCP port found")


def _gpu_count() -> int:
    """Visible NVIDIA GPUs without importing torch (probing must be fast)."""
    devs = [d for d in glob.glob("/dev/nvidia[0-9]*") if d[len("/dev/nvidia") :].isdigit()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        return min(len(ids), len(devs))
    return len(devs)


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def op_probe(args: dict[str, Any]) -> dict[str, Any]:
    """Versions, GPUs, cores, and free ports: for the rendezvous and the process group (a replica's
    head node), and for a router's public front and link (a router's node)."""
    import dslaunch

    out: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "dslaunch": dslaunch.__version__,
        "torch": _dist_version("torch"),
        "deepspeed": _dist_version("deepspeed"),
        "gpus": _gpu_count(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    want = args.get("ports")
    if want is not None:
        taken = {p for p in want if p is not None}
        out["busy_ports"] = [p for p in want if p is not None and not port_free(p)]
        chosen: list[int] = []
        for p in want:
            chosen.append(p if p is not None else _stable_port(taken))
            taken.add(chosen[-1])
        out["ports"] = chosen
        if args.get("link"):
            out["link_port"] = _stable_port(taken)
            taken.add(out["link_port"])
        front = args.get("front")
        if front is not None:
            out.update(_front_port(front["bind"], front.get("port"), taken, first=int(front.get("first", 7070)),
                                   step=max(1, int(front.get("step", 1)))))  # fmt: skip
    launch_dir = args.get("launch_dir")
    out["launch_dir_exists"] = bool(launch_dir and os.path.isdir(launch_dir))
    model = args.get("model_dir")
    if model:
        # the ranks run in the launch directory where it exists: a relative path means the same there
        base = Path(launch_dir) if out["launch_dir_exists"] else Path.cwd()
        config = base / os.path.expanduser(model) / "config.json"
        if not config.is_file():
            out["model_dir_error"] = f"{model}: no such model directory here (no config.json)"
    if args.get("model_hashes") and os.path.isdir(os.path.expanduser(args["model_hashes"])):
        try:
            out["model_files"] = manifest(os.path.expanduser(args["model_hashes"]))
        except OSError as e:
            out["model_dir_error"] = f"{args['model_hashes']}: cannot read {e.filename}: {e.strerror}"
    if args.get("model_config"):
        out["model_config"] = model_config(args["model_config"], Path(launch_dir) if out["launch_dir_exists"] else None)
    work = args.get("work_dir")
    if work:
        d = Path(os.path.expanduser(work))
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            out["work_dir"] = str(d)
        except OSError as e:
            out["work_dir_error"] = f"{d}: {e.strerror}"
    return out


def model_config(model: str, launch_dir: Path | None) -> dict[str, Any] | None:
    """The family fields of a model's config.json: a directory here, or a hub name already in
    this node's Hugging Face cache (nothing is downloaded). None when it cannot be found."""
    p = Path(os.path.expanduser(model))
    candidates = [(launch_dir or Path.cwd()) / p / "config.json"]
    if not model.startswith(("/", "~", ".")) and model.count("/") <= 1:
        hf_home = Path(os.path.expanduser(os.environ.get("HF_HOME", "~/.cache/huggingface")))
        repo = Path(os.environ.get("HF_HUB_CACHE") or hf_home / "hub") / ("models--" + model.replace("/", "--"))
        with contextlib.suppress(OSError):
            candidates.append(repo / "snapshots" / (repo / "refs" / "main").read_text().strip() / "config.json")
    for c in candidates:
        try:
            cfg = json.loads(c.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict):
            keys = ("model_type", "architectures", "new_decoder_architecture", "multi_query")
            return {k: cfg[k] for k in keys if k in cfg}
    return None


def route_source(target: str) -> str | None:
    """This node's source address for packets to `target` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def hostname_addresses() -> list[str]:
    """The addresses this node's own name resolves to, loopback last."""
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    addrs = list(dict.fromkeys(str(i[4][0]) for i in infos))
    return sorted(addrs, key=lambda a: a.startswith("127.") or a == "::1")


def op_address(args: dict[str, Any]) -> dict[str, Any]:
    """The address the other nodes should use for this one, when SSH cannot tell (a proxy).

    First the source address of the route toward another node (`toward`, in order), then the
    addresses of the node's own name; loopback only when every rank is on this node.
    """
    for target in args.get("toward") or []:
        src = route_source(target)
        if src:
            return {"address": src, "how": f"its route toward {target}"}
    addrs = hostname_addresses()
    good = [a for a in addrs if not (a.startswith("127.") or a == "::1")]
    if good:
        return {"address": good[0], "how": f"its name {socket.gethostname()}"}
    if args.get("loopback_ok"):
        return {"address": "127.0.0.1", "how": "loopback (every rank is on this node)"}
    return {"address": None, "how": ""}


def op_rdzv_write(args: dict[str, Any]) -> dict[str, Any]:
    """Write a probe file in the rendezvous directory; the other nodes must see the same bytes."""
    d = Path(args["dir"])
    if not d.is_dir():
        raise NodeOpError(f"{d} does not exist or is not a directory")
    token = uuid.uuid4().hex
    path = d / f"{PROBE_PREFIX}{token}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, token.encode())
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        raise NodeOpError(f"cannot write in {d}: {e.strerror}") from None
    return {"path": str(path), "token": token}


def op_rdzv_read(args: dict[str, Any]) -> dict[str, Any]:
    d = Path(args["dir"])
    if not d.is_dir():
        raise NodeOpError(f"{d} does not exist or is not a directory")
    try:
        seen = Path(args["path"]).read_text()
    except OSError:
        raise NodeOpError(f"{d} is not the same directory as on node 0 (probe file not visible)") from None
    if seen != args["token"]:
        raise NodeOpError(f"{d} is not the same directory as on node 0 (probe file differs)")
    if not os.access(d, os.W_OK):
        raise NodeOpError(f"{d} is not writable")
    return {"ok": True}


def op_remove(args: dict[str, Any]) -> dict[str, Any]:
    for p in args["paths"]:
        with contextlib.suppress(OSError):
            os.unlink(p)
    return {"ok": True}
