"""Sparse mixture-of-experts models against transformers: tiny random Mixtral, Qwen2-MoE (gated
shared expert, a dense layer among the sparse ones), Qwen3-MoE (per-head q/k norms) and OLMoE
(whole-projection q/k norms) built with transformers' own classes, loaded by tandem from the
directory transformers saved (stacked experts) and from per-expert checkpoints (the published
layout). Same logits (fp32; tolerance 1e-4, against differences of 1e-6 from fused q/k/v and BLAS
blocking), same greedy tokens through the engine, batch invariance, and the router statistics."""
from __future__ import annotations

import pytest
import torch

import tandem
from tandem.config import MoEConfig
from tandem.errors import ConfigError
from tandem.model.moe import SparseMoE, router_stats
from tests.tiny_models import MOE_ARCHITECTURES, write_tiny_moe_dir

ARCHS = sorted(MOE_ARCHITECTURES)


@pytest.fixture(scope="module", params=[(a, p) for a in ARCHS for p in (False, True)],
                ids=lambda ap: f"{ap[0]}-{'per-expert' if ap[1] else 'stacked'}")
def moe(request, tmp_path_factory):
    arch, per_expert = request.param
    path, hf = write_tiny_moe_dir(tmp_path_factory.mktemp(arch), arch, per_expert)
    llm = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=128, block_size=4)
    return arch, hf, llm


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def test_logits_match_transformers(moe):
    arch, hf, llm = moe
    ids = torch.tensor([_ids(40, 1)])
    ref = hf(ids).logits[0]
    ours = llm.model.compute_logits(llm.model(ids, torch.arange(40)[None]))[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert llm.config.moe is not None and any(isinstance(m, SparseMoE) for m in llm.model.modules())


@torch.inference_mode()
def test_greedy_tokens_match_transformers_through_the_engine(moe):
    arch, hf, llm = moe
    prompt = _ids(12, 2)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    got = llm.generate([prompt], tandem.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == out


def test_batch_gives_each_row_what_it_gets_alone_and_counts_routed_tokens(moe):
    arch, _, llm = moe
    prompts = [_ids(n, 10 + n) for n in (5, 17, 9)]
    params = tandem.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = router_stats(llm.model)["moe_routed_tokens"]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]  # new prompts: no cache hit
    stats = router_stats(llm.model)
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert batched == alone
    m, sparse = llm.config.moe, sum(isinstance(x, SparseMoE) for x in llm.model.modules())
    # every computed token went to top_k experts in every sparse layer (the last token is sampled, not computed)
    computed = sum(len(p) + 6 - 1 for p in prompts)
    assert stats["moe_routed_tokens"] - before == computed * m.top_k * sparse
    assert stats["moe_expert_imbalance"] >= 1.0
    assert sum(v for k, v in stats.items() if k.startswith("moe_tokens_expert_")) == stats["moe_routed_tokens"]


def test_qwen2_moe_keeps_its_dense_layer_and_shared_expert(tmp_path):
    path, _ = write_tiny_moe_dir(tmp_path, "qwen2_moe")
    llm = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=32, block_size=4)
    layers = llm.model.model.layers
    assert isinstance(layers[0].mlp, SparseMoE) and layers[0].mlp.shared_expert is not None
    assert not isinstance(layers[1].mlp, SparseMoE)  # mlp_only_layers=[1]
    assert llm.config.moe.sparse_layers == (0,) and not llm.config.moe.normalize_top_k


def test_moe_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3, expert_intermediate_size=8)
    with pytest.raises(ConfigError, match="num_experts"):
        MoEConfig(num_experts=0, top_k=1, expert_intermediate_size=8)


def test_a_checkpoint_missing_an_expert_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from tandem.errors import ModelLoadError

    path, _ = write_tiny_moe_dir(tmp_path, "olmoe", per_expert_tensors=True)
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="model.layers.1 has 11 of the 12 expert tensors"):
        tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=32, block_size=4)


def test_router_statistics_reach_engine_stats_and_the_metrics(moe):
    """Tokens per expert and the imbalance: in the engine's stats (a worker's Stats rpc), then on
    the gateway's /metrics with an expert label."""
    from services.metrics import GatewayMetrics

    _, _, llm = moe
    llm.generate([_ids(7, 99)], tandem.SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats["moe_routed_tokens"] > 0 and stats["moe_expert_imbalance"] >= 1.0
    metrics = GatewayMetrics()
    metrics.services.snapshot = {("decode", "decode-0"): {k: float(v) for k, v in stats.items()}}
    text = metrics.render().decode()
    assert 'tandem_moe_expert_tokens_total{expert="0",instance="decode-0",service="decode"}' in text
    assert "tandem_moe_expert_imbalance{" in text and "tandem_moe_routed_tokens_total{" in text


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_moe_files_give_the_same_logits(tmp_path, arch):
    """The same models as llama.cpp's converter writes them (ffn_*_exps, ffn_gate_inp, *_shexp, q/k
    norms; Mixtral as "llama" with Q/K rows permuted, the others NEOX): transformers' logits."""
    from tests.tiny_models import write_tiny_moe_gguf

    path, hf = write_tiny_moe_dir(tmp_path, arch)
    gguf_path = write_tiny_moe_gguf(path, hf, arch, tmp_path / f"{arch}.gguf")
    llm = tandem.LLM(str(gguf_path), dtype="float32", progress=False, num_kv_blocks=64, block_size=4)
    assert llm.config.moe is not None
    ids = torch.tensor([_ids(40, 3)])
    with torch.inference_mode():
        ref = hf(ids).logits[0]
        ours = llm.model.compute_logits(llm.model(ids, torch.arange(40)[None]))[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    prompt = _ids(12, 4)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    got = llm.generate([prompt], tandem.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert got.outputs[0].token_ids == out
