"""The engine end to end on the tiny random Llama (vocab 320): batch invariance of greedy output
(together vs one at a time, under tiny prefill chunks, under a pool small enough to preempt, with
staggered arrivals), prefix sharing of a 1,000-token prefix, copy-on-write of n samples, a
hypothesis walk over add / abort / step that re-checks the block accounting after every
operation, bad requests and admission control, and request metrics and engine stats."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tandem
from tandem import SamplingParams
from tandem.engine import EngineConfig, LLMEngine
from tandem.engine.sequence import SequenceStatus
from tandem.errors import ConfigError, InvalidRequestError, QueueFullError
from tests.tiny_models import TINY_CONFIG, write_tiny_hf_dir

PROMPT_LENS = [3, 60, 10, 25, 7, 41, 17, 33]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_llm(path, **options) -> tandem.LLM:
    options.setdefault("num_kv_blocks", 256)
    return tandem.LLM(str(path), progress=False, **options)


def live_seqs(engine) -> list:
    return [s for r in engine.requests.values() for s in r.seqs]


def check(engine) -> None:
    engine.block_manager.check_invariants(live_seqs(engine))
    st_ = engine.stats()
    assert st_["kv_blocks_used"] + st_["kv_blocks_free"] == st_["kv_blocks_total"]


def drive(engine, requests: list[tuple[str, list[int], SamplingParams]], arrive_every: int = 0,
          max_steps: int = 5000, on_step=None) -> dict[str, tandem.RequestOutput]:
    """Add requests (all at once, or one every `arrive_every` steps), step to completion checking
    the block accounting after every step (and calling on_step(engine), when given); return the
    finished outputs by request id."""
    pending, outputs, steps = list(requests), {}, 0
    while pending or engine.has_unfinished():
        if pending and (arrive_every == 0 or steps % arrive_every == 0):
            batch = pending if arrive_every == 0 else pending[:1]
            for request_id, prompt, params in batch:
                engine.add_request(request_id, prompt, params)
            pending = pending[len(batch):]
        for out in engine.step()[1]:
            outputs[out.request_id] = out
        check(engine)
        if on_step is not None:
            on_step(engine)
        steps += 1
        assert steps < max_steps, "the engine made no progress"
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
    return outputs


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def one_at_a_time(tiny_hf_dir, prompts) -> list[list[int]]:
    llm = make_llm(tiny_hf_dir)
    outs = [llm.generate(p, GREEDY)[0] for p in prompts]
    assert all(len(o.token_ids) == 24 and o.finish_reason == "length" for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == len(prompts)  # no trivially equal outputs
    for prompt, out in zip(prompts, outs):  # and each is the argmax of a cache-free full forward
        seq = prompt + out.token_ids
        with torch.inference_mode():
            logits = llm.model.compute_logits(llm.model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0)))[0]
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out.token_ids
    return [o.token_ids for o in outs]


# -- batch invariance ---------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 4},
    {"num_kv_blocks": 24, "block_size": 4},
    {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 7, "max_num_seqs": 3},
], ids=["default", "chunks-of-4", "tiny-pool", "tiny-pool-chunks-seqs"])
def test_batched_greedy_equals_one_at_a_time(tiny_hf_dir, prompts, one_at_a_time, options):
    llm = make_llm(tiny_hf_dir, **options)
    outs = drive(llm.engine, [(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert [outs[f"p{i}"].token_ids for i in range(len(prompts))] == one_at_a_time
    stats = llm.engine.stats()
    if options.get("num_kv_blocks") == 24:
        assert stats["preemptions"] > 0, "the pool was meant to force preemption"
        # 60 prompt + 24 generated tokens need 21 of the 24 blocks: every request fits alone
        assert llm.engine.max_model_len == 96
    else:
        assert stats["preemptions"] == 0
    assert stats["finished_requests"] == 8 and stats["running"] == stats["waiting"] == 0
    # prefix-cache statistics count each prompt once, at its first admission (not on recomputation)
    assert stats["prefix_cache_queried_tokens"] == sum(PROMPT_LENS)


# fp32 tiny model: measured at most ~1.4e-5 between the engine and a cache-free forward (logits
# up to ~6); an attention softmax scale off by 0.1% shows as ~1e-2
LOGIT_ATOL = 1e-3


def record_sampled_logits(engine) -> dict[tuple[str, int], torch.Tensor]:
    """From now on, every logits row the engine's runner returns, by (request id, tokens so far)."""
    rows: dict[tuple[str, int], torch.Tensor] = {}
    execute = engine.runner.execute

    def recording_execute(scheduled, copies, sample_rows):
        out = execute(scheduled, copies, sample_rows)
        for row, index in enumerate(sample_rows):
            seq = scheduled[index][0]
            rows[(seq.request_id, seq.num_tokens)] = out[row].clone()
        return out

    engine.runner.execute = recording_execute
    return rows


@pytest.mark.parametrize("options", [
    {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 7},
    {"block_size": 8, "max_num_batched_tokens": 16},
], ids=["preempting-chunked", "chunked-prefix-hits"])
def test_engine_logits_equal_a_cache_free_forward(tiny_hf_dir, prompts, options):
    """Every logits row the engine samples from (prefill chunks over cached context, batched
    decodes, recomputation after preemption, prefix-cache hits) equals the plain forward's."""
    llm = make_llm(tiny_hf_dir, **options)
    engine = llm.engine
    rows = record_sampled_logits(engine)
    # the second half repeats the first half's prompts with new tails: prefix-cache hits
    work = prompts + [p[: len(p) // 2 + 1] + [9, 8, 7] for p in prompts if len(p) > 16]
    outs = drive(engine, [(f"p{i}", p, GREEDY) for i, p in enumerate(work)], arrive_every=3)
    if "num_kv_blocks" in options:
        assert engine.stats()["preemptions"] > 0
    else:
        assert engine.stats()["prefix_cache_hit_tokens"] > 0
    for i, prompt in enumerate(work):
        out = outs[f"p{i}"]
        seq = prompt + out.token_ids
        with torch.inference_mode():
            full = llm.model.compute_logits(llm.model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0)))[0]
        got = torch.stack([rows[(f"p{i}", len(prompt) + k)] for k in range(len(out.token_ids))])
        torch.testing.assert_close(got, full[len(prompt) - 1:-1], atol=LOGIT_ATOL, rtol=0)


def test_staggered_arrivals_equal_one_at_a_time(tiny_hf_dir, prompts, one_at_a_time):
    """Continuous batching: requests join a batch already decoding, one every other step."""
    llm = make_llm(tiny_hf_dir, max_num_batched_tokens=16)
    outs = drive(llm.engine, [(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)], arrive_every=2)
    assert [outs[f"p{i}"].token_ids for i in range(len(prompts))] == one_at_a_time


def test_generate_through_llm_api_equals_one_at_a_time(tiny_hf_dir, prompts, one_at_a_time):
    llm = make_llm(tiny_hf_dir, num_kv_blocks=24, block_size=4)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == one_at_a_time
    assert llm.engine.stats()["kv_blocks_free"] == 24 and not llm.engine.has_unfinished()


def test_seeded_sampling_is_batch_and_preemption_invariant(tiny_hf_dir, prompts):
    """A seed reproduces a request (n=2, sample i from seed + i) whatever the batch and however
    often it is preempted and recomputed."""
    params = [SamplingParams(temperature=1.0, seed=40 + i, n=2, max_tokens=10, ignore_eos=True)
              for i in range(4)]
    chosen = prompts[:4]
    alone = [[c.token_ids for c in make_llm(tiny_hf_dir).generate(p, sp)[0].outputs]
             for p, sp in zip(chosen, params)]
    llm = make_llm(tiny_hf_dir, num_kv_blocks=24, block_size=4)
    outs = drive(llm.engine, [(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(chosen, params))])
    assert llm.engine.stats()["preemptions"] > 0
    assert [[c.token_ids for c in outs[f"s{i}"].outputs] for i in range(4)] == alone


@pytest.fixture(scope="module")
def reference_llm(tiny_hf_dir):
    return make_llm(tiny_hf_dir, num_kv_blocks=512, enable_prefix_caching=False)


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads_match_each_request_run_alone(tiny_hf_dir, reference_llm, seed):
    """Differential: a random engine configuration (pool, block size down to 1, step budget down to
    1 token, max_num_seqs down to 1, prefix caching on or off) and a random mix of greedy and seeded
    requests (n up to 3, shared prefixes, staggered arrivals) give every request exactly the output
    it gets alone on a roomy engine without prefix caching."""
    random_workload(make_llm, tiny_hf_dir, reference_llm, seed)


def random_workload(make, path, reference_llm, seed: int) -> None:
    """The differential test's body; `make(path, **options)` builds the engine's LLM (a parallel
    group's too: tests/unit/engine/test_parallel_engine.py)."""
    rng = random.Random(seed)
    options = dict(num_kv_blocks=rng.choice([12, 20, 40]), block_size=rng.choice([1, 2, 4, 8]),
                   max_num_batched_tokens=rng.choice([1, 3, 8, 64]), max_num_seqs=rng.choice([1, 2, 5, 64]),
                   enable_prefix_caching=rng.random() < 0.7)
    with make(path, **options) as llm:
        _random_workload(llm.engine, rng, options, reference_llm)


def _random_workload(engine, rng, options, reference_llm) -> None:
    base = [rng.randrange(3, 320) for _ in range(40)]
    requests = []
    for i in range(rng.randint(4, 8)):
        length = rng.randint(1, min(30, engine.max_model_len - 11))
        prompt = base[:length] if rng.random() < 0.5 else [rng.randrange(3, 320) for _ in range(length)]
        params = SamplingParams(temperature=rng.choice([0, 1.0]), seed=rng.randrange(1000), n=rng.choice([1, 2, 3]),
                                max_tokens=rng.randint(1, 10), ignore_eos=True)
        requests.append((rng.randint(0, 6), f"r{i}", prompt, params))
    requests.sort(key=lambda r: r[0])
    outputs, step = {}, 0
    while requests or engine.has_unfinished():
        while requests and requests[0][0] <= step:
            _, request_id, prompt, params = requests.pop(0)
            engine.add_request(request_id, prompt, params)
            outputs[request_id] = (prompt, params, None)
        for out in engine.step()[1]:
            prompt, params, _ = outputs[out.request_id]
            outputs[out.request_id] = (prompt, params, out)
        check(engine)
        step += 1
        assert step < 3000
    assert engine.stats()["kv_blocks_free"] == options["num_kv_blocks"]
    for request_id, (prompt, params, out) in outputs.items():
        alone = reference_llm.generate(prompt, params)[0]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs], (request_id, options)


# -- prefix sharing -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_hf_dir(tmp_path_factory):
    """The tiny model with a 2,048-position context (its weights do not depend on it)."""
    return write_tiny_hf_dir(tmp_path_factory.mktemp("tiny_hf_2k"),
                             {**TINY_CONFIG, "max_position_embeddings": 2048})


def _two_requests_sharing_a_prefix(path, caching: bool, make=None):
    rng = random.Random(7)
    prefix = [rng.randrange(3, 320) for _ in range(1000)]
    prompt_a = prefix + [rng.randrange(3, 320) for _ in range(5)]
    prompt_b = prefix + [rng.randrange(3, 320) for _ in range(7)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = (make or make_llm)(path, enable_prefix_caching=caching)
    engine = llm.engine
    computed: dict[str, list[int]] = {"a": [], "b": []}
    execute = engine.runner.execute

    def counting_execute(scheduled, copies, sample_rows):
        for seq, num in scheduled:
            computed[seq.request_id].append(num)
        return execute(scheduled, copies, sample_rows)

    engine.runner.execute = counting_execute
    outputs = {}
    engine.add_request("a", prompt_a, params)
    while not engine.requests["a"].builders:  # until a's prompt is computed and its first token out
        assert not engine.step()[1]
        check(engine)
    engine.add_request("b", prompt_b, params)
    engine.step()
    check(engine)
    seq_a, seq_b = engine.requests["a"].seqs[0], engine.requests["b"].seqs[0]
    tables = (list(seq_a.block_table), list(seq_b.block_table))
    refs = [engine.block_manager.ref_counts[b] for b in seq_b.block_table]
    while engine.has_unfinished():
        for out in engine.step()[1]:
            outputs[out.request_id] = out
        check(engine)
    return outputs, computed, tables, refs, engine, (prompt_a, prompt_b)


def test_prefix_sharing_of_a_1000_token_prefix(long_hf_dir):
    outs, computed, (table_a, table_b), refs, engine, (prompt_a, prompt_b) = \
        _two_requests_sharing_a_prefix(long_hf_dir, caching=True)
    assert engine.config.block_size == 16
    shared = 1000 // 16  # 62 full blocks = 992 tokens
    assert outs["b"].metrics.num_cached_tokens >= shared * 16
    assert outs["b"].metrics.num_cached_tokens == 992
    assert outs["a"].metrics.num_cached_tokens == 0
    assert table_b[:shared] == table_a[:shared]
    assert table_b[shared] != table_a[shared]
    assert refs[:shared] == [2] * shared and refs[shared:] == [1] * (len(refs) - shared)
    # b's prefill computed only what follows the cached blocks, in one step; then one token per decode
    assert computed["b"] == [len(prompt_b) - 992] + [1] * 5
    assert sum(computed["a"]) == len(prompt_a) + 5
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] == 992
    assert stats["prefix_cache_queried_tokens"] == len(prompt_a) + len(prompt_b)


def test_prefix_sharing_changes_no_output(long_hf_dir):
    cached, computed_c, *_ = _two_requests_sharing_a_prefix(long_hf_dir, caching=True)
    plain, computed_p, (table_a, table_b), refs, engine, (_, prompt_b) = \
        _two_requests_sharing_a_prefix(long_hf_dir, caching=False)
    assert not set(table_a) & set(table_b) and set(refs) == {1}
    assert plain["b"].metrics.num_cached_tokens == 0
    assert sum(computed_p["b"]) == len(prompt_b) + 5  # everything recomputed
    assert cached["a"].token_ids == plain["a"].token_ids
    assert cached["b"].token_ids == plain["b"].token_ids


def test_identical_prompt_after_finish_hits_all_but_the_last_block(tiny_hf_dir, prompts):
    llm = make_llm(tiny_hf_dir)
    prompt = prompts[1]  # 60 tokens: 3 full blocks of 16, 12 more
    first = llm.generate(prompt, GREEDY)[0]
    second = llm.generate(prompt, GREEDY)[0]
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens == 48
    assert second.token_ids == first.token_ids
    exact = prompts[1][:48]  # exactly 3 full blocks: the last token is never a hit
    llm.generate(exact, GREEDY)
    assert llm.generate(exact, GREEDY)[0].metrics.num_cached_tokens == 32


# -- copy-on-write ------------------------------------------------------------------------------
def test_n_samples_share_prompt_blocks_and_copy_on_write(tiny_hf_dir):
    rng = random.Random(3)
    prompt = [rng.randrange(3, 320) for _ in range(37)]  # 2 full blocks of 16 + 5 tokens
    params = SamplingParams(temperature=1.0, seed=5, n=4, max_tokens=12, ignore_eos=True)
    llm = make_llm(tiny_hf_dir, num_kv_blocks=64)
    engine = llm.engine
    copies_seen = []
    execute = engine.runner.execute

    def recording_execute(scheduled, copies, sample_rows):
        copies_seen.append(list(copies))
        return execute(scheduled, copies, sample_rows)

    engine.runner.execute = recording_execute
    engine.add_request("r", prompt, params)
    deltas, _ = engine.step()  # prefill, first tokens, fork
    check(engine)
    request = engine.requests["r"]
    assert sorted(d.index for d in deltas) == [0, 1, 2, 3]
    assert len(request.seqs) == 4
    prompt_blocks = list(request.seqs[0].block_table)
    assert len(prompt_blocks) == 3 and all(s.block_table == prompt_blocks for s in request.seqs)
    assert [engine.block_manager.ref_counts[b] for b in prompt_blocks] == [4, 4, 4]
    assert engine.stats()["kv_blocks_used"] == 3

    engine.step()  # each sample writes its second token into the shared partial block
    check(engine)
    partial = prompt_blocks[2]
    assert copies_seen[0] == [] and len(copies_seen[1]) == 3
    assert all(src == partial for src, _ in copies_seen[1])
    tails = [s.block_table[2] for s in request.seqs]
    assert len(set(tails)) == 4 and partial in tails  # one sample kept the original in place
    assert all(s.block_table[:2] == prompt_blocks[:2] for s in request.seqs)
    assert [engine.block_manager.ref_counts[b] for b in prompt_blocks[:2]] == [4, 4]
    assert all(engine.block_manager.ref_counts[b] == 1 for b in tails)

    outputs = {}
    while engine.has_unfinished():
        for out in engine.step()[1]:
            outputs[out.request_id] = out
        check(engine)
    assert all(c == [] for c in copies_seen[2:])  # copies only once, right after the fork
    samples = [c.token_ids for c in outputs["r"].outputs]
    assert [c.index for c in outputs["r"].outputs] == [0, 1, 2, 3]
    assert all(len(s) == 12 for s in samples)
    assert len({tuple(s) for s in samples}) > 1, "samples did not diverge"
    assert engine.stats()["kv_blocks_free"] == 64

    again = llm.generate(prompt, params)[0]
    assert [c.token_ids for c in again.outputs] == samples  # deterministic with a seed
    for i in range(4):
        single = llm.generate(prompt, SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12, ignore_eos=True))
        assert single[0].token_ids == samples[i], f"sample {i} != the n=1 run with seed {5 + i}"


def test_fork_at_a_block_boundary_copies_nothing(tiny_hf_dir):
    rng = random.Random(4)
    prompt = [rng.randrange(3, 320) for _ in range(32)]  # exactly 2 blocks of 16
    llm = make_llm(tiny_hf_dir, num_kv_blocks=64)
    copies_seen = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda sch, cp, rows: (copies_seen.append(list(cp)), execute(sch, cp, rows))[1]
    params = SamplingParams(temperature=1.0, seed=9, n=3, max_tokens=4, ignore_eos=True)
    out = llm.generate(prompt, params)[0]
    assert all(c == [] for c in copies_seen)
    for i in range(3):
        single = llm.generate(prompt, SamplingParams(temperature=1.0, seed=9 + i, max_tokens=4, ignore_eos=True))
        assert single[0].token_ids == out.outputs[i].token_ids


def test_greedy_n_samples_are_identical(tiny_hf_dir, prompts, one_at_a_time):
    llm = make_llm(tiny_hf_dir, num_kv_blocks=64)
    out = llm.generate(prompts[2], SamplingParams(temperature=0, n=3, max_tokens=24, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [one_at_a_time[2]] * 3


# -- accounting under random operations ---------------------------------------------------------
POOL, BLOCK = 20, 4

operation = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12), st.sampled_from([1, 2]),
              st.integers(0, 3)),
    st.tuples(st.just("abort"), st.integers(0, 10_000)),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
    st.tuples(st.just("step")),
)


SMALL_POOL_CONFIGS = [  # a roomy step budget; tiny chunks and few sequences
    EngineConfig(num_kv_blocks=POOL, block_size=BLOCK, max_num_batched_tokens=24),
    EngineConfig(num_kv_blocks=POOL, block_size=BLOCK, max_num_batched_tokens=5, max_num_seqs=3),
]


@pytest.fixture(scope="module")
def model_llm(tiny_hf_dir):
    return make_llm(tiny_hf_dir, num_kv_blocks=1)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(ops=st.lists(operation, min_size=200, max_size=200), finish_by_abort=st.booleans(),
       which=st.sampled_from([0, 1]))
def test_block_accounting_holds_under_random_operations(model_llm, ops, finish_by_abort, which):
    """After every add / abort / step: ref counts equal block-table references, the free list is
    exactly the unreferenced blocks, the hash index is current; at the end every block is free."""
    engine = LLMEngine(model_llm.model, model_llm.tokenizer, model_llm.config.max_position, SMALL_POOL_CONFIGS[which],
                       sampler=model_llm.engine.sampler)
    assert engine.stats()["kv_blocks_free"] == POOL and engine.max_model_len == POOL * BLOCK
    names = iter(range(1_000_000))
    added: dict[str, tuple[int, SamplingParams]] = {}
    finished: dict[str, tandem.RequestOutput] = {}

    def collect(outs):
        for out in outs:
            assert out.request_id not in finished
            finished[out.request_id] = out

    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, n, alphabet = op
            prompt = [3 + (alphabet * 37 + i) % 300 for i in range(length)]  # shared prefixes
            params = SamplingParams(temperature=1.0, seed=length, n=n, max_tokens=max_tokens, ignore_eos=True)
            request_id = f"q{next(names)}"
            engine.add_request(request_id, prompt, params)
            added[request_id] = (length, params)
        elif op[0] == "abort":
            live = sorted(engine.requests)
            if live:
                engine.abort(live[op[1] % len(live)])
        else:
            collect(engine.step()[1])
        check(engine)
        stats = engine.stats()
        seqs = [s for s in live_seqs(engine) if s.status is not SequenceStatus.FINISHED]
        assert stats["running"] + stats["waiting"] == len(seqs)
        assert all(s.block_table == [] for s in live_seqs(engine) if s not in engine.scheduler.running)

    if finish_by_abort:
        for request_id in list(engine.requests):
            engine.abort(request_id)
            check(engine)
    else:
        for _ in range(3000):
            if not engine.has_unfinished():
                break
            collect(engine.step()[1])
            check(engine)
        assert not engine.has_unfinished()
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == POOL
    assert stats["running"] == stats["waiting"] == 0 and engine.requests == {}
    for request_id, out in finished.items():
        length, params = added[request_id]
        want = min(params.max_tokens, engine.max_model_len - length)
        assert len(out.outputs) == params.n
        assert all(len(c.token_ids) == want and c.finish_reason == "length" for c in out.outputs)


# -- bad requests and admission control -----------------------------------------------------------
def test_request_that_can_never_fit_the_pool_is_rejected(tiny_hf_dir):
    llm = make_llm(tiny_hf_dir, num_kv_blocks=8, block_size=4)  # 32 token slots; the model allows 512
    engine = llm.engine
    assert engine.max_model_len == 32 and llm.config.max_position == 512
    with pytest.raises(InvalidRequestError, match="KV pool holds 32 tokens"):
        engine.add_request("big", [5] * 32, GREEDY)
    assert engine.requests == {} and engine.stats()["waiting"] == 0
    engine.add_request("fits", [5] * 31, GREEDY)  # fills the pool; one token is left to generate
    outs = drive(engine, [])
    assert outs["fits"].token_ids and len(outs["fits"].token_ids) == 1
    assert outs["fits"].finish_reason == "length"


def test_abort_of_unknown_or_finished_ids_is_a_no_op(tiny_hf_dir):
    llm = make_llm(tiny_hf_dir, num_kv_blocks=32)
    engine = llm.engine
    engine.abort("never-added")
    outs = drive(engine, [("done", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True))])
    before = engine.stats()
    engine.abort("done")
    engine.abort("done")
    engine.abort("never-added")
    assert engine.stats() == before and outs["done"].finished


def test_abort_frees_blocks_at_once(tiny_hf_dir):
    llm = make_llm(tiny_hf_dir, num_kv_blocks=32, max_num_batched_tokens=8)
    engine = llm.engine
    engine.add_request("mid-prefill", list(range(3, 43)), GREEDY)  # 40 tokens: 5 chunks of 8
    engine.add_request("waiting", list(range(50, 60)), GREEDY)
    engine.step()
    engine.step()  # blocks are handed out chunk by chunk: 16 tokens computed = one block
    assert engine.stats()["kv_blocks_used"] == 1 and engine.stats()["waiting"] == 1
    engine.step()
    assert engine.stats()["kv_blocks_used"] == 2
    engine.abort("mid-prefill")
    check(engine)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0
    engine.abort("waiting")
    assert engine.stats()["waiting"] == 0 and not engine.has_unfinished()
    assert engine.step() == ([], [])
    # decoding request with n=2 (forked siblings share blocks)
    engine.add_request("decoding", list(range(3, 13)), SamplingParams(n=2, seed=1, max_tokens=20))
    for _ in range(4):
        engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["kv_blocks_used"] > 0
    engine.abort("decoding")
    check(engine)
    assert engine.stats()["kv_blocks_free"] == 32 and engine.stats()["running"] == 0


def test_queue_limit_raises_queue_full(tiny_hf_dir):
    llm = make_llm(tiny_hf_dir, max_waiting=2)
    engine = llm.engine
    engine.add_request("a", [5, 6], GREEDY)
    engine.add_request("b", [5, 7], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [5, 8], GREEDY)
    assert "c" not in engine.requests and engine.stats()["waiting"] == 2
    engine.step()  # both admitted: the queue has room again
    engine.add_request("c", [5, 8], GREEDY)
    assert engine.stats()["waiting"] == 1
    for request_id in ("a", "b", "c"):
        engine.abort(request_id)


def test_duplicate_request_id_is_rejected(tiny_hf_dir):
    engine = make_llm(tiny_hf_dir).engine
    engine.add_request("same", [5, 6, 7], GREEDY)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("same", [8, 9], GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError, match="already in use"):  # still running
        engine.add_request("same", [8, 9], GREEDY)
    assert engine.requests["same"].prompt_ids == [5, 6, 7]
    engine.abort("same")


@pytest.mark.parametrize("prompt", [[], [320], [-1], [5, 10**6]])
def test_bad_prompt_ids_are_rejected(tiny_hf_dir, prompt):
    engine = make_llm(tiny_hf_dir).engine
    with pytest.raises(InvalidRequestError):
        engine.add_request("bad", prompt, GREEDY)
    assert engine.requests == {} and engine.stats()["waiting"] == 0


def test_engine_config_validation():
    for bad in ({"block_size": 0}, {"num_kv_blocks": 0}, {"max_num_seqs": 0}, {"max_num_batched_tokens": -1},
                {"max_waiting": 0}, {"block_size": True}, {"kv_cache_memory": 0}, {"kv_cache_memory": 1.5},
                {"num_kv_blocks": 2.0}):
        with pytest.raises(ConfigError):
            EngineConfig(**bad)


def test_pool_size_from_memory_budget():
    from tandem.engine.config import num_kv_blocks

    per_token = 1000
    assert num_kv_blocks(EngineConfig(num_kv_blocks=7), per_token, 512) == 7
    # bytes: 16 tokens a block -> 16,000 bytes a block
    assert num_kv_blocks(EngineConfig(kv_cache_memory=160_000), per_token, 10**6) == 10
    # capped at what max_num_seqs sequences of max_model_len tokens could use
    assert num_kv_blocks(EngineConfig(kv_cache_memory=10**9, max_num_seqs=2), per_token, 100) == 2 * 7
    with pytest.raises(ConfigError, match="no room"):
        num_kv_blocks(EngineConfig(kv_cache_memory=15_999), per_token, 512)


def test_engine_config_rejects_bool_num_kv_blocks():
    """Was a bug (config.py accepted num_kv_blocks=True as a 1-block pool); fixed alongside these tests."""
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        EngineConfig(num_kv_blocks=True)


def test_max_num_seqs_bounds_every_step_also_with_n_samples(tiny_hf_dir):
    """Was a bug: forked samples joined the batch through Scheduler.add_running and the running
    loop never checked max_num_seqs, so max_num_seqs=2 with n=4 ran 4 sequences every decode step."""
    llm = make_llm(tiny_hf_dir, num_kv_blocks=64, max_num_seqs=2)
    per_step = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda sch, cp, rows: (per_step.append(len(sch)), execute(sch, cp, rows))[1]
    prompt = [5, 6, 7, 8, 9, 10]
    out = llm.generate(prompt, SamplingParams(temperature=1.0, n=4, seed=1, max_tokens=5, ignore_eos=True))[0]
    assert max(per_step) <= 2, f"sequences per step: {per_step}"
    assert llm.engine.stats()["kv_blocks_free"] == 64
    for i, sample in enumerate(out.outputs):  # held back samples still produce their own seeded output
        alone = llm.generate(prompt, SamplingParams(temperature=1.0, seed=1 + i, max_tokens=5, ignore_eos=True))[0]
        assert sample.token_ids == alone.token_ids


# -- metrics and stats --------------------------------------------------------------------------
def test_request_metrics(tiny_hf_dir, prompts):
    engine = make_llm(tiny_hf_dir, num_kv_blocks=64).engine
    outs = drive(engine, [("m", prompts[3], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))])
    metrics = outs["m"].metrics
    assert metrics.num_prompt_tokens == 25 and metrics.num_cached_tokens == 0
    assert metrics.ttft is not None and metrics.ttft > 0
    assert len(metrics.token_times) == 7
    latencies = metrics.inter_token_latencies
    assert len(latencies) == 6 and all(x > 0 for x in latencies)
    assert metrics.e2e_latency >= metrics.ttft + sum(latencies) - 1e-9
    assert metrics.first_token_time == metrics.token_times[0]


def test_metrics_of_n_samples_follow_sample_zero(tiny_hf_dir):
    engine = make_llm(tiny_hf_dir, num_kv_blocks=64).engine
    outs = drive(engine, [("n", [5, 6, 7, 8, 9], SamplingParams(n=3, seed=2, max_tokens=5, ignore_eos=True))])
    assert len(outs["n"].metrics.token_times) == 5
    assert len(outs["n"].metrics.inter_token_latencies) == 4


def test_stats_across_a_run(tiny_hf_dir):
    engine = make_llm(tiny_hf_dir, num_kv_blocks=16, block_size=4).engine
    stats = engine.stats()
    assert stats == {"running": 0, "waiting": 0, "kv_blocks_total": 16, "kv_blocks_free": 16, "kv_blocks_used": 0,
                     "prefix_cache_queried_tokens": 0, "prefix_cache_hit_tokens": 0, "prefix_cache_hit_rate": 0.0,
                     "preemptions": 0, "finished_requests": 0,
                     "spec_proposed_tokens": 0, "spec_accepted_tokens": 0, "spec_acceptance_rate": 0.0}
    prompt = list(range(10, 20))  # 10 tokens: 3 blocks of 4
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("a", prompt, params)
    engine.add_request("b", list(range(30, 35)), params)
    stats = engine.stats()
    assert (stats["waiting"], stats["running"], stats["kv_blocks_used"]) == (2, 0, 0)
    engine.step()
    stats = engine.stats()
    assert (stats["waiting"], stats["running"], stats["kv_blocks_used"]) == (0, 2, 3 + 2)
    assert stats["prefix_cache_queried_tokens"] == 15 and stats["prefix_cache_hit_tokens"] == 0
    engine.step()
    assert engine.stats()["kv_blocks_used"] == 3 + 2  # 11th and 6th tokens fit the partial blocks
    engine.step()
    stats = engine.stats()
    assert stats["finished_requests"] == 2 and stats["running"] == 0 and stats["kv_blocks_free"] == 16
    engine.add_request("c", prompt, params)  # same prompt: its 2 full blocks are cached
    engine.step()
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] == 8 and stats["prefix_cache_queried_tokens"] == 25
    assert stats["prefix_cache_hit_rate"] == pytest.approx(8 / 25)
    assert stats["preemptions"] == 0
    engine.abort("c")
    assert engine.stats()["kv_blocks_free"] == 16


def test_preemption_counter(tiny_hf_dir, prompts):
    engine = make_llm(tiny_hf_dir, num_kv_blocks=24, block_size=4).engine
    seen_waiting_again = False
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, GREEDY)
    preemptions = 0
    while engine.has_unfinished():
        engine.step()
        stats = engine.stats()
        assert stats["preemptions"] >= preemptions
        if stats["preemptions"] > preemptions:
            seen_waiting_again = seen_waiting_again or stats["waiting"] > 0
        preemptions = stats["preemptions"]
        assert stats["running"] <= engine.config.max_num_seqs
    assert preemptions > 0 and seen_waiting_again
    assert engine.stats()["finished_requests"] == 8


def test_a_pool_too_small_for_any_request_is_a_config_error(tiny_hf_dir):
    with pytest.raises(ConfigError, match="cannot hold"):
        make_llm(tiny_hf_dir, num_kv_blocks=1, block_size=1)
    assert make_llm(tiny_hf_dir, num_kv_blocks=1, block_size=2).engine.max_model_len == 2
