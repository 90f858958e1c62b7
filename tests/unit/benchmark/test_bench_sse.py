"""Server-sent events: the parser on streams cut at every possible byte, and the OpenAI backend's
reading of a stream (content deltas, the usage-only last chunk, [DONE], error events)."""
from __future__ import annotations

import asyncio
import json

import pytest

from tandem.benchmark.backends import OpenAIBackend
from tandem.benchmark.config import BenchConfig
from tandem.benchmark.metrics import RequestRecord
from tandem.benchmark.sse import SSEEvent, SSEParser

STREAM = (
    b": ping\r\n\r\n"
    b'data: {"choices": [{"index": 0, "text": "h\xc3\xa9"}]}\r\n\r\n'
    b"event: error\ndata: line one\ndata: line two\n\n"
    b"id: 7\nretry: 100\ndata:no-space\n\n"
    b"data: [DONE]\n\n"
)
EVENTS = [SSEEvent('{"choices": [{"index": 0, "text": "hé"}]}'), SSEEvent("line one\nline two", "error"),
          SSEEvent("no-space"), SSEEvent("[DONE]")]


def parse(pieces: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events = [e for piece in pieces for e in parser.feed(piece)]
    return events + parser.close()


def test_a_whole_stream():
    events = parse([STREAM])
    assert events == EVENTS
    assert [e.is_done for e in events] == [False, False, False, True]


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
def test_any_split_point_gives_the_same_events(cut):
    # cuts land inside "data:", inside a JSON line, between the CR and LF of a CRLF and inside the é
    assert parse([STREAM[:cut], STREAM[cut:]]) == EVENTS


def test_byte_by_byte():
    assert parse([bytes([b]) for b in STREAM]) == EVENTS


def test_a_last_event_without_its_blank_line_or_newline():
    assert parse([b'data: {"a": 1}\n\ndata: [DONE]']) == [SSEEvent('{"a": 1}'), SSEEvent("[DONE]")]
    assert parse([b"data: x\r"]) == [SSEEvent("x")]
    assert parse([b"\n\n: only a comment\n"]) == []


class FakeResponse:
    """What httpx's streamed response gives the backend: its body in pieces."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    async def aiter_bytes(self):
        for piece in self.pieces:
            await asyncio.sleep(0.002)
            yield piece


def sse(*payloads) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n" for p in payloads)


def read(pieces: list[bytes], chat: bool = False) -> RequestRecord:
    backend = OpenAIBackend(BenchConfig(backend="openai-chat" if chat else "openai"), chat=chat)
    return asyncio.run(backend._read_stream(FakeResponse(pieces), RequestRecord(prompt_len=3), 0.0))


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_completions_stream_with_a_usage_only_last_chunk():
    body = sse({"choices": [{"index": 0, "text": ""}]},  # empty: not the first token
               *({"choices": [{"index": 0, "text": f" w{i}"}]} for i in range(4)),
               {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]},
               {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 6}}, b"[DONE]")
    record = read(split_every(body, 7))
    assert record.success and len(record.chunk_tokens) == 4 and len(record.itl) == 3
    assert (record.output_tokens, record.prompt_len) == (6, 9)  # the server's usage wins
    assert 0 < record.ttft <= record.e2el


def test_chat_stream_skips_the_role_delta_and_counts_deltas_without_usage():
    body = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
               {"choices": [{"index": 0, "delta": {"content": "Hi"}}]},
               {"choices": [{"index": 0, "delta": {"content": " there"}}]},
               {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, b"[DONE]")
    record = read([body], chat=True)
    assert record.success and record.output_tokens == 2 and record.prompt_len == 3


def test_an_error_event_fails_the_request():
    body = sse({"choices": [{"index": 0, "text": "a"}]},
               {"error": {"message": "out of KV blocks", "type": "server_error", "code": 500}})
    record = read([body])
    assert not record.success and record.error_type == "server_error" and "KV blocks" in record.error
    named = read([sse({"choices": [{"index": 0, "text": "a"}]}) + b"event: error\ndata: boom\n\n"])
    assert (named.error_type, named.error) == ("StreamError", "boom")
    assert read([b"data: {not json\n\n"]).error_type == "BadEvent"


def test_a_stream_that_ends_without_done_still_completes():
    record = read([sse({"choices": [{"index": 0, "text": "x"}]}, {"choices": [], "usage": {"completion_tokens": 1}})])
    assert record.success and record.output_tokens == 1 and record.tpot is None
    assert read([b""]).error_type == "NoContent"
