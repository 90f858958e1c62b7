"""The "triton" attention backend: tandem's Triton kernels (kernels/flash_attention.py for
prefill, kernels/paged_attention_decode.py for decode, reading the paged pool in place).

The engine hands a backend masks, not variants. A kernel computes its mask from positions
(causal, window, ALiBi slopes), so this backend runs a kernel only when it can compute the very
mask it was given: the mask came from `AttentionMask.build` over consecutive keys
(`mask.keys`), or is the plain causal mask of a fresh prompt (`allowed` None), and its variant is
exactly one the kernels express:

    causal -> causal; sliding_window(window) -> causal + window; alibi -> causal + ALiBi slopes

(exact classes: a subclass may change the rule). Everything else (sinks, local_global, third-party
variants, masks from other callers, key layouts with holes, unsupported dtypes or head dims) goes
to the torch path of the base class, with the same result. The decode kernel reads a DenseKVPool
in place; other pool formats (int8) are gathered and dequantized by the base class first, and
the kernel then decodes the gathered keys.

Kernels run when the tensors are on CUDA, or when Triton's interpreter is on
(TRITON_INTERPRET=1): on the CPU that is for testing only (slow). Otherwise the torch path runs.
The kernels are imported on first use, so loading the plugin costs no Triton import, and the
interpreter setting is read when the tests set it.
"""
from __future__ import annotations

import functools

import torch

from tandem.model.attention import AttentionBackend, AttentionMask, AttentionVariant, CausalAttention
from tandem.model.kv_pool import DenseKVPool
from tandem.plugins import hookimpl
from tandem.plugins.attention import ALiBi, SlidingWindow, alibi_slopes


class TritonBackend(AttentionBackend):
    """Triton kernels where the mask is theirs exactly, the torch path (SDPA) elsewhere."""

    name = "triton"

    def prefill(self, q, keys, values, mask: AttentionMask):
        params = self._kernel_params(q, keys, mask, rows=())
        if params is None:
            return super().prefill(q, keys, values, mask)
        from tandem.kernels.flash_attention import flash_attention_triton

        window, slopes = params
        out = flash_attention_triton(  # (T, H, D) <-> (1, H, T, D): views, no copies
            q.transpose(0, 1).unsqueeze(0), keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            causal=True, window=window, alibi_slopes=slopes)
        return out[0].transpose(0, 1)

    def decode(self, q, keys, values, mask: AttentionMask):
        """keys (B, S, H_kv, D) are the pool of B blocks of S slots, one block per sequence."""
        params = self._kernel_params(q, keys, mask, rows=(q.shape[0],))
        if params is None or mask.allowed is None:
            return super().decode(q, keys, values, mask)
        tables = torch.arange(q.shape[0], dtype=torch.int32, device=q.device).unsqueeze(1)  # (B, 1)
        return self._paged(q, keys, values, tables, mask, params)

    def paged_decode(self, q, k_pool, v_pool, block_tables, mask: AttentionMask):
        params = self._kernel_params(q, getattr(k_pool, "data", None), mask, rows=(q.shape[0],))
        if params is None or mask.allowed is None or type(k_pool) is not DenseKVPool \
                or type(v_pool) is not DenseKVPool:  # e.g. int8: the base class gathers, then calls decode
            return super().paged_decode(q, k_pool, v_pool, block_tables, mask)
        return self._paged(q, k_pool.data, v_pool.data, block_tables.to(q.device, torch.int32), mask, params)

    @staticmethod
    def _paged(q, k_cache, v_cache, block_tables, mask, params):
        from tandem.kernels.paged_attention_decode import paged_attention_decode_triton

        window, slopes = params
        context_lens = mask.keys.num_keys.reshape(-1).to(q.device, torch.int32)  # (B,)
        return paged_attention_decode_triton(
            q, k_cache, v_cache, block_tables, context_lens, window=window, alibi_slopes=slopes)

    @staticmethod
    def _kernel_params(q: torch.Tensor, keys: torch.Tensor | None, mask: AttentionMask,
                       rows: tuple[int, ...]) -> tuple[int | None, torch.Tensor | None] | None:
        """(window, ALiBi slopes) that make the kernels compute `mask`, or None: use torch.
        rows: the mask's leading shape the call needs (() for prefill, (B,) for decode)."""
        if keys is None or not _kernels_run_on(q):
            return None
        from tandem.kernels import _utils

        if q.dtype not in _utils.SUPPORTED_DTYPES or keys.dtype != q.dtype \
                or not _utils.MIN_HEAD_DIM <= q.shape[-1] <= _utils.MAX_HEAD_DIM:
            return None
        if mask.allowed is None:  # plain causal over fresh tokens
            return None, None
        if mask.keys is None or mask.keys.num_keys.shape != rows:
            return None
        variant = mask.keys.variant
        if type(variant) in (AttentionVariant, CausalAttention):
            return None, None
        if type(variant) is SlidingWindow:
            return variant.window, None
        if type(variant) is ALiBi:
            return None, _slopes(q.shape[-2], q.device)
        return None


def _kernels_run_on(q: torch.Tensor) -> bool:
    """CUDA tensors, or any under Triton's interpreter; never where Triton is not installed."""
    try:
        from tandem.kernels._utils import is_interpreting
    except ImportError:
        return False
    return q.is_cuda or is_interpreting()


@functools.lru_cache(maxsize=16)
def _slopes(num_heads: int, device: torch.device) -> torch.Tensor:
    """ALiBi's slopes on the device, made once (not once per layer and step)."""
    return alibi_slopes(num_heads).to(device)


@hookimpl
def tandem_attention_backends(api_version: int):
    return [TritonBackend]
