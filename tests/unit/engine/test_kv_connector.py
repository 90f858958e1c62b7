"""The engine's KV connector: a request whose prompt blocks are being loaded waits aside while
the others keep stepping (a load never blocks a step); loaded blocks are exact prefix-cache hits;
an abort while loading leaks nothing and the late answer is ignored; a prefill_only request
reports its output only once its blocks are saved; AsyncEngine wakes up for a finished transfer."""
from __future__ import annotations

import asyncio

import pytest

from tandem import SamplingParams
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.kv_connector import KVConnector, Loaded, LocalStoreConnector, Saved
from tandem.kv_store import KVBlockStore
from tests.unit.engine.test_engine import check, make_llm

BLOCK = 16
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(40, 40 + 3 * BLOCK + 5))


class HeldConnector(KVConnector):
    """Loads and saves from a LocalStoreConnector, answered only when the test says so."""

    def __init__(self, inner: LocalStoreConnector):
        super().__init__()
        self.inner, self.held = inner, []

    def load(self, request_id, hashes, release=False):
        self.inner.load(request_id, hashes, release)
        self.held += self.inner.poll()
        return True

    def save(self, request_id, blocks, pin):
        self.inner.save(request_id, blocks, pin)
        self.held += self.inner.poll()
        return True

    def release(self):
        held, self.held = self.held, []
        for event in held:
            self._finish(event)


@pytest.fixture
def store():
    return KVBlockStore(64 << 20)


@pytest.fixture
def reference(tiny_hf_dir):
    return make_llm(tiny_hf_dir, block_size=BLOCK).generate([PROMPT], GREEDY)[0].token_ids


def seeded(tiny_hf_dir, store):
    """An engine that computed PROMPT and saved its blocks in the store."""
    engine = make_llm(tiny_hf_dir, block_size=BLOCK).engine
    engine.attach_connector(LocalStoreConnector(store, "ns"))
    engine.add_request("seed", PROMPT, GREEDY, prefill_only=True)
    while engine.has_unfinished():
        engine.step()
    return engine


def test_a_loading_request_waits_aside_while_others_step(tiny_hf_dir, store, reference):
    seeded(tiny_hf_dir, store)
    engine = make_llm(tiny_hf_dir, block_size=BLOCK).engine
    connector = HeldConnector(LocalStoreConnector(store, "ns"))
    engine.attach_connector(connector)
    engine.add_request("loading", PROMPT, GREEDY)
    engine.add_request("other", [7, 8, 9], GREEDY)  # shorter than a block: nothing to load
    outputs = {}
    for _ in range(6):  # the other request runs to completion while the load is held
        for out in engine.step()[1]:
            outputs[out.request_id] = out
        check(engine)
    assert "other" in outputs and "loading" not in outputs
    assert engine.stats()["kv_loading_requests"] == 1
    connector.release()
    while engine.has_unfinished():
        for out in engine.step()[1]:
            outputs[out.request_id] = out
        check(engine)
    got = outputs["loading"]
    assert got.token_ids == reference
    assert got.metrics.num_cached_tokens == 3 * BLOCK  # the loaded blocks were exact prefix hits
    assert connector.inner.stats()["kv_blocks_fetched"] == 3


def test_an_abort_while_loading_leaks_nothing(tiny_hf_dir, store):
    seeded(tiny_hf_dir, store)
    engine = make_llm(tiny_hf_dir, block_size=BLOCK).engine
    connector = HeldConnector(LocalStoreConnector(store, "ns"))
    engine.attach_connector(connector)
    engine.add_request("gone", PROMPT, GREEDY)
    engine.abort("gone")
    connector.release()
    assert engine.step() == ([], []) and not engine.has_unfinished()
    assert engine.stats()["kv_blocks_used"] == 0
    check(engine)


def test_a_prefill_reports_once_its_blocks_are_saved(tiny_hf_dir, store):
    engine = make_llm(tiny_hf_dir, block_size=BLOCK).engine
    connector = HeldConnector(LocalStoreConnector(store, "ns"))
    engine.attach_connector(connector)
    engine.add_request("p", PROMPT, GREEDY, prefill_only=True)
    connector.release()  # the load: the store holds nothing yet
    deltas, finished = [], []
    for _ in range(4):
        d, f = engine.step()
        deltas += d
        finished += f
    assert [d.token_ids for d in deltas] == [deltas[0].token_ids] and not finished  # first token out, output held
    assert engine.has_unfinished() and engine.stats()["kv_blocks_used"] == 0  # its blocks are free already
    assert any(isinstance(e, Saved) for e in connector.held)
    connector.release()
    finished = engine.step()[1]
    assert [o.request_id for o in finished] == ["p"] and finished[0].finished
    assert store.stats()["pinned_blocks"] == 3  # pinned for the decode side


def test_async_engine_wakes_for_a_finished_load(tiny_hf_dir, store, reference, monkeypatch):
    """The connector's notify wakes the idle engine thread: with its idle poll made a minute long,
    only that wake-up can finish the request within the test's 20 s."""
    import tandem.engine.async_engine as async_engine

    monkeypatch.setattr(async_engine, "_IDLE_WAIT_S", 60.0)
    seeded(tiny_hf_dir, store)
    engine = make_llm(tiny_hf_dir, block_size=BLOCK).engine
    connector = HeldConnector(LocalStoreConnector(store, "ns"))
    engine.attach_connector(connector)
    runner = AsyncEngine(engine)

    async def main():
        stream = await runner.add_request("r", PROMPT, GREEDY)
        await asyncio.sleep(0.2)
        assert any(isinstance(e, Loaded) for e in connector.held)  # still held: nothing ran
        connector.release()
        items = [item async for item in stream]
        return items[-1]

    try:
        out = asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        runner.shutdown()
    assert out.token_ids == reference
