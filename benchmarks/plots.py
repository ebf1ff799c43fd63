"""PNG plots from the JSON results: tokens/s vs concurrency (served vs offline), ready time vs nodes.

python benchmarks/plots.py   # reads and writes benchmarks/results/
"""

from __future__ import annotations

import json

from common import RESULTS


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    serving = RESULTS / "serving.json"
    if serving.exists():
        data = json.loads(serving.read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        levels = sorted(int(k) for k in data["offline"]["levels"])
        ax.plot(levels, [data["offline"]["levels"][str(c)]["tokens_per_s"] for c in levels], "k-o",
                label="offline engine (batch = concurrency)")  # fmt: skip
        for run in data["served"]:
            ax.plot(levels, [run["levels"][str(c)]["tokens_per_s"] for c in levels], "-o",
                    label=f"dslaunch served, --batch-wait-ms {run['batch_wait_ms']:g}")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="tokens/s", xticks=levels,
               xticklabels=[str(c) for c in levels], title="Served vs offline (2 ranks, tiny model, CPU)")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "serving.png", dpi=110)
        print(f"wrote {RESULTS / 'serving.png'}")
    launchers = RESULTS / "launchers.json"
    if launchers.exists():
        data = json.loads(launchers.read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("dslaunch", "deepspeed", "torchrun"):
            rows = sorted((r["nodes"], r["ready_s"]) for r in data["rows"] if r["launcher"] == name)
            label = {"deepspeed": "deepspeed (pdsh)", "torchrun": "torchrun by hand over ssh"}.get(name, name)
            ax.plot([n for n, _ in rows], [s for _, s in rows], "-o", label=label)
        ax.set(xlabel="simulated nodes (1 rank each)", ylabel="seconds to every rank ready",
               title="Launch time (same worker and model)")  # fmt: skip
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "launchers.png", dpi=110)
        print(f"wrote {RESULTS / 'launchers.png'}")


if __name__ == "__main__":
    main()
