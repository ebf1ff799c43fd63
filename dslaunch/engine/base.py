"""Model loading and batched inference on every rank: transformers + DeepSpeed AutoTP.

Knows nothing of sockets. Every rank builds the same engine and runs the same steps in lock-step;
only rank 0 tokenizes, samples and decodes text. Tokens chosen on rank 0 travel to the other
ranks with each step, so sampled generation cannot drift apart between ranks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dslaunch.wire.protocol import GenParams, Request
from dslaunch.wire.serve import ServeSpec

OP_FOR_TASK = {"generate": "generate", "embed": "embed", "custom": "infer"}


@dataclass
class EngineContext:
    """What a rank knows about its place in the job; handed to user handlers as `ctx`."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    multi_node: bool
    work_dir: Path
    group: Any = None  # the torch.distributed default group, or None in a single process
    options: ServeSpec = field(default_factory=ServeSpec)  # --model, --task, --dtype, ...
    # Call between the steps of long work (a handler's loop): the hang watchdog (--hang-timeout)
    # restarts a job whose ranks stop making progress.
    beat: Callable[[], None] = field(default=lambda: None, repr=False)
    # Called while the weights load, with (bytes read, bytes this rank reads): `up` and `status` show it
    load_progress: Callable[[int, int], None] | None = field(default=None, repr=False)

    @property
    def lead(self) -> bool:
        return self.rank == 0


@dataclass
class Work:
    """One batch, the same on every rank: `inputs[i]` is generated with `params[i]`."""

    kind: str  # generate | embed | infer | probe
    inputs: list[Any]
    params: list[GenParams] = field(default_factory=list)


class Sink(Protocol):
    """Rank 0's window onto the requests behind a whole batch's rows (embed, handlers)."""

    def chunk(self, row: int, text: str) -> None: ...

    def cancelled(self, row: int) -> bool: ...


class RowSink(Protocol):
    """Rank 0's window onto the request behind one generated row: it may finish at any step."""

    def chunk(self, text: str, logprobs: dict[str, Any] | None = None) -> None:
        """Text the client does not have yet; with logprobs asked, those of the tokens it completes."""

    def cancelled(self) -> bool: ...

    def done(self, result: dict[str, Any]) -> None: ...

    def fail(self, code: str, message: str) -> None: ...


class Engine(Protocol):
    task: str
    name: str
    # True: the lock-step loop runs it step by step, rows joining and leaving (causal LMs);
    # False: whole batches through `run` (embed, handlers)
    continuous: bool

    def check(self, req: Request) -> None: ...

    def run(self, work: Work, sink: Sink | None) -> list[Any] | None: ...

    def probe(self) -> None: ...


def torch_dtype(name: str, device: str, config: Any) -> Any:
    """`auto` is fp32 on CPU (half precision is slow or missing there) and the model's own on GPU."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name != "auto":
        return table[name]
    if not device.startswith("cuda"):
        return torch.float32
    own = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    return own if own in (torch.float16, torch.bfloat16) else torch.float16


def shard(model: Any, ctx: EngineContext, dtype: Any, opts: ServeSpec) -> Any:
    """DeepSpeed AutoTP across all ranks; returns the module to call.

    DeepSpeed's CPU shared-memory all-reduce is JIT-built on first use and crashes when the ranks
    are not all on one machine, so it stays off unless asked for on a single node.
    """
    import deepspeed
    import deepspeed.ops

    if not ctx.device.startswith("cuda") and (ctx.multi_node or not opts.shm_allreduce):
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine = deepspeed.init_inference(
        model,
        tensor_parallel={"tp_size": ctx.world_size},
        dtype=dtype,
        replace_with_kernel_inject=opts.kernel_inject,
    )
    module = engine.module
    module.eval()
    return module


def load_model(auto_cls: Any, path: str, config: Any, ctx: EngineContext, dtype: Any, opts: ServeSpec) -> Any:
    """The sharded module: each rank reads only its shard's slices where it can (`shardload`),
    else the whole checkpoint through `from_pretrained` and AutoTP as before, saying why."""
    from dslaunch.engine.shardload import NotShardable, load_sharded

    why = "--kernel-inject shards on its own" if opts.kernel_inject else None
    why = "--whole-checkpoint" if opts.whole_checkpoint else why
    if ctx.world_size > 1 and why is None:
        try:
            return load_sharded(auto_cls, path, config, dtype, lambda m: shard(m, ctx, dtype, opts), ctx.rank,
                                ctx.load_progress)  # fmt: skip
        except NotShardable as e:
            why = str(e)
    if why and ctx.world_size > 1:
        print(f"loading the whole checkpoint on every rank: {why}", flush=True)
    return shard(auto_cls.from_pretrained(path, dtype=dtype), ctx, dtype, opts)


def broadcast(t: Any, ctx: EngineContext) -> Any:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast(t, src=0)
    ctx.beat()
    return t


class Pretrained:
    """Config, dtype and tokenizer of a transformers model directory (or hub name)."""

    def __init__(self, path: str, ctx: EngineContext, opts: ServeSpec, **tok_kw: Any) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.ctx = ctx
        self.name = path
        self.config = AutoConfig.from_pretrained(path)
        self.dtype = torch_dtype(opts.dtype, ctx.device, self.config)
        self.tok = AutoTokenizer.from_pretrained(path, **tok_kw)
        # a fast tokenizer must not be used by two threads at once (the front's, the loop's)
        self.tok_lock = threading.Lock()
