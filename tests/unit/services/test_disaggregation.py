"""Per-request disaggregation (services.routing): the policy's rule on plain Python, then the
pipeline on the tiny model: auto, always and never each take their path (seen in the workers'
Stats and in the usage), with the same greedy tokens as the library; a request's choice beats the
config's; bad values are refused over gRPC and HTTP; /metrics counts the routes; an aggregated
pipeline runs everything whole; and a request run whole on a decode worker that dies moves on."""
from __future__ import annotations

import asyncio

import httpx
import pytest

import tandem
from tandem.errors import ConfigError, InvalidRequestError
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import Client, InvalidArgumentError
from tandem.services.routing import HANDOFF_FIXED_S, REASONS, Disaggregation, check_policy
from tests.unit.services.test_http import metric
from tests.unit.services.test_migration import joined, pace, running, stream_with_fault
from tandem.services.config import PipelineConfig
from tests.unit.services.test_pipeline import GREEDY, config, stats

THRESHOLD = 48  # auto's min_uncached_tokens here: SHORT is below it, LONG above
SHORT = "hello world"
LONG = "First Citizen:\nBefore we proceed any further, hear me speak. All: Speak, speak." * 3


def long(tag: str) -> str:
    """A long prompt no cache holds yet: each test's own (a prefix cache hit would make it short)."""
    return f"{tag}. {LONG}"


# -- the rule, on plain Python -------------------------------------------------------------------
class FakeEndpoint:
    def __init__(self, serving: bool = True, queued_tokens: int = 0):
        self.serving, self.queued_tokens, self.inflight = serving, queued_tokens, 0


class FakeRouter:
    def __init__(self, prefill: list, decode: list, cached: int = 0):
        self.prefill, self.decode, self.cached, self.asked = prefill, decode, cached, 0

    def serving_now(self, endpoints):
        return [e for e in endpoints if e.serving]

    async def bid_prefill(self, prompt, deadline, avoid=(), cache_salt="", ask_one=False, lora=""):
        self.asked += 1
        return self.serving_now(self.prefill)[0], self.cached


def decide(router, num_tokens: int, policy: str = "", default: str = "auto"):
    route = asyncio.run(Disaggregation(router, default, min_uncached_tokens=100).route([1] * num_tokens, policy, "",
                                                                                      None))
    assert route.reason in REASONS  # a label value /metrics documents
    return route


def test_the_rule_in_order():
    idle = lambda **kw: FakeRouter([FakeEndpoint()], [FakeEndpoint()], **kw)  # noqa: E731
    assert decide(FakeRouter([], [FakeEndpoint()]), 500, "always").reason == "no_prefill_workers"
    assert decide(FakeRouter([FakeEndpoint(serving=False)], [FakeEndpoint()]), 500).reason == "prefill_unavailable"
    router = idle()
    short = decide(router, 99)
    assert (short.disaggregated, short.reason, router.asked) == (False, "short_prompt", 0)  # not even asked
    cached = decide(idle(cached=450), 500)  # 50 uncached: short, whatever its length
    assert (cached.disaggregated, cached.reason, cached.uncached) == (False, "short_prompt", 50)
    long = decide(idle(), 500)
    assert (long.disaggregated, long.reason, long.uncached) == (True, "long_prompt", 500)
    assert long.prefill is not None
    assert decide(idle(), 50, "always").disaggregated and decide(idle(), 50, default="always").reason == "always"
    assert decide(idle(), 5000, "never").reason == "never"


def test_a_busy_prefill_worker_sends_long_prompts_to_a_decode_worker():
    policy = Disaggregation(FakeRouter([FakeEndpoint()], [FakeEndpoint()]), min_uncached_tokens=100)
    per_token = policy.estimates.prefill_s_per_token
    handoff = policy.handoff(500)
    assert handoff == pytest.approx(HANDOFF_FIXED_S + 500 * policy.estimates.handoff_s_per_token)
    queued = int(handoff / per_token) + 1  # its queue takes just longer than the hand-off
    busy = FakeRouter([FakeEndpoint(queued_tokens=queued)], [FakeEndpoint()])
    assert decide(busy, 500).reason == "prefill_busy"
    # ... unless the decode worker has as much queued: the wait is then the same both ways
    both = FakeRouter([FakeEndpoint(queued_tokens=queued)], [FakeEndpoint(queued_tokens=queued)])
    assert decide(both, 500).reason == "long_prompt"
    assert decide(FakeRouter([FakeEndpoint(queued_tokens=queued - 2)], [FakeEndpoint()]), 500).reason \
        == "long_prompt"


def test_the_estimates_follow_what_workers_report():
    policy = Disaggregation(FakeRouter([], []))
    before = policy.estimates.prefill_s_per_token
    policy.estimates.observe_prefill(10, 100.0)  # too few tokens to say anything per token
    assert policy.estimates.prefill_s_per_token == before
    for _ in range(50):
        policy.estimates.observe_prefill(1000, 0.5)
        policy.estimates.observe_handoff(1000, 0.1)
    assert policy.estimates.prefill_s_per_token == pytest.approx(5e-4, rel=1e-3)
    assert policy.estimates.handoff_s_per_token == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("value", ["sometimes", "AUTO", " auto", "x" * 300])
def test_bad_policies_are_invalid(value):
    with pytest.raises(InvalidRequestError, match="disaggregate must be one of auto, always, never"):
        check_policy(value)
    assert check_policy("") == "" and check_policy("never") == "never"


@pytest.mark.parametrize("settings, match", [
    ({"disaggregate": "sometimes"}, "disaggregate must be one of"),
    ({"disaggregate_min_uncached_tokens": -1}, "disaggregate_min_uncached_tokens must be an integer >= 0"),
    ({"disaggregate_min_uncached_tokens": 1.5}, "disaggregate_min_uncached_tokens must be an integer >= 0")])
def test_the_config_refuses_bad_settings(settings, match):
    with pytest.raises(ConfigError, match=match):
        PipelineConfig(**settings)
    assert (PipelineConfig().disaggregate, PipelineConfig().disaggregate_min_uncached_tokens) == ("auto", 64)


# -- the pipeline --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_hf_dir):
    cfg = config(tiny_hf_dir, disaggregate="auto", disaggregate_min_uncached_tokens=THRESHOLD)
    with InProcessPipeline(cfg) as p:
        yield p


@pytest.fixture(scope="module")
def client(pipe):
    with Client(pipe.address, timeout=60) as c:
        yield c


def requests_on(pipe) -> tuple[float, float]:
    """(Prefill calls the prefill worker took, Decode calls the decode worker took)."""
    return stats(pipe, "prefill-0")["requests"], stats(pipe, "decode-0")["requests"]


@pytest.mark.parametrize("prompt, policy, disaggregated, reason", [
    (SHORT, "", False, "short_prompt"), (long("A"), "", True, "long_prompt"),
    (long("B"), "auto", True, "long_prompt"), (long("C"), "never", False, "never"), (SHORT, "always", True, "always")])
def test_each_policy_takes_its_path_with_the_librarys_tokens(pipe, client, tiny_llm, prompt, policy,
                                                             disaggregated, reason):
    want = tiny_llm.generate(prompt, tandem.SamplingParams(**GREEDY))[0]
    assert (len(want.prompt_token_ids) >= THRESHOLD) == (prompt != SHORT)
    prefills, decodes = requests_on(pipe)
    got = client.complete(prompt, disaggregate=policy or None, **GREEDY)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert (got.usage.disaggregated, got.usage.route_reason) == (disaggregated, reason)
    assert requests_on(pipe) == (prefills + disaggregated, decodes + 1)
    assert (got.timings.prefill > 0) == disaggregated


def test_a_cached_long_prompt_counts_as_short(pipe, client):
    """Once a prefill worker holds a long prompt, only its uncached tail counts."""
    prompt = long("D")
    client.complete(prompt, disaggregate="always", **GREEDY)  # the prefill worker caches it
    again = client.complete(prompt + " Once more.", **GREEDY)
    assert (again.usage.disaggregated, again.usage.route_reason) == (False, "short_prompt")


def test_the_requests_choice_beats_the_configs(tiny_hf_dir, tiny_llm):
    want = tiny_llm.generate(SHORT, tandem.SamplingParams(**GREEDY))[0]
    with InProcessPipeline(config(tiny_hf_dir, disaggregate="never")) as p, Client(p.address, timeout=60) as c:
        default = c.complete(LONG, **GREEDY)
        chosen = c.complete(SHORT, disaggregate="always", **GREEDY)
        chat = c.chat([{"role": "user", "content": SHORT}], disaggregate="always", **GREEDY)
    assert (default.usage.disaggregated, default.usage.route_reason) == (False, "never")
    assert (chosen.usage.disaggregated, chosen.usage.route_reason) == (True, "always")
    assert chosen.token_ids == want.token_ids
    assert (chat.usage.disaggregated, chat.usage.route_reason) == (True, "always")


def test_bad_values_are_refused_over_grpc_and_http(pipe, client):
    with pytest.raises(InvalidArgumentError, match="disaggregate must be one of auto, always, never"):
        client.complete(SHORT, disaggregate="sometimes", **GREEDY)
    with pytest.raises(InvalidArgumentError, match="disaggregate must be one of"):
        client.chat([{"role": "user", "content": SHORT}], disaggregate="both", **GREEDY)
    url = f"http://{pipe.http_address}/v1"
    for path, body in (("completions", {"prompt": SHORT}),
                       ("chat/completions", {"messages": [{"role": "user", "content": SHORT}]})):
        answer = httpx.post(f"{url}/{path}", json={**body, "max_tokens": 2, "disaggregate": "sometimes"}, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "disaggregate", answer.text


def test_http_usage_reports_each_prompts_route(pipe):
    body = {"prompt": [SHORT, long("E")], "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    answer = httpx.post(f"http://{pipe.http_address}/v1/completions", json=body, timeout=60).json()
    assert answer["usage"]["routes"] == [{"disaggregated": False, "reason": "short_prompt"},
                                         {"disaggregated": True, "reason": "long_prompt"}]
    forced = httpx.post(f"http://{pipe.http_address}/v1/completions", json={**body, "disaggregate": "never"},
                        timeout=60).json()
    assert [r["reason"] for r in forced["usage"]["routes"]] == ["never", "never"]
    assert [c["text"] for c in forced["choices"]] == [c["text"] for c in answer["choices"]]


def test_metrics_count_the_routes(pipe, client):
    url = f"http://{pipe.http_address}/metrics"
    name = "tandem_requests_routed_total"
    before = httpx.get(url, timeout=10).text
    client.complete(SHORT, **GREEDY)
    client.complete(SHORT, **GREEDY)
    client.complete(LONG, disaggregate="never", **GREEDY)
    client.complete(SHORT, disaggregate="always", **GREEDY)
    after = httpx.get(url, timeout=10).text
    delta = lambda **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert delta(path="aggregated", reason="short_prompt") == 2
    assert delta(path="aggregated", reason="never") == 1
    assert delta(path="disaggregated", reason="always") == 1
    assert delta() == 4


def test_an_aggregated_pipeline_runs_every_request_whole(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated")) as p, Client(p.address, timeout=60) as c:
        for policy in (None, "always", "never"):
            got = c.complete(LONG, disaggregate=policy, **GREEDY)
            assert (got.usage.disaggregated, got.usage.route_reason) == (False, "no_prefill_workers")
        with pytest.raises(InvalidArgumentError):
            c.complete(SHORT, disaggregate="bogus", **GREEDY)


def test_a_request_run_whole_on_a_decode_worker_that_dies_moves_on(tiny_hf_dir, tiny_llm):
    sampling = dict(temperature=0, max_tokens=200, ignore_eos=True)
    want = tiny_llm.generate(SHORT, tandem.SamplingParams(**sampling))[0]
    with InProcessPipeline(config(tiny_hf_dir, replicas={"prefill": 1, "decode": 2}, disaggregate="auto")) as p:
        for name in ("decode-0", "decode-1"):
            pace(p, name)
        chunks = stream_with_fault(p, lambda: p.kill(running(p, ["decode-0", "decode-1"])), SHORT, **sampling)
        assert stats(p, "prefill-0")["requests"] == 0  # it never left the decode workers
    assert joined(chunks) == (want.token_ids, want.text)
    assert chunks[-1].usage.completion_tokens == 200
    assert (chunks[-1].usage.disaggregated, chunks[-1].usage.route_reason) == (False, "short_prompt")
