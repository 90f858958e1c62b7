"""What every tandem gRPC server shares: message-size limits, grpc.health.v1 and reflection, the
one bearer-token check (users' API keys at the gateway, the pipeline token at every internal
service: services.credentials), TLS, the one mapping from tandem's exceptions to status codes, and
a host that runs a server on its own event loop thread (how the Ray actors and `tandem service`
run them).

Servicer methods are wrapped with `@rpc`, which turns an exception into the status
ARCHITECTURE.md gives it:

    InvalidRequestError, ConfigError -> INVALID_ARGUMENT     QueueFullError -> RESOURCE_EXHAUSTED
    ModelNotFoundError -> NOT_FOUND                          PermissionDenied -> PERMISSION_DENIED
    Unavailable (draining, a dead engine) -> UNAVAILABLE     PluginError -> INTERNAL
    ParallelGroupError (a rank of a split model died) -> UNAVAILABLE (the gateway migrates)
    a downstream service's status -> the same status and message (the gateway relays them)
    anything else -> INTERNAL, logged with its traceback
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.errors import (ConfigError, InvalidRequestError, ModelNotFoundError, ParallelGroupError, PluginError,
                           QueueFullError, TandemError)

from .credentials import InternalCredentials, read_pem, token_interceptors

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20  # KV blocks travel in chunks well below this
HEALTH_POLL_S = 0.5
OVERALL = ""  # grpc.health.v1's name for the server as a whole


class Unavailable(TandemError):
    """The service cannot take this request now (draining, its engine died): retry elsewhere."""


class PermissionDenied(TandemError):
    """The operator has not allowed what the request asks (e.g. runtime LoRA loading)."""


# Keepalive: every connection is pinged after KEEPALIVE_S of silence, and one whose peer does not
# answer within KEEPALIVE_TIMEOUT_S is closed: calls to a stopped (SIGSTOP) or vanished process fail
# UNAVAILABLE in seconds instead of hanging on a half-open TCP connection. Servers accept pings
# that often (gRPC's default would answer them with GOAWAY "too_many_pings").
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 10, 5


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Server and channel options: message limits both ways, no port sharing (a second server on
    a busy port must fail, not split its traffic), quick reconnects to a restarted service, and
    keepalive pings both ways."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2)]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, PermissionDenied):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, (InvalidRequestError, ConfigError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (Unavailable, ParallelGroupError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, PluginError):
        return grpc.StatusCode.INTERNAL, str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _report(name: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, details = status_of(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, (PluginError, grpc.aio.AioRpcError)):
        log.error("%s failed", name, exc_info=exc)
    return code, details


def rpc(method: Callable) -> Callable:
    """Map the exceptions of a servicer method (a coroutine or an async generator) to statuses,
    and count the servicer's rpcs and errors (its Stats report them: services.metrics)."""
    from .metrics import rpc_tally

    name = method.__qualname__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            tally = rpc_tally(self)
            tally["rpc_requests"] += 1
            try:
                async for item in method(self, request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                tally["rpc_errors"] += 1
                await context.abort(*_report(name, exc))
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        tally = rpc_tally(self)
        tally["rpc_requests"] += 1
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            tally["rpc_errors"] += 1
            await context.abort(*_report(name, exc))
    return unary


# -- credentials: API keys (users) and the pipeline token (services) ----------------------------
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # probes carry no credentials


def bearer_key(header: str | None) -> str | None:
    """The KEY of an `Authorization: Bearer KEY` value, None when it is not one: the one parse of
    that header (the checks below, the gateway's per-key cache salts). The scheme is
    case-insensitive (RFC 9110)."""
    scheme, _, given = (header or "").partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def bearer_authorized(header: str | None, keys: list[bytes]) -> bool:
    """Whether an `Authorization` value is `Bearer KEY` for one of keys: the one check of the gRPC
    interceptor and the HTTP API alike. The key is compared with every key in constant time, so
    the time taken says nothing about which matched."""
    given = bearer_key(header)
    if given is None or not keys:
        return False
    given_bytes = given.encode()
    return any([hmac.compare_digest(given_bytes, k) for k in keys])


class BearerInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without `authorization: Bearer KEY` for one of `keys` (UNAUTHENTICATED). The
    gateway's public port takes users' API keys; every internal service the pipeline token.
    Health checks and reflection stay open: Kubernetes probes carry no credentials."""

    def __init__(self, keys: Iterable[str], what: str = "API key"):
        self.keys, self.what = [k.encode() for k in keys if k], what
        if not self.keys:
            raise ConfigError(f"checking the {what} needs at least one non-empty key")

    async def intercept_service(self, continuation, details):
        metadata = details.invocation_metadata or ()
        header = next((v for k, v in metadata if k == "authorization" and isinstance(v, str)), None)
        if details.method.startswith(_OPEN_PREFIXES) or bearer_authorized(header, self.keys):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        message = f"missing {self.what}" if header is None else f"invalid {self.what}"

        # Coroutine functions, not lambdas returning coroutines: grpc.aio tells the kinds apart by
        # the function itself (a lambda's coroutine went out as the response and failed UNKNOWN).
        async def deny_unary(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny_unary, **kwargs)
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)


# -- the server --------------------------------------------------------------------------------
@dataclass
class ServerOptions:
    """How a service listens. Loopback by default. The gateway's public port: api_keys turn on
    UNAUTHENTICATED checks, tls_cert/tls_key (PEM file paths) turn on TLS. An internal service:
    credentials (the pipeline's) require its token and, with TLS, a client certificate."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (the bound one is ServiceHost.port)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    api_keys: list[str] = field(default_factory=list)
    tls_cert: str | None = None
    tls_key: str | None = None
    credentials: InternalCredentials | None = None
    grace_s: float = 5.0  # how long stop() lets in-flight calls finish
    any_port_if_taken: bool = False  # port taken: listen on any free one (peers find it by discovery)


@dataclass
class Registration:
    """One servicer: `add` is the generated add_XServicer_to_server, `name` its full service
    name (for health and reflection)."""

    servicer: object
    add: Callable
    name: str


def _interceptors(o: ServerOptions) -> list[grpc.aio.ServerInterceptor]:
    token = o.credentials.token if o.credentials else None
    if o.api_keys and token:
        raise ConfigError("a server takes either users' API keys (the gateway) or the pipeline token, not both")
    if token:
        return [BearerInterceptor([token], "pipeline token")]
    return [BearerInterceptor(o.api_keys)] if o.api_keys else []


def _server_credentials(o: ServerOptions) -> grpc.ServerCredentials | None:
    if o.credentials is not None and o.credentials.tls:
        if o.tls_cert or o.tls_key:
            raise ConfigError("a server takes either public TLS (the gateway) or the pipeline's mutual TLS, not both")
        return o.credentials.server_credentials()
    if not (o.tls_cert or o.tls_key):
        return None
    if not (o.tls_cert and o.tls_key):
        raise ConfigError("TLS needs both tls_cert and tls_key")
    return grpc.ssl_server_credentials([(read_pem(o.tls_key), read_pem(o.tls_cert))])


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port bound, or 0 when the address is taken."""
    try:
        return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address"
        return 0


class ServiceHost:
    """A grpc.aio server for some servicers, with health and reflection, on its own thread.

    registrations: a list, or a function returning one, called on the server's event loop (for
    servicers that open grpc.aio channels, which belong to the loop they are made on).
    healthy: polled every HEALTH_POLL_S; while it returns False (engine dead, draining) every
    service reports NOT_SERVING. `start()` returns once the port is bound; `stop()` drains."""

    def __init__(self, registrations: list[Registration] | Callable[[], list[Registration]],
                 options: ServerOptions | None = None,
                 healthy: Callable[[], bool] | None = None, on_start: Callable[[], object] | None = None,
                 on_stop: Callable[[], object] | None = None, on_drain: Callable[[], object] | None = None):
        self.registrations, self.options = registrations, options or ServerOptions()
        self.healthy, self.on_start, self.on_stop = healthy or (lambda: True), on_start, on_stop
        self.on_drain = on_drain  # called when stop() begins, before the grace period
        self.port: int | None = None
        self.http = None  # the gateway's HttpFrontend (services.http), when it serves HTTP
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> ServiceHost:
        self._thread = threading.Thread(target=self._run, name="tandem-grpc", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("the gRPC server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stopped is not None and self._thread and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(self.options.grace_s + 10)

    def wait(self) -> None:
        """Block until the server stops."""
        if self._thread is not None:
            while self._thread.is_alive():
                self._thread.join(0.5)

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        o = self.options
        self.loop, self._stopped = asyncio.get_running_loop(), asyncio.Event()
        interceptors = _interceptors(o)
        self._server = grpc.aio.server(options=channel_options(o.max_message_bytes), interceptors=interceptors)
        if callable(self.registrations):
            self.registrations = self.registrations()
        for reg in self.registrations:
            reg.add(reg.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [r.name for r in self.registrations]
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server)
        address = f"{o.host}:{o.port}"
        credentials = _server_credentials(o)
        self.port = _bind(self._server, address, credentials)
        if not self.port and o.port and o.any_port_if_taken:
            log.warning("port %d is taken: listening on another one", o.port)
            self.port = _bind(self._server, f"{o.host}:0", credentials)
        if not self.port:
            raise ConfigError(f"cannot listen on {address}")
        await self._server.start()
        if self.on_start is not None:
            result = self.on_start()
            if inspect.isawaitable(result):
                await result
        await self._set_health(self.healthy())
        self._started.set()
        watcher = asyncio.create_task(self._watch_health())
        await self._stopped.wait()
        watcher.cancel()
        if self.on_drain is not None:
            self.on_drain()
        await self._set_health(False)  # draining: probes see it before the port closes
        await self._server.stop(o.grace_s)
        if self.on_stop is not None:
            result = self.on_stop()
            if inspect.isawaitable(result):
                await result

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [OVERALL, *(r.name for r in self.registrations)]:
            await self._health.set(name, status)

    async def _watch_health(self) -> None:
        last = None
        while True:
            try:
                now = bool(self.healthy())
            except Exception:
                now = False
            if now != last:
                await self._set_health(now)
                last = now
            await asyncio.sleep(HEALTH_POLL_S)


def client_channel(target: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                   credentials: InternalCredentials | None = None) -> grpc.aio.Channel:
    """A channel from one service to another, presenting the pipeline's credentials (its token on
    every call; mutual TLS when configured). Without credentials: plaintext, no token (a loopback
    pipeline started without any)."""
    options = channel_options(max_message_bytes)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    interceptors = token_interceptors(credentials.token) if credentials.token else None
    if credentials.tls:
        return grpc.aio.secure_channel(target, credentials.channel_credentials(),
                                       options=options + credentials.channel_options(), interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
