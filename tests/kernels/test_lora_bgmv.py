"""lora_bgmv: the Triton gathered low-rank matmul (interpreted on the CPU) against its torch
reference (tandem.model.lora.bgmv), with tokens of several adapters and of none, ranks below the
padded block, and fp16."""
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
