"""Per-request disaggregation: the router decides, request by request, whether a prompt runs on a
prefill worker that hands its KV to a decode worker (disaggregated), or whole on a decode worker
(aggregated, as in `mode: aggregated`).

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

from dataclasses import dataclass

from tandem.errors import InvalidRequestError

from .routing import Endpoint, Router

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

    async def route(self, prompt: list[int], policy: str, cache_salt: str, deadline: float | None) -> Route:
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
        endpoint, cached = await self.router.bid_prefill(prompt, deadline, cache_salt=cache_salt, ask_one=True)
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
