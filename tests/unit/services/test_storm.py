"""A storm at the gateway: random mixes of requests that finish, are cancelled early (before the
first token, mid-stream), run out their deadline, or whose HTTP client disconnects or times out,
all at once, over gRPC and the OpenAI HTTP API (hypothesis, bounded).

Whatever the mix, once the storm is over: every KV block is free on every worker, no request is
left running or waiting anywhere, the gateway counts nothing in flight, and the pipeline still
answers a greedy request with the library's tokens. (Issue 15: a client dropping its stream killed
a worker's engine thread, and every later request routed there failed.)
"""
from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tandem
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import AsyncClient
from tandem.sdk import DeadlineExceededError
from tests.unit.services.test_pipeline import GREEDY, PROMPTS, config, stats, wait_until

WORKERS = ("prefill-0", "decode-0", "decode-1")
KINDS = ("finish", "cancel", "deadline", "http_finish", "http_disconnect", "http_timeout")
MAX_EXAMPLES = 6  # each example is one storm of up to 10 concurrent requests: ~2-4 s here


@pytest.fixture(scope="module")
def pipe(tiny_hf_dir):
    cfg = config(tiny_hf_dir, replicas={"prefill": 1, "decode": 2}, speculative={"method": "ngram", "k": 3})
    with InProcessPipeline(cfg) as p:
        yield p


action = st.fixed_dictionaries({
    "kind": st.sampled_from(KINDS),
    "prompt": st.sampled_from(PROMPTS),
    "after": st.sampled_from([0, 0.001, 0.01, 0.05, 0.2]),  # seconds before the cancel / the deadline
    "tokens": st.integers(0, 4),  # stream chunks read before a cancel or disconnect
    "n": st.sampled_from([1, 1, 2]),
    "temperature": st.sampled_from([0.0, 0.8]),
    "speculative": st.booleans(),
})


async def _grpc(client: AsyncClient, a: dict) -> None:
    sampling = dict(temperature=a["temperature"], n=a["n"], ignore_eos=True, seed=3,
                    max_tokens=300 if a["kind"] != "finish" else 8)
    if not a["speculative"]:
        sampling["speculative"] = {"method": "none"}
    timeout = a["after"] + 0.02 if a["kind"] == "deadline" else 60
    stream = client.generate(a["prompt"], timeout=timeout, **sampling)
    try:
        read = 0
        async for _ in stream:
            read += 1
            if a["kind"] == "cancel" and read > a["tokens"]:
                break
    except DeadlineExceededError:  # as asked
        assert a["kind"] == "deadline"
    finally:
        await stream.aclose()


async def _http(http: httpx.AsyncClient, model: str, a: dict) -> None:
    body = {"model": model, "prompt": a["prompt"], "n": a["n"], "temperature": a["temperature"], "seed": 3,
            "ignore_eos": True, "stream": a["kind"] != "http_timeout",
            "max_tokens": 8 if a["kind"] == "http_finish" else 300}
    try:
        if a["kind"] == "http_timeout":  # a whole (non-streamed) answer the client gives up on
            await http.post("/v1/completions", json=body, timeout=a["after"] + 0.02)
            return
        async with http.stream("POST", "/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200, await response.aread()
            read = 0
            async for _ in response.aiter_lines():
                read += 1
                if a["kind"] == "http_disconnect" and read > a["tokens"]:
                    break  # leaving the block closes the connection mid-stream
    except httpx.TimeoutException:
        assert a["kind"] == "http_timeout"


async def _storm(pipe, actions: list[dict]) -> None:
    model = pipe.config.model
    async with AsyncClient(pipe.address, timeout=60, max_retries=0) as client, \
            httpx.AsyncClient(base_url=f"http://{pipe.http_address}") as http:
        async def one(a: dict) -> None:
            if a["kind"] == "cancel" and a["tokens"] == 0:  # cancelled before any token: the race
                task = asyncio.create_task(_grpc(client, a))
                await asyncio.sleep(a["after"])
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return
            await (_http(http, model, a) if a["kind"].startswith("http") else _grpc(client, a))

        await asyncio.wait_for(asyncio.gather(*(one(a) for a in actions)), 120)


def _settled(pipe) -> bool:
    gateway = pipe.hosts["gateway-0"].registrations[0].servicer
    if gateway.inflight:
        return False
    for name in WORKERS:
        s = stats(pipe, name)
        if s["kv_blocks_used"] or s["running"] or s["waiting"]:
            return False
    return True


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(actions=st.lists(action, min_size=3, max_size=10))
def test_a_storm_of_cancels_deadlines_and_disconnects_leaves_nothing_behind(pipe, tiny_llm, actions):
    asyncio.run(_storm(pipe, actions))
    assert wait_until(lambda: _settled(pipe), timeout=30), {n: stats(pipe, n) for n in WORKERS}
    for name in WORKERS:  # every engine thread survived the storm
        assert pipe.hosts[name].healthy(), name
    want = tiny_llm.generate(PROMPTS[1], tandem.SamplingParams(**GREEDY))[0].token_ids

    async def check() -> list[list[int]]:  # both decode workers are asked (least loaded, then round robin)
        async with AsyncClient(pipe.address, timeout=60) as c:
            return [(await c.complete(PROMPTS[1], **GREEDY)).token_ids for _ in range(2)]

    assert asyncio.run(check()) == [want, want]
