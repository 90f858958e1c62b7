"""LoRA adapters through the service pipeline (tiny random model, disaggregated, in-process): a
request picks an adapter by its `model` (the SDK and the OpenAI API alike) and gets the tokens
tandem.LLM gives with that adapter; /v1/models lists the adapters beside the base; adapters load
and unload at run time on every worker (vLLM's /v1/load_lora_adapter), a bad one (missing file,
rank above the limit, wrong shape, a path outside runtime_lora_dir) is a 400 that changes nothing;
the prefix cache and the KV-cache store never give one adapter's KV to another, nor to a new
adapter loaded under an old name; runtime loading is off (403) unless the operator allows it."""
from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest

import tandem
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import Client, NotFoundError
from tandem.services.config import PipelineConfig
from tests.tiny_models import write_peft_adapter

GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def adapters(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, rank, seed in (("one", 8, 1), ("two", 4, 2), ("wide", 16, 3)):
        write_peft_adapter(tiny_hf_dir, root / name, rank=rank, alpha=2 * rank, seed=seed)
    return root


@pytest.fixture(scope="module")
def library(tiny_hf_dir, adapters):
    """What each adapter gives in tandem.LLM: the reference for the pipeline."""
    llm = tandem.LLM(str(tiny_hf_dir), dtype="float32", progress=False, num_kv_blocks=64,
                     lora_modules={"one": str(adapters / "one"), "two": str(adapters / "two")})
    params = tandem.SamplingParams(**GREEDY)
    ids = llm.tokenizer.encode(PROMPT)
    return {name: llm.generate([ids], params, lora=name)[0].token_ids for name in (None, "one", "two")}


@pytest.fixture(scope="module")
def pipe(tiny_hf_dir, adapters):
    config = PipelineConfig(model=str(tiny_hf_dir), grpc_port=0, http_port=0, kv_cache_memory=16 << 20,
                            kv_store_bytes=64 << 20, mode="disaggregated", disaggregate="always",
                            lora_modules={"one": str(adapters / "one")}, max_loras=2, max_lora_rank=8,
                            runtime_lora_dir=str(adapters))
    with InProcessPipeline(config) as p:
        yield p


def _complete(client: Client, model: str | None):
    return client.complete(PROMPT, model=model, **GREEDY)


def test_the_model_field_picks_the_adapter_sdk_and_openai_api(pipe, library, tiny_hf_dir):
    with Client(pipe.address, timeout=60) as client:
        assert _complete(client, None).token_ids == library[None]
        assert _complete(client, "one").token_ids == library["one"] != library[None]
        base_id = client.list_models()[0]["id"]
        assert _complete(client, base_id).token_ids == library[None]
        assert _complete(client, str(tiny_hf_dir)).token_ids == library[None]  # the config's name for it
        assert [(m["id"], m["parent"]) for m in client.list_models()] == [(base_id, None), ("one", base_id)]
        with pytest.raises(NotFoundError, match="`nope` does not exist"):
            _complete(client, "nope")
    http = f"http://{pipe.http_address}/v1"
    models = httpx.get(f"{http}/models", timeout=30).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [(base_id, None), ("one", base_id)]
    reply = httpx.post(f"{http}/completions", json={"model": "one", "prompt": PROMPT, "max_tokens": 8,
                                                    "temperature": 0, "ignore_eos": True}, timeout=60).json()
    assert reply["model"] == "one" and reply["usage"]["completion_tokens"] == 8
    missing = httpx.post(f"{http}/completions", json={"model": "nope", "prompt": PROMPT}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    metrics = httpx.get(f"http://{pipe.http_address}/metrics", timeout=30).text
    assert re.search(r'^tandem_lora_slots_total\{instance="[^"]+",service="decode"\} 2\.0$', metrics, re.M)
    assert re.search(r'^tandem_lora_adapters_loaded\{instance="[^"]+",service="prefill"\} 1\.0$', metrics, re.M)


def test_runtime_load_and_unload_on_every_worker(pipe, library, adapters, tmp_path):
    http = f"http://{pipe.http_address}/v1"

    def load(name: str, path: str) -> httpx.Response:
        return httpx.post(f"{http}/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)

    def names() -> list[str]:
        return [m["id"] for m in httpx.get(f"{http}/models", timeout=30).json()["data"][1:]]

    # bad adapters: each a 400 naming the fault, and nothing changes
    (adapters / "empty").mkdir(exist_ok=True)
    refused = {"empty": "adapter_config.json is missing", "wide": "rank 16 exceeds max_lora_rank 8",
               str(tmp_path): "outside the runtime_lora_dir"}
    broken = adapters / "broken"
    shutil.copytree(adapters / "two", broken, dirs_exist_ok=True)
    spec = json.loads((broken / "adapter_config.json").read_text())
    spec["r"] = 2  # its tensors are rank 4: every shape is wrong for the declared rank
    (broken / "adapter_config.json").write_text(json.dumps(spec))
    refused["broken"] = "this base model needs A (2, "
    for path, message in refused.items():
        answer = load("bad", path)
        assert answer.status_code == 400 and message in answer.json()["error"]["message"], (path, answer.text)
    assert names() == ["one"]
    assert load("one", "two").status_code == 400  # a name in use
    # a good one: every worker (prefill and decode) has it, and it gives the library's tokens
    assert load("two", "two").status_code == 200, load("two", "two").text
    assert names() == ["one", "two"]
    with Client(pipe.address, timeout=60) as client:
        assert _complete(client, "two").token_ids == library["two"]
        assert httpx.post(f"{http}/unload_lora_adapter", json={"lora_name": "two"}, timeout=60).status_code == 200
        assert names() == ["one"]
        with pytest.raises(NotFoundError):
            _complete(client, "two")
        gone = httpx.post(f"{http}/unload_lora_adapter", json={"lora_name": "two"}, timeout=60)
        assert gone.status_code == 404
        # the same name with other weights is another adapter: no KV of the old one is reused
        assert load("two", str(adapters / "one")).status_code == 200
        assert _complete(client, "two").token_ids == library["one"]
        assert httpx.post(f"{http}/unload_lora_adapter", json={"lora_name": "two"}, timeout=60).status_code == 200


def test_adapters_never_share_kv_through_caches_or_the_store(pipe):
    prompt = "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles" * 2
    with Client(pipe.address, timeout=60) as client:
        first = client.complete(prompt, model="one", **GREEDY)
        again = client.complete(prompt, model="one", **GREEDY)
        base = client.complete(prompt, **GREEDY)
    assert first.usage.cached_tokens == 0 and again.usage.cached_tokens > 0
    assert base.usage.cached_tokens == 0  # the same prompt without the adapter: nothing shared


def test_runtime_loading_is_off_unless_the_operator_allows_it(tiny_hf_dir, adapters):
    config = PipelineConfig(model=str(tiny_hf_dir), grpc_port=0, http_port=0, kv_cache_memory=16 << 20,
                            mode="aggregated", lora_modules={"one": str(adapters / "one")})
    with InProcessPipeline(config) as p:
        http = f"http://{p.http_address}/v1"
        answer = httpx.post(f"{http}/load_lora_adapter", json={"lora_name": "two", "lora_path": str(adapters / "two")},
                            timeout=60)
        assert answer.status_code == 403 and "runtime_lora_dir" in answer.json()["error"]["message"]
        assert httpx.post(f"{http}/unload_lora_adapter", json={"lora_name": "one"}, timeout=60).status_code == 403
        assert [m["id"] for m in httpx.get(f"{http}/models", timeout=30).json()["data"]][1:] == ["one"]


def test_a_restarted_worker_gets_the_runtime_adapters_back(pipe, library):
    """A worker restarts with lora_modules only; the gateway that loaded an adapter at run time
    loads it into the worker again before routing to it, so requests for it keep working."""
    http = f"http://{pipe.http_address}/v1"
    loaded = httpx.post(f"{http}/load_lora_adapter", json={"lora_name": "two", "lora_path": "two"}, timeout=60)
    assert loaded.status_code == 200, loaded.text
    pipe.kill("decode-0")
    pipe.restart("decode-0")
    with Client(pipe.address, timeout=60) as client:
        assert _complete(client, "two").token_ids == library["two"]  # waits for the worker, then runs there
        assert _complete(client, "one").token_ids == library["one"]  # lora_modules: loaded at its start
    assert httpx.post(f"{http}/unload_lora_adapter", json={"lora_name": "two"}, timeout=60).status_code == 200
