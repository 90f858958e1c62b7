"""The retrieval service (RAG): tandem.rag's durable store (SQLite + FAISS, MiniLM embeddings in
onnxruntime) behind gRPC. The store opens on first use, so a pipeline that never retrieves never
loads the embedder. Store calls run on worker threads: the event loop keeps serving meanwhile."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from tandem.errors import InvalidRequestError
from tandem.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

from .common import Registration, rpc
from .metrics import with_rpc_counts

DEFAULT_K = 5
DEFAULT_COLLECTION = "default"


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(self, data_dir: str, hybrid: bool = True, cache_dir: str | None = None, embedder: str | None = None,
                 embedder_options: dict | None = None, chunking=None):
        self.data_dir, self.hybrid, self.cache_dir = Path(data_dir).expanduser(), hybrid, cache_dir
        self.chunking = chunking
        self.embedder, self.embedder_options = embedder, embedder_options
        self._store = None
        self._lock = threading.Lock()

    def store(self):
        with self._lock:
            if self._store is None:
                from tandem.rag import RagStore
                from tandem.rag.embedding import create_embedder

                embedder = create_embedder(self.embedder, self.embedder_options, self.cache_dir)
                kwargs = {"chunking": self.chunking} if self.chunking is not None else {}
                self._store = RagStore(self.data_dir, embedder, **kwargs)
            return self._store

    @rpc
    async def Ingest(self, request_iterator, context):
        from tandem.rag import Document

        by_collection: dict[str, list] = {}
        async for doc in request_iterator:
            if not doc.id:
                raise InvalidRequestError("every document needs an id")
            by_collection.setdefault(doc.collection or DEFAULT_COLLECTION, []).append(
                Document(doc.id, doc.title, doc.text))
        store = await asyncio.to_thread(self.store)
        docs = chunks = 0
        for collection, documents in by_collection.items():
            d, c = await asyncio.to_thread(store.ingest, documents, collection)
            docs, chunks = docs + d, chunks + c
        return retrieval_pb2.IngestResponse(documents=docs, chunks=chunks)

    @rpc
    async def Delete(self, request, context):
        store = await asyncio.to_thread(self.store)
        deleted = await asyncio.to_thread(store.delete, list(request.document_ids),
                                          request.collection or DEFAULT_COLLECTION)
        return retrieval_pb2.DeleteResponse(deleted=deleted)

    @rpc
    async def Retrieve(self, request, context):
        store = await asyncio.to_thread(self.store)
        hybrid = request.hybrid if request.HasField("hybrid") else self.hybrid
        found = await asyncio.to_thread(store.retrieve, request.query, request.k or DEFAULT_K,
                                        request.collection or DEFAULT_COLLECTION, hybrid)
        return retrieval_pb2.RetrieveResponse(chunks=[
            retrieval_pb2.Chunk(id=str(r.chunk_id), document_id=r.document_id, title=r.title, text=r.text,
                                score=r.score, position=r.position) for r in found])

    @rpc
    async def Stats(self, request, context):
        values = await asyncio.to_thread(lambda: self.store().stats()) if self._store is not None else {}
        return common_pb2.ServiceStats(service="retrieval", values=with_rpc_counts(self, {
            k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}))

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def registration(data_dir: str, hybrid: bool = True, cache_dir: str | None = None, embedder: str | None = None,
                 embedder_options: dict | None = None, chunking=None) -> Registration:
    return Registration(RetrievalServicer(data_dir, hybrid, cache_dir, embedder, embedder_options, chunking),
                        retrieval_pb2_grpc.add_RetrievalServicer_to_server,
                        retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name)
