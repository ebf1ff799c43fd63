"""Rank 0 leads, every other rank follows: the serving loops over the control channel.

Rank 0 sends a heartbeat whenever it has been idle for `heartbeat_s`, so the followers' receive
never reaches the collective time-out, and a follower that died shows up as a failed send on
rank 0 within one heartbeat. Generate jobs run step by step (`steps.lead_steps`): rows join and
leave the running batch at every step. Embed and handler jobs run whole batches.

The loop rule: an error while serving one step or batch answers the requests involved, and the
loop goes on. Only a failed collective (a lost peer, ranks out of step) ends a rank.
"""

from __future__ import annotations

import json
import time
from typing import Any

from dslaunch.engine.base import Engine, Work
from dslaunch.engine.paged import BLOCK_SIZE, StepLayout
from dslaunch.rank.batches import capacity, probe, run_batch
from dslaunch.rank.channel import (
    BEAT,
    PACKED,
    PROBE,
    RESTARTING,
    STEP,
    STOP,
    WORK,
    Channel,
    Message,
    Progress,
    peer_lost,
)
from dslaunch.rank.paged_steps import lead_packed
from dslaunch.rank.steps import lead_steps

__all__ = ["RESTARTING", "Channel", "Progress", "follow", "lead", "peer_lost"]


def lead(engine: Engine, channel: Channel, source: Any, heartbeat_s: float) -> None:
    """Rank 0: run what the source hands out on every rank, answer; stop when the source closes."""
    channel.capacity = capacity(engine)
    if getattr(engine, "kv_path", None) == "paged":
        print("generate steps: packed, over the paged KV cache", flush=True)
        lead_packed(engine, channel, source, heartbeat_s)
        return
    if getattr(engine, "continuous", False):
        print("generate steps: continuous, over the left-padded KV cache", flush=True)
        lead_steps(engine, channel, source, heartbeat_s)
        return
    while True:
        batch = source.next_batch(heartbeat_s)
        if batch is None:
            channel.send(Message(STOP, 0))
            return
        if batch is False:
            channel.send(Message(BEAT, 0))
            continue
        t0 = time.perf_counter()
        channel.progress.batch = batch
        results = run_batch(engine, channel, batch)
        channel.progress.batch = None
        source.ran(batch, time.perf_counter() - t0, results or [])
        if results is not None:
            batch.resolve(results)


def follow(engine: Engine, channel: Channel) -> None:
    """Every other rank: run whatever rank 0 sends until it says stop."""
    channel.capacity = capacity(engine)
    kv: Any = engine.new_batch() if getattr(engine, "continuous", False) else None  # type: ignore[attr-defined]
    while True:
        msg = channel.recv()
        if msg.op == STOP:
            return
        if msg.op == STEP:
            assert kv is not None
            if getattr(kv, "rows", None) != msg.rows:
                raise RuntimeError(f"rank 0 steps {msg.rows} rows, this rank holds {kv.rows}: out of step")
            joins = _split(channel.recv_ids(msg.payload), msg.joins) if msg.joins else []
            leaving = set(msg.leave)
            keep = [i for i in range(msg.rows) if i not in leaving]
            _guarded(kv.step, (keep, msg.tokens, joins), kv.reset)
        elif msg.op == PACKED:
            assert kv is not None
            layout = StepLayout.of_flat(channel.recv_ids(msg.payload), msg.rows, kv.blocks, BLOCK_SIZE)
            _guarded(kv.step, (layout,), lambda: None)
        elif msg.op == WORK:
            obj = json.loads(channel.recv_bytes(msg.payload))
            _guarded(engine.run, (Work(obj["kind"], obj["inputs"]), None), lambda: None)
        elif msg.op == PROBE:
            probe(engine, channel)


def _split(flat: list[int], lengths: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in lengths:
        out.append(flat[at : at + n])
        at += n
    return out


def _guarded(fn: Any, args: tuple[Any, ...], reset: Any) -> None:
    """A follower's forward: a failed collective ends the rank; any other error is the same one
    rank 0 met and answered, so drop the work and go on."""
    try:
        import torch

        with torch.inference_mode():
            fn(*args)
    except Exception as e:
        if peer_lost(e):
            raise
        reset()
        print(f"a step failed on this rank too, dropped: {type(e).__name__}: {e}"[:500], flush=True)
