"""Causal LMs: prompts in, text out, with per-row parameters, stop strings and streaming.

Served, the lock-step loop (`rank.lockstep`) runs it one step at a time: rows join and leave the
running batch (`KVBatch` on every rank, `Generation` on rank 0). `run` is the same machinery for
one whole batch in process (the offline baseline of the benchmarks, and tests).
"""

from __future__ import annotations

from typing import Any

from dslaunch.engine.base import EngineContext, Pretrained, Sink, Work, broadcast, shard
from dslaunch.engine.generation import Generation
from dslaunch.engine.kvbatch import KVBatch, cache_keyword
from dslaunch.engine.prompts import PromptTokenizer
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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        self.model = shard(model, ctx, self.dtype, opts)
        self.cache_kw = cache_keyword(self.model)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab = int(getattr(config, "vocab_size", 0) or len(self.tok))
        self.max_batch_tokens = opts.max_batch_tokens
        self.pad_id = int(self.tok.pad_token_id or 0)
        # the front's own tokenizer (rank 0 only: the other ranks never tokenize a prompt)
        self.prompts = PromptTokenizer(path, self.max_positions) if ctx.lead else None
        # decoding runs twice per row per step: call a fast tokenizer's backend directly when the
        # wrapper would only add its overhead (no clean-up of tokenization spaces)
        backend = getattr(self.tok, "backend_tokenizer", None)
        self._backend_decode = None if getattr(self.tok, "clean_up_tokenization_spaces", True) else backend

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
        outside = [t for t, _ in req.params.logit_bias if t >= self.vocab]
        if outside:
            raise ProtocolError(BAD_REQUEST, f"'logit_bias' names token {outside[0]}, outside the model's vocabulary")
        need = len(ids) * max(self.cost(len(row), req.params) for row in ids)
        if need > self.max_batch_tokens:
            raise ProtocolError(
                BAD_REQUEST,
                f"this request needs {need} tokens of KV cache (prompts + max_new_tokens, rows x longest); "
                f"the job allows {self.max_batch_tokens} in flight (--max-batch-tokens)",
            )
        req.ids = ids

    def cost(self, prompt_tokens: int, params: GenParams) -> int:
        """KV cache tokens a row may hold at most. The cache is left-padded to its longest row, so
        admission counts rows x the longest cost against --max-batch-tokens."""
        return prompt_tokens + max(1, min(params.max_new_tokens, self.max_positions - prompt_tokens))

    # -- every rank ---------------------------------------------------------------------------------
    def new_batch(self) -> KVBatch:
        return KVBatch(self.model, self.ctx.device, self.pad_id, self.cache_kw)

    def generation(self) -> Generation:
        """Rank 0's rows of a running batch, decoding with the engine's own tokenizer."""
        return Generation(self._decode, self.eos, self.max_positions)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode.decode(ids, skip_special_tokens=True)
        return self.tok.decode(ids, skip_special_tokens=True)

    def probe(self) -> None:
        import torch

        ids = torch.tensor([[self.pad_id]], device=self.ctx.device)
        with torch.inference_mode():
            self.model(input_ids=ids, use_cache=False)

    def run(self, work: Work, sink: Sink | None) -> list[dict[str, Any]] | None:
        """One whole batch in process, every rank together: all rows join at once and leave as
        they finish. Every rank tokenizes here; serving sends rank 0's ids instead."""
        import torch

        ctx = self.ctx
        with self.tok_lock:
            ids = [list(self.tok(p)["input_ids"]) for p in work.inputs]
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


class _Collect:
    """The row sink of `run`: results into a list, chunks to the batch's sink."""

    def __init__(self, results: list[Any], index: int, sink: Sink | None) -> None:
        self.results, self.index, self.sink = results, index, sink

    def chunk(self, text: str) -> None:
        if self.sink is not None:
            self.sink.chunk(self.index, text)

    def cancelled(self) -> bool:
        return self.sink is not None and self.sink.cancelled(self.index)

    def done(self, result: dict[str, Any]) -> None:
        self.results[self.index] = result

    def fail(self, code: str, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")
