"""The soak's requests: what one stream asks for (Spec), how it is sent (the SDK's AsyncClient over
gRPC, or the OpenAI-compatible HTTP API streamed with httpx), and what came of it (Outcome).

A stream read to its end is completed; one we close after `cancel_after` chunks is cancelled (by
us, not a failure); anything else is a failure named by its kind: `grpc:UNAVAILABLE`,
`http:503`, `http_stream:unavailable` (an error event after the 200), `finish:error`, ...
"""
from __future__ import annotations

import json
import random
import time
from contextlib import aclosing
from dataclasses import dataclass

import httpx

from tandem.sdk import AsyncClient, TandemRpcError

# Varied on purpose: code, prose, lists, questions, other languages, long and short.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Write a haiku about the sea.",
    "import numpy as np\n\ndef normalize(x):",
    "Q: What is the boiling point of water at sea level?\nA:",
    "List five fruits that are red:\n1.",
    "The mitochondria is",
    "Translate to French: 'Good morning, how are you?'",
    "In 1969, the first humans",
    "SELECT name, email FROM users WHERE",
    "Dear hiring manager, I am writing to",
    "The quick brown fox",
    "Explain recursion to a five-year-old.",
    "Photosynthesis converts",
    "Here is a short story about a robot who learns to paint. The robot",
    "#include <stdio.h>\n\nint main(void) {",
    "Il était une fois",
    "The main causes of the French Revolution were",
    "A recipe for pancakes: first,",
    "Summer is my favourite season because",
    "To be, or not to be,",
    "The difference between TCP and UDP is",
)
MAX_TOKENS = (8, 16, 32, 64, 128)  # few values, so each (prompt, max_tokens) recurs and is checked
SEEDS = (1, 2)
SEEDED_SAMPLING = {"temperature": 0.8, "top_p": 0.95}


@dataclass(frozen=True)
class Spec:
    prompt: str
    max_tokens: int
    seed: int | None  # None: greedy
    api: str  # "sdk" or "http"
    cancel_after: int | None  # chunks read before we close the stream; None: read it all

    @property
    def key(self) -> tuple:
        """Requests with the same key must produce the same text."""
        return self.prompt, self.max_tokens, self.seed

    def sampling(self) -> dict:
        if self.seed is None:
            return {"temperature": 0}
        return {**SEEDED_SAMPLING, "seed": self.seed}


def random_spec(rng: random.Random, http_share: float, seeded_share: float, cancel_share: float) -> Spec:
    max_tokens = rng.choice(MAX_TOKENS)
    cancel_after = rng.randint(1, max_tokens // 2) if rng.random() < cancel_share else None
    return Spec(rng.choice(PROMPTS), max_tokens, rng.choice(SEEDS) if rng.random() < seeded_share else None,
                "http" if rng.random() < http_share else "sdk", cancel_after)


@dataclass
class Outcome:
    spec: Spec
    start: float  # time.monotonic()
    end: float
    text: str = ""
    cancelled: bool = False
    error: str | None = None  # the failure's kind; None when it did not fail


class StreamError(Exception):
    """A failure reported inside a stream (an error event, an error finish_reason)."""


async def run(spec: Spec, client: AsyncClient, http: httpx.AsyncClient, model: str) -> Outcome:
    start = time.monotonic()
    try:
        if spec.api == "sdk":
            text, cancelled = await _sdk(client, spec)
        else:
            text, cancelled = await _http(http, model, spec)
    except Exception as exc:  # every failure is counted by kind; the soak goes on
        return Outcome(spec, start, time.monotonic(), error=error_kind(exc))
    return Outcome(spec, start, time.monotonic(), text, cancelled)


def error_kind(exc: Exception) -> str:
    if isinstance(exc, TandemRpcError):
        return f"grpc:{exc.code().name}"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"http:{exc.response.status_code}"
    if isinstance(exc, StreamError):
        return str(exc)
    if isinstance(exc, httpx.HTTPError):
        return f"http_transport:{type(exc).__name__}"
    return f"other:{type(exc).__name__}"


async def _sdk(client: AsyncClient, spec: Spec) -> tuple[str, bool]:
    parts: list[str] = []
    async with aclosing(client.generate(spec.prompt, max_tokens=spec.max_tokens, **spec.sampling())) as stream:
        async for chunk in stream:
            parts.append(chunk.text)
            if chunk.finish_reason in ("error", "abort"):
                raise StreamError(f"finish:{chunk.finish_reason}")
            last = chunk.finished or chunk.finish_reason is not None
            if spec.cancel_after is not None and len(parts) >= spec.cancel_after and not last:
                return "".join(parts), True
    return "".join(parts), False


async def _http(http: httpx.AsyncClient, model: str, spec: Spec) -> tuple[str, bool]:
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "stream": True, **spec.sampling()}
    parts: list[str] = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "".join(parts), False
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise StreamError(f"http_stream:{event['error'].get('code')}")
            choices = event.get("choices", [])
            parts += [choice.get("text") or "" for choice in choices]
            reasons = {choice.get("finish_reason") for choice in choices} - {None}
            if reasons & {"error", "abort"}:
                raise StreamError(f"finish:{min(reasons & {'error', 'abort'})}")
            if spec.cancel_after is not None and len(parts) >= spec.cancel_after and not reasons:
                return "".join(parts), True  # leaving the block closes the connection
    raise StreamError("http_stream:ended_without_done")
