"""The prefill and decode workers: the engine (tandem.LLM's, on an AsyncEngine thread) behind gRPC.

One process serves the role it is given: "prefill" (Prefill service), "decode" (Decode service)
or "both" (aggregated mode: the gateway sends whole requests to Decode). This module is only the
gRPC edge: protobuf in, `add_request`, protobuf out. The KV cache moves through the KV-cache store
by content hash, done by the engine's KV connector (tandem/engine/kv_connector.py):

    prefill: the prompt blocks the store has and the engine lacks are loaded -> the prompt runs
             (prefill_only) -> its full blocks are saved, pinned for the hand-off -> first tokens
    decode:  the prompt blocks it lacks are loaded (and their lease released) -> continue from the
             first tokens (a migrated request: every token sent so far, DecodeRequest.generated)

A block the store no longer has is simply computed again: the hash chain makes every cache hit
exact, never approximate.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import aclosing
from pathlib import Path

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.kv_connector import StoreConnector
from tandem.errors import InvalidRequestError
from tandem.kv_store import BlockSeal
from tandem.limits import MAX_NAME_CHARS, check_text
from tandem.llm import LLM
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

from .common import PermissionDenied, Registration, Unavailable, client_channel, rpc
from .config import PipelineConfig
from .metrics import rpc_tally, with_rpc_counts
from .routing import Resolve, resolve_now

log = logging.getLogger(__name__)
# When the engine loop dies the worker reports NOT_SERVING, then exits this much later: time for
# the health watchers (polled every HEALTH_POLL_S) to see it before the port closes.
FATAL_EXIT_DELAY_S = 1.0


class Worker:
    """The state both servicers share: the engine, counters, the drain flag."""

    def __init__(self, llm: LLM, config: PipelineConfig, role: str, kv_store: str | None,
                 resolve: Resolve | None = None, exit_on_fatal: bool = False):
        """kv_store: the KV-cache store's address, used by the prefill and decode roles (an
        aggregated worker, role "both", keeps to its own prefix cache: nothing saves to the store
        in that mode, so asking it would only cost a call); resolve: where a service that moved
        listens now (services.routing), for the store.
        exit_on_fatal: end the process when the engine loop dies, so its supervisor (Ray,
        Kubernetes) starts a fresh one; else the worker only reports NOT_SERVING (in-process tests)."""
        self.llm, self.config, self.role = llm, config, role
        self.rpc_tally = rpc_tally(self)
        self.exit_on_fatal = exit_on_fatal
        self.block_size = llm.engine.config.block_size
        self.namespace = config.kv_namespace(llm.model_path, self.block_size, llm.device.type)
        if kv_store and role != "both":
            credentials = config.internal_credentials()  # the token also keys the blocks' seal
            llm.engine.attach_connector(StoreConnector(
                kv_store, self.namespace, lambda target: client_channel(target, config.max_message_bytes,
                                                                        credentials or None),
                BlockSeal(credentials.token), relocate=lambda: resolve_now(resolve, kv_store)))
        self.engine = AsyncEngine(llm.engine, on_fatal=self._engine_died)
        self.draining = False
        self.counters = {"requests": 0}

    @classmethod
    def build(cls, config: PipelineConfig, role: str, kv_store: str | None, resolve: Resolve | None = None,
              exit_on_fatal: bool = False) -> Worker:
        return cls(LLM(**config.llm_kwargs()), config, role, kv_store, resolve, exit_on_fatal)

    def _engine_died(self, exc: BaseException) -> None:
        """AsyncEngine's on_fatal (on the engine thread): NOT_SERVING from now on (healthy() is
        False: the engine is not alive), and with exit_on_fatal the process ends soon after."""
        self.draining = True
        if self.exit_on_fatal:
            log.critical("the engine loop died (%s): exiting in %.1f s for a restart", exc, FATAL_EXIT_DELAY_S)
            threading.Timer(FATAL_EXIT_DELAY_S, os._exit, (70,)).start()  # EX_SOFTWARE

    def healthy(self) -> bool:
        return self.engine.is_alive and not self.draining

    def admit(self) -> None:
        if self.draining:
            raise Unavailable(f"the {self.role} worker is draining")
        if not self.engine.is_alive:
            raise Unavailable(f"the {self.role} worker's engine is not running")
        self.counters["requests"] += 1

    def stats(self) -> common_pb2.ServiceStats:
        values = with_rpc_counts(self, {**self.engine.stats(), **self.counters, "pid": os.getpid()})
        return common_pb2.ServiceStats(service=self.role, draining=self.draining, values=values)

    def info(self) -> prefill_pb2.WorkerInfo:
        return prefill_pb2.WorkerInfo(model=self.llm.model_path.stem, role=self.role, block_size=self.block_size,
                                      max_model_len=self.llm.max_model_len, kv_namespace=self.namespace,
                                      loras=self.llm.loras)

    def adapter_path(self, path: str) -> Path:
        """A runtime adapter's directory, refused unless it lies inside the pipeline's
        runtime_lora_dir (a request chooses among what the operator put there, nothing else)."""
        if not self.config.runtime_lora_dir:
            raise PermissionDenied("loading LoRA adapters at run time is off: the operator enables it with "
                                   "runtime_lora_dir (--runtime-lora-dir)")
        root = Path(self.config.runtime_lora_dir).expanduser().resolve()
        resolved = (root / path).resolve()  # an absolute path stays itself; a relative one is under root
        if not resolved.is_relative_to(root):
            raise InvalidRequestError(f"the adapter path {path!r} is outside the runtime_lora_dir")
        return resolved

    async def close(self) -> None:
        self.draining = True
        self.engine.shutdown()
        if self.llm.engine.connector is not None:
            self.llm.engine.connector.close()
        if self.engine.stopped:  # the engine thread is done with the model: a split one's ranks stop
            self.llm.close()


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: Worker):
        self.worker = worker
        self._rpc_tally = worker.rpc_tally  # one count for the worker's two servicers

    @rpc
    async def Prefill(self, request, context):
        w = self.worker
        w.admit()
        params = SamplingParams.from_pb(request.sampling)
        prompt = list(request.prompt_ids)
        start = time.perf_counter()
        stream = await w.engine.add_request(request.request_id or f"prefill-{id(request)}", prompt, params,
                                            prefill_only=True, lora=request.lora or None)
        firsts: dict[int, common_pb2.SampleDelta] = {}
        output = None
        async with aclosing(stream):
            async for item in _unless_engine_died(stream, w.engine):
                if isinstance(item, RequestOutput):
                    output = item
                elif item.index not in firsts:
                    firsts[item.index] = item.to_pb(w.llm.tokenizer)
        return prefill_pb2.PrefillResponse(
            samples=[firsts[i] for i in sorted(firsts)], num_cached_tokens=output.metrics.num_cached_tokens,
            # the request waited for its loads and its save, one after the other: not prefill time
            prefill_seconds=time.perf_counter() - start - output.metrics.kv_transfer_s,
            kv_transfer_seconds=output.metrics.kv_transfer_s)

    @rpc
    async def CachedPrefix(self, request, context):
        w = self.worker
        tokens = await w.engine.run(w.llm.engine.num_cached_tokens, list(request.prompt_ids), request.cache_salt or None,
                                    request.lora or None)
        return prefill_pb2.CachedPrefixResponse(num_cached_tokens=tokens)

    @rpc
    async def Info(self, request, context):
        return self.worker.info()

    @rpc
    async def Stats(self, request, context):
        return self.worker.stats()


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, worker: Worker):
        self.worker = worker
        self._rpc_tally = worker.rpc_tally

    @rpc
    async def Decode(self, request, context):
        w = self.worker
        w.admit()
        params = SamplingParams.from_pb(request.sampling)
        prompt = list(request.prompt_ids)
        generated = [list(g.token_ids) for g in request.generated] or [[t] for t in request.first_token_ids]
        options = {"generated": generated} if generated else {}
        if request.lora:
            options["lora"] = request.lora
        stream = await w.engine.add_request(request.request_id or f"decode-{id(request)}", prompt, params, **options)
        async with aclosing(stream):  # leaving early (the caller cancelled) aborts and frees the blocks
            async for item in _unless_engine_died(stream, w.engine):
                if isinstance(item, RequestOutput):
                    m = item.metrics
                    completion = sum(len(o.token_ids) for o in item.outputs)
                    yield decode_pb2.DecodeResponse(
                        usage=common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=completion,
                                               cached_tokens=m.num_cached_tokens if m else 0,
                                               spec_proposed_tokens=m.spec_proposed if m else 0,
                                               spec_accepted_tokens=m.spec_accepted if m else 0),
                        timings=common_pb2.Timings(ttft=m.ttft or 0.0, e2e=m.e2e_latency or 0.0,
                                                   mean_itl=m.mean_itl if m else 0.0,
                                                   kv_transfer=m.kv_transfer_s if m else 0.0))
                else:
                    yield decode_pb2.DecodeResponse(delta=item.to_pb(w.llm.tokenizer))

    @rpc
    async def Info(self, request, context):
        return self.worker.info()

    @rpc
    async def Stats(self, request, context):
        return self.worker.stats()


class AdaptersServicer(prefill_pb2_grpc.AdaptersServicer):
    """Runtime LoRA loading (the gateway asks every worker). The engine thread does it, between
    steps: the registry and the model's slots are engine state."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._rpc_tally = worker.rpc_tally

    @rpc
    async def Load(self, request, context):
        w = self.worker
        check_text("name", request.name, MAX_NAME_CHARS)
        path = w.adapter_path(request.path)
        adapter = await asyncio.to_thread(w.llm.read_lora, request.name, str(path))  # the file off the engine thread
        await w.engine.run(w.llm.add_lora, adapter)
        log.info("loaded LoRA adapter %r from %s", request.name, path)
        return prefill_pb2.AdapterList(names=w.llm.loras)

    @rpc
    async def Unload(self, request, context):
        w = self.worker
        w.adapter_path(".")  # the same switch as loading
        await w.engine.run(w.llm.unload_lora, request.name)
        log.info("unloaded LoRA adapter %r", request.name)
        return prefill_pb2.AdapterList(names=w.llm.loras)


async def _unless_engine_died(stream, engine: AsyncEngine):
    """The stream's items; if the engine dies under it, UNAVAILABLE (the gateway moves the request
    elsewhere) rather than the engine's error (INTERNAL: the request's own fault)."""
    try:
        async for item in stream:
            yield item
    except RuntimeError:
        if engine.fatal_error is None:
            raise
        raise Unavailable(f"the worker's engine died: {engine.fatal_error}") from None


def registrations(worker: Worker) -> list[Registration]:
    """The servicers of the worker's role."""
    regs = []
    if worker.role in ("prefill", "both"):
        regs.append(Registration(PrefillServicer(worker), prefill_pb2_grpc.add_PrefillServicer_to_server,
                                 prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name))
    if worker.role in ("decode", "both"):
        regs.append(Registration(DecodeServicer(worker), decode_pb2_grpc.add_DecodeServicer_to_server,
                                 decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name))
    regs.append(Registration(AdaptersServicer(worker), prefill_pb2_grpc.add_AdaptersServicer_to_server,
                             prefill_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name))
    return regs
