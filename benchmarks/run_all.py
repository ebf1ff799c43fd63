"""`make bench`: every benchmark in turn, each printing its table and writing its JSON."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "fanout.py",
    "launchers.py",
    "serving.py",
    "versus.py",
    "http_api.py",
    "router.py",
    "replicas.py",
    "paged.py",
    "logprobs.py",
    "grammar.py",
    "rankstart.py",
    "plots.py",
]


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
