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


def _hold_engine_thread(async_engine):
    """Park the engine thread inside a command until the returned event is set: commands sent
    meanwhile stay pending, which is the window the cancellation race needs."""
    import threading

    entered, release = threading.Event(), threading.Event()

    def park():
        entered.set()
        release.wait(10)

    async_engine._commands.put((park, (), None))
    assert entered.wait(10)
    return release


@pytest.mark.parametrize("command", ["add_request", "abort", "run"])
def test_a_caller_cancelled_while_its_command_is_pending_does_not_kill_the_engine(engine, command):
    """Regression (issue 15): set_result/set_exception on the cancelled caller's future raised
    InvalidStateError on the engine thread and the thread died, failing every later request."""
    llm, async_engine = engine

    async def main():
        release = _hold_engine_thread(async_engine)
        calls = {"add_request": lambda: async_engine.add_request("gone", [5, 6, 7], LONG),
                 "abort": lambda: async_engine.abort("gone"),
                 "run": lambda: async_engine.run(lambda: 1 / 0)}  # set_exception path
        task = asyncio.create_task(calls[command]())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        stream = await asyncio.wait_for(async_engine.add_request("after", [5, 6, 7], GREEDY), 20)
        tokens, _, _ = await asyncio.wait_for(_collect(stream), 20)
        assert len(tokens) == GREEDY.max_tokens
        await _wait_for(lambda: _all_freed(llm))  # the cancelled add never ran, or was aborted

    asyncio.run(main())
    assert async_engine.is_alive


def test_a_caller_cancelled_after_its_request_was_added_aborts_it(engine):
    """The add ran on the engine thread but the caller was cancelled before it got the stream:
    nobody will read that stream, so the request must be aborted, not left running."""
    llm, async_engine = engine

    async def main():
        release = _hold_engine_thread(async_engine)
        task = asyncio.create_task(async_engine.add_request("orphan", [5, 6, 7], LONG))
        await asyncio.sleep(0.05)
        release.set()
        await _wait_for(lambda: "orphan" in llm.engine.requests)
        task.cancel()  # the add ran; the caller's await has not resumed yet (or just has)
        try:
            stream = await task
        except asyncio.CancelledError:
            stream = None
        if stream is not None:
            await stream.aclose()
        await _wait_for(lambda: _all_freed(llm))

    asyncio.run(main())


def test_a_dead_engine_loop_is_reported_and_fails_its_streams(tiny_hf_dir, monkeypatch):
    """If the loop itself dies (a bug, not a request's error), the owner hears of it at once
    (on_fatal: a worker reports NOT_SERVING and exits so Ray restarts it), callers get an error
    instead of hanging, and new requests are refused."""
    import threading

    llm = tandem.LLM(str(tiny_hf_dir), progress=False, num_kv_blocks=64, block_size=4)
    died = threading.Event()
    async_engine = AsyncEngine(llm.engine, on_fatal=lambda exc: died.set())

    def broken_step():
        raise SystemError("the loop itself is broken")

    async def main():
        stream = await async_engine.add_request("victim", [5, 6, 7], LONG)
        monkeypatch.setattr(async_engine, "_step", broken_step)
        with pytest.raises(RuntimeError, match="engine"):
            await asyncio.wait_for(_collect(stream), 10)
        assert died.wait(10)
        assert not async_engine.is_alive
        with pytest.raises(RuntimeError, match="not running"):
            await async_engine.add_request("later", [5, 6, 7], GREEDY)

    asyncio.run(main())
    async_engine.shutdown()
