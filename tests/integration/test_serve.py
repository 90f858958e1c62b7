"""`tandem serve` as a user runs it: a subprocess starting local Ray with one actor per service,
the real default model, and the SDK against its gateway. Greedy output equals tandem.LLM's;
streams whose decode worker is killed mid-way wait for Ray's restart and finish with the same
text (more faults: test_serve_faults.py); Ctrl-C stops everything; internal services refuse calls without the pipeline
token (the one in $TANDEM_INTERNAL_TOKEN here; a random one when none is set), which is never printed;
the openai client picks a LoRA adapter by `model` (one loaded at start, one at run time)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

import tandem
from tandem.orchestration.topology import free_port
from tandem.sdk import Client
from tandem.v1 import common_pb2, decode_pb2_grpc

START_TIMEOUT_S = 420
TOKEN = "integration-test-pipeline-token-0123456789"
WITH_TOKEN = [("authorization", f"Bearer {TOKEN}")]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]


class Server:
    def __init__(self, *args: str):
        if "--mode" not in args and "--config" not in args:  # the hand-off, disaggregated on any machine
            args = ("--mode", "disaggregated", *args)  # (mode auto picks aggregated below 8 cores)
        self.port, self.http_port = free_port(), free_port()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tandem.cli", "serve", "--grpc-port", str(self.port),
             "--http-port", str(self.http_port),
             "--object-store-memory", str(100 << 20), "--kv-cache-memory", str(256 << 20), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "RAY_DEDUP_LOGS": "0", "TANDEM_INTERNAL_TOKEN": TOKEN})
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "gateway listening" in line:
                self.ready.set()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready.wait(1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("tandem serve did not start:\n" + "\n".join(self.lines[-40:]))

    def address_of(self, name: str) -> str:
        for line in self.lines:
            match = re.match(rf"\s+{re.escape(name)}\s+(\S+)$", line)
            if match:
                return match.group(1)
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def adapters(default_llm, tmp_path_factory):
    """Two random LoRA adapters for the default model: "one" the server loads at start, "two" the
    test loads at run time from the server's runtime_lora_dir."""
    from tandem.model.lora import write_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("one", 1), ("two", 2)):
        write_random_adapter(root / name, default_llm.config, rank=8, seed=seed, scale=0.05)
    return root


@pytest.fixture(scope="module")
def server(adapters):
    s = Server("--disaggregate", "always",  # the hand-off for every request (auto runs short prompts whole)
               "--lora-modules", f"one={adapters / 'one'}", "--max-loras", "2", "--runtime-lora-dir", str(adapters))
    s.wait_ready()
    yield s
    assert s.stop() == 0, "\n".join(s.lines[-30:])


def decode_stats(server) -> dict:
    with grpc.insecure_channel(server.address_of("decode-0")) as channel:
        return dict(decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.StatsRequest(), timeout=10,
                                                              metadata=WITH_TOKEN).values)


def test_internal_services_require_the_pipeline_token(server):
    with grpc.insecure_channel(server.address_of("decode-0")) as channel, pytest.raises(grpc.RpcError) as refused:
        decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.StatsRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert decode_stats(server)["pid"] > 0
    assert "pipeline token (configured)" in "\n".join(server.lines)
    assert not any(TOKEN in line for line in server.lines)


def test_sdk_greedy_output_equals_the_library(server, default_llm):
    params = tandem.SamplingParams(temperature=0, max_tokens=24)
    want = default_llm.generate(PROMPTS, params)
    with Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        for prompt, expected in zip(PROMPTS, want):
            got = client.complete(prompt, temperature=0, max_tokens=24)
            assert got.token_ids == expected.token_ids and got.text == expected.text, prompt
        chat = client.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0,
                           max_tokens=16)
        assert chat.text == default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                                             tandem.SamplingParams(temperature=0, max_tokens=16)).text


def test_generate_cli_against_the_server(server, default_llm):
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "--server", f"127.0.0.1:{server.port}",
                          "--max-tokens", "12", PROMPTS[0]], capture_output=True, text=True, timeout=120)
    want = default_llm.generate(PROMPTS[0], tandem.SamplingParams(temperature=0, max_tokens=12))[0].text
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == PROMPTS[0] + want


def test_the_openai_client_against_the_server(server, default_llm):
    """The official openai client: completions, chat and streaming, greedy output equal to the library's."""
    import httpx
    import openai

    base = f"http://127.0.0.1:{server.http_port}"
    assert any(f"{base}/v1" in line for line in server.lines)  # serve prints where the API is
    with openai.OpenAI(base_url=f"{base}/v1", api_key="none", timeout=120, max_retries=0) as oai:
        model = oai.models.list().data[0].id
        want = default_llm.generate(PROMPTS[0], tandem.SamplingParams(temperature=0, max_tokens=24))[0].text
        got = oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0)
        assert got.choices[0].text == want and got.usage.completion_tokens == 24
        streamed = oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == want
        question = [{"role": "user", "content": "What is the capital of France?"}]
        expected = default_llm.chat(question, tandem.SamplingParams(temperature=0, max_tokens=16))
        want_chat = expected.text
        chat = oai.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0)
        assert chat.choices[0].message.content == want_chat
        chunks = oai.chat.completions.create(model=model, messages=question, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
        chunks = list(chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert re.search(r'^tandem_requests_total\{api="http",endpoint="chat_completions",status="OK"\} 2\.0$', metrics, re.M)
    assert re.search(r'^tandem_service_up\{instance="[^"]+",service="decode"\} 1\.0$', metrics, re.M)


@pytest.fixture(scope="module")
def lora_answers(adapters) -> dict:
    """tandem.LLM's greedy text of PROMPTS[2] with each adapter (None: the base)."""
    llm = tandem.LLM("smollm2-135m", progress=False, lora_modules={n: str(adapters / n) for n in ("one", "two")})
    greedy = tandem.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    return {name: llm.generate(PROMPTS[2], greedy, lora=name)[0].text for name in (None, "one", "two")}


def _ask_openai(server, model: str) -> str:
    import openai

    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", timeout=120,
                       max_retries=0) as oai:
        return oai.completions.create(model=model, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text


def test_the_openai_client_picks_a_lora_adapter_by_model(server, lora_answers):
    """Must show: the same through `tandem serve` with the openai client choosing the adapter by
    `model`: each adapter's greedy text equals tandem.LLM's with that adapter, through the hand-off
    (prefill worker, KV-cache store, decode worker); one loaded at run time too (it stays loaded:
    the restart test below needs it)."""
    import httpx
    import openai

    want = lora_answers
    assert len(set(want.values())) == 3  # each adapter changes the answer
    base = f"http://127.0.0.1:{server.http_port}/v1"
    with openai.OpenAI(base_url=base, api_key="none", timeout=120, max_retries=0) as oai:
        models = [(m.id, getattr(m, "parent", None)) for m in oai.models.list().data]
        assert models[1:] == [("one", models[0][0])]
    assert _ask_openai(server, "one") == want["one"] and _ask_openai(server, models[0][0]) == want[None]
    loaded = httpx.post(f"{base}/load_lora_adapter", json={"lora_name": "two", "lora_path": "two"}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert _ask_openai(server, "two") == want["two"] and _ask_openai(server, "one") == want["one"]
    with pytest.raises(openai.NotFoundError):
        _ask_openai(server, "three")


def test_streams_whose_only_decode_worker_is_killed_wait_for_its_restart(server, default_llm):
    """Must show: with one decode replica, an SDK stream and an OpenAI API stream in flight when it
    is SIGKILLed wait for Ray's restart and finish with the text of the run without the fault."""
    import openai

    prompt, greedy = "Tell me a long story.", dict(temperature=0, max_tokens=48)
    want = default_llm.generate(prompt, tandem.SamplingParams(ignore_eos=True, **greedy))[0].text
    pid = int(decode_stats(server)["pid"])
    with Client(f"127.0.0.1:{server.port}", timeout=300, max_retries=0) as client, \
            openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", timeout=300,
                          max_retries=0) as oai:
        sdk = client.generate(prompt, ignore_eos=True, **greedy)
        http = (c.choices[0].text if c.choices else "" for c in oai.completions.create(
            model=oai.models.list().data[0].id, prompt=prompt, stream=True, extra_body={"ignore_eos": True},
            **greedy))
        got_sdk, got_http = [next(sdk).text for _ in range(2)], [next(http) for _ in range(2)]
        os.kill(pid, signal.SIGKILL)
        got_sdk += [chunk.text for chunk in sdk]
        got_http += list(http)
    assert "".join(got_sdk) == want and "".join(got_http) == want
    assert int(decode_stats(server)["pid"]) != pid  # a new process, restarted by Ray


def test_the_restarted_decode_worker_has_both_adapters_again(server, lora_answers):
    """After the kill above, Ray's new decode worker loaded `lora_modules` ("one") at its start, and
    the gateway gave it back "two", loaded at run time, before routing to it."""
    assert _ask_openai(server, "two") == lora_answers["two"]
    assert _ask_openai(server, "one") == lora_answers["one"]
