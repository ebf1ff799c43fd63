"""The control channel from rank 0 to every rank: fixed-layout int64 tensors, never pickles.

Every message is one fixed-size int64 tensor broadcast from rank 0 over a separate gloo group
(never the NCCL stream). Layout, with B = --max-batch-size:

    [0] op  [1] seq  [2] rows before the step  [3] rows leaving  [4] rows joining
    [5] payload length  [6..7] reserved
    [8 : 8+B]      the token fed to each surviving row, in row order
    [8+B : 8+2B]   the indices of the rows leaving
    [8+2B : 8+3B]  the prompt length of each joining row

A step with joiners is followed by one flat int64 tensor of their prompt ids. A packed step (the
paged engine: [2] rows in the step, [5] payload length) is followed by one flat int64 tensor:
per row (start position, tokens, sample, blocks), then the block tables, then the tokens
(`engine/paged.StepLayout.flat`). A whole batch
(embed, handlers) by its inputs as UTF-8 JSON bytes. `seq` counts messages: a follower that
sees another number than it expects is out of step and ends.
"""

from __future__ import annotations

import json
import time
from typing import Any

STEP, BEAT, STOP, WORK, PROBE, PACKED = 1, 2, 3, 4, 5, 6
HEADER = 8
RESTARTING = "the job is restarting (a rank was lost); retry"


class Progress:
    """When this rank's serving loop last moved, and the work it is running (rank 0).

    Stamped by every control message and every decode step. A rank stuck in a collective because
    a peer hangs (stopped, not dead: no socket closes, so no error ever comes) stops stamping; the
    worker's watchdog notices and ends the rank, which restarts the job.
    """

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.batch: Any = None  # anything with fail(code, message): a batch, or the running rows

    def beat(self) -> None:
        self.last = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last


class Message:
    """One control message: the fixed-layout header of a step (or of a beat, stop, batch)."""

    def __init__(
        self,
        op: int,
        seq: int = 0,
        rows: int = 0,
        leave: list[int] | None = None,
        tokens: list[int] | None = None,
        joins: list[int] | None = None,
        payload: int = 0,
    ) -> None:
        """`leave`: row indices; `tokens`: one per surviving row; `joins`: each joiner's prompt length."""
        self.op, self.seq, self.rows, self.payload = op, seq, rows, payload
        self.leave, self.tokens, self.joins = leave or [], tokens or [], joins or []

    def pack(self, capacity: int) -> Any:
        import torch

        head = [self.op, self.seq, self.rows, len(self.leave), len(self.joins), self.payload, 0, 0]
        body = []
        for values in (self.tokens, self.leave, self.joins):
            if len(values) > capacity:
                raise ValueError(f"{len(values)} entries in a message for {capacity} rows")
            body += [*values, *([0] * (capacity - len(values)))]
        return torch.tensor(head + body, dtype=torch.int64)

    @classmethod
    def unpack(cls, t: Any, capacity: int) -> Message:
        v = t.tolist()
        op, seq, rows, leaving, joining, payload = v[:6]
        survivors = rows - leaving
        return cls(op, seq, rows, v[HEADER + capacity : HEADER + capacity + leaving],
                   v[HEADER : HEADER + survivors], v[HEADER + 2 * capacity : HEADER + 2 * capacity + joining],
                   payload)  # fmt: skip


class Channel:
    """Broadcasts from rank 0 to all ranks over a gloo group (a no-op in a world of one)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, progress: Progress | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.progress = progress or Progress()
        self.capacity = 8  # rows per step; set from --max-batch-size before the first message
        self.seq = 0
        self.group = None
        if world_size > 1:
            from datetime import timedelta

            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def _bcast(self, t: Any) -> Any:
        if self.group is not None:
            import torch.distributed as dist

            dist.broadcast(t, src=0, group=self.group)
        self.progress.beat()
        return t

    def send(self, msg: Message) -> None:
        msg.seq = self.seq
        self.seq += 1
        self._bcast(msg.pack(self.capacity))

    def recv(self) -> Message:
        import torch

        msg = Message.unpack(self._bcast(torch.zeros(HEADER + 3 * self.capacity, dtype=torch.int64)), self.capacity)
        if msg.seq != self.seq:
            raise RuntimeError(f"control message {msg.seq} arrived where {self.seq} was due: the ranks are out of step")
        self.seq += 1
        return msg

    def send_ids(self, ids: list[int]) -> None:
        import torch

        self._bcast(torch.tensor(ids, dtype=torch.int64))

    def recv_ids(self, n: int) -> list[int]:
        import torch

        return self._bcast(torch.zeros(n, dtype=torch.int64)).tolist()

    def send_bytes(self, data: bytes) -> None:
        import torch

        self._bcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv_bytes(self, n: int) -> bytes:
        import torch

        return bytes(self._bcast(torch.zeros(n, dtype=torch.uint8)).numpy().tobytes())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able `obj`, in rank order, on every rank (as JSON bytes, not pickles)."""
        if self.group is None:
            return [obj]
        import torch
        import torch.distributed as dist

        data = json.dumps(obj).encode()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        n = max(int(s) for s in sizes)
        mine = torch.zeros(n, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.zeros(n, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(out, mine, group=self.group)
        return [json.loads(o[: int(s)].numpy().tobytes()) for o, s in zip(out, sizes, strict=True)]


def peer_lost(e: BaseException) -> bool:
    """A collective failed (another rank went away, or the ranks are out of step): not an error
    of one request, and the end of this rank."""
    import torch.distributed as dist

    text = str(e).lower()
    words = ("connection", "closed by peer", "broken pipe", "out of step", "gloo", "nccl", "timed out")
    return isinstance(e, dist.DistError) or any(w in text for w in words)
