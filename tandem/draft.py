"""Draft proposers for speculative decoding: the plugin interface.

A proposer guesses the next few tokens of a sequence cheaply; the target model verifies them all
in one forward and keeps the longest correct prefix (Leviathan et al. 2023), so a good guess
saves forwards and a bad one costs little. Built-ins: "ngram" (prompt lookup) here; the small
draft-model proposer comes with the draft service.
"""
from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import ClassVar

from tandem.errors import ConfigError


class DraftProposer:
    """Base class of draft proposers. Subclass it, set `name`, validate options in __init__."""

    name: ClassVar[str] = ""
    api_version: ClassVar[int] = 1
    # True: the engine never calls propose() while stepping, only propose_async(), and uses an
    # answer in a later step if it has arrived by then (for a proposer that waits on another
    # process or a device: it must not stall the batch).
    asynchronous: ClassVar[bool] = False

    def __init__(self, **options):
        if options:
            raise ConfigError(f"draft proposer {self.name!r} takes no options, got {sorted(options)}")

    def propose(self, token_ids: Sequence[int], num_tokens: int) -> list[int]:
        """Up to num_tokens guessed continuations of token_ids (prompt + output so far); fewer,
        or none, when it has no good guess. Must be deterministic for the same input."""
        raise NotImplementedError

    def propose_async(self, token_ids: Sequence[int], num_tokens: int) -> concurrent.futures.Future:
        """Start a proposal and return at once: a future of what propose() would return (its
        done() and result() are all the engine uses). Override it when `asynchronous` is True;
        this default runs propose() now."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(self.propose(token_ids, num_tokens))
        except Exception as exc:
            future.set_exception(exc)
        return future
