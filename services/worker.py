"""The prefill and decode workers: the engine (tandem.LLM's, on an AsyncEngine thread) behind gRPC.

One process serves the role it is given: "prefill" (Prefill service), "decode" (Decode service)
or "both" (aggregated mode: the gateway sends whole requests to Decode). The KV cache moves through
the KV-cache store by content hash:

    prefill: fetch the prompt blocks the store has and the worker lacks -> run the prompt
             (prefill_only) -> publish the blocks the store lacks -> first tokens + block hashes
    decode:  fetch the listed blocks it lacks -> continue from the first tokens (a migrated request:
             every token sent so far, DecodeRequest.generated) -> stream

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

import grpc

from tandem.engine.async_engine import AsyncEngine
from tandem.engine.block_manager import block_hash, chain_root
from tandem.kv_store import BlockSeal
from tandem.llm import LLM
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

from .common import Registration, Unavailable, client_channel, rpc
from .config import PipelineConfig
from .convert import delta_message, mean_itl, token_ids
from .kvstore import KVStoreClient
from .metrics import rpc_tally, with_rpc_counts
from .routing import Resolve, resolve_now

log = logging.getLogger(__name__)
# A KV-store exchange that takes longer fails (the prompt is computed instead). Loopback moves a
# 1,000-token prompt of the default model (46 KB of float32 KV per token) in well under a second.
KV_STORE_TIMEOUT_S = 10.0
# After a failed exchange the store is left alone for a while, doubling up to the cap while it
# keeps failing: a stopped store costs a request KV_STORE_TIMEOUT_S at most, and only now and then.
KV_STORE_REST_S, KV_STORE_MAX_REST_S = 5.0, 60.0
# When the engine loop dies the worker reports NOT_SERVING, then exits this much later: time for
# the health watchers (polled every HEALTH_POLL_S) to see it before the port closes.
FATAL_EXIT_DELAY_S = 1.0


def prompt_hashes(prompt: list[int], block_size: int, num_blocks: int | None = None,
                  cache_salt: str | None = None) -> list[bytes]:
    """The content-hash chain of a prompt's full blocks (the first num_blocks of them), rooted in
    the request's cache salt as the engine's own chain is."""
    hashes, parent = [], chain_root(cache_salt)
    count = len(prompt) // block_size if num_blocks is None else num_blocks
    for i in range(count):
        parent = block_hash(parent, prompt[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


class Worker:
    """The state both servicers share: the engine, the store client, counters, the drain flag."""

    def __init__(self, llm: LLM, config: PipelineConfig, role: str, kv_store: str | None,
                 resolve: Resolve | None = None, exit_on_fatal: bool = False):
        """resolve: where a service that moved listens now (services.routing), for the KV store.
        exit_on_fatal: end the process when the engine loop dies, so its supervisor (Ray,
        Kubernetes) starts a fresh one; else the worker only reports NOT_SERVING (in-process tests)."""
        self.llm, self.config, self.role, self.resolve = llm, config, role, resolve
        self.rpc_tally = rpc_tally(self)
        self.exit_on_fatal = exit_on_fatal
        self.engine = AsyncEngine(llm.engine, on_fatal=self._engine_died)
        self.block_size = llm.engine.config.block_size
        self.namespace = config.kv_namespace(llm.model_path, self.block_size, llm.device.type)
        self.kv_store_target = self.kv_store_origin = kv_store
        self._store_failures, self._store_rests_until = 0, 0.0
        self._store: KVStoreClient | None = None
        self.draining = False
        self.counters = {"kv_blocks_fetched": 0, "kv_blocks_published": 0, "kv_bytes_fetched": 0,
                         "kv_bytes_published": 0, "kv_transfer_seconds": 0.0, "kv_store_errors": 0, "requests": 0}

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

    @property
    def store(self) -> KVStoreClient | None:
        if self._store is None and self.kv_store_target:
            credentials = self.config.internal_credentials()  # the token also keys the blocks' seal
            self._store = KVStoreClient(client_channel(self.kv_store_target, self.config.max_message_bytes,
                                                       credentials or None), seal=BlockSeal(credentials.token))
        return self._store

    def healthy(self) -> bool:
        return self.engine.is_alive and not self.draining

    def admit(self) -> None:
        if self.draining:
            raise Unavailable(f"the {self.role} worker is draining")
        if not self.engine.is_alive:
            raise Unavailable(f"the {self.role} worker's engine is not running")
        self.counters["requests"] += 1

    def stats(self) -> common_pb2.ServiceStats:
        rejected = self._store.num_rejected if self._store else 0  # blocks that failed their digest check
        values = with_rpc_counts(self, {**self.engine.stats(), **self.counters, "kv_blocks_rejected": rejected,
                                        "pid": os.getpid()})
        return common_pb2.ServiceStats(service=self.role, draining=self.draining, values=values)

    def info(self) -> prefill_pb2.WorkerInfo:
        return prefill_pb2.WorkerInfo(model=self.llm.model_path.stem, role=self.role, block_size=self.block_size,
                                      max_model_len=self.llm.max_model_len, kv_namespace=self.namespace)

    # -- KV through the store -------------------------------------------------------------------
    def _store_resting(self) -> bool:
        return time.monotonic() < self._store_rests_until

    async def _through_store(self, work, failure: str) -> float:
        """Run a KV-store exchange, within KV_STORE_TIMEOUT_S, and time it. A store that fails or
        hangs costs recomputation (`failure` says what), never the request; it is then left alone
        for a while and looked up again (it may have restarted elsewhere)."""
        start = time.perf_counter()
        try:
            await asyncio.wait_for(work, KV_STORE_TIMEOUT_S)
            self._store_failures = 0
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
            self.counters["kv_store_errors"] += 1
            self._store_failures += 1
            rest = min(KV_STORE_MAX_REST_S, KV_STORE_REST_S * 2 ** (self._store_failures - 1))
            self._store_rests_until = time.monotonic() + rest
            details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "no answer in time"
            log.warning("KV store failed, %s for %.0f s: %s", failure, rest, details)
            await self._relocate_store()
        elapsed = time.perf_counter() - start
        self.counters["kv_transfer_seconds"] += elapsed
        return elapsed

    async def fetch(self, hashes: list[bytes]) -> float:
        """Import the leading blocks of `hashes` this engine lacks and the store has. Returns the
        seconds it took (0 without a store)."""
        if self.store is None or not hashes or self._store_resting():
            return 0.0
        return await self._through_store(self._fetch(self.store, hashes), "computing prompts instead")

    async def _fetch(self, store: KVStoreClient, hashes: list[bytes]) -> None:
        local = await self.engine.run(self.llm.engine.cached_prefix, hashes)
        if local < len(hashes):
            wanted = hashes[local:]
            blocks = await store.get_blocks(self.namespace, wanted)
            got = []
            for h in wanted:  # only a contiguous run extends the prefix
                if h not in blocks:
                    break
                got.append(h)
            if got:
                await self.engine.run(self.llm.engine.import_blocks, got, [blocks[h] for h in got])
                self.counters["kv_blocks_fetched"] += len(got)
                self.counters["kv_bytes_fetched"] += sum(t.nbytes for h in got for t in blocks[h])

    async def publish(self, output: RequestOutput) -> float:
        """Make sure the store holds every full block of the prompt: the ones computed here, and
        cached ones it has lost since (else the decode side recomputes them)."""
        kv = output.kv
        if self.store is None or kv is None or not kv.block_hashes or self._store_resting():
            return 0.0
        return await self._through_store(self._publish(self.store, kv), "publishing no blocks")

    async def _relocate_store(self) -> None:
        """Where the store listens now: a restarted store may have come back on another port."""
        target = await resolve_now(self.resolve, self.kv_store_origin)
        if target and target != self.kv_store_target:
            log.info("the KV store moved: %s -> %s", self.kv_store_target, target)
            self.kv_store_target, self._store = target, None  # the next exchange connects there

    async def _publish(self, store: KVStoreClient, kv) -> None:
        blocks = list(zip(kv.new_hashes, kv.new_blocks))
        if blocks:
            await store.put_blocks(self.namespace, blocks)
        present = await store.lookup(self.namespace, kv.block_hashes)
        if present < len(kv.block_hashes):  # evicted from the store since: send our copies again
            missing = [h for h in kv.block_hashes[present:] if h not in set(kv.new_hashes)]
            again = await self.engine.run(self.llm.engine.export_cached, missing)
            if again:
                await store.put_blocks(self.namespace, again)
                blocks += again
        self.counters["kv_blocks_published"] += len(blocks)
        self.counters["kv_bytes_published"] += sum(t.nbytes for _, ts in blocks for t in ts)

    async def close(self) -> None:
        self.draining = True
        self.engine.shutdown()


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, worker: Worker):
        self.worker = worker
        self._rpc_tally = worker.rpc_tally  # one count for the worker's two servicers

    @rpc
    async def Prefill(self, request, context):
        w = self.worker
        w.admit()
        params = SamplingParams.from_pb(request.sampling)
        prompt = token_ids(request.prompt_ids)
        start = time.perf_counter()
        fetch_s = await w.fetch(prompt_hashes(prompt, w.block_size, (len(prompt) - 1) // w.block_size,
                                              params.cache_salt))
        stream = await w.engine.add_request(request.request_id or f"prefill-{id(request)}", prompt, params,
                                            prefill_only=True)
        firsts: dict[int, common_pb2.SampleDelta] = {}
        output = None
        async with aclosing(stream):
            async for item in _unless_engine_died(stream, w.engine):
                if isinstance(item, RequestOutput):
                    output = item
                elif item.index not in firsts:
                    firsts[item.index] = delta_message(item, w.llm.tokenizer)
        prefill_s = time.perf_counter() - start
        publish_s = await w.publish(output)
        return prefill_pb2.PrefillResponse(
            samples=[firsts[i] for i in sorted(firsts)], block_hashes=output.kv.block_hashes if output.kv else [],
            num_cached_tokens=output.metrics.num_cached_tokens, prefill_seconds=prefill_s,
            kv_transfer_seconds=fetch_s + publish_s)

    @rpc
    async def CachedPrefix(self, request, context):
        w = self.worker
        prompt = token_ids(request.prompt_ids)
        blocks = await w.engine.run(w.llm.engine.cached_prefix,
                                    prompt_hashes(prompt, w.block_size, cache_salt=request.cache_salt))
        return prefill_pb2.CachedPrefixResponse(num_cached_tokens=blocks * w.block_size)

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
        prompt = token_ids(request.prompt_ids)
        generated = ([token_ids(g.token_ids) for g in request.generated]
                     or [[t] for t in token_ids(request.first_token_ids)])
        fetch_s = await w.fetch(list(request.block_hashes)) if generated else 0.0
        options = {"generated": generated} if generated else {}
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
                                                   mean_itl=mean_itl(m), kv_transfer=fetch_s))
                else:
                    yield decode_pb2.DecodeResponse(delta=delta_message(item, w.llm.tokenizer))

    @rpc
    async def Info(self, request, context):
        return self.worker.info()

    @rpc
    async def Stats(self, request, context):
        return self.worker.stats()


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
    return regs
