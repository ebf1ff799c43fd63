"""Node-side operations, run on every node as `python -m dslaunch.node.ctl OP` (JSON in, JSON out).

Standard library only, so it starts in milliseconds: the launch host polls it while waiting for a
job. Each op gets its arguments as one JSON object on stdin and prints one JSON object. The job's
processes are found by the `DSLAUNCH_JOB_ID`/`DSLAUNCH_NODE_RANK` pair in their environment, so
`stop` removes exactly what this job started, including workers whose agent was killed.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JOB_ENV = "DSLAUNCH_JOB_ID"
NODE_ENV = "DSLAUNCH_NODE_RANK"
AGENT_PID = "agent.pid"
AGENT_EXIT = "agent.exit"
AGENT_LOG = "agent.log"
PROBE_PREFIX = ".dslaunch-probe-"

# The agent runs under a tiny shell that records its exit status: the agent is detached
# (own session, survives the SSH session), so nobody else would ever see it.
_AGENT_WRAPPER = '"$@"; rc=$?; echo $rc > "$0.tmp" && mv "$0.tmp" "$0"'


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(path))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True for a running (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rsplit(b")", 1)[-1].split()[0]
    return state not in (b"Z", b"X")


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def job_processes(jid: str, node_rank: int | str) -> list[int]:
    """Pids of live processes whose environment carries this job's and node's marker."""
    want = {f"{JOB_ENV}={jid}".encode(), f"{NODE_ENV}={node_rank}".encode()}
    me = os.getpid()
    found: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if want <= env and _alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def _tail(path: Path, lines: int) -> list[str]:
    """The last `lines` lines of a text file (bounded read: logs can be large)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:] if lines > 0 else []


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _front_port(bind: str, port: int | None, avoid: set[int], scan: int = 100) -> dict[str, Any]:
    """The front's port on `bind`: the one asked for, or the first free from the default up."""
    fixed = port is not None
    first = port if port is not None else 7070
    for p in range(first, first + (1 if fixed else scan)):
        if p in avoid or p > 65535:
            continue
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((bind, p))
            except OSError as e:
                if fixed or e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    return {"error": f"cannot listen on {bind}:{p}: {e.strerror}"}
                continue
        return {"port": p}
    return {"error": f"no free port on {bind} from {first} to {first + scan - 1}"}


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
    """Versions, GPUs, cores, and (on node 0) free ports for the rendezvous and the process group."""
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
        out["busy_ports"] = [p for p in want if p is not None and not _port_free(p)]
        chosen: list[int] = []
        for p in want:
            chosen.append(p if p is not None else _free_port(taken))
            taken.add(chosen[-1])
        out["ports"] = chosen
        front = args.get("front")
        if front is not None:
            out["front"] = _front_port(front["bind"], front.get("port"), taken)
    model = args.get("model_dir")
    if model and not (_expand(model) / "config.json").is_file():
        out["model_dir_error"] = f"{model}: no such model directory here (no config.json)"
    work = args.get("work_dir")
    if work:
        d = _expand(work)
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            out["work_dir"] = str(d)
        except OSError as e:
            out["work_dir_error"] = f"{d}: {e.strerror}"
    return out


def op_rdzv_write(args: dict[str, Any]) -> dict[str, Any]:
    """Write a probe file in the rendezvous directory; the other nodes must see the same bytes."""
    d = Path(args["dir"])
    if not d.is_dir():
        return {"error": f"{d} does not exist or is not a directory"}
    token = uuid.uuid4().hex
    path = d / f"{PROBE_PREFIX}{token}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, token.encode())
        os.fsync(fd)
        os.close(fd)
    except OSError as e:
        return {"error": f"cannot write in {d}: {e.strerror}"}
    return {"path": str(path), "token": token}


def op_rdzv_read(args: dict[str, Any]) -> dict[str, Any]:
    d = Path(args["dir"])
    if not d.is_dir():
        return {"error": f"{d} does not exist or is not a directory"}
    try:
        seen = Path(args["path"]).read_text()
    except OSError:
        return {"error": f"{d} is not the same directory as on node 0 (probe file not visible)"}
    if seen != args["token"]:
        return {"error": f"{d} is not the same directory as on node 0 (probe file differs)"}
    if not os.access(d, os.W_OK):
        return {"error": f"{d} is not writable"}
    return {"ok": True}


def op_remove(args: dict[str, Any]) -> dict[str, Any]:
    for p in args["paths"]:
        with contextlib.suppress(OSError):
            os.unlink(p)
    return {"ok": True}


def op_start(args: dict[str, Any]) -> dict[str, Any]:
    """Start the torchrun agent detached (own session), logs to the node directory."""
    ndir = _expand(args["node_dir"])
    jid, node_rank = args["job_id"], args["node_rank"]
    if job_processes(jid, node_rank):
        return {"error": f"job {jid} is already running on this node"}
    for label, port in (args.get("free_ports") or {}).items():
        # pre-flight found these free, but anything may have taken them since: say so now rather
        # than let every restart fail on the same bind
        if not _port_free(int(port)):
            return {"error": f"{label} {port} was taken after pre-flight; run 'up' again to pick free ports"}
    for sub in ("", "ranks", "logs", "elastic"):
        (ndir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        (ndir / AGENT_EXIT).unlink()
    env = dict(os.environ)
    env.update(args["env"])
    env["DSLAUNCH_NODE_DIR"] = str(ndir)
    for name, text in (args.get("files") or {}).items():
        # secrets (the front's token) arrive on stdin and are written 0600, never in argv or env
        fd = os.open(ndir / Path(name).name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    if env.pop("DSLAUNCH_AUTO_THREADS", None) == "1" and "OMP_NUM_THREADS" not in args["env"]:
        # torchrun pins every rank to one thread when several share a node; divide the cores.
        nprocs = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nprocs))
    # The plan cannot know how `~` expands here: it writes {node_dir} and we fill it in.
    argv = [a.replace("{node_dir}", str(ndir)) for a in args["argv"]]
    log = os.fdopen(os.open(ndir / AGENT_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", _AGENT_WRAPPER, str(ndir / AGENT_EXIT), *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(ndir),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as e:
        return {"error": f"cannot start the agent: {e.strerror}"}
    finally:
        log.close()
    (ndir / AGENT_PID).write_text(str(proc.pid))
    # A missing interpreter or a bad flag fails at once: report it instead of a silent wait.
    time.sleep(float(args.get("settle", 0.3)))
    if proc.poll() is not None:
        return {"error": "the agent exited at once", "log": _tail(ndir / AGENT_LOG, 15)}
    return {"pid": proc.pid}


def _agent_state(ndir: Path) -> dict[str, Any]:
    pid_s = (ndir / AGENT_PID).read_text().strip() if (ndir / AGENT_PID).exists() else ""
    pid = int(pid_s) if pid_s.isdigit() else None
    exit_s = (ndir / AGENT_EXIT).read_text().strip() if (ndir / AGENT_EXIT).exists() else ""
    return {
        "pid": pid,
        "alive": bool(pid and _alive(pid)),
        "exit_code": int(exit_s) if exit_s.lstrip("-").isdigit() else None,
    }


def op_status(args: dict[str, Any]) -> dict[str, Any]:
    """Agent and per-rank state of this node, with log tails when something went wrong."""
    ndir = _expand(args["node_dir"])
    if not ndir.is_dir():
        return {"present": False, "agent": {"pid": None, "alive": False, "exit_code": None},
                "ranks": [], "procs": len(job_processes(args["job_id"], args["node_rank"]))}  # fmt: skip
    agent = _agent_state(ndir)
    ranks = []
    for f in sorted((ndir / "ranks").glob("rank*.json")):
        r = _read_json(f)
        if r is None:
            continue
        pid = r.get("pid")
        r["alive"] = bool(pid and _alive(pid))
        r["rss_mb"] = _rss_mb(pid) if r["alive"] else None
        ranks.append(r)
    out: dict[str, Any] = {
        "present": True,
        "agent": agent,
        "ranks": ranks,
        "procs": len(job_processes(args["job_id"], args["node_rank"])),
    }
    front = _read_json(ndir / "front.json")
    if front is not None:
        front["alive"] = bool(front.get("pid") and _alive(front["pid"]))
        front["age_s"] = round(time.time() - float(front.get("time", 0)), 1)  # this node's clock
        out["front"] = front
    tail = int(args.get("tail", 0))
    failed = tail and (not agent["alive"] or any(r.get("error") for r in ranks))
    # the log reads are for `status` only: `up` polls this op several times a second
    agent_log = _tail(ndir / AGENT_LOG, 2000) if failed or args.get("failures") else []
    if args.get("failures"):
        out["failures"] = worker_failures(agent_log, ndir / "logs")[-5:]
    if failed:
        out["agent_log"] = agent_failure(agent_log[-400:], keep=tail)
        out["rank_logs"] = {str(r["rank"]): _tail(ndir / "logs" / f"rank{r['rank']}.log", tail) for r in ranks}
    return out


_TORCH_LOG_RE = re.compile(r"^[WEIF]\d{4} \d\d:")
# torchrun's line when a worker ends badly, e.g.
# E1123 12:40:56.783000 1439 .../api.py:1002] failed (exitcode: -9) local_rank: 0 (pid: 2276) of binary: ...
_FAILED_RE = re.compile(
    r"^[WEIF](\d\d)(\d\d) (\d\d:\d\d:\d\d)\S* .*\bfailed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)"
)
_MARKER_RE = re.compile(r"^--- rank (\d+) pid (\d+) attempt (\d+)")


def worker_failures(agent_lines: list[str], logs: Path) -> list[dict[str, Any]]:
    """Every worker this node's agent saw fail: when, exit code (negative: signal), and its last words.

    Restarts overwrite the ranks' status files; the agent log and the rank logs (appended across
    attempts, each attempt opened by a marker line with its pid) are what remembers why.
    """
    out: list[dict[str, Any]] = []
    for line in agent_lines:
        m = _FAILED_RE.match(line)
        if m:
            month, day, clock, code, local_rank, pid = m.groups()
            out.append({"when": f"{month}-{day} {clock}", "exit_code": int(code), "local_rank": int(local_rank),
                        "pid": int(pid)})  # fmt: skip
    if not out:
        return out
    attempts: dict[int, tuple[int, int]] = {}  # pid -> (rank, job-wide attempt)
    last_words: dict[int, str] = {}
    for log in logs.glob("rank*.log"):
        pid = None
        for line in _tail(log, 5000):
            mk = _MARKER_RE.match(line)
            if mk:
                pid = int(mk.group(2))
                attempts[pid] = (int(mk.group(1)), int(mk.group(3)))
            elif pid and line.strip() and not _TORCH_LOG_RE.match(line):
                last_words[pid] = line.strip()[:300]
    for f in out:
        f["rank"], f["attempt"] = attempts.get(f["pid"], (None, None))
        if f["exit_code"] > 0 and f["pid"] in last_words:
            f["last_line"] = last_words[f["pid"]]
    return out


def agent_failure(lines: list[str], keep: int = 12) -> list[str]:
    """The useful part of a failed agent's log: what the workers printed, then torchrun's root cause.

    torchrun ends with a long traceback of its own and a summary; the cause a user needs is the
    worker output before it and the "Root Cause" block.
    """
    end = next((i for i, ln in enumerate(lines) if "torch/distributed/run.py" in ln), len(lines))
    start = end
    while start > 0 and not lines[start - 1].startswith("Traceback"):
        start -= 1
    body = lines[: start - 1] if start > 0 else lines[:end]
    worker = [ln for ln in body if ln.strip() and not _TORCH_LOG_RE.match(ln) and not ln.startswith("*****")
              and "OMP_NUM_THREADS" not in ln][-keep:]  # fmt: skip
    root: list[str] = []
    if "Root Cause (first observed failure):" in "\n".join(lines):
        i = max(i for i, ln in enumerate(lines) if "Root Cause (first observed failure):" in ln)
        for ln in lines[i + 1 :]:
            if ln.startswith("====="):
                break
            if ln.strip().startswith(("rank", "exitcode", "host", "traceback")):
                root.append("root cause: " + " ".join(ln.split()))
    return worker + root


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(jid: str, node_rank: int, deadline: float) -> list[int]:
    left = job_processes(jid, node_rank)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = job_processes(jid, node_rank)
    return left


def op_stop(args: dict[str, Any]) -> dict[str, Any]:
    """SIGTERM the agent's group, then stragglers, SIGKILL at the deadline; verify, then clean up."""
    ndir = _expand(args["node_dir"])
    jid, node_rank = args["job_id"], args["node_rank"]
    grace = float(args.get("grace", 10.0))
    found = job_processes(jid, node_rank)
    agent = _agent_state(ndir) if ndir.is_dir() else {"pid": None, "alive": False}
    start = time.monotonic()
    if agent["alive"]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(agent["pid"], signal.SIGTERM)
    # Give the agent half the grace to stop its workers itself (it forwards the signal).
    left = _wait_gone(jid, node_rank, start + (grace / 2 if agent["alive"] else 0))
    _signal_all(left, signal.SIGTERM)
    left = _wait_gone(jid, node_rank, start + grace)
    killed = list(left)
    _signal_all(left, signal.SIGKILL)
    left = _wait_gone(jid, node_rank, time.monotonic() + 5)
    out: dict[str, Any] = {"found": len(found), "killed": len(killed), "survivors": left}
    if not left:
        out["removed"] = _remove_run_files(ndir, bool(args.get("keep_logs")), args.get("rdzv_glob"))
    return out


def _remove_run_files(ndir: Path, keep_logs: bool, rdzv_glob: str | None) -> bool:
    if rdzv_glob:
        for p in glob.glob(rdzv_glob):
            with contextlib.suppress(OSError):
                os.unlink(p)
    if not ndir.is_dir():
        return False
    if keep_logs:
        for child in ndir.iterdir():
            if child.name not in ("logs", AGENT_LOG, "elastic"):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
    else:
        shutil.rmtree(ndir, ignore_errors=True)
        with contextlib.suppress(OSError):
            ndir.parent.rmdir()  # the job directory, once every node sharing it is gone
    return True


def op_procs(args: dict[str, Any]) -> dict[str, Any]:
    return {"pids": job_processes(args["job_id"], args["node_rank"])}


def _log_files(ndir: Path, ranks: list[int] | None) -> dict[str, Path]:
    files = {p.stem.removeprefix("rank"): p for p in sorted((ndir / "logs").glob("rank*.log"))}
    if ranks is not None:
        files = {k: v for k, v in files.items() if k.isdigit() and int(k) in ranks}
    return files


def op_logs(args: dict[str, Any]) -> dict[str, Any]:
    ndir = _expand(args["node_dir"])
    files = _log_files(ndir, args.get("ranks"))
    return {"logs": {k: _tail(p, int(args.get("lines", 100))) for k, p in files.items()}}


def follow(args: dict[str, Any]) -> Iterator[str]:
    """Yield `rank<TAB>line` for new lines of every rank log until stdin closes (client gone)."""
    ndir = _expand(args["node_dir"])
    offsets: dict[str, int] = {}
    partial: dict[str, bytes] = {}
    first = True
    while True:
        for rank, path in _log_files(ndir, args.get("ranks")).items():
            try:
                with open(path, "rb") as f:
                    if rank not in offsets:
                        f.seek(0, os.SEEK_END)
                        end = f.tell()
                        # on the first pass start near the end (like tail -f), later from 0
                        offsets[rank] = max(0, end - 8192) if first else 0
                    f.seek(offsets[rank])
                    data = f.read(1 << 20)
                    offsets[rank] += len(data)
            except OSError:
                continue
            buf = partial.get(rank, b"") + data
            *lines, partial[rank] = buf.split(b"\n")
            for line in lines:
                yield f"{rank}\t{line.decode('utf-8', 'replace')}"
        first = False
        ready, _, _ = select.select([sys.stdin], [], [], 0.25)
        if ready and not sys.stdin.buffer.read1(4096):
            return


OPS = {
    "probe": op_probe,
    "rdzv-write": op_rdzv_write,
    "rdzv-read": op_rdzv_read,
    "remove": op_remove,
    "start": op_start,
    "status": op_status,
    "stop": op_stop,
    "procs": op_procs,
    "logs": op_logs,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or (argv[0] not in OPS and argv[0] != "follow"):
        print(f"usage: python -m dslaunch.node.ctl {{{','.join([*OPS, 'follow'])}}}", file=sys.stderr)
        return 2
    line = sys.stdin.readline()
    args = json.loads(line) if line.strip() else {}
    if argv[0] == "follow":
        try:
            for out in follow(args):
                sys.stdout.write(out + "\n")
                sys.stdout.flush()
        except (BrokenPipeError, KeyboardInterrupt):
            pass
        return 0
    json.dump(OPS[argv[0]](args), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
