"""The gateway: tandem's public gRPC API (tandem.v1.Gateway) over the internal services.

    Generate: validate -> tokenize (tokenizer service) -> route -> prefill worker (first tokens,
    KV published to the store) -> decode worker (streams the rest) -> the client
    aggregated mode: route -> one worker runs the whole request

In a disaggregated pipeline, the route is chosen per request (services.routing: the
`disaggregate` policy, auto / always / never): a request may also run whole on a decode worker.
The decision and its reason travel back in the last response's Usage and count in /metrics.

Admission control: at most max_inflight samples at once (a request with n=4 counts 4), checked
before any work (tokenizing, templating, retrieval): RESOURCE_EXHAUSTED beyond. Every list and
string a request carries is bounded (tandem.limits) before it is admitted. With API keys, each key
gets its own prefix cache (its requests' cache_salt is derived from the key). Errors from
a worker come back with the worker's status and message. The client's deadline and cancellation
travel downstream: a cancelled Generate cancels the worker's call, which aborts the request and
frees its KV blocks. Workers are picked among those serving now (services.routing), and a stream
whose worker dies, stalls or drains moves to another one (services.migration).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import logging
import secrets
import time
import uuid

import grpc

from tandem.errors import InvalidRequestError, ModelNotFoundError, QueueFullError
from tandem.limits import (MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_PROMPT_CHARS,
                           MAX_RAG_K, MAX_ROLE_CHARS, check_count, check_text, check_token_ids)
from tandem.rag.prompt import canonical, rag_prompt
from tandem.sampling_params import SamplingParams
from tandem.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, draft_pb2_grpc, gateway_pb2, gateway_pb2_grpc,
                       kvstore_pb2_grpc, prefill_pb2, prefill_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc,
                       tokenizer_pb2, tokenizer_pb2_grpc)

from .common import Registration, Unavailable, bearer_key, client_channel, rpc, status_of
from .config import MigrationConfig
from .metrics import GatewayMetrics
from .migration import Migrator, Progress
from .routing import CONTROL_TIMEOUT_S, Disaggregation, Endpoint, Peer, Resolve, Route, Router, check_policy

log = logging.getLogger(__name__)
_request_ids = itertools.count()
DEFAULT_RAG_K = 4
LORAS_TTL_S = 5.0  # how long the gateway trusts its list of the workers' LoRA adapters
LORA_LOAD_TIMEOUT_S = 120.0  # loading an adapter on every worker, without a client deadline


class Deadline:
    """When a request must be done by: the gRPC client's deadline, or an HTTP request's limit."""

    def __init__(self, timeout: float | None = None):
        self.at = None if timeout is None else time.monotonic() + timeout

    @classmethod
    def of(cls, context) -> Deadline:
        return cls(context.time_remaining())

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())


def check_rag(rag) -> None:
    if rag is not None:
        if not 0 <= rag.k <= MAX_RAG_K:
            raise InvalidRequestError(f"rag k must be in [0, {MAX_RAG_K}] (0 = the default), got {rag.k}")
        check_text("rag collection", rag.collection, MAX_NAME_CHARS)


class Admission:
    """Samples admitted at the gateway and not finished yet: taken before any work, given back
    as each prompt's run ends (release), or all at once when the request fails before running."""

    def __init__(self, gateway: GatewayServicer, num_samples: int):
        self.gateway, self.left = gateway, num_samples

    def release(self, num_samples: int | None = None) -> None:
        num = self.left if num_samples is None else min(num_samples, self.left)
        self.left -= num
        self.gateway.inflight -= num


def with_seed(params: SamplingParams) -> SamplingParams:
    """A sampled request always carries a seed (a random one unless the client chose): each draw
    depends on the seed and its position only, so a migrated stream continues the same way."""
    if params.greedy or params.seed is not None:
        return params
    return dataclasses.replace(params, seed=secrets.randbits(62))


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, tokenizer: str, decode: list[str], prefill: list[str] | None = None,
                 max_inflight: int = 256, max_message_bytes: int = 16 << 20, retrieval: str | None = None,
                 kvstore: str | None = None, draft: str | None = None, salt_per_key: bool = False,
                 credentials=None, migration: MigrationConfig | None = None, resolve: Resolve | None = None,
                 disaggregate: str = "auto", disaggregate_min_uncached_tokens: int = 64, model_aliases=()):
        """tokenizer, decode, prefill, retrieval, kvstore, draft: targets (host:port) of the
        services. Without prefill targets the pipeline is aggregated: decode workers run whole
        requests. kvstore and draft are only asked for their Stats (/metrics). salt_per_key (API
        keys are configured): each key's requests get a prefix cache of their own. migration: how
        streams move between workers; resolve: where a service that moved listens now
        (services.routing). disaggregate, disaggregate_min_uncached_tokens: the requests' default
        route policy and auto's threshold (services.routing). model_aliases: names a request's
        `model` may give the base model by, besides its id (the config's `model`: smollm2-135m)."""
        if not decode:
            raise ValueError("the gateway needs at least one decode (or aggregated) worker")
        # credentials: the pipeline's (services.credentials), presented on every internal call
        channel = lambda target: client_channel(target, max_message_bytes, credentials)  # noqa: E731
        # Unary calls to the tokenizer and retrieval are retried while they restart (or move).
        tokenizer_peer = Peer(tokenizer, channel, tokenizer_pb2_grpc.TokenizerStub, resolve)
        retrieval_peer = Peer(retrieval, channel, retrieval_pb2_grpc.RetrievalStub, resolve) if retrieval else None
        self.tokenizer = tokenizer_peer.retrying()
        self.retrieval = retrieval_peer.retrying() if retrieval_peer else None
        self.router = Router([Endpoint(t, channel, prefill_pb2_grpc.PrefillStub, resolve) for t in prefill or []],
                             [Endpoint(t, channel, decode_pb2_grpc.DecodeStub, resolve) for t in decode])
        self.disaggregation = Disaggregation(self.router, disaggregate, disaggregate_min_uncached_tokens)
        self.migration = migration or MigrationConfig()
        self.migrator = Migrator(self.migration, self.router,
                                 lambda reason: self.metrics.migrations.labels(reason).inc())
        self.max_inflight, self.inflight, self.draining = max_inflight, 0, False
        self.salt_per_key = salt_per_key
        self.counters = {"requests": 0, "rejected": 0, "errors": 0}
        self.metrics = GatewayMetrics()
        self._model_card: gateway_pb2.ModelCard | None = None  # every worker serves the same model
        self._loras: tuple[float, list[str]] = (0.0, [])  # (when asked, the workers' LoRA adapters)
        self.runtime_loras: dict[str, str] = {}  # name -> path: what this gateway loaded at run time
        self.model_aliases = tuple(model_aliases)
        self.router.on_return = self._restore_loras
        self._stats_peers = {("tokenizer", tokenizer): tokenizer_peer,
                             **{("prefill", e.origin): e for e in self.router.prefill},
                             **{("decode" if self.disaggregated else "worker", e.origin): e
                                for e in self.router.decode}}
        if self.retrieval is not None:
            self._stats_peers[("retrieval", retrieval)] = retrieval_peer
        if kvstore:
            self._stats_peers[("kvstore", kvstore)] = Peer(kvstore, channel, kvstore_pb2_grpc.KVStoreStub, resolve)
        if draft:
            self._stats_peers[("draft", draft)] = Peer(draft, channel, draft_pb2_grpc.DraftStub, resolve)
        try:
            self.router.start()  # watch the workers' health from now on
        except RuntimeError:  # made outside an event loop: the router starts with the first request
            pass

    @property
    def disaggregated(self) -> bool:
        return bool(self.router.prefill)

    def healthy(self) -> bool:
        return not self.draining

    # -- Generate and Chat ----------------------------------------------------------------------
    @rpc
    async def Generate(self, request, context):
        params = self._grpc_params(request, context)  # bad values fail here, before any work
        deadline = Deadline.of(context)
        which = request.WhichOneof("prompt")
        if which is None:
            raise InvalidRequestError("the request has no prompt: set text or token_ids")
        rag = request.rag if request.HasField("rag") else None
        ids = check_token_ids("prompt", request.token_ids.ids) if which == "token_ids" else None
        check_policy(request.disaggregate)
        lora = await self.lora_of(request.model, deadline)
        admission = self.admit(params.n, "grpc", "generate")
        try:
            prompt, sources = await self.completion_prompt(request.text if which == "text" else None, ids, rag,
                                                           deadline)
        except BaseException:
            admission.release()
            raise
        async for response in self.generate(request.request_id, prompt, params, deadline, sources,
                                            api="grpc", endpoint="generate", admission=admission,
                                            disaggregate=request.disaggregate, lora=lora):
            yield response

    @rpc
    async def Chat(self, request, context):
        params = self._grpc_params(request, context)
        deadline = Deadline.of(context)
        messages = [common_pb2.ChatMessage(role=m.role, content=m.content) for m in request.messages]
        check_policy(request.disaggregate)
        lora = await self.lora_of(request.model, deadline)
        admission = self.admit(params.n, "grpc", "chat")
        try:
            prompt, sources = await self.chat_prompt(messages, request.rag if request.HasField("rag") else None,
                                                     deadline)
        except BaseException:
            admission.release()
            raise
        async for response in self.generate(request.request_id, prompt, params, deadline, sources,
                                            api="grpc", endpoint="chat", admission=admission,
                                            disaggregate=request.disaggregate, lora=lora):
            yield response

    def _grpc_params(self, request, context) -> SamplingParams:
        check_text("request_id", request.request_id, MAX_NAME_CHARS)
        check_text("model", request.model, MAX_NAME_CHARS)
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        return self.salted(SamplingParams.from_pb(request.sampling), authorization)

    # -- what both APIs (gRPC and the OpenAI-compatible HTTP) call -----------------------------
    def admit(self, num_samples: int, api: str, endpoint: str) -> Admission:
        """Take num_samples of the max_inflight samples, before any work is done for a request:
        UNAVAILABLE while draining, RESOURCE_EXHAUSTED when full."""
        try:
            if self.draining:
                raise Unavailable("the gateway is draining")
            if num_samples > self.max_inflight:
                raise InvalidRequestError(f"the request asks for {num_samples} samples; this gateway runs at most "
                                          f"{self.max_inflight} at once")
            if self.inflight + num_samples > self.max_inflight:
                self.counters["rejected"] += 1
                raise QueueFullError(f"the gateway is at its limit of {self.max_inflight} samples in flight")
        except Exception as exc:
            self.metrics.count(api, endpoint, status_of(exc)[0].name)
            raise
        self.inflight += num_samples
        return Admission(self, num_samples)

    def salted(self, params: SamplingParams, authorization: str | None) -> SamplingParams:
        """params with its caller's cache salt: with API keys, HMAC(the key of the caller's
        `authorization` header, the request's own salt), so a key's requests share cached prefixes
        only among themselves (and a request's own salt splits them further); without keys, the
        request's own salt as it is."""
        if not self.salt_per_key:
            return params
        api_key = bearer_key(authorization) or ""
        salt = hmac.new(api_key.encode(), (params.cache_salt or "").encode(), "sha256").hexdigest()
        return dataclasses.replace(params, cache_salt=salt)

    async def completion_prompt(self, text: str | None, ids: list[int] | None, rag, deadline: Deadline):
        """(prompt token ids, RAG sources) of a text or token-id prompt; rag: RagOptions or None."""
        sources = []
        check_rag(rag)
        if ids is not None:
            if rag is not None:
                raise InvalidRequestError("rag needs a text prompt (the question to retrieve for)")
            return ids, sources
        if not text:
            raise InvalidRequestError("the prompt is empty")
        check_text("prompt", text, MAX_PROMPT_CHARS)
        if rag is not None:
            sources = await self._retrieve(rag, text, deadline.remaining())
            text = rag_prompt(text, sources) + "\nAnswer:"
        return await self._tokenize(text, deadline.remaining()), sources

    async def chat_prompt(self, messages: list, rag, deadline: Deadline):
        """(prompt token ids, RAG sources) of chat messages (common_pb2.ChatMessage) through the
        model's chat template."""
        sources = []
        check_rag(rag)
        check_count("messages", messages, MAX_MESSAGES)
        for i, m in enumerate(messages):
            check_text(f"messages[{i}].role", m.role, MAX_ROLE_CHARS)
            check_text(f"messages[{i}].content", m.content, MAX_MESSAGE_CHARS)
        if rag is not None:
            if not messages or messages[-1].role != "user" or not messages[-1].content:
                raise InvalidRequestError("rag needs the last message to be the user's question")
            sources = await self._retrieve(rag, messages[-1].content, deadline.remaining())
            messages[-1].content = rag_prompt(messages[-1].content, sources)
        answer = await self.tokenizer.ApplyChatTemplate(tokenizer_pb2.ChatTemplateRequest(messages=messages),
                                                        timeout=deadline.remaining())
        return list(answer.token_ids), sources

    async def model_card(self, deadline: Deadline | None = None) -> gateway_pb2.ModelCard:
        """The served model, asked of a worker once (every HTTP request checks its `model` against it)."""
        if self._model_card is None:
            await self._worker_info(deadline)
        return self._model_card

    async def _worker_info(self, deadline: Deadline | None) -> prefill_pb2.WorkerInfo:
        """A serving worker's Info, now: the model card (kept) and the LoRA adapters it has."""
        deadline = deadline if deadline is not None and deadline.at is not None else Deadline(10.0)
        endpoint = await self.router.pick_decode(deadline.at)  # a serving one
        info = await endpoint.stub.Info(prefill_pb2.WorkerInfoRequest(), timeout=deadline.remaining())
        self._model_card = gateway_pb2.ModelCard(id=info.model, max_model_len=info.max_model_len)
        self._loras = (time.monotonic(), list(info.loras))
        return info

    async def loras(self, deadline: Deadline | None = None, fresh: bool = False) -> list[str]:
        """The LoRA adapters the workers serve: a worker's list, asked again after LORAS_TTL_S
        (another gateway may have loaded or unloaded one) or when fresh."""
        at, names = self._loras
        if fresh or time.monotonic() - at > LORAS_TTL_S:
            names = list((await self._worker_info(deadline)).loras)
        return names

    async def models(self, deadline: Deadline | None = None) -> list[gateway_pb2.ModelCard]:
        """The base model's card, then one per LoRA adapter (parent: the base)."""
        base = await self.model_card(deadline)
        return [base, *(gateway_pb2.ModelCard(id=name, max_model_len=base.max_model_len, parent=base.id)
                        for name in await self.loras(deadline))]

    async def lora_of(self, model: str, deadline: Deadline | None = None, aliases=()) -> str:
        """The LoRA adapter a request's `model` names: "" for none, the base model's id or an
        alias of it; ModelNotFoundError for a name that is neither the base nor an adapter."""
        if not model:
            return ""
        base = await self.model_card(deadline)
        if model == base.id or model in aliases or model in self.model_aliases:
            return ""
        if model in await self.loras(deadline) or model in await self.loras(deadline, fresh=True):
            return model
        raise ModelNotFoundError(f"The model `{model}` does not exist; this server serves `{base.id}`"
                                 + "".join(f", `{n}`" for n in self._loras[1]) + ".")

    async def load_lora(self, name: str, path: str, deadline: Deadline | None = None) -> None:
        """Load a LoRA adapter on every worker, or on none: a worker that refuses (a bad adapter,
        runtime loading off, a path outside runtime_lora_dir) or cannot be reached undoes the
        others' load, and its error is the answer."""
        check_text("lora_name", name, MAX_NAME_CHARS)
        check_text("lora_path", path, MAX_PATH_CHARS)
        if not name or not path:
            raise InvalidRequestError("lora_name and lora_path are required")
        base = await self.model_card(deadline)
        if name == base.id or name in self.model_aliases or name in await self.loras(deadline, fresh=True):
            raise InvalidRequestError(f"a model named {name!r} is served already; unload it first")
        workers = [*self.router.prefill, *self.router.decode]
        results = await _on_workers(workers, "Load", prefill_pb2.LoadAdapterRequest(name=name, path=path), deadline)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            loaded = [e for e, r in zip(workers, results) if not isinstance(r, BaseException)]
            await _on_workers(loaded, "Unload", prefill_pb2.UnloadAdapterRequest(name=name), Deadline(CONTROL_TIMEOUT_S))
            raise failed[0]
        self._loras = (time.monotonic(), list(results[0].names))
        self.runtime_loras[name] = path

    async def _restore_loras(self, endpoint: Endpoint) -> None:
        """A worker is back after being down (a restart comes back with lora_modules only): load
        the adapters this gateway loaded at run time into it before it is picked again."""
        stub = prefill_pb2_grpc.AdaptersStub(endpoint.channel)
        for name, path in list(self.runtime_loras.items()):
            try:
                await stub.Load(prefill_pb2.LoadAdapterRequest(name=name, path=path), timeout=LORA_LOAD_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if "loaded already" not in (exc.details() or ""):  # it did not restart after all
                    log.warning("could not give LoRA adapter %r back to %s: %s", name, endpoint.target, exc.details())

    async def unload_lora(self, name: str, deadline: Deadline | None = None) -> None:
        """Unload a LoRA adapter from every worker (NOT_FOUND where none has it; refused while a
        request runs with it)."""
        check_text("lora_name", name, MAX_NAME_CHARS)
        results = await _on_workers([*self.router.prefill, *self.router.decode], "Unload",
                                    prefill_pb2.UnloadAdapterRequest(name=name), deadline)
        answered = [r for r in results if not isinstance(r, BaseException)]
        failed = [r for r in results if isinstance(r, BaseException)]
        self._loras = (0.0, [])  # ask again
        refused = [r for r in failed if not (isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.NOT_FOUND)]
        if refused:  # in use, or unreachable: the others have let it go; say why this one did not
            raise refused[0]
        self.runtime_loras.pop(name, None)
        if not answered:  # NOT_FOUND everywhere (a worker that restarted lacks it: fine when others had it)
            raise failed[0]

    async def render_metrics(self) -> bytes:
        """Prometheus text: the gateway's instruments and every service's Stats, asked now."""
        self.metrics.inflight.set(self.inflight)
        peers = {(service, peer.target): peer for (service, _), peer in self._stats_peers.items()}
        await self.metrics.refresh({key: peer.stub for key, peer in peers.items()})
        silent = [peer for key, peer in peers.items() if self.metrics.services.snapshot.get(key) is None]
        await asyncio.gather(*(peer.relocate() for peer in silent))  # moved? the next scrape asks there
        return self.metrics.render()

    async def _retrieve(self, options, question: str, timeout: float | None) -> list:
        if self.retrieval is None:
            raise InvalidRequestError("this gateway has no retrieval service: rag is not available")
        request = retrieval_pb2.RetrieveRequest(query=question, k=options.k or DEFAULT_RAG_K,
                                                collection=options.collection)
        if options.HasField("hybrid"):
            request.hybrid = options.hybrid
        answer = await self.retrieval.Retrieve(request, timeout=timeout)
        return canonical(answer.chunks)

    async def _tokenize(self, text: str, timeout: float | None) -> list[int]:
        answer = await self.tokenizer.Tokenize(common_pb2.TokenizeRequest(text=text), timeout=timeout)
        return list(answer.token_ids)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams, deadline: Deadline,
                       sources=(), api: str = "grpc", endpoint: str = "generate", admission: Admission | None = None,
                       disaggregate: str = "", lora: str = ""):
        """Run one prompt: its GenerateResponses (deltas, then the finished one with usage and
        timings). admission: its params.n samples, admitted before the prompt was prepared (None:
        admit them here); given back when the run ends. disaggregate: the request's route policy
        ("" = the gateway's). lora: the LoRA adapter it runs with ("" = the base; lora_of checked
        the request's model). Counting and metrics happen here, for both APIs."""
        admission = admission or self.admit(params.n, api, endpoint)
        if not prompt:
            admission.release(params.n)
            self.metrics.count(api, endpoint, "INVALID_ARGUMENT")
            raise InvalidRequestError("the prompt is empty")
        request_id = request_id or f"gen-{uuid.uuid4().hex[:12]}-{next(_request_ids)}"
        # Downstream ids are unique whatever the client chose: two clients may pick the same id.
        internal_id = f"{request_id}/{uuid.uuid4().hex[:8]}"
        self.counters["requests"] += 1
        clock = _Clock(time.perf_counter())
        status = "CANCELLED"
        try:
            async for response in self._run(internal_id, prompt, params, deadline, clock, disaggregate, lora):
                response.request_id = request_id
                if response.finished:
                    response.sources.extend(sources)
                    u = response.usage
                    self.metrics.observe_finished(api, response.timings.ttft, clock.gaps(), response.timings.e2e,
                                                  u.prompt_tokens, u.completion_tokens, u.cached_tokens)
                    status = "OK"
                yield response
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["errors"] += 1
            status = status_of(exc)[0].name
            raise
        finally:
            admission.release(params.n)
            self.metrics.count(api, endpoint, status)

    async def _run(self, request_id: str, prompt: list[int], params: SamplingParams, deadline: Deadline,
                   clock: _Clock, disaggregate: str = "", lora: str = ""):
        sampling = with_seed(params).to_pb()
        progress, cached, prefill_s, kv_s = Progress(params.n), 0, 0.0, 0.0
        route = await self.disaggregation.route(prompt, disaggregate, sampling.cache_salt, deadline.at, lora)
        self.metrics.routed.labels(route.path, route.reason).inc()
        if route.disaggregated:
            answer = await self.migrator.prefill(
                prefill_pb2.PrefillRequest(request_id=request_id, prompt_ids=prompt, sampling=sampling, lora=lora),
                deadline.at,
                route.prefill, route.uncached)
            cached, prefill_s, kv_s = answer.num_cached_tokens, answer.prefill_seconds, answer.kv_transfer_seconds
            self.disaggregation.estimates.observe_prefill(len(prompt) - cached, prefill_s)
            for delta in answer.samples:
                progress.add(delta)
                clock.tick(delta)
                yield gateway_pb2.GenerateResponse(request_id=request_id, delta=delta)
            if progress.done:
                yield clock.final(request_id, len(prompt), cached, prefill_s, kv_s, route)
                return

        def decode_request(attempt: int) -> decode_pb2.DecodeRequest:  # a resumed try carries what was sent
            return decode_pb2.DecodeRequest(request_id=f"{request_id}~{attempt}" if attempt else request_id,
                                            prompt_ids=prompt, sampling=sampling, generated=progress.generated(),
                                            lora=lora)

        usage = None
        async for message in self.migrator.decode(decode_request, progress, deadline.at,
                                                  0 if route.disaggregated else route.uncached or len(prompt)):
            if message.HasField("delta"):
                clock.tick(message.delta)
                yield gateway_pb2.GenerateResponse(request_id=request_id, delta=message.delta)
            else:
                usage = message
        if not route.disaggregated:  # a resumed worker's count may include generated tokens: prompt only
            cached = min(usage.usage.cached_tokens, len(prompt)) if usage else 0
        elif usage is not None:
            self.disaggregation.estimates.observe_handoff(len(prompt), kv_s + usage.timings.kv_transfer)
        final = clock.final(request_id, len(prompt), cached, prefill_s,
                            kv_s + (usage.timings.kv_transfer if usage else 0), route)
        if usage is not None:
            final.usage.spec_proposed_tokens = usage.usage.spec_proposed_tokens
            final.usage.spec_accepted_tokens = usage.usage.spec_accepted_tokens
        yield final

    # -- the rest of the API --------------------------------------------------------------------
    @rpc
    async def Tokenize(self, request, context):
        return await self.tokenizer.Tokenize(request, timeout=context.time_remaining())

    @rpc
    async def Detokenize(self, request, context):
        return await self.tokenizer.Detokenize(request, timeout=context.time_remaining())

    @rpc
    async def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse(models=await self.models(Deadline.of(context)))

    def stats(self) -> common_pb2.ServiceStats:
        values = {**self.counters, "inflight": self.inflight}
        return common_pb2.ServiceStats(service="gateway", draining=self.draining,
                                       values={k: float(v) for k, v in values.items()})


async def _on_workers(workers: list[Endpoint], method: str, request, deadline: Deadline | None) -> list:
    """Each worker's answer to one Adapters call (or its exception), asked of all at once within the
    deadline (LORA_LOAD_TIMEOUT_S without one)."""
    deadline = deadline if deadline is not None and deadline.at is not None else Deadline(LORA_LOAD_TIMEOUT_S)
    return await asyncio.gather(*(getattr(prefill_pb2_grpc.AdaptersStub(e.channel), method)(
        request, timeout=deadline.remaining()) for e in workers), return_exceptions=True)


class _Clock:
    """Usage and timings as the client sees them, measured at the gateway."""

    def __init__(self, arrival: float):
        self.arrival, self.first, self.last = arrival, None, None
        self.times0: list[float] = []  # token arrival times of sample 0
        self.completion_tokens = 0

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times0, self.times0[1:])]

    def tick(self, delta: common_pb2.SampleDelta) -> None:
        now = time.perf_counter()
        self.completion_tokens += len(delta.token_ids)
        if delta.token_ids:
            self.first = self.first or now
            self.last = now
            if delta.index == 0:  # one time per token: a verified run of guesses arrives at once
                self.times0.extend([now] * len(delta.token_ids))

    def final(self, request_id: str, prompt_tokens: int, cached: int, prefill_s: float,
              kv_s: float, route: Route) -> gateway_pb2.GenerateResponse:
        gaps = self.gaps()
        end = self.last or time.perf_counter()
        return gateway_pb2.GenerateResponse(
            request_id=request_id, finished=True,
            usage=common_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=self.completion_tokens,
                                   cached_tokens=cached, disaggregated=route.disaggregated,
                                   route_reason=route.reason),
            timings=common_pb2.Timings(ttft=(self.first or end) - self.arrival, e2e=end - self.arrival,
                                       mean_itl=sum(gaps) / len(gaps) if gaps else 0.0, prefill=prefill_s,
                                       kv_transfer=kv_s))


def registration(servicer: GatewayServicer) -> Registration:
    return Registration(servicer, gateway_pb2_grpc.add_GatewayServicer_to_server,
                        gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name)
