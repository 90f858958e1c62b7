"""Pipeline credentials: every internal service (tokenizer, prefill, decode, aggregated worker, KV
store, draft, retrieval) refuses calls without the pipeline token, or with a wrong one
(UNAUTHENTICATED), and answers them with it; health stays open; the gateway and the workers carry
the token on every internal channel (the pipeline works end to end, every service scraped);
`tandem service` refuses a non-loopback host without credentials; a forged or corrupted KV block in
the store is never imported and the prompt's answer does not change; mutual TLS between services.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tandem
from tandem.cli import main
from tandem.engine.block_manager import block_hash
from tandem.kv_store import BlockSeal, tensors_to_bytes
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import Client
from tandem.services.common import bearer_authorized, client_channel
from tandem.services.config import PipelineConfig
from tandem.engine.kv_connector import KVStoreClient
from tandem.kv_store import to_chunks
from tandem.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, draft_pb2, draft_pb2_grpc,
                       gateway_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, prefill_pb2, prefill_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc,
                       tokenizer_pb2, tokenizer_pb2_grpc)

TOKEN = "pipeline-token-for-tests-0123456789"
WITH_TOKEN = [("authorization", f"Bearer {TOKEN}")]
GREEDY = dict(temperature=0, max_tokens=8, ignore_eos=True)
# The tiny model drafting for itself in the draft service: the decode worker calls it every step.
REMOTE_DRAFT = {"method": "remote", "k": 3, "options": {"method": "draft_model", "options": {"quantization": None}}}


def config(tiny_hf_dir, **overrides) -> PipelineConfig:
    overrides.setdefault("disaggregate", "always")  # every request through the store (the tiny prompts are short)
    overrides.setdefault("mode", "disaggregated")  # whatever this machine's size (mode auto: aggregated on < 8 cores)
    return PipelineConfig(model=str(tiny_hf_dir), grpc_port=0, http_port=0, kv_cache_memory=16 << 20,
                          kv_store_bytes=64 << 20, internal_token=TOKEN, **overrides)


@pytest.fixture(scope="module")
def pipe(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, speculative=REMOTE_DRAFT)) as p:
        yield p


@pytest.fixture(scope="module")
def aggregated(tiny_hf_dir):
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated")) as p:
        yield p


def stub_of(pipe, name: str, kind):
    return kind(grpc.insecure_channel(pipe.address_of(name)))


# One call per service, the ones that matter most: run a prompt, write or read KV, delete documents;
# every kind of rpc (unary, server-, client-streaming). Each takes a channel and the call's options.
CALLS = {
    "tokenizer-0": lambda ch, call: tokenizer_pb2_grpc.TokenizerStub(ch).Tokenize(
        common_pb2.TokenizeRequest(text="hi"), **call),
    "prefill-0": lambda ch, call: prefill_pb2_grpc.PrefillStub(ch).Prefill(prefill_pb2.PrefillRequest(
        prompt_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=2)), **call),
    "decode-0": lambda ch, call: list(decode_pb2_grpc.DecodeStub(ch).Decode(decode_pb2.DecodeRequest(
        prompt_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=2)), **call)),
    "kvstore-0": lambda ch, call: kvstore_pb2_grpc.KVStoreStub(ch).Put(iter([kvstore_pb2.KVChunk(
        hash=b"forged", namespace="ns", tensors=[kvstore_pb2.TensorSpec(dtype="uint8", shape=[4])],
        total_bytes=4, data=b"evil")]), **call),
    "kvstore-0/get": lambda ch, call: list(kvstore_pb2_grpc.KVStoreStub(ch).Get(
        kvstore_pb2.GetRequest(namespace="ns", hashes=[b"x"]), **call)),
    "draft-0": lambda ch, call: draft_pb2_grpc.DraftStub(ch).Propose(
        draft_pb2.ProposeRequest(method="ngram", token_ids=[1, 2, 1, 2, 1], k=2), **call),
    "retrieval-0": lambda ch, call: retrieval_pb2_grpc.RetrievalStub(ch).Delete(
        retrieval_pb2.DeleteRequest(collection="default", document_ids=["doc"]), **call),
    "retrieval-0/ingest": lambda ch, call: retrieval_pb2_grpc.RetrievalStub(ch).Ingest(
        iter([retrieval_pb2.Document(id="doc", text="planted")]), **call),
}


def call(pipe, name: str, metadata=None, rpc: str | None = None) -> tuple[grpc.StatusCode, str]:
    """Call `rpc` (default: name's) on instance `name`: OK or the status it failed with."""
    with grpc.insecure_channel(pipe.address_of(name.split("/")[0])) as channel:
        try:
            CALLS[rpc or name](channel, {"timeout": 30, "metadata": metadata})
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("name", list(CALLS))
def test_internal_calls_without_the_token_are_unauthenticated(pipe, name):
    assert call(pipe, name) == (grpc.StatusCode.UNAUTHENTICATED, "missing pipeline token")
    wrong = [("authorization", "Bearer " + "x" * len(TOKEN))]
    assert call(pipe, name, wrong) == (grpc.StatusCode.UNAUTHENTICATED, "invalid pipeline token")
    user_key = [("x-api-key", TOKEN)]  # the token under another header is no token
    assert call(pipe, name, user_key)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_the_aggregated_worker_requires_the_token(aggregated):
    assert call(aggregated, "worker-0", rpc="decode-0") == (grpc.StatusCode.UNAUTHENTICATED, "missing pipeline token")
    assert call(aggregated, "worker-0", WITH_TOKEN, rpc="decode-0") == (grpc.StatusCode.OK, "")


@pytest.mark.parametrize("name", ["tokenizer-0", "prefill-0", "decode-0", "kvstore-0/get", "draft-0"])
def test_with_the_token_internal_calls_work(pipe, name):
    assert call(pipe, name, WITH_TOKEN) == (grpc.StatusCode.OK, "")


def test_health_and_reflection_stay_open(pipe):
    for name, host in pipe.hosts.items():
        with grpc.insecure_channel(host.address) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.SERVING, name


def test_the_pipeline_carries_the_token_on_every_internal_channel(pipe, tiny_llm):
    """gateway -> tokenizer, prefill, decode, retrieval, KV store and draft (their Stats on
    /metrics); prefill and decode -> the KV store; decode -> the draft service."""
    prompt = "To be, or not to be, that is the question: " * 3
    want = tiny_llm.generate(prompt, tandem.SamplingParams(**GREEDY))[0]
    asked = stats(pipe, "draft-0").get("requests", 0)
    with Client(pipe.address, timeout=60) as c:
        got = c.complete(prompt, **GREEDY)
    # The decode worker asked the draft service (asynchronously: whether an answer arrives in time
    # to be verified depends on timing, tandem.engine.spec_decode), with the token.
    assert got.token_ids == want.token_ids and stats(pipe, "draft-0")["requests"] > asked
    metrics = httpx.get(f"http://{pipe.http_address}/metrics", timeout=30).text
    up = [line for line in metrics.splitlines() if line.startswith("tandem_service_up{")]
    assert {line.split('service="')[1].split('"')[0] for line in up} >= {
        "tokenizer", "prefill", "decode", "kvstore", "draft", "retrieval"}
    assert all(line.endswith(" 1.0") for line in up), up
    for name in ("prefill-0", "decode-0"):
        values = stats(pipe, name)
        assert values["kv_store_errors"] == 0, name
    assert stats(pipe, "prefill-0")["kv_blocks_published"] > 0 and stats(pipe, "kvstore-0")["puts"] > 0
    assert stats(pipe, "draft-0")["requests"] > 0


def stats(pipe, name: str) -> dict:
    kind = {"prefill": prefill_pb2_grpc.PrefillStub, "decode": decode_pb2_grpc.DecodeStub,
            "kvstore": kvstore_pb2_grpc.KVStoreStub, "draft": draft_pb2_grpc.DraftStub}[name.split("-")[0]]
    with grpc.insecure_channel(pipe.address_of(name)) as channel:
        return dict(kind(channel).Stats(common_pb2.StatsRequest(), timeout=10, metadata=WITH_TOKEN).values)


def test_bearer_check_is_one_rule_for_grpc_and_http(tiny_hf_dir):
    keys = [b"sk-one", b"sk-two"]
    assert bearer_authorized("Bearer sk-two", keys) and bearer_authorized("bearer  sk-one ", keys)
    assert not any(bearer_authorized(h, keys) for h in (None, "", "sk-one", "Basic sk-one", "Bearer sk-on",
                                                         "Bearer sk-one2", "Bearer "))
    assert not bearer_authorized("Bearer x", [])
    # The gateway's gRPC port used to insist on "Bearer " where HTTP took any case: now both agree.
    with InProcessPipeline(config(tiny_hf_dir, api_keys=["sk-one"], mode="aggregated")) as p:
        with grpc.insecure_channel(p.address) as channel:
            answer = gateway_pb2_grpc.GatewayStub(channel).Tokenize(
                common_pb2.TokenizeRequest(text="hi"), metadata=[("authorization", "bearer sk-one")], timeout=30)
        assert len(answer.token_ids) > 0
        response = httpx.get(f"http://{p.http_address}/v1/models", headers={"authorization": "bearer sk-one"},
                             timeout=30)
        assert response.status_code == 200
        with Client(p.address, api_key=TOKEN) as c, pytest.raises(tandem.sdk.UnauthenticatedError):
            c.tokenize("hi")  # the pipeline token is not a user's API key


# -- tandem service ------------------------------------------------------------------------------
def test_tandem_service_refuses_a_public_host_without_credentials(monkeypatch, capsys):
    monkeypatch.delenv("TANDEM_INTERNAL_TOKEN", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "example.internal"):
        assert main(["service", "kvstore", "--port", "0", "--host", host]) == 2
        assert "without the pipeline's credentials" in capsys.readouterr().err


def test_tandem_service_takes_the_token_from_the_environment(tmp_path):
    env = {**os.environ, "TANDEM_INTERNAL_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", "service", "kvstore", "--port", "0", "--host",
                             "0.0.0.0", "--kv-store-bytes", "1048576"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "listening on 0.0.0.0:" in line, line
        port = int(line.split("0.0.0.0:")[1].split()[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Stats(common_pb2.StatsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert stub.Stats(common_pb2.StatsRequest(), timeout=10, metadata=WITH_TOKEN).values["blocks"] == 0
        assert TOKEN not in line
    finally:
        proc.terminate()
        proc.wait(30)


def test_short_tokens_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="at least 16"):
        PipelineConfig(internal_token="secret")
    monkeypatch.setenv("TANDEM_INTERNAL_TOKEN", "short")
    with pytest.raises(ValueError, match="TANDEM_INTERNAL_TOKEN"):
        PipelineConfig().resolved_internal_token()


def test_tandem_serve_makes_a_token_and_never_shows_it(monkeypatch, tmp_path):
    monkeypatch.delenv("TANDEM_INTERNAL_TOKEN", raising=False)
    made = PipelineConfig().with_internal_token()
    assert len(made.internal_token) >= 43 and made.internal_token != PipelineConfig().with_internal_token().internal_token
    assert made.internal_token not in repr(made)
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert PipelineConfig(internal_token_file=str(path)).with_internal_token().internal_token == TOKEN
    monkeypatch.setenv("TANDEM_INTERNAL_TOKEN", TOKEN)
    assert PipelineConfig().with_internal_token().internal_token == TOKEN


# -- forged and corrupted KV blocks --------------------------------------------------------------
def chain(prompt: list[int], block_size: int) -> list[bytes]:
    hashes, parent = [], None
    for i in range(len(prompt) // block_size):
        parent = block_hash(parent, prompt[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def plant(pipe, blocks: list[tuple[bytes, list[torch.Tensor]]], how: str) -> None:
    """Put blocks in the store the way an attacker would: `forged` under the right keys (as if seen on
    the wire) with garbage data and a digest made without the secret; `corrupted` with the genuine
    digest over flipped bytes; `unsealed` under the bare block hashes."""
    info = stub_of(pipe, "prefill-0", prefill_pb2_grpc.PrefillStub).Info(
        prefill_pb2.WorkerInfoRequest(), metadata=WITH_TOKEN, timeout=10)
    seal, attacker = BlockSeal(TOKEN), BlockSeal("not-the-pipeline-token")
    chunks = []
    for h, tensors in blocks:
        specs, data = tensors_to_bytes(tensors)
        garbage = bytes(b ^ 0x5A for b in data)
        key, digest = {"forged": (seal.key(h), attacker.digest(info.kv_namespace, h, specs, garbage)),
                       "corrupted": (seal.key(h), seal.digest(info.kv_namespace, h, specs, data)),
                       "unsealed": (h, attacker.digest(info.kv_namespace, h, specs, garbage))}[how]
        chunks += to_chunks(info.kv_namespace, key, specs, garbage, 1 << 20, digest)
    put = stub_of(pipe, "kvstore-0", kvstore_pb2_grpc.KVStoreStub).Put(iter(chunks), metadata=WITH_TOKEN, timeout=30)
    assert put.stored == len(blocks)


@pytest.mark.parametrize("how", ["forged", "corrupted", "unsealed"])
def test_a_planted_block_is_never_imported_and_the_answer_is_unchanged(pipe, tiny_llm, how):
    prompt = tiny_llm.tokenize(f"{how}: First Citizen: Before we proceed any further, hear me speak. " * 4)
    want = tiny_llm.generate([prompt], tandem.SamplingParams(**GREEDY))[0]
    block_size = tiny_llm.engine.config.block_size
    blocks = tiny_llm.engine.export_cached(chain(prompt, block_size))  # the genuine KV, right shapes
    assert len(blocks) >= 3
    plant(pipe, blocks, how)
    rejected = stats(pipe, "prefill-0")["kv_blocks_rejected"]
    with Client(pipe.address, timeout=60) as c:
        got = c.complete(prompt, **GREEDY)
    assert got.token_ids == want.token_ids
    hashes = [h for h, _ in blocks][:(len(prompt) - 1) // block_size]  # the blocks prefill fetches
    fetched_bad = stats(pipe, "prefill-0")["kv_blocks_rejected"] - rejected
    assert fetched_bad == (0 if how == "unsealed" else len(hashes))  # unsealed: never even found
    metrics = httpx.get(f"http://{pipe.http_address}/metrics", timeout=30).text
    exported = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("tandem_kv_blocks_rejected_total{"))
    assert exported >= fetched_bad  # on /metrics as tandem_kv_blocks_rejected_total
    # the worker published its own copies: what the store now holds under those keys checks out
    namespace = stub_of(pipe, "prefill-0", prefill_pb2_grpc.PrefillStub).Info(
        prefill_pb2.WorkerInfoRequest(), metadata=WITH_TOKEN, timeout=10).kv_namespace

    async def fetch():
        async with client_channel(pipe.address_of("kvstore-0"), credentials=pipe.config.internal_credentials()) as ch:
            client = KVStoreClient(ch, seal=BlockSeal(TOKEN))
            found = await client.get_blocks(namespace, hashes)
            return len(found), client.num_rejected

    assert asyncio.run(fetch()) == (len(hashes), 0)


# -- mutual TLS ----------------------------------------------------------------------------------
def make_certs(directory: Path) -> dict[str, str]:
    """A CA, and a certificate it signed for the name `tandem-internal` (every service shares it)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=tandem-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "svc.key", "-out", "svc.csr", "-subj", "/CN=tandem-internal")
    (directory / "ext.cnf").write_text("subjectAltName=DNS:tandem-internal\n")
    run("x509", "-req", "-in", "svc.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "svc.pem",
        "-days", "1", "-extfile", "ext.cnf")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.pem", "-days", "1",
        "-subj", "/CN=tandem-internal", "-addext", "subjectAltName=DNS:tandem-internal")
    return {name: str(directory / name) for name in ("ca.pem", "svc.pem", "svc.key", "rogue.pem", "rogue.key")}


def test_mutual_tls_between_services(tiny_hf_dir, tiny_llm, tmp_path):
    certs = make_certs(tmp_path)
    cfg = config(tiny_hf_dir, mode="aggregated", internal_tls_cert=certs["svc.pem"], internal_tls_key=certs["svc.key"],
                 internal_tls_ca=certs["ca.pem"], internal_tls_server_name="tandem-internal")
    want = tiny_llm.generate("hello world", tandem.SamplingParams(**GREEDY))[0]
    with InProcessPipeline(cfg) as p, Client(p.address, timeout=60) as c:
        assert c.complete("hello world", **GREEDY).token_ids == want.token_ids  # the gateway's channels: mTLS
        ca = Path(certs["ca.pem"]).read_bytes()
        options = [("grpc.ssl_target_name_override", "tandem-internal")]
        cases = {"no client certificate": grpc.ssl_channel_credentials(ca),
                 "a certificate the CA did not sign": grpc.ssl_channel_credentials(
                     ca, Path(certs["rogue.key"]).read_bytes(), Path(certs["rogue.pem"]).read_bytes())}
        for what, creds in cases.items():
            with grpc.secure_channel(p.address_of("tokenizer-0"), creds, options) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(
                        common_pb2.TokenizeRequest(text="hi"), metadata=WITH_TOKEN, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
        with grpc.insecure_channel(p.address_of("tokenizer-0")) as channel, pytest.raises(grpc.RpcError):
            tokenizer_pb2_grpc.TokenizerStub(channel).Tokenize(common_pb2.TokenizeRequest(text="hi"),
                                                               metadata=WITH_TOKEN, timeout=10)
        good = grpc.ssl_channel_credentials(ca, Path(certs["svc.key"]).read_bytes(), Path(certs["svc.pem"]).read_bytes())
        with grpc.secure_channel(p.address_of("tokenizer-0"), good, options) as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            assert stub.Tokenize(common_pb2.TokenizeRequest(text="hi"), metadata=WITH_TOKEN, timeout=10).token_ids
            with pytest.raises(grpc.RpcError) as no_token:  # a certificate is not the token
                stub.Tokenize(common_pb2.TokenizeRequest(text="hi"), timeout=10)
            assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
