"""The scheduler with a real BlockManager and no model: steps are simulated (the scheduled token
counts are added to num_computed_tokens, blocks are committed, and a fake token is appended to
every sequence whose pending tokens were all computed). Covers chunked prefill under the token
budget, decodes of running sequences, max_num_seqs, first-come-first-served admission, preemption
of the newest running sequence, and that every sequence finishes in a bounded number of steps."""
from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence, SequenceStatus
from tandem.sampling_params import SamplingParams

FAKE_TOKEN = 7


class Sim:
    """A scheduler, its block manager and the bookkeeping the engine would do after each forward."""

    def __init__(self, num_blocks: int = 64, block_size: int = 4, **config):
        self.config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **config)
        self.bm = BlockManager(num_blocks, block_size, self.config.enable_prefix_caching)
        self.sched = Scheduler(self.config, self.bm)
        self.max_tokens: dict[int, int] = {}
        self.forks: set[int] = set()  # seq ids that fork one sibling at their first sample
        self.finished: list[Sequence] = []
        self.seqs: list[Sequence] = []
        self.ids = itertools.count()

    def add(self, prompt: list[int] | int, max_tokens: int = 4, fork: bool = False) -> Sequence:
        number = next(self.ids)
        # distinct prompts unless given: no accidental prefix-cache hits
        tokens = list(range(1000 * number, 1000 * number + prompt)) if isinstance(prompt, int) else list(prompt)
        seq = Sequence(f"r{number}", tokens, len(tokens), SamplingParams(max_tokens=max_tokens))
        self.max_tokens[seq.seq_id] = max_tokens
        if fork:
            self.forks.add(seq.seq_id)
        self.seqs.append(seq)
        self.sched.add(seq)
        return seq

    @property
    def live(self) -> list[Sequence]:
        return list(self.sched.running) + list(self.sched.waiting)

    def step(self):
        out = self.sched.schedule()
        self.check(out)
        for seq, num in out.scheduled:
            seq.num_computed_tokens += num
            self.bm.commit(seq)
        for seq, num in list(out.scheduled):
            if seq.num_uncomputed_tokens == 0:
                first_sample = seq.num_tokens == seq.num_prompt_tokens
                seq.token_ids.append(FAKE_TOKEN)
                family = [seq]
                if first_sample and seq.seq_id in self.forks:
                    self.forks.discard(seq.seq_id)
                    child = seq.fork(1)
                    self.bm.fork(seq, child)
                    self.sched.add_running(child)
                    self.max_tokens[child.seq_id] = self.max_tokens[seq.seq_id]
                    self.seqs.append(child)
                    family.append(child)
                for s in family:
                    if len(s.output_token_ids) >= self.max_tokens[s.seq_id]:
                        self.sched.remove(s)
                        self.finished.append(s)
        self.bm.check_invariants(self.live)
        return out

    def check(self, out) -> None:
        seen = [s for s, _ in out.scheduled]
        assert len(seen) == len(set(map(id, seen))), "a sequence scheduled twice"
        assert out.num_tokens <= self.config.max_num_batched_tokens
        for seq, num in out.scheduled:
            assert 1 <= num <= seq.num_uncomputed_tokens
            assert seq.status is SequenceStatus.RUNNING and seq in self.sched.running
            assert len(seq.block_table) >= self.bm.blocks_for(seq.num_computed_tokens + num)
        for seq in out.preempted:
            assert seq.status is SequenceStatus.WAITING and seq.block_table == []
            assert seq.num_computed_tokens == 0 and seq in self.sched.waiting
        self.bm.check_invariants(self.live)

    def run(self, max_steps: int) -> int:
        for steps in range(1, max_steps + 1):
            self.step()
            if not self.sched.has_work():
                return steps
        raise AssertionError(f"not done after {max_steps} steps: {self.sched.running} {self.sched.waiting}")


def plan(out) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in out.scheduled]


# -- chunked prefill ----------------------------------------------------------------------------
def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    sim = Sim(num_blocks=64, max_num_batched_tokens=16)
    seq = sim.add(100, max_tokens=2)
    chunks = [plan(sim.step()) for _ in range(7)]
    assert chunks == [[("r0", 16)]] * 6 + [[("r0", 4)]]
    assert seq.num_computed_tokens == 100 and len(seq.output_token_ids) == 1
    assert plan(sim.step()) == [("r0", 1)]
    assert not sim.sched.has_work() and sim.bm.num_free_blocks == 64


def test_chunked_prefill_next_to_a_running_decode():
    """A 100-token prompt with budget 16 takes 7 steps while an already-running decode keeps its
    token every step, scheduled before the prefill chunk."""
    sim = Sim(num_blocks=64, max_num_batched_tokens=16)
    dec = sim.add(5, max_tokens=20)
    assert plan(sim.step()) == [("r0", 5)]  # prefill of the short prompt; its first token sampled
    long = sim.add(100, max_tokens=3)
    steps = 0
    while long.num_computed_tokens < 100:
        out = sim.step()
        steps += 1
        assert out.scheduled[0] == (dec, 1), "the running decode goes first, one token"
        assert out.scheduled[1][0] is long and out.scheduled[1][1] == min(15, 100 - 15 * (steps - 1))
        assert out.num_tokens <= 16
    assert steps == 7
    assert len(dec.output_token_ids) == 1 + 7 and len(long.output_token_ids) == 1
    assert plan(sim.step()) == [("r0", 1), ("r1", 1)]


def test_budget_is_shared_by_prefills_and_admission_stops_at_zero():
    sim = Sim(num_blocks=64, max_num_batched_tokens=16)
    a, b, c = sim.add(20), sim.add(20), sim.add(3)
    assert plan(sim.step()) == [("r0", 16)]
    assert list(sim.sched.waiting) == [b, c]  # budget spent: nothing else admitted
    assert plan(sim.step()) == [("r0", 4), ("r1", 12)]
    assert plan(sim.step()) == [("r0", 1), ("r1", 8), ("r2", 3)]
    assert plan(sim.step()) == [("r0", 1), ("r1", 1), ("r2", 1)]
    assert [s.num_computed_tokens for s in (a, b, c)] == [22, 21, 4]


def test_only_the_last_chunk_samples():
    sim = Sim(num_blocks=64, max_num_batched_tokens=8)
    seq = sim.add(20, max_tokens=1)
    for _ in range(2):
        sim.step()
        assert seq.output_token_ids == [] and seq.num_computed_tokens % 8 == 0
    sim.step()
    assert seq.status is SequenceStatus.FINISHED and seq.output_token_ids == [FAKE_TOKEN]


# -- limits and order ---------------------------------------------------------------------------
def test_max_num_seqs_caps_running_sequences():
    sim = Sim(num_blocks=64, max_num_seqs=2)
    seqs = [sim.add(3, max_tokens=3) for _ in range(5)]
    admitted_order = []
    for _ in range(40):
        out = sim.step()
        assert len(sim.sched.running) <= 2 and len(out.scheduled) <= 2
        for s, _ in out.scheduled:
            if s not in admitted_order:
                admitted_order.append(s)
        if not sim.sched.has_work():
            break
    assert admitted_order == seqs  # first come, first served
    assert all(s.status is SequenceStatus.FINISHED for s in seqs)


def test_max_num_seqs_also_bounds_forked_siblings():
    """Siblings join the running set without admission; each step still schedules at most
    max_num_seqs of them, oldest first, and all finish."""
    sim = Sim(num_blocks=64, max_num_seqs=2)
    parent = sim.add(6, max_tokens=4)
    sim.step()
    family = [parent]
    for i in range(1, 4):  # what the engine does at the first sample of an n=4 request
        child = parent.fork(i)
        sim.bm.fork(parent, child)
        sim.sched.add_running(child)
        sim.max_tokens[child.seq_id] = 4
        family.append(child)
    sim.bm.check_invariants(sim.live)
    while sim.sched.has_work():
        out = sim.step()
        assert 1 <= len(out.scheduled) <= 2
    assert all(len(s.output_token_ids) == 4 for s in family)
    assert sim.bm.num_free_blocks == 64


def test_admission_is_first_come_first_served_without_overtaking():
    """The head of the queue does not fit yet: later requests that would fit wait behind it."""
    sim = Sim(num_blocks=6, block_size=4)
    running = sim.add(12, max_tokens=3)  # 3 blocks, and a 4th for its first decode
    sim.step()
    big = sim.add(12, max_tokens=1)  # needs 3 blocks: 2 are left once `running` takes its 4th
    small = sim.add(1, max_tokens=1)
    out = sim.step()
    assert plan(out) == [("r0", 1)]
    assert list(sim.sched.waiting) == [big, small]
    assert sim.bm.can_allocate(small) and not sim.bm.can_allocate(big)
    sim.step()  # running finishes
    out = sim.step()
    assert [s for s, _ in out.scheduled] == [big, small]
    assert running.status is SequenceStatus.FINISHED


def test_waiting_order_is_arrival_order():
    sim = Sim(num_blocks=64, max_num_batched_tokens=4)
    seqs = [sim.add(4, max_tokens=1) for _ in range(4)]
    first_scheduled = []
    while sim.sched.has_work():
        for s, _ in sim.step().scheduled:
            if s not in first_scheduled:
                first_scheduled.append(s)
    assert first_scheduled == seqs and sim.finished == seqs


# -- preemption ---------------------------------------------------------------------------------
def test_preemption_picks_the_newest_running_sequence():
    sim = Sim(num_blocks=6, block_size=4)
    a, b, c = sim.add(8, max_tokens=6), sim.add(8, max_tokens=6), sim.add(7, max_tokens=6)
    out = sim.step()
    assert plan(out) == [("r0", 8), ("r1", 8), ("r2", 7)] and sim.bm.num_free_blocks == 0
    waiting_late = sim.add(2, max_tokens=1)
    out = sim.step()  # a and b each need a new block: c (newest) is preempted
    assert out.preempted == [c] and sim.sched.num_preemptions == 1
    assert plan(out) == [("r0", 1), ("r1", 1)]
    assert list(sim.sched.waiting) == [c, waiting_late]  # at the head of the queue
    assert sim.sched.running == [a, b]
    assert c.status is SequenceStatus.WAITING and c.output_token_ids == [FAKE_TOKEN]
    steps = sim.run(60)
    assert steps < 60
    assert all(s.status is SequenceStatus.FINISHED for s in (a, b, c, waiting_late))
    assert len(c.output_token_ids) == 6
    assert sim.bm.num_free_blocks == 6


def test_preempted_sequence_recomputes_everything_it_had():
    sim = Sim(num_blocks=5, block_size=4, enable_prefix_caching=False)
    a, b = sim.add(8, max_tokens=3), sim.add(9, max_tokens=8)
    sim.step()  # a: 2 blocks (+1 on its first decode), b: 3 blocks
    out = sim.step()
    assert out.preempted == [b] and b.num_tokens == 10
    while b.status is SequenceStatus.WAITING:
        out = sim.step()
    # re-admitted: the prompt and its sampled token are computed again, and it samples at once
    assert plan(out)[-1] == ("r1", 10) and len(b.output_token_ids) == 2
    sim.run(60)
    assert len(a.output_token_ids) == 3 and len(b.output_token_ids) == 8


def test_preemption_of_the_sequence_itself_when_it_is_the_newest():
    sim = Sim(num_blocks=4, block_size=4)
    a = sim.add(6, max_tokens=8)  # 2 blocks, 2 free slots left in the second
    b = sim.add(8, max_tokens=8)  # 2 blocks, full: its first decode needs a new one
    sim.step()
    assert sim.bm.num_free_blocks == 0
    out = sim.step()
    assert out.preempted == [b] and plan(out) == [("r0", 1)]
    assert sim.sched.running == [a] and list(sim.sched.waiting) == [b]
    sim.run(80)
    assert len(a.output_token_ids) == len(b.output_token_ids) == 8


def test_no_admission_in_a_step_that_preempted():
    sim = Sim(num_blocks=4, block_size=4)
    sim.add(6, max_tokens=8)
    sim.add(8, max_tokens=8)
    sim.step()
    tiny = sim.add(1, max_tokens=1)
    out = sim.step()
    assert out.preempted and tiny not in [s for s, _ in out.scheduled]


def test_preempted_sequence_gets_its_committed_prefix_back_from_the_cache():
    sim = Sim(num_blocks=8, block_size=4)
    a = sim.add(16, max_tokens=2)  # 4 blocks, a 5th at its first decode
    b = sim.add(13, max_tokens=12)  # 4 blocks: 3 full (cached once computed) + 1 partial
    sim.step()
    out = sim.step()
    assert out.preempted == [b] and plan(out) == [("r0", 1)]
    assert a.status is SequenceStatus.FINISHED  # and its blocks are free again
    queried, hits = sim.bm.num_queried_tokens, sim.bm.num_hit_tokens
    out = sim.step()
    # b's 3 full blocks were freed after its partial one (which a took) and are still cached:
    # only the last block's 2 tokens (13th prompt token + sampled token) are recomputed
    assert plan(out) == [("r1", 2)]
    assert (sim.bm.num_queried_tokens, sim.bm.num_hit_tokens) == (queried, hits)  # first admission only
    assert b.num_cached_tokens == 0
    sim.run(80)
    assert len(b.output_token_ids) == 12


# -- no starvation ------------------------------------------------------------------------------
workload = st.lists(
    st.tuples(st.integers(0, 6),  # arrival step
              st.integers(1, 30),  # prompt length
              st.integers(1, 10),  # max tokens
              st.integers(0, 3),  # prompt alphabet (shared prefixes when equal)
              st.booleans()),  # fork one sibling at the first sample
    min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(workload, st.sampled_from([2, 4]), st.integers(3, 24), st.integers(1, 6), st.booleans())
def test_every_sequence_finishes_in_bounded_steps(requests, block_size, budget, max_seqs, caching):
    """Each step the oldest running sequence makes progress (it can preempt everything newer), so
    all work is done within sum(prompt + max_tokens) steps of running time, whatever the pool."""
    longest = max(p + m for _, p, m, _, _ in requests)
    num_blocks = -(-longest // block_size) + 1  # a lone sequence always fits, barely
    sim = Sim(num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=budget,
              max_num_seqs=max_seqs, enable_prefix_caching=caching)
    pending = sorted(requests, key=lambda r: r[0])
    bound = sum((p + m) * (2 if fork else 1) for _, p, m, _, fork in requests)
    busy_steps = 0
    for t in itertools.count():
        while pending and pending[0][0] <= t:
            _, p, m, alphabet, fork = pending.pop(0)
            sim.add([alphabet] * p, max_tokens=m, fork=fork)
        if not sim.sched.has_work():
            if not pending:
                break
            continue
        oldest = sim.sched.running[0] if sim.sched.running else None
        before = oldest.num_computed_tokens if oldest else None
        out = sim.step()
        busy_steps += 1
        assert out.scheduled, "a step with work scheduled nothing"
        if oldest is not None:
            assert oldest not in out.preempted
            assert oldest.status is SequenceStatus.FINISHED or oldest.num_computed_tokens > before
        assert busy_steps <= bound
    assert len(sim.finished) == sum(2 if fork else 1 for *_, fork in requests)
    for s in sim.finished:
        assert len(s.output_token_ids) == sim.max_tokens[s.seq_id]
    assert sim.bm.num_free_blocks == num_blocks


@pytest.mark.parametrize("num_blocks", [4, 5, 8])
def test_heavy_contention_all_complete(num_blocks):
    sim = Sim(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=8)
    seqs = [sim.add(list(range(i, i + 5)), max_tokens=8) for i in range(8)]  # 2 blocks, 4 at the end
    sim.run(500)
    assert all(len(s.output_token_ids) == 8 for s in seqs)
    if num_blocks < 8:
        assert sim.sched.num_preemptions > 0
    assert sim.bm.num_free_blocks == num_blocks
