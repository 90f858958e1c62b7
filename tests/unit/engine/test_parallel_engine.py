"""The engine with its model split over ranks (tandem.engine.distributed), ranks as spawned
processes over gloo (parallel_backend "mp"; Ray actors: tests/integration/test_parallel_serving.py).
Under tensor parallelism 2, pipeline parallelism 2 (micro-batches) and both (4 ranks), the engine
tests' properties hold on the tiny Llama (4 heads, 2 KV heads): batched greedy output equals each
request run alone on one rank (under preemption and chunked prefill), the sampled logits equal a
cache-free single-rank forward, prefix sharing computes only the unshared tail and changes no
output, random workloads match; a rank that dies fails the step's requests with
ParallelGroupError and the next step runs on a restarted group."""
from __future__ import annotations

import os
import signal

import pytest
import torch

import tandem
from tandem.errors import ConfigError, ParallelGroupError
from tests.unit.engine.test_engine import (GREEDY, _two_requests_sharing_a_prefix, drive, long_hf_dir,  # noqa: F401
                                           one_at_a_time, prompts, random_workload,
                                           record_sampled_logits)

LAYOUTS = {"tp2": dict(tensor_parallel_size=2), "pp2": dict(pipeline_parallel_size=2),
           "tp2-pp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2)}


def split_llm(path, layout: str, **options) -> tandem.LLM:
    options.setdefault("num_kv_blocks", 256)
    return tandem.LLM(str(path), progress=False, parallel_backend="mp", **LAYOUTS[layout], **options)


@pytest.fixture(scope="module")
def single(tiny_hf_dir):
    return tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=512, enable_prefix_caching=False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batched_greedy_equals_one_rank_one_at_a_time(tiny_hf_dir, prompts, one_at_a_time, layout):  # noqa: F811
    with split_llm(tiny_hf_dir, layout, num_kv_blocks=24, block_size=4, max_num_batched_tokens=7,
                   max_num_seqs=3) as llm:
        outs = drive(llm.engine, [(f"p{i}", p, GREEDY) for i, p in enumerate(prompts)])
        assert [outs[f"p{i}"].token_ids for i in range(len(prompts))] == one_at_a_time
        assert llm.engine.stats()["preemptions"] > 0


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_sampled_logits_equal_a_single_rank_cache_free_forward(tiny_hf_dir, prompts, single, layout):  # noqa: F811
    with split_llm(tiny_hf_dir, layout, block_size=8, max_num_batched_tokens=16) as llm:
        rows = record_sampled_logits(llm.engine)
        work = prompts + [p[: len(p) // 2 + 1] + [9, 8, 7] for p in prompts if len(p) > 16]  # prefix hits
        outs = drive(llm.engine, [(f"p{i}", p, GREEDY) for i, p in enumerate(work)], arrive_every=3)
        assert llm.engine.stats()["prefix_cache_hit_tokens"] > 0
    model = single.model
    for i, prompt in enumerate(work):
        seq = prompt + outs[f"p{i}"].token_ids
        with torch.inference_mode():
            full = model.compute_logits(model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0)))[0]
        got = torch.stack([rows[(f"p{i}", len(prompt) + k)] for k in range(len(outs[f"p{i}"].token_ids))])
        torch.testing.assert_close(got, full[len(prompt) - 1:-1], atol=1e-4, rtol=0)  # fp32; sums reordered


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_prefix_sharing_under_a_split(long_hf_dir, layout):  # noqa: F811
    make = lambda path, **o: split_llm(path, layout, **o)  # noqa: E731
    cached, computed, (table_a, table_b), refs, engine, (prompt_a, prompt_b) = \
        _two_requests_sharing_a_prefix(long_hf_dir, True, make)
    engine.runner.close()
    plain, *_, plain_engine, _ = _two_requests_sharing_a_prefix(long_hf_dir, False, make)
    plain_engine.runner.close()
    assert table_b[:62] == table_a[:62] and cached["b"].metrics.num_cached_tokens == 992
    assert computed["b"] == [len(prompt_b) - 992] + [1] * 5  # only the unshared tail, then decodes
    assert [cached[k].token_ids for k in "ab"] == [plain[k].token_ids for k in "ab"]


@pytest.mark.parametrize("layout,seed", [("tp2", 0), ("pp2", 1), ("tp2-pp2", 2)])
def test_random_workloads_under_a_split_match_one_rank_alone(tiny_hf_dir, single, layout, seed):
    random_workload(lambda path, **o: split_llm(path, layout, **o), tiny_hf_dir, single, seed)


def _rank_pids() -> list[int]:
    import multiprocessing

    return [p.pid for p in multiprocessing.active_children() if p.name.startswith("tandem-rank-")]


def test_a_dead_rank_fails_the_step_and_the_group_restarts(tiny_hf_dir, prompts, one_at_a_time):  # noqa: F811
    with split_llm(tiny_hf_dir, "tp2") as llm:
        assert llm.generate(prompts[0], GREEDY)[0].token_ids == one_at_a_time[0]  # fills the prefix cache
        [pid] = _rank_pids()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ParallelGroupError, match="restarts"):
            llm.generate(prompts[:3], GREEDY)
        check_engine = llm.engine
        assert check_engine.stats()["kv_blocks_free"] == check_engine.stats()["kv_blocks_total"]  # nothing leaked
        assert not check_engine.block_manager.cached  # the lost ranks' KV is not trusted
        outs = llm.generate(prompts, GREEDY)  # a new group: the same answers
        assert [o.token_ids for o in outs] == one_at_a_time
        assert llm.engine.runner.restarts == 1 and _rank_pids() != [pid]
    assert not _rank_pids()  # close() stopped the ranks


def test_bad_layouts_are_refused_before_any_rank_starts(tiny_hf_dir):
    with pytest.raises(ConfigError, match="tensor_parallel_size 3 does not divide"):
        tandem.LLM(str(tiny_hf_dir), progress=False, tensor_parallel_size=3, parallel_backend="mp")
    with pytest.raises(ConfigError, match="parallel_backend must be one of ray, mp"):
        tandem.LLM(str(tiny_hf_dir), progress=False, tensor_parallel_size=2, parallel_backend="slurm")
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        tandem.LLM(str(tiny_hf_dir), progress=False, tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="has no experts"):
        tandem.LLM(str(tiny_hf_dir), progress=False, expert_parallel_size=2, parallel_backend="mp")
    assert not _rank_pids()


def test_speculative_decoding_under_a_pipeline_split_keeps_the_greedy_output(tiny_hf_dir, prompts,  # noqa: F811
                                                                            one_at_a_time):  # noqa: F811
    """Verification rows (every guess's logits) come back through the stages in order."""
    with split_llm(tiny_hf_dir, "pp2", speculative={"method": "ngram", "k": 3}) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == one_at_a_time
        assert llm.engine.stats()["spec_proposed_tokens"] > 0
