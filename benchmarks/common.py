"""What the benchmark scripts share: the repo on sys.path, running dslaunch, the machine, output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def dslaunch(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m dslaunch ARGS` as a user runs it; the caller checks the return code."""
    return subprocess.run([sys.executable, "-m", "dslaunch", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain right-aligned text table (also valid Markdown) for the terminal and the README."""
    cells = [[str(h) for h in headers]] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "| " + " | ".join("-" * (w - 1) + ":" for w in widths) + " |"]
                     + [line(r) for r in cells[1:]])  # fmt: skip


def write(name: str, result: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **result}, indent=1) + "\n")
    print(f"wrote {path}")
    return path
