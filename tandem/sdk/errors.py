"""The SDK's exceptions: one class per gRPC status the Gateway answers with (see gateway.proto).

Each carries the status as `code()` -> grpc.StatusCode and the server's message as `details()`,
the same two methods a grpc.RpcError has, so code written against raw gRPC keeps working; it is
also a grpc.RpcError and a tandem.TandemError. `from_rpc_error` turns what grpc raised into the
right subclass, keeping the original as `__cause__`.
"""
from __future__ import annotations

import grpc

from tandem.errors import TandemError


class TandemRpcError(TandemError, grpc.RpcError):
    """A call to a tandem server failed; `code()` and `details()` say how.

        try:
            client.complete("Hello", max_tokens=0)
        except tandem.sdk.InvalidArgumentError as e:
            print(e.code(), e.details())  # StatusCode.INVALID_ARGUMENT max_tokens must be ...
    """

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self._details = details
        self._code = code or self.default_code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._code.name}: {self._details}" if self._details else self._code.name


class InvalidArgumentError(TandemRpcError, ValueError):
    """A bad value (sampling parameters, a prompt too long for the context), found by the server or,
    for a value protobuf cannot hold, by the SDK before sending. Also a ValueError, like
    tandem.InvalidRequestError in the library."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(TandemRpcError):
    """The server's queue is full, or a message exceeded max_message_bytes: retry later."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(TandemRpcError):
    """The API key is missing or wrong."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceededError(TandemRpcError):
    """The call's timeout passed before it finished."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(TandemRpcError):
    """The server could not be reached, or a worker died or is draining. The SDK has already retried
    (unless a stream had started, which is never retried: its output would be repeated)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class RequestCancelledError(TandemRpcError):
    """The call was cancelled (by the server, or by a client shutting down). Not asyncio's
    CancelledError, which a cancelled task still raises as usual."""

    default_code = grpc.StatusCode.CANCELLED


class InternalError(TandemRpcError):
    """The server failed: a plugin raised (the message names it) or a bug."""

    default_code = grpc.StatusCode.INTERNAL


class NotFoundError(TandemRpcError):
    """The model (or another named thing) does not exist on the server."""

    default_code = grpc.StatusCode.NOT_FOUND


_ERROR_BY_CODE: dict[grpc.StatusCode, type[TandemRpcError]] = {
    cls.default_code: cls
    for cls in (InvalidArgumentError, ResourceExhaustedError, UnauthenticatedError, DeadlineExceededError,
                UnavailableError, RequestCancelledError, InternalError, NotFoundError)
}


def from_rpc_error(error: grpc.RpcError) -> TandemRpcError:
    """The TandemRpcError subclass for `error`'s status (TandemRpcError itself for codes without
    one), with `error` as its `__cause__`. Errors that are already TandemRpcErrors pass through."""
    if isinstance(error, TandemRpcError):
        return error
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    code = code or grpc.StatusCode.UNKNOWN
    result = _ERROR_BY_CODE.get(code, TandemRpcError)(details or "", code)
    result.__cause__ = error
    return result
