"""EngineConfig: the knobs of the scheduler, the block manager and the KV pool, validated once.

Each field declares its help and bounds (tandem.settings): `check` validates them, and a
pipeline's `engine:` settings and the Helm chart's schema of them are derived from these fields."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.errors import ConfigError
from tandem.settings import check, setting

# Default KV pool: 2 GiB (vLLM's CPU backend defaults to 4 GiB). The pool is zero-filled, so it is
# resident from the start; 2 GiB holds 46k tokens of the default model in fp32.
DEFAULT_KV_MEMORY_BYTES = 2 << 30


KV_MEMORY = "a fraction in (0, 1] or a byte count"


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings; tandem.LLM takes them as keyword arguments (engine_options)."""

    block_size: int = setting(16, "tokens per KV block (PagedAttention's page)", min=1, group="engine")
    num_kv_blocks: int | None = setting(None, "KV pool size in blocks (null: from kv_cache_memory)", min=1,
                                        group="engine")
    kv_cache_memory: float | int = setting(DEFAULT_KV_MEMORY_BYTES, "KV pool: bytes (an integer > 1) or a fraction "
                                           "in (0, 1] of the memory available when the engine starts", gt=0,
                                           what=KV_MEMORY, group="engine")
    max_num_seqs: int = setting(64, "sequences in one step", min=1, group="engine")
    max_num_batched_tokens: int = setting(512, "tokens in one step: the chunked-prefill budget", min=1,
                                          group="engine")
    max_waiting: int = setting(4096, "queue depth beyond which add_request is refused (admission control)",
                               min=1, group="engine")
    enable_prefix_caching: bool = setting(True, "share the KV blocks of prompts' common prefixes", group="engine")

    def __post_init__(self) -> None:
        check(self)
        memory = self.kv_cache_memory
        if not (memory <= 1 or (isinstance(memory, int) and memory > 1)):  # 1.5: neither bytes nor a fraction
            raise ConfigError(f"kv_cache_memory must be {KV_MEMORY}, got {memory!r}")


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" (a CUDA GPU when PyTorch sees one, else the CPU), "cpu", "cuda", "cuda:N"."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: PyTorch sees no CUDA GPU here")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: tandem runs on cpu or cuda")
    return resolved


def available_memory_bytes(device: torch.device | None = None) -> int:
    """Free memory of a CUDA device; for the CPU, MemAvailable from /proc/meminfo (Linux),
    physical memory elsewhere."""
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def num_kv_blocks(config: EngineConfig, bytes_per_token: int, max_model_len: int,
                  device: torch.device | None = None) -> int:
    """Pool size in blocks: explicit, or from the memory budget (a fraction is of the free memory
    of the device the pool lives on), capped at what max_num_seqs sequences of max_model_len
    tokens could ever use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    memory = config.kv_cache_memory
    budget = int(memory * available_memory_bytes(device)) if memory <= 1 else int(memory)
    blocks = budget // (bytes_per_token * config.block_size)
    ceiling = config.max_num_seqs * -(-max_model_len // config.block_size)
    if blocks < 1:
        raise ConfigError(f"kv_cache_memory={memory!r} leaves no room for one KV block "
                          f"({bytes_per_token * config.block_size} bytes)")
    return min(blocks, ceiling)
