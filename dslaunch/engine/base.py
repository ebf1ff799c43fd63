"""Model loading and batched inference on every rank: transformers + DeepSpeed AutoTP.

Knows nothing of sockets. Every rank builds the same engine and calls `run` with the same work
in lock-step; only rank 0 decodes text and gets results back. Tokens chosen on rank 0 are
broadcast each step, so sampled generation cannot drift apart between ranks.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dslaunch.engine.decode import TextStream, make_generator, pick
from dslaunch.launch.spec import ServeSpec
from dslaunch.wire.protocol import BAD_REQUEST, GenParams, ProtocolError, Request

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
    """Rank 0's window onto the requests behind a batch's rows."""

    def chunk(self, row: int, text: str) -> None: ...

    def cancelled(self, row: int) -> bool: ...


class Engine(Protocol):
    task: str
    name: str

    def check(self, req: Request) -> None: ...

    def run(self, work: Work, sink: Sink | None) -> list[Any] | None: ...

    def probe(self) -> None: ...


def load_engine(opts: ServeSpec, ctx: EngineContext) -> Engine:
    """The engine for this job: a user handler, or a transformers model sharded by DeepSpeed."""
    if opts.handler:
        return HandlerEngine(opts.handler, ctx)
    path = opts.model or str(tiny_model(ctx.work_dir))
    if opts.task == "embed":
        return EmbedEngine(path, ctx, opts)
    return CausalLMEngine(path, ctx, opts)


def tiny_model(work_dir: Path) -> Path:
    """The built-in model. Build it before the process group exists: transformers writes weights
    only on rank 0 of an initialised group, and the rank that builds may be another."""
    from dslaunch import tinymodel

    return tinymodel.build(work_dir / "models" / tinymodel.NAME)


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


def _broadcast(t: Any, ctx: EngineContext) -> Any:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.broadcast(t, src=0)
    ctx.beat()
    return t


class _Pretrained:
    """Config, dtype and tokenizer of a transformers model directory (or hub name)."""

    def __init__(self, path: str, ctx: EngineContext, opts: ServeSpec, **tok_kw: Any) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.ctx = ctx
        self.name = path
        self.config = AutoConfig.from_pretrained(path)
        self.dtype = torch_dtype(opts.dtype, ctx.device, self.config)
        self.tok = AutoTokenizer.from_pretrained(path, **tok_kw)
        # the front checks prompts on its own thread; a fast tokenizer must not be used by two at once
        self.tok_lock = threading.Lock()


class CausalLMEngine(_Pretrained):
    """Prompts in, text out: a decode loop with per-row parameters, stops and streaming."""

    task = "generate"

    def __init__(self, path: str, ctx: EngineContext, opts: ServeSpec) -> None:
        from transformers import AutoModelForCausalLM

        super().__init__(path, ctx, opts, padding_side="left")
        config = self.config
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self.model = shard(model, ctx, self.dtype, opts)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)

    def check(self, req: Request) -> None:
        for i, prompt in enumerate(req.inputs):
            with self.tok_lock:
                n = len(self.tok(prompt)["input_ids"])
            if n >= self.max_positions:
                raise ProtocolError(
                    BAD_REQUEST, f"prompt {i} is {n} tokens; this model takes fewer than {self.max_positions}"
                )

    def _decode(self, ids: list[int]) -> str:
        with self.tok_lock:
            return self.tok.decode(ids, skip_special_tokens=True)

    def probe(self) -> None:
        import torch

        ids = torch.tensor([[self.tok.pad_token_id]], device=self.ctx.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=False)

    def run(self, work: Work, sink: Sink | None) -> list[dict[str, Any]] | None:
        import torch

        ctx, params = self.ctx, work.params
        with self.tok_lock:
            enc = self.tok(work.inputs, return_tensors="pt", padding=True)
        ids = enc["input_ids"].to(ctx.device)
        mask = enc["attention_mask"].to(ctx.device)
        rows = len(work.inputs)
        prompt_lens = [int(n) for n in mask.sum(dim=1).tolist()]
        # only rank 0 decodes and samples; the others feed the tokens it broadcasts
        streams = [TextStream(self._decode, p.stop) for p in params] if ctx.lead else []
        gens = [None if p.greedy else make_generator(p) for p in params] if ctx.lead else []
        counts = [0] * rows
        reasons: list[str | None] = [None] * rows
        position = (mask.long().cumsum(-1) - 1).clamp(min=0)
        feed, past = ids, None
        with torch.inference_mode():
            for _step in range(max(p.max_new_tokens for p in params)):
                out = self.model(
                    input_ids=feed, attention_mask=mask, position_ids=position, past_key_values=past, use_cache=True
                )
                past = out.past_key_values
                packet = torch.zeros(rows + 1, dtype=torch.long, device=ctx.device)
                if ctx.lead:
                    nxt = self._choose(out.logits[:, -1, :], params, gens, streams, counts, reasons, prompt_lens, sink)
                    packet[:rows] = torch.tensor(nxt, dtype=torch.long)
                    packet[rows] = int(all(r is not None for r in reasons))
                _broadcast(packet, ctx)
                if packet[rows].item():
                    break
                feed = packet[:rows].unsqueeze(1)
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                position = position[:, -1:] + 1
        if not ctx.lead:
            return None
        results = []
        for i, s in enumerate(streams):
            if reasons[i] is None:
                reasons[i] = "length"
            rest = s.finish()
            if rest and sink is not None:
                sink.chunk(i, rest)
            results.append(
                {"text": s.text, "tokens": counts[i], "prompt_tokens": prompt_lens[i], "finish_reason": reasons[i]}
            )
        return results

    def _choose(
        self,
        logits: Any,
        params: list[GenParams],
        gens: list[Any],
        streams: list[TextStream],
        counts: list[int],
        reasons: list[str | None],
        prompt_lens: list[int],
        sink: Sink | None,
    ) -> list[int]:
        """Rank 0: next token per row, and which rows are now finished (eos, stop, length, cancelled)."""
        pad = self.tok.pad_token_id
        nxt = []
        for i, p in enumerate(params):
            if reasons[i] is not None:
                nxt.append(pad)
                continue
            token = pick(logits[i], p, gens[i])
            nxt.append(token)
            if token in self.eos:
                reasons[i] = "eos"
            else:
                counts[i] += 1
                text = streams[i].push(token)
                if text and sink is not None:
                    sink.chunk(i, text)
                if streams[i].stopped:
                    reasons[i] = "stop"
                elif counts[i] >= p.max_new_tokens or prompt_lens[i] + counts[i] >= self.max_positions:
                    reasons[i] = "length"
            if reasons[i] is None and sink is not None and sink.cancelled(i):
                reasons[i] = "cancelled"
        return nxt


class EmbedEngine(_Pretrained):
    """Texts in, mean-pooled and L2-normalised vectors out (sentence-transformers style)."""

    task = "embed"

    def __init__(self, path: str, ctx: EngineContext, opts: ServeSpec) -> None:
        from transformers import AutoModel

        super().__init__(path, ctx, opts)
        config = self.config
        self.max_len = min(int(getattr(config, "max_position_embeddings", 512) or 512), 512)
        self.model = shard(AutoModel.from_pretrained(path, dtype=self.dtype), ctx, self.dtype, opts)

    def check(self, req: Request) -> None:
        return None  # long texts are truncated to the model's length, as sentence-transformers does

    def probe(self) -> None:
        self._embed(["ok"])

    def run(self, work: Work, sink: Sink | None) -> list[list[float]] | None:
        vectors = self._embed(work.inputs)
        return vectors.tolist() if self.ctx.lead else None

    def _embed(self, texts: list[str]) -> Any:
        import torch

        with self.tok_lock:
            enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")
        enc = {k: v.to(self.ctx.device) for k, v in enc.items()}
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()
        m = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()


class HandlerEngine:
    """A user's `module:Class` with `load(ctx)` and `__call__(batch) -> list`, run on every rank."""

    task = "custom"

    def __init__(self, spec: str, ctx: EngineContext) -> None:
        module_name, _, cls_name = spec.partition(":")
        module = importlib.import_module(module_name)
        self.obj = getattr(module, cls_name)()
        self.name = spec
        self.ctx = ctx
        self.obj.load(ctx)

    def check(self, req: Request) -> None:
        check = getattr(self.obj, "check", None)
        if check is not None:
            try:
                check(req.inputs)
            except ValueError as e:
                raise ProtocolError(BAD_REQUEST, str(e)) from None

    def probe(self) -> None:
        probe = getattr(self.obj, "probe", None)
        if probe is not None:
            probe()

    def run(self, work: Work, sink: Sink | None) -> list[Any] | None:
        out = list(self.obj(work.inputs))
        if len(out) != len(work.inputs):
            raise RuntimeError(f"handler {self.name} returned {len(out)} results for {len(work.inputs)} inputs")
        return out if self.ctx.lead else None
