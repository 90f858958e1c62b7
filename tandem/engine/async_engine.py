"""AsyncEngine: the LLMEngine on a background thread, with an asyncio API for the services.

Only the engine thread touches engine state: requests and aborts arrive as commands it runs
between steps, and results go back to each caller's event loop with call_soon_threadsafe. Torch
releases the GIL inside its ops, so the event loop stays responsive while a step runs. An error
inside a step fails the requests of that step's batch, never the engine. A caller cancelled while
its command waits is skipped (concurrent.futures' set_running_or_notify_cancel protocol), so no
caller's action can reach the engine thread as an exception. Should the loop die anyway (a bug), its
streams fail, new requests are refused and `on_fatal` tells the owner (a worker then reports
NOT_SERVING and exits, so Ray restarts it).

    engine = AsyncEngine(llm_engine)
    stream = await engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=8))
    async for item in stream:   # StreamDelta (token_ids, text, finish_reason) ..., then the RequestOutput
        ...
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from tandem.engine.llm_engine import LLMEngine
from tandem.errors import ParallelGroupError, PluginError
from tandem.outputs import RequestOutput, StreamDelta
from tandem.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def _nothing() -> None:
    """A command that only wakes the engine thread."""


_IDLE_WAIT_S = 0.5  # how often an idle engine thread checks whether it should stop


class _Stream:
    """One request's channel from the engine thread to the caller's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()
        self.output: RequestOutput | None = None

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_fatal: Callable[[BaseException], object] | None = None):
        """on_fatal(exc) runs on the engine thread if its loop dies (never for a request's error)."""
        self.engine, self.on_fatal = engine, on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stopping = False
        self.fatal_error: BaseException | None = None
        if engine.connector is not None:  # a finished KV transfer wakes an idle engine thread
            engine.connector.notify = self._wake
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    # -- caller side (any event loop) --------------------------------------------------------
    async def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                          **options) -> AsyncIterator[StreamDelta | RequestOutput]:
        """Queue a request; raises at once for bad input or a full queue. Returns its stream:
        StreamDelta items as samples advance, then the final RequestOutput (metrics included).
        Cancelling the consumer, or closing the stream early (`await stream.aclose()`, or
        `contextlib.aclosing`), aborts the request and frees its blocks at once. options go to
        LLMEngine.add_request (prefill_only, generated)."""
        stream = _Stream(asyncio.get_running_loop())
        future = self._submit(self._add, request_id, prompt_ids, params, options, stream)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancelled():  # the add ran (or is running): nobody will read this stream
                self._commands.put((self._abort, (request_id,), None))
            raise
        return self._iterate(request_id, stream)

    async def abort(self, request_id: str) -> None:
        await self._call(self._abort, request_id)

    async def run(self, fn: Callable, *args):
        """Run fn(*args) on the engine thread between steps (the only safe place to touch engine
        state, e.g. LLMEngine.num_cached_tokens) and return its result."""
        return await self._call(fn, *args)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Abort everything, stop the thread, wait for it."""
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout=30)

    @property
    def stopped(self) -> bool:
        """Whether the engine thread has ended (after shutdown: nothing touches the engine any more)."""
        return not self._thread.is_alive()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _wake(self) -> None:
        self._commands.put((_nothing, (), None))

    def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        if not self.is_alive:
            raise RuntimeError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, args, future))
        return future

    async def _call(self, fn: Callable, *args):
        # Cancelling the awaiting task cancels `future` if the engine thread has not taken it yet.
        return await asyncio.wrap_future(self._submit(fn, *args))

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[StreamDelta | RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = isinstance(item, RequestOutput)
                yield item
                if finished:
                    return
        finally:
            if not finished and self.is_alive:
                self._commands.put((self._abort, (request_id,), None))
            self._streams.pop(request_id, None)

    # -- engine thread --------------------------------------------------------------------------
    def _add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, options: dict,
             stream: _Stream) -> None:
        self.engine.add_request(request_id, prompt_ids, params, **options)
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        stream = self._streams.get(request_id)
        if stream is not None and stream.output is None:
            stream.output = RequestOutput(request_id, [], [], finished=True)
            stream.put(StreamDelta(request_id, 0, [], "", "abort"))
            stream.put(stream.output)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands(block=not self.engine.ready())
                if self.engine.ready() and not self._stopping:
                    self._step()
            for request_id in self.engine.unfinished_ids():
                self._abort(request_id)
        except BaseException as exc:  # a bug in the loop itself: fail loudly, never hang callers
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        log.critical("the engine loop died; failing its requests", exc_info=exc)
        self.fatal_error, self._stopping = exc, True
        error = RuntimeError(f"the engine stopped: {type(exc).__name__}: {exc}")
        for stream in list(self._streams.values()):
            if stream.output is None:
                stream.put(error)
        while True:  # callers still waiting on commands
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is not None and command[2] is not None and command[2].set_running_or_notify_cancel():
                command[2].set_exception(error)
        if self.on_fatal is not None:
            try:
                self.on_fatal(exc)
            except Exception:
                log.exception("on_fatal failed")

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            fn, args, future = command
            # A caller cancelled while this command waited: skip it. Once running, its future can
            # no longer be cancelled, so set_result/set_exception below cannot raise.
            if future is None or future.set_running_or_notify_cancel():
                self._execute(fn, args, future)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    @staticmethod
    def _execute(fn: Callable, args: tuple, future: concurrent.futures.Future | None) -> None:
        try:
            result = fn(*args)
        except Exception as exc:  # reported to the caller, never fatal to the engine
            if future is not None:
                future.set_exception(exc)
            else:
                log.warning("engine command %s failed: %s", getattr(fn, "__name__", fn), exc)
            return
        if future is not None:
            future.set_result(result)

    def _step(self) -> None:
        try:
            deltas, finished = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the running requests")
            self._fail_all(exc)
            return
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.put(delta)
        for output in finished:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.output = output
                stream.put(PluginError(output.error) if output.error else output)

    def _fail_all(self, exc: Exception) -> None:
        for request_id in self.engine.unfinished_ids():
            self.engine.abort(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(exc if isinstance(exc, ParallelGroupError)
                           else PluginError(str(exc)) if isinstance(exc, PluginError)
                           else RuntimeError(f"the engine failed while running this request: {exc}"))
