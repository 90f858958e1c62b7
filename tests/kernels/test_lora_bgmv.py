"""lora_bgmv: the Triton gathered low-rank matmul (interpreted on the CPU) against its torch
references (tandem.model.lora.bgmv, and lora_delta on the model's fused layout), with tokens of
several adapters and of none, ranks below the padded block, and fp16; a model running it (as
tandem.LLM installs it on CUDA) gives the eager path's tokens; it compiles for an H100."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels.lora_bgmv import bgmv_reference, bgmv_triton


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
@pytest.mark.parametrize("tokens, fan_in, fan_out, slots, rank", [(1, 64, 96, 1, 8), (9, 80, 130, 3, 4),
                                                                   (5, 48, 200, 2, 16)],
                         ids=["one-token", "ragged", "wide"])
def test_kernel_matches_the_reference(tokens, fan_in, fan_out, slots, rank, dtype, tol, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, fan_in, generator=g)
    a = torch.randn(slots, rank, fan_in, generator=g) / fan_in ** 0.5
    b = torch.randn(slots, fan_out, rank, generator=g)
    which = torch.randint(-1, slots, (tokens,), generator=g)
    which[0] = 0  # at least one adapted token
    scaling = torch.rand(slots, generator=g) + 0.5
    out = bgmv_triton(*[t.to(device) for t in (x.to(dtype), a.to(dtype), b.to(dtype), which, scaling)])
    ref = bgmv_reference(x, a, b, which, scaling)
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
    assert bool((out[which.to(device) < 0] == 0).all())


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-2)])
def test_the_models_layout_per_part_matches_lora_delta(dtype, tol, device):
    """lora_delta_triton on a fused projection's layout (three parts of ragged widths, ranks below
    the slots' size, tokens of no adapter) against tandem.model.lora.lora_delta."""
    from tandem.kernels.lora_bgmv import lora_delta_triton
    from tandem.model.lora import group_by_slot, lora_delta

    g = torch.Generator().manual_seed(1)
    slots, max_rank, fan_in, part_outs, tokens = 3, 8, 72, [96, 40, 40], 11
    a = torch.randn(slots, len(part_outs) * max_rank, fan_in, generator=g) / fan_in ** 0.5
    bt = torch.randn(slots, max_rank, sum(part_outs), generator=g)
    a[:, max_rank - 3:max_rank] = 0  # part 0 of rank 5 in slots of 8
    x = torch.randn(tokens, fan_in, generator=g)
    which = torch.tensor([0, -1, 2, 2, 1, -1, 0, 1, 2, -1, 0])
    scaling = torch.rand(slots, generator=g) + 0.5
    order, runs = group_by_slot(which)
    groups = [(slot, order[begin:end]) for slot, begin, end in runs.tolist()]
    ref = lora_delta(x, a, bt, part_outs, scaling, groups)
    out = lora_delta_triton(*[t.to(device) for t in (x.to(dtype), a.to(dtype), bt.to(dtype))], part_outs,
                            scaling.to(device), which.to(device))
    torch.testing.assert_close(out.float().cpu(), ref, atol=tol, rtol=tol)
    assert bool((out[which.to(device) < 0] == 0).all())


def test_a_model_running_the_kernel_gives_the_eager_paths_tokens(tiny_hf_dir, tmp_path, device):
    """The kernel installed on a model's LoRAContext (what tandem.LLM does on CUDA) serves a batch
    mixing two adapters and the base: the same greedy tokens and log-probabilities as lora_delta."""
    import tandem
    from tandem.kernels.lora_bgmv import lora_delta_triton
    from tandem.model.lora import write_random_adapter

    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=32, device=str(device),
                     max_loras=2, max_lora_rank=8)
    for name, seed in (("one", 1), ("two", 2)):
        write_random_adapter(tmp_path / name, llm.config, rank=8, seed=seed, scale=0.1)
        llm.load_lora(name, str(tmp_path / name))
    prompt = list(range(20, 32))
    params = tandem.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    loras = ["one", None, "two"]
    eager = llm.generate([prompt] * 3, params, lora=loras)
    llm.lora.context.kernel = lora_delta_triton
    fused = llm.generate([prompt] * 3, params, lora=loras)
    assert [o.token_ids for o in fused] == [o.token_ids for o in eager]
    assert len({tuple(o.token_ids) for o in eager}) == 3  # each adapter changes the answer
    for got, want in zip(fused, eager):
        assert [lp.logprob for lp in got.outputs[0].logprobs] == pytest.approx(
            [lp.logprob for lp in want.outputs[0].logprobs], abs=1e-4)


def test_compiles_for_hopper():
    """The kernel compiles for an H100 (sm_90) in bf16 with strided A and B (no GPU needed)."""
    from tests.kernels.conftest import HOPPER_SHARED_MEMORY, compile_for_gpu

    types = {name: "*bf16" for name in ("x_ptr", "a_ptr", "b_ptr", "out_ptr")} | {
        "slots_ptr": "*i64", "scaling_ptr": "*fp32"}
    shared = compile_for_gpu("tandem.kernels.lora_bgmv", "_bgmv_kernel", types,
                             dict(BLOCK_R=16, BLOCK_N=64, BLOCK_K=64), num_warps=4)
    assert shared <= HOPPER_SHARED_MEMORY
