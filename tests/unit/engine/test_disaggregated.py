"""Disaggregated serving on the engine level: one engine runs prefill only and saves its KV in a
store through its KV connector, another loads the blocks through its own and continues. Greedy
output must equal one engine doing everything, the decode side must compute only the prompt's
partial tail, the hand-off's pins must be released, and no block may leak."""
from __future__ import annotations

import random

import pytest
import torch

from tandem import SamplingParams
from tandem.engine.kv_connector import LocalStoreConnector
from tandem.errors import InvalidRequestError
from tandem.kv_store import KVBlockStore
from tests.unit.engine.test_engine import check, make_llm

BLOCK = 16
NS = "tiny"


@pytest.fixture(scope="module")
def store():
    return KVBlockStore(64 << 20)


@pytest.fixture(scope="module")
def engines(tiny_hf_dir, store):
    """(reference, prefill, decode): three engines over the same tiny model; the last two share
    the store through their connectors."""
    reference, prefill, decode = [make_llm(tiny_hf_dir, block_size=BLOCK).engine for _ in range(3)]
    prefill.attach_connector(LocalStoreConnector(store, NS))
    decode.attach_connector(LocalStoreConnector(store, NS))
    return reference, prefill, decode


def run(engine, request_id, prompt, params, **options):
    engine.add_request(request_id, prompt, params, **options)
    while engine.has_unfinished():
        for output in engine.step()[1]:
            if output.request_id == request_id:
                result = output
        check(engine)
    return result


def handoff(prefill, decode, request_id, prompt, params):
    """Prefill, then decode from its first tokens; returns (prefill's output, blocks the decode
    side loaded from the store, decode's output)."""
    first = run(prefill, request_id, prompt, params, prefill_only=True)
    before = decode.stats()["kv_blocks_fetched"]
    firsts = [o.token_ids[0] for o in first.outputs]
    got = run(decode, request_id, prompt, params, generated=[[t] for t in firsts])
    return first, decode.stats()["kv_blocks_fetched"] - before, got


@pytest.mark.parametrize("prompt_len", [5, 16, 37, 80])
def test_greedy_handoff_matches_one_engine(engines, store, prompt_len):
    reference, prefill, decode = engines
    prompt = random.Random(prompt_len).choices(range(3, 300), k=prompt_len)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = run(reference, f"ref-{prompt_len}", prompt, params)
    first, imported, got = handoff(prefill, decode, f"r-{prompt_len}", prompt, params)
    assert first.outputs[0].token_ids == want.token_ids[:1] and first.finish_reason is None
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.finish_reason == "length"
    full_blocks = prompt_len // BLOCK
    assert imported == full_blocks
    assert got.metrics.num_cached_tokens == full_blocks * BLOCK  # only the partial tail is recomputed
    for engine in engines:
        assert engine.stats()["kv_blocks_used"] == 0
    assert store.stats()["pinned_blocks"] == 0  # the decode side released the hand-off's lease


def test_loaded_blocks_equal_the_computed_ones(engines):
    reference, prefill, decode = engines
    prompt = list(range(10, 10 + 3 * BLOCK + 2))
    params = SamplingParams(temperature=0, max_tokens=3)
    first, loaded, _ = handoff(prefill, decode, "bits", prompt, params)
    assert loaded == 3
    chain = prefill.block_manager.chain(_seq(prompt), 3)
    mine = prefill.export_cached(chain)
    theirs = decode.export_cached(chain)
    assert len(mine) == len(theirs) == 3
    for (h1, a), (h2, b) in zip(mine, theirs):
        assert h1 == h2 and all(torch.equal(x, y) for x, y in zip(a, b))


def _seq(prompt, salt=None):
    from tandem.engine.sequence import Sequence

    return Sequence("probe", list(prompt), len(prompt), SamplingParams(cache_salt=salt))


def test_second_prefill_saves_only_new_blocks(engines, store):
    _, prefill, _ = engines
    shared = list(range(50, 50 + 4 * BLOCK))
    params = SamplingParams(temperature=0, max_tokens=4)
    run(prefill, "p1", shared + [7, 8, 9], params, prefill_only=True)
    before = prefill.stats()["kv_blocks_published"]
    second = run(prefill, "p2", shared + list(range(100, 100 + BLOCK)) + [3], params, prefill_only=True)
    assert prefill.stats()["kv_blocks_published"] - before == 1
    assert second.metrics.num_cached_tokens == 4 * BLOCK
    prompt = shared + list(range(100, 100 + BLOCK)) + [3]
    keys = [prefill.connector.seal.key(h) for h in prefill.block_manager.chain(_seq(prompt))]
    assert store.lookup(NS, keys) == 5  # pinned for the hand-off: 4 from p1's save, 1 new
    for key in keys:  # nobody decodes these: end the leases as a decode worker would
        store.unpin(NS, [key])
        store.unpin(NS, [key])


def test_blocks_the_store_lost_are_sent_again_from_the_cache(tiny_hf_dir):
    """The prompt's leading blocks hit this engine's own cache, but the store evicted them since:
    the save finds them missing and sends them again, so the decode side still finds the chain."""
    store = KVBlockStore(64 << 20)
    prefill = make_llm(tiny_hf_dir, block_size=BLOCK).engine
    prefill.attach_connector(LocalStoreConnector(store, NS))
    shared = list(range(40, 40 + 3 * BLOCK))
    params = SamplingParams(temperature=0, max_tokens=2)
    run(prefill, "a", shared + [1, 2], params, prefill_only=True)
    fresh = KVBlockStore(64 << 20)  # a restarted store: empty
    prefill.connector.store = fresh
    out = run(prefill, "b", shared + [5, 6], params, prefill_only=True)
    assert out.metrics.num_cached_tokens == 3 * BLOCK  # the local cache served them
    keys = [prefill.connector.seal.key(h) for h in prefill.block_manager.chain(_seq(shared), 3)]
    assert fresh.lookup(NS, keys) == 3
    check(prefill)


def test_sampled_n_samples_continue_from_their_first_tokens(engines):
    _, prefill, decode = engines
    prompt = list(range(20, 60))
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=5, ignore_eos=True)
    first, _, got = handoff(prefill, decode, "n3", prompt, params)
    assert len(got.outputs) == 3
    for a, b in zip(first.outputs, got.outputs):
        assert b.token_ids[0] == a.token_ids[0] and len(b.token_ids) == 8
        assert b.text.startswith(a.text)


def test_resume_rejects_a_wrong_number_of_first_tokens(engines):
    _, _, decode = engines
    with pytest.raises(InvalidRequestError, match="one token list per sample"):
        decode.add_request("bad", [1, 2, 3], SamplingParams(n=2), generated=[[4]])
    with pytest.raises(InvalidRequestError):
        decode.add_request("bad2", [1, 2, 3], SamplingParams(), generated=[[10**9]])
    assert not decode.has_unfinished()


def test_a_block_of_the_wrong_layout_is_refused_and_forgotten(engines):
    _, _, decode = engines
    bad = [[torch.zeros(3, 3)]]
    with pytest.raises(ValueError, match="does not fit"):
        decode.import_blocks([b"\x01" * 16], bad)
    assert decode.block_manager.num_cached_prefix([b"\x01" * 16]) == 0
    check(decode)


@pytest.mark.parametrize("n", [1, 3])
def test_seeded_sampling_continues_its_random_stream_across_the_handoff(engines, n):
    """Randomness is addressed by output position (tandem.sampling.RandomStream): the decode side
    draws token 2 with what one engine would have used for token 2, not a fresh generator."""
    reference, prefill, decode = engines
    prompt = list(range(30, 70))
    params = SamplingParams(temperature=1.0, max_tokens=10, n=n, seed=1234, ignore_eos=True)
    alone = run(reference, "alone", prompt, params)
    _, _, split = handoff(prefill, decode, "split", prompt, params)
    assert [o.token_ids for o in split.outputs] == [o.token_ids for o in alone.outputs]


def test_a_seeded_request_resumed_mid_stream_draws_the_same_tokens(engines):
    """What migration relies on: prompt + the tokens already sent, same seed -> the same rest."""
    reference, _, decode = engines
    prompt = list(range(80, 110))
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=7, ignore_eos=True,
                            repetition_penalty=1.3, presence_penalty=0.5)
    whole = run(reference, "whole", prompt, params).outputs[0].token_ids
    resumed = run(decode, "resumed", prompt, params, generated=[whole[:5]]).outputs[0].token_ids
    assert resumed == whole
