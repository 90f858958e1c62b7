"""Built-in KV-cache formats: "auto" (the model's dtype) and "int8".

int8 stores each token's key (or value) per head as int8 with one fp32 absmax scale per
(token, head): 4x smaller than fp32 for head_dim 64 (68 bytes instead of 256 per head), so the
same memory holds ~3.8x the tokens. Quantization happens once, when a token is written;
gathering dequantizes the blocks attention reads (KIVI / vLLM's fp8 KV idea, in int8 on the CPU).
"""
from __future__ import annotations

import torch

from tandem.model.kv_pool import KVCacheFormat
from tandem.plugins import hookimpl

SCALE_DTYPE = torch.float32


class Int8KVPool:
    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.data = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.int8)
        self.scales = torch.zeros(num_blocks, block_size, num_kv_heads, 1, dtype=SCALE_DTYPE)
        self.dtype = dtype

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        scales = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp(min=1e-10)  # (N, Hkv, 1)
        self.data.view(-1, *self.data.shape[2:])[slots] = (x.float() / scales).round().clamp(-127, 127).to(torch.int8)
        self.scales.view(-1, *self.scales.shape[2:])[slots] = scales.to(SCALE_DTYPE)

    def gather(self, blocks: torch.Tensor) -> torch.Tensor:
        ids = blocks.reshape(-1)
        values = self.data.index_select(0, ids).to(self.dtype) * self.scales.index_select(0, ids).to(self.dtype)
        return values.view(*blocks.shape, *self.data.shape[1:])

    def gather_range(self, first_block: int, num_tokens: int) -> torch.Tensor:
        end = first_block + -(-num_tokens // self.data.shape[1])
        values = self.data[first_block:end].to(self.dtype) * self.scales[first_block:end].to(self.dtype)
        return values.flatten(0, 1)[:num_tokens]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.data[dst] = self.data[src]
        self.scales[dst] = self.scales[src]

    def state_tensors(self) -> list[torch.Tensor]:
        return [self.data, self.scales]


class Int8KVCache(KVCacheFormat):
    name = "int8"

    def create_pool(self, num_blocks, block_size, num_kv_heads, head_dim, model_dtype):
        return Int8KVPool(num_blocks, block_size, num_kv_heads, head_dim, model_dtype)

    def bytes_per_token(self, num_layers, num_kv_heads, head_dim, model_dtype):
        return 2 * num_layers * num_kv_heads * (head_dim + SCALE_DTYPE.itemsize)


@hookimpl
def tandem_kv_cache_formats(api_version: int):
    return [KVCacheFormat, Int8KVCache]
