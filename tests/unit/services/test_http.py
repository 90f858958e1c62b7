"""The gateway's OpenAI-compatible HTTP API, driven by the official `openai` client (and raw httpx
where the client hides the wire), on the in-process pipeline with the tiny model.

Outputs equal the library's; streaming equals non-streaming; logprobs match a full forward; n,
seed and stop behave; errors come back in OpenAI's format with the right HTTP status; API keys,
body limits and the in-flight limit hold; /metrics moves after requests; a client that goes
away frees its KV blocks.
"""
from __future__ import annotations

import json
import re
import threading

import httpx
import openai
import pytest

import tandem
from tandem.orchestration.local import InProcessPipeline
from tests.unit.services.test_pipeline import GREEDY, PROMPTS, config, stats, wait_until

LOGPROB_TOLERANCE = 1e-4  # fp32, paged batched decode vs a dense teacher-forced forward


@pytest.fixture(scope="module")
def pipe(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, replicas={"prefill": 1, "decode": 1})) as p:
        yield p


@pytest.fixture(scope="module")
def oai(pipe):
    with openai.OpenAI(base_url=f"http://{pipe.http_address}/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def extra(**kwargs) -> dict:
    return {"extra_body": kwargs}


def test_models_lists_the_served_model(oai, tiny_llm, tiny_hf_dir):
    models = oai.models.list().data
    assert [m.id for m in models] == [tiny_hf_dir.name]
    assert models[0].model_extra["max_model_len"] == tiny_llm.max_model_len


def test_completions_equal_the_library(oai, model, tiny_llm):
    params = tandem.SamplingParams(**GREEDY)
    for prompt in PROMPTS[:3]:
        want = tiny_llm.generate(prompt, params)[0]
        got = oai.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, **extra(ignore_eos=True))
        assert got.object == "text_completion" and got.id.startswith("cmpl-")
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
        assert got.usage.prompt_tokens == len(want.prompt_token_ids) and got.usage.completion_tokens == 12
        assert got.usage.total_tokens == got.usage.prompt_tokens + 12


def test_token_prompts_and_several_prompts_with_n(oai, model, tiny_llm):
    ids = tiny_llm.tokenize(PROMPTS[1])
    by_ids = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0, **extra(ignore_eos=True))
    by_text = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, temperature=0,
                                     **extra(ignore_eos=True))
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = oai.completions.create(model=model, prompt=[PROMPTS[0], PROMPTS[1]], n=2, max_tokens=5, temperature=0,
                                  **extra(ignore_eos=True))
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[2].text == both.choices[3].text == by_text.choices[0].text[:len(both.choices[2].text)]
    assert both.usage.completion_tokens == 4 * 5


def test_streaming_equals_the_whole_answer(oai, model):
    kwargs = dict(model=model, prompt=PROMPTS[2], max_tokens=16, temperature=0, **extra(ignore_eos=True))
    whole = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16


def test_chat_whole_and_streamed(oai, model, tiny_llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    prompt = tiny_llm.tokenizer.apply_chat_template(messages)
    want = tiny_llm.generate(tiny_llm.tokenizer.encode(prompt, parse_special=True),
                             tandem.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    whole = oai.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                        **extra(ignore_eos=True))
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == want.text
    assert whole.usage.prompt_tokens == len(want.prompt_token_ids)
    chunks = list(oai.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True},
                                              **extra(ignore_eos=True)))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    as_parts = oai.chat.completions.create(model=model, messages=[messages[0], {"role": "user", "content": parts}],
                                           max_tokens=10, temperature=0, **extra(ignore_eos=True))
    assert as_parts.choices[0].message.content == want.text


def test_chat_without_max_tokens_may_fill_the_context(oai, model, tiny_llm):
    got = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                      **extra(ignore_eos=True))
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens + got.usage.completion_tokens == tiny_llm.max_model_len


def test_logprobs_match_a_full_forward(oai, model, tiny_llm):
    got = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3,
                                 **extra(ignore_eos=True))
    lp = got.choices[0].logprobs
    ids = tiny_llm.tokenize(PROMPTS[1])
    out = tiny_llm.generate(PROMPTS[1], tandem.SamplingParams(**{**GREEDY, "max_tokens": 6}))[0].token_ids
    want = tiny_llm.score(ids + out).logprobs[len(ids) - 1:]
    assert len(lp.token_logprobs) == 6 and all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx(want, abs=LOGPROB_TOLERANCE)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3,
                                    stream=True, **extra(ignore_eos=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs  # chunks carry their own tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    chat = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2, **extra(ignore_eos=True))
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob and entry.bytes


def test_seed_n_and_stop(oai, model):
    kwargs = dict(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, n=3, seed=1234,
                  **extra(ignore_eos=True))
    a, b = oai.completions.create(**kwargs), oai.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # sample i uses seed + i
    free = oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, temperature=0,
                                  **extra(ignore_eos=True)).choices[0].text
    stop = free[3:5]
    got = oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[stop],
                                 **extra(ignore_eos=True)).choices[0]
    assert got.finish_reason == "stop" and got.text == free[:free.index(stop)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_p=0), "top_p"),
    (dict(echo=True), "echo"),
    (dict(best_of=3), "best_of"),
    (dict(logprobs=21), "logprobs"),
    (dict(logit_bias={"x": 1}), "logit_bias"),
    (dict(prompt="x" * 5000), "context|longer|too long"),
])
def test_bad_input_is_a_400_in_openais_format(oai, model, kwargs, match):
    kwargs = {"prompt": "hi", **kwargs}
    with pytest.raises(openai.BadRequestError, match=match) as err:
        oai.completions.create(model=model, **kwargs)
    body = err.value.body
    assert err.value.status_code == 400 and body["type"] == "invalid_request_error" and body["message"]


def test_wire_errors(pipe, model):
    base = f"http://{pipe.http_address}/v1"
    missing = httpx.post(f"{base}/completions", json={"model": model})
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]["message"]
    not_json = httpx.post(f"{base}/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and set(not_json.json()["error"]) == {"message", "type", "param", "code"}
    unknown = httpx.post(f"{base}/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    tools = httpx.post(f"{base}/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}],
                                                          "tools": [{"type": "function"}]})
    assert tools.status_code == 400 and "tools" in tools.json()["error"]["message"]
    assert httpx.get(f"http://{pipe.http_address}/health").status_code == 200


def test_api_keys_body_limit_and_inflight_limit(tiny_hf_dir):
    cfg = config(tiny_hf_dir, api_keys=["sk-test"], mode="aggregated", max_inflight=1, max_message_bytes=64 << 10)
    with InProcessPipeline(cfg) as p:
        base = f"http://{p.http_address}/v1"
        with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        assert httpx.get(f"{base}/models").status_code == 401
        assert httpx.get(f"http://{p.http_address}/metrics").status_code == 200  # scrapers need no key
        with openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0, timeout=60) as good:
            model = good.models.list().data[0].id
            big = httpx.post(f"{base}/completions", headers={"authorization": "Bearer sk-test"},
                             json={"model": model, "prompt": "x" * (80 << 10)})
            assert big.status_code == 413 and "exceeds" in big.json()["error"]["message"]
            running = good.completions.create(model=model, prompt=PROMPTS[0], max_tokens=400, stream=True,
                                              temperature=0, **extra(ignore_eos=True))
            next(iter(running))
            with pytest.raises(openai.RateLimitError, match="limit of 1"):
                good.completions.create(model=model, prompt="hi", max_tokens=2)
            running.close()
            def admitted() -> bool:  # the closed stream's slot comes back
                try:
                    return good.completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2
                except openai.RateLimitError:
                    return False

            assert wait_until(admitted)


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


def test_metrics_move_after_requests(pipe, oai, model):
    url = f"http://{pipe.http_address}/metrics"
    before = httpx.get(url).text
    for _ in range(3):
        oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=7, temperature=0, **extra(ignore_eos=True))
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="hi", temperature=-1)
    after = httpx.get(url).text
    delta = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)  # noqa: E731
    assert delta("tandem_requests_total", api="http", endpoint="completions", status="OK") == 3
    assert delta("tandem_generation_tokens_total", api="http") == 21
    assert delta("tandem_prompt_tokens_total", api="http") > 0
    assert delta("tandem_time_to_first_token_seconds_count", api="http") == 3
    assert delta("tandem_inter_token_latency_seconds_count", api="http") == 3 * 6
    assert delta("tandem_e2e_request_latency_seconds_count", api="http") == 3
    assert metric(after, "tandem_kv_cache_blocks_total", service="decode") > 0
    assert metric(after, "tandem_kv_cache_blocks_used", service="decode") == 0  # all finished
    assert delta("tandem_prefix_cache_queries_tokens_total", service="prefill") > 0
    assert delta("tandem_prefix_cache_hits_tokens_total", service="prefill") > 0  # the same prompt thrice
    for service in ("tokenizer", "prefill", "decode", "kvstore", "draft", "retrieval"):
        assert metric(after, "tandem_service_up", service=service) == 1, service
    assert delta("tandem_service_requests_total", service="tokenizer") >= 3
    assert metric(after, "tandem_num_requests_running", service="decode") == 0
    assert "# HELP tandem_spec_decode_num_accepted_tokens_total" in after
    assert metric(after, "tandem_kv_connector_loading_requests", service="decode") == 0  # nothing left waiting
    assert metric(after, "tandem_kv_connector_store_errors_total", service="prefill") == 0
    assert "# HELP tandem_kv_connector_blocks_loaded_total" in after


def test_a_client_that_goes_away_frees_its_blocks(pipe, model):
    url = f"http://{pipe.http_address}/metrics"
    def cancelled() -> float:
        return metric(httpx.get(url).text, "tandem_requests_total", api="http", status="CANCELLED")

    before = cancelled()
    body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"http://{pipe.http_address}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        assert first["choices"][0]["index"] == 0
        assert wait_until(lambda: stats(pipe, "decode-0")["running"] == 1)  # the first token came from prefill
    assert wait_until(lambda: stats(pipe, "decode-0")["running"] == 0)
    assert wait_until(lambda: stats(pipe, "decode-0")["kv_blocks_used"] == 0)
    assert cancelled() == before + 1  # ended by the disconnect, not by running to max_tokens


@pytest.mark.xfail(strict=False, reason="known fault, open: a non-streaming request whose client times out is "
                   "sometimes not noticed (services/http.py _until_disconnected) and runs to completion; "
                   "seen in about 1 run in 3 on a busy 2-core machine")
def test_a_non_streaming_client_that_times_out_cancels_its_request(pipe, model):
    url = f"http://{pipe.http_address}/metrics"

    def cancelled() -> float:
        return metric(httpx.get(url).text, "tandem_requests_total", api="http", status="CANCELLED")

    before = cancelled()
    body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    done = threading.Event()

    def whole():  # a non-streaming request whose client times out, long before its 8 samples could finish
        try:
            httpx.post(f"http://{pipe.http_address}/v1/completions", json={**body, "stream": False, "n": 8},
                       timeout=0.5)
        except httpx.TimeoutException:
            pass
        done.set()

    threading.Thread(target=whole).start()
    assert wait_until(lambda: stats(pipe, "decode-0")["running"] >= 1)
    assert done.wait(10)
    assert wait_until(lambda: stats(pipe, "decode-0")["running"] == 0)
    assert wait_until(lambda: stats(pipe, "decode-0")["kv_blocks_used"] == 0)
    assert wait_until(lambda: cancelled() == before + 1)  # counted when the gateway's call unwinds


def refuses(url: str, body: dict | None = None) -> bool:
    """A draining gateway answers 503 ("the gateway is draining"), or has closed its port already."""
    try:
        response = httpx.post(url, json=body, timeout=5) if body else httpx.get(url, timeout=5)
    except httpx.ConnectError:
        return True
    return response.status_code == 503


def test_a_draining_gateway_finishes_what_it_started_and_refuses_the_rest(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated")) as p:
        base = f"http://{p.http_address}"
        body = {"prompt": PROMPTS[0], "max_tokens": 150, "temperature": 0, "stream": True, "ignore_eos": True}
        stopper = threading.Thread(target=p.hosts["gateway-0"].stop)
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            stopper.start()
            assert wait_until(lambda: refuses(f"{base}/health"), timeout=5)  # probes see it first
            assert refuses(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 2})
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"  # ran to the end
        stopper.join(30)
