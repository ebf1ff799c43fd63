"""The step policy of the paged engine: admission, chunked prefill, preemption, prefix reuse.

Pure policy over a `BlockPool` (no model, no tensors), run by rank 0 only; its decisions reach
the other ranks as data (`Plan`), so they never need a scheduler of their own.

The interface, in the order the loop calls it each step:

- `add(key, prompt, budget, every)`: a row waits to join (`fits` says beforehand whether it ever
  can); `every` asks for its prompt's logits at every position, so it takes no cached prefix;
- `schedule(budget) -> Plan`: this step's chunks, one per scheduled row, within the token budget
  (`step_tokens`, or less where the loop caps a step's time: `engine/stepcost.py`);
- `commit(plan)`: the forward ran: the chunks' tokens are in the cache;
- `append(key, token)` for each row that goes on with a new token, `finish(key)` for each row
  that is done (or went away, whether running or waiting): its blocks go back to the pool.

Each step, as vLLM's v1 scheduler does: every running row, oldest first, gets its next tokens
(one when decoding; the next chunk of its prompt while prefilling) up to `step_tokens` in all.
When the pool has no block for a running row, the newest running rows are preempted: their
blocks are freed and they wait again at the head of the queue, to be recomputed from their
prompt and the tokens they already generated (so a preempted row never fails, and greedy
output is unchanged). Then, unless someone was preempted, waiting rows join in order while
the budget, the row limit and the pool allow: a joiner first takes the longest cached prefix of
its prompt's full blocks (at least one token is always computed, for the logits), then blocks
for its first chunk, and joins only if one block per running row stays free after that.

A waiting row whose next prompt block a running row is computing right now (the `n` samples of
one prompt, or the same long system prompt arriving twice at once) waits for it instead of
computing it too: the block is in the prefix cache one step later, and the rows behind it join
meanwhile. The twins share that block, not merely the same numbers in two.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dslaunch.engine.blocks import ROOT, BlockPool, chain


@dataclass(eq=False)
class Seq:
    """One row as the scheduler sees it: its tokens, what of them is cached, its blocks."""

    key: int
    tokens: list[int]  # prompt, then every generated token (the last one not yet fed)
    prompt_len: int
    budget: int
    hashes: list[bytes]  # of the prompt's full blocks
    computed: int = 0  # tokens whose K/V are in the row's blocks
    blocks: list[int] = field(default_factory=list)
    published: int = 0  # leading blocks already in the prefix cache (or taken from it)
    every: bool = False  # its prompt's logits are wanted at every position (prompt logprobs)


@dataclass(frozen=True)
class Chunk:
    """What one row computes in a step: `tokens` at positions `start ...`, over `table`."""

    key: int
    start: int
    tokens: list[int]
    table: list[int]
    sample: bool  # the chunk ends at the row's last token: its logits choose the next one
    every: bool = False  # the logits of every position are wanted (prompt logprobs), not just the last


@dataclass(frozen=True)
class Plan:
    """One step: the chunks to compute, in row order, and who was preempted to make room."""

    chunks: list[Chunk]
    preempted: list[int]
    joined: list[int]


class Scheduler:
    """Admission, chunking, preemption and prefix reuse over one block pool (module docstring)."""

    def __init__(
        self, blocks: int, block_size: int, max_rows: int, step_tokens: int, prefix_caching: bool = True
    ) -> None:
        if max_rows < 1 or step_tokens < 1:
            raise ValueError("a scheduler needs at least one row and one token per step")
        self.pool = BlockPool(blocks, block_size)
        self.size = block_size
        self.max_rows, self.step_tokens = max_rows, step_tokens
        self.prefix_caching = prefix_caching
        self.running: list[Seq] = []
        self.waiting: deque[Seq] = deque()
        self.seqs: dict[int, Seq] = {}
        self.queries = self.hits = self.preemptions = 0

    # -- the interface --------------------------------------------------------------------------
    def fits(self, prompt_len: int, budget: int) -> bool:
        """Whether a row could ever run: alone, it holds prompt + budget tokens at most."""
        return -(-(prompt_len + budget) // self.size) <= self.pool.total

    def add(self, key: int, prompt: list[int], budget: int, every: bool = False) -> None:
        if key in self.seqs:
            raise ValueError(f"row {key} is already scheduled")
        if not prompt or not self.fits(len(prompt), budget):
            raise ValueError(f"row {key} can never fit in the pool")
        hashes, h = [], ROOT
        if self.prefix_caching:
            for i in range(len(prompt) // self.size):
                h = chain(h, prompt[i * self.size : (i + 1) * self.size])
                hashes.append(h)
        seq = Seq(key, list(prompt), len(prompt), budget, hashes, every=every)
        self.seqs[key] = seq
        self.waiting.append(seq)

    def decoding(self) -> int:
        """Running rows whose next chunk is one token: the rows a long step keeps waiting."""
        return sum(1 for seq in self.running if len(seq.tokens) - seq.computed == 1)

    def schedule(self, budget: int | None = None) -> Plan:
        """This step's chunks within `budget` tokens (at most `step_tokens`; None: `step_tokens`)."""
        left = self.step_tokens if budget is None else max(1, min(budget, self.step_tokens))
        chunks: list[Chunk] = []
        preempted: list[int] = []
        i = 0
        while i < len(self.running) and left > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.computed, left)
            while not self._grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.key)
                if victim is seq:
                    break
            else:
                chunks.append(self._chunk(seq, n))
                left -= n
                i += 1
        joined: list[int] = []
        computing = {h for seq in self.running for h in seq.hashes[seq.published :]}
        twins: list[Seq] = []  # waiting for a block a running row computes (module docstring)
        while not preempted and self.waiting and left > 0 and len(self.running) < self.max_rows:
            seq = self.waiting[0]
            if self._next_block(seq) in computing:
                twins.append(self.waiting.popleft())
                continue
            if not self._join(seq, left):
                break
            self.waiting.popleft()
            self.running.append(seq)
            n = min(len(seq.tokens) - seq.computed, left)
            chunks.append(self._chunk(seq, n))
            joined.append(seq.key)
            computing.update(seq.hashes[seq.published :])
            left -= n
        self.waiting.extendleft(reversed(twins))
        return Plan(chunks, preempted, joined)

    def commit(self, plan: Plan) -> None:
        """The plan's forward ran: its tokens are cached, and full prompt blocks are published."""
        for c in plan.chunks:
            seq = self.seqs[c.key]
            seq.computed = c.start + len(c.tokens)
            full = min(len(seq.hashes), seq.computed // self.size)
            for j in range(seq.published, full):
                self.pool.publish(seq.blocks[j], seq.hashes[j])
            seq.published = max(seq.published, full)

    def append(self, key: int, token: int) -> None:
        self.seqs[key].tokens.append(token)

    def finish(self, key: int) -> None:
        """A row is done or went away, running or waiting: its blocks go back to the pool."""
        seq = self.seqs.pop(key, None)
        if seq is None:
            return
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    def stalled(self, plan: Plan) -> bool:
        """Whether `plan` is empty and every later one would be too: rows wait, none runs, no one
        was preempted. `fits` refuses such a row up front, so this guards the loop from spinning."""
        return not plan.chunks and not plan.preempted and not self.running and bool(self.waiting)

    def reset(self) -> None:
        """Every row ends (a failed step): the pool is all free again, cached blocks kept."""
        for key in list(self.seqs):
            self.finish(key)

    def stats(self) -> dict[str, int]:
        """The counters `stats` and `/metrics` show; the prefix cache's in tokens, as vLLM counts."""
        return {
            "prefix_cache_queries": self.queries * self.size,
            "prefix_cache_hits": self.hits * self.size,
            "kv_blocks_used": self.pool.used,
            "kv_blocks_total": self.pool.total,
            "kv_block_size": self.size,
            "preemptions": self.preemptions,
        }

    # -- the parts --------------------------------------------------------------------------------
    def _need(self, seq: Seq, n: int) -> int:
        return max(0, -(-(seq.computed + n) // self.size) - len(seq.blocks))

    def _grow(self, seq: Seq, n: int) -> bool:
        got = self.pool.allocate(self._need(seq, n))
        if got is None:
            return False
        seq.blocks += got
        return True

    def _chunk(self, seq: Seq, n: int) -> Chunk:
        start = seq.computed
        end = start + n
        every = seq.every and start < seq.prompt_len - 1  # some of its logits score prompt tokens
        return Chunk(seq.key, start, seq.tokens[start:end], list(seq.blocks), end == len(seq.tokens), every)

    def _preempt(self, seq: Seq) -> None:
        self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.computed, seq.published = [], 0, 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _usable(self, seq: Seq) -> int:
        """How many of its prompt's full blocks a joining row may take from the cache."""
        # a row scoring its prompt computes all of it (it still publishes its blocks for others)
        return 0 if seq.every else min(len(seq.hashes), (len(seq.tokens) - 1) // self.size)

    def _next_block(self, seq: Seq) -> bytes | None:
        """The hash of the first usable prompt block not in the cache (None: none left)."""
        for h in seq.hashes[: self._usable(seq)]:
            if h not in self.pool.cached:
                return h
        return None

    def _join(self, seq: Seq, left: int) -> bool:
        """Take the cached prefix and the first chunk's blocks, or nothing and return False."""
        usable = self._usable(seq)
        hit = self.pool.lookup(seq.hashes[:usable]) if usable else []
        seq.blocks, seq.computed, seq.published = hit, len(hit) * self.size, len(hit)
        n = min(len(seq.tokens) - seq.computed, left)
        need = self._need(seq, n)
        if self.pool.free - need >= (len(self.running) if self.running else 0):
            got = self.pool.allocate(need)
            if got is not None:
                seq.blocks = hit + got
                self.queries += usable
                self.hits += len(hit)
                return True
        self.pool.release(hit)
        seq.blocks, seq.computed, seq.published = [], 0, 0
        return False
