"""Sequence: one stream of tokens the engine computes (a request has n of them). Ids and counts
only, so the scheduler and block manager that read it never touch tensors."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from tandem.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the computed full blocks, in order
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_released_blocks: int = 0  # leading table entries already checked by release_dead_blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def fork(self, index: int) -> Sequence:
        """A sibling sharing everything computed so far (the block manager shares the blocks)."""
        return Sequence(self.request_id, list(self.token_ids), self.num_prompt_tokens, self.params, index,
                        status=self.status, block_hashes=list(self.block_hashes),
                        num_computed_tokens=self.num_computed_tokens, num_released_blocks=self.num_released_blocks,
                        num_cached_tokens=self.num_cached_tokens,
                        admitted=True)
