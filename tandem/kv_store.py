"""The KV-cache store's core: full KV blocks kept by (namespace, content hash) within a byte
capacity, least recently used unpinned blocks evicted first. Prefill workers publish the blocks
they computed; decode workers look up the longest prefix of their hash chain (`block_hash`, the
engine's prefix-cache key) and fetch the blocks they lack (Mooncake's / LMCache's shared KV store,
kept in one process). No network here: services/kvstore.py serves it over gRPC.

A block's value is the raw bytes of its tensors, one after the other, with their dtypes and shapes.
Tensors become bytes through uint8 views, never pickle, so bfloat16 and float8 survive bit-exact.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tandem.errors import ConfigError, InvalidRequestError

# The dtypes a KV pool holds (model dtypes, int8/fp8 quantized KV and their scales).
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in (
    "float32", "float16", "bfloat16", "int8", "uint8", "int32", "float8_e4m3fn")}

TensorSpec = tuple[str, tuple[int, ...]]  # (dtype name without "torch.", shape)
Key = tuple[str, bytes]  # (namespace, block hash)

STORED, EXISTING, REJECTED = "stored", "existing", "rejected"


# -- tensors <-> bytes -------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidRequestError(f"dtype {name!r} is not one the KV store holds ({', '.join(DTYPES)})")
    return DTYPES[name]


def spec_nbytes(spec: TensorSpec) -> int:
    name, shape = spec
    if any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"tensor shape {list(shape)} has a negative dimension")
    return math.prod(shape) * _dtype(name).itemsize


def specs_nbytes(specs: list[TensorSpec]) -> int:
    """Bytes the tensors' data take; InvalidRequestError for an unknown dtype or a negative dim."""
    return sum(spec_nbytes(spec) for spec in specs)


def tensor_to_bytes(t: torch.Tensor) -> tuple[TensorSpec, bytes]:
    name = str(t.dtype).removeprefix("torch.")
    _dtype(name)
    flat = t.detach().cpu().contiguous().reshape(-1)  # 1-D: view(uint8) needs a last dim to widen
    return (name, tuple(t.shape)), flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(spec: TensorSpec, data: bytes) -> torch.Tensor:
    name, shape = spec
    if len(data) != spec_nbytes(spec):
        raise InvalidRequestError(f"{len(data)} bytes for a {name} tensor of shape {list(shape)}, "
                                  f"which takes {spec_nbytes(spec)}")
    if not data:  # frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=_dtype(name))
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy the tensor owns
    return raw.view(_dtype(name)).reshape(shape)


def tensors_to_bytes(tensors: list[torch.Tensor]) -> tuple[list[TensorSpec], bytes]:
    """A block's tensors as specs and their data, one after the other."""
    pairs = [tensor_to_bytes(t) for t in tensors]
    return [spec for spec, _ in pairs], b"".join(data for _, data in pairs)


def tensors_from_bytes(specs: list[TensorSpec], data: bytes) -> list[torch.Tensor]:
    if len(data) != specs_nbytes(specs):
        raise InvalidRequestError(f"{len(data)} bytes for tensors that take {specs_nbytes(specs)}")
    tensors, offset = [], 0
    for spec in specs:
        end = offset + spec_nbytes(spec)
        tensors.append(tensor_from_bytes(spec, data[offset:end]))
        offset = end
    return tensors


# -- the store ---------------------------------------------------------------------------------
@dataclass
class _Block:
    specs: list[TensorSpec]
    data: bytes
    pins: int = 0


class KVBlockStore:
    """Blocks within `capacity_bytes` of data, thread-safe (one lock).

    Unpinned blocks live in `lru` (front = evicted first), pinned ones in `pinned`, so eviction
    never walks past pinned blocks and a block that cannot fit is refused before anything is
    evicted for it. A block leaves `pinned` for the recent end of `lru` when its last pin goes.

    Counters: puts (every put), hits/misses (blocks found / not found by lookup and get; lookup
    stops at its first miss), evictions, rejected (too large for the capacity, or no room left
    beside the pinned blocks)."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ConfigError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.lru: OrderedDict[Key, _Block] = OrderedDict()
        self.pinned: dict[Key, _Block] = {}
        self.bytes_used = self.pinned_bytes = 0
        self.counts = dict.fromkeys(("hits", "misses", "puts", "evictions", "rejected"), 0)
        self._lock = threading.Lock()

    def _find(self, key: Key, count: bool = True) -> _Block | None:
        """The block under key, made most recently used; counted as a hit or a miss."""
        block = self.pinned.get(key)
        if block is None and key in self.lru:
            self.lru.move_to_end(key)
            block = self.lru[key]
        if count:
            self.counts["hits" if block is not None else "misses"] += 1
        return block

    def lookup(self, namespace: str, hashes: list[bytes]) -> int:
        """How many leading hashes are present: the longest cached prefix."""
        with self._lock:
            for i, h in enumerate(hashes):
                if self._find((namespace, h)) is None:
                    return i
            return len(hashes)

    def get(self, namespace: str, hash: bytes) -> tuple[list[TensorSpec], bytes] | None:
        with self._lock:
            block = self._find((namespace, hash))
            return None if block is None else (block.specs, block.data)

    def put(self, namespace: str, hash: bytes, specs: list[TensorSpec], data: bytes) -> tuple[str, int]:
        """Keep a block; returns (STORED | EXISTING | REJECTED, blocks evicted to make room).
        An existing block is not compared: the hash names its content."""
        if not hash:
            raise InvalidRequestError("a block needs a non-empty hash")
        specs = [(name, tuple(int(d) for d in shape)) for name, shape in specs]
        if len(data) != specs_nbytes(specs):
            raise InvalidRequestError(f"block data is {len(data)} bytes but its tensors "
                                      f"{[[n, list(s)] for n, s in specs]} take {specs_nbytes(specs)}")
        key = (namespace, hash)
        with self._lock:
            self.counts["puts"] += 1
            if self._find(key, count=False) is not None:
                return EXISTING, 0
            if len(data) > self.capacity_bytes - self.pinned_bytes:
                self.counts["rejected"] += 1
                return REJECTED, 0
            num_evicted = 0
            while self.bytes_used + len(data) > self.capacity_bytes:
                _, victim = self.lru.popitem(last=False)
                self.bytes_used -= len(victim.data)
                num_evicted += 1
            self.counts["evictions"] += num_evicted
            self.lru[key] = _Block(specs, bytes(data))
            self.bytes_used += len(data)
            return STORED, num_evicted

    def reject_oversized(self, num_bytes: int) -> bool:
        """Count a block larger than the whole capacity as rejected, from its size alone: lets a
        server refuse it before receiving its data. True if it was rejected."""
        if num_bytes <= self.capacity_bytes:
            return False
        with self._lock:
            self.counts["puts"] += 1
            self.counts["rejected"] += 1
        return True

    def pin(self, namespace: str, hashes: list[bytes]) -> int:
        """Pin the present blocks (pins count: each needs its own unpin); returns how many."""
        with self._lock:
            num_present = 0
            for key in ((namespace, h) for h in hashes):
                block = self.lru.pop(key, None)
                if block is not None:
                    self.pinned[key] = block
                    self.pinned_bytes += len(block.data)
                block = self.pinned.get(key)
                if block is not None:
                    block.pins += 1
                    num_present += 1
            return num_present

    def unpin(self, namespace: str, hashes: list[bytes]) -> int:
        """Release one pin of each present pinned block; returns how many were present."""
        with self._lock:
            num_present = 0
            for key in ((namespace, h) for h in hashes):
                num_present += key in self.lru
                block = self.pinned.get(key)
                if block is None:
                    continue
                block.pins -= 1
                num_present += 1
                if block.pins == 0:
                    del self.pinned[key]
                    self.pinned_bytes -= len(block.data)
                    self.lru[key] = block
            return num_present

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(blocks=len(self.lru) + len(self.pinned), bytes_used=self.bytes_used,
                        capacity_bytes=self.capacity_bytes, pinned_blocks=len(self.pinned), **self.counts)
