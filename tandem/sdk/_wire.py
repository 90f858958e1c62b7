"""What Client and AsyncClient share: building the Gateway's requests from Python values, the
channel's credentials and options, call metadata, and the retry policy. Nothing here does I/O, so
the two clients differ only in how they wait.
"""
from __future__ import annotations

import random
import time

import grpc

from tandem.errors import InvalidRequestError
from tandem.sampling_params import fields_to_pb
from tandem.sdk.errors import DeadlineExceededError, InvalidArgumentError
from tandem.v1 import common_pb2, gateway_pb2

# Backoff between retries of UNAVAILABLE: the usual gRPC client schedule (0.1 s doubling, capped),
# each delay drawn in [d/2, d] so that clients cut off together do not come back together.
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 2.0


def _invalid(name: str, expected: str, value, error: Exception | None = None) -> InvalidArgumentError:
    reason = f" ({error})" if error else ""
    return InvalidArgumentError(f"{name} must be {expected}, got {value!r}{reason}")


def sampling_to_pb(sampling: dict) -> common_pb2.SamplingParams:
    """The proto of `sampling` (SamplingParams's field names -> values, the library's names).
    Keywords left out or None stay unset, so the server applies the library's defaults. Ranges
    are the server's to check; a value protobuf cannot hold fails here (tandem.sampling_params)."""
    try:
        return fields_to_pb(sampling)
    except InvalidRequestError as e:
        raise InvalidArgumentError(str(e)) from e


def rag_options(rag) -> gateway_pb2.RagOptions | None:
    """rag=True (defaults) or {"k": 4, "collection": "docs", "hybrid": True}; None/False: no retrieval."""
    if rag is None or rag is False:
        return None
    if rag is True:
        return gateway_pb2.RagOptions()
    if not isinstance(rag, dict) or set(rag) - {"k", "collection", "hybrid"}:
        raise _invalid("rag", 'True or a dict with k, collection, hybrid', rag)
    try:
        return gateway_pb2.RagOptions(**rag)
    except (TypeError, ValueError) as e:
        raise _invalid("rag", 'True or a dict with k, collection, hybrid', rag, e) from e


def disaggregate_option(value) -> str:
    """disaggregate="auto" | "always" | "never" (None: the server's setting). The server checks
    the value (INVALID_ARGUMENT); here only that it is a string."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _invalid("disaggregate", '"auto", "always", "never" or None', value)
    return value


def with_structured_output(sampling: dict) -> dict:
    """sampling with structured_output= folded into logits_processors: the keyword is an alias of
    logits_processors={"structured_output": {...}}, the built-in processor's own arguments
    (plugins/structured.py): exactly one of {"json_schema": {...}}, {"json_object": True},
    {"regex": "..."}, {"choice": ["yes", "no"]} or {"grammar": "<Lark>"}. The server checks the
    argument (a bad kind, or a schema that does not compile: INVALID_ARGUMENT); here only that it
    is a dict and is not given twice."""
    structured = sampling.pop("structured_output", None)
    if structured is None:
        return sampling
    if not isinstance(structured, dict) or not structured:
        raise _invalid("structured_output", 'a dict such as {"json_schema": {...}}, {"regex": "..."} or '
                       '{"choice": [...]}', structured)
    processors = dict(sampling.get("logits_processors") or {})
    if "structured_output" in processors:
        raise InvalidArgumentError("give structured_output= or logits_processors={'structured_output': ...}, "
                                   "not both")
    processors["structured_output"] = structured
    return {**sampling, "logits_processors": processors}


def request_options(sampling: dict) -> tuple[common_pb2.SamplingParams, gateway_pb2.RagOptions | None, str]:
    """A call's keywords as (SamplingParams, RagOptions, disaggregate): SamplingParams' fields plus
    rag= (see rag_options), disaggregate= (see disaggregate_option) and structured_output= (see
    with_structured_output)."""
    sampling = dict(sampling)
    rag = rag_options(sampling.pop("rag", None))
    disaggregate = disaggregate_option(sampling.pop("disaggregate", None))
    return sampling_to_pb(with_structured_output(sampling)), rag, disaggregate


def generate_request(prompt, model: str | None, request_id: str | None, sampling: dict) -> gateway_pb2.GenerateRequest:
    """GenerateRequest of a text prompt (str) or a token-id prompt (list of ints); sampling: the
    call's keywords (see request_options)."""
    sampling_pb, rag, disaggregate = request_options(sampling)
    request = gateway_pb2.GenerateRequest(model=model or "", request_id=request_id or "",
                                          sampling=sampling_pb, rag=rag, disaggregate=disaggregate)
    if isinstance(prompt, str):
        request.text = prompt
        return request
    if not isinstance(prompt, (list, tuple)):
        raise _invalid("prompt", "a string or a list of token ids", prompt)
    try:
        request.token_ids.ids.extend(prompt)
    except (TypeError, ValueError) as e:
        raise _invalid("prompt", "a string or a list of token ids", prompt, e) from e
    if not prompt:
        request.token_ids.SetInParent()  # an empty id list is still a token-id prompt; the server rejects it
    return request


def chat_request(messages, model: str | None, request_id: str | None, sampling: dict) -> gateway_pb2.ChatRequest:
    """ChatRequest of [{"role": ..., "content": ...}, ...]; sampling: the call's keywords (see
    request_options)."""
    sampling_pb, rag, disaggregate = request_options(sampling)
    try:
        pb_messages = [common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    except (TypeError, ValueError, KeyError) as e:
        raise _invalid("messages", 'a list of {"role": str, "content": str} dicts', messages, e) from e
    return gateway_pb2.ChatRequest(model=model or "", messages=pb_messages, request_id=request_id or "",
                                   sampling=sampling_pb, rag=rag, disaggregate=disaggregate)


def tokenize_request(text: str, add_special_tokens: bool, parse_special: bool, model: str | None):
    try:
        return common_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens,
                                          parse_special=parse_special, model=model or "")
    except (TypeError, ValueError) as e:
        raise _invalid("text", "a string", text, e) from e


def detokenize_request(token_ids, skip_special_tokens: bool, model: str | None):
    try:
        return common_pb2.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens,
                                            model=model or "")
    except (TypeError, ValueError) as e:
        raise _invalid("token_ids", "a list of integers", token_ids, e) from e


def model_cards(response: gateway_pb2.ListModelsResponse) -> list[dict]:
    return [{"id": m.id, "max_model_len": m.max_model_len, "quantization": m.quantization, "parent": m.parent or None}
            for m in response.models]


def channel_credentials(tls) -> grpc.ChannelCredentials | None:
    """None for an insecure channel (tls None or False); else TLS with the system's roots (True), a
    PEM root certificate file (a path), or the given grpc.ChannelCredentials."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, str):
        with open(tls, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    raise TypeError(f"tls must be None, a bool, a PEM file path or grpc.ChannelCredentials, got {tls!r}")


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class RetryPolicy:
    """One call's retries: UNAVAILABLE only, at most max_retries after the first try, all within
    the call's deadline (`timeout` seconds from now; None = no deadline)."""

    def __init__(self, max_retries: int, timeout: float | None) -> None:
        self.max_retries = max_retries
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.num_retries = 0

    def remaining(self) -> float | None:
        """Seconds left for the next try, as its gRPC timeout. Raises when none are left."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"deadline exceeded after {self.num_retries + 1} tries")
        return left

    def backoff(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before retrying after `error`, or None when it must be raised."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or self.num_retries >= self.max_retries:
            return None
        ceiling = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** self.num_retries)
        delay = random.uniform(ceiling / 2, ceiling)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None  # the retry could not finish in time: the UNAVAILABLE is the better answer
        self.num_retries += 1
        return delay
