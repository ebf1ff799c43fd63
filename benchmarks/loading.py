"""Loading a model at TP 2 and 4 on one node: shard-only loading (each rank reads the slices of the
safetensors files its shard holds) against `--whole-checkpoint` (every rank runs from_pretrained on
the whole model, then AutoTP), measured in the same run, interleaved.

The model is a Llama built from a config with random weights (default about 3 GB in fp32, one
safetensors file). For each case, while `up` runs, a sampler reads every 0.1 s:
- the node's used memory (MemTotal - MemAvailable: the page cache does not count), peak over the
  idle baseline taken just before `up`;
- each rank's peak RSS (VmHWM), and the checkpoint bytes it read: for `--whole-checkpoint`, the
  peak resident size of its mappings of the safetensors files (/proc/<pid>/smaps: from_pretrained
  maps them, and what it touched is what it read); for shard-only loading, which maps nothing, the
  bytes its reads asked for, from its log line;
- each rank's /proc/<pid>/io: read_bytes (what came from the disk: only meaningful after the page
  cache is dropped, which is tried before each case) and rchar (read() calls; mmap reads do not count);
- the time to ready (`up` returning).

    python benchmarks/loading.py [--hidden 2048 --layers 12] [--ranks 2 4] [--out benchmarks/results/loading.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import build_llama, dslaunch, table, write

SHARD_READ = re.compile(r"loaded this rank's shard only, from .*?: (\d+) of the checkpoint's \d+ bytes read")


def used_bytes() -> int:
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def drop_caches() -> bool:
    """Empty the page cache so read_bytes counts real reads; False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def checkpoint_pages(pid: int) -> int:
    """Bytes of the process's mappings of *.safetensors files that are resident: the checkpoint
    pages this rank has touched (read), whichever rank brought them into the page cache."""
    total, counting = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:  # a mapping's header: address range, perms, ..., path
                counting = line.rstrip().endswith(".safetensors")
            elif counting and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def proc_facts(pid: int) -> dict[str, int] | None:
    try:
        status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
        io = dict(ln.split(": ") for ln in Path(f"/proc/{pid}/io").read_text().splitlines())
        pages = checkpoint_pages(pid)
    except OSError:
        return None
    return {"hwm": int(status["VmHWM"].split()[0]) * 1024, "checkpoint_pages": pages,
            "read_bytes": int(io["read_bytes"]), "rchar": int(io["rchar"])}  # fmt: skip


class Sampler(threading.Thread):
    """Peaks of the node's used memory and of every rank's facts, while a job starts."""

    def __init__(self, work: Path) -> None:
        super().__init__(daemon=True)
        self.work, self.done = work, threading.Event()
        self.base = used_bytes()
        self.node_peak = 0
        self.ranks: dict[int, dict[str, int]] = {}  # rank -> the largest value seen of each fact

    def run(self) -> None:
        while not self.done.is_set():
            self.sample()
            time.sleep(0.1)

    def sample(self) -> None:
        self.node_peak = max(self.node_peak, used_bytes() - self.base)
        for f in self.work.glob("*/node*/ranks/rank*.json"):
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            facts = proc_facts(int(rec.get("pid") or 0)) if rec.get("pid") else None
            if facts:
                seen = self.ranks.setdefault(int(rec["rank"]), {})
                for k, v in facts.items():
                    seen[k] = max(seen.get(k, 0), v)


def case(model: Path, ranks: int, mode: str, root: Path) -> dict[str, Any]:
    env = {**os.environ, "DSLAUNCH_HOME": str(root / "home")}
    work = root / "work"
    dropped = drop_caches()
    time.sleep(1)
    sampler = Sampler(work)
    sampler.start()
    t0 = time.monotonic()
    args = ["up", "--num-gpus", str(ranks), "--model", str(model), "--work-dir", str(work), "--timeout", "900"]
    res = dslaunch(env, *args, *(["--whole-checkpoint"] if mode == "whole" else []), timeout=1000)
    ready = time.monotonic() - t0
    sampler.sample()
    sampler.done.set()
    sampler.join()
    logs = dslaunch(env, "logs", "--lines", "200").stdout
    down = dslaunch(env, "down")
    if res.returncode != 0 or down.returncode != 0:
        raise SystemExit(f"{mode} at {ranks} ranks failed:\n{res.stderr}\n{down.stderr}")
    said = "loaded this rank's shard only" if mode == "shard" else "loading the whole checkpoint"
    if logs.count(said) != ranks:
        raise SystemExit(f"{mode} at {ranks} ranks: the rank logs do not say {said!r} {ranks} times")
    per_rank = [sampler.ranks.get(r, {}) for r in range(ranks)]
    for r, n in zip(per_rank, (int(m) for m in SHARD_READ.findall(logs)), strict=False):
        r["checkpoint_read"] = n  # what the rank's preads asked for: it maps nothing
    return {"ranks": ranks, "mode": mode, "ready_s": ready, "node_peak": sampler.node_peak, "caches_dropped": dropped,
            "per_rank": per_rank}  # fmt: skip


def summary(c: dict[str, Any], size: int) -> dict[str, float]:
    """One case's numbers for the table, in GB and seconds."""
    gb = 1e9
    touched = [r.get("checkpoint_read", r.get("checkpoint_pages", 0)) for r in c["per_rank"]]
    return {"node_peak_gb": c["node_peak"] / gb, "node_over_model": c["node_peak"] / size,
            "rank_rss_gb": max(r.get("hwm", 0) for r in c["per_rank"]) / gb, "rank_read_gb": max(touched) / gb,
            "rank_read_over_share": max(touched) * c["ranks"] / size, "ready_s": c["ready_s"],
            "disk_read_gb": sum(r.get("read_bytes", 0) for r in c["per_rank"]) / gb}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--trials", type=int, default=2, help="rounds, interleaved; the table shows each case's best")
    ap.add_argument("--model-dir", help="where to build (or find) the model; default: a temporary directory")
    ap.add_argument("--out")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="loading-") as tmp:
        model = build_llama(Path(args.model_dir or tmp) / "llama", hidden=args.hidden, layers=args.layers)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        cases = []
        for _ in range(args.trials):
            for ranks in args.ranks:
                for mode in ("whole", "shard"):
                    with tempfile.TemporaryDirectory(prefix="loading-job-") as jobdir:
                        cases.append(case(model, ranks, mode, Path(jobdir)))
                        print(f"{mode} at {ranks} ranks: ready in {cases[-1]['ready_s']:.1f}s", flush=True)
    best: dict[tuple[int, str], dict[str, float]] = {}
    for c in cases:  # the best of the trials, figure by figure: what the case needs, less the noise
        s = summary(c, size)
        seen = best.setdefault((c["ranks"], c["mode"]), s)
        for k, v in s.items():
            seen[k] = min(seen[k], v)
    print(f"model {size / 1e9:.2f} GB, caches dropped: {all(c['caches_dropped'] for c in cases)}, "
          f"best of {args.trials}")  # fmt: skip
    cols = ["node_peak_gb", "node_over_model", "rank_rss_gb", "rank_read_gb", "rank_read_over_share",
            "disk_read_gb", "ready_s"]  # fmt: skip
    print(table(["ranks", "loading", "node peak GB", "÷ model", "rank peak RSS GB", "rank read of checkpoint GB",
                 "÷ its share", "disk read GB (all ranks)", "ready s"],
                [[r, m, *(v[k] for k in cols)] for (r, m), v in best.items()]))  # fmt: skip
    ratios = {str(r): {k: best[(r, "shard")][k] / best[(r, "whole")][k] for k in ("node_peak_gb", "rank_rss_gb",
                                                                                  "ready_s")}
              for r in args.ranks}  # fmt: skip
    for r, v in ratios.items():
        print(f"{r} ranks, shard-only / whole: node peak {v['node_peak_gb']:.2f}, rank peak RSS "
              f"{v['rank_rss_gb']:.2f}, time to ready {v['ready_s']:.2f}")  # fmt: skip
    write("loading", {"model_bytes": size, "hidden": args.hidden, "layers": args.layers, "trials": args.trials,
                      "cases": cases, "best": {f"{r}/{m}": v for (r, m), v in best.items()},
                      "shard_over_whole": ratios}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
