"""One engine, its model split over a group of ranks: tensor, pipeline and expert parallelism.

Rank 0 is the engine's own process: the scheduler, the block manager, the sampler, and rank 0's
share of the model with its KV pools. `DistributedRunner` stands where a ModelRunner stands in the
engine. Each step it broadcasts the step (StepInputs and the copy-on-write pairs, as int64 tensors:
nothing is pickled) to the other ranks and runs its own share; every rank runs `run_step` over the
same inputs with its own pools (the same block ids; its heads, its experts or its layers). The other
ranks run `serve_rank`: receive a step, run it, until rank 0 says stop.

Layout (tandem.parallel.ParallelConfig): rank = stage x S + index, S = max(T, E) ranks a stage.
- The ranks of a stage share a process group; tensor and expert parallelism's collectives are
  inside the model's modules (tandem.model.tensor_parallel, expert_parallel).
- Pipeline: the step's sequences are split into micro-batches (up to P, even in tokens). Stage s
  receives a micro-batch's hidden states from stage s - 1 (the rank of the same index), runs its
  layers and sends them on without waiting (isend), then takes the next micro-batch while stage
  s + 1 runs this one: the stages overlap. The last stage's index-0 rank sends the sampled rows'
  logits to rank 0. Each stage holds the KV pools of its own layers.

Failure: a step that fails on rank 0 (a collective failed: a rank died and its sockets closed, or
one hung past the group's timeout; or rank 0's own share raised, leaving the others waiting in a
collective) raises ParallelGroupError for the step's requests; the next step restarts the group as a
whole (the `restart` callable: new ranks, a new process group, every share reloaded) on empty
pools, and the engine forgets its prefix cache, whose blocks lived partly on the lost ranks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from tandem.config import ModelConfig
from tandem.engine.model_runner import ModelRunner, StepInputs, prepare
from tandem.errors import ConfigError, ParallelGroupError
from tandem.parallel import ParallelConfig

log = logging.getLogger(__name__)

_STOP, _STEP = 0, 1
_HEADER = 6  # op, tokens, sequences, block-table entries, picked rows, copies
_LOGITS_TAG = 1 << 20  # recv/send tags: micro-batch m's hidden states use m, its logits this + m


@dataclass
class RankPlace:
    """Where a rank sits in its group: its stage, its index in the stage, the stage's process
    group (None for a one-rank stage), and the layers its stage holds."""

    parallel: ParallelConfig
    rank: int
    stage: int
    index: int
    group: object | None
    layers: range

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.parallel.pipeline_parallel_size - 1


def place_rank(parallel: ParallelConfig, rank: int, num_layers: int) -> RankPlace:
    """This rank's place; creates every stage's process group (every rank must call it, in the
    same order, after init_process_group)."""
    size = parallel.stage_size
    stage, index = divmod(rank, size)
    group = None
    if size > 1:
        for s in range(parallel.pipeline_parallel_size):
            g = dist.new_group([parallel.rank_of(s, i) for i in range(size)])
            if s == stage:
                group = g
    return RankPlace(parallel, rank, stage, index, group, parallel.stage_layers(num_layers)[stage])


def shard(model: nn.Module, place: RankPlace) -> ModelConfig:
    """Cut a loaded (fused) model down to this rank's share, in place; returns the config its KV
    pools and attention metadata take (the rank's query and KV heads)."""
    from tandem.model.pipeline_parallel import split_stage
    from tandem.model.tensor_parallel import shard_model

    p = place.parallel
    p.check(model.config)
    if p.pipeline_parallel_size > 1:
        split_stage(model, place.stage, p.pipeline_parallel_size)
    t, e = p.tensor_parallel_size, p.expert_parallel_size
    if p.stage_size > 1:
        shard_model(model, place.index, p.stage_size, place.group, tensor=t > 1, experts=e > 1)
    attn = model.model.layers[0].self_attn
    return replace(model.config, num_heads=attn.num_heads, num_kv_heads=attn.num_kv_heads)


def kv_bytes_per_token(parallel: ParallelConfig, config: ModelConfig, kv_format, dtype: torch.dtype) -> int:
    """KV bytes a token takes on the busiest rank (the first stage holds the most layers)."""
    layers = len(parallel.stage_layers(config.num_layers)[0])
    return kv_format.bytes_per_token(layers, parallel.kv_heads_per_rank(config), config.head_dim, dtype)


# -- the step on the wire --------------------------------------------------------------------------
def _broadcast_step(step: StepInputs | None, copies: list[tuple[int, int]]) -> None:
    if step is None:
        dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0, 0], dtype=torch.long), src=0)
        return
    tables = [b for table, _, _ in step.rows for b in table]
    header = [_STEP, len(step.tokens), len(step.rows), len(tables), len(step.picked), len(copies)]
    body = (step.tokens + step.positions + [s for _, s, _ in step.rows] + [n for _, _, n in step.rows]
            + [len(t) for t, _, _ in step.rows] + tables + step.picked + [b for pair in copies for b in pair])
    dist.broadcast(torch.tensor(header, dtype=torch.long), src=0)
    dist.broadcast(torch.tensor(body, dtype=torch.long), src=0)


def _receive_step() -> tuple[StepInputs, list[tuple[int, int]]] | None:
    header = torch.empty(_HEADER, dtype=torch.long)
    dist.broadcast(header, src=0)
    op, n_tokens, n_seqs, n_table, n_picked, n_copies = header.tolist()
    if op == _STOP:
        return None
    body = torch.empty(2 * n_tokens + 3 * n_seqs + n_table + n_picked + 2 * n_copies, dtype=torch.long)
    dist.broadcast(body, src=0)
    values = body.tolist()

    def take(n: int) -> list[int]:
        nonlocal values
        part, values = values[:n], values[n:]
        return part
    tokens, positions = take(n_tokens), take(n_tokens)
    starts, nums, lengths = take(n_seqs), take(n_seqs), take(n_seqs)
    rows = [(take(length), start, num) for start, num, length in zip(starts, nums, lengths)]
    picked, flat = take(n_picked), take(2 * n_copies)
    return StepInputs(tokens, positions, rows, picked), list(zip(flat[::2], flat[1::2]))


def micro_batches(rows: list[tuple[list[int], int, int]], count: int) -> list[tuple[int, int]]:
    """Split the step's sequences into up to `count` contiguous groups of about equal tokens:
    [(first sequence, end), ...]."""
    count = max(1, min(count, len(rows)))
    total = sum(num for _, _, num in rows)
    bounds, seen, start = [], 0, 0
    for i, (_, _, num) in enumerate(rows):
        seen += num
        left_groups, left_rows = count - len(bounds) - 1, len(rows) - i - 1
        if left_groups and (seen * count >= total * (len(bounds) + 1) or left_rows == left_groups):
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(rows)))
    return [b for b in bounds if b[0] < b[1]]


@torch.inference_mode()
def run_step(runner: ModelRunner, place: RankPlace, step: StepInputs) -> torch.Tensor | None:
    """This rank's part of one step; rank 0 gets the logits of the picked rows (in order), the
    others None."""
    stages = place.parallel.pipeline_parallel_size
    if stages == 1:  # the stage's collectives are inside the model; every rank ends with the logits
        logits = runner.run(step)
        return logits if place.rank == 0 else None
    model, parallel = runner.model, place.parallel
    hidden_size, dtype = model.config.hidden_size, next(model.parameters()).dtype
    groups = micro_batches(step.rows, stages)
    offsets = [0]
    for _, _, num in step.rows:
        offsets.append(offsets[-1] + num)
    last_leader = parallel.rank_of(stages - 1, 0)
    sends, expected = [], []
    for m, (lo, hi) in enumerate(groups):
        t0, t1 = offsets[lo], offsets[hi]
        ids = torch.tensor([step.tokens[t0:t1]], device=runner.device)
        positions = torch.tensor([step.positions[t0:t1]], device=runner.device)
        x = None
        if not place.first_stage:
            x = torch.empty(1, t1 - t0, hidden_size, dtype=dtype)
            dist.recv(x, src=parallel.rank_of(place.stage - 1, place.index), tag=m)
        h = model(ids, positions, runner.attention(step.rows[lo:hi]), hidden_states=x)
        mine = [p - t0 for p in step.picked if t0 <= p < t1]
        expected.append(len(mine))
        if not place.last_stage:
            h = h.contiguous()
            sends.append((dist.isend(h, dst=parallel.rank_of(place.stage + 1, place.index), tag=m), h))
        elif mine:  # every rank of the last stage takes part in the vocabulary-parallel head
            logits = model.compute_logits(h[0][torch.tensor(mine)]).float().contiguous()
            if place.index == 0:
                sends.append((dist.isend(logits, dst=0, tag=_LOGITS_TAG + m), logits))
    for work, _ in sends:
        work.wait()
    if place.rank != 0:
        return None
    parts = []
    for m, n in enumerate(expected):
        if n:
            buffer = torch.empty(n, model.config.vocab_size)
            dist.recv(buffer, src=last_leader, tag=_LOGITS_TAG + m)
            parts.append(buffer)
    # the picked rows came micro-batch by micro-batch: put them back in the order asked for
    order = sorted(range(len(step.picked)), key=lambda j: _group_of(step.picked[j], groups, offsets))
    logits = torch.cat(parts) if parts else torch.empty(0, model.config.vocab_size)
    out = torch.empty_like(logits)
    out[torch.tensor(order, dtype=torch.long)] = logits
    return out


def _group_of(row: int, groups: list[tuple[int, int]], offsets: list[int]) -> int:
    return next(m for m, (lo, hi) in enumerate(groups) if offsets[lo] <= row < offsets[hi])


def serve_rank(runner: ModelRunner, place: RankPlace) -> None:
    """A rank other than 0: run the steps rank 0 broadcasts until it says stop."""
    while True:
        message = _receive_step()
        if message is None:
            return
        step, copies = message
        runner.copy_blocks(copies)
        run_step(runner, place, step)


class DistributedRunner:
    """Rank 0's runner: the engine's ModelRunner for a model split over a group.

    group: what started the other ranks (stop() stops them for a restart, close() for good;
    orchestration/rank_group.py); restart():
    a fresh (runner, group) pair after a failure, on empty pools of the same size."""

    def __init__(self, runner: ModelRunner, place: RankPlace, group, restart=None):
        self.local, self.place, self.group, self._restart = runner, place, group, restart
        self.failed: str | None = None
        self.restarts = 0

    @property
    def model(self) -> nn.Module:
        return self.local.model

    @property
    def num_blocks(self) -> int:
        return self.local.num_blocks

    def execute(self, scheduled, copies, sample_rows, num_rows=None) -> torch.Tensor:
        if self.failed is not None:
            self._recover()
        step = prepare(scheduled, sample_rows, num_rows)
        try:
            _broadcast_step(step, copies)
            self.local.copy_blocks(copies)
            return run_step(self.local, self.place, step)
        except Exception as exc:  # a peer gone, or rank 0 stopped mid-step: either way the ranks are out of step
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error("the parallel group failed during a step (%s); it restarts at the next step", self.failed)
            raise ParallelGroupError(f"the parallel group's step failed ({type(exc).__name__}: {exc}); the group "
                                     "restarts as a whole: retry the request") from exc

    def _recover(self) -> None:
        if self._restart is None:
            raise ParallelGroupError(f"the parallel group failed ({self.failed}) and cannot restart")
        try:
            self.group.stop(graceful=False)
        except Exception:  # noqa: BLE001 - it is being replaced; a failure to stop it changes nothing
            log.warning("stopping the failed parallel group raised", exc_info=True)
        try:
            self.local, self.place, self.group = self._restart()
        except Exception as exc:
            raise ParallelGroupError(f"the parallel group failed ({self.failed}) and its restart failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
        self.failed = None
        self.restarts += 1
        log.warning("the parallel group restarted (%d restarts)", self.restarts)

    def close(self) -> None:
        """Tell the ranks to stop, then stop them (idempotent)."""
        if self.group is None:
            return
        group, self.group = self.group, None
        graceful = self.failed is None
        if graceful:
            try:
                _broadcast_step(None, [])
                dist.barrier()  # no rank leaves gloo while another's last message is in flight
            except Exception:  # noqa: BLE001 - a rank already gone: stop the rest anyway
                graceful = False
        group.close(graceful=graceful)

    # The KV-cache store's data plane needs every rank's share of a block: not supported yet.
    def _no_transfer(self, *_args):
        raise ConfigError("KV blocks cannot move to or from a parallel group's pools yet: run parallel "
                          "workers aggregated (mode: aggregated), without a KV-cache store")

    block_layout = export_blocks = import_blocks = _no_transfer
