"""Where the gateway sends work: the workers it knows, which of them serve now, and how a service
is found again after it moved.

Health: the Router watches every worker's grpc.health.v1 (`Watch`, one stream each, in the
background) and never picks one that reports NOT_SERVING (draining, its engine dead) or cannot be
reached; a call that fails UNAVAILABLE marks its worker down at once. With no worker serving, a
request waits for one (a restarting worker) until its deadline.

Discovery: a Peer knows the address a service was first given; when calls to it fail, it asks
`resolve` (the Ray launcher's asks the named actor `tandem-<instance>`) where that service listens
now, and moves its channel there. So a service restarted on another port or node is found again.

Per-request disaggregation (`Disaggregation`, at the end of this module): the router decides,
request by request, whether a prompt runs on a prefill worker that hands its KV to a decode
worker (disaggregated), or whole on a decode worker (aggregated, as in `mode: aggregated`).

DistServe and Splitwise split prefill from decode for every request; the split pays off for long
prompts (their prefill would stall a decode worker's running streams for seconds) and costs short
ones a hand-off (two more RPCs, the KV through the store) and a place in the prefill queue behind
long documents. So the gateway chooses. The policy (`disaggregate` in the config, a request's own
`disaggregate` overriding it):

    always  a prefill worker, then a decode worker (waiting for a prefill worker, as before)
    never   one decode worker runs the request whole
    auto    in this order:
      1. no prefill worker is serving now         -> aggregated   "prefill_unavailable"
      2. uncached < min_uncached_tokens           -> aggregated   "short_prompt"
      3. prefill_wait > handoff + decode_wait     -> aggregated   "prefill_busy"
      4. otherwise                                -> disaggregated "long_prompt"

    uncached     the prompt's tokens minus the longest prefix a prefill worker holds (the router's
                 CachedPrefix question, asked only of prompts of min_uncached_tokens or more)
    prefill_wait the uncached tokens this gateway has queued on that prefill worker (sent, prefill
                 not ended) x seconds per prefill token
    decode_wait  the same on the least queued serving decode worker (prompts it runs whole)
    handoff      HANDOFF_FIXED_S + the prompt's tokens x KV seconds per token (the prefill
                 worker's publish plus the decode worker's fetch)

Seconds per prefill token and per KV token are running averages (EWMA_WEIGHT) of what the workers
report on each disaggregated request (PrefillResponse.prefill_seconds over the tokens computed;
its kv_transfer_seconds plus the decode worker's Timings.kv_transfer over the prompt's tokens),
starting from the defaults measured below. The waits are this gateway's view only (another
gateway's requests are not seen), and a queued prompt counts whole until its prefill ends.

A decode worker's own prefix cache is not asked (the Decode service has no CachedPrefix): in the
usual flow it holds what a prefill worker handed it, so the prefill workers' answer stands for it.

In an aggregated pipeline (no prefill workers) every request runs whole, reason
"no_prefill_workers", whatever it asked: `always` is a preference about where the work goes, not
something a request can require of the operator's pipeline.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.errors import InvalidRequestError
from tandem.v1 import prefill_pb2

from .common import Unavailable

log = logging.getLogger(__name__)

Resolve = Callable[[str], "str | None"]  # the address a service was first given -> where it is now
CONTROL_TIMEOUT_S = 30.0  # a unary control call (tokenize, retrieve, info) without a client deadline
PREFIX_QUERY_TIMEOUT_S = 1.0  # the router's CachedPrefix question: a slow worker just loses the bid
WATCH_RETRY_S = 0.5  # between health watches of an unreachable worker
RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0)  # a unary call retried while its service restarts


def until(timeout: float | None, cap: float | None = None) -> float | None:
    """The monotonic time `timeout` seconds from now, no later than `cap` seconds from now."""
    if timeout is None and cap is None:
        return None
    return time.monotonic() + min(t for t in (timeout, cap) if t is not None)


def left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


async def resolve_now(resolve: Resolve | None, origin: str) -> str | None:
    """Where the service first given as `origin` listens now; None when unknown (no registry, or
    it does not answer). resolve may block (a Ray call): it runs on a thread."""
    if resolve is None:
        return None
    try:
        return await asyncio.to_thread(resolve, origin)
    except Exception as exc:  # the registry is unreachable: callers keep the old address
        log.warning("cannot resolve %s: %s", origin, exc)
        return None


class Peer:
    """A service this process calls: a channel and stub to where the service is now.

    make_channel(target) -> grpc.aio.Channel; make_stub(channel) -> the generated stub."""

    def __init__(self, target: str, make_channel: Callable, make_stub: Callable, resolve: Resolve | None = None):
        self.origin = self.target = target
        self._make_channel, self._make_stub, self.resolve = make_channel, make_stub, resolve
        self.channel = make_channel(target)
        self.stub = make_stub(self.channel)

    async def relocate(self) -> bool:
        """Ask where the service listens now and move there if it moved. True when it moved."""
        target = await resolve_now(self.resolve, self.origin)
        if not target or target == self.target:
            return False
        log.info("%s moved: %s -> %s", self.origin, self.target, target)
        old, self.target = self.channel, target
        self.channel = self._make_channel(target)
        self.stub = self._make_stub(self.channel)
        asyncio.get_running_loop().create_task(old.close())
        return True

    def retrying(self) -> _RetryingStub:
        """The stub's unary methods, retried on UNAVAILABLE (the service restarting or moved)
        within the call's timeout, and given CONTROL_TIMEOUT_S when the caller gave none. Only for
        calls that are safe to repeat."""
        return _RetryingStub(self)


class _RetryingStub:
    def __init__(self, peer: Peer):
        self._peer = peer

    def __getattr__(self, method: str):
        async def call(request, timeout: float | None = None, **kwargs):
            deadline = until(timeout, CONTROL_TIMEOUT_S)
            for attempt in itertools.count():
                try:
                    return await getattr(self._peer.stub, method)(request, timeout=left(deadline), **kwargs)
                except grpc.aio.AioRpcError as exc:
                    pause = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or left(deadline) <= pause:
                        raise
                    await self._peer.relocate()
                    await asyncio.sleep(pause)
        return call


class Endpoint(Peer):
    """A worker the router can pick: whether it serves now, and this gateway's requests on it."""

    def __init__(self, target: str, make_channel: Callable, make_stub: Callable, resolve: Resolve | None = None):
        super().__init__(target, make_channel, make_stub, resolve)
        self.inflight = 0
        # uncached prompt tokens this gateway sent it whose prefill has not ended (the
        # disaggregation policy's measure of the work queued there)
        self.queued_tokens = 0
        self.serving = True  # until its first health answer: the launcher starts workers first
        self._watch: grpc.aio.UnaryStreamCall | None = None

    def mark_down(self) -> None:
        """A call found it unreachable: not picked until its health watch says it serves again."""
        self.serving = False
        if self._watch is not None:
            self._watch.cancel()  # watch again now: the answer comes from the worker, or its absence


class Router:
    """Prefill: the serving worker holding the longest cached prefix of the prompt (ties: least
    loaded). Decode: the least loaded serving worker. Load is what this gateway has in flight on
    each. `avoid`: workers this request already failed on, picked only when no other serves.
    Whether a request goes to a prefill worker at all is Disaggregation's decision (below)."""

    def __init__(self, prefill: list[Endpoint], decode: list[Endpoint]):
        self.prefill, self.decode = prefill, decode
        # awaited before a worker that was down counts as serving again (it restarted): the
        # gateway gives it back the LoRA adapters loaded at run time
        self.on_return: Callable[[Endpoint], Awaitable[None]] | None = None
        self._rr = itertools.count()
        self._changed = asyncio.Event()
        self._watchers: list[asyncio.Task] = []

    def start(self) -> None:
        """Watch every worker's health (on the running event loop) until stop()."""
        if not self._watchers:
            self._changed = asyncio.Event()
            self._watchers = [asyncio.get_running_loop().create_task(self._watch(e))
                              for e in (*self.prefill, *self.decode)]

    def stop(self) -> None:
        for task in self._watchers:
            task.cancel()
        self._watchers = []

    async def pick_prefill(self, prompt: list[int], deadline: float | None, avoid=(),
                           cache_salt: str = "", lora: str = "") -> Endpoint:
        """cache_salt, lora: the request's (its blocks' hash chain starts from them): without them
        the workers would report the base's unsalted prefix, which such requests never reuse."""
        return (await self.bid_prefill(prompt, deadline, avoid, cache_salt, lora=lora))[0]

    async def bid_prefill(self, prompt: list[int], deadline: float | None, avoid=(), cache_salt: str = "",
                          ask_one: bool = False, lora: str = "") -> tuple[Endpoint, int]:
        """(the prefill worker to use, the prompt tokens it holds cached). A lone candidate is
        not asked (0 cached) unless ask_one: the disaggregation policy needs the number."""
        candidates = await self._serving(self.prefill, deadline, avoid)
        if len(candidates) == 1 and not ask_one:
            return candidates[0], 0
        request = prefill_pb2.CachedPrefixRequest(prompt_ids=prompt, cache_salt=cache_salt, lora=lora)
        answers = await asyncio.gather(*(e.stub.CachedPrefix(request, timeout=PREFIX_QUERY_TIMEOUT_S)
                                         for e in candidates), return_exceptions=True)
        scored = [(a.num_cached_tokens if not isinstance(a, BaseException) else -1, -e.inflight, e)
                  for a, e in zip(answers, candidates)]
        cached, _, best = max(scored, key=lambda s: s[:2])
        return best, max(cached, 0)

    def serving_now(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Those of endpoints serving now, without waiting for one."""
        return [e for e in endpoints if e.serving]

    async def pick_decode(self, deadline: float | None, avoid=()) -> Endpoint:
        candidates = await self._serving(self.decode, deadline, avoid)
        low = min(e.inflight for e in candidates)
        candidates = [e for e in candidates if e.inflight == low]
        return candidates[next(self._rr) % len(candidates)]

    async def _serving(self, endpoints: list[Endpoint], deadline: float | None, avoid) -> list[Endpoint]:
        """The serving endpoints not in avoid (or, failing that, those in it), waiting for one
        until deadline (None: forever)."""
        self.start()
        while True:
            serving = [e for e in endpoints if e.serving]
            if serving:
                return [e for e in serving if e not in avoid] or serving
            wait = left(deadline)
            if wait == 0.0:
                raise Unavailable(f"no {'prefill' if endpoints is self.prefill else 'decode'} worker is serving")
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _set(self, endpoint: Endpoint, serving: bool) -> None:
        if endpoint.serving != serving:
            log.info("worker %s is %s", endpoint.target, "serving" if serving else "not serving")
        endpoint.serving = serving
        if serving:  # wake every request waiting for a worker
            self._changed.set()
            self._changed = asyncio.Event()

    async def _watch(self, endpoint: Endpoint) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        while True:
            try:
                endpoint._watch = health_pb2_grpc.HealthStub(endpoint.channel).Watch(request)
                async for answer in endpoint._watch:
                    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                    if serving and not endpoint.serving and self.on_return is not None:
                        await self.on_return(endpoint)
                    self._set(endpoint, serving)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._set(endpoint, False)
                    await endpoint.relocate()
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # the router stops; else mark_down cancelled the call: watch again
            finally:
                endpoint._watch = None
            await asyncio.sleep(WATCH_RETRY_S)


# -- per-request disaggregation: whether a prompt takes the hand-off ------------------------------
POLICIES = ("auto", "always", "never")
# Routing reasons, the label values of tandem_requests_routed_total{path, reason}.
REASONS = ("always", "never", "no_prefill_workers", "prefill_unavailable", "short_prompt", "prefill_busy",
           "long_prompt")
# Measured with `bench/disaggregate.py --calibrate` (bench/RESULTS.md, "Per-request
# disaggregation"; bench/disaggregate_calibration.json): default model (SmolLM2-135M, fp32 KV:
# 46 KB per token), one torch thread per worker on the 2-core reference CPU, idle in-process
# pipeline, prompts of 16 to 512 fresh tokens, medians of 3.
# - prefill: 3.3 ms per prompt token (0.84 s for 256 tokens, 1.68 s for 512);
# - the KV hand-off (the prefill worker's save + the decode worker's load, through the store):
#   about 7 ms + 0.25 ms per prompt token (11 ms for 16 tokens, 136 ms for 512);
# - a prompt run whole on a decode worker stalls the streams decoding there about as long as its
#   prefill: 0.07 s for 16 tokens, 0.11 s for 32, 0.18 s for 64, 0.37 s for 128, 0.68 s for 256.
DEFAULT_PREFILL_S_PER_TOKEN = 3.3e-3
DEFAULT_HANDOFF_S_PER_TOKEN = 0.25e-3
HANDOFF_FIXED_S = 0.007  # the hand-off's cost beyond the bytes: the store's round trips
# Below this many uncached tokens a prompt runs on a decode worker: there it stalls the running
# streams ~0.2 s at most (about two decode steps), while the hand-off would make it wait behind
# whatever the prefill worker is computing and cost two more rpcs and the store's round trips.
# Chat turns (the SQuAD questions of tandem.data: 5-30 tokens) fall well under it, documents far
# above. On a GPU a prefill is ~50x faster while the hand-off is not: raise it there.
DEFAULT_MIN_UNCACHED_TOKENS = 64
EWMA_WEIGHT = 0.2  # of each new measurement in the running averages
# Prefill times of fewer computed tokens are mostly fixed costs (rpc, queueing, a step's overhead):
# they do not update the per-token estimate.
MIN_MEASURED_TOKENS = 64


def check_policy(value: str) -> str:
    """A request's `disaggregate` ("" = the pipeline's); INVALID_ARGUMENT when it names none."""
    if value not in ("", *POLICIES):
        raise InvalidRequestError(f"disaggregate must be one of {', '.join(POLICIES)} (or empty for the "
                                  f"server's setting), got {value[:64]!r}")
    return value


@dataclass(frozen=True)
class Route:
    """Where one request runs. prefill: the prefill worker auto picked (None: let the migrator
    pick); uncached: the prompt tokens it will compute (what queued_tokens counts)."""

    disaggregated: bool
    reason: str
    prefill: Endpoint | None = None
    uncached: int = 0

    @property
    def path(self) -> str:
        return "disaggregated" if self.disaggregated else "aggregated"


class Estimates:
    """Running averages of seconds per prefill token and per handed-off KV token."""

    def __init__(self, prefill_s_per_token: float = DEFAULT_PREFILL_S_PER_TOKEN,
                 handoff_s_per_token: float = DEFAULT_HANDOFF_S_PER_TOKEN):
        self.prefill_s_per_token, self.handoff_s_per_token = prefill_s_per_token, handoff_s_per_token

    def observe_prefill(self, computed_tokens: int, seconds: float) -> None:
        if computed_tokens >= MIN_MEASURED_TOKENS and seconds > 0:
            self.prefill_s_per_token = _ewma(self.prefill_s_per_token, seconds / computed_tokens)

    def observe_handoff(self, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens >= MIN_MEASURED_TOKENS and seconds > 0:
            self.handoff_s_per_token = _ewma(self.handoff_s_per_token, seconds / prompt_tokens)


def _ewma(old: float, new: float) -> float:
    return (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


class Disaggregation:
    """The policy of one gateway: its default, auto's threshold, and the running estimates."""

    def __init__(self, router: Router, default: str = "auto", min_uncached_tokens: int = DEFAULT_MIN_UNCACHED_TOKENS):
        self.router, self.min_uncached_tokens = router, min_uncached_tokens
        self.default = check_policy(default) or "auto"
        self.estimates = Estimates()

    async def route(self, prompt: list[int], policy: str, cache_salt: str, deadline: float | None,
                    lora: str = "") -> Route:
        """Where a request with this prompt and `disaggregate` value ("" = the default) runs."""
        policy = check_policy(policy) or self.default
        if not self.router.prefill:
            return Route(False, "no_prefill_workers")
        if policy != "auto":
            return Route(policy == "always", policy)
        if not self.router.serving_now(self.router.prefill):
            return Route(False, "prefill_unavailable")
        if len(prompt) < self.min_uncached_tokens:  # short whatever is cached: no need to ask
            return Route(False, "short_prompt", uncached=len(prompt))
        endpoint, cached = await self.router.bid_prefill(prompt, deadline, cache_salt=cache_salt, ask_one=True,
                                                         lora=lora)
        uncached = len(prompt) - min(cached, len(prompt) - 1)  # the last token is always computed
        if uncached < self.min_uncached_tokens:
            return Route(False, "short_prompt", uncached=uncached)
        if self.prefill_wait(endpoint) > self.handoff(len(prompt)) + self.decode_wait():
            return Route(False, "prefill_busy", uncached=len(prompt))  # a decode worker computes it all
        return Route(True, "long_prompt", endpoint, uncached)

    def prefill_wait(self, endpoint: Endpoint) -> float:
        return endpoint.queued_tokens * self.estimates.prefill_s_per_token

    def decode_wait(self) -> float:
        serving = self.router.serving_now(self.router.decode)
        return min((e.queued_tokens for e in serving), default=0) * self.estimates.prefill_s_per_token

    def handoff(self, prompt_tokens: int) -> float:
        return HANDOFF_FIXED_S + prompt_tokens * self.estimates.handoff_s_per_token
