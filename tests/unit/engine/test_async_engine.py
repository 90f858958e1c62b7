"""AsyncEngine: streams, early close and cancellation free KV blocks, errors reach the caller
and never stop the engine thread."""
from __future__ import annotations

import asyncio

import pytest

import tandem
from tandem.engine.async_engine import AsyncEngine
from tandem.outputs import RequestOutput, StreamDelta

GREEDY = tandem.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
LONG = tandem.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)  # outlives the test's actions


@pytest.fixture()
def engine(tiny_hf_dir):
    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=64, block_size=4)
    async_engine = AsyncEngine(llm.engine)
    yield llm, async_engine
    async_engine.shutdown()
    assert not async_engine._thread.is_alive()


async def _collect(stream) -> tuple[list[int], str, RequestOutput]:
    tokens, text = [], ""
    async for item in stream:
        if isinstance(item, RequestOutput):
            return tokens, text, item
        assert isinstance(item, StreamDelta)
        tokens += item.token_ids
        text += item.text
    raise AssertionError("stream ended without a RequestOutput")


def test_concurrent_streams_match_the_synchronous_api(engine):
    llm, async_engine = engine
    prompts = [llm.tokenize(p) for p in ("To be, or not", "Now is the winter", "Friends, Romans", "A horse")]
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]

    async def main():
        streams = [await async_engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
        return await asyncio.gather(*[_collect(s) for s in streams])

    results = asyncio.run(main())
    assert [tokens for tokens, _, _ in results] == expected
    for tokens, text, output in results:
        assert output.token_ids == tokens and output.text == text and output.finish_reason == "length"
        assert output.metrics.ttft > 0
    assert async_engine.stats()["kv_blocks_used"] == 0


def test_bad_request_raises_at_add(engine):
    _, async_engine = engine

    async def main():
        with pytest.raises(ValueError, match="empty"):
            await async_engine.add_request("bad", [], GREEDY)
        stream = await async_engine.add_request("ok", [5, 6], GREEDY)
        with pytest.raises(ValueError, match="already in use"):
            await async_engine.add_request("ok", [5, 6], GREEDY)
        await _collect(stream)

    asyncio.run(main())


def _all_freed(llm) -> bool:
    return llm.engine.stats()["kv_blocks_used"] == 0 and not llm.engine.requests


def _wait_for(predicate, timeout: float = 10.0):
    async def poll():
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not reached")
    return poll()


def test_closing_a_stream_early_aborts_and_frees_blocks(engine):
    llm, async_engine = engine

    async def main():
        stream = await async_engine.add_request("long", [5, 6, 7], LONG)
        async for item in stream:
            if isinstance(item, StreamDelta):
                break
        assert llm.engine.stats()["kv_blocks_used"] > 0
        await stream.aclose()
        await _wait_for(lambda: _all_freed(llm))

    asyncio.run(main())


def test_cancelling_the_consumer_aborts(engine):
    llm, async_engine = engine

    async def main():
        stream = await async_engine.add_request("cancel-me", [5, 6, 7], LONG)
        task = asyncio.create_task(_collect(stream))
        await _wait_for(lambda: llm.engine.stats()["kv_blocks_used"] > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: _all_freed(llm))

    asyncio.run(main())


def test_explicit_abort_ends_the_stream(engine):
    llm, async_engine = engine

    async def main():
        stream = await async_engine.add_request("a", [5, 6, 7], LONG)
        await async_engine.abort("a")
        await async_engine.abort("never-existed")  # no-op
        tokens, _, output = await _collect(stream)
        assert len(tokens) < LONG.max_tokens
        assert llm.engine.stats()["kv_blocks_used"] == 0

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_not_the_engine(engine, monkeypatch):
    llm, async_engine = engine
    real_execute = llm.engine.runner.execute
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in the model")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(llm.engine.runner, "execute", flaky)

    async def main():
        stream = await async_engine.add_request("doomed", [5, 6, 7], GREEDY)
        with pytest.raises(RuntimeError, match="boom in the model"):
            await _collect(stream)
        assert llm.engine.stats()["kv_blocks_used"] == 0
        tokens, _, _ = await _collect(await async_engine.add_request("fine", [5, 6, 7], GREEDY))
        assert len(tokens) == GREEDY.max_tokens

    asyncio.run(main())
    assert async_engine.is_alive
