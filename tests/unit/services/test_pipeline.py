"""The whole pipeline over gRPC on loopback, in one process (no Ray), on the tiny random model:
gateway -> tokenizer -> prefill -> KV-cache store -> decode, through the SDK.

Greedy output equals tandem.LLM's in both modes; 16 concurrent streams complete; a cancelled
stream frees its blocks everywhere; a repeated prefix hits the prefix cache and the KV store;
bad input, a full gateway and a missing API key get their status codes; health follows the engine.
"""
from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import tandem
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import (AsyncClient, Client, DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError,
                        UnauthenticatedError)
from tandem.services.config import PipelineConfig
from tandem.v1 import common_pb2, decode_pb2_grpc, draft_pb2_grpc, kvstore_pb2_grpc, prefill_pb2, prefill_pb2_grpc

GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["hello world", "To be, or not to be, that is the question:",
           "First Citizen:\nBefore we proceed any further, hear me speak." * 3, "a"]


def config(tiny_hf_dir, **overrides) -> PipelineConfig:
    # These tests exercise the hand-off, so every request takes it (the tiny model's prompts are
    # all short: auto would run them whole on a decode worker); test_disaggregation.py tests auto.
    # mode: disaggregated whatever this machine's size (mode auto picks aggregated on < 8 cores).
    overrides.setdefault("disaggregate", "always")
    overrides.setdefault("mode", "disaggregated")
    return PipelineConfig(model=str(tiny_hf_dir), grpc_port=0, http_port=0, kv_cache_memory=16 << 20, kv_store_bytes=64 << 20,
                          **overrides)


@pytest.fixture(scope="module")
def pipe(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, replicas={"prefill": 2, "decode": 1})) as p:
        yield p


@pytest.fixture(scope="module")
def client(pipe):
    with Client(pipe.address, timeout=60) as c:
        yield c


def stats(pipe, name: str) -> dict:
    channel = grpc.insecure_channel(pipe.address_of(name))
    stub = (kvstore_pb2_grpc.KVStoreStub if name.startswith("kvstore") else
            decode_pb2_grpc.DecodeStub if name.startswith("decode") else prefill_pb2_grpc.PrefillStub)(channel)
    try:
        return dict(stub.Stats(common_pb2.StatsRequest(), timeout=10).values)
    finally:
        channel.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_greedy_output_equals_the_library(tiny_llm, client):
    params = tandem.SamplingParams(**GREEDY)
    for prompt in PROMPTS:
        want = tiny_llm.generate(prompt, params)[0]
        got = client.complete(prompt, **GREEDY)
        assert got.token_ids == want.token_ids and got.text == want.text, prompt
        assert got.finish_reason == "length"
        assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 12
        assert got.timings.ttft > 0 and got.timings.e2e >= got.timings.ttft


def test_aggregated_mode_gives_the_same_tokens(tiny_hf_dir, tiny_llm):
    params = tandem.SamplingParams(**GREEDY)
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated")) as agg, Client(agg.address) as c:
        for prompt in PROMPTS[:2]:
            assert c.complete(prompt, **GREEDY).token_ids == tiny_llm.generate(prompt, params)[0].token_ids


def test_token_id_prompts_stop_strings_and_n_samples(tiny_llm, client):
    ids = tiny_llm.tokenize(PROMPTS[1])
    want = tiny_llm.generate([ids], tandem.SamplingParams(**GREEDY))[0]
    assert client.complete(ids, **GREEDY).token_ids == want.token_ids
    stop = want.text[3:6]
    if stop:
        got = client.complete(ids, stop=[stop], **GREEDY)
        assert got.finish_reason == "stop" and stop not in got.text
    many = client.complete(PROMPTS[0], n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    assert len(many.texts) == 3 and all(len(t) == 6 for t in many.sample_token_ids)
    assert many.usage.completion_tokens == 18
    again = client.complete(PROMPTS[0], n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    assert again.sample_token_ids == many.sample_token_ids  # a seed reproduces through the pipeline


def test_sixteen_concurrent_streams_complete(tiny_llm, pipe):
    prompts = [f"{random.Random(i).choice(PROMPTS)} {i}" for i in range(16)]
    params = tandem.SamplingParams(**GREEDY)
    want = [o.token_ids for o in tiny_llm.generate(prompts, params)]

    async def main():
        async with AsyncClient(pipe.address, timeout=120) as c:
            results = await asyncio.gather(*(c.complete(p, **GREEDY) for p in prompts))
        return [r.token_ids for r in results]

    assert asyncio.run(main()) == want
    assert wait_until(lambda: stats(pipe, "decode-0")["kv_blocks_used"] == 0)


def test_cancelling_a_stream_frees_its_blocks_everywhere(client, pipe):
    stream = client.generate(PROMPTS[2], temperature=0, max_tokens=400, ignore_eos=True)
    got = [next(stream) for _ in range(3)]
    assert all(c.token_ids for c in got)
    assert stats(pipe, "decode-0")["running"] == 1
    stream.close()  # leaving the stream cancels the call
    assert wait_until(lambda: stats(pipe, "decode-0")["running"] == 0)
    for name in ("decode-0", "prefill-0", "prefill-1"):
        assert wait_until(lambda: stats(pipe, name)["kv_blocks_used"] == 0), name


def test_a_deadline_ends_the_request_and_frees_its_blocks(client, pipe):
    with pytest.raises(DeadlineExceededError):
        client.complete(PROMPTS[2], temperature=0, max_tokens=400, ignore_eos=True, timeout=0.1)
    assert wait_until(lambda: stats(pipe, "decode-0")["running"] == 0)
    assert wait_until(lambda: stats(pipe, "decode-0")["kv_blocks_used"] == 0)


def test_a_repeated_prefix_is_served_from_the_caches(client, pipe, tiny_llm):
    prefix = "Now is the winter of our discontent made glorious summer by this sun of York; " * 3
    first = client.complete(prefix + "and all the clouds", **GREEDY)
    second = client.complete(prefix + "that loured upon our house", **GREEDY)
    a, b = tiny_llm.tokenize(prefix + "and all the clouds"), tiny_llm.tokenize(prefix + "that loured upon our house")
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    shared = common // 16 * 16  # whole blocks of the common token prefix
    assert shared >= 64
    assert first.usage.cached_tokens < shared <= second.usage.cached_tokens
    # The other prefill worker has none of it locally: it must fetch the blocks from the store.
    prompt = tiny_llm.tokenize(prefix + "but now")
    local = {}
    for name in ("prefill-0", "prefill-1"):
        with grpc.insecure_channel(pipe.address_of(name)) as channel:
            local[name] = prefill_pb2_grpc.PrefillStub(channel).CachedPrefix(
                prefill_pb2.CachedPrefixRequest(prompt_ids=prompt), timeout=10).num_cached_tokens
    other = min(local, key=local.get)
    assert local[other] == 0 and max(local.values()) >= shared  # the router kept the prefix on one worker
    store_hits = stats(pipe, "kvstore-0")["hits"]
    with grpc.insecure_channel(pipe.address_of(other)) as channel:
        answer = prefill_pb2_grpc.PrefillStub(channel).Prefill(prefill_pb2.PrefillRequest(
            request_id="direct", prompt_ids=prompt,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2)), timeout=30)
    assert answer.num_cached_tokens >= shared
    assert stats(pipe, "kvstore-0")["hits"] > store_hits


def test_the_router_asks_for_the_salted_prefix_of_a_salted_request(client, pipe, tiny_llm):
    """Regression: the router's CachedPrefix question left out the request's cache_salt, so the
    workers scored the unsalted chain and a salted request was sent away from its own blocks."""
    prefix = "Is this a dagger which I see before me, the handle toward my hand? Come, let me clutch thee. " * 3
    salted = common_pb2.SamplingParams(temperature=0, max_tokens=2, cache_salt="tenant-b")
    with grpc.insecure_channel(pipe.address_of("prefill-1")) as channel:  # only prefill-1 holds it
        prefill_pb2_grpc.PrefillStub(channel).Prefill(prefill_pb2.PrefillRequest(
            request_id="seed-salted", prompt_ids=tiny_llm.tokenize(prefix + "x"), sampling=salted), timeout=30)

    def held(name: str) -> int:
        with grpc.insecure_channel(pipe.address_of(name)) as channel:
            return prefill_pb2_grpc.PrefillStub(channel).CachedPrefix(prefill_pb2.CachedPrefixRequest(
                prompt_ids=tiny_llm.tokenize(prefix), cache_salt="tenant-b"), timeout=10).num_cached_tokens

    assert held("prefill-0") == 0 and held("prefill-1") >= 64
    client.complete(prefix + "thou marshall'st me the way", cache_salt="tenant-b", **GREEDY)
    assert held("prefill-0") == 0  # routed to prefill-1, where its salted blocks are


def test_bad_input_is_invalid_argument_with_the_library_message(client, tiny_llm):
    with pytest.raises(ValueError) as library:
        tandem.SamplingParams(max_tokens=0)
    with pytest.raises(InvalidArgumentError) as remote:
        client.complete("hi", max_tokens=0)
    assert remote.value.details() == str(library.value)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(n=0), dict(logit_bias={5: 1000})):
        with pytest.raises(InvalidArgumentError):
            client.complete("hi", **bad)
    with pytest.raises(InvalidArgumentError, match="out of range"):
        client.complete([1, 2, 10**6], max_tokens=2)
    with pytest.raises(InvalidArgumentError, match="empty"):
        client.complete("", max_tokens=2)
    with pytest.raises(InvalidArgumentError, match="context window"):
        client.complete([5] * (tiny_llm.max_model_len + 1), max_tokens=2)


def test_a_full_gateway_answers_resource_exhausted(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, max_inflight=1, mode="aggregated")) as p, Client(p.address) as c:
        running = c.generate(PROMPTS[0], temperature=0, max_tokens=400, ignore_eos=True)
        next(running)
        with pytest.raises(ResourceExhaustedError, match="limit of 1"):
            c.complete(PROMPTS[0], max_tokens=2)
        running.close()


def test_api_keys(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, api_keys=["sk-test"], mode="aggregated")) as p:
        with Client(p.address) as c, pytest.raises(UnauthenticatedError, match="missing"):
            c.complete("hi", max_tokens=2)
        with Client(p.address, api_key="wrong") as c, pytest.raises(UnauthenticatedError, match="invalid"):
            c.tokenize("hi")
        with Client(p.address, api_key="sk-test") as c:
            # ignore_eos: an unseeded sample of the tiny random model may draw EOS first (seen once)
            assert c.complete("hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        channel = grpc.insecure_channel(p.address)  # probes need no key
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()


def test_every_service_serves_health_and_reflection(pipe):
    for name, host in pipe.hosts.items():
        channel = grpc.insecure_channel(host.address)
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING, name
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for r in responses for s in r.list_services_response.service}
        assert "grpc.health.v1.Health" in services and any(s.startswith("tandem.v1.") for s in services), name
        channel.close()


def test_health_is_not_serving_when_the_engine_is_dead(tiny_hf_dir):
    # No other worker serves: a request waits worker_wait_s for one (a restart), then gets UNAVAILABLE.
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated", migration={"worker_wait_s": 1.0})) as p:
        worker = p.hosts["worker-0"]
        channel = grpc.insecure_channel(worker.address)
        stub = health_pb2_grpc.HealthStub(channel)
        check = lambda: stub.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Decode"), timeout=5).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.SERVING
        worker.registrations[0].servicer.worker.engine.shutdown()  # the engine thread stops; the process lives
        assert wait_until(lambda: check() == health_pb2.HealthCheckResponse.NOT_SERVING)
        with Client(p.address, max_retries=0) as c, pytest.raises(Exception) as err:
            c.complete("hi", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no decode worker is serving" in str(err.value)
        channel.close()


def test_logprobs_through_the_pipeline(client, tiny_llm):
    """The first token's logprob comes from the prefill worker, the rest from decode: all equal a
    full forward's, and the SDK hands them out per sample."""
    got = client.complete(PROMPTS[1], logprobs=2, **GREEDY)
    ids = tiny_llm.tokenize(PROMPTS[1])
    want = tiny_llm.score(ids + got.token_ids).logprobs[len(ids) - 1:]
    assert [lp.token_id for lp in got.logprobs] == got.token_ids
    assert [lp.logprob for lp in got.logprobs] == pytest.approx(want, abs=1e-4)
    assert all(len(lp.top) == 2 and lp.top[0].token_id == lp.token_id for lp in got.logprobs)
    assert got.logprobs[0].token == tiny_llm.tokenizer.decode_bytes([got.token_ids[0]], skip_special_tokens=False)
    assert client.complete(PROMPTS[1], **GREEDY).logprobs == []


def test_tokenize_detokenize_chat_and_models(client, tiny_llm):
    ids = client.tokenize("hello world")
    assert ids == tiny_llm.tokenize("hello world")
    assert client.detokenize(ids) == "hello world"
    models = client.list_models()
    assert models and models[0]["max_model_len"] == tiny_llm.max_model_len


def test_client_request_ids_are_echoed_and_may_repeat(pipe):
    async def main():
        async with AsyncClient(pipe.address, timeout=60) as c:
            return await asyncio.gather(*(c.complete(p, request_id="mine", **GREEDY) for p in PROMPTS[:3]))

    results = asyncio.run(main())
    assert [r.request_id for r in results] == ["mine"] * 3 and all(len(r.token_ids) == 12 for r in results)


def test_tls_on_the_gateway(tiny_hf_dir, tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated", tls_cert=str(cert), tls_key=str(key))) as p:
        with Client(p.address, tls=str(cert), timeout=30) as c:
            # ignore_eos: an unseeded sample of the tiny random model may draw EOS first (seen once)
            assert c.complete("hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        with Client(p.address, timeout=5, max_retries=0) as plain, pytest.raises(Exception) as err:
            plain.tokenize("hi")  # a plaintext client cannot talk to a TLS gateway
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        import ssl

        import httpx  # the HTTP API is HTTPS with the same certificate

        host_port = p.http_address
        trust = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"https://{host_port}/health", verify=trust).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{host_port}/health", timeout=5)


def test_speculative_decoding_through_the_pipeline(tiny_hf_dir, tiny_llm):
    """A server default that drafts in the draft service, and a per-request override, both give
    the library's greedy tokens and report their guesses in usage. Remote guesses are asked ahead
    and used when they arrive in time (tandem.engine.spec_decode): the tiny model steps in a few
    milliseconds, so the requests here are long enough for answers to catch up."""
    prompt = ([17, 42, 99, 5, 8] * 8)[:37]
    greedy = {**GREEDY, "max_tokens": 48}
    want = tiny_llm.generate([prompt], tandem.SamplingParams(**greedy))[0].token_ids
    # The tiny model drafting for itself: right every time (n-gram would rarely match random text).
    remote = {"method": "remote", "k": 4, "options": {"method": "draft_model", "options": {"quantization": None}}}
    with InProcessPipeline(config(tiny_hf_dir, speculative=remote)) as p, Client(p.address, timeout=60) as c:
        got = c.complete(prompt, **greedy)
        assert got.token_ids == want and got.usage.spec_proposed_tokens > 0
        assert stats(p, "decode-0")["spec_proposed_tokens"] > 0
        with grpc.insecure_channel(p.address_of("draft-0")) as channel:
            draft = draft_pb2_grpc.DraftStub(channel).Stats(common_pb2.StatsRequest(), timeout=5).values
        assert draft["requests"] > 0  # the guesses came from the draft service
        off = c.complete(prompt, speculative=None, **greedy)
        assert off.token_ids == want and off.usage.spec_proposed_tokens == 0
        with pytest.raises(InvalidArgumentError, match="options come from the server"):  # the operator's alone
            c.complete(prompt, speculative={"method": "draft_model", "k": 3, "options": {"model": "/etc/passwd"}},
                       max_tokens=2)
        with pytest.raises(InvalidArgumentError, match="not enabled"):  # installed, but the operator did not enable it
            c.complete(prompt, speculative={"method": "draft_model", "k": 3}, max_tokens=2)
        for _ in range(3):  # remote guesses are never waited for: on a busy machine none may land in time
            fewer = c.complete(prompt, speculative={"method": "remote", "k": 2}, **greedy)  # the server's options
            assert fewer.token_ids == want and fewer.usage.spec_accepted_tokens == fewer.usage.spec_proposed_tokens
            if fewer.usage.spec_proposed_tokens:
                break
        assert fewer.usage.spec_proposed_tokens > 0
        with pytest.raises(InvalidArgumentError, match="speculative k"):
            c.complete(prompt, speculative={"method": "ngram", "k": 99}, max_tokens=2)


def test_a_dead_kv_store_costs_recomputation_not_requests(tiny_hf_dir, tiny_llm):
    with InProcessPipeline(config(tiny_hf_dir)) as p, Client(p.address, timeout=60) as c:
        p.hosts.pop("kvstore-0").stop()
        prompt = PROMPTS[2]
        got = c.complete(prompt, **GREEDY)
        assert got.token_ids == tiny_llm.generate(prompt, tandem.SamplingParams(**GREEDY))[0].token_ids
        assert stats(p, "prefill-0")["kv_store_errors"] > 0 and stats(p, "decode-0")["kv_store_errors"] > 0
