"""AsyncClient: Client (client.py) over grpc.aio, for asyncio programs: the same constructor, the
same methods as coroutines, and streams as async iterators.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import grpc
import grpc.aio

from tandem.sdk import _wire
from tandem.sdk.errors import from_rpc_error
from tandem.sdk.types import Chunk, Completion
from tandem.v1 import gateway_pb2_grpc, gateway_pb2


class AsyncClient:
    """A connection to a tandem server for asyncio code; arguments and errors as in Client.

        from tandem.sdk import AsyncClient

        async def main():
            async with AsyncClient("localhost:50051", api_key="KEY") as client:
                print((await client.complete("The capital of France is", max_tokens=8)).text)
                async for chunk in client.generate("Once upon a time", max_tokens=64):
                    print(chunk.text, end="", flush=True)
                reply = await client.chat([{"role": "user", "content": "Hi!"}])
                async for chunk in client.chat([{"role": "user", "content": "Hi!"}], stream=True):
                    ...

        asyncio.run(main())

    The channel opens on the first call, in the running event loop; use a client from that loop
    only. A stream left early is cancelled when its iterator is closed (`contextlib.aclosing`) or
    collected.
    """

    def __init__(self, target: str, api_key: str | None = None, tls=None, timeout: float | None = None,
                 max_retries: int = 3, max_message_bytes: int = 16 << 20) -> None:
        self._target = target
        self._credentials = _wire.channel_credentials(tls)
        self._options = _wire.channel_options(max_message_bytes)
        self._channel: grpc.aio.Channel | None = None
        self._stub: gateway_pb2_grpc.GatewayStub | None = None
        self._metadata = _wire.call_metadata(api_key)
        self.timeout = timeout
        self.max_retries = max_retries

    def generate(self, prompt: str | list[int], *, timeout: float | None = None, request_id: str | None = None,
                 model: str | None = None, **sampling) -> AsyncIterator[Chunk]:
        """An async iterator of the completion's Chunks (see Client.generate)."""
        request = _wire.generate_request(prompt, model, request_id, sampling)
        return self._stream("Generate", request, timeout)

    async def complete(self, prompt: str | list[int], *, timeout: float | None = None,
                       request_id: str | None = None, model: str | None = None, **sampling) -> Completion:
        """The whole completion of `prompt` (see Client.complete)."""
        return await _collect(self.generate(prompt, timeout=timeout, request_id=request_id, model=model, **sampling))

    def chat(self, messages: list[dict], *, stream: bool = False, timeout: float | None = None,
             request_id: str | None = None, model: str | None = None,
             **sampling) -> Awaitable[Completion] | AsyncIterator[Chunk]:
        """`await client.chat(messages)` for a Completion; `async for chunk in client.chat(messages,
        stream=True)` for the Chunks (see Client.chat)."""
        request = _wire.chat_request(messages, model, request_id, sampling)
        chunks = self._stream("Chat", request, timeout)
        return chunks if stream else _collect(chunks)

    async def tokenize(self, text: str, add_special_tokens: bool = True, parse_special: bool = False, *,
                       timeout: float | None = None, model: str | None = None) -> list[int]:
        """The served model's token ids of `text` (see Client.tokenize)."""
        request = _wire.tokenize_request(text, add_special_tokens, parse_special, model)
        return list((await self._unary("Tokenize", request, timeout)).token_ids)

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True, *,
                         timeout: float | None = None, model: str | None = None) -> str:
        """The text of `token_ids`."""
        request = _wire.detokenize_request(token_ids, skip_special_tokens, model)
        return (await self._unary("Detokenize", request, timeout)).text

    async def list_models(self, *, timeout: float | None = None) -> list[dict]:
        """The served models: [{"id": ..., "max_model_len": ..., "quantization": ...}]."""
        return _wire.model_cards(await self._unary("ListModels", gateway_pb2.ListModelsRequest(), timeout))

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _method(self, name: str):
        if self._stub is None:
            self._channel = (grpc.aio.insecure_channel(self._target, self._options) if self._credentials is None
                             else grpc.aio.secure_channel(self._target, self._credentials, self._options))
            self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        return getattr(self._stub, name)

    async def _unary(self, name: str, request, timeout: float | None):
        policy = _wire.RetryPolicy(self.max_retries, self.timeout if timeout is None else timeout)
        while True:
            seconds_left = policy.remaining()
            try:
                return await self._method(name)(request, timeout=seconds_left, metadata=self._metadata)
            except grpc.RpcError as e:
                delay = policy.backoff(e)
                if delay is None:
                    raise from_rpc_error(e) from e
            await asyncio.sleep(delay)

    async def _stream(self, name: str, request, timeout: float | None) -> AsyncIterator[Chunk]:
        policy = _wire.RetryPolicy(self.max_retries, self.timeout if timeout is None else timeout)
        while True:
            call = self._method(name)(request, timeout=policy.remaining(), metadata=self._metadata)
            num_received = 0
            try:
                async for response in call:
                    num_received += 1
                    yield Chunk.from_pb(response)
                return
            except grpc.RpcError as e:
                # once output has been shown, a retry would show it again: raise instead
                delay = policy.backoff(e) if num_received == 0 else None
                if delay is None:
                    raise from_rpc_error(e) from e
            finally:
                call.cancel()
            await asyncio.sleep(delay)


async def _collect(chunks: AsyncIterator[Chunk]) -> Completion:
    return Completion.from_chunks([chunk async for chunk in chunks])
