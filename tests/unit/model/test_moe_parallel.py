"""MoE models split over ranks through tandem.LLM (the engine's step on every rank; spawned
processes over gloo): tiny random Mixtral, Qwen2-MoE (shared expert, a dense layer) and OLMoE
built with transformers' own classes give, with expert parallelism 2 (experts split, all-to-all
dispatch and combine), with tensor parallelism 2 and with both, the greedy tokens transformers
gives and each token's log-probability within 1e-4 of transformers' (fp32; the collectives and
the experts' matmuls add in another order: measured differences are near 1e-6). A batch gives each
row what it gets alone, and the router statistics count every routed token."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.errors import ConfigError
from tests.tiny_models import write_tiny_moe_dir

GREEDY = tandem.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
CASES = [("mixtral", dict(expert_parallel_size=2)), ("qwen2_moe", dict(expert_parallel_size=2)),
         ("olmoe", dict(expert_parallel_size=2)), ("mixtral", dict(tensor_parallel_size=2)),
         ("qwen2_moe", dict(tensor_parallel_size=2, expert_parallel_size=2))]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    return {arch: write_tiny_moe_dir(tmp_path_factory.mktemp(arch), arch)
            for arch in sorted({arch for arch, _ in CASES})}


@torch.inference_mode()
def _transformers_greedy(hf, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(s[0].float().log_softmax(-1)[t]) for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("arch,layout", CASES, ids=[f"{a}-{'-'.join(f'{k[0]}{v}' for k, v in o.items())}"
                                                    for a, o in CASES])
def test_split_moe_model_gives_transformers_tokens_and_logprobs(moe_dirs, arch, layout):
    path, hf = moe_dirs[arch]
    prompts = [_ids(n, 10 + n) for n in (5, 17, 9)]
    with tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=128, block_size=4,
                    parallel_backend="mp", **layout) as llm:
        batched = llm.generate(prompts, GREEDY)
        alone = [llm.generate([p], GREEDY)[0] for p in prompts]
        stats = llm.engine.stats()
    for prompt, out, one in zip(prompts, batched, alone):
        tokens, logprobs = _transformers_greedy(hf, prompt, 8)
        assert out.outputs[0].token_ids == tokens == one.outputs[0].token_ids
        got = [lp.logprob for lp in out.outputs[0].logprobs]
        assert max(abs(a - b) for a, b in zip(got, logprobs)) < 1e-4
    assert stats["moe_routed_tokens"] > 0 and stats["moe_expert_imbalance"] >= 1.0


def test_olmoe_refuses_tensor_parallelism_by_name(moe_dirs):
    path, _ = moe_dirs["olmoe"]
    with pytest.raises(ConfigError, match="normalises its whole q and k projections"):
        tandem.LLM(str(path), progress=False, tensor_parallel_size=2, parallel_backend="mp")


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_split_moe_model_through_the_service_pipeline(moe_dirs, arch):
    """tandem serve's services in-process (one aggregated worker, split over 2 ranks by experts):
    the SDK gets the single-rank engine's greedy tokens and log-probabilities, so transformers'
    (the test above); the Mixtral case runs behind `tandem serve` itself in
    tests/integration/test_parallel_serving.py."""
    from tandem.orchestration.local import InProcessPipeline
    from tandem.sdk import Client
    from tandem.services.config import PipelineConfig

    path, hf = moe_dirs[arch]
    prompt = _ids(11, 3)
    tokens, logprobs = _transformers_greedy(hf, prompt, 8)
    config = PipelineConfig(model=str(path), grpc_port=0, http_port=0, kv_cache_memory=16 << 20, mode="aggregated",
                            replicas={"decode": 1}, expert_parallel_size=2, parallel_backend="mp")
    with InProcessPipeline(config) as pipe, Client(pipe.address, timeout=60) as client:
        out = client.complete(prompt, temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    assert out.token_ids == tokens
    assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs)) < 1e-4
