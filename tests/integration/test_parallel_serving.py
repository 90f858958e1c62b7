"""Parallel groups as users run them, with Ray actors: the default model under tensor parallelism
3 (tandem.LLM starting its own local Ray) gives the single-rank engine's greedy tokens; a tiny
random Mixtral under expert parallelism 2 behind `tandem serve` (the worker's second rank a Ray
actor in a placement group) answers the openai client with the single-rank engine's tokens and
log-probabilities (which tests/unit/model/test_moe_parallel.py ties to transformers')."""
from __future__ import annotations

import pytest

import tandem
from tests.integration.test_serve import Server

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY = tandem.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_default_model_under_tensor_parallelism_3_on_ray_actors(default_llm_dequantized):
    want = [o.token_ids for o in default_llm_dequantized.generate(PROMPTS, GREEDY)]
    with tandem.LLM("smollm2-135m", progress=False, quantization="none", num_kv_blocks=64,
                    tensor_parallel_size=3, parallel_backend="ray") as llm:
        import ray

        assert ray.is_initialized()  # library mode started its own local Ray
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == want
    assert not ray.is_initialized()  # and stopped it on close


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from tests.tiny_models import write_tiny_moe_dir

    path, _ = write_tiny_moe_dir(tmp_path_factory.mktemp("mixtral"), "mixtral")
    return path


def test_moe_model_with_expert_parallelism_behind_tandem_serve(mixtral):
    openai = pytest.importorskip("openai")
    prompt = "To be, or not to be"
    with tandem.LLM(str(mixtral), progress=False, num_kv_blocks=64) as single:
        want = single.generate(prompt, tandem.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                             logprobs=0))[0].outputs[0]
    server = Server("--model", str(mixtral), "--mode", "aggregated", "--expert-parallel-size", "2",
                    "--kv-cache-memory", str(16 << 20))
    server.wait_ready()
    try:
        assert any("expert" in line and "2" in line for line in server.lines), "the shape is printed"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused")
        out = client.completions.create(model=mixtral.name, prompt=prompt, max_tokens=8, temperature=0,
                                        logprobs=0, extra_body={"ignore_eos": True})
        choice = out.choices[0]
        assert choice.text == want.text
        got = choice.logprobs.token_logprobs
        assert max(abs(a - b.logprob) for a, b in zip(got, want.logprobs)) < 1e-4
    finally:
        assert server.stop() == 0
