"""PNG plots from the JSON results: served vs offline, dslaunch vs transformers serve, ready time vs nodes.

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
        models = json.loads(serving.read_text())["models"]
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, (name, data) in zip(axes[0], models.items(), strict=True):
            levels = sorted(int(k) for k in data["offline"]["levels"])
            ax.plot(levels, [data["offline"]["levels"][str(c)]["tokens_per_s"] for c in levels], "k-o",
                    label="offline engine (all requests at once)")  # fmt: skip
            names = {"tp2": "served, 2 simulated nodes x 1 rank (TP=2)", "tp1": "served, 1 rank x 2 threads (TP=1)"}
            for key in (k for k in data if k != "offline"):
                ax.plot(levels, [data[key]["levels"][str(c)]["tokens_per_s"] for c in levels], "-o",
                        label=names.get(key, key))  # fmt: skip
            ax.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="tokens/s", xticks=levels,
                   xticklabels=[str(c) for c in levels], title=f"Served vs offline ({name}, CPU)")  # fmt: skip
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "serving.png", dpi=110)
        print(f"wrote {RESULTS / 'serving.png'}")
    versus = RESULTS / "versus.json"
    if versus.exists():
        models = json.loads(versus.read_text())["models"]
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
        for ax, (name, data) in zip(axes[0], models.items(), strict=True):
            for who, label in (
                ("dslaunch", "dslaunch"),
                ("transformers_serve", "transformers serve --continuous-batching"),
            ):
                levels = sorted(int(k) for k in data[who])
                ax.plot(levels, [data[who][str(c)]["tokens_per_s"] for c in levels], "-o", label=label)
            ax.set(xscale="log", xlabel="concurrent clients", ylabel="tokens/s", xticks=levels,
                   xticklabels=[str(c) for c in levels], title=f"One rank each ({name}, CPU)")  # fmt: skip
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "versus.png", dpi=110)
        print(f"wrote {RESULTS / 'versus.png'}")
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
