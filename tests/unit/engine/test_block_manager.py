"""The KV block manager on its own (no model): pool accounting, hash-chained prefix caching, the
"last token is never a hit" rule, LRU eviction of freed cached blocks, copy-on-write after a fork,
and the capacity checks. Every test re-checks `check_invariants` after each change."""
from __future__ import annotations

import random

import pytest

from tandem.engine.block_manager import BlockManager, block_hash
from tandem.engine.sequence import Sequence
from tandem.sampling_params import SamplingParams

BS = 4


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), len(tokens), SamplingParams())


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the engine does after a forward that computed every pending token."""
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)

def forked_pair(bm: BlockManager, live: list, prompt: list[int]):
    """A computed prompt with one sampled token, forked into a sibling that shares its blocks."""
    parent = make_seq(prompt)
    admit(bm, parent, live)
    compute_all(bm, parent)
    parent.token_ids.append(1)
    child = parent.fork(1)
    bm.fork(parent, child)
    live.append(child)
    return parent, child


def admit(bm: BlockManager, seq: Sequence, live: list[Sequence]) -> None:
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    live.append(seq)
    bm.check_invariants(live)


def free_of(bm: BlockManager, seq: Sequence, live: list[Sequence]) -> None:
    bm.release(seq)
    live.remove(seq)
    bm.check_invariants(live)


def tokens(n: int, start: int = 10) -> list[int]:
    return list(range(start, start + n))


# -- accounting ---------------------------------------------------------------------------------
def test_allocate_and_release_accounting():
    bm, live = BlockManager(10, BS), []
    a, b = make_seq(tokens(10)), make_seq(tokens(4, 100))
    admit(bm, a, live)
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3
    assert bm.num_free_blocks == 7
    assert all(bm.ref_counts[blk] == 1 for blk in a.block_table)
    assert a.num_computed_tokens == 0  # nothing cached yet
    admit(bm, b, live)
    assert len(b.block_table) == 1 and not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 6
    free_of(bm, a, live)
    assert bm.num_free_blocks == 9 and a.block_table == [] and a.num_computed_tokens == 0
    free_of(bm, b, live)
    assert bm.num_free_blocks == 10 and bm.ref_counts == [0] * 10


def test_blocks_for_rounds_up():
    bm = BlockManager(4, BS)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_release_twice_is_harmless():
    bm, live = BlockManager(4, BS), []
    a = make_seq(tokens(5))
    admit(bm, a, live)
    free_of(bm, a, live)
    bm.release(a)  # an aborted request's already-finished sample is released again
    bm.check_invariants(live)
    assert bm.num_free_blocks == 4


# -- prefix caching -----------------------------------------------------------------------------
def test_prefix_hits_after_commit():
    bm, live = BlockManager(16, BS), []
    a = make_seq(tokens(14))  # 3 full blocks + 2 tokens
    admit(bm, a, live)
    compute_all(bm, a)
    assert len(a.block_hashes) == 3
    assert bm.num_hit_tokens == 0 and bm.num_queried_tokens == 14

    b = make_seq(tokens(12) + [300, 301, 302])  # same first 3 full blocks, different tail
    admit(bm, b, live)
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] not in a.block_table
    assert b.num_computed_tokens == b.num_cached_tokens == 3 * BS
    assert b.block_hashes == a.block_hashes
    assert [bm.ref_counts[blk] for blk in a.block_table] == [2, 2, 2, 1]
    assert bm.num_hit_tokens == 12 and bm.num_queried_tokens == 14 + 15


def test_partial_prefix_match_stops_at_first_differing_block():
    bm, live = BlockManager(16, BS), []
    a = make_seq(tokens(13))
    admit(bm, a, live)
    compute_all(bm, a)
    other = tokens(13)
    other[5] = 299  # second block differs
    b = make_seq(other)
    admit(bm, b, live)
    assert b.num_computed_tokens == BS and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]


def test_last_token_is_never_a_hit():
    bm, live = BlockManager(16, BS), []
    a = make_seq(tokens(3 * BS))  # exactly 3 full blocks
    admit(bm, a, live)
    compute_all(bm, a)
    assert len(a.block_hashes) == 3

    same = make_seq(tokens(3 * BS))
    admit(bm, same, live)
    assert same.num_computed_tokens == 2 * BS  # k full blocks -> k - 1 hits
    assert same.block_table[:2] == a.block_table[:2] and same.block_table[2] != a.block_table[2]
    assert same.num_uncomputed_tokens == BS

    longer = make_seq(tokens(3 * BS + 1))
    admit(bm, longer, live)
    assert longer.num_computed_tokens == 3 * BS and longer.block_table[:3] == a.block_table
    assert longer.num_uncomputed_tokens == 1


def test_single_block_prompt_gets_no_hit():
    bm, live = BlockManager(4, BS), []
    a = make_seq(tokens(BS))
    admit(bm, a, live)
    compute_all(bm, a)
    b = make_seq(tokens(BS))
    admit(bm, b, live)
    assert b.num_computed_tokens == 0 and b.block_table[0] != a.block_table[0]


def test_hash_chaining_same_block_after_a_different_prefix_is_not_a_hit():
    x, y, z = tokens(BS, 10), tokens(BS, 50), tokens(BS, 90)
    assert block_hash(None, y) != block_hash(block_hash(None, x), y)
    assert block_hash(block_hash(None, x), y) != block_hash(block_hash(None, z), y)
    assert block_hash(None, x) == block_hash(None, list(x))  # deterministic

    bm, live = BlockManager(16, BS), []
    a = make_seq(x + y + [1])
    admit(bm, a, live)
    compute_all(bm, a)
    b = make_seq(z + y + [1])  # block 1 has the same tokens, after a different block 0
    admit(bm, b, live)
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    c = make_seq(y + [1, 2])  # a's second block's tokens at position 0
    admit(bm, c, live)
    assert c.num_computed_tokens == 0


def test_no_hits_when_prefix_caching_is_disabled():
    bm, live = BlockManager(16, BS, enable_prefix_caching=False), []
    a = make_seq(tokens(13))
    admit(bm, a, live)
    compute_all(bm, a)
    assert bm.cached == {}
    b = make_seq(tokens(13))
    admit(bm, b, live)
    assert b.num_computed_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert bm.num_hit_tokens == 0 and bm.num_queried_tokens == 26


def test_commit_registers_only_full_computed_blocks():
    bm, live = BlockManager(8, BS), []
    a = make_seq(tokens(10))
    admit(bm, a, live)
    a.num_computed_tokens = 7  # a chunk: one full block and part of the second
    bm.commit(a)
    assert len(a.block_hashes) == 1 and len(bm.cached) == 1
    a.num_computed_tokens = 10
    bm.commit(a)
    assert len(a.block_hashes) == 2 and len(bm.cached) == 2
    assert set(bm.cached.values()) == set(a.block_table[:2])
    bm.check_invariants(live)


def test_identical_content_in_two_blocks_is_cached_once():
    bm, live = BlockManager(8, BS), []
    a, b = make_seq(tokens(9)), make_seq(tokens(9))
    admit(bm, a, live)
    admit(bm, b, live)  # admitted before a was computed: no hits, own blocks
    compute_all(bm, a)
    compute_all(bm, b)
    assert b.block_hashes == a.block_hashes
    owner = a.block_table[:2]
    assert set(bm.cached.values()) == set(owner)  # the first to commit owns the entry
    assert bm.hashes[b.block_table[0]] is None and bm.hashes[b.block_table[1]] is None
    free_of(bm, a, live)
    free_of(bm, b, live)
    c = make_seq(tokens(9))
    admit(bm, c, live)
    assert c.block_table[:2] == owner and c.num_computed_tokens == 2 * BS


# -- freed cached blocks and eviction -------------------------------------------------------------
def test_freed_cached_blocks_stay_reusable():
    bm, live = BlockManager(8, BS), []
    a = make_seq(tokens(9))
    admit(bm, a, live)
    compute_all(bm, a)
    prefix_blocks = a.block_table[:2]
    free_of(bm, a, live)
    assert bm.num_free_blocks == 8 and len(bm.cached) == 2
    b = make_seq(tokens(8) + [7, 7, 7])
    admit(bm, b, live)  # revived from the free list
    assert b.block_table[:2] == prefix_blocks and b.num_computed_tokens == 8
    assert bm.num_free_blocks == 8 - 3
    assert all(blk not in bm.free for blk in b.block_table)


def test_release_order_tail_first_uncached_to_front():
    bm, live = BlockManager(4, 2), []
    a = make_seq(tokens(5))  # blocks 0, 1 full (cached) and 2 partial
    admit(bm, a, live)
    compute_all(bm, a)
    assert a.block_table == [0, 1, 2]
    free_of(bm, a, live)
    # uncached partial block first, then never-used block 3, then the tail before the head
    assert list(bm.free) == [2, 3, 1, 0]


def test_uncached_freed_blocks_are_reused_before_cached_ones():
    bm, live = BlockManager(5, BS), []
    a = make_seq(tokens(2 * BS + 1))  # blocks 0, 1 cached, 2 uncached
    admit(bm, a, live)
    compute_all(bm, a)
    cached = a.block_table[:2]
    free_of(bm, a, live)
    other = make_seq(tokens(2 * BS, 200))  # different content: needs 2 blocks
    admit(bm, other, live)
    assert not set(other.block_table) & set(cached)  # the uncached and the never-used block
    assert len(bm.cached) == 2
    again = make_seq(tokens(2 * BS + 1))
    admit(bm, again, live)
    assert again.num_computed_tokens == 2 * BS and again.block_table[:2] == cached


def test_eviction_is_lru_among_cached_blocks():
    bm, live = BlockManager(6, BS), []
    old, new = make_seq(tokens(2 * BS, 10)), make_seq(tokens(2 * BS, 100))
    for s in (old, new):
        admit(bm, s, live)
        compute_all(bm, s)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    free_of(bm, old, live)  # freed first: evicted first
    free_of(bm, new, live)
    assert len(bm.cached) == 4
    filler = make_seq(tokens(3 * BS + 1, 250))  # 4 blocks: the 2 never-used ones, then old's
    admit(bm, filler, live)
    assert set(filler.block_table) >= set(old_blocks)
    assert not set(filler.block_table) & set(new_blocks)
    assert len(bm.cached) == 2
    free_of(bm, filler, live)  # uncomputed: nothing cached, back to the front
    hit_new = make_seq(tokens(2 * BS, 100) + [5])
    admit(bm, hit_new, live)
    assert hit_new.num_computed_tokens == 2 * BS and hit_new.block_table[:2] == new_blocks
    hit_old = make_seq(tokens(2 * BS, 10) + [5])
    admit(bm, hit_old, live)
    assert hit_old.num_computed_tokens == 0  # evicted


def test_within_a_sequence_the_tail_is_evicted_before_the_head():
    bm, live = BlockManager(3, BS), []
    a = make_seq(tokens(3 * BS))
    admit(bm, a, live)
    compute_all(bm, a)
    blocks = list(a.block_table)
    free_of(bm, a, live)
    assert list(bm.free) == blocks[::-1]
    one = make_seq(tokens(2, 300))  # takes one block: a's last (tail) block
    admit(bm, one, live)
    assert one.block_table == [blocks[2]]
    free_of(bm, one, live)
    b = make_seq(tokens(2 * BS + 1))
    admit(bm, b, live)  # the head blocks are still cached
    assert b.num_computed_tokens == 2 * BS and b.block_table[:2] == blocks[:2]


def test_evicted_block_ends_the_hit_chain():
    bm, live = BlockManager(4, 2), []
    a = make_seq(tokens(7))  # blocks 0, 1, 2 full and cached, 3 partial
    admit(bm, a, live)
    compute_all(bm, a)
    free_of(bm, a, live)
    assert list(bm.free) == [3, 2, 1, 0]
    two = make_seq(tokens(3, 300))  # takes the uncached block and a's tail block (evicting it)
    admit(bm, two, live)
    assert two.block_table == [3, 2] and len(bm.cached) == 2
    free_of(bm, two, live)
    again = make_seq(tokens(7))
    admit(bm, again, live)
    assert again.num_computed_tokens == 4 and again.block_table[:2] == [0, 1]
    assert bm.num_free_blocks == 0


def test_revived_hits_count_against_free_blocks():
    bm, live = BlockManager(3, 2), []
    a = make_seq(tokens(5))  # blocks: [full, full, partial]
    admit(bm, a, live)
    compute_all(bm, a)
    free_of(bm, a, live)
    assert bm.num_free_blocks == 3
    # 7 tokens: 2 hits (both on the free list) + 2 new blocks = 4 blocks of a 3-block pool
    too_big = make_seq(tokens(4) + [7, 8, 9])
    assert not bm.can_allocate(too_big)
    # 6 tokens: 2 hits + 1 new block = the whole pool
    fits = make_seq(tokens(4) + [7, 8])
    assert bm.can_allocate(fits)
    admit(bm, fits, live)
    assert fits.num_computed_tokens == 4 and bm.num_free_blocks == 0


# -- copy-on-write ------------------------------------------------------------------------------
def test_fork_shares_blocks_and_copy_on_write_copies_the_partial_block():
    bm, live = BlockManager(8, BS), []
    parent = make_seq(tokens(6))  # [full, partial(2)]
    admit(bm, parent, live)
    compute_all(bm, parent)
    parent.token_ids.append(1)  # the sampled token
    child = parent.fork(1)
    bm.fork(parent, child)
    live.append(child)
    bm.check_invariants(live)
    child.token_ids[-1] = 2
    full, partial = parent.block_table
    assert child.block_table == parent.block_table
    assert bm.ref_counts[full] == bm.ref_counts[partial] == 2
    assert bm.num_free_blocks == 6

    assert bm.can_append(parent, 1)
    assert bm._new_blocks_needed(parent, 1) == 1
    copies = bm.append_slots(parent, 1)
    bm.check_invariants(live)
    new = parent.block_table[1]
    assert copies == [(partial, new)] and new != partial
    assert parent.block_table[0] == full
    assert bm.ref_counts[partial] == 1 and bm.ref_counts[new] == 1 and bm.ref_counts[full] == 2

    assert bm._new_blocks_needed(child, 1) == 0
    assert bm.append_slots(child, 1) == []  # the last holder writes in place
    assert child.block_table == [full, partial]
    bm.check_invariants(live)
    assert bm.num_free_blocks == 5


def test_fork_of_n_copies_n_minus_1_times():
    bm, live = BlockManager(16, BS), []
    parent = make_seq(tokens(7))
    admit(bm, parent, live)
    compute_all(bm, parent)
    parent.token_ids.append(1)
    family = [parent]
    for i in range(1, 4):
        child = parent.fork(i)
        bm.fork(parent, child)
        family.append(child)
        live.append(child)
    bm.check_invariants(live)
    assert [bm.ref_counts[b] for b in parent.block_table] == [4, 4]
    all_copies = []
    for s in family:
        all_copies += bm.append_slots(s, 1)
        bm.check_invariants(live)
    shared = parent.block_table[0]
    assert [src for src, _ in all_copies] == [family[-1].block_table[1]] * 3
    assert len({dst for _, dst in all_copies}) == 3
    assert len({s.block_table[1] for s in family}) == 4
    assert all(s.block_table[0] == shared for s in family) and bm.ref_counts[shared] == 4


def test_fork_at_a_block_boundary_needs_no_copy():
    bm, live = BlockManager(8, BS), []
    parent, child = forked_pair(bm, live, tokens(2 * BS))
    assert bm.append_slots(parent, 1) == [] and bm.append_slots(child, 1) == []
    assert parent.block_table[:2] == child.block_table[:2]
    assert parent.block_table[2] != child.block_table[2]
    bm.check_invariants(live)


def test_release_of_a_forked_sibling_keeps_shared_blocks():
    bm, live = BlockManager(8, BS), []
    parent, child = forked_pair(bm, live, tokens(6))
    free_of(bm, child, live)
    assert [bm.ref_counts[b] for b in parent.block_table] == [1, 1]
    assert bm.append_slots(parent, 1) == []  # sole holder again: no copy
    free_of(bm, parent, live)
    assert bm.num_free_blocks == 8


# -- capacity -----------------------------------------------------------------------------------
def test_can_allocate_and_can_append_false_when_pool_too_small():
    bm, live = BlockManager(2, BS), []
    assert not bm.can_allocate(make_seq(tokens(2 * BS + 1)))
    seq = make_seq(tokens(2 * BS))
    assert bm.can_allocate(seq)
    admit(bm, seq, live)
    assert bm.num_free_blocks == 0
    seq.num_computed_tokens = 2 * BS - 1
    assert bm.can_append(seq, 1)  # last slot of the last block
    seq.num_computed_tokens = 2 * BS
    assert not bm.can_append(seq, 1)
    assert not bm.can_allocate(make_seq(tokens(1, 200)))
    free_of(bm, seq, live)
    assert bm.can_allocate(make_seq(tokens(1, 200)))


def test_can_append_false_when_copy_on_write_has_no_free_block():
    bm, live = BlockManager(2, BS), []
    parent, child = forked_pair(bm, live, tokens(6))
    assert bm.num_free_blocks == 0
    assert not bm.can_append(parent, 1)  # needs a copy of the shared partial block
    free_of(bm, child, live)
    assert bm.can_append(parent, 1)


def test_can_append_counts_growth_across_several_blocks():
    bm, live = BlockManager(5, BS), []
    seq = make_seq(tokens(3))
    admit(bm, seq, live)  # 1 block; then 17 more tokens arrive and 20 are computed at once
    seq.token_ids += tokens(17, 40)
    assert bm._new_blocks_needed(seq, 20) == 4 and bm.can_append(seq, 20)
    assert not bm.can_append(seq, 21)
    assert bm.append_slots(seq, 20) == []
    assert len(seq.block_table) == 5 and bm.num_free_blocks == 0
    bm.check_invariants(live)


# -- a random walk ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_random_walk_keeps_invariants(seed):
    """Random allocate / compute / fork / append / release over a small pool with a tiny
    alphabet (so prefixes collide and get cached); accounting holds after every operation."""
    rng = random.Random(seed)
    bm, live = BlockManager(12, 2), []
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            seq = make_seq([rng.randrange(3) for _ in range(rng.randrange(1, 9))])
            if bm.can_allocate(seq):
                bm.allocate(seq)
                live.append(seq)
        elif op < 0.6 and live:
            seq = rng.choice(live)
            if seq.num_uncomputed_tokens == 0:
                seq.token_ids.append(rng.randrange(3))
            num = rng.randrange(1, seq.num_uncomputed_tokens + 1)
            if bm.can_append(seq, num):
                before, expected = bm.num_free_blocks, bm._new_blocks_needed(seq, num)
                copies = bm.append_slots(seq, num)
                assert before - bm.num_free_blocks == expected
                for src, dst in copies:
                    assert bm.ref_counts[dst] == 1 and src != dst
                seq.num_computed_tokens += num
                bm.commit(seq)
                assert len(seq.block_table) >= bm.blocks_for(seq.num_computed_tokens)
        elif op < 0.7 and live:
            seq = rng.choice(live)
            if seq.num_uncomputed_tokens == 0 and seq.num_tokens:
                seq.token_ids.append(rng.randrange(3))
                child = seq.fork(len(live))
                bm.fork(seq, child)
                live.append(child)
        elif live:
            seq = rng.choice(live)
            bm.release(seq)
            live.remove(seq)
        bm.check_invariants(live)
        assert all(len(s.block_table) >= bm.blocks_for(s.num_computed_tokens) for s in live)
    for seq in list(live):
        free_of(bm, seq, live)
    assert bm.num_free_blocks == 12 and bm.ref_counts == [0] * 12


def test_cache_salts_never_share_blocks():
    """Two salts never hit each other's cached prefix; the same salt does; the salt roots the
    chain, so the hashes the engine commits (the KV-store keys) are the salted chain."""
    from tandem.engine.block_manager import block_hash, chain_root

    def prompt_hashes(prompt, size, num_blocks=None, cache_salt=None):
        hashes, parent = [], chain_root(cache_salt)
        for i in range(len(prompt) // size if num_blocks is None else num_blocks):
            parent = block_hash(parent, prompt[i * size:(i + 1) * size])
            hashes.append(parent)
        return hashes

    prompt, bm, live = tokens(3 * BS + 1), BlockManager(16, BS), []
    for salt, hit in (("tenant-a", 0), ("tenant-b", 0), (None, 0), ("tenant-a", 3 * BS)):
        seq = Sequence(f"r-{salt}", list(prompt), len(prompt), SamplingParams(cache_salt=salt))
        admit(bm, seq, live)
        assert seq.num_cached_tokens == hit, salt
        compute_all(bm, seq)
        assert seq.block_hashes == prompt_hashes(prompt, BS, 3, cache_salt=salt)
        free_of(bm, seq, live)
    assert prompt_hashes(prompt, BS, cache_salt="tenant-a") != prompt_hashes(prompt, BS)
