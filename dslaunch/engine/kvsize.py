"""How many blocks a rank's KV pool holds: from `--kv-cache-memory`, from `--max-batch-tokens`,
or on a GPU from the memory the weights and one step's activations leave free.

A token's K/V size is measured, not computed from the config: a one-block pool is filled by a
real forward, so DeepSpeed AutoTP's local heads, grouped-query heads and the KV dtype are what
they are at run time. The ranks of one replica must hold the same number of blocks (rank 0's
scheduler hands out block numbers that every rank indexes), so each rank works out its own
number and they all take the smallest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dslaunch.engine.paged import BLOCK_SIZE, PagedKV, StepLayout

GPU_SHARE = 0.9  # of a GPU's memory a rank may use in all, weights and pool together (vLLM's default)
MIB = 1 << 20
GPU_SOURCE = f"{GPU_SHARE:.0%} of the GPU's memory, less weights and a step's activations"


@dataclass(frozen=True)
class PoolSize:
    blocks: int
    token_bytes: int  # every layer's K and V for one token, on this rank
    source: str  # what set it: the flag, or the free GPU memory

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK_SIZE

    def status(self) -> dict[str, Any]:
        """For the rank's status file (`status`) and its log."""
        return {"tokens": self.tokens, "mib": round(self.tokens * self.token_bytes / MIB, 1), "from": self.source}

    def describe(self) -> str:
        return (f"KV pool: {self.tokens} tokens in {self.blocks} blocks of {BLOCK_SIZE}, "
                f"{self.tokens * self.token_bytes / MIB:.0f} MiB ({self.source})")  # fmt: skip


def token_bytes(model: Any, device: Any) -> tuple[int, int]:
    """(layers that used the pool, bytes of K and V per token) from a one-block pool's forward."""
    kv = PagedKV(model, 1, BLOCK_SIZE, device)
    layers = kv.probe()
    size = sum(t[0].numel() * t.element_size() for t in (*kv.keys, *kv.values))
    return layers, size


def pool_size(model: Any, ctx: Any, opts: Any, per_token: int, step_tokens: int) -> PoolSize:
    """The pool every rank of this replica holds (the smallest any of them can)."""
    block = per_token * BLOCK_SIZE
    free = None
    if opts.kv_cache_memory is not None:
        blocks, source = opts.kv_cache_memory // block, "--kv-cache-memory"
    elif str(ctx.device).startswith("cuda"):
        free = _gpu_budget(model, ctx.device, step_tokens, per_token)
        blocks, source = max(0, free) // block, GPU_SOURCE
    else:
        blocks, source = max(1, opts.max_batch_tokens // BLOCK_SIZE), "--max-batch-tokens"
    blocks = _smallest(blocks, ctx)  # before any rank refuses: the others would wait in the collective
    if blocks < 1 and free is None:
        raise ValueError(f"--kv-cache-memory {opts.kv_cache_memory} bytes holds no {BLOCK_SIZE}-token block "
                         f"of this model ({block} bytes each on this rank)")  # fmt: skip
    if blocks < 1:
        raise ValueError(f"no GPU memory is left for the KV cache after the weights on some rank of this replica "
                         f"({max(0, free or 0) / MIB:.0f} MiB on {ctx.device}); pass --kv-cache-memory, or spread "
                         "the model over more ranks with --tp")  # fmt: skip
    return PoolSize(blocks, per_token, source)


def _gpu_budget(model: Any, device: Any, step_tokens: int, per_token: int) -> int:
    """Bytes the pool may take: GPU_SHARE of the device, less what is in use (weights, other
    processes) and the activations of one full step, measured by running one."""
    import torch

    n = -(-step_tokens // BLOCK_SIZE)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    scratch = PagedKV(model, n, BLOCK_SIZE, device)
    scratch.step(StepLayout([0] * step_tokens, [0], [step_tokens], [list(range(n))], [True]))
    torch.cuda.synchronize(device)
    activations = max(0, torch.cuda.max_memory_allocated(device) - before - n * BLOCK_SIZE * per_token)
    del scratch
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(GPU_SHARE * total) - (total - free) - activations


def _smallest(blocks: int, ctx: Any) -> int:
    if ctx.world_size <= 1:
        return blocks
    import torch
    import torch.distributed as dist

    device = ctx.device if str(ctx.device).startswith("cuda") else "cpu"
    t = torch.tensor([blocks], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=ctx.group)
    ctx.beat()
    return int(t.item())
