"""The retrieval service (RAG). This release wires it into the pipeline (health, reflection,
Stats); ingestion, embedding and search land with the RAG work, and until then those calls answer
UNIMPLEMENTED rather than pretending to find nothing."""
from __future__ import annotations

import grpc

from tandem.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc

from .common import Registration, rpc

_NOT_YET = "retrieval is not available in this release of tandem (the RAG index is not built yet)"


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    async def Ingest(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)

    async def Delete(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)

    async def Retrieve(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, _NOT_YET)

    @rpc
    async def Stats(self, request, context):
        return common_pb2.ServiceStats(service="retrieval", values={"documents": 0.0, "chunks": 0.0})


def registration() -> Registration:
    return Registration(RetrievalServicer(), retrieval_pb2_grpc.add_RetrievalServicer_to_server,
                        retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name)
