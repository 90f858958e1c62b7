"""The KV-cache store service (tandem.v1.KVStore): a thin servicer over tandem.kv_store's
KVBlockStore, and the async client prefill and decode workers use.

Blocks travel as KVChunks below the message-size limit: a block's first chunk (offset 0) carries
its key, namespace, tensor specs, total size and digest, the following ones their offset and data.
Both directions reassemble with one `ChunkAssembler`, which refuses gaps, overlaps and short blocks.

The client seals what it sends (tandem.kv_store.BlockSeal, keyed with the pipeline's secret): the
store sees keyed names, never block hashes, and every block it returns is checked against its
digest before a worker may import it. A block that fails the check is dropped, counted and logged,
and is a miss: the worker computes it again and publishes its own copy, which replaces the bad one.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import logging

import grpc
import torch

from tandem.errors import ConfigError, InvalidRequestError
from tandem.kv_store import (REJECTED, STORED, BlockSeal, KVBlockStore, TensorSpec, entry_bytes, specs_nbytes,
                             tensors_from_bytes, tensors_to_bytes)
from tandem.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

from .common import Registration, rpc
from .metrics import with_rpc_counts

log = logging.getLogger(__name__)
SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
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


def _chunk_bytes(requested: int) -> int:
    return min(max(requested or DEFAULT_CHUNK_BYTES, MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, store: KVBlockStore):
        self.store = store

    @rpc
    async def Lookup(self, request, context):
        return kvstore_pb2.LookupResponse(num_present=self.store.lookup(request.namespace, list(request.hashes)))

    @rpc
    async def Put(self, request_iterator, context):
        """Blocks are stored as each one completes: those before a malformed chunk are kept."""
        assembler = ChunkAssembler(skip=self.store.reject_oversized)
        response = kvstore_pb2.PutResponse()
        async for chunk in request_iterator:
            block = assembler.feed(chunk)
            if block is None:
                continue
            outcome, num_evicted = self.store.put(block.namespace, block.hash, block.specs, block.data, block.digest)
            response.evicted += num_evicted
            if outcome == STORED:
                response.stored += 1
            elif outcome == REJECTED:
                response.rejected += 1
            else:
                response.existing += 1
        assembler.close()
        response.rejected += assembler.num_skipped
        return response

    @rpc
    async def Get(self, request, context):
        chunk_bytes = _chunk_bytes(request.chunk_bytes)
        for h in request.hashes:
            found = self.store.get(request.namespace, h)
            if found is not None:
                for chunk in to_chunks(request.namespace, h, found.specs, found.data, chunk_bytes, found.digest):
                    yield chunk

    @rpc
    async def Pin(self, request, context):
        return kvstore_pb2.PinResponse(num_changed=self.store.pin(request.namespace, list(request.hashes),
                                                                  request.lease_seconds))

    @rpc
    async def Unpin(self, request, context):
        return kvstore_pb2.PinResponse(num_changed=self.store.unpin(request.namespace, list(request.hashes)))

    @rpc
    async def Stats(self, request, context):
        return common_pb2.ServiceStats(service="kvstore", values=with_rpc_counts(self, self.store.stats()))


def registration(store: KVBlockStore) -> Registration:
    return Registration(KVStoreServicer(store), kvstore_pb2_grpc.add_KVStoreServicer_to_server, SERVICE_NAME)


class KVStoreClient:
    """The store seen from a worker: blocks as lists of tensors, keyed by hash within a namespace
    (one per model and KV layout, so incompatible blocks never meet), sealed with `seal` (the
    deployment's BlockSeal: every worker of a pipeline must use the same one)."""

    def __init__(self, channel: grpc.aio.Channel, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 seal: BlockSeal | None = None):
        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.stub = kvstore_pb2_grpc.KVStoreStub(channel)
        self.chunk_bytes = chunk_bytes
        self.seal = seal or BlockSeal()
        self.num_rejected = 0  # blocks the store returned that failed their digest check

    def _keys(self, hashes: list[bytes]) -> list[bytes]:
        return [self.seal.key(h) for h in hashes]

    async def lookup(self, namespace: str, hashes: list[bytes]) -> int:
        response = await self.stub.Lookup(kvstore_pb2.LookupRequest(namespace=namespace, hashes=self._keys(hashes)))
        return response.num_present

    async def put_blocks(self, namespace: str,
                         blocks: list[tuple[bytes, list[torch.Tensor]]]) -> kvstore_pb2.PutResponse:
        """Publish blocks in one stream; each block's tensors go as their bytes, one after the other."""
        async def chunks() -> AsyncIterator[kvstore_pb2.KVChunk]:
            for h, tensors in blocks:
                specs, data = tensors_to_bytes(tensors)
                digest = self.seal.digest(namespace, h, specs, data)
                for chunk in to_chunks(namespace, self.seal.key(h), specs, data, self.chunk_bytes, digest):
                    yield chunk
        return await self.stub.Put(chunks())

    async def get_blocks(self, namespace: str, hashes: list[bytes]) -> dict[bytes, list[torch.Tensor]]:
        """The present blocks among hashes whose digest checks out, as tensors (on the CPU);
        missing and rejected ones are absent."""
        by_key = dict(zip(self._keys(hashes), hashes))
        request = kvstore_pb2.GetRequest(namespace=namespace, hashes=list(by_key), chunk_bytes=self.chunk_bytes)
        assembler, blocks = ChunkAssembler(), {}
        async for chunk in self.stub.Get(request):
            block = assembler.feed(chunk)
            if block is None:
                continue
            h = by_key.get(block.hash)
            if h is None or not self.seal.verify(namespace, h, block.specs, block.data, block.digest):
                self.num_rejected += 1
                log.warning("KV store: block %s failed its digest check; dropped (forged or corrupted)",
                            block.hash.hex()[:16])
                continue
            blocks[h] = tensors_from_bytes(block.specs, block.data)
        assembler.close()
        return blocks

    async def pin(self, namespace: str, hashes: list[bytes], lease_s: float = 0.0) -> int:
        """Pin the present blocks for lease_s seconds (0: the store's default lease)."""
        request = kvstore_pb2.PinRequest(namespace=namespace, hashes=self._keys(hashes), lease_seconds=lease_s)
        return (await self.stub.Pin(request)).num_changed

    async def unpin(self, namespace: str, hashes: list[bytes]) -> int:
        response = await self.stub.Unpin(kvstore_pb2.PinRequest(namespace=namespace, hashes=self._keys(hashes)))
        return response.num_changed

    async def stats(self) -> dict[str, float]:
        return dict((await self.stub.Stats(common_pb2.StatsRequest())).values)
