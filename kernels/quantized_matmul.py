"""Weight-only quantized matmul: out = x @ dequantize(W).T, weights dequantized in registers.

Follows the Marlin / GPTQ-style weight-only GEMMs (Frantar et al. 2022, 2024): the weights stay
packed in memory and are expanded only after the load; activations keep their dtype. Two paths:

- GEMV (decode, M <= GEMV_MAX_M): each program owns BLOCK_N output channels and walks K (or one
  of SPLIT_K slices of it) with multiply-and-reduce on the CUDA cores. At batch 1 the cost is
  reading the weights once, so tiles are short in N and long in K (BLOCK_K contiguous bytes per
  packed row per step: wide, coalesced loads). Split-K partials go to an fp32 (SPLIT_K, M, N)
  buffer summed by a second pass: deterministic, no atomics.
- GEMM (prefill, M > GEMV_MAX_M): (BLOCK_M, BLOCK_N) tiles, tl.dot on the integer codes in x's
  dtype (exact: |q| <= 127), fp32 accumulation, scales applied to the dot products. For int4 a K
  step lies inside one group, so acc += scale * (x . (q - 8)) + zero * sum(x) per group.

The GPU layout (one, defined here; the Triton quantizer plugins store it):

- int8: qweight (N, K) int8, symmetric per output channel: w[n, k] = q[n, k] * scales[n];
  scales (N,) bf16.
- int4: qweight (N / 2, K) uint8: byte (p, k) holds q[2p, k] in its low nibble and q[2p + 1, k]
  in its high nibble (`pack_int4`): two output channels per byte, so a packed row is contiguous
  in K and x is read as it is (packing along K would split x into even and odd columns: strided,
  unvectorized loads). Asymmetric per group of `group_size` input channels: w[n, k] =
  (q[n, k] - 8) * scales[n, g] + zeros[n, g], q in [0, 15], g = k // group_size; scales, zeros
  (N, K / group_size) bf16. These are tandem's int4 values (plugins/quantizers.py, for PyTorch's
  CPU kernel): "int4" and "int4_triton" round a weight alike; only the packing differs.

Both kernels work on channel pairs (2p, 2p + 1), int8 included, and interleave the two
accumulators once at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import dot, is_interpreting, kernel_flags
from tandem.model.quantization import int4_codes, int8_codes

GROUP_SIZES = (32, 64, 128)
GEMV_MAX_M = 4  # decode batches up to this take the GEMV path
# Tile shapes: chosen for an H100 by reasoning (16 B per thread per load, >= 4 programs per SM for
# N = 4096), not yet measured: no GPU has been lent. `bench/kernels.py --tune-gemv` sweeps them.
GEMV_BLOCK_N, GEMV_BLOCK_K = 4, 1024
GEMM_BLOCK_N, GEMM_BLOCK_K, GEMM_MAX_BLOCK_M = 64, 64, 64
MIN_PROGRAMS_PER_SM = 4  # GEMV splits K when N alone gives fewer programs than this per SM
INTERPRETER_BLOCK_N = 64  # the interpreter runs programs one by one: fewer, larger ones are faster


# -- the layout: quantize, pack, dequantize ---------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> qweight (N, K) int8, scales (N,) bf16: symmetric per output channel
    (tandem.model.quantization.int8_codes, the int8 quantizer's math)."""
    return int8_codes(weight)


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight (N, K) -> qweight (N / 2, K) uint8, scales, zeros (N, K / group_size) bf16 with
    w ~= (q - 8) * scale + zero, q in [0, 15] (tandem's int4 quantizer's math)."""
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size or n % 2:
        raise ValueError(f"int4 needs an even N and a group_size in {GROUP_SIZES} dividing K; "
                         f"got N = {n}, K = {k}, group_size {group_size}")
    q, scales, zeros = int4_codes(weight, group_size)  # the int4 quantizer's math
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) integers in [0, 15] -> (N / 2, K) uint8: q[2p] low nibble, q[2p + 1] high."""
    if q.dim() != 2 or q.shape[0] % 2:
        raise ValueError(f"q must be (N, K) with N even, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return q[0::2] | (q[1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N / 2, K) uint8 -> q (N, K) uint8 in [0, 15]; the inverse of pack_int4."""
    return torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1, packed.shape[1])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None, *,
               bits: int, group_size: int | None = None) -> torch.Tensor:
    """The fp32 weight (N, K) the codes stand for."""
    if bits == 8:
        return qweight.float() * scales.float().unsqueeze(1)
    q = unpack_int4(qweight).float()
    n, k = q.shape
    groups = (q.view(n, k // group_size, group_size) - 8) * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    return groups.view(n, k)


# -- kernels ------------------------------------------------------------------------------------

@triton.jit
def _int_to_float(q, dtype: tl.constexpr):
    """Integer codes to a float dtype through fp32 (Triton 3.9's interpreter casts integers to
    bf16 as raw bits; on a GPU the extra step is one register conversion)."""
    return q.to(tl.float32).to(dtype)


@triton.jit
def _codes(w_ptr, pairs, offs_k, mask_even, mask_odd, stride_wn, BITS: tl.constexpr):
    """The integer codes of output channels 2p and 2p + 1 (p in `pairs`) at input channels
    offs_k, as two int8 tiles of the broadcast shape; int4 codes come with their zero point 8
    already subtracted. int8 reads two rows of qweight, int4 one packed row."""
    if BITS == 8:
        even = tl.load(w_ptr + (2 * pairs) * stride_wn + offs_k, mask=mask_even, other=0)
        odd = tl.load(w_ptr + (2 * pairs + 1) * stride_wn + offs_k, mask=mask_odd, other=0)
    else:
        packed = tl.load(w_ptr + pairs * stride_wn + offs_k, mask=mask_even, other=0)
        even = (packed & 0xF).to(tl.int8) - 8
        odd = (packed >> 4).to(tl.int8) - 8
    return even, odd


@triton.jit
def _group_params(scales_ptr, zeros_ptr, channels, groups, mask, stride_sn):
    """int4 scale and zero of each (channel, group), fp32."""
    offs = channels * stride_sn + groups
    scales = tl.load(scales_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zeros = tl.load(zeros_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return scales, zeros


@triton.jit
def _interleave(acc_even, acc_odd, scales_ptr, pairs, mask_even, mask_odd,
                BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N / 2) sums of channels 2p and 2p + 1 -> (BLOCK_M, BLOCK_N) in channel
    order; int8 applies its per-channel scales here, once."""
    if BITS == 8:
        acc_even *= tl.load(scales_ptr + 2 * pairs, mask=mask_even, other=0.0).to(tl.float32)[None, :]
        acc_odd *= tl.load(scales_ptr + 2 * pairs + 1, mask=mask_odd, other=0.0).to(tl.float32)[None, :]
    return tl.reshape(tl.join(acc_even, acc_odd), (BLOCK_M, BLOCK_N))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, out_ptr,
                 M, N, K, K_PER_SPLIT,
                 stride_xm, stride_xk, stride_wn, stride_sn, stride_split, stride_om,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split] (M, N) = x[:, split's K] @ W[:, split's K].T for M <= BLOCK_M rows of x. A K
    step is (NUM_GROUPS, GROUP_SIZE) input channels: whole int4 groups, one scale each; int8
    passes GROUP_SIZE = BLOCK_K (one "group", its scale applied after the loop)."""
    NUM_GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    pairs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)  # channels 2p and 2p + 1
    mask_even, mask_odd = 2 * pairs < N, 2 * pairs + 1 < N
    acc_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs_g = k0 // GROUP_SIZE + tl.arange(0, NUM_GROUPS)
        offs_k = offs_g[:, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, :]  # (NUM_GROUPS, GROUP_SIZE)
        mask_k = offs_k < K
        even, odd = _codes(w_ptr, pairs.to(tl.int64)[:, None, None], offs_k[None, :, :],
                           mask_even[:, None, None] & mask_k[None, :, :], mask_odd[:, None, None] & mask_k[None, :, :],
                           stride_wn, BITS)
        even, odd = even.to(tl.float32), odd.to(tl.float32)  # (BLOCK_N / 2, NUM_GROUPS, GROUP_SIZE)
        if BITS == 4:
            mask_g = offs_g < K // GROUP_SIZE
            scales_even, zeros_even = _group_params(scales_ptr, zeros_ptr, 2 * pairs[:, None], offs_g[None, :],
                                                    mask_even[:, None] & mask_g[None, :], stride_sn)
            scales_odd, zeros_odd = _group_params(scales_ptr, zeros_ptr, 2 * pairs[:, None] + 1, offs_g[None, :],
                                                  mask_odd[:, None] & mask_g[None, :], stride_sn)
        for m in tl.static_range(BLOCK_M):
            x_row_ptr = x_ptr + tl.minimum(m, M - 1) * stride_xm  # rows past M: computed, not stored
            x = tl.load(x_row_ptr + offs_k * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
            dots_even = tl.sum(even * x[None, :, :], axis=2)  # (BLOCK_N / 2, NUM_GROUPS)
            dots_odd = tl.sum(odd * x[None, :, :], axis=2)
            if BITS == 4:  # sum_k x (q - 8) s + z = s * dot + z * sum(x), per group
                x_sums = tl.sum(x, axis=1)[None, :]
                dots_even = dots_even * scales_even + zeros_even * x_sums
                dots_odd = dots_odd * scales_odd + zeros_odd * x_sums
            is_row = offs_m[:, None] == m
            acc_even = tl.where(is_row, acc_even + tl.sum(dots_even, axis=1)[None, :], acc_even)
            acc_odd = tl.where(is_row, acc_odd + tl.sum(dots_odd, axis=1)[None, :], acc_odd)
    acc = _interleave(acc_even, acc_odd, scales_ptr, pairs, mask_even, mask_odd, BITS, BLOCK_M, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + pid_k * stride_split + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, scales_ptr, zeros_ptr, out_ptr,
                 M, N, K,
                 stride_xm, stride_xk, stride_wn, stride_sn, stride_om,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (M, N) = x @ W.T, one (BLOCK_M, BLOCK_N) tile per program. For int4 BLOCK_K divides
    GROUP_SIZE, so each K step lies in one group."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    pairs = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    mask_even, mask_odd = 2 * pairs < N, 2 * pairs + 1 < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    acc_even = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_N // 2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        even, odd = _codes(w_ptr, pairs.to(tl.int64)[None, :], offs_k[:, None],  # (BLOCK_K, BLOCK_N / 2): W.T's
                           mask_k[:, None] & mask_even[None, :], mask_k[:, None] & mask_odd[None, :], stride_wn, BITS)
        dots_even = dot(x, _int_to_float(even, x.dtype), INPUT_PRECISION, UPCAST_BF16)  # exact products
        dots_odd = dot(x, _int_to_float(odd, x.dtype), INPUT_PRECISION, UPCAST_BF16)
        if BITS == 4:  # sum_k x (q - 8) s + z = s * dot + z * sum(x) in this step's group
            group = k0 // GROUP_SIZE
            scales_even, zeros_even = _group_params(scales_ptr, zeros_ptr, 2 * pairs, group, mask_even, stride_sn)
            scales_odd, zeros_odd = _group_params(scales_ptr, zeros_ptr, 2 * pairs + 1, group, mask_odd, stride_sn)
            x_sums = tl.sum(x.to(tl.float32), axis=1)[:, None]  # (BLOCK_M, 1)
            dots_even = dots_even * scales_even[None, :] + x_sums * zeros_even[None, :]
            dots_odd = dots_odd * scales_odd[None, :] + x_sums * zeros_odd[None, :]
        acc_even += dots_even
        acc_odd += dots_odd
    acc = _interleave(acc_even, acc_odd, scales_ptr, pairs, mask_even, mask_odd, BITS, BLOCK_M, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n[None, :] < N))


# -- wrappers -----------------------------------------------------------------------------------

def _check(x, qweight, scales, zeros, bits, group_size) -> tuple[int, int, int]:
    """Validate the arguments; returns (M, N, K)."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be (M, K) float16/bfloat16/float32, got {tuple(x.shape)} {x.dtype}")
    (m, k), n = x.shape, scales.shape[0] if scales.dim() else -1
    if bits == 8:
        if qweight.dtype != torch.int8 or qweight.shape != (n, k):
            raise ValueError(f"int8 qweight must be (N, {k}) int8 with N = len(scales) = {n}, "
                             f"got {tuple(qweight.shape)} {qweight.dtype}")
        if scales.shape != (n,) or zeros is not None:
            raise ValueError(f"int8 takes scales (N,) and no zeros, got {tuple(scales.shape)} and {zeros is not None}")
    elif bits == 4:
        if group_size not in GROUP_SIZES or k % group_size:
            raise ValueError(f"int4 group_size must be one of {GROUP_SIZES} and divide K = {k}, got {group_size}")
        groups = (n, k // group_size)
        if zeros is None or scales.shape != groups or zeros.shape != groups:
            raise ValueError(f"int4 scales and zeros must be (N, K / group_size) = {groups}, got "
                             f"{tuple(scales.shape)} and {None if zeros is None else tuple(zeros.shape)}")
        if qweight.dtype != torch.uint8 or n % 2 or qweight.shape != (n // 2, k):
            raise ValueError(f"int4 qweight must be (N / 2, {k}) uint8 with N = {n} even, "
                             f"got {tuple(qweight.shape)} {qweight.dtype}")
    else:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return m, n, k


def _check_tile(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (value < minimum or value & (value - 1)):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


def _split_k(num_programs: int, k: int, block_k: int, device: torch.device) -> int:
    """Enough K slices for MIN_PROGRAMS_PER_SM programs per SM (1 off CUDA)."""
    if device.type != "cuda":
        return 1
    min_programs = MIN_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(min_programs, num_programs), triton.cdiv(k, block_k)))


def _gemv(x, qweight, scales, zeros, n, bits, group_size, block_n, block_k, split_k):
    m, k = x.shape
    block_n = block_n or (INTERPRETER_BLOCK_N if is_interpreting() else GEMV_BLOCK_N)
    block_k = block_k or GEMV_BLOCK_K
    if bits == 4:  # whole groups per step
        block_k = max(block_k, group_size)
    num_blocks_n = triton.cdiv(n, block_n)
    split_k = split_k or _split_k(num_blocks_n, k, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(split_k, m, n, dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    _gemv_kernel[(num_blocks_n, split_k)](
        x, qweight, scales, scales if zeros is None else zeros, out, m, n, k, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), out.stride(0), out.stride(1),
        BITS=bits, GROUP_SIZE=group_size if bits == 4 else block_k,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=block_k)
    return out[0] if split_k == 1 else out.sum(dim=0).to(x.dtype)  # the second pass of split-K


def _gemm(x, qweight, scales, zeros, n, bits, group_size, block_n, block_k):
    m, k = x.shape
    block_m = min(max(triton.next_power_of_2(m), 16), GEMM_MAX_BLOCK_M)
    block_n = block_n or GEMM_BLOCK_N
    block_k = block_k or GEMM_BLOCK_K
    if bits == 4:  # one group per K step
        block_k = min(block_k, group_size)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, qweight, scales, scales if zeros is None else zeros, out, m, n, k,
        x.stride(0), x.stride(1), qweight.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size or 1, **kernel_flags(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def quantized_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None = None, *, bits: int, group_size: int | None = None,
                            block_n: int | None = None, block_k: int | None = None,
                            split_k: int | None = None) -> torch.Tensor:
    """The Triton kernels: x (M, K) @ W.T -> (M, N) in x's dtype, W in the module's layout.
    M <= GEMV_MAX_M takes the GEMV kernel, larger M the tiled GEMM. block_n, block_k and (GEMV
    only) split_k override the tile heuristics (for tuning; None: the defaults above)."""
    m, n, k = _check(x, qweight, scales, zeros, bits, group_size)
    if qweight.stride(1) != 1 or scales.stride(-1) != 1 or (zeros is not None and zeros.stride() != scales.stride()):
        raise ValueError("qweight, scales and zeros must be contiguous along their last dimension "
                         "(scales and zeros laid out alike)")
    is_gemv = m <= GEMV_MAX_M
    _check_tile("block_n", block_n, 2 if is_gemv else 32)  # tl.dot: BLOCK_N / 2 >= 16
    _check_tile("block_k", block_k, 16)
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    if m == 0:
        return x.new_empty(0, n)
    if is_gemv:
        return _gemv(x, qweight, scales, zeros, n, bits, group_size, block_n, block_k, split_k)
    return _gemm(x, qweight, scales, zeros, n, bits, group_size, block_n, block_k)


def quantized_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                               zeros: torch.Tensor | None = None, *, bits: int,
                               group_size: int | None = None) -> torch.Tensor:
    """Plain torch: dequantize to fp32, matmul in fp32, cast to x's dtype."""
    _check(x, qweight, scales, zeros, bits, group_size)
    weight = dequantize(qweight, scales, zeros, bits=bits, group_size=group_size)
    return (x.float() @ weight.T).to(x.dtype)


def quantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None = None, *, bits: int, group_size: int | None = None) -> torch.Tensor:
    """x (M, K) @ dequantize(W).T -> (M, N) in x's dtype: the Triton kernels on CUDA tensors,
    the torch reference elsewhere."""
    if x.is_cuda:
        return quantized_matmul_triton(x, qweight, scales, zeros, bits=bits, group_size=group_size)
    return quantized_matmul_reference(x, qweight, scales, zeros, bits=bits, group_size=group_size)
