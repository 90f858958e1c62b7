"""Request migration and health-aware routing in an in-process pipeline on the tiny model: a stream
whose worker dies, hangs or drains finishes on another worker (or the restarted one, found on its
new port) with the tokens of the run without the fault, each token once; a stalled prefill moves
to another prefill worker; retries are bounded and can be turned off; the router skips a worker
that is not serving."""
from __future__ import annotations

import re
import threading
import time

import grpc
import httpx
import pytest

import tandem
from tandem.orchestration.local import InProcessPipeline
from tandem.sdk import Client
from tests.unit.services.test_pipeline import config, stats, wait_until

PROMPT = "To be, or not to be, that is the question:"
LONG = dict(temperature=0, max_tokens=200, ignore_eos=True)
STEP_S = 0.01  # each engine step is slowed to this, so a stream is still running when the fault comes


def worker_of(pipe: InProcessPipeline, name: str):
    return next(r.servicer.worker for r in pipe.hosts[name].registrations if hasattr(r.servicer, "worker"))


def pace(pipe: InProcessPipeline, name: str) -> threading.Event:
    """Slow the worker's engine steps. Returns its gate: cleared, the steps wait, a hung worker
    whose process still answers (health SERVING, keepalive pings)."""
    engine, gate = worker_of(pipe, name).llm.engine, threading.Event()
    step = engine.step

    def slow_step():
        time.sleep(STEP_S)
        gate.wait()
        return step()
    engine.step = slow_step
    gate.set()
    return gate


def running(pipe: InProcessPipeline, names: list[str]) -> str:
    """The one of `names` running a request now."""
    assert wait_until(lambda: any(stats(pipe, n)["running"] for n in names))
    return next(n for n in names if stats(pipe, n)["running"])


def migrations(pipe: InProcessPipeline) -> dict[str, float]:
    text = httpx.get(f"http://{pipe.http_address}/metrics", timeout=10).text
    found = re.findall(r'^tandem_request_migrations_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    return {reason: float(count) for reason, count in found}


def stream_with_fault(pipe: InProcessPipeline, fault, prompt: str = PROMPT, **sampling) -> list:
    """Stream a request, call fault() after its first chunks, and collect the rest."""
    with Client(pipe.address, timeout=60, max_retries=0) as client:
        chunks = client.generate(prompt, **sampling)
        got = [next(chunks) for _ in range(3)]
        fault()
        got += list(chunks)
    return got


def joined(chunks, index: int = 0) -> tuple[list[int], str]:
    mine = [c for c in chunks if c.index == index]
    return [t for c in mine for t in c.token_ids], "".join(c.text for c in mine)


@pytest.fixture
def two_decoders(tiny_hf_dir):  # per test: kept for the module, its stop waited 4 x 15 s at the end
    with InProcessPipeline(config(tiny_hf_dir, replicas={"prefill": 1, "decode": 2})) as p:
        for name in ("decode-0", "decode-1"):
            pace(p, name)
        yield p


def test_a_stream_survives_its_decode_worker_dying(two_decoders, tiny_llm):
    pipe = two_decoders
    want = tiny_llm.generate(PROMPT, tandem.SamplingParams(**LONG))[0]
    before = migrations(pipe).get("draining", 0) + migrations(pipe).get("unavailable", 0)
    victim = {}

    def fault():
        victim["name"] = running(pipe, ["decode-0", "decode-1"])
        pipe.kill(victim["name"])

    chunks = stream_with_fault(pipe, fault, **LONG)
    tokens, text = joined(chunks)
    assert tokens == want.token_ids and text == want.text  # no gap, no duplicate
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    assert chunks[-1].finished and chunks[-1].usage.completion_tokens == 200
    after = migrations(pipe)
    assert after.get("draining", 0) + after.get("unavailable", 0) == before + 1
    survivor = "decode-1" if victim["name"] == "decode-0" else "decode-0"
    assert wait_until(lambda: stats(pipe, survivor)["kv_blocks_used"] == 0)
    pipe.restart(victim["name"])
    pace(pipe, victim["name"])


def test_a_seeded_sampled_stream_with_penalties_continues_its_draws(two_decoders):
    """Each draw depends on the seed and its position, so the resumed worker draws what the dead one
    would have; the penalties count the output sent before the move."""
    pipe = two_decoders
    sampled = dict(temperature=0.9, top_p=0.95, seed=77, presence_penalty=0.8, frequency_penalty=0.4,
                   max_tokens=120, ignore_eos=True, n=2)
    with Client(pipe.address, timeout=60) as client:
        want = client.complete(PROMPT, **sampled)
    chunks = stream_with_fault(pipe, lambda: pipe.kill(running(pipe, ["decode-0", "decode-1"])), **sampled)
    for index in range(2):
        assert joined(chunks, index)[0] == want.sample_token_ids[index]
    name = next(n for n in ("decode-0", "decode-1") if n not in pipe.hosts)
    pipe.restart(name)
    pace(pipe, name)


def test_a_hung_worker_is_left_after_the_stall_timeout(tiny_hf_dir, tiny_llm):
    cfg = config(tiny_hf_dir, mode="aggregated", replicas={"decode": 2}, migration={"stall_timeout_s": 1.0})
    with InProcessPipeline(cfg) as pipe:
        gates = {name: pace(pipe, name) for name in ("worker-0", "worker-1")}
        try:
            chunks = stream_with_fault(pipe, lambda: gates[running(pipe, list(gates))].clear(), **LONG)
        finally:
            for gate in gates.values():
                gate.set()
        want = tiny_llm.generate(PROMPT, tandem.SamplingParams(**LONG))[0]
        assert joined(chunks) == (want.token_ids, want.text)
        assert migrations(pipe) == {"stalled": 1.0}


def test_a_draining_worker_hands_its_streams_over(tiny_hf_dir, tiny_llm):
    cfg = config(tiny_hf_dir, mode="aggregated", replicas={"decode": 2})
    with InProcessPipeline(cfg) as pipe:
        for name in ("worker-0", "worker-1"):
            pace(pipe, name)

        def fault():
            name = running(pipe, ["worker-0", "worker-1"])
            pipe.hosts[name].options.grace_s = 0.2  # a rolling restart: NOT_SERVING, then the rest is cut
            threading.Thread(target=pipe.hosts.pop(name).stop).start()

        chunks = stream_with_fault(pipe, fault, **LONG)
        want = tiny_llm.generate(PROMPT, tandem.SamplingParams(**LONG))[0]
        assert joined(chunks) == (want.token_ids, want.text)
        assert sum(migrations(pipe).values()) == 1


def test_a_restarted_worker_on_a_new_port_is_found_and_waited_for(tiny_hf_dir, tiny_llm):
    """One decode worker: its stream waits for the restart, which comes back on another port."""
    with InProcessPipeline(config(tiny_hf_dir)) as pipe:
        pace(pipe, "decode-0")
        old = pipe.address_of("decode-0")

        def fault():
            pipe.kill("decode-0")
            threading.Timer(0.5, lambda: (pipe.restart("decode-0"), pace(pipe, "decode-0"))).start()

        chunks = stream_with_fault(pipe, fault, **LONG)
        want = tiny_llm.generate(PROMPT, tandem.SamplingParams(**LONG))[0]
        assert joined(chunks) == (want.token_ids, want.text)
        assert pipe.address_of("decode-0") != old
        with Client(pipe.address, timeout=30) as client:  # and new requests go there
            assert client.complete(PROMPT, max_tokens=4, temperature=0).token_ids == want.token_ids[:4]


def test_a_stalled_prefill_is_retried_on_another_prefill_worker(tiny_hf_dir, tiny_llm):
    cfg = config(tiny_hf_dir, replicas={"prefill": 2, "decode": 1}, migration={"stall_timeout_s": 1.0})
    with InProcessPipeline(cfg) as pipe:
        gate = pace(pipe, "prefill-0")
        gate.clear()  # prefill-0 hangs; with nothing cached anywhere and no load, the router picks it first
        try:
            with Client(pipe.address, timeout=30) as client:
                got = client.complete(PROMPT, temperature=0, max_tokens=8, ignore_eos=True)
        finally:
            gate.set()
        assert got.token_ids == tiny_llm.generate(PROMPT, tandem.SamplingParams(temperature=0, max_tokens=8,
                                                                                ignore_eos=True))[0].token_ids
        assert migrations(pipe) == {"prefill_stalled": 1.0}


@pytest.mark.parametrize("migration, tries", [({"stall_timeout_s": 0.5, "max_attempts": 2}, 3),
                                              ({"enabled": False, "stall_timeout_s": 0.5}, 1)])
def test_retries_are_bounded_and_migration_can_be_turned_off(tiny_hf_dir, migration, tries):
    with InProcessPipeline(config(tiny_hf_dir, mode="aggregated", migration=migration)) as pipe:
        gate = pace(pipe, "worker-0")
        gate.clear()  # the only worker hangs
        try:
            with Client(pipe.address, timeout=30, max_retries=0) as client, pytest.raises(Exception) as err:
                client.complete(PROMPT, **LONG)
        finally:
            gate.set()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "stalled" in str(err.value)
        assert stats(pipe, "worker-0")["requests"] == tries  # Decode calls it admitted
        assert sum(migrations(pipe).values()) == tries - 1


def test_the_router_never_picks_a_worker_that_is_not_serving(tiny_hf_dir):
    cfg = config(tiny_hf_dir, mode="aggregated", replicas={"decode": 2})
    with InProcessPipeline(cfg) as pipe, Client(pipe.address, timeout=30, max_retries=0) as client:
        worker_of(pipe, "worker-0").draining = True  # health NOT_SERVING; its port still answers
        assert wait_until(lambda: not pipe.hosts["gateway-0"].registrations[0].servicer.router.decode[0].serving)
        for _ in range(6):
            client.complete(PROMPT, max_tokens=2, temperature=0)
        assert stats(pipe, "worker-0")["requests"] == 0 and stats(pipe, "worker-1")["requests"] == 6
        assert migrations(pipe) == {}


def test_the_migration_config_is_typed_and_checked():
    from tandem.errors import ConfigError
    from tandem.services.config import MigrationConfig, PipelineConfig

    loaded = PipelineConfig(migration={"enabled": False, "stall_timeout_s": 5})
    assert loaded.migration == MigrationConfig(enabled=False, stall_timeout_s=5)
    assert PipelineConfig(**loaded.to_dict()).migration == loaded.migration  # what the Ray actors receive
    for bad, message in (({"stall": 1}, "unknown keys"), ({"max_attempts": -1}, "max_attempts"),
                         ({"enabled": "yes"}, "enabled"), ({"worker_wait_s": 0}, "worker_wait_s"), ("on", "mapping")):
        with pytest.raises(ConfigError, match=message):
            PipelineConfig(migration=bad)
