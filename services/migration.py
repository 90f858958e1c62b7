"""In-flight request migration: a stream outlives the worker it started on.

When a request's decode (or aggregated) worker dies (the stream breaks: UNAVAILABLE), hangs (no
message for `stall_timeout_s`) or drains (it cancels or aborts the stream), the gateway resumes
the request on another serving worker, or on the restarted one when no other serves, waiting for
it within the request's deadline. The new worker gets the prompt plus each sample's tokens already
sent (DecodeRequest.generated) and continues as if it had sampled them (LLMEngine.add_request's
`generated`): penalties, max_tokens, stop strings and the request's seed carry on, and the KV of
the prompt comes from its prefix cache or the KV store where they hold it. The client sees one
stream: every token once, in order, no error. Greedy output equals the uninterrupted run; a seeded
sampled one too, since each draw depends on the seed and the position only (tandem.sampling).

n > 1: every sample is resumed from its own tokens; the ones already finished stay finished (the
worker replays them and they finish again by the same rule), the others continue.

A prefill that fails the same ways is retried on another prefill worker. Each request gets at most
`max_attempts` resumes and retries in all; each is counted in tandem_request_migrations_total
{reason}. NVIDIA Dynamo's request migration is the model; here it is on by default.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from tandem.v1 import common_pb2, decode_pb2, prefill_pb2

from .common import Unavailable
from .config import MigrationConfig
from .routing import Endpoint, Router, left, until

# Statuses that say the worker, not the request, failed. CANCELLED reaches the gateway only from
# the worker's side (a call the gateway cancels raises asyncio.CancelledError): a worker draining.
_MOVABLE = {grpc.StatusCode.UNAVAILABLE: "unavailable", grpc.StatusCode.CANCELLED: "draining",
            grpc.StatusCode.ABORTED: "draining"}


class _Moved(Exception):
    """The worker failed this stream; reason labels the migration."""

    def __init__(self, reason: str, cause: BaseException | None = None):
        super().__init__(reason)
        self.reason, self.cause = reason, cause


class Progress:
    """What the client has been sent of each sample: its tokens, and whether it finished."""

    def __init__(self, num_samples: int):
        self.tokens: list[list[int]] = [[] for _ in range(num_samples)]
        self.finished = [False] * num_samples

    def add(self, delta: common_pb2.SampleDelta) -> None:
        self.tokens[delta.index].extend(delta.token_ids)
        self.finished[delta.index] = self.finished[delta.index] or bool(delta.finish_reason)

    @property
    def done(self) -> bool:
        return all(self.finished)

    def generated(self) -> list[decode_pb2.GeneratedTokens]:
        """DecodeRequest.generated: empty while nothing was sent (the request starts afresh)."""
        if not any(self.tokens):
            return []
        return [decode_pb2.GeneratedTokens(token_ids=t) for t in self.tokens]


class Migrator:
    """Runs a request's prefill and decode calls with retries and resumes. count(reason) is
    called once per migration (the gateway's metric)."""

    def __init__(self, config: MigrationConfig, router: Router, count: Callable[[str], None]):
        self.config, self.router, self.count = config, router, count

    def _wait_until(self, deadline: float | None) -> float:
        """How long a request may wait for a serving worker: its deadline, capped."""
        return until(left(deadline), self.config.worker_wait_s)

    def _give_up(self, attempt: int, moved: _Moved) -> None:
        if not self.config.enabled or attempt >= self.config.max_attempts:
            if moved.cause is not None:
                raise moved.cause
            raise Unavailable(f"the worker failed this request ({moved.reason}) and it cannot move again")

    async def prefill(self, request: prefill_pb2.PrefillRequest, deadline: float | None,
                      first: Endpoint | None = None, uncached: int = 0) -> prefill_pb2.PrefillResponse:
        """The prefill call, retried on another prefill worker when its worker fails. first: the
        worker to try first (the router already picked it); uncached: the prompt tokens it will
        compute, counted in its queued_tokens while the call runs."""
        tried: list[Endpoint] = []
        base_id = request.request_id
        for attempt in range(self.config.max_attempts + 1):
            endpoint = first if attempt == 0 and first is not None else await self.router.pick_prefill(
                list(request.prompt_ids), self._wait_until(deadline), tried, request.sampling.cache_salt, request.lora)
            endpoint.inflight += 1
            endpoint.queued_tokens += uncached
            if attempt:
                request.request_id = f"{base_id}~{attempt}"  # a stalled try may still hold the old id
            stall_bound = deadline is None or left(deadline) > self.config.stall_timeout_s
            try:
                return await endpoint.stub.Prefill(request, timeout=left(until(left(deadline),
                                                                               self.config.stall_timeout_s)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and stall_bound:
                    moved = _Moved("stalled", exc)
                else:
                    moved = self._classify(exc, deadline, endpoint)
                self._give_up(attempt, moved)
                tried.append(endpoint)
                self.count("prefill_" + moved.reason)
            finally:
                endpoint.inflight -= 1
                endpoint.queued_tokens -= uncached
        raise AssertionError("unreachable")  # pragma: no cover

    async def decode(self, make_request: Callable[[int], decode_pb2.DecodeRequest], progress: Progress,
                     deadline: float | None, prefill_tokens: int = 0) -> AsyncIterator[decode_pb2.DecodeResponse]:
        """The decode stream's messages, across workers: deltas (each once), then the usage
        message. make_request(attempt) builds the request from `progress` as it stands. Ends
        without the usage message when every sample finished before a worker failed.
        prefill_tokens: the prompt tokens the worker computes itself (a request run whole on
        it), counted in its queued_tokens until its first message."""
        tried: list[Endpoint] = []
        for attempt in range(self.config.max_attempts + 1):
            endpoint = await self.router.pick_decode(self._wait_until(deadline), tried)
            endpoint.inflight += 1
            queued = prefill_tokens
            endpoint.queued_tokens += queued
            call = endpoint.stub.Decode(make_request(attempt), timeout=left(deadline))
            try:
                async for message in self._messages(call, progress, deadline, endpoint):
                    endpoint.queued_tokens -= queued  # its prompt is computed
                    queued = 0
                    yield message
                return
            except _Moved as moved:
                if progress.done:
                    return
                self._give_up(attempt, moved)
                tried.append(endpoint)
                self.count(moved.reason)
            finally:
                call.cancel()  # no-op once finished; frees the worker's blocks when we leave early
                endpoint.inflight -= 1
                endpoint.queued_tokens -= queued

    async def _messages(self, call, progress: Progress, deadline: float | None, endpoint: Endpoint):
        # asyncio.timeout arms one timer per read; asyncio.wait_for would also make a task per
        # token, a measurable share of the gateway's CPU per streamed token
        while True:
            try:
                async with asyncio.timeout(self.config.stall_timeout_s):
                    message = await call.read()
            except TimeoutError:
                if left(deadline) == 0.0:
                    raise
                raise _Moved("stalled") from None
            except grpc.aio.AioRpcError as exc:
                raise self._classify(exc, deadline, endpoint) from None
            if message is grpc.aio.EOF:
                raise _Moved("stream_ended")  # ended without its usage message
            if message.HasField("delta"):
                if message.delta.finish_reason == "abort":  # the worker gave up on it (its engine stopped)
                    raise _Moved("draining")
                progress.add(message.delta)
            yield message
            if not message.HasField("delta"):
                return

    @staticmethod
    def _classify(exc: grpc.aio.AioRpcError, deadline: float | None, endpoint: Endpoint) -> _Moved:
        """The migration an rpc error calls for; raises it as it is when the request is at fault
        or out of time."""
        reason = _MOVABLE.get(exc.code())
        if reason is None or left(deadline) == 0.0:
            raise exc
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            endpoint.mark_down()
        return _Moved(reason, exc)
