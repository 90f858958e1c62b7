"""paged_attention_decode: the Triton kernels (single pass and split-K) against the torch
reference over shuffled block tables, context lengths of 1 and off block edges, GQA ratios,
windows, ALiBi, block sizes and dtypes; slots outside the context or window never read; the
reference against dense attention and tandem's own paged decode; the split heuristic; the
dispatch; and the input checks."""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch

from tandem.kernels import flash_attention as fa
from tandem.kernels import paged_attention_decode as pad
from tandem.model.attention import AttentionBackend, AttentionMask, AttentionVariant
from tandem.model.kv_pool import DenseKVPool
from tandem.plugins.attention import ALiBi, NaiveBackend, SlidingWindow, alibi_slopes

# (dtype, atol, rtol): assert_close allows atol + rtol * |reference|. Measured over CASES
# (interpreter, seed 0), max |kernel - reference| / (1 + |reference|): fp32 3.8e-7, fp16 4.8e-4,
# bf16 4.9e-3 (outputs up to 2.7 in magnitude): the same rounding as flash_attention's, and the
# same tolerances.
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 2e-3, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1.6e-2, 1.6e-2, id="bf16"),
]


class Case(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    context_lens: tuple[int, ...]
    window: int | None = None
    alibi: bool = False
    num_splits: int | None = 1


# Interpreter key tiles are 16 wide: block sizes 5, 8, 16, 32 and 45 put pages inside, across
# and around tiles.
CASES = {
    "mha": Case(4, 4, 64, 16, (1, 17, 40)),
    "mha_split_3": Case(4, 4, 64, 16, (1, 17, 40), num_splits=3),
    "gqa3_d128_window": Case(6, 2, 128, 16, (33, 5), window=9),
    "gqa3_d128_window_split_2": Case(6, 2, 128, 16, (33, 5), window=9, num_splits=2),
    "gqa8_block_8_alibi_split_4": Case(8, 1, 64, 8, (50, 1, 23), alibi=True, num_splits=4),
    "block_32_window_alibi_auto": Case(4, 2, 64, 32, (70, 31, 2), window=20, alibi=True, num_splits=None),
    "more_splits_than_tiles": Case(2, 1, 64, 16, (3, 20), num_splits=8),
    "block_5": Case(4, 2, 64, 5, (12, 23)),
    "whole_cache_one_block": Case(2, 2, 64, 45, (45, 30)),  # how the backend decodes a contiguous cache
}


class Paged(NamedTuple):
    q: torch.Tensor  # (B, H, D)
    k_cache: torch.Tensor  # (num_blocks, block_size, H_kv, D)
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # (B, max_blocks) int32
    context_lens: torch.Tensor  # (B,) int32
    options: dict


def make_paged(case: Case, dtype: torch.dtype, device) -> Paged:
    """Each sequence's blocks are drawn from a shuffled pool (never consecutive by construction);
    each table has one padding entry past the context, pointing at a spare block."""
    needed = [-(-n // case.block_size) for n in case.context_lens]
    num_blocks = sum(needed) + 2
    order = torch.randperm(num_blocks)
    tables = torch.full((len(needed), max(needed) + 1), int(order[-1]), dtype=torch.int32)
    start = 0
    for row, n in enumerate(needed):
        tables[row, :n] = order[start:start + n]
        start += n
    shape = (num_blocks, case.block_size, case.kv_heads, case.head_dim)
    return Paged(torch.randn(len(needed), case.heads, case.head_dim, device=device).to(dtype),
                 torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype),
                 tables.to(device), torch.tensor(case.context_lens, dtype=torch.int32, device=device),
                 dict(window=case.window, num_splits=case.num_splits,
                      alibi_slopes=alibi_slopes(case.heads).to(device) if case.alibi else None))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernel_matches_reference(case, dtype, atol, rtol, device):
    p = make_paged(case, dtype, device)
    out = pad.paged_attention_decode_triton(*p[:5], **p.options)
    assert out.dtype == dtype and out.shape == p.q.shape
    torch.testing.assert_close(out, pad.paged_attention_decode_reference(*p[:5], **p.options), atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 6])
def test_slots_outside_the_context_and_window_are_never_read(window, num_splits, device):
    """Every slot no query may see is NaN (spare blocks, the padding entry's block, the tail of
    each last block, keys before the window): the output must not notice."""
    case = Case(4, 2, 64, 8, (1, 13, 40), window=window, num_splits=num_splits)
    p = make_paged(case, torch.float32, device)
    seen = torch.zeros(p.k_cache.shape[:2], dtype=torch.bool, device=device)
    for row, length in enumerate(case.context_lens):
        first = 0 if window is None else max(0, length - window)
        for t in range(first, length):
            seen[p.block_tables[row, t // case.block_size], t % case.block_size] = True
    k_poisoned = p.k_cache.masked_fill(~seen[..., None, None], float("nan"))
    v_poisoned = p.v_cache.masked_fill(~seen[..., None, None], float("nan"))
    out = pad.paged_attention_decode_triton(p.q, k_poisoned, v_poisoned, *p[3:5], **p.options)
    torch.testing.assert_close(out, pad.paged_attention_decode_reference(*p[:5], **p.options), atol=1e-5, rtol=1e-5)


# -- the reference, checked independently ---------------------------------------------------------

@pytest.mark.parametrize("variant", [AttentionVariant(), SlidingWindow(window=7), ALiBi()],
                         ids=["causal", "sliding_window", "alibi"])
def test_reference_matches_dense_attention_and_tandem_paged_decode(variant):
    """Keys gathered one by one into a contiguous cache, then (1) the dense flash_attention
    reference (itself checked against SDPA) and (2) tandem's own paged decode with its mask."""
    window = getattr(variant, "window", None)
    case = Case(6, 2, 32, 4, (1, 9, 22), window=window, alibi=isinstance(variant, ALiBi))
    p = make_paged(case, torch.float32, "cpu")
    actual = pad.paged_attention_decode_reference(*p[:5], **p.options)

    for row, length in enumerate(case.context_lens):
        slots = [(int(p.block_tables[row, t // case.block_size]), t % case.block_size) for t in range(length)]
        keys = torch.stack([p.k_cache[b, s] for b, s in slots]).transpose(0, 1)[None]  # (1, H_kv, S, D)
        values = torch.stack([p.v_cache[b, s] for b, s in slots]).transpose(0, 1)[None]
        dense = fa.flash_attention_reference(p.q[row][None, :, None], keys, values, window=window,
                                             alibi_slopes=p.options["alibi_slopes"])
        torch.testing.assert_close(actual[row], dense[0, :, 0], atol=1e-5, rtol=1e-5)

    k_pool, v_pool = (DenseKVPool(*cache.shape, torch.float32) for cache in (p.k_cache, p.v_cache))
    k_pool.data, v_pool.data = p.k_cache, p.v_cache
    tables = p.block_tables[:, :-1].long()  # the engine's tables: no padding past the longest context
    lengths = p.context_lens.long()
    key_pos = torch.arange(tables.shape[1] * case.block_size).expand(len(lengths), -1)
    mask = AttentionMask.build(variant, (lengths - 1).unsqueeze(1), key_pos, case.heads,
                               key_pos < lengths.unsqueeze(1))
    for backend in (AttentionBackend(), NaiveBackend()):
        torch.testing.assert_close(actual, backend.paged_decode(p.q, k_pool, v_pool, tables, mask),
                                   atol=1e-5, rtol=1e-5)


# -- the split heuristic, dispatch, input checks ---------------------------------------------------

def test_choose_num_splits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    assert pad.choose_num_splits(64, 8, 4096, cuda) == 1  # 512 programs already fill 132 SMs
    assert pad.choose_num_splits(1, 8, 32768, cuda) == 16  # 17 splits would fill them; capped
    assert pad.choose_num_splits(1, 8, 1024, cuda) == 2  # no split shorter than 512 keys
    assert pad.choose_num_splits(2, 8, 256, cuda) == 1
    assert pad.choose_num_splits(1, 8, 32768, torch.device("cpu")) == 1


def test_cpu_tensors_go_to_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Triton wrapper ran on CPU tensors")

    monkeypatch.setattr(pad, "paged_attention_decode_triton", fail)
    p = make_paged(Case(4, 2, 32, 4, (3, 10), window=5), torch.float32, "cpu")
    assert torch.equal(pad.paged_attention_decode(*p[:5], **p.options),
                       pad.paged_attention_decode_reference(*p[:5], **p.options))


def bad_inputs(what: str):
    p = make_paged(Case(4, 2, 32, 4, (3, 10)), torch.float32, "cpu")
    q, k_cache, v_cache, tables, lens, options = *p[:5], {}
    if what == "4d_query":
        q = q[:, None]
    elif what == "heads":
        q = torch.randn(2, 3, 32)
    elif what == "v_shape":
        v_cache = v_cache[:, :2]
    elif what == "head_dim_mismatch":
        q = torch.randn(2, 4, 64)
    elif what == "int64_tables":
        tables = tables.long()
    elif what == "tables_rows":
        tables = tables[:1]
    elif what == "int64_lens":
        lens = lens.long()
    elif what == "float64":
        q, k_cache, v_cache = q.double(), k_cache.double(), v_cache.double()
    elif what == "mixed_dtypes":
        k_cache = k_cache.half()
    elif what == "num_splits":
        options["num_splits"] = 0
    elif what == "window":
        options["window"] = -2
    elif what == "slopes":
        options["alibi_slopes"] = torch.ones(2)
    return q, k_cache, v_cache, tables, lens, options


@pytest.mark.parametrize("what, message", [
    ("4d_query", "must be \\(B, H, D\\)"), ("heads", "multiple of KV heads"), ("v_shape", "must have k_cache's shape"),
    ("head_dim_mismatch", "head dim"), ("int64_tables", "block_tables must be int32"), ("tables_rows", "block_tables"),
    ("int64_lens", "context_lens must be int32"), ("float64", "float16, bfloat16 or float32"),
    ("mixed_dtypes", "must match"), ("num_splits", "num_splits"), ("window", "window"), ("slopes", "alibi_slopes"),
])
@pytest.mark.parametrize("impl", [pad.paged_attention_decode_triton, pad.paged_attention_decode_reference],
                         ids=["triton", "reference"])
def test_rejects_bad_inputs(impl, what, message):
    q, k_cache, v_cache, tables, lens, options = bad_inputs(what)
    with pytest.raises(ValueError, match=message):
        impl(q, k_cache, v_cache, tables, lens, **options)


def test_compiles_for_hopper():
    """Split-K with every flag on, bf16, D = 128, the GPU config, and the combine kernel: compile,
    within H100's shared memory. (The single pass and fp16/fp32 compiled the same way by hand.)"""
    from tests.kernels.conftest import HOPPER_SHARED_MEMORY, compile_for_gpu

    config = pad._GPU_CONFIG
    types = {name: "*bf16" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")} | {
        "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "slopes_ptr": "*fp32", "part_m_ptr": "*fp32",
        "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "qk_scale": "fp32"}
    constexprs = dict(GROUP_SIZE=4, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=config.block_n, BLOCK_D=128, SPLIT=True,
                      HAS_WINDOW=True, HAS_ALIBI=True, INPUT_PRECISION="tf32", UPCAST_BF16=False)
    shared = compile_for_gpu("tandem.kernels.paged_attention_decode", "_paged_attention_decode_kernel", types,
                             constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
    assert shared <= HOPPER_SHARED_MEMORY
    compile_for_gpu("tandem.kernels.paged_attention_decode", "_combine_splits_kernel",
                    {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "out_ptr": "*bf16"},
                    dict(HEAD_DIM=128, BLOCK_S=8, BLOCK_D=128), num_warps=config.num_warps)
