"""What `logprobs: 5` costs: throughput at 16 closed-loop clients with and without it.

The engine, the batcher and rank 0's real step loop in this process (`tests.inproc.Served`, one
rank, no sockets: what is measured is the engine's side, where logprobs are computed), the ~28M
Llama built from a config (or the built-in tiny model), greedy, 32 new tokens per request. The two
settings alternate round by round on the same engine, so both see the same machine load; the
table gives medians over rounds and their ratio.

    python benchmarks/logprobs.py [--seconds 4] [--rounds 3] [--clients 16] [--model llama28m|tiny]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import build_llama, closed_loop, table, write

NEW_TOKENS = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default="llama28m", choices=["llama28m", "tiny"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from dslaunch.engine import tinymodel
    from tests.inproc import Served

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-logprobs-"))
    model = build_llama(tmp / "llama28m") if args.model == "llama28m" else tinymodel.build(tmp / tinymodel.NAME)
    served = Served(model, tmp / "work", max_batch_size=args.clients, max_new_tokens=NEW_TOKENS, batch_wait_ms=0.0)
    settings: dict[str, dict[str, Any]] = {"plain": {}, "logprobs=5": {"logprobs": 5}}
    runs: dict[str, list[float]] = {name: [] for name in settings}
    try:
        for extra in settings.values():  # warm-up
            served.ask({"id": 0, "op": "generate", "prompt": "warm up", "max_new_tokens": 4, **extra})
        for _ in range(args.rounds):
            for name, extra in settings.items():

                def one(i: int, _state: dict[str, Any], extra: dict[str, Any] = extra) -> tuple[int, None]:
                    req = {"id": i, "op": "generate", "prompt": f"Request {i:02d}: the quick brown fox",
                           "max_new_tokens": NEW_TOKENS, "ignore_eos": True, **extra}  # fmt: skip
                    return int(served.ask(req)[0]["tokens"]), None

                runs[name].append(closed_loop(args.clients, args.seconds, one)["tokens_per_s"])
    finally:
        served.close()
    med = {name: statistics.median(v) for name, v in runs.items()}
    ratio = med["logprobs=5"] / med["plain"]
    print(table(["setting", "tokens/s (median)", "rounds", "vs plain"],
                [[n, med[n], len(runs[n]), med[n] / med["plain"]] for n in settings]))  # fmt: skip
    write("logprobs", {"model": args.model, "clients": args.clients, "seconds": args.seconds, "runs": runs,
                       "median_tokens_per_s": med, "ratio": ratio}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
