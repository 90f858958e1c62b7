"""Iteration-level scheduling (Orca's continuous batching, Yu et al. 2022) with chunked prefill
(Sarathi, Agrawal et al. 2023) and preemption by recomputation (vLLM).

Every step: running sequences first, oldest first (decodes take one token each, unfinished
prefills a chunk), then waiting ones first come, first served, all under a token budget and a
sequence limit. When the pool runs dry, the newest running sequence is preempted: its blocks are
freed and it returns to the head of the queue, to be recomputed later (its prefix may still be
cached). A variant that evicts by attention (H2O) bounds each sequence's step by its
`step_end`, so eviction points never depend on how the batch chunked it. Ids and counts only.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks, before the forward
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager,
                 step_end: Callable[[int], int] | None = None, may_run: Callable[[Sequence], bool] | None = None):
        """step_end(num_computed): how far a sequence's next step may compute (exclusive), or None: any length.
        may_run(seq): asked before a waiting sequence is admitted; False leaves it waiting and the
        ones behind it may go (the engine's LoRA slots: a sequence waits for its adapter's)."""
        self.config = config
        self.blocks = block_manager
        self.step_end = step_end
        self.may_run = may_run
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sibling of a running sequence joins the running set directly (it holds
        blocks already); like every running sequence it is scheduled within max_num_seqs."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = SequenceStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        queue, kept = list(self.running), []
        while queue:
            seq = queue.pop(0)
            num = min(seq.num_uncomputed_tokens, budget, self._room(seq))
            if num == 0 or len(out.scheduled) == self.config.max_num_seqs:
                kept.append(seq)
                continue
            while not self.blocks.can_append(seq, num):
                victim = queue.pop() if queue else seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.copies += self.blocks.append_slots(seq, num)
                out.scheduled.append((seq, num))
                budget -= num
                kept.append(seq)
        self.running = kept
        i = 0  # the first waiting sequence that may run
        while i < len(self.waiting) and not out.preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            if self.may_run is not None and not self.may_run(seq):
                i += 1
                continue
            if not self.blocks.can_allocate(seq, budget):
                break
            del self.waiting[i]
            self.blocks.allocate(seq, budget)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num = min(seq.num_uncomputed_tokens, budget, self._room(seq))
            if self.step_end is not None:  # hold no blocks past this step's end
                self.blocks.trim(seq)
                self.blocks.append_slots(seq, num)  # no copy: the block after a prefix hit is fresh
            out.scheduled.append((seq, num))
            budget -= num
        return out

    def _room(self, seq: Sequence) -> int:
        if self.step_end is None:
            return seq.num_uncomputed_tokens
        return self.step_end(seq.num_computed_tokens) - seq.num_computed_tokens

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        seq.spec_token_ids = []  # guesses are never worth a recomputation
        self.blocks.release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
