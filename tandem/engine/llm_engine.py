"""LLMEngine: the one place that wires scheduler, block manager and model runner (nano-vllm's
shape). `add_request`, then `step()` until nothing is left; each step schedules, runs one batched
forward, samples, and reports what every sample gained. The prefill and decode workers and
`tandem.LLM` all drive this same engine.
"""
from __future__ import annotations

import itertools
import json
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
from tandem.outputs import (CompletionOutput, KVHandoff, OutputBuilder, RequestMetrics, RequestOutput, StreamDelta,
                            TokenLogprob)
from tandem.sampling import RandomStream, SamplerPipeline, SamplingBatch, token_logprobs
from tandem.draft import DraftProposer
from tandem.sampling_params import SamplingParams
from tandem.speculative import (SpeculationState, SpeculativeConfig, SpeculativePolicy, verify_greedy,
                                verify_sampled)
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
    randomness: list[RandomStream] = field(default_factory=list)  # one per sample
    error: str | None = None
    spec: SpeculationState | None = None  # speculative decoding, when on for this request
    prefill_only: bool = False  # done once every sample has its first token (the prefill role)
    resumed: bool = False  # started from first tokens sampled elsewhere (the decode role)
    handoff: KVHandoff | None = None

    def generator(self, index: int, ahead: int = 0) -> torch.Generator:
        """Sample `index`'s generator for the draw of its next token (`ahead` tokens further)."""
        return self.randomness[index].at(len(self.builders[index].token_ids) + ahead)

    @property
    def finished(self) -> bool:
        return len(self.builders) == self.params.n and all(
            b.finished or (self.prefill_only and b.token_ids) for b in self.builders)


class LLMEngine:
    """The plugins it runs with come resolved (tandem.plugins.PluginManager does that): `sampler`
    (the logits-processor pipeline), the attention `variant` and `backend`, and the `kv_format`.
    speculative: the default speculative-decoding setting of its requests (SamplingParams can
    override it); speculative_methods: the proposers a request may pick (None: the default's and
    n-gram; see SpeculativePolicy); proposer_factory(SpeculativeConfig) -> DraftProposer makes the
    proposers."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_model_len: int,
                 config: EngineConfig | None = None, *, sampler: SamplerPipeline,
                 variant: AttentionVariant = DEFAULT_VARIANT, backend: AttentionBackend = DEFAULT_BACKEND,
                 kv_format: KVCacheFormat = DEFAULT_KV_FORMAT, speculative: SpeculativeConfig | None = None,
                 proposer_factory=None, speculative_methods=None):
        self.config = config or EngineConfig()
        self.tokenizer, self.model_config, self.sampler = tokenizer, model.config, sampler
        self.variant, self.retention = variant, variant.retention()
        c, block_size = self.model_config, self.config.block_size
        per_token = kv_format.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, next(model.parameters()).dtype)
        blocks = num_kv_blocks(self.config, per_token, max_model_len, next(model.parameters()).device)
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
        self.speculative, self.proposer_factory = speculative, proposer_factory
        self.spec_policy = SpeculativePolicy.of(speculative, speculative_methods)
        self._proposers: dict[tuple[str, str], DraftProposer] = {}
        self.num_spec_proposed = self.num_spec_accepted = 0

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    prefill_only: bool = False, generated: list[list[int]] | None = None) -> None:
        """Queue a request. Raises InvalidRequestError for a bad prompt, QueueFullError when full.

        The two halves of disaggregated serving run the same engine with one of these:
        prefill_only: the request ends once each sample has its first token; its output carries a
        KVHandoff with the prompt's full blocks (hashes, and the KV of those computed here).
        generated: continue a request whose samples' tokens so far (one list per sample, n in all)
        were sampled elsewhere: the first token of each (the prefill worker's), or everything a
        worker streamed before it died (the gateway migrates the request). They count as output,
        not prompt: penalties, max_tokens, stop rules and the seeded draws carry on as if this
        engine had sampled them; their text was streamed already. A sample they finish stays
        finished. import_blocks first lets the prompt hit the prefix cache."""
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
        if generated is not None:
            if prefill_only:
                raise InvalidRequestError("a prefill_only request has nothing generated to resume from")
            if len(generated) != params.n:
                raise InvalidRequestError(f"generated needs one token list per sample ({params.n}), "
                                          f"got {len(generated)}")
            for tokens in generated:
                self.tokenizer.check_ids(tokens)
        sampling_args = self.sampler.prepare(params)
        spec = self.spec_policy.for_request(params.speculative)
        if spec is not None and not prefill_only:  # a method not enabled fails here, before any work
            spec_state = SpeculationState(spec, self._proposer(spec))
        else:
            spec_state = None
        request = _Request(request_id, list(prompt_ids), params, RequestMetrics(time.monotonic(), len(prompt_ids)),
                           sampling_args, prefill_only=prefill_only, resumed=generated is not None,
                           spec=spec_state)
        if generated is None:
            request.seqs.append(Sequence(request_id, list(prompt_ids), len(prompt_ids), params))
        else:
            self._resume(request, generated)
        self.requests[request_id] = request
        for seq in request.seqs:
            if not request.builders or not request.builders[seq.index].finished:
                self.scheduler.add(seq)

    def _resume(self, request: _Request, generated: list[list[int]]) -> None:
        """Each sample continues after its generated tokens, replayed through its OutputBuilder
        (which then stops, counts and holds back stop-string text exactly as it did where they
        were sampled; the text they add was streamed there). The tokens' KV is recomputed, or
        found in the prefix cache."""
        self._start_outputs(request)
        for index, tokens in enumerate(generated):
            for token in tokens:
                request.builders[index].append(token)
            request.seqs.append(Sequence(request.request_id, [*request.prompt_ids, *tokens],
                                         len(request.prompt_ids), request.params, index))
        if request.finished:
            raise InvalidRequestError("every sample has finished already: nothing to continue")

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
        drafts, early = self._propose()
        plan = self.scheduler.schedule()
        scheduled = {seq for seq, _ in plan.scheduled}
        for seq in [s for s in drafts if s not in scheduled]:  # preempted or left out this step
            del seq.token_ids[len(seq.token_ids) - len(drafts.pop(seq)):]
        if not plan.scheduled:
            if self.requests:  # cannot happen while every sequence fits the pool alone; never spin
                raise RuntimeError(f"the engine cannot schedule any of {len(self.requests)} requests: "
                                   f"{self.block_manager.num_free_blocks} of {self.block_manager.num_blocks} "
                                   "KV blocks free")
            return [], early
        # Logits rows: one for a sequence whose last token is computed now, one per computed
        # position for a sequence verifying guesses (the last real token and each guess).
        to_sample, counts = [], []
        for i, (seq, num) in enumerate(plan.scheduled):
            if seq in drafts or num == seq.num_uncomputed_tokens:
                to_sample.append(i)
                counts.append(num if seq in drafts else 1)
        rows = {"num_rows": counts} if drafts else {}  # plain steps make the plain call
        logits = self.runner.execute(plan.scheduled, plan.copies, to_sample, **rows)
        first_row = dict(zip(to_sample, itertools.accumulate([0, *counts])))
        plain, verify = [], []
        for i, (seq, num) in enumerate(plan.scheduled):
            if seq in drafts:
                verify.append((seq, num, first_row[i]))
                continue
            seq.num_computed_tokens += num
            self._commit(seq)
            if i in first_row:
                plain.append((seq, first_row[i]))
        now = time.monotonic()
        deltas, outputs, touched = self._sample(logits, plain, now)
        spec_deltas, spec_outputs, spec_touched = self._verify(logits, verify, drafts, now)
        return deltas + spec_deltas, early + outputs + spec_outputs + self._collect_finished(touched + spec_touched, now)

    def _commit(self, seq: Sequence) -> None:
        self.block_manager.commit(seq)
        if self.retention is not None:
            self.block_manager.release_dead_blocks(seq, self.retention.num_sink, self.retention.window)

    def _sample(self, logits: torch.Tensor, plain: list[tuple[Sequence, int]], now: float):
        """The ordinary draw: one token per sequence (and the forks of a request's first sample)."""
        if not plain:
            return [], [], []
        seqs, rows = self._expand_forks([seq for seq, _ in plain])
        rows = [plain[r][1] for r in rows]
        requests = [self.requests[s.request_id] for s in seqs]
        batch = SamplingBatch([s.params for s in seqs], [s.token_ids for s in seqs],
                              [s.num_prompt_tokens for s in seqs], [r.generator(s.index) for s, r in zip(seqs, requests)])
        result = self.sampler.sample(logits[rows], batch, [r.sampling_args for r in requests])
        failed = {requests[row].request_id: error for row, error in result.failures.items()}
        logprobs = self._logprobs(logits, rows, result.tokens, [s.params for s in seqs])
        deltas = [self._append(r, s, [t], now, logprobs=lp)
                  for s, r, t, lp in zip(seqs, requests, result.tokens, logprobs) if r.request_id not in failed]
        outputs = [self._fail(self.requests[request_id], error, now) for request_id, error in failed.items()]
        return deltas, outputs, requests

    @staticmethod
    def _logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int],
                  params: list[SamplingParams]) -> list[list[TokenLogprob] | None]:
        """Per row, [the logprob of its token], for the rows whose request asked; None for the others."""
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[list[TokenLogprob] | None] = [None] * len(rows)
        if wanted:
            found = token_logprobs(logits[[rows[i] for i in wanted]], [tokens[i] for i in wanted],
                                   [params[i].logprobs for i in wanted])
            for i, lp in zip(wanted, found):
                out[i] = [lp]
        return out

    # -- speculative decoding -------------------------------------------------------------------
    def _proposer(self, config: SpeculativeConfig) -> DraftProposer:
        key = (config.method, json.dumps(config.options, sort_keys=True, default=str))
        if key not in self._proposers:
            if self.proposer_factory is None:
                raise ConfigError("this engine has no draft proposers (speculative decoding is not set up)")
            self._proposers[key] = self.proposer_factory(config)
        return self._proposers[key]

    def _propose(self) -> tuple[dict[Sequence, list[int]], list[RequestOutput]]:
        """Ask the proposers for guesses for every running sequence that is decoding with
        speculation on, and append them to its tokens. A guess that would need KV blocks other
        sequences may need is not made: speculation never preempts anyone."""
        drafts: dict[Sequence, list[int]] = {}
        failed: list[RequestOutput] = []
        spare = self.block_manager.num_free_blocks - len(self.scheduler.waiting)
        for seq in list(self.scheduler.running):
            request = self.requests.get(seq.request_id)
            if request is None or request.spec is None or seq.num_uncomputed_tokens != 1 or not request.builders:
                continue
            builder = request.builders[seq.index]
            room = min(request.params.max_tokens - len(builder.token_ids), self.max_model_len - seq.num_tokens) - 1
            k = min(request.spec.wants(), room)
            if k <= 0:
                continue
            try:
                guesses = [int(t) for t in request.spec.proposer.propose(seq.token_ids, k)][:k]
            except Exception as exc:
                failed.append(self._fail(request, PluginError(
                    f"draft proposer {request.spec.config.method!r} failed: {type(exc).__name__}: {exc}"),
                    time.monotonic()))
                continue
            if not guesses or not all(0 <= t < self.model_config.vocab_size for t in guesses):
                continue
            need = self.block_manager.blocks_for(seq.num_tokens + len(guesses)) - len(seq.block_table)
            if need > spare:
                continue
            spare -= max(0, need)
            seq.token_ids.extend(guesses)
            drafts[seq] = guesses
        return drafts, failed

    def _verify(self, logits: torch.Tensor, verify: list[tuple[Sequence, int, int]],
                drafts: dict[Sequence, list[int]], now: float):
        """Keep each sequence's longest accepted run of guesses and one token of the target's."""
        verify = [v for v in verify if v[0].request_id in self.requests]  # a sibling's failure ended it
        if not verify:
            return [], [], []
        params, contexts, prompt_lens, generators, args, rows = [], [], [], [], [], []
        for seq, num, first in verify:
            request = self.requests[seq.request_id]
            base = seq.num_computed_tokens  # the last real token's position
            for r in range(num):  # row r: the distribution after the real tokens and r guesses
                params.append(seq.params)
                contexts.append(seq.token_ids[:base + 1 + r])
                prompt_lens.append(seq.num_prompt_tokens)
                generators.append(request.generator(seq.index, r))
                args.append(request.sampling_args)
                rows.append(first + r)
        processed, failures = self.sampler.process(logits[rows], SamplingBatch(params, contexts, prompt_lens,
                                                                               generators), args)
        failures.update(self.sampler.invalid_rows(processed, failures))
        deltas, outputs, touched, row = [], [], [], 0
        for seq, num, _ in verify:
            request = self.requests.get(seq.request_id)
            if request is None:  # failed by a sibling sample's error just above: its blocks are freed
                row += num
                continue
            guesses = drafts[seq]
            base = seq.num_computed_tokens
            del seq.token_ids[base + 1:]  # back to the real tokens; accepted guesses return below
            seq.num_computed_tokens = base + 1
            mine = range(row, row + num)
            row += num
            error = next((failures[r] for r in mine if r in failures), None)
            if error is not None:
                outputs.append(self._fail(request, error, now))
                continue
            checked = guesses[:num - 1]  # guesses past the token budget were not computed
            if seq.params.greedy:
                accepted, token = verify_greedy(processed[row - num:row].argmax(-1).tolist(), checked)
            else:
                try:
                    accepted, token = verify_sampled(processed[row - num:row].softmax(-1), checked, None,
                                                     request.generator(seq.index))
                except RuntimeError as exc:  # this request's draw, not the batch's
                    outputs.append(self._fail(request, PluginError(f"sampling failed for this request: {exc}"), now))
                    continue
            request.spec.record(len(checked), accepted)
            self.num_spec_proposed += len(checked)
            self.num_spec_accepted += accepted
            kept = [*checked[:accepted], token]  # kept[j] was drawn from logits row `first + j`
            logprobs = None
            if seq.params.logprobs is not None:
                first = rows[row - num]
                logprobs = token_logprobs(logits[first:first + len(kept)], kept, [seq.params.logprobs] * len(kept))
            deltas.append(self._append(request, seq, kept, now, computed=accepted, logprobs=logprobs))
            touched.append(request)
        return deltas, outputs, touched
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
            request.randomness.append(RandomStream(None if p.seed is None else p.seed + index))

    def _append(self, request: _Request, seq: Sequence, tokens: list[int], now: float,
                computed: int | None = None, logprobs: list[TokenLogprob] | None = None) -> StreamDelta:
        """Add sampled tokens to a sample until it finishes; one delta for all of them. After a
        verification, `computed` says how many of them already have their KV (accepted guesses):
        the blocks the rejected guesses took are given back and the full ones committed.
        logprobs: one per token, when the request asked for them."""
        builder = request.builders[seq.index]
        text, added = "", []
        for j, token in enumerate(tokens):
            seq.token_ids.append(token)
            if computed is not None and j < computed:
                seq.num_computed_tokens += 1
            text += builder.append(token, logprobs[j] if logprobs else None)
            added.append(token)
            if seq.index == 0:
                request.metrics.first_token_time = request.metrics.first_token_time or now
                request.metrics.token_times.append(now)
            if builder.finished:
                break
        if computed is not None:
            self.block_manager.trim(seq)
            self._commit(seq)
        if request.prefill_only and seq.index == 0:
            request.handoff = self._export_prompt(request, seq)
        if builder.finished or request.prefill_only:
            self.scheduler.remove(seq)
        return StreamDelta(request.request_id, seq.index, added, text, builder.finish_reason,
                           logprobs[:len(added)] if logprobs else None)

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
        if request.spec is not None:
            m, sp = request.metrics, request.spec
            m.spec_proposed, m.spec_accepted, m.spec_rounds = sp.proposed, sp.accepted, sp.rounds
        outputs = [CompletionOutput(i, list(b.token_ids), b.text, b.finish_reason,
                                    None if b.logprobs is None else list(b.logprobs))
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
            "spec_proposed_tokens": self.num_spec_proposed,
            "spec_accepted_tokens": self.num_spec_accepted,
            "spec_acceptance_rate": self.num_spec_accepted / self.num_spec_proposed if self.num_spec_proposed else 0.0,
            "finished_requests": self.num_finished_requests,
        }
