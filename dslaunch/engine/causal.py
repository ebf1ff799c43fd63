"""Causal LMs: prompts in, text out, with per-row parameters, stop strings and streaming.

Served, the lock-step loop (`rank.lockstep`) runs it one step at a time: rows join and leave the
running batch (`KVBatch` on every rank, `Generation` on rank 0). `run` is the same machinery for
one whole batch in process (the offline baseline of the benchmarks, and tests).
"""

from __future__ import annotations

from typing import Any

from dslaunch.engine.base import EngineContext, Pretrained, Sink, Work, broadcast, load_model
from dslaunch.engine.generation import Generation, row_budget
from dslaunch.engine.grammar import Grammars
from dslaunch.engine.kvbatch import KVBatch, cache_keyword
from dslaunch.engine.kvsize import PoolSize, pool_size, token_bytes
from dslaunch.engine.packed import PackedBatch
from dslaunch.engine.paged import BLOCK_SIZE, PagedKV, StepLayout, supports_paged, use_paged
from dslaunch.engine.prompts import PromptTokenizer
from dslaunch.engine.scheduler import Scheduler
from dslaunch.wire.protocol import BAD_REQUEST, GenParams, ProtocolError, Request
from dslaunch.wire.serve import ServeSpec


class CausalLMEngine(Pretrained):
    """Prompts in, text out: a decode loop with per-row parameters, stops and streaming."""

    task = "generate"
    continuous = True

    def __init__(self, path: str, ctx: EngineContext, opts: ServeSpec) -> None:
        from transformers import AutoModelForCausalLM

        super().__init__(path, ctx, opts, padding_side="left")
        config = self.config
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = load_model(AutoModelForCausalLM, path, config, ctx, self.dtype, opts)
        self.cache_kw = cache_keyword(self.model)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab = int(getattr(config, "vocab_size", 0) or len(self.tok))
        self.max_batch_tokens = opts.max_batch_tokens
        self.max_batch_size, self.max_step_tokens = opts.max_batch_size, opts.max_step_tokens
        self.max_itl_ratio = opts.max_itl_ratio  # rank 0's loop caps steps with it (engine/stepcost.py)
        self.blocks = max(1, opts.max_batch_tokens // BLOCK_SIZE)
        self._serve_kv: PagedKV | None = None
        self.pool_size: PoolSize | None = None  # the paged path's pool (`engine/kvsize.py`)
        self.kv_path = self._choose_path(opts)
        self._run_kv: PagedKV | None = None  # `run`'s pool, kept: zeroing one costs several steps
        self.pad_id = int(self.tok.pad_token_id or 0)
        # the front's own tokenizer (rank 0 only: the other ranks never tokenize a prompt)
        self.prompts = PromptTokenizer(path, self.max_positions) if ctx.lead else None
        self.grammars = Grammars(self.tok, self.vocab, self.eos) if ctx.lead else None  # response_format, compiled once
        # decoding runs twice per row per step: call a fast tokenizer's backend directly when the
        # wrapper would only add its overhead (no clean-up of tokenization spaces)
        backend = getattr(self.tok, "backend_tokenizer", None)
        self._backend_decode = None if getattr(self.tok, "clean_up_tokenization_spaces", True) else backend

    def _choose_path(self, opts: ServeSpec) -> str:
        """ "paged" when the model's attention goes through transformers' AttentionInterface (and
        DeepSpeed did not inject kernels of its own): a one-token forward must then reach the
        paged function in every layer. Otherwise "padded": the left-padded cache (`KVBatch`).
        Every rank decides alike (same model, same flags)."""
        import torch

        if opts.kernel_inject or not supports_paged(self.model):
            return "padded"
        before = use_paged(self.model)
        try:
            with torch.inference_mode():
                layers, per_token = token_bytes(self.model, self.ctx.device)
        except Exception as e:
            print(f"paged attention failed its first forward ({type(e).__name__}: {e}); using the padded cache")
            layers = 0
        if layers == int(getattr(self.config, "num_hidden_layers", layers) or layers) and layers > 0:
            with torch.inference_mode():
                self.pool_size = pool_size(self.model, self.ctx, opts, per_token,
                                           min(self.max_step_tokens, self.max_positions))  # fmt: skip
                self.blocks = self.pool_size.blocks
                # the serving pool, made and every page of it touched before `ready`: made on the
                # first request instead, its zeroing ran in front of the first steps under load
                self._serve_kv = PagedKV(self.model, self.blocks, BLOCK_SIZE, self.ctx.device)
                self._serve_kv.probe()
            print(self.pool_size.describe(), flush=True)
            return "paged"
        use_paged(self.model, before)
        return "padded"

    # -- rank 0, the front's thread ---------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Tokenize the prompts (once) and refuse what cannot run; the ids travel on as `req.ids`."""
        assert self.prompts is not None
        limit, ids = self.max_positions, []
        for i, prompt in enumerate(req.inputs):
            if isinstance(prompt, list):  # token ids already: checked as a tokenized prompt is
                row = list(prompt)
            else:
                size = len(prompt.encode("utf-8", "surrogatepass"))
                if self.prompts.max_bytes is not None and size > self.prompts.max_bytes:
                    raise ProtocolError(BAD_REQUEST, f"prompt {i} is {size} bytes: over {limit} tokens for certain")
                row = self.prompts.encode(prompt)
            if not row:
                raise ProtocolError(BAD_REQUEST, f"prompt {i} has no tokens")
            if len(row) >= limit:
                raise ProtocolError(BAD_REQUEST, f"prompt {i} is {len(row)} tokens; the model takes fewer than {limit}")
            if max(row) >= self.vocab or min(row) < 0:
                raise ProtocolError(BAD_REQUEST, f"prompt {i} has a token outside the model's vocabulary")
            ids.append(row)
        if req.params.response_format is not None and self.grammars is not None:
            self.grammars.compile(req.params.response_format)  # a schema it refuses is a 400, here
        outside = [t for t, _ in req.params.logit_bias if t >= self.vocab]
        if outside:
            raise ProtocolError(BAD_REQUEST, f"'logit_bias' names token {outside[0]}, outside the model's vocabulary")
        if req.params.prompt_logprobs is not None and self.kv_path != "paged":
            raise ProtocolError(BAD_REQUEST, "'prompt_logprobs' (scoring the prompt, OpenAI's 'echo' with "
                                "'logprobs') needs the paged KV cache; this model runs on the padded one")  # fmt: skip
        if self.kv_path == "paged":
            need = max(self.cost(len(row), req.params) for row in ids)
            if len(ids) > self.max_batch_size or -(-need // BLOCK_SIZE) > self.blocks:
                raise ProtocolError(
                    BAD_REQUEST,
                    f"this request needs {len(ids)} rows of up to {need} tokens of KV cache (prompt + "
                    f"max_new_tokens); the job holds {self.max_batch_size} rows (--max-batch-size) and "
                    f"{self.blocks * BLOCK_SIZE} tokens ({self.pool_size.source if self.pool_size else 'its pool'})",
                )
            req.ids = ids
            return
        need = len(ids) * max(self.cost(len(row), req.params) for row in ids)
        if need > self.max_batch_tokens:
            raise ProtocolError(
                BAD_REQUEST,
                f"this request needs {need} tokens of KV cache (prompts + max_new_tokens, rows x longest); "
                f"the job allows {self.max_batch_tokens} in flight (--max-batch-tokens)",
            )
        req.ids = ids

    def cost(self, prompt_tokens: int, params: GenParams) -> int:
        """KV cache tokens a row may hold at most. The padded cache is left-padded to its longest
        row, so its admission counts rows x the longest cost against --max-batch-tokens."""
        return prompt_tokens + row_budget(prompt_tokens, params, self.max_positions)

    # -- every rank ---------------------------------------------------------------------------------
    def new_batch(self) -> KVBatch | PagedKV:
        """The running batch's KV cache on this rank: the block pool, or the left-padded cache."""
        if self._serve_kv is not None:
            return self._serve_kv
        return KVBatch(self.model, self.ctx.device, self.pad_id, self.cache_kw)

    def packed(self, max_rows: int | None = None) -> PackedBatch:
        """Rank 0's rows and scheduler over the block pool (paged path only)."""
        sched = Scheduler(self.blocks, BLOCK_SIZE, max_rows or self.max_batch_size, self.max_step_tokens)
        return PackedBatch(self.generation(), sched)

    def generation(self) -> Generation:
        """Rank 0's rows of a running batch, decoding with the engine's own tokenizer."""
        gen = Generation(self._decode, self.eos, self.max_positions)
        gen.grammars = self.grammars
        return gen

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True)

    def probe(self) -> None:
        """A one-token forward (deep health, start-up); over a pool of its own on the paged path."""
        import torch

        with torch.inference_mode():
            if self.kv_path == "paged":
                PagedKV(self.model, 1, BLOCK_SIZE, self.ctx.device).probe()
                return
            ids = torch.tensor([[self.pad_id]], device=self.ctx.device)
            self.model(input_ids=ids, use_cache=False)

    def run(self, work: Work, sink: Sink | None) -> list[dict[str, Any]] | None:
        """One whole batch in process, every rank together: all rows join at once and leave as
        they finish. Every rank tokenizes here; serving sends rank 0's ids instead."""
        import torch

        ctx = self.ctx
        with self.tok_lock:
            ids = [list(self.tok(p)["input_ids"]) for p in work.inputs]
        if self.kv_path == "paged":
            return self._run_paged(ids, work, sink)
        kv, gen = self.new_batch(), self.generation()
        results: list[Any] = [None] * len(ids)
        pairs = enumerate(zip(ids, work.params, strict=True))
        joined = [gen.row(x, p, _Collect(results, i, sink)) for i, (x, p) in pairs]
        with torch.inference_mode():
            logits = kv.step(None, [], ids)
            keep: list[int] = []
            while True:
                packet = torch.zeros(2 * len(ids) + 1, dtype=torch.long)
                if ctx.lead:
                    gen.advance(keep, joined, logits)
                    joined = []
                    keep, tokens = gen.survivors()
                    packet[0] = len(keep)
                    packet[1 : 1 + len(keep)] = torch.tensor(keep, dtype=torch.long)
                    packet[1 + len(ids) : 1 + len(ids) + len(keep)] = torch.tensor(tokens, dtype=torch.long)
                broadcast(packet, ctx)
                n = int(packet[0])
                if not n:
                    return results if ctx.lead else None
                keep = packet[1 : 1 + n].tolist()
                logits = kv.step(keep, packet[1 + len(ids) : 1 + len(ids) + n].tolist(), [])

    def _run_paged(self, ids: list[list[int]], work: Work, sink: Sink | None) -> list[dict[str, Any]] | None:
        """`run` over the block pool: rank 0's scheduler decides every step, as when serving."""
        import torch

        if self._run_kv is None:
            self._run_kv = PagedKV(self.model, self.blocks, BLOCK_SIZE, self.ctx.device)
        kv, batch = self._run_kv, self.packed(max_rows=len(ids))
        results: list[Any] = [None] * len(ids)
        for i, (x, p) in enumerate(zip(ids, work.params, strict=True)):
            if self.ctx.lead:
                batch.add(x, p, _Collect(results, i, sink))
        with torch.inference_mode():
            while True:
                plan = batch.plan() if self.ctx.lead else None
                flat = StepLayout.of_plan(plan.chunks).flat() if plan is not None else []
                head = broadcast(torch.tensor([len(plan.chunks) if plan else 0, len(flat)], dtype=torch.long), self.ctx)
                rows, n = int(head[0]), int(head[1])
                if not rows:
                    return results if self.ctx.lead else None
                flat = broadcast(torch.tensor(flat or [0] * n, dtype=torch.long), self.ctx).tolist()
                logits = kv.step(StepLayout.of_flat(flat, rows, self.blocks, BLOCK_SIZE))
                if plan is not None:
                    batch.after(plan, logits)


class _Collect:
    """The row sink of `run`: results into a list, chunks to the batch's sink."""

    def __init__(self, results: list[Any], index: int, sink: Sink | None) -> None:
        self.results, self.index, self.sink = results, index, sink

    def chunk(self, text: str, logprobs: dict[str, Any] | None = None) -> None:
        if self.sink is not None:
            self.sink.chunk(self.index, text)

    def cancelled(self) -> bool:
        return self.sink is not None and self.sink.cancelled(self.index)

    def done(self, result: dict[str, Any]) -> None:
        self.results[self.index] = result

    def fail(self, code: str, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")
