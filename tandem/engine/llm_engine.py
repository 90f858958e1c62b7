"""LLMEngine: the one place that wires scheduler, block manager and model runner (nano-vllm's
shape). `add_request`, then `step()` until nothing is left; each step schedules, runs one batched
forward and processes what it sampled. The prefill and decode workers and `tandem.LLM` all drive
this same engine. Around that loop, each concern has its own module: output processing
(tandem/outputs.py: text, stops, n-sample forks, logprobs), speculative decoding
(engine/spec_decode.py: propose, verify, roll back) and KV transfer to an external store
(engine/kv_connector.py, when a connector is attached).
"""
from __future__ import annotations

import contextlib
import itertools
import time

import torch

from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig, num_kv_blocks
from tandem.engine.kv_connector import Blocks, KVConnector, KVTransfer
from tandem.engine.model_runner import ModelRunner
from tandem.engine.scheduler import Scheduler, SchedulerOutput
from tandem.engine.sequence import Request, Sequence
from tandem.engine.spec_decode import SpecDecoder
from tandem.errors import ConfigError, InvalidRequestError, ParallelGroupError, QueueFullError
from tandem.model.attention import DEFAULT_BACKEND, DEFAULT_VARIANT, AttentionBackend, AttentionVariant
from tandem.model.kv_pool import DEFAULT_KV_FORMAT, KVCacheFormat
from tandem.model.moe import router_stats
from tandem.outputs import OutputProcessor, RequestMetrics, RequestOutput, ScoreOutput, StreamDelta, TokenLogprob
from tandem.sampling import SamplerPipeline, SamplingBatch
from tandem.sampling_params import SamplingParams
from tandem.speculative import SpeculativeConfig
from tandem.tokenizer import Tokenizer


@contextlib.contextmanager
def torch_on_one_thread():
    """Run torch's own ops on the calling thread alone (an engine step whose matmuls and attention
    run on tandem's CPU kernels and their own thread pool). Otherwise an op above torch's grain
    (the sampler's pass over the vocabulary) leaves torch's OpenMP workers spinning for
    milliseconds on the cores the kernels need next: a batch-1 step took 13 ms instead of 5.4."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class LLMEngine:
    """The plugins it runs with come resolved (tandem.plugins.PluginManager does that): `sampler`
    (the logits-processor pipeline), the attention `variant` and `backend`, and the `kv_format`.
    speculative: the default speculative-decoding setting of its requests (SamplingParams can
    override it); speculative_methods: the proposers a request may pick (None: the default's and
    n-gram; see SpeculativePolicy); proposer_factory(SpeculativeConfig) -> DraftProposer makes the
    proposers. connector: a KVConnector to an external KV store (attach_connector sets it later)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_model_len: int,
                 config: EngineConfig | None = None, *, sampler: SamplerPipeline,
                 variant: AttentionVariant = DEFAULT_VARIANT, backend: AttentionBackend = DEFAULT_BACKEND,
                 kv_format: KVCacheFormat = DEFAULT_KV_FORMAT, speculative: SpeculativeConfig | None = None,
                 proposer_factory=None, speculative_methods=None, connector: KVConnector | None = None,
                 serial_torch: bool = False, runner_factory=None, kv_bytes_per_token: int | None = None,
                 lora=None):
        """serial_torch: torch's own ops run on the stepping thread alone during a step (the model's
        matmuls and attention run on tandem's CPU kernels, whose own threads need the cores).
        runner_factory(num_blocks) -> the runner, for a model split over ranks
        (tandem.engine.distributed.DistributedRunner); kv_bytes_per_token is then a rank's.
        lora: a tandem.model.lora.LoRARegistry, when requests may name LoRA adapters."""
        self.config = config or EngineConfig()
        self.tokenizer, self.model_config, self.sampler = tokenizer, model.config, sampler
        self.variant, self.retention = variant, variant.retention()
        c, block_size = self.model_config, self.config.block_size
        self.eviction = variant.eviction(block_size)  # H2O-style: blocks dropped by received attention
        per_token = kv_bytes_per_token or kv_format.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim,
                                                                    next(model.parameters()).dtype)
        blocks = num_kv_blocks(self.config, per_token, max_model_len, next(model.parameters()).device)
        # A windowed variant frees blocks as it goes, so a shared prefix does not stay whole.
        caching = self.config.enable_prefix_caching and self.retention is None
        ev = self.eviction
        self.block_manager = BlockManager(blocks, block_size, caching,
                                          None if ev is None else (ev.first_eviction - 1) // block_size)
        self.scheduler = Scheduler(self.config, self.block_manager, None if ev is None else ev.step_end,
                                   self._lora_slot if lora is not None else None)
        self.runner = runner_factory(blocks) if runner_factory is not None \
            else ModelRunner(model, c, blocks, block_size, kv_format, variant, backend)
        if ev is not None:
            self._check_eviction(variant, blocks, speculative)
        self.serial_torch = serial_torch
        self.max_model_len = max_model_len
        if self.retention is None and ev is None:  # a sequence alone in the pool can always finish: cap at its capacity
            self.max_model_len = min(max_model_len, blocks * block_size)
        elif self.retention is not None:  # it needs its sinks, its window and one chunk in flight at most
            r = self.retention
            working_set = (-(-r.num_sink // block_size) + -(-(r.window + self.config.max_num_batched_tokens)
                                                             // block_size) + 1)
            if blocks < working_set:
                raise ConfigError(f"attention {variant.describe()} needs {working_set} KV blocks per sequence; "
                                  f"the pool has {blocks}: raise num_kv_blocks or kv_cache_memory")
        if self.max_model_len < 2:
            raise ConfigError(f"a KV pool of {blocks} x {block_size} tokens cannot hold a one-token "
                              "prompt and its answer; raise num_kv_blocks or kv_cache_memory")
        self.requests: dict[str, Request] = {}  # admitted and not finished (loading ones included)
        self.num_finished_requests = 0
        self.outputs = OutputProcessor(tokenizer, self.max_model_len)
        self.spec = SpecDecoder(speculative, speculative_methods, proposer_factory, c.vocab_size, self.max_model_len)
        self.kv: KVTransfer | None = None  # the connector's engine side
        self.attach_connector(connector)
        self.lora = lora

    def _check_eviction(self, variant: AttentionVariant, num_blocks: int, speculative) -> None:
        if not hasattr(self.runner, "take_attention_received"):
            raise ConfigError(f"attention {variant.describe()} evicts by attention, which a model split "
                              "over ranks does not report: run it on one rank")
        if speculative is not None:
            raise ConfigError(f"attention {variant.describe()} evicts by attention: speculative decoding's "
                              "rejected guesses would count in it; turn speculation off")
        if num_blocks < self.eviction.max_blocks + 1:
            raise ConfigError(f"attention {variant.describe()} needs {self.eviction.max_blocks + 1} KV blocks per "
                              f"sequence; the pool has {num_blocks}: raise num_kv_blocks or kv_cache_memory")

    def attach_connector(self, connector: KVConnector | None) -> None:
        """Share KV blocks with an external store from now on (None: stop). Call it before adding requests."""
        self.kv = None if connector is None else KVTransfer(self, connector)

    @property
    def connector(self) -> KVConnector | None:
        return None if self.kv is None else self.kv.connector

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                    prefill_only: bool = False, generated: list[list[int]] | None = None,
                    lora: str | None = None) -> None:
        """Queue a request. Raises InvalidRequestError for a bad prompt, QueueFullError when full.

        The two halves of disaggregated serving run the same engine with one of these:
        prefill_only: the request ends once each sample has its first token; with a connector,
        the prompt's full blocks are saved to its store (pinned for the hand-off) before the
        request reports its output.
        generated: continue a request whose samples' tokens so far (one list per sample, n in all)
        were sampled elsewhere: the first token of each (the prefill worker's), or everything a
        worker streamed before it died (the gateway migrates the request). They count as output,
        not prompt: penalties, max_tokens, stop rules and the seeded draws carry on as if this
        engine had sampled them; their text was streamed already. A sample they finish stays
        finished. With a connector, the prompt blocks the store holds are fetched first.
        lora: the name of a LoRA adapter of the engine's registry to run the request with (its KV
        is never shared with another adapter's or the base's)."""
        if request_id in self.requests or (self.kv is not None and request_id in self.kv.saving):
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
        if len(self.scheduler.waiting) + (len(self.kv.loading) if self.kv else 0) >= self.config.max_waiting:
            raise QueueFullError(f"the queue is full ({self.config.max_waiting} waiting requests)")
        if generated is not None:
            if prefill_only:
                raise InvalidRequestError("a prefill_only request has nothing generated to resume from")
            if len(generated) != params.n:
                raise InvalidRequestError(f"generated needs one token list per sample ({params.n}), "
                                          f"got {len(generated)}")
            for tokens in generated:
                self.tokenizer.check_ids(tokens)
        request = Request(request_id, list(prompt_ids), params, RequestMetrics(time.monotonic(), len(prompt_ids)),
                          self.sampler.prepare(params), prefill_only=prefill_only, resumed=generated is not None)
        if params.speculative != "default" or self.spec.policy.default is not None:  # else it cannot speculate
            request.spec = self.spec.state_for(request)
            if request.spec is not None and self.eviction is not None:
                raise InvalidRequestError(f"attention {self.variant.name!r} evicts by attention: no speculative decoding")
        if generated is None:
            request.seqs.append(Sequence(request_id, list(prompt_ids), len(prompt_ids), params))
        else:
            self._resume(request, generated)
        if lora is not None:
            if self.lora is None:
                raise InvalidRequestError("this engine has no LoRA adapters (start it with lora_modules or max_loras)")
            key = self.lora.hold(lora)  # last: nothing to undo if it refuses
            request.lora = lora
            for seq in request.seqs:  # a slot when the scheduler first admits one of them (_lora_slot)
                seq.lora = key
        self.requests[request_id] = request
        if request.spec is not None:
            self.spec.started(request)
        if self.kv is None or not self.kv.load(request):
            self._queue(request)

    def _resume(self, request: Request, generated: list[list[int]]) -> None:
        """Each sample continues after its generated tokens, replayed through its OutputBuilder
        (which then stops, counts and holds back stop-string text exactly as it did where they
        were sampled; the text they add was streamed there). The tokens' KV is recomputed, or
        found in the prefix cache."""
        self.outputs.start(request)
        for index, tokens in enumerate(generated):
            for token in tokens:
                request.builders[index].append(token)
            request.seqs.append(Sequence(request.request_id, [*request.prompt_ids, *tokens],
                                         len(request.prompt_ids), request.params, index))
        if request.finished:
            raise InvalidRequestError("every sample has finished already: nothing to continue")

    def _queue(self, request: Request) -> None:
        for seq in request.seqs:
            if not request.builders or not request.builders[seq.index].finished:
                self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks now. Unknown or finished ids are a no-op."""
        saving = self.kv.forget(request_id) if self.kv is not None else None
        request = self.requests.pop(request_id, None) or saving
        if request is None:
            return
        self._release_lora(request)
        if request.spec is not None:
            self.spec.finished(request)
        for seq in request.seqs:
            self.scheduler.remove(seq)
        for builder in request.builders:
            if not builder.finished:
                builder.finish_reason = "abort"

    def _release_lora(self, request: Request) -> None:
        if request.lora is not None:
            if request.lora_slot >= 0:
                self.lora.release(request.lora)
            self.lora.unhold(request.lora)
            request.lora, request.lora_slot = None, -1  # once

    def _lora_slot(self, seq: Sequence) -> bool:
        """The scheduler's question before it admits a waiting sequence: whether it may run now.
        A sequence with a LoRA adapter needs the adapter in one of the model's slots; its request
        takes one (least recently used out) the first time, and holds it until it ends. While
        every slot is held by running requests it waits, and those behind it may go first."""
        if seq.lora is None or seq.lora_slot >= 0:
            return True
        request = self.requests[seq.request_id]
        if request.lora_slot < 0:
            slot = self.lora.try_acquire(request.lora)
            if slot is None:
                return False
            request.lora_slot = slot
        for s in request.seqs:
            s.lora_slot = request.lora_slot
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.kv and self.kv.saving)

    def unfinished_ids(self) -> list[str]:
        return [*self.requests, *(self.kv.saving if self.kv else ())]

    def ready(self) -> bool:
        """Whether step() has anything to do now: sequences to run, or transfers that finished.
        (Requests waiting only on the connector make it False: a driver may sleep until notified.)"""
        return self.scheduler.has_work() or (self.kv is not None and self.kv.connector.has_events)

    # -- stepping -------------------------------------------------------------------------------
    def step(self) -> tuple[list[StreamDelta], list[RequestOutput]]:
        """One iteration: schedule, run, process. Returns the deltas of every sample that advanced
        and the outputs of the requests that finished."""
        if not self.serial_torch:
            return self._step()
        with torch_on_one_thread():  # the kernels' own threads have the cores
            return self._step()

    def _step(self) -> tuple[list[StreamDelta], list[RequestOutput]]:
        done = self._receive_kv() if self.kv is not None else []
        if self.spec.num_active:
            failed = self.spec.propose(self.scheduler.running, self.requests, self.block_manager,
                                       len(self.scheduler.waiting))
            done += [self._fail(request, error) for request, error in failed]
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            if self.scheduler.has_work():  # cannot happen while every sequence fits the pool alone; never spin
                raise RuntimeError(f"the engine cannot schedule any of {len(self.requests)} requests: "
                                   f"{self.block_manager.num_free_blocks} of {self.block_manager.num_blocks} "
                                   "KV blocks free")
            if self.kv is not None and self.kv.pending and self.kv.connector.notify is None:
                self.kv.connector.wait(0.05)  # only transfers left, and no driver to wake: wait for one here
            return [], done
        rows, counts, verifying = self._sample_rows(plan)
        try:
            logits = self.runner.execute(plan.scheduled, plan.copies, rows,
                                         **({"num_rows": counts} if verifying else {}))  # plain steps: the plain call
        except ParallelGroupError:  # the KV of other ranks is gone: no cached block can be trusted
            self.block_manager.forget_all()
            raise
        if self.eviction is not None:
            self._observe(plan.scheduled)
        deltas, finished = self._process(plan, logits, dict(zip(rows, itertools.accumulate([0, *counts]))))
        return deltas, done + finished

    def _sample_rows(self, plan: SchedulerOutput) -> tuple[list[int], list[int], bool]:
        """Which scheduled sequences get logits, and how many rows each: one for a sequence whose
        last token is computed now, one per computed position for a sequence verifying guesses
        (its last real token and each guess), and whether any verifies. Guesses not scheduled are
        dropped."""
        if self.spec.num_active:
            scheduled = {seq for seq, _ in plan.scheduled}
            for seq in self.scheduler.running:
                if seq.spec_token_ids and seq not in scheduled:
                    seq.spec_token_ids = []
        rows, counts = [], []
        for i, (seq, num) in enumerate(plan.scheduled):
            if seq.spec_token_ids or num == seq.num_uncomputed_tokens:
                rows.append(i)
                counts.append(num if seq.spec_token_ids else 1)
        return rows, counts, any(seq.spec_token_ids for seq, _ in plan.scheduled)

    def _process(self, plan: SchedulerOutput, logits: torch.Tensor, first_row: dict[int, int]):
        """Per scheduled sequence: count its computed tokens; draw the next token of those whose
        last token was computed; verify the guesses of those that had some."""
        now = time.monotonic()
        plain, verify = [], []
        for i, (seq, num) in enumerate(plan.scheduled):
            if seq.spec_token_ids:
                verify.append((seq, num, first_row[i]))
                continue
            seq.num_computed_tokens += num
            self._commit(seq)
            if i in first_row:
                plain.append((seq, first_row[i]))
        deltas, outputs, touched = self._sample(logits, plain, now)
        verify = [v for v in verify if v[0].request_id in self.requests]  # a sibling's failure ended it
        if verify:
            verified, failed = self.spec.verify(logits, verify, self.requests, self.sampler)
            outputs += [self._fail(request, error, now) for request, error in failed
                        if request.request_id in self.requests]
            for v in verified:
                if v.request.request_id in self.requests:
                    deltas.append(self._advance(v.request, v.seq, v.tokens, now, v.num_computed, v.logprobs))
                    touched.append(v.request)
        return deltas, outputs + self._collect_finished(touched, now)

    def _observe(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """Add what the step's queries gave each sequence's KV blocks (before its tokens count as computed)."""
        for (seq, _), rows in zip(scheduled, self.runner.take_attention_received()):
            seq.attention.add(seq.num_computed_tokens // self.config.block_size, rows)

    def _commit(self, seq: Sequence) -> None:
        self.block_manager.commit(seq)
        if self.retention is not None:
            self.block_manager.release_dead_blocks(seq, self.retention.num_sink, self.retention.window)
        if self.eviction is not None:
            bm = self.block_manager
            bm.evict(seq, self.eviction.select(seq.attention.per_block, bm.live_blocks(seq), seq.num_computed_tokens))

    def _sample(self, logits: torch.Tensor, plain: list[tuple[Sequence, int]], now: float):
        """The ordinary draw: one token per sequence (and the forks of a request's first sample)."""
        if not plain:
            return [], [], []
        seqs, rows = self.outputs.expand_forks([seq for seq, _ in plain], self.requests, self._fork)
        rows = [plain[r][1] for r in rows]
        requests = [self.requests[s.request_id] for s in seqs]
        batch = SamplingBatch([s.params for s in seqs], [s.token_ids for s in seqs],
                              [s.num_prompt_tokens for s in seqs], [r.generator(s.index) for s, r in zip(seqs, requests)])
        result = self.sampler.sample(logits[rows], batch, [r.sampling_args for r in requests])
        failed = {requests[row].request_id: error for row, error in result.failures.items()}
        logprobs = self.outputs.logprobs(logits, rows, result.tokens, [s.params for s in seqs])
        deltas = [self._advance(r, s, [t], now, logprobs=lp)
                  for s, r, t, lp in zip(seqs, requests, result.tokens, logprobs) if r.request_id not in failed]
        outputs = [self._fail(self.requests[request_id], error, now) for request_id, error in failed.items()]
        return deltas, outputs, requests

    def _fork(self, seq: Sequence, index: int) -> Sequence:
        """Sample `index` of seq's request, sharing seq's blocks, running from now on."""
        child = seq.fork(index)
        self.block_manager.fork(seq, child)
        self.scheduler.add_running(child)
        return child

    def _advance(self, request: Request, seq: Sequence, tokens: list[int], now: float,
                 computed: int | None = None, logprobs: list[TokenLogprob] | None = None) -> StreamDelta:
        """Append a sample's new tokens (until it finishes). After a verification, `computed` says
        how many of them already have their KV (accepted guesses): the blocks the rejected guesses
        took are given back and the full ones committed."""
        delta = self.outputs.append(request, seq.index, tokens, now, logprobs)
        seq.token_ids.extend(delta.token_ids)
        if computed is not None:
            seq.num_computed_tokens += min(computed, len(delta.token_ids))
            self.block_manager.trim(seq)
            self._commit(seq)
        if delta.finish_reason is not None or request.prefill_only:
            self.scheduler.remove(seq)
        return delta

    def _fail(self, request: Request, error: Exception, now: float | None = None) -> RequestOutput:
        """A plugin raised for this request: stop it, free its blocks, report the error."""
        for builder in request.builders:
            builder.finish_reason = builder.finish_reason or "error"
        self.abort(request.request_id)
        request.error = str(error)
        request.metrics.finished_time = now or time.monotonic()
        return self.outputs.output(request)

    def _collect_finished(self, requests: list[Request], now: float) -> list[RequestOutput]:
        done = []
        for request in dict.fromkeys(requests):
            if request.finished and request.request_id in self.requests:
                del self.requests[request.request_id]
                self._release_lora(request)
                if request.spec is not None:
                    self.spec.finished(request)
                if request.prefill_only and self.kv is not None and self.kv.save(request):
                    continue  # its output comes once the store holds its blocks
                done.append(self._finish(request, now))
        return done

    def _finish(self, request: Request, now: float) -> RequestOutput:
        request.metrics.finished_time = now
        self.num_finished_requests += 1
        return self.outputs.output(request)

    # -- teacher-forced scoring -----------------------------------------------------------------
    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> ScoreOutput:
        """Teacher-forced log-probabilities of token_ids[1:] (and the argmax at each position)
        computed the way this engine serves: the text runs as a prompt through the paged cache,
        in the scheduler's chunks, the variant's retention and eviction applied between them, so
        each token is scored over the KV the variant left (tandem.LLM.score keeps every key). No
        prefix cache either way. Call it while the engine has no requests."""
        if self.has_unfinished():
            raise InvalidRequestError("score() runs alone: the engine has requests in flight")
        ids = list(token_ids)
        self.tokenizer.check_ids(ids)
        if not 2 <= len(ids) <= self.max_model_len:
            raise InvalidRequestError(f"score needs 2 to {self.max_model_len} tokens, got {len(ids)}")
        seq, caching = Sequence("score", ids, len(ids), SamplingParams()), self.block_manager.enable_prefix_caching
        self.block_manager.enable_prefix_caching = False  # every position computed, nothing published
        self.scheduler.add(seq)
        logprobs, argmax = [], []
        try:
            while seq.num_computed_tokens < len(ids):
                plan = self.scheduler.schedule()
                start, num = seq.num_computed_tokens, plan.scheduled[0][1]
                logits = self.runner.execute(plan.scheduled, plan.copies, [0], num_rows=[num])  # (num, vocab)
                if self.eviction is not None:
                    self._observe(plan.scheduled)
                seq.num_computed_tokens += num
                self._commit(seq)
                targets = torch.tensor(ids[start + 1:start + 1 + num])
                logits = logits[:len(targets)]
                logprobs += logits.log_softmax(-1).gather(-1, targets.unsqueeze(1)).squeeze(1).tolist()
                argmax += logits.argmax(-1).tolist()
        finally:
            self.scheduler.remove(seq)
            self.block_manager.enable_prefix_caching = caching
        return ScoreOutput(logprobs, argmax)

    # -- KV blocks from and to an external store (the connector) ----------------------------------
    def _receive_kv(self) -> list[RequestOutput]:
        """Finished transfers: requests whose blocks are in join the queue; saved prompts' requests
        report their outputs."""
        loaded, saved = self.kv.receive()
        for request in loaded:
            self._queue(request)
        return [self._finish(request, time.monotonic()) for request in saved]

    def num_cached_tokens(self, prompt_ids: list[int], cache_salt: str | None = None, lora: str | None = None) -> int:
        """How many leading tokens of a prompt this engine's prefix cache holds (whole blocks), for
        the bare base or a LoRA adapter (by name; 0 for one this engine does not have)."""
        seq = Sequence("", list(prompt_ids), len(prompt_ids), SamplingParams(cache_salt=cache_salt))
        if lora is not None:
            if self.lora is None or lora not in self.lora.adapters:
                return 0
            seq.lora = self.lora.cache_key(lora)
        size = self.config.block_size
        return self.block_manager.num_cached_prefix(self.block_manager.chain(seq)) * size

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

    def export_cached(self, hashes: list[bytes]) -> Blocks:
        """The KV of those of `hashes` the prefix cache holds."""
        found = [(h, self.block_manager.cached[h]) for h in hashes if h in self.block_manager.cached]
        blocks = self.runner.export_blocks([b for _, b in found]) if found else []
        return [(h, tensors) for (h, _), tensors in zip(found, blocks)]

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
            **self.spec.stats(),
            "finished_requests": self.num_finished_requests,
            **(self.kv.stats() if self.kv is not None else {}),
            **router_stats(self.runner.model),
            **({} if self.lora is None else {
                **self.lora.stats(), "lora_requests_waiting_for_slot": len({
                    s.request_id for s in self.scheduler.waiting if s.lora is not None and s.lora_slot < 0})}),
        }
