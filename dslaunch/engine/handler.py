"""A user's own model code (`--handler module:Class`), run on every rank."""

from __future__ import annotations

import importlib
from typing import Any

from dslaunch.engine.base import EngineContext, Sink, Work
from dslaunch.wire.protocol import BAD_REQUEST, ProtocolError, Request


class HandlerEngine:
    """A user's `module:Class` with `load(ctx)` and `__call__(batch) -> list`, run on every rank."""

    task = "custom"
    continuous = False

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
