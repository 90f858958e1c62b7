"""Built-in draft proposer: "ngram", prompt-lookup decoding (Saxena 2023; vLLM's ngram
speculator). If the last n tokens appeared earlier in the context, propose what followed them
there: free guesses that pay off on summaries, code edits and RAG answers that quote their input.
"""
from __future__ import annotations

from tandem.draft import DraftProposer
from tandem.errors import ConfigError
from tandem.plugins import hookimpl


class NGramProposer(DraftProposer):
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not (isinstance(min_n, int) and isinstance(max_n, int) and 1 <= min_n <= max_n):
            raise ConfigError(f"ngram needs integers 1 <= min_n <= max_n, got min_n={min_n!r} max_n={max_n!r}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids, num_tokens):
        tokens = list(token_ids)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            # the most recent earlier occurrence wins: it is the likeliest to continue the same way
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + num_tokens]
        return []


@hookimpl
def tandem_draft_proposers(api_version: int):
    return [NGramProposer]
