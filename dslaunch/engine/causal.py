"""Causal LMs: prompts in, text out, with per-row parameters, stop strings and streaming."""

from __future__ import annotations

from typing import Any

from dslaunch.engine.base import EngineContext, Pretrained, Sink, Work, broadcast, shard
from dslaunch.engine.decode import TextStream, make_generator, pick
from dslaunch.wire.protocol import BAD_REQUEST, GenParams, ProtocolError, Request
from dslaunch.wire.serve import ServeSpec


class CausalLMEngine(Pretrained):
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
                broadcast(packet, ctx)
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
