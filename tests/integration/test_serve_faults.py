"""Faults under `tandem serve` (real default model, local Ray): kill -9 of each service type while a
stream runs, SIGSTOP of the KV store, and a restarted actor found on a new port.

Where the killed service is on the stream's path after the kill (decode, the aggregated worker),
the stream finishes with the text of the run without the fault, through the SDK and the OpenAI
API; where it is not (prefill, KV store, tokenizer, retrieval, draft), the stream still finishes
with that text and the pipeline keeps serving while Ray restarts the service. One `tandem serve`
per configuration, shared by the tests of this module (they run in order; each waits for the
restart it caused; one server runs at a time)."""
from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from contextlib import ExitStack, contextmanager

import grpc
import httpx
import openai
import psutil
import pytest

import tandem
from tandem.sdk import Client
from tandem.v1 import common_pb2, decode_pb2_grpc, kvstore_pb2_grpc
from tests.integration.test_serve import WITH_TOKEN, Server

PROMPT = "Write a short story about a lighthouse keeper and a storm."
MAX_TOKENS = 48
RESTART_TIMEOUT_S = 180


class Servers:
    """One `tandem serve` at a time: asking for another configuration stops the one running."""

    def __init__(self):
        self.args, self.server = None, None

    def get(self, *args: str) -> Server:
        if args != self.args:
            self.close()
            self.args, self.server = args, Server(*args)
            self.server.wait_ready()
        return self.server

    def close(self) -> None:
        if self.server is not None:
            server, self.server, self.args = self.server, None, None
            assert server.stop() == 0, "\n".join(server.lines[-30:])


@pytest.fixture(scope="module")
def servers():
    s = Servers()
    yield s
    s.close()


@pytest.fixture
def two_decoders(servers) -> Server:
    """Disaggregated: one prefill worker, two decode workers; every request takes the hand-off
    (in `auto` these short prompts would run whole on a decode worker)."""
    return servers.get("--replicas", "decode=2", "--disaggregate", "always")


@pytest.fixture(scope="module")
def want(default_llm) -> str:
    return default_llm.generate(PROMPT, tandem.SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                               ignore_eos=True))[0].text


# -- reading the pipeline from outside ------------------------------------------------------------
def services_up(server) -> dict[str, list[str]]:
    """service -> the addresses the gateway's /metrics shows up (it follows a service that moved)."""
    text = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30).text
    up: dict[str, list[str]] = {}
    for instance, service in re.findall(r'^tandem_service_up\{instance="([^"]+)",service="(\w+)"\} 1\.0$', text, re.M):
        up.setdefault(service, []).append(instance)
    return up


def migrations(server) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r'^tandem_request_migrations_total\{reason="\w+"\} (\S+)$', text, re.M))


def listener_pid(address: str) -> int:
    port = int(address.rsplit(":", 1)[1])
    return next(c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port)


def decode_stats(address: str) -> dict:
    with grpc.insecure_channel(address) as channel:
        return dict(decode_pb2_grpc.DecodeStub(channel).Stats(common_pb2.StatsRequest(), timeout=10,
                                                              metadata=WITH_TOKEN).values)


def wait_restarted(server, service: str, old_pids: set[int], count: int = 1) -> list[str]:
    """Wait until `count` instances of the service are up again, none of them an old process."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        up = services_up(server).get(service, [])
        try:
            if len(up) == count and not {listener_pid(a) for a in up} & old_pids:
                return up
        except StopIteration:  # moved between the scrape and the lookup
            pass
        time.sleep(1)
    pytest.fail(f"{service} did not come back:\n" + "\n".join(server.lines[-30:]))


def sdk_pieces(server, prompt: str = PROMPT):
    client = Client(f"127.0.0.1:{server.port}", timeout=300, max_retries=0)
    for chunk in client.generate(prompt, temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True):
        yield chunk.text
    client.close()


def http_pieces(server, prompt: str = PROMPT):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", timeout=300,
                       max_retries=0) as oai:
        model = oai.models.list().data[0].id
        for chunk in oai.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}):
            yield chunk.choices[0].text if chunk.choices else ""


def through_fault(pieces, fault) -> str:
    """The stream's text, with fault() called once its first pieces arrived."""
    text = [next(pieces) for _ in range(3)]
    fault()
    return "".join(text + list(pieces))


def kill(address: str) -> int:
    pid = listener_pid(address)
    os.kill(pid, signal.SIGKILL)
    return pid


@contextmanager
def port_taken(address: str):
    """Hold a service's port (listening, closing every connection at once) so its restart cannot
    bind it there."""
    host, port = address.rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # over the dead process's TIME_WAITs
    for _ in range(100):  # until the killed process is gone
        try:
            sock.bind((host, int(port)))
            break
        except OSError:
            time.sleep(0.01)
    sock.listen()
    sock.settimeout(0.2)
    done = threading.Event()

    def refuse():
        while not done.is_set():
            try:
                sock.accept()[0].close()
            except OSError:
                pass
    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sock.close()


# -- decode: on the stream's path -----------------------------------------------------------------
@pytest.mark.parametrize("api", ["sdk", "http"])
def test_a_killed_decode_worker_with_a_second_replica(two_decoders, want, api):
    server = two_decoders
    decoders = [server.address_of("decode-0"), server.address_of("decode-1")]
    pieces = (sdk_pieces if api == "sdk" else http_pieces)(server)
    killed = []

    def fault():
        victim = next(a for a in decoders if decode_stats(a)["running"])
        killed.append(kill(victim))

    before = migrations(server)
    assert through_fault(pieces, fault) == want
    assert migrations(server) == before + 1
    wait_restarted(server, "decode", set(killed), count=2)


# -- services off the stream's path after the kill ------------------------------------------------
@pytest.mark.parametrize("service", ["prefill", "tokenizer", "retrieval", "draft"])
def test_a_killed_service_off_the_path_leaves_streams_and_serving_intact(two_decoders, want, default_llm, service):
    server = two_decoders
    address = services_up(server)[service][0]
    killed = []
    assert through_fault(sdk_pieces(server), lambda: killed.append(kill(address))) == want
    # a request right away waits for (prefill, tokenizer) or does not need (retrieval, draft) the restart
    prompt = "The capital of France is"
    with Client(f"127.0.0.1:{server.port}", timeout=RESTART_TIMEOUT_S, max_retries=0) as client:
        got = client.complete(prompt, temperature=0, max_tokens=8)
    assert got.text == default_llm.generate(prompt, tandem.SamplingParams(temperature=0, max_tokens=8))[0].text
    wait_restarted(server, service, set(killed))


def test_a_stopped_kv_store_costs_bounded_time(two_decoders, default_llm):
    """SIGSTOP: the store neither answers nor closes its connections. Its calls time out (the
    worker's KV_STORE_TIMEOUT_S) and are then left alone for a while: requests complete."""
    server = two_decoders
    pid = listener_pid(services_up(server)["kvstore"][0])
    greedy = dict(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [f"{PROMPT} Chapter {i}: the keeper counts the waves, one by one, until the dawn." for i in range(3)]
    os.kill(pid, signal.SIGSTOP)
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=120, max_retries=0) as client:
            for prompt in prompts:  # new prompts: their blocks are looked up in and published to the store
                start = time.monotonic()
                got = client.complete(prompt, **greedy).text
                assert got == default_llm.generate(prompt, tandem.SamplingParams(**greedy))[0].text
                assert time.monotonic() - start < 60
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_killed_kv_store_restarted_on_a_new_port_is_found_again(two_decoders, want, default_llm):
    server = two_decoders
    old = services_up(server)["kvstore"][0]
    killed = []
    with ExitStack() as held:
        def fault():
            killed.append(kill(old))
            held.enter_context(port_taken(old))

        assert through_fault(sdk_pieces(server), fault) == want
        new = wait_restarted(server, "kvstore", set(killed))[0]
        assert new != old
        # The workers find the store at its new address: a new prompt's blocks are published there.
        deadline = time.monotonic() + 90
        with Client(f"127.0.0.1:{server.port}", timeout=120) as client, grpc.insecure_channel(new) as channel:
            store = kvstore_pb2_grpc.KVStoreStub(channel)
            used = lambda: dict(store.Stats(common_pb2.StatsRequest(), timeout=10,  # noqa: E731
                                            metadata=WITH_TOKEN).values)["bytes_used"]
            i = 0
            while used() == 0:
                assert time.monotonic() < deadline, "the prefill worker never published to the moved store"
                client.complete(f"{PROMPT} Part {i}: the storm breaks over the rocks and the lamp holds.",
                                temperature=0, max_tokens=2)
                i += 1
                time.sleep(1)


# -- aggregated: one worker, the stream waits for its restart -------------------------------------
@pytest.fixture
def one_aggregated_worker(servers, tmp_path_factory) -> Server:
    config = tmp_path_factory.mktemp("aggregated") / "tandem.yaml"
    config.write_text("mode: aggregated\n")
    return servers.get("--config", str(config))


def test_a_killed_aggregated_worker_alone_is_waited_for(one_aggregated_worker, want):
    server = one_aggregated_worker
    address = server.address_of("worker-0")
    killed = []
    assert through_fault(sdk_pieces(server), lambda: killed.append(kill(address))) == want
    assert migrations(server) == 1
    wait_restarted(server, "worker", set(killed))
