"""The KV-cache store's core: full KV blocks kept by (namespace, key) within a byte capacity that
counts their metadata too, least recently used unpinned blocks evicted first, pins as leases that
expire. A block's key is its content hash (`block_hash`) sealed per deployment (BlockSeal), and it
carries a digest the workers check before importing it. Prefill workers publish the blocks
they computed; decode workers look up the longest prefix of their hash chain (`block_hash`, the
engine's prefix-cache key) and fetch the blocks they lack (Mooncake's / LMCache's shared KV store,
kept in one process). services/kvstore.py serves it over gRPC; the engine's KV connector
(tandem/engine/kv_connector.py) is its client. Both ends of that wire share the chunking here:
`to_chunks` cuts a block into KVChunk messages, `ChunkAssembler` puts them back together.

A block's value is the raw bytes of its tensors, one after the other, with their dtypes and shapes.
Tensors become bytes through uint8 views, never pickle, so bfloat16 and float8 survive bit-exact.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from tandem.errors import ConfigError, InvalidRequestError
from tandem.v1 import kvstore_pb2

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


# -- sealing: per-deployment keys and digests ---------------------------------------------------
class BlockSeal:
    """What makes a block in a shared store trustworthy to the workers of one deployment.

    `key(h)` is the name block hash h is stored under: HMAC-SHA256 of h with a key derived from the
    deployment's secret (the pipeline token), so the store's keys say nothing about prompts and
    nobody without the secret can name, and so overwrite, the slot of a given prompt block.
    `digest(...)` is a keyed BLAKE2b of everything the block is (namespace, hash, tensor specs and
    bytes): a worker imports a block only if it matches, so a forged or corrupted block is a miss.
    Without a secret (a loopback pipeline with no credentials) both are still computed, unkeyed:
    corruption is caught, forgery is not."""

    DIGEST_BYTES = 32

    def __init__(self, secret: str | bytes | None = None):
        secret = secret.encode() if isinstance(secret, str) else (secret or b"")
        self._key_salt = hmac.new(secret, b"tandem.kv.key", hashlib.sha256).digest()
        self._digest_key = hmac.new(secret, b"tandem.kv.digest", hashlib.sha256).digest()

    def key(self, hash: bytes) -> bytes:
        return hmac.new(self._key_salt, hash, hashlib.sha256).digest()

    def digest(self, namespace: str, hash: bytes, specs: list[TensorSpec], data: bytes) -> bytes:
        h = hashlib.blake2b(key=self._digest_key, digest_size=self.DIGEST_BYTES)
        h.update(json.dumps([namespace, hash.hex(), [[n, list(s)] for n, s in specs]]).encode())
        h.update(b"\0")
        h.update(data)
        return h.digest()

    def verify(self, namespace: str, hash: bytes, specs: list[TensorSpec], data: bytes, digest: bytes) -> bool:
        return hmac.compare_digest(self.digest(namespace, hash, specs, data), digest)


# -- the store ---------------------------------------------------------------------------------
# Python's own cost of one entry beside its data: the block object, the dict slot, the key tuple and
# the bytes/str headers. Measured with tracemalloc over 20,000 entries of a two-tensor block with a
# 32-byte key and digest: ~500 bytes, which entry_bytes() gives for that block (256 + the sizes).
ENTRY_OVERHEAD_BYTES = 256
SPEC_OVERHEAD_BYTES = 64  # a (dtype, shape) tuple; 8 more per dimension
DEFAULT_PIN_LEASE_S = 30.0  # a pin not renewed (pinned again) within its lease is released
MAX_PIN_LEASE_S = 600.0


def entry_bytes(namespace: str, hash: bytes, specs: list[TensorSpec], num_bytes: int, digest: bytes = b"") -> int:
    """What one block costs the store's capacity: its data and its metadata."""
    specs_bytes = sum(SPEC_OVERHEAD_BYTES + 8 * len(shape) for _, shape in specs)
    return ENTRY_OVERHEAD_BYTES + len(namespace.encode()) + len(hash) + len(digest) + specs_bytes + num_bytes


class StoredBlock(NamedTuple):
    specs: list[TensorSpec]
    data: bytes
    digest: bytes


@dataclass
class _Block:
    specs: list[TensorSpec]
    data: bytes
    digest: bytes
    cost: int  # entry_bytes(): what it takes of the capacity
    leases: list[float] = field(default_factory=list)  # when each of its pins expires (clock time)


class KVBlockStore:
    """Blocks within `capacity_bytes`, their metadata included (entry_bytes), thread-safe (one lock).

    Unpinned blocks live in `lru` (front = evicted first), pinned ones in `pinned`, so eviction
    never walks past pinned blocks and a block that cannot fit is refused before anything is
    evicted for it. A pin is a lease: it lasts `lease_s` (default pin_lease_s, at most
    MAX_PIN_LEASE_S) unless unpinned before, so a client that dies holding pins does not fill the
    store for ever. A block leaves `pinned` for the recent end of `lru` when its last pin goes.

    A block's digest is kept as given and returned by get; the store cannot check it (it does not
    hold the deployment's secret, BlockSeal), the workers do. A put under an existing key with other
    bytes or another digest replaces the block: a worker that found a forged or corrupted block
    publishes its own copy, which heals the store (a corrupted block keeps its genuine digest, so
    the bytes are compared too: a memcmp, cheap beside receiving them).

    Counters: puts (every put), hits/misses (blocks found / not found by lookup and get; lookup
    stops at its first miss), evictions, rejected (too large for the capacity, or no room left
    beside the pinned blocks), replaced (an existing key put with other contents), expired_pins."""

    def __init__(self, capacity_bytes: int, pin_lease_s: float = DEFAULT_PIN_LEASE_S,
                 clock: Callable[[], float] = time.monotonic):
        if capacity_bytes < 0:
            raise ConfigError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if not 0 < pin_lease_s <= MAX_PIN_LEASE_S:
            raise ConfigError(f"pin_lease_s must be in (0, {MAX_PIN_LEASE_S}], got {pin_lease_s}")
        self.capacity_bytes, self.pin_lease_s, self.clock = capacity_bytes, pin_lease_s, clock
        self.lru: OrderedDict[Key, _Block] = OrderedDict()
        self.pinned: dict[Key, _Block] = {}
        self.bytes_used = self.pinned_bytes = self.data_bytes = 0
        self.counts = dict.fromkeys(("hits", "misses", "puts", "evictions", "rejected", "replaced",
                                     "expired_pins"), 0)
        self._next_expiry = math.inf
        self._lock = threading.Lock()

    def _find(self, key: Key, count: bool = True) -> _Block | None:
        """The block under key, made most recently used; counted as a hit or a miss."""
        self._expire()
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

    def get(self, namespace: str, hash: bytes) -> StoredBlock | None:
        with self._lock:
            block = self._find((namespace, hash))
            return None if block is None else StoredBlock(block.specs, block.data, block.digest)

    def put(self, namespace: str, hash: bytes, specs: list[TensorSpec], data: bytes,
            digest: bytes = b"") -> tuple[str, int]:
        """Keep a block; returns (STORED | EXISTING | REJECTED, blocks evicted to make room). A
        block already held with other bytes or another digest is replaced (see the class doc)."""
        if not hash:
            raise InvalidRequestError("a block needs a non-empty hash")
        specs = [(name, tuple(int(d) for d in shape)) for name, shape in specs]
        if len(data) != specs_nbytes(specs):
            raise InvalidRequestError(f"block data is {len(data)} bytes but its tensors "
                                      f"{[[n, list(s)] for n, s in specs]} take {specs_nbytes(specs)}")
        key, cost = (namespace, hash), entry_bytes(namespace, hash, specs, len(data), digest)
        with self._lock:
            self.counts["puts"] += 1
            existing = self._find(key, count=False)
            if existing is not None and (existing.digest, existing.data, existing.specs) == (digest, data, specs):
                return EXISTING, 0
            room = self.capacity_bytes - self.pinned_bytes + (existing.cost if key in self.pinned else 0)
            if cost > room:
                self.counts["rejected"] += 1
                return REJECTED, 0
            leases = self._remove(key) if existing is not None else []
            self.counts["replaced"] += existing is not None
            num_evicted = 0
            while self.bytes_used + cost > self.capacity_bytes:
                _, victim = self.lru.popitem(last=False)
                self.bytes_used -= victim.cost
                self.data_bytes -= len(victim.data)
                num_evicted += 1
            self.counts["evictions"] += num_evicted
            block = _Block(specs, bytes(data), bytes(digest), cost, leases)
            (self.pinned if leases else self.lru)[key] = block
            self.bytes_used += cost
            self.data_bytes += len(data)
            self.pinned_bytes += cost if leases else 0
            return STORED, num_evicted

    def _remove(self, key: Key) -> list[float]:
        """Take a block out (to replace it); returns its leases, which the replacement keeps."""
        block = self.lru.pop(key, None) or self.pinned.pop(key)
        self.bytes_used -= block.cost
        self.data_bytes -= len(block.data)
        if block.leases:
            self.pinned_bytes -= block.cost
        return block.leases

    def reject_oversized(self, num_bytes: int) -> bool:
        """Count a block whose entry (entry_bytes: data and metadata) exceeds the whole capacity as
        rejected, from its size: lets a server refuse it before receiving its data. True if it was."""
        if num_bytes <= self.capacity_bytes:
            return False
        with self._lock:
            self.counts["puts"] += 1
            self.counts["rejected"] += 1
        return True

    def pin(self, namespace: str, hashes: list[bytes], lease_s: float | None = None) -> int:
        """Pin the present blocks for lease_s seconds (default pin_lease_s, at most MAX_PIN_LEASE_S);
        pins count: each needs its own unpin, or expires. Returns how many were present."""
        return len(hashes) - len(self.pin_present(namespace, hashes, lease_s))

    def pin_present(self, namespace: str, hashes: list[bytes], lease_s: float | None = None) -> list[bytes]:
        """As pin; returns the hashes that were not present (nothing pinned for them)."""
        if lease_s is None or not math.isfinite(lease_s) or lease_s <= 0:  # NaN would pin for ever
            lease_s = self.pin_lease_s
        lease_s = min(lease_s, MAX_PIN_LEASE_S)
        missing = []
        with self._lock:
            self._expire()
            until = self.clock() + lease_s
            for key in ((namespace, h) for h in hashes):
                block = self.lru.pop(key, None)
                if block is not None:
                    self.pinned[key] = block
                    self.pinned_bytes += block.cost
                block = self.pinned.get(key)
                if block is None:
                    missing.append(key[1])
                    continue
                block.leases.append(until)
                self._next_expiry = min(self._next_expiry, until)
            return missing

    def unpin(self, namespace: str, hashes: list[bytes]) -> int:
        """Release one pin (the one expiring first) of each present pinned block; returns how many
        were present."""
        with self._lock:
            self._expire()
            num_present = 0
            for key in ((namespace, h) for h in hashes):
                num_present += key in self.lru
                block = self.pinned.get(key)
                if block is None:
                    continue
                block.leases.remove(min(block.leases))
                num_present += 1
                if not block.leases:
                    self._release(key)
            return num_present

    def _release(self, key: Key) -> None:
        block = self.pinned.pop(key)
        self.pinned_bytes -= block.cost
        self.lru[key] = block

    def _expire(self) -> None:
        """Release the pins whose lease has run out (the caller holds the lock). Walks the pinned
        blocks only when the earliest lease is due."""
        now = self.clock()
        if now < self._next_expiry:
            return
        self._next_expiry = math.inf
        for key, block in list(self.pinned.items()):
            live = [t for t in block.leases if t > now]
            self.counts["expired_pins"] += len(block.leases) - len(live)
            block.leases = live
            if live:
                self._next_expiry = min(self._next_expiry, *live)
            else:
                self._release(key)

    def stats(self) -> dict[str, int]:
        with self._lock:
            self._expire()
            return dict(blocks=len(self.lru) + len(self.pinned), bytes_used=self.bytes_used,
                        data_bytes=self.data_bytes, capacity_bytes=self.capacity_bytes,
                        pinned_blocks=len(self.pinned), **self.counts)


# -- the wire: blocks as KVChunk messages (tandem.v1.KVStore), for the servicer and the client ---
DEFAULT_CHUNK_BYTES = 1 << 20
# Smaller chunks cost a message each; larger ones near the 16 MiB message limit gain nothing.
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 10, 4 << 20


def specs_to_pb(specs: list[TensorSpec]) -> list[kvstore_pb2.TensorSpec]:
    return [kvstore_pb2.TensorSpec(dtype=name, shape=shape) for name, shape in specs]


def specs_from_pb(specs) -> list[TensorSpec]:
    return [(s.dtype, tuple(s.shape)) for s in specs]


def to_chunks(namespace: str, hash: bytes, specs: list[TensorSpec], data: bytes,
              chunk_bytes: int, digest: bytes = b"") -> Iterator[kvstore_pb2.KVChunk]:
    """One block as chunks of at most chunk_bytes of data (a block with no data: one chunk)."""
    yield kvstore_pb2.KVChunk(hash=hash, namespace=namespace, tensors=specs_to_pb(specs),
                              total_bytes=len(data), offset=0, data=data[:chunk_bytes], digest=digest)
    for offset in range(chunk_bytes, len(data), chunk_bytes):
        yield kvstore_pb2.KVChunk(offset=offset, data=data[offset:offset + chunk_bytes])


@dataclass
class Block:
    namespace: str
    hash: bytes
    specs: list[TensorSpec]
    data: bytes
    digest: bytes = b""


class ChunkAssembler:
    """Blocks back from a stream of KVChunks. `feed` returns a block once its last byte arrives;
    `close` checks the stream did not end inside one. Malformed -> InvalidRequestError.

    skip(entry_bytes) -> True drops a block as it starts, from what it would take of a store's
    capacity (tandem.kv_store.entry_bytes: data and metadata): its chunks are still checked, their
    data is not kept (the server refuses a block larger than its capacity this way)."""

    def __init__(self, skip: Callable[[int], bool] = lambda entry_bytes: False):
        self.skip = skip
        self.num_skipped = 0
        self._block: Block | None = None  # the block being received, its data still empty
        self._parts: list[bytes] | None = None  # None while skipping the current block
        self._total = self._received = 0

    def feed(self, chunk: kvstore_pb2.KVChunk) -> Block | None:
        if chunk.pin and not (chunk.hash or chunk.data or chunk.tensors or chunk.offset):
            return None  # a message of pins only (Put): no part of any block
        if chunk.offset == 0:
            self._start(chunk)
        elif self._block is None:
            raise InvalidRequestError(f"a chunk at offset {chunk.offset} belongs to no block "
                                      "(no first chunk before it)")
        elif chunk.offset != self._received:
            raise InvalidRequestError(f"block {self._block.hash.hex()}: chunk at offset {chunk.offset}, "
                                      f"expected {self._received}")
        self._received += len(chunk.data)
        if self._received > self._total:
            raise InvalidRequestError(f"block {self._block.hash.hex()}: {self._received} bytes sent, "
                                      f"more than its total_bytes {self._total}")
        if self._parts is not None:
            self._parts.append(chunk.data)
        if self._received < self._total:
            return None
        block, parts, self._block = self._block, self._parts, None
        if parts is None:
            return None
        block.data = b"".join(parts)
        return block

    def _start(self, chunk: kvstore_pb2.KVChunk) -> None:
        self.close()
        if not chunk.hash:
            raise InvalidRequestError("a block's first chunk (offset 0) carries no hash")
        specs = specs_from_pb(chunk.tensors)
        if chunk.total_bytes != specs_nbytes(specs):
            raise InvalidRequestError(f"block {chunk.hash.hex()}: total_bytes {chunk.total_bytes}, but its "
                                      f"tensors take {specs_nbytes(specs)}")
        self._block = Block(chunk.namespace, chunk.hash, specs, b"", chunk.digest)
        self._total, self._received = chunk.total_bytes, 0
        skipped = self.skip(entry_bytes(chunk.namespace, chunk.hash, specs, chunk.total_bytes, chunk.digest))
        self.num_skipped += skipped
        self._parts = None if skipped else []

    def close(self) -> None:
        if self._block is not None:
            raise InvalidRequestError(f"block {self._block.hash.hex()} ended after {self._received} of "
                                      f"{self._total} bytes")
