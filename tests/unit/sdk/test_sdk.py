"""tandem.sdk against a fake in-process Gateway that records what it receives and answers as each
test scripts it: request building, stream assembly, metadata, status -> exception mapping,
retries, deadlines, and the asyncio client."""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from concurrent import futures

import grpc
import pytest

from tandem.sampling_params import PROTO_FIELDS, SamplingParams
from tandem.sdk import (AsyncClient, Chunk, Client, Completion, DeadlineExceededError, InternalError,
                        InvalidArgumentError, NotFoundError, RequestCancelledError, ResourceExhaustedError,
                        TandemRpcError, Timings, UnauthenticatedError, UnavailableError, Usage, from_rpc_error)
from tandem.sdk import _wire
from tandem.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

OPTIONAL_SAMPLING_FIELDS = [f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields if f.has_presence]


def response(index=0, ids=(), text="", finish_reason="", finished=False, usage=None, timings=None):
    return gateway_pb2.GenerateResponse(
        request_id="req-1", delta=common_pb2.SampleDelta(index=index, token_ids=ids, text=text,
                                                          finish_reason=finish_reason),
        finished=finished, usage=usage, timings=timings)


# Two samples, interleaved, then the request's last message.
TWO_SAMPLES = [
    response(0, [1, 2], "Hel"),
    response(1, [7], "Bon"),
    response(0, [3], "lo", "stop"),
    response(1, [8, 9], "jour", "length"),
    gateway_pb2.GenerateResponse(request_id="req-1", finished=True,
                                 usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=6, cached_tokens=2),
                                 timings=common_pb2.Timings(ttft=0.5, e2e=1.5, mean_itl=0.25)),
]


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Records (method, request, metadata) per call; `failures[method]` are (code, details) answered,
    one per call, before succeeding; `fail_after` aborts a stream after that many messages."""

    def __init__(self):
        self.calls: list[tuple[str, object, dict]] = []
        self.failures: dict[str, list[tuple[grpc.StatusCode, str]]] = {}
        self.stream = TWO_SAMPLES
        self.fail_after: int | None = None
        self.delay_s = 0.0
        self.stream_ended = threading.Event()
        self.num_streamed = 0

    def num_calls(self, method):
        return sum(1 for name, _, _ in self.calls if name == method)

    def _enter(self, method, request, context):
        self.calls.append((method, request, dict(context.invocation_metadata())))
        pending = self.failures.get(method)
        if pending:
            context.abort(*pending.pop(0))
        end = time.monotonic() + self.delay_s
        while context.is_active() and time.monotonic() < end:
            time.sleep(0.01)

    def _respond(self, method, request, context):
        self._enter(method, request, context)
        try:
            for i, message in enumerate(self.stream):
                if i == self.fail_after:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker died")
                if not context.is_active():
                    return
                yield message
                self.num_streamed += 1
                time.sleep(0.001)
        finally:
            self.stream_ended.set()

    def Generate(self, request, context):
        yield from self._respond("Generate", request, context)

    def Chat(self, request, context):
        yield from self._respond("Chat", request, context)

    def Tokenize(self, request, context):
        self._enter("Tokenize", request, context)
        return common_pb2.TokenizeResponse(token_ids=[len(request.text), 5])

    def Detokenize(self, request, context):
        self._enter("Detokenize", request, context)
        return common_pb2.DetokenizeResponse(text=",".join(map(str, request.token_ids)))

    def ListModels(self, request, context):
        self._enter("ListModels", request, context)
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelCard(id="smol", max_model_len=2048)])


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(_wire, "INITIAL_BACKOFF_S", 0.01)  # keep the retry tests fast
    return FakeGateway()


@pytest.fixture
def target(fake):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    gateway_pb2_grpc.add_GatewayServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def client(fake, target):
    with Client(target, timeout=5) as c:
        yield c


def sent(fake, method="Generate"):
    return [request for name, request, _ in fake.calls if name == method][-1]


def test_every_sampling_params_field_has_a_proto_field():
    proto_fields = common_pb2.SamplingParams.DESCRIPTOR.fields_by_name
    assert set(PROTO_FIELDS) == {f for f in SamplingParams.__dataclass_fields__}
    assert all(name in proto_fields for name in PROTO_FIELDS.values())


def test_sampling_keywords_reach_the_proto(client, fake):
    client.complete("Hi", max_tokens=8, n=2, temperature=0.7, top_k=40, seed=3, logit_bias={5: -100.0, 9: 2},
                    stop="\n", stop_token_ids=[2, 3], ignore_eos=True, skip_special_tokens=False,
                    logits_processors={"typical_p": {"mass": 0.9}}, request_id="mine")
    request = sent(fake)
    assert request.WhichOneof("prompt") == "text" and request.text == "Hi" and request.request_id == "mine"
    s = request.sampling
    assert (s.max_tokens, s.n, s.temperature, s.top_k, s.seed) == (8, 2, 0.7, 40, 3)
    assert dict(s.logit_bias) == {5: -100.0, 9: 2.0}
    assert list(s.stop) == ["\n"] and list(s.stop_token_ids) == [2, 3]
    assert s.ignore_eos and s.HasField("skip_special_tokens") and not s.skip_special_tokens
    assert json.loads(s.logits_processors_json) == {"typical_p": {"mass": 0.9}}
    assert [f for f in OPTIONAL_SAMPLING_FIELDS if not s.HasField(f)] == [
        "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs"]


def test_unset_and_none_sampling_fields_stay_unset(client, fake):
    client.complete([1, 2, 3], seed=None, stop=None)
    request = sent(fake)
    assert request.WhichOneof("prompt") == "token_ids" and list(request.token_ids.ids) == [1, 2, 3]
    assert not any(request.sampling.HasField(f) for f in OPTIONAL_SAMPLING_FIELDS)
    assert request.sampling == common_pb2.SamplingParams()


def test_out_of_range_values_are_the_servers_to_reject(client, fake):
    client.complete("x", max_tokens=-1, temperature=math.nan, stop=["a", "b"])
    s = sent(fake).sampling
    assert s.max_tokens == -1 and math.isnan(s.temperature) and list(s.stop) == ["a", "b"]


def test_unknown_keyword_raises_type_error_naming_the_allowed_ones(client, fake):
    with pytest.raises(TypeError, match="max_tokn.*allowed: .*max_tokens.*logits_processors"):
        client.generate("x", max_tokn=3)
    assert fake.calls == []


def test_structured_output_is_an_alias_of_its_logits_processor(client, fake):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client.complete("x", structured_output={"json_schema": schema}, logits_processors={"typical_p": {"mass": 0.9}})
    assert json.loads(sent(fake).sampling.logits_processors_json) == {
        "typical_p": {"mass": 0.9}, "structured_output": {"json_schema": schema}}
    client.chat([{"role": "user", "content": "y"}], structured_output={"choice": ["yes", "no"]})
    assert json.loads(sent(fake, "Chat").sampling.logits_processors_json) == {
        "structured_output": {"choice": ["yes", "no"]}}
    client.complete("x", structured_output=None)
    assert sent(fake).sampling == common_pb2.SamplingParams()
    calls = len(fake.calls)
    with pytest.raises(InvalidArgumentError, match="structured_output must be a dict"):
        client.generate("x", structured_output='{"regex": "a+"}')
    with pytest.raises(InvalidArgumentError, match="not both"):
        client.generate("x", structured_output={"regex": "a+"}, logits_processors={"structured_output": {}})
    assert len(fake.calls) == calls


@pytest.mark.parametrize("prompt, sampling, name", [
    ("x", {"max_tokens": 1.5}, "max_tokens"),
    ("x", {"max_tokens": True}, "max_tokens"),
    ("x", {"temperature": "hot"}, "temperature"),
    ("x", {"seed": 2 ** 64}, "seed"),
    ("x", {"logit_bias": {"a": 1.0}}, "logit_bias"),
    ("x", {"stop": [1]}, "stop"),
    ("x", {"stop_token_ids": [1.0]}, "stop_token_ids"),
    ("x", {"logits_processors": {"p": {"f": object()}}}, "logits_processors"),
    ([1, "two"], {}, "prompt"),
    (None, {}, "prompt"),
])
def test_values_protobuf_cannot_hold_raise_invalid_argument_locally(client, fake, prompt, sampling, name):
    with pytest.raises(InvalidArgumentError, match=f"^INVALID_ARGUMENT: {name} must be") as info:
        client.generate(prompt, **sampling)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and isinstance(info.value, ValueError)
    assert fake.calls == []


def test_stream_chunks_and_complete(client, fake):
    chunks = list(client.generate("Hi", n=2))
    assert chunks[0] == Chunk("req-1", 0, [1, 2], "Hel")
    assert [c.finish_reason for c in chunks] == [None, None, "stop", "length", None]
    assert [c.finished for c in chunks] == [False] * 4 + [True]
    assert chunks[-1].usage == Usage(4, 6, 2) and chunks[-1].timings == Timings(0.5, 1.5, 0.25, 0.0, 0.0)

    result = client.complete("Hi", n=2)
    assert result == Completion("req-1", ["Hello", "Bonjour"], [[1, 2, 3], [7, 8, 9]], ["stop", "length"],
                                Usage(4, 6, 2), Timings(0.5, 1.5, 0.25), sample_logprobs=[[], []])
    assert result.text == "Hello"


def test_leaving_a_stream_early_cancels_it(client, fake):
    fake.stream = [response(0, [i], "x") for i in range(500)]
    stream = client.generate("Hi")
    assert next(stream).token_ids == [0]
    stream.close()
    assert fake.stream_ended.wait(2) and fake.num_streamed < 100


def test_chat(client, fake):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert client.chat(messages, max_tokens=4).texts == ["Hello", "Bonjour"]
    request = sent(fake, "Chat")
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert request.sampling.max_tokens == 4
    assert [c.text for c in client.chat(messages, stream=True)] == ["Hel", "Bon", "lo", "jour", ""]
    with pytest.raises(InvalidArgumentError, match="messages must be"):
        client.chat([{"role": "user"}])


def test_tokenize_detokenize_list_models(client, fake):
    assert client.tokenize("abc") == [3, 5]
    assert sent(fake, "Tokenize").add_special_tokens and not sent(fake, "Tokenize").parse_special
    client.tokenize("abc", add_special_tokens=False, parse_special=True)
    request = sent(fake, "Tokenize")
    assert request.HasField("add_special_tokens") and not request.add_special_tokens and request.parse_special
    assert client.detokenize([4, 2], skip_special_tokens=False) == "4,2"
    assert not sent(fake, "Detokenize").skip_special_tokens
    assert client.list_models() == [{"id": "smol", "max_model_len": 2048, "quantization": "", "parent": None}]


def test_api_key_is_sent_as_bearer_metadata(fake, target):
    with Client(target, api_key="sk-123") as keyed, Client(target) as anonymous:
        keyed.tokenize("a")
        list(keyed.generate("a"))
        anonymous.tokenize("a")
    assert [metadata.get("authorization") for _, _, metadata in fake.calls] == [
        "Bearer sk-123", "Bearer sk-123", None]


@pytest.mark.parametrize("code, error_class", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    (grpc.StatusCode.CANCELLED, RequestCancelledError),
    (grpc.StatusCode.INTERNAL, InternalError),
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.PERMISSION_DENIED, TandemRpcError),
])
def test_statuses_map_to_typed_exceptions(client, fake, code, error_class):
    fake.failures = {"Tokenize": [(code, "the details")], "Generate": [(code, "the details")]}
    for call in (lambda: client.tokenize("a"), lambda: client.complete("a")):
        with pytest.raises(error_class) as info:
            call()
        assert type(info.value) is error_class
        assert info.value.code() == code and info.value.details() == "the details"
        assert isinstance(info.value.__cause__, grpc.RpcError) and info.value.__cause__.code() == code
    assert fake.num_calls("Tokenize") == fake.num_calls("Generate") == 1  # not retried


def test_unavailable_is_retried_until_it_succeeds(client, fake):
    twice = [(grpc.StatusCode.UNAVAILABLE, "draining")] * 2
    fake.failures = {"Tokenize": list(twice), "Generate": list(twice)}
    assert client.tokenize("abc") == [3, 5]
    assert client.complete("Hi").texts == ["Hello", "Bonjour"]
    assert fake.num_calls("Tokenize") == fake.num_calls("Generate") == 3


def test_unavailable_is_raised_after_max_retries(fake, target):
    fake.failures = {"Tokenize": [(grpc.StatusCode.UNAVAILABLE, "draining")] * 5}
    with Client(target, max_retries=2) as c, pytest.raises(UnavailableError, match="draining"):
        c.tokenize("abc")
    assert fake.num_calls("Tokenize") == 3


def test_a_started_stream_is_never_retried(client, fake):
    fake.fail_after = 2
    chunks = []
    with pytest.raises(UnavailableError, match="decode worker died") as info:
        for chunk in client.generate("Hi"):
            chunks.append(chunk)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(chunks) == 2 and fake.num_calls("Generate") == 1


def test_deadline_exceeded(fake, target):
    fake.delay_s = 2.0
    with Client(target, timeout=0.2) as c:
        for call in (lambda: c.tokenize("a"), lambda: c.complete("a"), lambda: c.list_models(timeout=0.1)):
            start = time.monotonic()
            with pytest.raises(DeadlineExceededError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 1.0


def test_tls_argument_forms(tmp_path):
    assert _wire.channel_credentials(None) is None and _wire.channel_credentials(False) is None
    assert isinstance(_wire.channel_credentials(True), grpc.ChannelCredentials)
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    assert isinstance(_wire.channel_credentials(str(pem)), grpc.ChannelCredentials)
    credentials = grpc.ssl_channel_credentials()
    assert _wire.channel_credentials(credentials) is credentials
    with pytest.raises(TypeError, match="tls must be"):
        _wire.channel_credentials(42)


def test_from_rpc_error_passes_sdk_errors_through():
    error = from_rpc_error(UnavailableError("gone"))
    assert type(error) is UnavailableError and str(error) == "UNAVAILABLE: gone"


def test_async_client(fake, target):
    async def main():
        async with AsyncClient(target, api_key="sk-9", timeout=5) as c:
            chunks = [chunk async for chunk in c.generate("Hi", max_tokens=3, stop="!")]
            result = await c.complete([1, 2], n=2)
            ids = await c.tokenize("abcd", add_special_tokens=False)
            reply = await c.chat([{"role": "user", "content": "Hi"}])
            streamed = [chunk.text async for chunk in c.chat([{"role": "user", "content": "Hi"}], stream=True)]
            return chunks, result, ids, reply, streamed, await c.detokenize([1]), await c.list_models()

    chunks, result, ids, reply, streamed, text, models = asyncio.run(main())
    assert [c.text for c in chunks] == ["Hel", "Bon", "lo", "jour", ""] and chunks[-1].usage == Usage(4, 6, 2)
    assert result.texts == ["Hello", "Bonjour"] and result.finish_reasons == ["stop", "length"]
    assert ids == [4, 5] and reply.text == "Hello" and streamed[-2:] == ["jour", ""]
    assert text == "1" and models[0]["id"] == "smol"
    generate_request = [r for name, r, _ in fake.calls if name == "Generate"][0]
    assert generate_request.sampling.max_tokens == 3 and list(generate_request.sampling.stop) == ["!"]
    assert {metadata["authorization"] for _, _, metadata in fake.calls} == {"Bearer sk-9"}


def test_async_client_errors_retries_and_deadlines(fake, target):
    fake.failures = {"Tokenize": [(grpc.StatusCode.UNAVAILABLE, "draining")] * 2,
                     "Generate": [(grpc.StatusCode.UNAVAILABLE, "draining")] * 2,
                     "Detokenize": [(grpc.StatusCode.UNAUTHENTICATED, "bad key")]}

    async def main():
        async with AsyncClient(target, timeout=5) as c:
            assert await c.tokenize("abc") == [3, 5]
            assert (await c.complete("Hi")).text == "Hello"
            with pytest.raises(UnauthenticatedError, match="bad key"):
                await c.detokenize([1])
            fake.fail_after = 1
            with pytest.raises(UnavailableError):
                await c.complete("Hi")
            fake.delay_s = 2.0
            with pytest.raises(DeadlineExceededError):
                await c.tokenize("a", timeout=0.2)

    asyncio.run(main())
    assert fake.num_calls("Tokenize") == 4 and fake.num_calls("Generate") == 4
