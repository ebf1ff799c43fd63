"""Which engine a job runs, and the built-in tiny model."""

from __future__ import annotations

from pathlib import Path

from dslaunch.engine.base import Engine, EngineContext
from dslaunch.wire.serve import ServeSpec


def load_engine(opts: ServeSpec, ctx: EngineContext) -> Engine:
    """The engine for this job: a user handler, or a transformers model sharded by DeepSpeed."""
    if opts.handler:
        from dslaunch.engine.handler import HandlerEngine

        return HandlerEngine(opts.handler, ctx)
    path = opts.model or str(tiny_model(ctx.work_dir))
    if opts.task == "embed":
        from dslaunch.engine.embed import EmbedEngine

        return EmbedEngine(path, ctx, opts)
    from dslaunch.engine.causal import CausalLMEngine

    return CausalLMEngine(path, ctx, opts)


def tiny_model(work_dir: Path) -> Path:
    """The built-in model. Build it before the process group exists: transformers writes weights
    only on rank 0 of an initialised group, and the rank that builds may be another."""
    from dslaunch.engine import tinymodel

    return tinymodel.build(work_dir / "models" / tinymodel.NAME)
