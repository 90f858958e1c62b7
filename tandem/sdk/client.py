"""Client: the blocking Python client of a tandem server's Gateway service (gateway.proto).

Follows the shape of the usual LLM SDKs (a streaming call and a collecting one over it), with
gRPC's own deadlines, status codes and UNAVAILABLE-only retries. AsyncClient (aio.py) is the
same over grpc.aio.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from tandem.sdk import _wire
from tandem.sdk.errors import from_rpc_error
from tandem.sdk.types import Chunk, Completion
from tandem.v1 import gateway_pb2_grpc, gateway_pb2


class Client:
    """A connection to a tandem server (its Gateway gRPC port).

        from tandem.sdk import Client

        with Client("localhost:50051", api_key="KEY", timeout=60) as client:
            print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)
            for chunk in client.generate("Once upon a time", max_tokens=64, stop="\\n"):
                print(chunk.text, end="", flush=True)
            reply = client.chat([{"role": "user", "content": "Hi!"}], max_tokens=32)
            person = client.chat([{"role": "user", "content": "A person as JSON."}], max_tokens=64,
                                 structured_output={"json_schema": {"type": "object", ...}})
            ids = client.tokenize("Hello")

    target: "host:port". api_key: sent as "authorization: Bearer KEY" on every call. tls: None or
    False for plain TCP; True for TLS with the system's root certificates; a path to a PEM root
    certificate; or a grpc.ChannelCredentials. timeout: default seconds per call (None: no
    deadline), overridden by a call's own timeout. max_retries: how many times a call is retried
    when the server is UNAVAILABLE (0: never), with exponential backoff, within its deadline; a
    stream is retried only before its first chunk. max_message_bytes: the largest message either
    way.

    Sampling keywords are tandem.SamplingParams's fields (max_tokens, n, temperature, top_k,
    top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed, stop,
    stop_token_ids, ignore_eos, skip_special_tokens, logits_processors); those left out take the
    server's defaults. structured_output= constrains the answer token by token to one of
    {"json_schema": {...}} (a JSON Schema), {"json_object": True} (any JSON object), {"regex":
    "..."}, {"choice": ["yes", "no"]} or {"grammar": "<Lark grammar>"}: an alias of
    logits_processors={"structured_output": {...}} (plugins/structured.py; a kind or schema the
    server cannot compile is INVALID_ARGUMENT). generate, complete and chat also take rag=
    (retrieval) and disaggregate= ("auto", "always" or "never": where the server runs the prompt;
    None: its setting). Failures raise TandemRpcError subclasses (InvalidArgumentError,
    UnavailableError, ...), whose `code()` is the grpc.StatusCode.
    """

    def __init__(self, target: str, api_key: str | None = None, tls=None, timeout: float | None = None,
                 max_retries: int = 3, max_message_bytes: int = 16 << 20) -> None:
        credentials = _wire.channel_credentials(tls)
        options = _wire.channel_options(max_message_bytes)
        self._channel = (grpc.insecure_channel(target, options) if credentials is None
                         else grpc.secure_channel(target, credentials, options))
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._metadata = _wire.call_metadata(api_key)
        self.timeout = timeout
        self.max_retries = max_retries

    def generate(self, prompt: str | list[int], *, timeout: float | None = None, request_id: str | None = None,
                 model: str | None = None, **sampling) -> Iterator[Chunk]:
        """Stream the completion of `prompt` (text, or token ids) as Chunks: each sample's new
        tokens and text as they come, then a last chunk with finished=True, usage and timings.
        Bad keywords raise here; the call starts when iteration does, and leaving the loop early
        cancels it. model: a LoRA adapter's name runs the request with it (list_models names
        them); None or the base's id: the base model; another name: NOT_FOUND."""
        request = _wire.generate_request(prompt, model, request_id, sampling)
        return self._stream(self._stub.Generate, request, timeout)

    def complete(self, prompt: str | list[int], *, timeout: float | None = None, request_id: str | None = None,
                 model: str | None = None, **sampling) -> Completion:
        """The whole completion of `prompt`: `.text`, `.token_ids`, `.finish_reason` (sample 0),
        `.texts`, `.sample_token_ids`, `.finish_reasons` (all samples), `.usage`, `.timings`."""
        chunks = self.generate(prompt, timeout=timeout, request_id=request_id, model=model, **sampling)
        return Completion.from_chunks(chunks)

    def chat(self, messages: list[dict], *, stream: bool = False, timeout: float | None = None,
             request_id: str | None = None, model: str | None = None, **sampling) -> Completion | Iterator[Chunk]:
        """Reply to a conversation ([{"role": "user", "content": "..."}, ...]) rendered with the
        model's chat template: a Completion, or with stream=True an iterator of Chunks as from
        generate."""
        request = _wire.chat_request(messages, model, request_id, sampling)
        chunks = self._stream(self._stub.Chat, request, timeout)
        return chunks if stream else Completion.from_chunks(chunks)

    def tokenize(self, text: str, add_special_tokens: bool = True, parse_special: bool = False, *,
                 timeout: float | None = None, model: str | None = None) -> list[int]:
        """The served model's token ids of `text` (with BOS where the model asks for one, unless
        add_special_tokens=False; parse_special: text like "<|im_end|>" becomes that token)."""
        request = _wire.tokenize_request(text, add_special_tokens, parse_special, model)
        return list(self._unary(self._stub.Tokenize, request, timeout).token_ids)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True, *,
                   timeout: float | None = None, model: str | None = None) -> str:
        """The text of `token_ids`."""
        request = _wire.detokenize_request(token_ids, skip_special_tokens, model)
        return self._unary(self._stub.Detokenize, request, timeout).text

    def list_models(self, *, timeout: float | None = None) -> list[dict]:
        """The served models: the base model, then its LoRA adapters ("parent": the base's id):
        [{"id": ..., "max_model_len": ..., "quantization": ..., "parent": ...}]. A request's `model`
        picks one (None: the base)."""
        return _wire.model_cards(self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest(), timeout))

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _policy(self, timeout: float | None) -> _wire.RetryPolicy:
        return _wire.RetryPolicy(self.max_retries, self.timeout if timeout is None else timeout)

    def _unary(self, method, request, timeout: float | None):
        policy = self._policy(timeout)
        while True:
            seconds_left = policy.remaining()
            try:
                return method(request, timeout=seconds_left, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = policy.backoff(e)
                if delay is None:
                    raise from_rpc_error(e) from e
            time.sleep(delay)

    def _stream(self, method, request, timeout: float | None) -> Iterator[Chunk]:
        policy = self._policy(timeout)
        while True:
            call = method(request, timeout=policy.remaining(), metadata=self._metadata)
            num_received = 0
            try:
                for response in call:
                    num_received += 1
                    yield Chunk.from_pb(response)
                return
            except grpc.RpcError as e:
                # once output has been shown, a retry would show it again: raise instead
                delay = policy.backoff(e) if num_received == 0 else None
                if delay is None:
                    raise from_rpc_error(e) from e
            finally:
                call.cancel()  # a no-op once the call is over; stops it when the caller leaves the loop early
            time.sleep(delay)
