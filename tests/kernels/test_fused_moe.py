"""fused_moe: the Triton grouped-matmul kernel (interpreted on the CPU) against its torch reference,
the alignment of assignments into expert tiles, and the reference against transformers' experts."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels import fused_moe as module
from tandem.kernels.fused_moe import align, fused_moe, fused_moe_reference, fused_moe_triton

DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 2e-2)]


def _case(n, d, inner, experts, k, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    gate_up = torch.randn(experts, 2 * inner, d, generator=g) / d ** 0.5
    down = torch.randn(experts, d, inner, generator=g) / inner ** 0.5
    probs = torch.softmax(torch.randn(n, experts, generator=g), -1)
    top_w, top_i = torch.topk(probs, k, dim=-1)
    return [t.to(device) for t in (x.to(dtype), gate_up.to(dtype), down.to(dtype), top_i, top_w.to(dtype))]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("n, d, inner, experts, k", [(1, 32, 16, 4, 2), (7, 48, 40, 4, 2), (33, 64, 24, 8, 3),
                                                     (5, 40, 20, 6, 1)],
                         ids=["one-token", "ragged", "many-tiles", "top-1"])
def test_kernel_matches_the_reference(n, d, inner, experts, k, dtype, atol, rtol, monkeypatch, device):
    monkeypatch.setattr(module, "BLOCK_M", 4)  # several tiles per expert, padding in most
    args = _case(n, d, inner, experts, k, dtype, device)
    out = fused_moe_triton(*args)
    assert out.shape == (n, d) and out.dtype == dtype
    ref = fused_moe_reference(*[a.float() if a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def test_an_expert_with_no_tokens_and_an_empty_batch(device):
    x, gate_up, down, top_i, top_w = _case(6, 32, 16, 5, 2, torch.float32, device)
    top_i = torch.where(top_i == 3, torch.zeros_like(top_i), top_i)  # nobody routes to expert 3
    top_i[:, 1] = torch.where(top_i[:, 0] == top_i[:, 1], (top_i[:, 0] + 1) % 5, top_i[:, 1])
    torch.testing.assert_close(fused_moe_triton(x, gate_up, down, top_i, top_w),
                               fused_moe_reference(x, gate_up, down, top_i, top_w), atol=1e-4, rtol=1e-4)
    empty = fused_moe_triton(x[:0], gate_up, down, top_i[:0], top_w[:0])
    assert empty.shape == (0, 32)


def test_align_pads_each_expert_to_whole_tiles():
    top_i = torch.tensor([[0, 2], [2, 1], [0, 2]])  # assignments 0..5: experts 0,2,2,1,0,2
    rows, tile_expert = align(top_i, 4, 2)
    assert tile_expert.tolist() == [0, 1, 2, 2]  # expert 0: 2 rows; 1: 1 (+1 pad); 2: 3 (+1 pad); 3: none
    assert rows.tolist() == [0, 4, 3, -1, 1, 2, 5, -1]


def test_bad_shapes_are_refused():
    x, gate_up, down, top_i, top_w = _case(3, 32, 16, 4, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not agree"):
        fused_moe(x[:, :16], gate_up, down, top_i, top_w)
    with pytest.raises(ValueError, match="outside"):
        fused_moe(x, gate_up, down, top_i + 4, top_w)


def test_reference_matches_transformers_experts():
    """transformers' MixtralExperts over the same stacked weights and routing."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(hidden_size=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    experts = MixtralExperts(config)
    x, gate_up, down, top_i, top_w = _case(9, 32, 24, 4, 2, torch.float32, "cpu")
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
        ref = experts(x, top_i, top_w)
    torch.testing.assert_close(fused_moe_reference(x, gate_up, down, top_i, top_w), ref, atol=1e-5, rtol=1e-5)


def test_the_kernel_installed_in_a_model_gives_its_logits(tmp_path):
    """What tandem.LLM does on a GPU (every MoE layer's experts on the kernel), run here through
    the interpreter: the same logits as the model's torch path."""
    import tandem
    from tandem.llm import _use_fused_moe
    from tandem.model.moe import Experts
    from tests.tiny_models import write_tiny_moe_dir

    path, _ = write_tiny_moe_dir(tmp_path, "qwen2_moe")
    llm = tandem.LLM(str(path), dtype="float32", progress=False, num_kv_blocks=32, block_size=4)
    ids = torch.randint(3, 320, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = llm.model.compute_logits(llm.model(ids, torch.arange(20)[None]))
        _use_fused_moe(llm.model)
        assert all(m.impl is fused_moe_triton for m in llm.model.modules() if isinstance(m, Experts))
        got = llm.model.compute_logits(llm.model(ids, torch.arange(20)[None]))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
