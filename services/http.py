"""The gateway's HTTP front door: the OpenAI-compatible API, /metrics and /health (FastAPI on
uvicorn, on the gateway's own event loop, beside its gRPC server).

    GET  /v1/models             the served model, then its LoRA adapters (parent: the base)
    POST /v1/completions        text completions (prompt: a string, strings, token ids)
    POST /v1/chat/completions   chat through the model's chat template
    POST /v1/load_lora_adapter  vLLM's runtime loading: {"lora_name", "lora_path"}; off unless the
    POST /v1/unload_lora_adapter  operator sets runtime_lora_dir (403); {"lora_name"}
A request's `model` is the base model's id (or served_model_name) or a LoRA adapter's name (404
model_not_found otherwise).
    GET  /metrics               Prometheus text (docs/metrics.md); no API key needed
    GET  /health                200 while the gateway serves; 503 once it drains (then the port
                                closes when the requests in flight are done)

Both APIs call the same GatewayServicer methods, so a request is admitted, routed, counted and
measured the same way whichever door it came in by. With API keys configured, /v1 routes need
`Authorization: Bearer <key>` (401 otherwise), checked before the body is read. Request bodies
above max_message_bytes get 413. A request runs at most request_timeout_s (504 after).
Streaming uses server-sent events (`data: {json}` ... `data: [DONE]`); a client that disconnects
cancels its request, which frees its KV blocks on the workers.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tandem.errors import ModelNotFoundError

from .common import bearer_authorized, status_of
from .gateway import Deadline, GatewayServicer
from .openai_protocol import (HTTP_STATUS, ChatCompletionRequest, CompletionLogprobs, CompletionRequest,
                              LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest,
                              OpenAIError, chat_logprobs, new_id, now, usage)

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there


@dataclasses.dataclass
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = dataclasses.field(default_factory=list)
    max_body_bytes: int = 16 << 20
    served_model_name: str | None = None  # also accepted as `model` (e.g. the config's alias)
    tls_cert: str | None = None
    tls_key: str | None = None
    grace_s: float = 5.0
    request_timeout_s: float | None = 600.0  # a request's deadline (None: none)


def error_response(exc: BaseException) -> JSONResponse:
    if not isinstance(exc, OpenAIError):
        exc = openai_error(exc)
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def openai_error(exc: BaseException) -> OpenAIError:
    code, details = status_of(exc)
    status = HTTP_STATUS.get(code.name, 500)
    if status == 500:
        log.error("HTTP request failed", exc_info=exc)
    return OpenAIError(status, details, code=code.name.lower())


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _send_error(send, error: OpenAIError) -> None:
    """Answer from ASGI middleware, before the app (and without reading the body)."""
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(error.body()).encode()})


class _ApiKeys:
    """ASGI middleware: /v1 routes need a valid API key, checked on the headers before anything
    reads or parses the body, so a caller without a key costs no parsing."""

    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not bearer_authorized(header, self.keys):  # the gRPC port's check
                return await _send_error(send, OpenAIError(
                    401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key"))
        return await self.app(scope, receive, send)


class _BodyLimit:
    """ASGI middleware: 413 for a body larger than the limit, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise OpenAIError(413, f"the request body exceeds {self.limit} bytes")
            return message

        try:
            await self.app(scope, counted, send)
        except OpenAIError:
            await self._reject(send)

    async def _reject(self, send):
        await _send_error(send, OpenAIError(413, f"the request body exceeds {self.limit} bytes"))


def create_app(gateway: GatewayServicer, options: HttpOptions) -> FastAPI:
    app = FastAPI(title="tandem", summary="tandem's OpenAI-compatible API", docs_url=None, redoc_url=None)
    started = now()

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(OpenAIError(400, f"{where}: {first.get('msg', 'invalid request')}".strip(": "),
                                          param=where or None))

    def params(body, request: Request, max_tokens: int, logprobs: int | None):
        """The body's SamplingParams with its caller's cache salt."""
        return gateway.salted(body.sampling(max_tokens, logprobs), request.headers.get("authorization"))

    async def model_id(requested: str | None) -> tuple[str, int, str]:
        """(the model's name for the reply, its context length, the LoRA adapter to run: "" = none)."""
        card = await gateway.model_card()
        try:
            lora = await gateway.lora_of(requested or "", aliases=(options.served_model_name,))
        except ModelNotFoundError as exc:
            raise OpenAIError(404, str(exc), code="model_not_found", param="model") from None
        return lora or card.id, card.max_model_len, lora

    @app.get("/health")
    async def health():
        return Response(status_code=200 if gateway.healthy() else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(await gateway.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        try:
            cards = await gateway.models()
        except Exception as exc:
            return error_response(exc)
        return {"object": "list", "data": [{"id": c.id, "object": "model", "created": started, "owned_by": "tandem",
                                            "root": c.id, "parent": c.parent or None, "max_model_len": c.max_model_len}
                                           for c in cards]}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        """vLLM's runtime loading: every worker loads the adapter, or none does."""
        try:
            await gateway.load_lora(body.lora_name, body.lora_path)
        except Exception as exc:
            return error_response(exc)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        try:
            await gateway.unload_lora(body.lora_name)
        except Exception as exc:
            return error_response(exc)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        try:
            body.check_supported()
            name, _, lora = await model_id(body.model)
            sampling = params(body, request, 16 if body.max_tokens is None else body.max_tokens, body.logprobs)
            deadline = Deadline(options.request_timeout_s)
            rag = body.rag.to_pb() if body.rag else None
            texts = body.prompts()
            admission = gateway.admit(sampling.n * len(texts), "http", "completions")  # before any work
            try:
                prompts = [await gateway.completion_prompt(p if isinstance(p, str) else None,
                                                           None if isinstance(p, str) else p, rag, deadline)
                           for p in texts]
                runs = [gateway.generate("", ids, sampling, deadline, sources, api="http", endpoint="completions",
                                         admission=admission, disaggregate=body.disaggregate or "", lora=lora)
                        for ids, sources in prompts]
                firsts = await _start(runs)
            except BaseException:
                admission.release()
                raise
        except Exception as exc:
            return error_response(exc)
        reply = _Completions(new_id("cmpl"), name, body.n, body.logprobs is not None)
        merged = _merge(runs, firsts)
        if body.stream:
            return StreamingResponse(reply.stream(merged, body.include_usage), media_type="text/event-stream")
        return await _until_disconnected(request, reply.whole(merged))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            body.check_supported()
            name, max_len, lora = await model_id(body.model)
            limit = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
            sampling = params(body, request, 1 if limit is None else limit, body.num_logprobs())
            deadline = Deadline(options.request_timeout_s)
            messages = body.pb_messages()
            admission = gateway.admit(sampling.n, "http", "chat_completions")  # before templating and retrieval
            try:
                ids, sources = await gateway.chat_prompt(messages, body.rag.to_pb() if body.rag else None, deadline)
                if limit is None:  # OpenAI's default: the rest of the context
                    sampling = dataclasses.replace(sampling, max_tokens=max(1, max_len - len(ids)))
                runs = [gateway.generate("", ids, sampling, deadline, sources, api="http",
                                         endpoint="chat_completions", admission=admission,
                                         disaggregate=body.disaggregate or "", lora=lora)]
                firsts = await _start(runs)
            except BaseException:
                admission.release()
                raise
        except Exception as exc:
            return error_response(exc)
        reply = _ChatCompletions(new_id("chatcmpl"), name, body.n, body.logprobs)
        merged = _merge(runs, firsts)
        if body.stream:
            return StreamingResponse(reply.stream(merged, body.include_usage), media_type="text/event-stream")
        return await _until_disconnected(request, reply.whole(merged))

    return _ApiKeys(_BodyLimit(app, options.max_body_bytes), options.api_keys)


# -- running requests --------------------------------------------------------------------------
async def _start(runs: list) -> list:
    """Each run's first response, the runs started together: admission and validation errors
    surface here, before the HTTP status is sent. A failure closes every run."""
    firsts = await asyncio.gather(*(anext(run) for run in runs), return_exceptions=True)
    failed = next((f for f in firsts if isinstance(f, BaseException)), None)
    if failed is not None:
        for run in runs:
            await run.aclose()
        raise failed
    return firsts


async def _merge(runs: list, firsts: list) -> AsyncIterator[tuple[int, object]]:
    """(run index, response) from every run as they come; closing it closes every run."""
    if len(runs) == 1:
        yield 0, firsts[0]
        async for item in runs[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, run) -> None:
        try:
            async for item in run:
                await queue.put((i, item, None))
        except Exception as exc:
            await queue.put((i, None, exc))
        finally:
            await queue.put((i, None, StopAsyncIteration()))

    for i, first in enumerate(firsts):
        queue.put_nowait((i, first, None))
    tasks = [asyncio.create_task(pump(i, run)) for i, run in enumerate(runs)]
    try:
        done = 0
        while done < len(runs):
            i, item, exc = await queue.get()
            if isinstance(exc, StopAsyncIteration):
                done += 1
            elif exc is not None:
                raise exc
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until_disconnected(request: Request, work) -> Response:
    """Run a non-streaming request; if its client goes away first, cancel it (freeing its KV)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return Response(status_code=499)
    try:
        return JSONResponse(task.result())
    except Exception as exc:
        return error_response(exc)


class _Reply:
    """Turns the gateway's responses into one endpoint's objects: whole, or as SSE chunks."""

    object_name = chunk_name = ""

    def __init__(self, request_id: str, model: str, n: int, logprobs: bool):
        self.id, self.model, self.n, self.logprobs, self.created = request_id, model, n, logprobs, now()
        self.totals = [0, 0, 0]  # prompt, completion, cached tokens
        self.routes: dict[int, dict] = {}  # run (prompt) index -> where it ran
        self.sources: list[dict] = []

    def _finished(self, run: int, response) -> None:
        u = response.usage
        for i, value in enumerate((u.prompt_tokens, u.completion_tokens, u.cached_tokens)):
            self.totals[i] += value
        self.routes[run] = {"disaggregated": u.disaggregated, "reason": u.route_reason}
        self.sources += [{"id": c.id, "document_id": c.document_id, "title": c.title, "text": c.text,
                          "score": c.score} for c in response.sources]

    def _usage(self) -> dict:
        return usage(*self.totals, [self.routes[i] for i in sorted(self.routes)])

    def _head(self, name: str) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model}

    async def whole(self, merged) -> dict:
        choices = {}
        async for run, response in merged:
            if response.finished:
                self._finished(run, response)
                continue
            index = run * self.n + response.delta.index
            self.add(choices.setdefault(index, self.new_choice(index)), response.delta)
        out = {**self._head(self.object_name), "choices": [choices[i] for i in sorted(choices)],
               "usage": self._usage()}
        if self.sources:
            out["sources"] = self.sources
        return out

    async def stream(self, merged, include_usage: bool):
        try:
            async for run, response in merged:
                if response.finished:
                    self._finished(run, response)
                    continue
                for chunk in self.chunks(run * self.n + response.delta.index, response.delta):
                    yield sse({**self._head(self.chunk_name), "choices": [chunk]})
            if include_usage:
                yield sse({**self._head(self.chunk_name), "choices": [], "usage": self._usage()})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the status is sent: the error travels as an event
            yield sse(openai_error(exc).body())
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"


class _Completions(_Reply):
    object_name = chunk_name = "text_completion"

    def __init__(self, *args):
        super().__init__(*args)
        self.lp: dict[int, CompletionLogprobs] = {}

    def new_choice(self, index: int) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}

    def _logprobs(self, index: int, delta) -> dict | None:
        return self.lp.setdefault(index, CompletionLogprobs()).add(delta.logprobs) if self.logprobs else None

    def add(self, choice: dict, delta) -> None:
        choice["text"] += delta.text
        if self.logprobs:
            self._logprobs(choice["index"], delta)
            choice["logprobs"] = self.lp[choice["index"]].to_dict()
        choice["finish_reason"] = delta.finish_reason or choice["finish_reason"]

    def chunks(self, index: int, delta) -> list[dict]:
        return [{"index": index, "text": delta.text, "logprobs": self._logprobs(index, delta),
                 "finish_reason": delta.finish_reason or None}]


class _ChatCompletions(_Reply):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, *args):
        super().__init__(*args)
        self.started: set[int] = set()

    def new_choice(self, index: int) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": ""},
                "logprobs": {"content": []} if self.logprobs else None, "finish_reason": None}

    def add(self, choice: dict, delta) -> None:
        choice["message"]["content"] += delta.text
        if self.logprobs:
            choice["logprobs"]["content"] += chat_logprobs(delta.logprobs)
        choice["finish_reason"] = delta.finish_reason or choice["finish_reason"]

    def chunks(self, index: int, delta) -> list[dict]:
        out = []
        if index not in self.started:  # OpenAI's first chunk of a choice names the role
            self.started.add(index)
            out.append({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None})
        if delta.text or delta.finish_reason or delta.logprobs:
            out.append({"index": index, "delta": {"content": delta.text} if delta.text else {},
                        "logprobs": {"content": chat_logprobs(delta.logprobs)} if self.logprobs else None,
                        "finish_reason": delta.finish_reason or None})
        return out


# -- the server --------------------------------------------------------------------------------
class HttpFrontend:
    """uvicorn serving the app on the caller's event loop (the gateway's), started and stopped
    by the gateway's ServiceHost. The socket is bound here, so a taken port fails start()."""

    def __init__(self, app_factory, options: HttpOptions):
        self.app_factory, self.options = app_factory, options
        self.port: int | None = None
        self._server = None
        self._task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.options.host}:{self.port}"

    async def start(self) -> None:
        import uvicorn

        from tandem.errors import ConfigError

        o = self.options
        family = socket.AF_INET6 if ":" in o.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((o.host, o.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen for HTTP on {o.host}:{o.port}: {exc}") from None
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app_factory(), log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=o.tls_cert, ssl_keyfile=o.tls_key,
                                timeout_graceful_shutdown=max(1, int(o.grace_s)))
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
