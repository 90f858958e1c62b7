"""tandem's client SDK: talk to a running tandem server over gRPC (the Gateway service of
protos/tandem/v1/gateway.proto) without touching protobuf.

    from tandem.sdk import Client

    with Client("localhost:50051") as client:
        print(client.complete("Hello", max_tokens=16).text)
        answer = client.complete("Who founded Normandy?", rag={"k": 4}, max_tokens=64)
        answer.text, answer.sources   # with rag: the answer cites the retrieved chunks as [n]

Client blocks; AsyncClient is the same for asyncio. Failures raise TandemRpcError subclasses
carrying the gRPC status (`.code()`, `.details()`).
"""
from tandem.sdk.aio import AsyncClient
from tandem.sdk.client import Client
from tandem.sdk.errors import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    RequestCancelledError,
    ResourceExhaustedError,
    TandemRpcError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from tandem.sdk.types import Chunk, Completion, Logprob, Source, Timings, Usage

__all__ = [
    "Client",
    "AsyncClient",
    "Chunk",
    "Completion",
    "Logprob",
    "Source",
    "Usage",
    "Timings",
    "TandemRpcError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "DeadlineExceededError",
    "UnavailableError",
    "RequestCancelledError",
    "InternalError",
    "NotFoundError",
    "from_rpc_error",
]
