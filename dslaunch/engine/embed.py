"""Encoders: texts in, mean-pooled and L2-normalised vectors out."""

from __future__ import annotations

from typing import Any

from dslaunch.engine.base import EngineContext, Pretrained, Sink, Work, load_model
from dslaunch.wire.protocol import Request
from dslaunch.wire.serve import ServeSpec


class EmbedEngine(Pretrained):
    """Texts in, mean-pooled and L2-normalised vectors out (sentence-transformers style)."""

    task = "embed"
    continuous = False

    def __init__(self, path: str, ctx: EngineContext, opts: ServeSpec) -> None:
        from transformers import AutoModel

        super().__init__(path, ctx, opts)
        config = self.config
        self.max_len = min(int(getattr(config, "max_position_embeddings", 512) or 512), 512)
        self.model = load_model(AutoModel, path, self.config, ctx, self.dtype, opts)

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
