"""A request's samples (`n` > 1) side by side: their results gathered as choices, or their
events merged into one stream, choice by choice. Sample j of prompt i is choice i * n + j; one
sample failing ends the others."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from dslaunch.wire.protocol import Request


async def gather(ask: Any, collect: Callable[[Request], Awaitable[list[Any]]]) -> list[Any]:
    """Every sample's results, as choices."""
    if ask.n == 1:
        return list(await collect(ask.req))
    tasks = [asyncio.ensure_future(collect(r)) for r in ask.samples()]
    try:
        return ask.interleave(list(await asyncio.gather(*tasks)))
    finally:
        for t in tasks:
            t.cancel()


async def merged(ask: Any, run: Callable[[Request], AsyncIterator[Any]]) -> AsyncIterator[Any]:
    """Every sample's events as one request's: ("chunk", choice, text, logprobs) ..., then ("done", the
    choices' results). An error of any sample is raised here."""
    if ask.n == 1:
        async with contextlib.aclosing(run(ask.req)) as events:
            async for event in events:
                yield event
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(j: int, req: Request) -> None:
        try:
            async with contextlib.aclosing(run(req)) as events:
                async for event in events:
                    await queue.put((j, event))
        except Exception as e:  # handed to the reader, which raises it
            await queue.put((j, ("raise", e)))

    tasks = [asyncio.ensure_future(pump(j, r)) for j, r in enumerate(ask.samples())]
    results: dict[int, list[Any]] = {}
    try:
        while len(results) < ask.n:
            j, event = await queue.get()
            if event[0] == "raise":
                raise event[1]
            if event[0] == "chunk":
                yield ("chunk", event[1] * ask.n + j, *event[2:])
            else:
                results[j] = event[1]
        yield ("done", ask.interleave([results[j] for j in range(ask.n)]))
    finally:
        for t in tasks:
            t.cancel()
