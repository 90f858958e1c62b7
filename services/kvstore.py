"""The KV-cache store service (tandem.v1.KVStore): a thin servicer over tandem.kv_store's
KVBlockStore. Its client is the engine's KV connector (tandem/engine/kv_connector.py).

Blocks travel as KVChunks below the message-size limit (tandem.kv_store: `to_chunks` and the
`ChunkAssembler` both ends use, which refuses gaps, overlaps and short blocks). The store sees
keyed names, never block hashes, and cannot check a block's digest (it does not hold the
deployment's secret): the connector that fetches a block does, before the engine imports it.

The hand-off lease: a Put may pin keys (KVChunk.pin) once its blocks are stored, and answers with
the ones it does not hold; a Get with `release` takes one pin off each block it sends.
"""
from __future__ import annotations

from tandem.errors import InvalidRequestError
from tandem.kv_store import (DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, REJECTED, STORED, ChunkAssembler,
                             KVBlockStore, to_chunks)
from tandem.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc

from .common import Registration, rpc
from .metrics import with_rpc_counts

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
# Keys one Put may ask to pin: a 1M-token prompt's chain at 16-token blocks. They are held until
# the stream ends, so a stream may not grow them without bound.
MAX_PIN_KEYS = 1 << 16


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
        """Blocks are stored as each one completes: those before a malformed chunk are kept. The
        pins the stream asks for are taken once it has ended."""
        assembler = ChunkAssembler(skip=self.store.reject_oversized)
        response = kvstore_pb2.PutResponse()
        pins: list[tuple[str, list[bytes], float]] = []
        async for chunk in request_iterator:
            if chunk.pin:
                pins.append((chunk.namespace, list(chunk.pin), chunk.lease_seconds))
                if sum(len(keys) for _, keys, _ in pins) > MAX_PIN_KEYS:
                    raise InvalidRequestError(f"a Put may pin at most {MAX_PIN_KEYS} keys")
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
        for namespace, keys, lease_s in pins:
            response.missing.extend(self.store.pin_present(namespace, keys, lease_s))
        return response

    @rpc
    async def Get(self, request, context):
        chunk_bytes = _chunk_bytes(request.chunk_bytes)
        for h in request.hashes:
            found = self.store.get(request.namespace, h)
            if found is None:
                continue
            for chunk in to_chunks(request.namespace, h, found.specs, found.data, chunk_bytes, found.digest):
                yield chunk
            if request.release:
                self.store.unpin(request.namespace, [h])

    @rpc
    async def Stats(self, request, context):
        return common_pb2.ServiceStats(service="kvstore", values=with_rpc_counts(self, self.store.stats()))


def registration(store: KVBlockStore) -> Registration:
    return Registration(KVStoreServicer(store), kvstore_pb2_grpc.add_KVStoreServicer_to_server, SERVICE_NAME)
