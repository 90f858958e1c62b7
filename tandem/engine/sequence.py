"""Sequence: one stream of tokens the engine computes (a request has n of them), and Request: the
engine's record of one request. Ids and counts only, so the scheduler and block manager that read
them never touch tensors."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from tandem.outputs import OutputBuilder, RequestMetrics
    from tandem.sampling import RandomStream
    from tandem.speculative import SpeculationState

_seq_ids = itertools.count()


@dataclass
class AttentionReceived:
    """The attention a sequence's KV blocks have received (softmax probabilities summed over
    queries, heads and layers), for a variant that evicts by it (tandem.model.attention.KVEviction).
    Plain floats by table index: the block manager and the variant's `select` read them."""

    per_block: list[float] = field(default_factory=list)  # block i: from every query so far
    # Row j: what the queries of block j gave blocks 0..j. Kept until the sequence first evicts:
    # the prefix cache publishes row j with block j, so a later hit starts from the same scores.
    by_query_block: list[list[float]] = field(default_factory=list)
    evicted: bool = False  # its later KV was computed over a pruned context: it publishes no more

    def add(self, first_query_block: int, rows: list[list[float]]) -> None:
        """Rows of what each query block from first_query_block on gave the key blocks 0.."""
        for r, row in enumerate(rows):
            _add_into(self.per_block, row)
            if not self.evicted:
                j = first_query_block + r
                while len(self.by_query_block) <= j:
                    self.by_query_block.append([])
                _add_into(self.by_query_block[j], row)

    def copy(self) -> AttentionReceived:
        return AttentionReceived(list(self.per_block), [list(r) for r in self.by_query_block], self.evicted)


def _add_into(total: list[float], row: list[float]) -> None:
    total.extend([0.0] * (len(row) - len(total)))
    for i, x in enumerate(row):
        total[i] += x


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # the real tokens: prompt, then output; never a draft guess
    num_prompt_tokens: int
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the computed full blocks, in order
    # The content-hash chain of the full blocks of token_ids, computed once per block and kept
    # (BlockManager.chain grows it): prefix lookups, commits and the KV connector all read it.
    hash_chain: list[bytes] = field(default_factory=list)
    # Draft tokens to verify this step (speculative decoding), held apart from token_ids: the
    # scheduler gives them slots and the runner computes them after the real ones; verification
    # moves the accepted ones into token_ids and clears this.
    spec_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_released_blocks: int = 0  # leading table entries already checked by release_dead_blocks
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    admitted: bool = False
    lora: str | None = None  # the LoRA adapter it runs with, its cache_key (None: the bare base): its chain's root
    lora_slot: int = -1  # its slot in the model (tandem.model.lora), held while the request lives
    attention: AttentionReceived = field(default_factory=AttentionReceived)  # kept for an evicting variant

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to compute, draft guesses included."""
        return len(self.token_ids) + len(self.spec_token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def tokens_to_compute(self, num: int) -> list[int]:
        """The next num tokens whose KV is to be computed: real tokens, then draft guesses."""
        start = self.num_computed_tokens
        real = self.token_ids[start:start + num]
        return real + self.spec_token_ids[:num - len(real)]

    def fork(self, index: int) -> Sequence:
        """A sibling sharing everything computed so far (the block manager shares the blocks)."""
        return Sequence(self.request_id, list(self.token_ids), self.num_prompt_tokens, self.params, index,
                        status=self.status, block_hashes=list(self.block_hashes), hash_chain=list(self.hash_chain),
                        num_computed_tokens=self.num_computed_tokens, num_released_blocks=self.num_released_blocks,
                        num_cached_tokens=self.num_cached_tokens, admitted=True, lora=self.lora,
                        lora_slot=self.lora_slot, attention=self.attention.copy())


@dataclass(eq=False)
class Request:
    """One request in the engine: its n sequences (one until its first token, then forked), what
    each sample has produced (an OutputBuilder each), its randomness and its speculation state."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sampling_args: tuple  # each logits processor's argument for this request (SamplerPipeline.prepare)
    seqs: list[Sequence] = field(default_factory=list)
    builders: list[OutputBuilder] = field(default_factory=list)
    randomness: list[RandomStream] = field(default_factory=list)  # one per sample
    error: str | None = None
    spec: SpeculationState | None = None  # speculative decoding, when on for this request
    prefill_only: bool = False  # done once every sample has its first token (the prefill role)
    resumed: bool = False  # started from tokens sampled elsewhere (the decode role, a migration)
    # The KV connector: prompt blocks that came from the external store, and whether the prompt's
    # blocks are still being saved there (a prefill_only request reports its output after that).
    num_loaded_blocks: int = 0
    num_local_blocks: int = 0  # leading prompt blocks this engine's prefix cache held at admission
    saving: bool = False
    resaved: bool = False  # blocks the store had lost were sent again (once per request)
    lora: str | None = None  # the LoRA adapter it runs with (its name), held until it ends
    lora_slot: int = -1  # the adapter's slot in the model, from its first admission (-1: none yet)

    def generator(self, index: int, ahead: int = 0) -> torch.Generator:
        """Sample `index`'s generator for the draw of its next token (`ahead` tokens further)."""
        return self.randomness[index].at(len(self.builders[index].token_ids) + ahead)

    @property
    def finished(self) -> bool:
        return len(self.builders) == self.params.n and all(
            b.finished or (self.prefill_only and b.token_ids) for b in self.builders)
