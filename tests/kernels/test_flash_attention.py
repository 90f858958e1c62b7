"""flash_attention: the Triton kernel against its torch reference over ragged edges, GQA ratios,
causal or not, windows, ALiBi, head dims and dtypes; keys outside a window never read; the
reference against SDPA with a mask written out element by element and against tandem's own
attention backends; the dispatch; and the input checks."""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import flash_attention as fa
from tandem.model.attention import AttentionMask, AttentionVariant
from tandem.plugins.attention import ALiBi, NaiveBackend, SlidingWindow, alibi_slopes

# (dtype, atol, rtol) for kernel vs reference: assert_close allows atol + rtol * |reference|.
# Measured over CASES (interpreter, seed 0), max |kernel - reference| / (1 + |reference|):
# fp32 3.1e-7, fp16 4.9e-4, bf16 6.9e-3 (outputs up to 3.9 in magnitude), i.e. within about one
# unit in the last place of the output dtype: the reference rounds once from fp32, the kernel
# also rounds P to the input dtype before P @ V, as FlashAttention does. Margins: 30x, 4x, 2.3x.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16"),
]


class Case(NamedTuple):
    batch: int
    heads: int
    kv_heads: int
    queries: int  # T
    keys: int  # S >= T: a prefill chunk over S - T cached keys
    head_dim: int
    causal: bool = True
    window: int | None = None
    alibi: bool = False


# Interpreter tiles are 16 x 16: T and S of 1, 17, 33, 50 cross and miss tile edges.
CASES = {
    "one_token": Case(1, 2, 2, 1, 1, 64),
    "prompt_17": Case(1, 2, 2, 17, 17, 64),
    "prompt_33_d128_gqa3": Case(1, 3, 1, 33, 33, 128),
    "chunk_17_over_50_gqa8": Case(1, 8, 1, 17, 50, 64),
    "decode_1_over_45": Case(1, 4, 2, 1, 45, 128),
    "batch_2_mqa": Case(2, 2, 1, 17, 17, 64),
    "non_causal_gqa3": Case(1, 3, 1, 33, 40, 64, causal=False),
    "window_7": Case(1, 2, 2, 33, 33, 64, window=7),
    "window_5_non_causal": Case(1, 2, 1, 17, 40, 64, causal=False, window=5),
    "alibi_chunk": Case(1, 4, 2, 20, 37, 64, alibi=True),
    "window_alibi_gqa3": Case(1, 3, 1, 33, 64, 128, window=20, alibi=True),
    "head_dim_80": Case(1, 2, 2, 17, 17, 80),
}


def make_inputs(case: Case, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    q = torch.randn(case.batch, case.heads, case.queries, case.head_dim, device=device).to(dtype)
    k = torch.randn(case.batch, case.kv_heads, case.keys, case.head_dim, device=device).to(dtype)
    v = torch.randn(case.batch, case.kv_heads, case.keys, case.head_dim, device=device).to(dtype)
    return q, k, v


def options(case: Case, device) -> dict:
    slopes = alibi_slopes(case.heads).to(device) if case.alibi else None
    return dict(causal=case.causal, window=case.window, alibi_slopes=slopes)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(case, dtype, atol, rtol, device):
    q, k, v = make_inputs(case, dtype, device)
    out = fa.flash_attention_triton(q, k, v, **options(case, device))
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, fa.flash_attention_reference(q, k, v, **options(case, device)),
                               atol=atol, rtol=rtol)


def test_rows_that_see_no_key_are_zero(device):
    """More queries than keys, causal: the first T - S queries sit before every key."""
    q, k, v = make_inputs(Case(1, 2, 1, 20, 9, 64), torch.float32, device)
    out = fa.flash_attention_triton(q, k, v)
    assert torch.equal(out[:, :, :11], torch.zeros_like(out[:, :, :11]))
    torch.testing.assert_close(out, fa.flash_attention_reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_keys_before_the_window_are_never_read(causal, device):
    """Queries at positions 252..255 with window 8 see keys 245..255: key tiles before 192 (any
    tile size up to 64) must be skipped by the loop bounds, not loaded and masked."""
    q, k, v = make_inputs(Case(1, 2, 2, 4, 256, 64), torch.float32, device)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, :192] = float("nan")
    v_poisoned[:, :, :192] = float("nan")
    out = fa.flash_attention_triton(q, k_poisoned, v_poisoned, causal=causal, window=8)
    torch.testing.assert_close(out, fa.flash_attention_reference(q, k, v, causal=causal, window=8),
                               atol=1e-5, rtol=1e-5)


def test_strided_views(device):
    """The attention backend passes (T, H, D) tensors as (1, H, T, D) views: any strides with a
    contiguous head dim work."""
    q, k, v = (torch.randn(1, n, h, 64, device=device).transpose(1, 2) for n, h in ((21, 4), (30, 2), (30, 2)))
    assert not q.is_contiguous()
    torch.testing.assert_close(fa.flash_attention_triton(q, k, v), fa.flash_attention_reference(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_scale(device):
    q, k, v = make_inputs(Case(1, 2, 2, 17, 17, 64), torch.float32, device)
    out = fa.flash_attention_triton(q, k, v, scale=0.3)
    torch.testing.assert_close(out, fa.flash_attention_reference(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, fa.flash_attention_reference(q, k, v), atol=1e-3)


# -- the reference, checked independently ---------------------------------------------------------

def loop_bias(num_queries: int, num_keys: int, heads: int, causal: bool, window: int | None,
              slopes: torch.Tensor | None) -> torch.Tensor:
    """The additive mask (H, T, S), element by element: -inf where hidden, ALiBi's bias elsewhere."""
    bias = torch.zeros(heads, num_queries, num_keys)
    for i in range(num_queries):
        pos = num_keys - num_queries + i
        for j in range(num_keys):
            hidden = (causal and j > pos) or (window is not None and j <= pos - window)
            for h in range(heads):
                bias[h, i, j] = float("-inf") if hidden else (0.0 if slopes is None else slopes[h] * (j - pos))
    return bias


@pytest.mark.parametrize("case", [Case(1, 4, 2, 12, 12, 32), Case(1, 4, 2, 5, 19, 32, window=6),
                                  Case(1, 6, 3, 7, 23, 32, causal=False, window=4),
                                  Case(2, 4, 1, 9, 14, 32, alibi=True), Case(1, 4, 4, 8, 20, 32, window=5, alibi=True),
                                  Case(1, 2, 2, 6, 11, 32, causal=False)],
                         ids=["causal", "window_chunk", "window_non_causal", "alibi_mqa", "window_alibi", "non_causal"])
def test_reference_matches_sdpa_with_a_loop_built_mask(case):
    q, k, v = make_inputs(case, torch.float32, "cpu")
    slopes = alibi_slopes(case.heads) if case.alibi else None
    group = case.heads // case.kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
        attn_mask=loop_bias(case.queries, case.keys, case.heads, case.causal, case.window, slopes))
    actual = fa.flash_attention_reference(q, k, v, causal=case.causal, window=case.window, alibi_slopes=slopes)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant, window, alibi", [(AttentionVariant(), None, False),
                                                    (SlidingWindow(window=6), 6, False), (ALiBi(), None, True)],
                         ids=["causal", "sliding_window", "alibi"])
@pytest.mark.parametrize("num_cached", [0, 13])
def test_reference_matches_tandem_attention_backends(variant, window, alibi, num_cached):
    """The kernel's causal/window/ALiBi parameters mean what tandem's variants mean."""
    num_new, heads, kv_heads = 11, 4, 2
    num_keys = num_cached + num_new
    q = torch.randn(num_new, heads, 32)  # tandem's layout: (T, H, D), keys (S, H_kv, D)
    k, v = torch.randn(2, num_keys, kv_heads, 32)
    mask = AttentionMask.build(variant, torch.arange(num_cached, num_keys), torch.arange(num_keys), heads)
    slopes = alibi_slopes(heads) if alibi else None
    actual = fa.flash_attention_reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                          window=window, alibi_slopes=slopes)[0].transpose(0, 1)
    for backend in (NaiveBackend(), tandem_default_backend()):
        torch.testing.assert_close(actual, backend.prefill(q, k, v, mask), atol=1e-5, rtol=1e-5)


def tandem_default_backend():
    from tandem.model.attention import AttentionBackend

    return AttentionBackend()


# -- dispatch and input checks --------------------------------------------------------------------

def test_cpu_tensors_go_to_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton wrapper ran on CPU tensors")

    monkeypatch.setattr(fa, "flash_attention_triton", fail)
    q, k, v = make_inputs(Case(1, 2, 1, 5, 9, 32), torch.float32, "cpu")
    assert torch.equal(fa.flash_attention(q, k, v, window=3), fa.flash_attention_reference(q, k, v, window=3))


def bad_inputs(what: str):
    q, k, v = torch.randn(1, 4, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)
    options = {}
    if what == "3d_query":
        q = q[0]
    elif what == "heads":
        q = torch.randn(1, 3, 8, 32)
    elif what == "v_shape":
        v = torch.randn(1, 2, 9, 32)
    elif what == "head_dim_mismatch":
        k = v = torch.randn(1, 2, 8, 64)
    elif what == "head_dim_too_small":
        q, k, v = torch.randn(1, 4, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    elif what == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif what == "mixed_dtypes":
        k = k.half()
    elif what == "window_zero":
        options["window"] = 0
    elif what == "slopes_shape":
        options["alibi_slopes"] = torch.ones(2)
    elif what == "slopes_dtype":
        options["alibi_slopes"] = torch.ones(4, dtype=torch.float16)
    elif what == "scale":
        options["scale"] = -1.0
    return q, k, v, options


@pytest.mark.parametrize("what, message", [
    ("3d_query", "must be \\(B, H, T, D\\)"), ("heads", "multiple of KV heads"), ("v_shape", "must have k's shape"),
    ("head_dim_mismatch", "head dim"), ("head_dim_too_small", "head dim must be in"),
    ("float64", "float16, bfloat16 or float32"), ("mixed_dtypes", "must match"), ("window_zero", "window"),
    ("slopes_shape", "alibi_slopes"), ("slopes_dtype", "alibi_slopes"), ("scale", "scale"),
])
@pytest.mark.parametrize("impl", [fa.flash_attention_triton, fa.flash_attention_reference], ids=["triton", "reference"])
def test_rejects_bad_inputs(impl, what, message):
    q, k, v, options = bad_inputs(what)
    with pytest.raises(ValueError, match=message):
        impl(q, k, v, **options)


def test_triton_rejects_a_strided_head_dim():
    q = torch.randn(1, 2, 8, 64)[..., ::2]
    k = v = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        fa.flash_attention_triton(q, k, v)


def test_compiles_for_hopper():
    """Every flag on, bf16, D = 128, the GPU tile config: compiles, within H100's shared memory.
    (One configuration: compiling takes seconds. fp32, D = 64 and 256 compiled the same way by hand.)"""
    from tests.kernels.conftest import HOPPER_SHARED_MEMORY, compile_for_gpu

    config = fa._GPU_CONFIG
    types = {name: "*bf16" for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")} | {"slopes_ptr": "*fp32",
                                                                                "qk_scale": "fp32"}
    constexprs = dict(GROUP_SIZE=4, HEAD_DIM=128, CAUSAL=True, HAS_WINDOW=True, HAS_ALIBI=True,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=128, INPUT_PRECISION="tf32",
                      UPCAST_BF16=False)
    shared = compile_for_gpu("tandem.kernels.flash_attention", "_flash_attention_kernel", types, constexprs,
                             num_warps=config.num_warps, num_stages=config.num_stages)
    assert shared <= HOPPER_SHARED_MEMORY
