"""An incremental parser of server-sent events (the WHATWG HTML "event stream" format), the wire
of OpenAI-compatible streaming: `data: {json}` lines, a blank line ending each event, and
`data: [DONE]` last.

Bytes arrive in arbitrary pieces: a piece may end inside a line, inside a UTF-8 character, or
between the CR and LF of a CRLF, so lines are cut only when complete. Comments (`: ping`) are
dropped; `event: error` names an event. A stream that ends without the final blank line still
yields its last event (`close()`), as some servers omit it after `[DONE]`.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

DONE = "[DONE]"
_EOL = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class SSEEvent:
    """One event: its `data` lines joined by newlines, and its `event:` name ("message" if none)."""

    data: str
    event: str = "message"

    @property
    def is_done(self) -> bool:
        return self.data.strip() == DONE


class SSEParser:
    """Feed it bytes as they arrive; it returns the events completed so far.

        parser = SSEParser()
        for piece in pieces:
            for event in parser.feed(piece):
                ...
        for event in parser.close():
            ...
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""

    def feed(self, piece: bytes) -> list[SSEEvent]:
        self._buffer += self._decoder.decode(piece)
        events = []
        while True:
            end = _line_end(self._buffer)
            if end is None:
                return events
            line, self._buffer = self._buffer[:end[0]], self._buffer[end[1]:]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def close(self) -> list[SSEEvent]:
        """The events the stream's end completes: a last line without its newline, a last event
        without its blank line."""
        self._buffer += self._decoder.decode(b"", final=True)
        events = [e for e in (self._line(self._buffer.rstrip("\r")),) if e is not None] if self._buffer else []
        self._buffer = ""
        last = self._dispatch()
        return events + ([last] if last is not None else [])

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: keep-alive pings
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None  # id and retry: nothing a benchmark needs

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent("\n".join(self._data), self._event or "message")
        self._data, self._event = [], ""
        return event


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(end of the first complete line, start of the next), or None when no line is complete.
    A CR at the very end is not yet a line end: its LF may be in the next piece."""
    match = _EOL.search(buffer)
    if match is None or (match.group() == "\r" and match.end() == len(buffer)):
        return None
    return match.start(), match.end()
