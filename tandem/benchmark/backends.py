"""Backends: how one benchmark request reaches a server and becomes a RequestRecord, timed on the
client side as each streamed delta arrives (vLLM's backend_request_func.py, for two protocols).

- tandem: the gateway's Generate stream through the SDK's AsyncClient (gRPC). A chunk carries
  token ids, so tokens per delta are exact; the server's tokenizer cuts prompts to length.
- openai / openai-chat: POST {base_url}/v1/completions or /v1/chat/completions with
  "stream": true and usage requested, read as server-sent events until `data: [DONE]`. Works
  against vLLM, SGLang, llama.cpp's server and tandem's HTTP gateway.

A backend is used in two phases: `prepare` (blocking: is the server up, which model, the prompts,
fitted to the server's tokenizer where it has one) and then, inside the event loop, `open`,
`send` per request, `close`. A request that fails becomes a failed record, never an exception.
"""
from __future__ import annotations

import json
import time
from functools import partial

from tandem.benchmark.config import BenchConfig, BenchmarkError
from tandem.benchmark.datasets import SampleRequest, load_requests
from tandem.benchmark.metrics import RequestRecord
from tandem.benchmark.sse import SSEParser

PROBE_TIMEOUT_S = 10.0  # the readiness probe: a server that cannot list its models in 10 s is down
MAX_ERROR_CHARS = 300


class TandemBackend:
    """A tandem gateway over gRPC (`--target host:port`)."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.model = config.model
        self._client = None

    def prepare(self, count: int) -> list[SampleRequest]:
        from tandem.sdk import Client, TandemRpcError, UnauthenticatedError

        target = self.config.target
        with Client(target, api_key=self.config.api_key, timeout=PROBE_TIMEOUT_S, max_retries=2) as client:
            try:
                models = client.list_models()
                self.model = self.model or (models[0]["id"] if models else None)
                return load_requests(self.config, count, partial(client.tokenize, add_special_tokens=False,
                                                                 model=self.config.model))
            except UnauthenticatedError as e:
                raise BenchmarkError(f"the tandem gateway at {target} refused the API key ({e}): "
                                     "pass --api-key or set $TANDEM_API_KEY") from None
            except TandemRpcError as e:
                raise BenchmarkError(f"cannot use the tandem gateway at {target}: {e}. Is `tandem serve` "
                                     "running there? (--target HOST:PORT)") from None

    async def open(self) -> None:
        from tandem.sdk import AsyncClient

        # no retries: an UNAVAILABLE is a failed request here, not latency to hide
        self._client = AsyncClient(self.config.target, api_key=self.config.api_key, max_retries=0)

    async def send(self, request: SampleRequest) -> RequestRecord:
        from tandem.sdk import TandemRpcError

        record = RequestRecord(prompt_len=request.prompt_len)
        usage = None
        start = time.perf_counter()
        try:
            async for chunk in self._client.generate(
                    request.prompt, timeout=self.config.request_timeout, model=self.config.model,
                    max_tokens=request.output_len, temperature=self.config.temperature,
                    ignore_eos=self.config.ignore_eos, disaggregate=self.config.disaggregate):
                if chunk.token_ids or chunk.text:
                    record.add_delta(time.perf_counter() - start, len(chunk.token_ids) or 1)
                usage = chunk.usage or usage
        except TandemRpcError as e:
            return record.fail(type(e).__name__, str(e)[:MAX_ERROR_CHARS])
        except Exception as e:  # noqa: BLE001 - any failure is a failed request, counted by type
            return record.fail(type(e).__name__, str(e)[:MAX_ERROR_CHARS])
        if usage is not None and usage.route_reason:  # a pipeline that reports its routes
            record.disaggregated = usage.disaggregated
        return record.finish(usage and usage.completion_tokens, usage and usage.prompt_tokens)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class OpenAIBackend:
    """An OpenAI-compatible HTTP server (`--base-url`): the completions or the chat API."""

    def __init__(self, config: BenchConfig, chat: bool) -> None:
        self.config = config
        self.chat = chat
        self.model = config.model
        self.url = f"{config.base_url}/v1/{'chat/completions' if chat else 'completions'}"
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._http = None

    def prepare(self, count: int) -> list[SampleRequest]:
        import httpx

        url = f"{self.config.base_url}/v1/models"
        try:
            response = httpx.get(url, headers=self.headers, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError as e:
            raise BenchmarkError(f"cannot reach the server at {self.config.base_url} ({type(e).__name__}: {e}). "
                                 "Is it running? (--base-url)") from None
        if response.status_code in (401, 403):
            raise BenchmarkError(f"{url} answered HTTP {response.status_code}: pass --api-key or set $OPENAI_API_KEY")
        if self.model is None:
            models = response.json().get("data", []) if response.status_code == 200 else []
            if not models:
                raise BenchmarkError(f"{url} answered HTTP {response.status_code} with no model: pass --model")
            self.model = models[0]["id"]
        return load_requests(self.config, count)

    async def open(self) -> None:
        import httpx

        caps = [c for c in self.config.max_concurrencies if c is not None]
        limits = httpx.Limits(max_connections=max(caps) if len(caps) == len(self.config.max_concurrencies) else None,
                              max_keepalive_connections=None)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.config.request_timeout, connect=PROBE_TIMEOUT_S),
                                       limits=limits, headers=self.headers)

    def payload(self, request: SampleRequest) -> dict:
        body = {"model": self.model, "max_tokens": request.output_len, "temperature": self.config.temperature,
                "stream": True, "stream_options": {"include_usage": True}}
        if self.chat:
            body["messages"] = [{"role": "user", "content": request.prompt}]
        else:
            body["prompt"] = request.prompt
        if self.config.ignore_eos:
            body["ignore_eos"] = True  # vLLM's and SGLang's extension; OpenAI itself rejects it
        if self.config.disaggregate:
            body["disaggregate"] = self.config.disaggregate  # tandem's extension
        return body

    async def send(self, request: SampleRequest) -> RequestRecord:
        import httpx

        record = RequestRecord(prompt_len=request.prompt_len)
        start = time.perf_counter()
        try:
            async with self._http.stream("POST", self.url, json=self.payload(request)) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")
                    return record.fail(f"HTTP {response.status_code}", _error_message(body))
                return await self._read_stream(response, record, start)
        except httpx.TimeoutException as e:
            return record.fail("Timeout", f"{type(e).__name__}: no answer within {self.config.request_timeout:g} s")
        except Exception as e:  # noqa: BLE001 - any failure is a failed request, counted by type
            return record.fail(type(e).__name__, str(e)[:MAX_ERROR_CHARS])

    async def _read_stream(self, response, record: RequestRecord, start: float) -> RequestRecord:
        parser, usage = SSEParser(), {}
        async for piece in response.aiter_bytes():
            elapsed = time.perf_counter() - start
            for event in parser.feed(piece):
                if event.is_done:
                    return record.finish(usage.get("completion_tokens"), usage.get("prompt_tokens"))
                if (error := self._apply(event, record, elapsed, usage)) is not None:
                    return record.fail(*error)
        for event in parser.close():
            if not event.is_done and (error := self._apply(event, record, time.perf_counter() - start, usage)):
                return record.fail(*error)
        return record.finish(usage.get("completion_tokens"), usage.get("prompt_tokens"))

    def _apply(self, event, record: RequestRecord, elapsed: float, usage: dict) -> tuple[str, str] | None:
        """Adds one event to the record; returns (error type, message) when it reports an error."""
        if event.event == "error":
            return "StreamError", _error_message(event.data)
        try:
            data = json.loads(event.data)
        except json.JSONDecodeError:
            return "BadEvent", f"not JSON: {event.data[:MAX_ERROR_CHARS]!r}"
        if not isinstance(data, dict):
            return "BadEvent", f"not a JSON object: {event.data[:MAX_ERROR_CHARS]!r}"
        if data.get("error"):
            error = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
            return str(error.get("type") or "StreamError"), str(error.get("message", ""))[:MAX_ERROR_CHARS]
        for choice in data.get("choices") or []:
            if choice.get("index", 0) == 0 and self._content(choice):
                record.add_delta(elapsed, 1)
        usage.update(data.get("usage") or {})
        routes = usage.get("routes")  # tandem's usage extension: where the prompt ran
        if isinstance(routes, list) and routes and isinstance(routes[0], dict):
            record.disaggregated = bool(routes[0].get("disaggregated"))
        return None

    def _content(self, choice: dict) -> str:
        if not self.chat:
            return choice.get("text") or ""
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def make_backend(config: BenchConfig):
    if config.backend == "tandem":
        return TandemBackend(config)
    return OpenAIBackend(config, chat=config.backend == "openai-chat")


def _error_message(body: str) -> str:
    """An error body's message: OpenAI's {"error": {"message": ...}}, FastAPI's {"detail": ...}, or the text."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body.strip()[:MAX_ERROR_CHARS]
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        message = error.get("message", error) if isinstance(error, dict) else error
        return str(message)[:MAX_ERROR_CHARS]
    return body.strip()[:MAX_ERROR_CHARS]
