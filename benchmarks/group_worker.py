"""The worker the other launchers run in `launchers.py`: what a dslaunch rank does up to ready.

Reads the torch.distributed variables its launcher sets (RANK, WORLD_SIZE, MASTER_ADDR, ...),
forms a gloo group, loads the same built-in tiny model through DeepSpeed `init_inference` with the
same code as a dslaunch rank, writes `<ready dir>/rank<R>` and waits to be stopped.

    python benchmarks/group_worker.py --work DIR --ready DIR --tag TAG
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--ready", required=True)
    ap.add_argument("--tag", required=True, help="Marks this run's processes (found by command line).")
    args = ap.parse_args()
    import torch.distributed as dist

    from dslaunch.engine.base import EngineContext
    from dslaunch.engine.loader import load_engine, tiny_model
    from dslaunch.wire.serve import ServeSpec

    work = Path(args.work)
    tiny_model(work)
    dist.init_process_group("gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = EngineContext(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")), device="cpu",
                        multi_node=True, work_dir=work, group=dist.group.WORLD, options=ServeSpec())  # fmt: skip
    load_engine(ctx.options, ctx)
    (Path(args.ready) / f"rank{rank}").write_text(str(os.getpid()))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
