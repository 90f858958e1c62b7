"""The KV block manager: PagedAttention's "virtual memory for the KV cache" (Kwon et al. 2023)
with automatic prefix caching (vLLM / SGLang's RadixAttention idea, as a hash chain).

The pool is `num_blocks` fixed-size blocks. Each sequence has a block table; blocks are
reference-counted so sequences can share them. A full block whose KV has been computed is
identified by a hash chained over its parent's hash and its token ids, so a later request with the
same prefix reuses it. Freed blocks keep their content and stay findable until they are reused,
least recently freed first. A shared block that must change is copied first (copy-on-write).
Ids and counts only: the model runner carries out the copies this returns.

Blocks are given out as the tokens they hold are about to be computed (a long prompt is not
reserved whole at admission). With an attention variant that stops seeing old keys (sliding
window, sinks), `release_dead_blocks` frees the blocks no future query can see and leaves a
NULL_BLOCK hole in the table: the KV of such a sequence stops growing at its window. A variant
that evicts by received attention (H2O) leaves the same holes through `evict`; a sequence that has
evicted publishes no more blocks (its later KV was computed over a pruned context), and each block
it published before carries the attention its queries gave, so a prefix hit resumes the scores.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from tandem.engine.sequence import AttentionReceived, Sequence

NULL_BLOCK = -1  # a block-table entry whose block was released (out of every future query's view)


def chain_root(cache_salt: str | None, lora: str | None = None) -> bytes | None:
    """The parent of a hash chain's first block: a request's cache salt (SamplingParams.cache_salt)
    and its LoRA adapter, so requests with different salts or adapters never share a block, here
    or in the KV-cache store."""
    if lora is not None:
        cache_salt = f"lora:{len(lora)}:{lora}:{cache_salt or ''}"
    return hashlib.blake2b(cache_salt.encode(), digest_size=16, person=b"tandem-salt").digest() if cache_salt else None


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Content hash of a full block: stable across processes (the KV-cache store uses it too)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 max_scored_hit: int | None = None):
        """max_scored_hit: set for a variant that evicts by attention (KVEviction): sequences'
        received attention is kept, and a prefix hit covers at most this many blocks (those
        before the first eviction) and only blocks that carry their queries' attention."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.max_scored_hit = max_scored_hit
        # Per cached block: what its queries gave the blocks of its prefix (AttentionReceived's row).
        self.block_attention: list[list[float] | None] = [None] * num_blocks
        self.ref_counts = [0] * num_blocks
        self.hashes: list[bytes | None] = [None] * num_blocks  # hash of a computed full block
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first
        self.num_queried_tokens = 0  # prefix-cache statistics, over admitted prompts
        self.num_hit_tokens = 0

    # -- queries ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def chain(self, seq: Sequence, num_blocks: int | None = None) -> list[bytes]:
        """The hash chain of the sequence's first num_blocks full blocks (default: all of them),
        rooted in its cache salt. Each block's hash is computed once and kept on the sequence."""
        full = seq.num_tokens // self.block_size
        num_blocks = full if num_blocks is None else min(num_blocks, full)
        chain, size = seq.hash_chain, self.block_size
        while len(chain) < num_blocks:
            i = len(chain)
            chain.append(block_hash(chain[-1] if chain else chain_root(seq.params.cache_salt, seq.lora),
                                    seq.token_ids[i * size:(i + 1) * size]))
        return chain[:num_blocks]

    def _prefix_hits(self, seq: Sequence) -> list[tuple[int, bytes]]:
        """Cached blocks matching the sequence's leading full blocks. The last token is never
        a hit: its logits are needed, so at least one token is always computed."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        if self.max_scored_hit is not None:
            num_blocks = min(num_blocks, self.max_scored_hit)
        for h in self.chain(seq, num_blocks):
            block = self.cached.get(h)
            if block is None or (self.max_scored_hit is not None and self.block_attention[block] is None):
                break
            hits.append((block, h))
        return hits

    def _tokens_to_cover(self, seq: Sequence, num_hits: int, max_new: int | None) -> int:
        computed = num_hits * self.block_size
        return seq.num_tokens if max_new is None else min(seq.num_tokens, computed + max_new)

    def can_allocate(self, seq: Sequence, max_new: int | None = None) -> bool:
        """Whether a waiting sequence can get its prefix hits plus room for max_new more tokens (all)."""
        hits = self._prefix_hits(seq)
        revived = sum(1 for block, _ in hits if self.ref_counts[block] == 0)  # hits now on the free list
        needed = self.blocks_for(self._tokens_to_cover(seq, len(hits), max_new)) - len(hits)
        return needed <= self.num_free_blocks - revived

    def can_append(self, seq: Sequence, num_new: int) -> bool:
        return self._new_blocks_needed(seq, num_new) <= self.num_free_blocks

    def _new_blocks_needed(self, seq: Sequence, num_new: int) -> int:
        grow = max(0, self.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table))
        first = seq.num_computed_tokens // self.block_size
        copy = first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1
        return grow + int(copy)

    # -- changes ------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.hashes[block]
        if old is not None:  # its cached content is evicted now
            if self.cached.get(old) == block:
                del self.cached[old]
            self.hashes[block] = None
            self.block_attention[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate(self, seq: Sequence, max_new: int | None = None) -> None:
        """Give a waiting sequence its cached prefix blocks and blocks for the next max_new tokens
        (None: all its tokens); append_slots gives the rest as they are computed."""
        assert not seq.block_table, "allocate() is for sequences that hold no blocks"
        hits = self._prefix_hits(seq)
        for block, h in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            if self.max_scored_hit is not None:
                seq.attention.add(len(seq.block_table) - 1, [self.block_attention[block]])
        for _ in range(self.blocks_for(self._tokens_to_cover(seq, len(hits), max_new)) - len(hits)):
            seq.block_table.append(self._take_free())
        seq.num_computed_tokens = len(hits) * self.block_size
        if not seq.admitted:
            seq.num_cached_tokens = seq.num_computed_tokens
            self.num_queried_tokens += seq.num_prompt_tokens
            self.num_hit_tokens += seq.num_computed_tokens
        seq.admitted = True

    def append_slots(self, seq: Sequence, num_new: int) -> list[tuple[int, int]]:
        """Make room for the next num_new tokens; returns (src, dst) block copies to perform first."""
        copies = []
        first = seq.num_computed_tokens // self.block_size
        if first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1:
            shared = seq.block_table[first]
            self.ref_counts[shared] -= 1
            seq.block_table[first] = self._take_free()
            copies.append((shared, seq.block_table[first]))
        while len(seq.block_table) < self.blocks_for(seq.num_computed_tokens + num_new):
            seq.block_table.append(self._take_free())
        return copies

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly computed full blocks in the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        chain = self.chain(seq, num_full)
        while len(seq.block_hashes) < len(chain):
            i = len(seq.block_hashes)
            h = chain[i]
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if (self.enable_prefix_caching and block != NULL_BLOCK and h not in self.cached
                    and self.hashes[block] is None and not seq.attention.evicted):
                self.cached[h] = block
                self.hashes[block] = h
                if self.max_scored_hit is not None:
                    self.block_attention[block] = list(seq.attention.by_query_block[i])

    def release_dead_blocks(self, seq: Sequence, num_sink: int, window: int) -> None:
        """Free the blocks whose every token is out of sight of all future queries: neither one of
        the first num_sink tokens nor among the last `window` positions up to the next query
        (at position num_computed_tokens)."""
        first_live = seq.num_computed_tokens - window + 1
        first = max(seq.num_released_blocks, -(-num_sink // self.block_size))
        end = first_live // self.block_size  # blocks wholly before first_live
        for i in range(first, min(end, len(seq.block_table))):
            block = seq.block_table[i]
            if block != NULL_BLOCK:
                self._unref(block)
                seq.block_table[i] = NULL_BLOCK
        seq.num_released_blocks = max(seq.num_released_blocks, end)

    def live_blocks(self, seq: Sequence) -> list[int]:
        """Table indices of the blocks that hold the sequence's computed tokens and were not released."""
        return [i for i in range(min(self.blocks_for(seq.num_computed_tokens), len(seq.block_table)))
                if seq.block_table[i] != NULL_BLOCK]

    def evict(self, seq: Sequence, indices: list[int]) -> None:
        """Drop these table entries (an evicting variant's choice): each block is dereferenced (one
        shared through the prefix cache stays with its other holders, and cached) and leaves a
        NULL_BLOCK hole. From the first eviction on the sequence publishes no more blocks."""
        for i in indices:
            self._unref(seq.block_table[i])
            seq.block_table[i] = NULL_BLOCK
        if indices:
            seq.attention.evicted = True
            seq.attention.by_query_block = []  # only publishing needed it

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None
            if self.hashes[block] is None:
                self.free.move_to_end(block, last=False)

    def num_cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading blocks of a hash chain the cache holds."""
        num = 0
        while num < len(hashes) and hashes[num] in self.cached:
            num += 1
        return num

    def import_cached(self, hashes: list[bytes]) -> list[tuple[int, int]]:
        """Make room for blocks computed elsewhere (KV-cache store): each hash of the chain not
        cached yet gets a free block, registered as cached and unreferenced, to be found by the
        next prefix lookup like a block this pool computed. Returns (index in hashes, block id)
        of the blocks to fill; stops early when no free block is left."""
        taken = []
        for i, h in enumerate(hashes):
            if not self.enable_prefix_caching or not self.free:
                break
            if h in self.cached:
                continue
            block = self._take_free()
            self.ref_counts[block] = 0
            self.cached[h], self.hashes[block] = block, h
            self.free[block] = None  # most recently freed: evicted last
            taken.append((i, block))
        return taken

    def trim(self, seq: Sequence) -> None:
        """Give back the table's blocks past the sequence's computed tokens (taken for speculative
        guesses that were rejected); their slots hold nothing anyone reads."""
        keep = max(self.blocks_for(seq.num_computed_tokens), seq.num_released_blocks)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            if block != NULL_BLOCK:
                self._unref(block)

    def forget(self, block: int) -> None:
        """Drop an unreferenced block's cached content (it was never filled); it is reused first."""
        h = self.hashes[block]
        if h is not None and self.cached.get(h) == block:
            del self.cached[h]
        self.hashes[block] = None
        self.block_attention[block] = None
        self.free.move_to_end(block, last=False)

    def forget_all(self) -> None:
        """Drop the whole prefix cache (the pools' contents were lost: a parallel group restarted)."""
        for block in self.cached.values():  # referenced ones too: their sequences are failing
            self.hashes[block] = None
            self.block_attention[block] = None
        self.cached.clear()

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        child.num_released_blocks = parent.num_released_blocks
        for block in child.block_table:
            if block != NULL_BLOCK:
                self.ref_counts[block] += 1

    def release(self, seq: Sequence) -> None:
        """Drop the sequence's blocks. Cached ones stay findable (evicted last, the tail of a
        sequence before its head); uncached ones go to the front of the free list."""
        for block in reversed(seq.block_table):
            if block != NULL_BLOCK:
                self._unref(block)
        seq.block_table = []
        seq.num_released_blocks = 0
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.attention = AttentionReceived()  # a recomputation observes it all again

    def check_invariants(self, live: list[Sequence]) -> None:
        """Accounting check for tests: ref counts equal table references; free list = unreferenced."""
        counts = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                if block != NULL_BLOCK:
                    counts[block] += 1
        assert counts == self.ref_counts, "reference counts disagree with block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list is wrong"
        assert all(self.hashes[b] == h for h, b in self.cached.items()), "hash index is stale"
