"""Prometheus metrics of a pipeline, served by the gateway on /metrics (prometheus-client).

Two sources, one namespace (`tandem_`), documented in docs/metrics.md:
- the gateway's own view of every request (gRPC and HTTP alike): TTFT, inter-token latency and
  end-to-end latency histograms, prompt/generated/cached token counters, requests by endpoint and
  outcome, requests in flight, requests migrated between workers, requests by the route they took
  (aggregated or disaggregated) and why (services.routing);
- every other service's `Stats` rpc, asked at scrape time (vLLM's engine gauges, per worker):
  running and waiting requests, KV blocks used and free, prefix-cache hits, speculative decoding,
  and each service's rpc count and errors. A service that does not answer within
  STATS_TIMEOUT_S shows `tandem_service_up 0` and keeps no stale gauges.

Each gateway has its own CollectorRegistry, so several pipelines in one process (tests) never mix.
Histogram buckets follow vLLM's, so dashboards written for it read these the same way.
"""
from __future__ import annotations

import asyncio
from collections import Counter as _Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

disable_created_metrics()  # no *_created series: half the output, and Prometheus does not need them

NAMESPACE = "tandem"
STATS_TIMEOUT_S = 1.0
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

# Stats keys a service reports -> (metric, help, kind). Gauges are read as they are; counters are
# the service's running totals, exposed as Prometheus counters (they restart with the service).
SERVICE_METRICS = {
    "running": ("num_requests_running", "Requests in the worker's running batch.", "gauge"),
    "waiting": ("num_requests_waiting", "Requests waiting in the worker's queue.", "gauge"),
    "kv_blocks_used": ("kv_cache_blocks_used", "KV-cache blocks in use on the worker.", "gauge"),
    "kv_blocks_free": ("kv_cache_blocks_free", "Free KV-cache blocks on the worker.", "gauge"),
    "kv_blocks_total": ("kv_cache_blocks_total", "KV-cache blocks of the worker's pool.", "gauge"),
    "prefix_cache_hit_rate": ("prefix_cache_hit_rate",
                              "Share of queried prompt tokens found in the worker's prefix cache.", "gauge"),
    "prefix_cache_queried_tokens": ("prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache.",
                                    "counter"),
    "prefix_cache_hit_tokens": ("prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache.", "counter"),
    "preemptions": ("num_preemptions", "Sequences preempted for lack of KV blocks.", "counter"),
    "spec_proposed_tokens": ("spec_decode_num_draft_tokens", "Speculative guesses verified.", "counter"),
    "spec_accepted_tokens": ("spec_decode_num_accepted_tokens", "Speculative guesses accepted.", "counter"),
    "spec_acceptance_rate": ("spec_decode_acceptance_rate", "Accepted / verified speculative guesses.", "gauge"),
    "rpc_requests": ("service_requests", "RPCs the service answered.", "counter"),
    "rpc_errors": ("service_errors", "RPCs the service answered with an error status.", "counter"),
    "bytes_used": ("kv_store_bytes_used", "Bytes held by the KV-cache store.", "gauge"),
    "capacity_bytes": ("kv_store_capacity_bytes", "The KV-cache store's capacity.", "gauge"),
    "hits": ("kv_store_hits", "KV-cache store block lookups that hit.", "counter"),
    "misses": ("kv_store_misses", "KV-cache store block lookups that missed.", "counter"),
    "evictions": ("kv_store_evictions", "Blocks the KV-cache store evicted.", "counter"),
    "expired_pins": ("kv_store_expired_pins", "KV-cache store pins released because their lease ran out.", "counter"),
    "kv_blocks_rejected": ("kv_blocks_rejected", "KV blocks from the store that failed their digest check "
                           "(forged or corrupted): dropped and computed again.", "counter"),
    # a prefill or decode worker's KV connector (tandem/engine/kv_connector.py)
    "kv_loading_requests": ("kv_connector_loading_requests",
                            "Requests waiting for their prompt blocks from the KV-cache store.", "gauge"),
    "kv_blocks_fetched": ("kv_connector_blocks_loaded", "KV blocks loaded from the store.", "counter"),
    "kv_blocks_published": ("kv_connector_blocks_saved", "KV blocks saved in the store.", "counter"),
    "kv_transfer_seconds": ("kv_connector_transfer_seconds", "Seconds spent in KV-cache store exchanges.",
                            "counter"),
    "kv_store_errors": ("kv_connector_store_errors",
                        "KV-cache store exchanges that failed or timed out (their blocks were computed).",
                        "counter"),
    # a worker serving a mixture-of-experts model (tandem/model/moe.py router_stats)
    "moe_routed_tokens": ("moe_routed_tokens", "Token-to-expert assignments made by the routers, all sparse "
                          "layers summed (a token counts top_k times a layer).", "counter"),
    "moe_expert_imbalance": ("moe_expert_imbalance", "The busiest expert's routed tokens over the mean (1.0: "
                             "perfectly even), since the worker started.", "gauge"),
    # a worker with LoRA adapters (tandem/model/lora.py LoRARegistry.stats)
    "lora_adapters_loaded": ("lora_adapters_loaded", "LoRA adapters the worker has loaded.", "gauge"),
    "lora_slots_total": ("lora_slots_total", "The worker's LoRA slots (max_loras).", "gauge"),
    "lora_slots_in_use": ("lora_slots_in_use", "LoRA slots held by running requests.", "gauge"),
    "lora_slot_loads": ("lora_slot_loads", "Adapters written into a slot (misses of the slots' LRU).", "counter"),
    "lora_requests_waiting_for_slot": ("lora_requests_waiting_for_slot",
                                       "Requests waiting for a LoRA slot (every slot held by running requests).",
                                       "gauge"),
}
# a per-expert value: moe_tokens_expert_<e> -> tandem_moe_expert_tokens{expert="<e>"}
EXPERT_PREFIX = "moe_tokens_expert_"


def rpc_tally(servicer) -> _Tally:
    """The servicer's rpc counts ("rpc_requests", "rpc_errors"), kept by tandem.services.common.rpc."""
    tally = getattr(servicer, "_rpc_tally", None)
    if tally is None:
        tally = servicer._rpc_tally = _Tally()
    return tally


def with_rpc_counts(servicer, values: dict) -> dict[str, float]:
    """A Stats rpc's values plus the servicer's rpc counts."""
    tally = rpc_tally(servicer)
    return {**{k: float(v) for k, v in values.items()}, "rpc_requests": float(tally["rpc_requests"]),
            "rpc_errors": float(tally["rpc_errors"])}


class ServiceStatsCollector:
    """Exposes the last snapshot of every service's Stats (refreshed by GatewayMetrics.refresh)."""

    def __init__(self):
        self.snapshot: dict[tuple[str, str], dict[str, float] | None] = {}  # (service, instance) -> values

    def collect(self) -> Iterable:
        up = GaugeMetricFamily(f"{NAMESPACE}_service_up", "1 if the service answered its Stats rpc at this scrape.",
                               labels=["service", "instance"])
        families = {}
        experts = CounterMetricFamily(f"{NAMESPACE}_moe_expert_tokens", "Tokens routed to each expert, all "
                                      "sparse layers summed.", labels=["service", "instance", "expert"])
        for (service, instance), values in sorted(self.snapshot.items()):
            up.add_metric([service, instance], 0.0 if values is None else 1.0)
            for key, value in (values or {}).items():
                if key.startswith(EXPERT_PREFIX):
                    experts.add_metric([service, instance, key[len(EXPERT_PREFIX):]], value)
                    continue
                if key not in SERVICE_METRICS:
                    continue
                name, doc, kind = SERVICE_METRICS[key]
                if name not in families:
                    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                    families[name] = cls(f"{NAMESPACE}_{name}", doc, labels=["service", "instance"])
                families[name].add_metric([service, instance], value)
        return [up, *families.values(), *([experts] if experts.samples else [])]


class GatewayMetrics:
    """The gateway's instruments and the per-service collector, in one registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        kw = dict(namespace=NAMESPACE, registry=self.registry)
        self.ttft = Histogram("time_to_first_token_seconds", "Time to the first token, at the gateway.",
                              ["api"], buckets=TTFT_BUCKETS, **kw)
        self.itl = Histogram("inter_token_latency_seconds", "Gap between consecutive tokens of a sample.",
                             ["api"], buckets=ITL_BUCKETS, **kw)
        self.e2e = Histogram("e2e_request_latency_seconds", "Arrival to last token, at the gateway.",
                             ["api"], buckets=E2E_BUCKETS, **kw)
        self.prompt_len = Histogram("request_prompt_tokens", "Prompt length of finished requests.",
                                    ["api"], buckets=TOKEN_BUCKETS, **kw)
        self.output_len = Histogram("request_generation_tokens", "Tokens generated per finished request.",
                                    ["api"], buckets=TOKEN_BUCKETS, **kw)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of finished requests.", ["api"], **kw)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.", ["api"], **kw)
        self.cached_tokens = Counter("cached_prompt_tokens", "Prompt tokens whose KV came from a cache.",
                                     ["api"], **kw)
        self.requests = Counter("requests", "Requests by endpoint and outcome (ok or the error status).",
                                ["api", "endpoint", "status"], **kw)
        self.inflight = Gauge("gateway_requests_inflight", "Requests the gateway is serving now.", **kw)
        self.migrations = Counter("request_migrations", "Requests moved to another worker mid-way, by why "
                                  "(services.migration).", ["reason"], **kw)
        self.routed = Counter("requests_routed", "Requests by where their prompt ran (path: aggregated or "
                              "disaggregated) and why (services.routing).", ["path", "reason"], **kw)
        self.services = ServiceStatsCollector()
        self.registry.register(self.services)

    def observe_finished(self, api: str, ttft: float, gaps: list[float], e2e: float, prompt_tokens: int,
                         completion_tokens: int, cached_tokens: int) -> None:
        self.ttft.labels(api).observe(ttft)
        itl = self.itl.labels(api)
        for gap in gaps:
            itl.observe(gap)
        self.e2e.labels(api).observe(e2e)
        self.prompt_len.labels(api).observe(prompt_tokens)
        self.output_len.labels(api).observe(completion_tokens)
        self.prompt_tokens.labels(api).inc(prompt_tokens)
        self.generation_tokens.labels(api).inc(completion_tokens)
        self.cached_tokens.labels(api).inc(cached_tokens)

    def count(self, api: str, endpoint: str, status: str) -> None:
        self.requests.labels(api, endpoint, status).inc()

    async def refresh(self, stubs: dict[tuple[str, str], object]) -> None:
        """Ask every service for its Stats at once: stubs maps (service, instance) -> a stub with Stats."""
        from tandem.v1 import common_pb2

        async def ask(stub):
            try:
                answer = await stub.Stats(common_pb2.StatsRequest(), timeout=STATS_TIMEOUT_S)
                return dict(answer.values)
            except Exception:  # down or slow: reported as tandem_service_up 0
                return None

        keys = list(stubs)
        answers = await asyncio.gather(*(ask(stubs[k]) for k in keys))
        self.services.snapshot = dict(zip(keys, answers))

    def render(self) -> bytes:
        return generate_latest(self.registry)
