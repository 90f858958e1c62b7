"""The KV connector: how an engine shares KV blocks with an external store (vLLM v1's KVConnector
idea, kept to what tandem needs). The engine owns it and talks to it from its own thread only;
the transfers run elsewhere and never block a step:

    admission   the engine computes a sequence's hash chain once (Sequence.hash_chain) and asks
                its own prefix cache first; for the leading blocks it lacks it calls load(): the
                request waits aside while the other requests keep stepping
    between     poll() returns finished transfers: loaded blocks go into the prefix cache under
    steps       their hashes (an exact hit for the request, which then joins the queue), saved
                ones let a prefill_only request report its output
    prefill end save() sends the prompt's full blocks the store may lack and pins the whole chain
                for the hand-off; the decode worker's load(release=True) takes that pin off

A transfer that fails costs recomputation, never the request: its blocks are simply computed.

`StoreConnector` is the client of the KV-cache store service (tandem.v1.KVStore, gRPC) with its
own I/O thread; `LocalStoreConnector` shares a tandem.kv_store.KVBlockStore in this process
(library mode, tests). Blocks are sealed with the deployment's BlockSeal: the store sees keyed
names, and every block fetched is checked against its digest before the engine imports it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tandem.errors import ConfigError
from tandem.kv_store import (DEFAULT_CHUNK_BYTES, BlockSeal, ChunkAssembler, KVBlockStore, tensors_from_bytes,
                             tensors_to_bytes, to_chunks)

if TYPE_CHECKING:
    from tandem.engine.llm_engine import LLMEngine
    from tandem.engine.sequence import Request

log = logging.getLogger(__name__)
Blocks = list[tuple[bytes, list[torch.Tensor]]]  # (content hash, the block's tensors: ModelRunner.export_blocks)
# A store exchange that takes longer fails (the prompt is computed instead). Loopback moves a
# 1,000-token prompt of the default model (46 KB of float32 KV per token) in well under a second.
TRANSFER_TIMEOUT_S = 10.0
# After a failed exchange the store is left alone for a while, doubling up to the cap while it
# keeps failing: a stopped store costs a request TRANSFER_TIMEOUT_S at most, and only now and then.
REST_S, MAX_REST_S = 5.0, 60.0
HANDOFF_LEASE_S = 60.0  # how long saved prompt blocks stay pinned for the decode worker to fetch


@dataclass
class Loaded:
    """A finished load: the leading run of the asked hashes the store held, with their tensors."""

    request_id: str
    blocks: Blocks
    seconds: float


@dataclass
class Saved:
    """A finished save. missing: hashes of the chain to pin that the store did not hold (the
    engine sends those again from its cache, once)."""

    request_id: str
    missing: list[bytes]
    seconds: float


@dataclass
class _Counters:
    values: dict = field(default_factory=lambda: {
        "kv_blocks_fetched": 0, "kv_blocks_published": 0, "kv_bytes_fetched": 0, "kv_bytes_published": 0,
        "kv_transfer_seconds": 0.0, "kv_store_errors": 0, "kv_blocks_rejected": 0})

    def add(self, **amounts) -> None:
        for name, amount in amounts.items():
            self.values[name] += amount


class KVConnector:
    """The base class: what the engine asks of a connector. Every method is called on the engine's
    thread; load and save return at once and their results come back through poll()."""

    def __init__(self) -> None:
        self.notify: Callable[[], object] | None = None  # set by the engine's driver: an event is ready
        self._events: list[Loaded | Saved] = []
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.counters = _Counters()

    def load(self, request_id: str, hashes: list[bytes], release: bool = False) -> bool:
        """Fetch the leading run of `hashes` the store holds; release: also end the hand-off lease
        on them (the decode side). False: nothing was started (no Loaded event will come)."""
        raise NotImplementedError

    def save(self, request_id: str, blocks: Blocks, pin: list[bytes]) -> bool:
        """Store `blocks` and pin every hash of `pin` (the prompt's chain) for the hand-off.
        False: nothing was started (no Saved event will come)."""
        raise NotImplementedError

    @property
    def has_events(self) -> bool:
        """Whether poll() has something (a racy read: poll is what counts)."""
        return bool(self._events)

    def poll(self) -> list[Loaded | Saved]:
        """The transfers finished since the last poll."""
        with self._lock:
            events, self._events = self._events, []
            return events

    def wait(self, timeout: float) -> None:
        """Block until a transfer finishes or timeout passes (library mode: nothing else to run)."""
        with self._ready:
            if not self._events:
                self._ready.wait(timeout)

    def stats(self) -> dict:
        return dict(self.counters.values)

    def close(self) -> None:
        pass

    # -- for implementations ------------------------------------------------------------------
    def _finish(self, event: Loaded | Saved) -> None:
        """Hand a finished transfer to the engine (from any thread)."""
        with self._ready:
            self._events.append(event)
            self._ready.notify_all()
        self.counters.add(kv_transfer_seconds=event.seconds)
        if self.notify is not None:
            self.notify()

    def _fetched(self, blocks: dict[bytes, list[torch.Tensor]], hashes: list[bytes]) -> Blocks:
        """The leading run of hashes found in blocks (only a contiguous run extends a prefix)."""
        run = []
        for h in hashes:
            if h not in blocks:
                break
            run.append((h, blocks[h]))
        self.counters.add(kv_blocks_fetched=len(run), kv_bytes_fetched=sum(t.nbytes for _, ts in run for t in ts))
        return run

    def _published(self, blocks: Blocks) -> None:
        self.counters.add(kv_blocks_published=len(blocks),
                          kv_bytes_published=sum(t.nbytes for _, ts in blocks for t in ts))


class KVTransfer:
    """The engine's side of its connector (on the engine thread): which requests wait for their
    prompt blocks (loading) and which finished prefill_only requests wait for their save (saving)."""

    def __init__(self, engine: LLMEngine, connector: KVConnector):
        self.engine, self.connector = engine, connector
        self.loading: dict[str, Request] = {}
        self.saving: dict[str, Request] = {}

    @property
    def pending(self) -> bool:
        return bool(self.loading or self.saving)

    def load(self, request: Request) -> bool:
        """Ask for the leading prompt blocks the engine's prefix cache lacks (the last prompt token
        is always computed; a resumed request ends the hand-off's lease). True: the request waits
        aside until they are in."""
        bm, size = self.engine.block_manager, self.engine.config.block_size
        if not bm.enable_prefix_caching:
            return False
        usable = min(len(request.prompt_ids), min(s.num_tokens for s in request.seqs) - 1) // size
        chain = bm.chain(request.seqs[0], usable)
        request.num_local_blocks = bm.num_cached_prefix(chain)
        if request.num_local_blocks == usable or not self.connector.load(
                request.request_id, chain[request.num_local_blocks:], release=request.resumed):
            return False
        self.loading[request.request_id] = request
        return True

    def save(self, request: Request) -> bool:
        """Send the prompt's full blocks the store may lack (those not loaded from it) and pin the
        whole chain for the hand-off. True: the request reports its output once that is done."""
        bm, size = self.engine.block_manager, self.engine.config.block_size
        if not bm.enable_prefix_caching:
            return False
        chain = bm.chain(request.seqs[0], len(request.prompt_ids) // size)
        known = request.num_local_blocks + request.num_loaded_blocks  # [local, known) came from the store
        if not self.connector.save(request.request_id, self.engine.export_cached(chain[known:]), chain):
            return False
        request.saving = True
        self.saving[request.request_id] = request
        return True

    def forget(self, request_id: str) -> Request | None:
        """An aborted request: its transfers' answers will be ignored. Returns it if it was saving."""
        self.loading.pop(request_id, None)
        return self.saving.pop(request_id, None)

    def receive(self) -> tuple[list[Request], list[Request]]:
        """The finished transfers: (requests whose blocks are now in the prefix cache, to queue;
        requests whose prompt is saved, to finish). Blocks the store had lost since they were saved
        are sent again from the cache, once per request."""
        loaded, saved = [], []
        for event in self.connector.poll():
            if isinstance(event, Loaded):
                request = self.loading.pop(event.request_id, None)
                if request is None:  # aborted meanwhile
                    continue
                request.metrics.kv_transfer_s += event.seconds
                try:
                    self.engine.import_blocks([h for h, _ in event.blocks], [b for _, b in event.blocks])
                    request.num_loaded_blocks = len(event.blocks)
                except ValueError as exc:  # blocks of another layout: computed instead
                    log.warning("KV blocks from the store do not fit this pool: %s", exc)
                loaded.append(request)
                continue
            request = self.saving.get(event.request_id)
            if request is None:
                continue
            request.metrics.kv_transfer_s += event.seconds
            if event.missing and not request.resaved:
                request.resaved = True
                if self.connector.save(request.request_id, self.engine.export_cached(event.missing), event.missing):
                    continue
            del self.saving[event.request_id]
            request.saving = False
            saved.append(request)
        return loaded, saved

    def stats(self) -> dict:
        return {"kv_loading_requests": len(self.loading), **self.connector.stats()}


class LocalStoreConnector(KVConnector):
    """A KVBlockStore in this process (shared by several engines): transfers finish at once."""

    def __init__(self, store: KVBlockStore, namespace: str, seal: BlockSeal | None = None,
                 lease_s: float = HANDOFF_LEASE_S):
        super().__init__()
        self.store, self.namespace, self.seal, self.lease_s = store, namespace, seal or BlockSeal(), lease_s

    def load(self, request_id: str, hashes: list[bytes], release: bool = False) -> bool:
        start, found = time.perf_counter(), {}
        for h in hashes:
            key = self.seal.key(h)
            block = self.store.get(self.namespace, key)
            if block is None:
                break
            if release:
                self.store.unpin(self.namespace, [key])
            if not self.seal.verify(self.namespace, h, block.specs, block.data, block.digest):
                self.counters.add(kv_blocks_rejected=1)
                break
            found[h] = tensors_from_bytes(block.specs, block.data)
        self._finish(Loaded(request_id, self._fetched(found, hashes), time.perf_counter() - start))
        return True

    def save(self, request_id: str, blocks: Blocks, pin: list[bytes]) -> bool:
        start = time.perf_counter()
        for h, tensors in blocks:
            specs, data = tensors_to_bytes(tensors)
            self.store.put(self.namespace, self.seal.key(h), specs, data, self.seal.digest(self.namespace, h, specs, data))
        self._published(blocks)
        by_key = {self.seal.key(h): h for h in pin}
        missing = self.store.pin_present(self.namespace, list(by_key), self.lease_s)
        self._finish(Saved(request_id, [by_key[k] for k in missing], time.perf_counter() - start))
        return True


class KVStoreClient:
    """The KV-cache store service seen from a worker, on an asyncio loop: blocks as lists of
    tensors, keyed by hash within a namespace (one per model and KV layout, so incompatible blocks
    never meet), sealed with `seal` (the deployment's BlockSeal: every worker of a pipeline must
    use the same one)."""

    def __init__(self, channel, chunk_bytes: int = DEFAULT_CHUNK_BYTES, seal: BlockSeal | None = None):
        from tandem.v1 import kvstore_pb2_grpc

        if chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.channel, self.stub = channel, kvstore_pb2_grpc.KVStoreStub(channel)
        self.chunk_bytes = chunk_bytes
        self.seal = seal or BlockSeal()
        self.num_rejected = 0  # blocks the store returned that failed their digest check

    def _keys(self, hashes: list[bytes]) -> list[bytes]:
        return [self.seal.key(h) for h in hashes]

    async def lookup(self, namespace: str, hashes: list[bytes]) -> int:
        from tandem.v1 import kvstore_pb2

        response = await self.stub.Lookup(kvstore_pb2.LookupRequest(namespace=namespace, hashes=self._keys(hashes)))
        return response.num_present

    async def put_blocks(self, namespace: str, blocks: Blocks, pin: list[bytes] = (),
                         lease_s: float = 0.0):
        """Publish blocks in one stream (each block's tensors as their bytes, one after the other),
        then pin `pin` for lease_s (0: the store's default). Returns the PutResponse; its
        `missing` holds the keys (seal.key) of the pins the store did not hold."""
        from tandem.v1 import kvstore_pb2

        async def chunks() -> AsyncIterator:
            for h, tensors in blocks:
                specs, data = tensors_to_bytes(tensors)
                digest = self.seal.digest(namespace, h, specs, data)
                for chunk in to_chunks(namespace, self.seal.key(h), specs, data, self.chunk_bytes, digest):
                    yield chunk
            if pin:
                yield kvstore_pb2.KVChunk(namespace=namespace, pin=self._keys(list(pin)), lease_seconds=lease_s)
        return await self.stub.Put(chunks())

    async def pin(self, namespace: str, hashes: list[bytes], lease_s: float = 0.0) -> int:
        """Pin the present blocks for lease_s (0: the store's default; a Put that sends no block).
        Returns how many were present."""
        response = await self.put_blocks(namespace, [], hashes, lease_s)
        return len(hashes) - len(response.missing)

    async def get_blocks(self, namespace: str, hashes: list[bytes],
                         release: bool = False) -> dict[bytes, list[torch.Tensor]]:
        """The present blocks among hashes whose digest checks out, as tensors (on the CPU);
        missing and rejected ones are absent. release: take one pin off each block sent."""
        from tandem.v1 import kvstore_pb2

        by_key = dict(zip(self._keys(hashes), hashes))
        request = kvstore_pb2.GetRequest(namespace=namespace, hashes=list(by_key), chunk_bytes=self.chunk_bytes,
                                         release=release)
        assembler, blocks = ChunkAssembler(), {}
        async for chunk in self.stub.Get(request):
            block = assembler.feed(chunk)
            if block is None:
                continue
            h = by_key.get(block.hash)
            if h is None or not self.seal.verify(namespace, h, block.specs, block.data, block.digest):
                self.num_rejected += 1
                log.warning("KV store: block %s failed its digest check; dropped (forged or corrupted)",
                            block.hash.hex()[:16])
                continue
            blocks[h] = tensors_from_bytes(block.specs, block.data)
        assembler.close()
        return blocks

    async def stats(self) -> dict[str, float]:
        from tandem.v1 import common_pb2

        return dict((await self.stub.Stats(common_pb2.StatsRequest())).values)


class StoreConnector(KVConnector):
    """The KV-cache store service over gRPC, on an I/O thread of its own ("tandem-kv", one asyncio
    loop), so transfers overlap the engine's steps and the worker's RPCs.

    channel(target) -> a grpc.aio channel with the pipeline's credentials (called on the I/O
    thread); relocate() -> where the store listens now, or None (a restarted store may come back
    elsewhere), awaited after a failed exchange."""

    def __init__(self, target: str, namespace: str, channel: Callable[[str], object], seal: BlockSeal,
                 relocate: Callable[[], Awaitable[str | None]] | None = None, lease_s: float = HANDOFF_LEASE_S,
                 timeout_s: float = TRANSFER_TIMEOUT_S):
        super().__init__()
        self.target, self.namespace, self.seal, self.lease_s = target, namespace, seal, lease_s
        self._channel, self._relocate, self.timeout_s = channel, relocate, timeout_s
        self._client: KVStoreClient | None = None
        self._failures, self._rests_until = 0, 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tandem-kv", daemon=True)
        self._thread.start()

    @property
    def client(self) -> KVStoreClient:
        if self._client is None:
            self._client = KVStoreClient(self._channel(self.target), seal=self.seal)
        return self._client

    def stats(self) -> dict:
        rejected = self._client.num_rejected if self._client else 0
        return {**self.counters.values, "kv_blocks_rejected": self.counters.values["kv_blocks_rejected"] + rejected}

    def load(self, request_id: str, hashes: list[bytes], release: bool = False) -> bool:
        return self._start(self._load(request_id, hashes, release))

    def save(self, request_id: str, blocks: Blocks, pin: list[bytes]) -> bool:
        return self._start(self._save(request_id, blocks, pin))

    def _start(self, work) -> bool:
        if time.monotonic() < self._rests_until or not self._thread.is_alive():
            work.close()
            return False
        asyncio.run_coroutine_threadsafe(work, self._loop)
        return True

    async def _load(self, request_id: str, hashes: list[bytes], release: bool) -> None:
        start = time.perf_counter()
        found = await self._exchange(self.client.get_blocks(self.namespace, hashes, release), "computing prompts instead")
        self._finish(Loaded(request_id, self._fetched(found or {}, hashes), time.perf_counter() - start))

    async def _save(self, request_id: str, blocks: Blocks, pin: list[bytes]) -> None:
        start, missing = time.perf_counter(), []
        response = await self._exchange(self.client.put_blocks(self.namespace, blocks, pin, self.lease_s),
                                        "saving no blocks")
        if response is not None:
            self._published(blocks)
            gone = set(response.missing)
            missing = [h for h in pin if self.seal.key(h) in gone]
        self._finish(Saved(request_id, missing, time.perf_counter() - start))

    async def _exchange(self, work, failure: str):
        """Run one store exchange within timeout_s: its result, or None when it failed. A store that
        fails or hangs is left alone for a while (doubling while it keeps failing), then looked up
        again."""
        try:
            result = await asyncio.wait_for(work, self.timeout_s)
            self._failures = 0
            return result
        except Exception as exc:  # grpc.aio.AioRpcError, a timeout, a malformed answer
            self.counters.add(kv_store_errors=1)
            self._failures += 1
            rest = min(MAX_REST_S, REST_S * 2 ** (self._failures - 1))
            self._rests_until = time.monotonic() + rest
            details = exc.details() if hasattr(exc, "details") else (str(exc) or "no answer in time")
            log.warning("KV store failed, %s for %.0f s: %s", failure, rest, details)
            target = await self._relocate() if self._relocate is not None else None
            if target and target != self.target:
                log.info("the KV store moved: %s -> %s", self.target, target)
                self.target, self._client = target, None  # the next exchange connects there
            return None

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        if self._client is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._client.channel.close(), self._loop).result(timeout=5)
            except Exception as exc:  # closing is best effort: the process may be ending anyway
                log.debug("closing the KV store channel: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
