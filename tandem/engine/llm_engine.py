"""LLMEngine: the one place that wires scheduler, block manager and model runner (nano-vllm's
shape). `add_request`, then `step()` until nothing is left; each step schedules, runs one batched
forward, samples, and reports what every sample gained. The prefill and decode workers and
`tandem.LLM` all drive this same engine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tandem.engine.block_manager import NULL_BLOCK, BlockManager
from tandem.engine.config import EngineConfig, num_kv_blocks
from tandem.engine.model_runner import ModelRunner
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence
from tandem.errors import ConfigError, InvalidRequestError, PluginError, QueueFullError
from tandem.model.attention import DEFAULT_BACKEND, DEFAULT_VARIANT, AttentionBackend, AttentionVariant
from tandem.model.kv_pool import DEFAULT_KV_FORMAT, KVCacheFormat
from tandem.outputs import CompletionOutput, KVHandoff, OutputBuilder, RequestMetrics, RequestOutput, StreamDelta
from tandem.sampling import SamplerPipeline, SamplingBatch, make_generator
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import Tokenizer


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    sampling_args: tuple  # each logits processor's argument for this request (SamplerPipeline.prepare)
    seqs: list[Sequence] = field(default_factory=list)
    builders: list[OutputBuilder] = field(default_factory=list)
    generators: list[torch.Generator] = field(default_factory=list)
    error: str | None = None
    prefill_only: bool = False  # done once every sample has its first token (the prefill role)
    resumed: bool = False  # started from first tokens sampled elsewhere (the decode role)
    handoff: KVHandoff | None = None

    @property
    def finished(self) -> bool:
        return len(self.builders) == self.params.n and all(
            b.finished or (self.prefill_only and b.token_ids) for b in self.builders)


class LLMEngine:
    """The plugins it runs with come resolved (tandem.plugins.PluginManager does that): `sampler`
    (the logits-processor pipeline), the attention `variant` and `backend`, and the `kv_format`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_model_len: int,
                 config: EngineConfig | None = None, *, sampler: SamplerPipeline,
                 variant: AttentionVariant = DEFAULT_VARIANT, backend: AttentionBackend = DEFAULT_BACKEND,
                 kv_format: KVCacheFormat = DEFAULT_KV_FORMAT):
        self.config = config or EngineConfig()
        self.tokenizer, self.model_config, self.sampler = tokenizer, model.config, sampler
        self.variant, self.retention = variant, variant.retention()
        c, block_size = self.model_config, self.config.block_size
        per_token = kv_format.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, next(model.parameters()).dtype)
        blocks = num_kv_blocks(self.config, per_token, max_model_len)
        # A windowed variant frees blocks as it goes, so a shared prefix does not stay whole.
        caching = self.config.enable_prefix_caching and self.retention is None
        self.block_manager = BlockManager(blocks, block_size, caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.runner = ModelRunner(model, c, blocks, block_size, kv_format, variant, backend)
        self.max_model_len = max_model_len
        if self.retention is None:  # a sequence alone in the pool can always finish: cap at its capacity
            self.max_model_len = min(max_model_len, blocks * block_size)
        else:  # it needs its sinks, its window and one chunk in flight at most
            r = self.retention
            working_set = (-(-r.num_sink // block_size) + -(-(r.window + self.config.max_num_batched_tokens)
                                                             // block_size) + 1)
            if blocks < working_set:
                raise ConfigError(f"attention {variant.describe()} needs {working_set} KV blocks per sequence; "
                                  f"the pool has {blocks}: raise num_kv_blocks or kv_cache_memory")
        if self.max_model_len < 2:
            raise ConfigError(f"a KV pool of {blocks} x {block_size} tokens cannot hold a one-token "
                              "prompt and its answer; raise num_kv_blocks or kv_cache_memory")
        self.requests: dict[str, _Request] = {}
        self.num_finished_requests = 0

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    prefill_only: bool = False, first_token_ids: list[int] | None = None) -> None:
        """Queue a request. Raises InvalidRequestError for a bad prompt, QueueFullError when full.

        The two halves of disaggregated serving run the same engine with one of these:
        prefill_only: the request ends once each sample has its first token; its output carries a
        KVHandoff with the prompt's full blocks (hashes, and the KV of those computed here).
        first_token_ids: continue a request whose samples' first tokens (one per sample) were
        sampled elsewhere; import_blocks first lets its prompt hit the prefix cache."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        self.tokenizer.check_ids(prompt_ids)
        if len(prompt_ids) >= self.max_model_len:
            pool = self.block_manager.num_blocks * self.config.block_size
            limit = (f"the KV pool holds {pool} tokens (raise kv_cache_memory or num_kv_blocks)"
                     if pool == self.max_model_len else f"the context window is {self.max_model_len}")
            raise InvalidRequestError(f"the prompt has {len(prompt_ids)} tokens; {limit} "
                                      "and at least one token must be left to generate")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the queue is full ({self.config.max_waiting} waiting requests)")
        if first_token_ids is not None:
            if prefill_only or len(first_token_ids) != params.n:
                raise InvalidRequestError(f"first_token_ids needs one token per sample ({params.n}), "
                                          f"got {len(first_token_ids)}")
            self.tokenizer.check_ids(first_token_ids)
        sampling_args = self.sampler.prepare(params)
        request = _Request(request_id, list(prompt_ids), params, RequestMetrics(time.monotonic(), len(prompt_ids)),
                           sampling_args, prefill_only=prefill_only, resumed=first_token_ids is not None)
        if first_token_ids is None:
            request.seqs.append(Sequence(request_id, list(prompt_ids), len(prompt_ids), params))
        else:
            self._start_outputs(request)
            for index, token in enumerate(first_token_ids):
                request.builders[index].append(token)  # the text it adds was streamed by the prefill side
                request.seqs.append(Sequence(request_id, [*prompt_ids, token], len(prompt_ids), params, index))
            if request.finished:
                raise InvalidRequestError("every sample finished with its first token: nothing to continue")
        self.requests[request_id] = request
        for seq in request.seqs:
            if not request.builders or not request.builders[seq.index].finished:
                self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks now. Unknown or finished ids are a no-op."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            self.scheduler.remove(seq)
        for builder in request.builders:
            if not builder.finished:
                builder.finish_reason = "abort"

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> tuple[list[StreamDelta], list[RequestOutput]]:
        """One iteration. Returns the deltas of every sample that advanced and the outputs of the
        requests that finished."""
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            if self.requests:  # cannot happen while every sequence fits the pool alone; never spin
                raise RuntimeError(f"the engine cannot schedule any of {len(self.requests)} requests: "
                                   f"{self.block_manager.num_free_blocks} of {self.block_manager.num_blocks} "
                                   "KV blocks free")
            return [], []
        to_sample = [i for i, (seq, num) in enumerate(plan.scheduled) if num == seq.num_uncomputed_tokens]
        logits = self.runner.execute(plan.scheduled, plan.copies, to_sample)
        for seq, num in plan.scheduled:
            seq.num_computed_tokens += num
            self.block_manager.commit(seq)
            if self.retention is not None:
                self.block_manager.release_dead_blocks(seq, self.retention.num_sink, self.retention.window)
        now = time.monotonic()
        seqs, rows = self._expand_forks([plan.scheduled[i][0] for i in to_sample])
        requests = [self.requests[s.request_id] for s in seqs]
        batch = SamplingBatch([s.params for s in seqs], [s.token_ids for s in seqs],
                              [s.num_prompt_tokens for s in seqs], [r.generators[s.index] for s, r in zip(seqs, requests)])
        result = self.sampler.sample(logits[rows], batch, [r.sampling_args for r in requests])
        failed = {requests[row].request_id: error for row, error in result.failures.items()}
        deltas = [self._append(r, s, t, now) for s, r, t in zip(seqs, requests, result.tokens)
                  if r.request_id not in failed]
        outputs = [self._fail(self.requests[request_id], error, now) for request_id, error in failed.items()]
        return deltas, outputs + self._collect_finished(requests, now)

    def _fail(self, request: _Request, error: PluginError, now: float) -> RequestOutput:
        """A plugin raised for this request: stop it, free its blocks, report the error."""
        for seq in request.seqs:
            self.scheduler.remove(seq)
        for builder in request.builders:
            builder.finish_reason = builder.finish_reason or "error"
        request.error = str(error)
        request.metrics.finished_time = now
        del self.requests[request.request_id]
        return self.output_of(request)

    def _expand_forks(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[int]]:
        """A request's first sampling step: start its output and fork its n - 1 siblings, which
        share the prompt's blocks and sample from the same logits row."""
        out, rows = [], []
        for row, seq in enumerate(seqs):
            request = self.requests[seq.request_id]
            family = [seq]
            if not request.builders:
                self._start_outputs(request)
                for index in range(1, request.params.n):
                    child = seq.fork(index)
                    self.block_manager.fork(seq, child)
                    self.scheduler.add_running(child)
                    request.seqs.append(child)
                    family.append(child)
            out += family
            rows += [row] * len(family)
        return out, rows

    def _start_outputs(self, request: _Request) -> None:
        p = request.params
        if request.seqs:
            request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        for index in range(p.n):
            request.builders.append(OutputBuilder(self.tokenizer, p, len(request.prompt_ids), self.max_model_len))
            request.generators.append(make_generator(None if p.seed is None else p.seed + index))

    def _append(self, request: _Request, seq: Sequence, token: int, now: float) -> StreamDelta:
        seq.token_ids.append(token)
        builder = request.builders[seq.index]
        text = builder.append(token)
        if seq.index == 0:
            request.metrics.first_token_time = request.metrics.first_token_time or now
            request.metrics.token_times.append(now)
        if request.prefill_only and seq.index == 0:
            request.handoff = self._export_prompt(request, seq)
        if builder.finished or request.prefill_only:
            self.scheduler.remove(seq)
        return StreamDelta(request.request_id, seq.index, [token], text, builder.finish_reason)

    def _collect_finished(self, requests: list[_Request], now: float) -> list[RequestOutput]:
        done = []
        for request in dict.fromkeys(requests):
            if request.finished and request.request_id in self.requests:
                del self.requests[request.request_id]
                request.metrics.finished_time = now
                self.num_finished_requests += 1
                done.append(self.output_of(request))
        return done

    def _export_prompt(self, request: _Request, seq: Sequence) -> KVHandoff:
        """The prompt's full blocks: every hash, and the KV of those this engine computed (the
        others came from a cache and were published when they were computed)."""
        num_full = len(request.prompt_ids) // self.config.block_size
        first_new = seq.num_cached_tokens // self.config.block_size
        table = seq.block_table[:num_full]
        new = [i for i in range(first_new, num_full) if table[i] != NULL_BLOCK]
        tensors = self.runner.export_blocks([table[i] for i in new]) if new else []
        return KVHandoff(list(seq.block_hashes[:num_full]), [seq.block_hashes[i] for i in new], tensors)

    # -- KV blocks from elsewhere (the decode role) -----------------------------------------------
    def cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading blocks of a prompt's hash chain this engine's prefix cache holds."""
        return self.block_manager.num_cached_prefix(hashes)

    def import_blocks(self, hashes: list[bytes], blocks: list[list[torch.Tensor]]) -> int:
        """Put KV blocks computed elsewhere (runner.export_blocks' format) into the prefix cache
        under their content hashes, so the next request with that prefix skips computing them.
        Blocks already cached are skipped; returns how many were imported."""
        taken = self.block_manager.import_cached(hashes)
        try:
            self.runner.import_blocks([block for _, block in taken], [blocks[i] for i, _ in taken])
        except Exception:
            for _, block in taken:  # never leave a hash pointing at garbage
                self.block_manager.forget(block)
            raise
        return len(taken)

    def export_cached(self, hashes: list[bytes]) -> list[tuple[bytes, list[torch.Tensor]]]:
        """The KV of those of `hashes` the prefix cache holds (to publish them again)."""
        found = [(h, self.block_manager.cached[h]) for h in hashes if h in self.block_manager.cached]
        blocks = self.runner.export_blocks([b for _, b in found]) if found else []
        return [(h, tensors) for (h, _), tensors in zip(found, blocks)]

    def output_of(self, request: _Request) -> RequestOutput:
        if request.resumed:
            request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        outputs = [CompletionOutput(i, list(b.token_ids), b.text, b.finish_reason)
                   for i, b in enumerate(request.builders)]
        return RequestOutput(request.request_id, request.prompt_ids, outputs, request.finished or bool(request.error),
                             request.metrics, request.error, request.handoff)

    # -- observability --------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "prefix_cache_hit_tokens": bm.num_hit_tokens,
            "prefix_cache_hit_rate": bm.num_hit_tokens / bm.num_queried_tokens if bm.num_queried_tokens else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "finished_requests": self.num_finished_requests,
        }
