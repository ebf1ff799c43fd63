"""An example `--handler`: your own model code, run on every rank in lock-step.

    dslaunch up -H hostfiles/localhost --handler sum_handler:ShardedSum --env PYTHONPATH=$PWD/examples
    dslaunch query --infer '{"values": [1, 2, 3, 4]}'          # one input
    dslaunch query --infer '[{"values": [1, 2]}, {"values": [3]}]'  # a list is a batch of inputs

`load(ctx)` runs once per rank after the process group exists; `__call__(batch)` gets the same
batch on every rank and returns one result per input (rank 0's results are the answer). Here
each rank sums its own slice of every input and an all-reduce joins the partial sums: the
shape of tensor-parallel work, small enough to read in a minute.
"""

from __future__ import annotations

from typing import Any


class ShardedSum:
    def load(self, ctx: Any) -> None:
        self.ctx = ctx  # rank, world_size, local_rank, device, group, options

    def check(self, inputs: list[Any]) -> None:
        """Optional, rank 0 only, before the batch is sent: a ValueError becomes `bad_request`."""
        for x in inputs:
            values = x.get("values") if isinstance(x, dict) else None
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError('each input must be {"values": [numbers...]}')

    def __call__(self, batch: list[dict[str, list[float]]]) -> list[dict[str, Any]]:
        import torch
        import torch.distributed as dist

        r, n = self.ctx.rank, self.ctx.world_size
        partial = torch.tensor([sum(x["values"][r::n]) for x in batch], dtype=torch.float64, device=self.ctx.device)
        if n > 1:
            dist.all_reduce(partial)
        return [{"sum": float(s), "ranks": n} for s in partial.tolist()]
