"""Built-in draft proposers.

"ngram": prompt-lookup decoding (Saxena 2023; vLLM's ngram speculator). If the last n tokens
appeared earlier in the context, propose what followed them there: free guesses that pay off on
summaries, code edits and RAG answers that quote their input.

"draft_model": a small model that shares the target's tokenizer guesses greedily, e.g. the
default model quantized to int4 drafting for itself in fp32, or its first N layers. It keeps a KV
cache per sequence in step with the tokens it is shown: a call whose tokens extend what a cache
holds feeds only the new ones, and one that diverges (a guess was rejected) rolls the cache back
to the common prefix.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

from tandem.draft import DraftProposer
from tandem.errors import ConfigError
from tandem.plugins import hookimpl

FEED_CHUNK = 512  # tokens per forward when a cache catches up (bounds the attention buffer)


class NGramProposer(DraftProposer):
    name = "ngram"

    def __init__(self, min_n: int = 3, max_n: int = 4):
        """Match the last max_n .. min_n tokens, longest first. A match shorter than 3 tokens guesses
        wrong too often to pay for verifying it on a CPU (bench/RESULTS.md: 1.24x -> 1.42x)."""
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


class _Cache:
    def __init__(self, kv, tokens: list[int]):
        self.kv, self.tokens = kv, tokens


class DraftModelProposer(DraftProposer):
    name = "draft_model"

    def __init__(self, model: str | None = None, quantization: str | None = "int4",
                 quantization_options: dict | None = None, dtype: str = "float32", num_layers: int | None = None,
                 max_sequences: int = 16):
        """model: any model tandem loads (default: the default model); quantization: a quantizer
        plugin applied to it (default int4; None keeps it as loaded); num_layers: keep only the
        first N layers (a layer-truncated draft); max_sequences: KV caches kept, least recently used
        dropped."""
        from tandem.model.loader import load_model
        from tandem.model.quantization import quantize_model
        from tandem.model.registry import DEFAULT_MODEL
        from tandem.plugins import get_plugin_manager

        if not (isinstance(max_sequences, int) and max_sequences >= 1):
            raise ConfigError(f"max_sequences must be a positive integer, got {max_sequences!r}")
        loaded = load_model(model or DEFAULT_MODEL, dtype, progress=False)
        self.model, self.config = loaded.model, loaded.config
        if num_layers is not None:
            if not (isinstance(num_layers, int) and 1 <= num_layers <= self.config.num_layers):
                raise ConfigError(f"num_layers must be in [1, {self.config.num_layers}], got {num_layers!r}")
            self.model.model.layers = self.model.model.layers[:num_layers]
            self.config = dataclasses.replace(self.config, num_layers=num_layers)
        if quantization:
            quantize_model(self.model, get_plugin_manager().create("quantizer", quantization, quantization_options))
        self.dtype = next(self.model.parameters()).dtype
        self.max_sequences = max_sequences
        self.caches: OrderedDict[int, _Cache] = OrderedDict()
        self._ids = 0

    def propose(self, token_ids, num_tokens):
        tokens = list(token_ids)
        if num_tokens <= 0 or not tokens or len(tokens) + num_tokens > self.config.max_position:
            return []
        cache, common = self._cache_for(tokens)
        common = min(common, len(tokens) - 1)  # the last token is always fed: its logits are needed
        cache.kv.length = common  # roll back whatever the target did not keep
        guesses: list[int] = []
        with torch.inference_mode():
            last = self._feed(cache, tokens[common:])
            for _ in range(num_tokens):
                guesses.append(int(last.argmax()))
                if len(guesses) < num_tokens:
                    last = self._feed(cache, guesses[-1:])
        cache.tokens = tokens + guesses[:-1]  # what the cache's KV now holds
        return guesses

    def _cache_for(self, tokens: list[int]) -> tuple[_Cache, int]:
        """The cache sharing the longest prefix with tokens (a new one when none shares any)."""
        best, best_len = None, 0
        for key, cache in self.caches.items():
            n = _common_prefix(cache.tokens, tokens)
            if n > best_len:
                best, best_len = key, n
        if best is None:
            from tandem.model.kv_cache import KVCache

            if len(self.caches) >= self.max_sequences:
                self.caches.popitem(last=False)
            self._ids += 1
            best = self._ids
            self.caches[best] = _Cache(KVCache(self.config, self._capacity(len(tokens)), self.dtype), [])
        self.caches.move_to_end(best)
        return self.caches[best], best_len

    def _capacity(self, needed: int) -> int:
        return min(self.config.max_position, max(1024, 1 << (needed + 64).bit_length()))

    def _feed(self, cache: _Cache, new: list[int]) -> torch.Tensor:
        """Run new tokens through the draft; returns the logits after the last one."""
        kv = cache.kv
        if kv.length + len(new) > kv.max_len:  # grow: copy the kept part into a bigger cache
            from tandem.model.kv_cache import KVCache

            bigger = KVCache(self.config, self._capacity(kv.length + len(new)), self.dtype)
            bigger.k[:, :kv.length], bigger.v[:, :kv.length] = kv.k[:, :kv.length], kv.v[:, :kv.length]
            bigger.length, cache.kv, kv = kv.length, bigger, bigger
        hidden = None
        for start in range(0, len(new), FEED_CHUNK):
            chunk = new[start:start + FEED_CHUNK]
            positions = torch.arange(kv.length, kv.length + len(chunk)).unsqueeze(0)
            hidden = self.model(torch.tensor([chunk]), positions, kv)
            kv.advance(len(chunk))
        return self.model.compute_logits(hidden[0, -1:])[0]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RemoteProposer(DraftProposer):
    """Guesses from the draft service (tandem.v1.Draft) running `method` with its `options`: the
    draft model lives in its own process (a Ray actor of `tandem serve`) instead of the worker's.
    A draft service that is down or slow means no guesses for that step, never a failed request:
    speculation is only ever an optimization. Asynchronous: the engine asks ahead and never waits
    for an answer (tandem.engine.spec_decode)."""

    name = "remote"
    asynchronous = True

    def __init__(self, target: str = "", method: str = "ngram", options: dict | None = None, timeout: float = 2.0,
                 credentials=None):
        """credentials: the pipeline's (tandem.services.credentials.InternalCredentials, set by the
        worker, never by a request): the draft service requires them."""
        import json

        import grpc

        from tandem.v1 import draft_pb2_grpc

        if not target:
            raise ConfigError("the remote draft proposer needs target, the draft service's host:port")
        self.method, self.options_json, self.timeout = method, json.dumps(options or {}), timeout
        channel = credentials.sync_channel(target) if credentials else grpc.insecure_channel(target)
        self.stub = draft_pb2_grpc.DraftStub(channel)
        self.num_failures = 0

    def _request(self, token_ids, num_tokens):
        from tandem.v1 import draft_pb2

        return draft_pb2.ProposeRequest(method=self.method, token_ids=list(token_ids), k=num_tokens,
                                        options_json=self.options_json)

    def propose(self, token_ids, num_tokens):
        import grpc

        if num_tokens <= 0:
            return []
        try:
            answer = self.stub.Propose(self._request(token_ids, num_tokens), timeout=self.timeout)
        except grpc.RpcError:
            self.num_failures += 1
            return []
        return list(answer.token_ids)[:num_tokens]

    def propose_async(self, token_ids, num_tokens):
        """The Propose call in flight (a grpc future: done(), result()); a failed call answers []."""
        import concurrent.futures

        import grpc

        answer: concurrent.futures.Future = concurrent.futures.Future()
        call = self.stub.Propose.future(self._request(token_ids, num_tokens), timeout=self.timeout)

        def done(call) -> None:
            try:
                answer.set_result(list(call.result().token_ids)[:num_tokens])
            except grpc.RpcError:
                self.num_failures += 1
                answer.set_result([])
            except Exception as exc:  # a cancelled call, a broken channel
                answer.set_exception(exc)

        call.add_done_callback(done)
        return answer


@hookimpl
def tandem_draft_proposers(api_version: int):
    return [NGramProposer, DraftModelProposer, RemoteProposer]
