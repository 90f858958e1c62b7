"""The pipeline's credentials: what every internal service (tokenizer, prefill, decode, worker,
KV store, draft, retrieval) requires of its callers and every internal channel presents.

    a shared token      `authorization: Bearer TOKEN` on every call, checked in constant time by
                        services.common.BearerInterceptor (the check users' API keys get at the
                        gateway); `tandem serve` makes a random one when none is configured
    mutual TLS          optional: servers require a client certificate signed by the pipeline's
                        CA, and channels present theirs

Health checks and reflection stay open. The token comes from PipelineConfig.internal_token,
internal_token_file or $TANDEM_INTERNAL_TOKEN (the chart's Secret); it is never printed or logged.
Also the deployment secret of the KV store's seals (tandem.kv_store.BlockSeal).
"""
from __future__ import annotations

import collections
import ipaddress
from dataclasses import dataclass, field

import grpc

from tandem.errors import ConfigError


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def read_pem(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


@dataclass(frozen=True)
class InternalCredentials:
    """The pipeline's own credentials, which every internal service requires of its callers and
    every internal channel presents: a shared token, sent as `authorization: Bearer TOKEN`, and
    optionally mutual TLS (PEM paths: this service's certificate and key, and the CA that signed
    every service's certificate; servers require a client certificate from that CA).
    tls_server_name: the name the peers' certificates carry, when it is not the address dialled
    (services advertise IPs). The token never appears in a repr."""

    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def __bool__(self) -> bool:
        return bool(self.token) or self.tls

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(read_pem(self.tls_key), read_pem(self.tls_cert))],
                                           root_certificates=read_pem(self.tls_ca), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=read_pem(self.tls_ca), private_key=read_pem(self.tls_key),
                                            certificate_chain=read_pem(self.tls_cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.tls_server_name)] if self.tls and self.tls_server_name else []

    def sync_channel(self, target: str, options: list | None = None) -> grpc.Channel:
        """A blocking channel with these credentials (the draft proposer's, on an engine thread)."""
        options = [*(options or []), *self.channel_options()]
        channel = (grpc.secure_channel(target, self.channel_credentials(), options) if self.tls
                   else grpc.insecure_channel(target, options))
        return grpc.intercept_channel(channel, _SyncTokenMetadata(self.token)) if self.token else channel


class _TokenMetadata:
    """Adds `authorization: Bearer TOKEN` to every call of an aio channel. One object per call
    kind: grpc.aio files an interceptor under the first kind it implements only."""

    def __init__(self, token: str):
        self.entry = ("authorization", f"Bearer {token}")

    async def _call(self, continuation, details, request):
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self.entry)
        return await continuation(details._replace(metadata=metadata), request)


class _UnaryUnaryToken(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _TokenMetadata._call


class _UnaryStreamToken(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _TokenMetadata._call


class _StreamUnaryToken(_TokenMetadata, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _TokenMetadata._call


class _StreamStreamToken(_TokenMetadata, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _TokenMetadata._call


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """What makes an aio channel present the token on calls of every kind."""
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


class _SyncDetails(collections.namedtuple("_SyncDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _SyncTokenMetadata(grpc.UnaryUnaryClientInterceptor):
    """The same, for a blocking channel's unary calls (all the draft proposer makes)."""

    def __init__(self, token: str):
        self.entry = ("authorization", f"Bearer {token}")

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_SyncDetails(details.method, details.timeout, [*(details.metadata or ()), self.entry],
                                         details.credentials, details.wait_for_ready, details.compression), request)
