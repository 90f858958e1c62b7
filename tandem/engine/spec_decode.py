"""Speculative decoding inside the engine: propose, verify, roll back.

Before a step is scheduled, every running sequence that speculates gets its guesses in
`seq.spec_token_ids`, apart from its real tokens; the scheduler gives them KV slots and the
runner computes them after the last real token, so one forward returns a logits row per guess.
Verification (tandem.speculative's rules) then keeps the longest accepted run and one token of
the target's; the engine appends those as real tokens, and the KV slots of the rejected guesses
are simply given back (`BlockManager.trim`): they hold nothing anyone reads.

Guessing never stalls a step. A local proposer (n-gram, a draft model in this process) answers
at once. An asynchronous one (`DraftProposer.asynchronous`, e.g. the remote draft service) is
asked ahead: the question leaves with the sequence's tokens, as they will be if every guess in
flight is accepted, and its answer is used in a later step if it has arrived and still fits the
tokens by then (the tokens accepted meanwhile are dropped from its front); until then the sequence
decodes one token a step as without speculation.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from tandem.draft import DraftProposer
from tandem.engine.block_manager import BlockManager
from tandem.engine.sequence import Request, Sequence
from tandem.errors import ConfigError, PluginError
from tandem.sampling import SamplerPipeline, SamplingBatch
from tandem.speculative import SpeculationState, SpeculativeConfig, SpeculativePolicy, verify_greedy, verify_sampled

log = logging.getLogger(__name__)


@dataclass
class _Question:
    """A guess asked of an asynchronous proposer: the future, and the tokens it was asked for
    (the first num_real real tokens, then the guesses then in flight, assumed accepted)."""

    future: object  # concurrent.futures.Future-like: done(), result()
    num_real: int
    assumed: list[int] = field(default_factory=list)

    def usable(self, tokens: list[int], k: int) -> list[int]:
        """The answer's guesses that follow `tokens` now (at most k); [] if the answer no longer fits."""
        end = self.num_real + len(self.assumed)
        if tokens[self.num_real:end] != self.assumed:
            return []
        answer = [int(t) for t in self.future.result()]
        since = tokens[end:]  # tokens sampled after the question left: the answer must have guessed them
        if answer[:len(since)] != since:
            return []
        return answer[len(since):len(since) + k]


@dataclass
class Verified:
    """One sequence's verification: the tokens it keeps (accepted guesses, then the target's) and
    how many of them already have their KV (the accepted guesses)."""

    request: Request
    seq: Sequence
    tokens: list[int]
    num_computed: int
    logprobs: list | None


class SpecDecoder:
    """The speculative decoding of one engine. default: the setting requests get unless they choose;
    methods: the proposers a request may pick (SpeculativePolicy); proposer_factory(SpeculativeConfig)
    -> DraftProposer makes them, one per (method, options), shared by every request that uses it."""

    def __init__(self, default: SpeculativeConfig | None, methods, proposer_factory, vocab_size: int,
                 max_model_len: int):
        self.policy = SpeculativePolicy.of(default, methods)
        self.proposer_factory, self.vocab_size, self.max_model_len = proposer_factory, vocab_size, max_model_len
        self._proposers: dict[tuple[str, str], DraftProposer] = {}
        self._questions: dict[int, _Question] = {}  # by seq_id: asynchronous proposals in flight
        self.num_active = 0  # requests speculating now
        self.num_proposed = self.num_accepted = self.num_async_failures = 0

    # -- requests -------------------------------------------------------------------------------
    def state_for(self, request: Request) -> SpeculationState | None:
        """The request's speculation (None: off). A method not enabled fails here, before any work."""
        choice = request.params.speculative
        if request.prefill_only or (choice == "default" and self.policy.default is None):
            return None
        config = self.policy.for_request(choice)
        return None if config is None else SpeculationState(config, self._proposer(config))

    def started(self, request: Request) -> None:
        """A request with speculation on (request.spec) joined the engine."""
        self.num_active += 1

    def finished(self, request: Request) -> None:
        """A request with speculation on left the engine: forget its questions."""
        self.num_active -= 1
        for seq in request.seqs:
            self._questions.pop(seq.seq_id, None)

    def _proposer(self, config: SpeculativeConfig) -> DraftProposer:
        key = (config.method, json.dumps(config.options, sort_keys=True, default=str))
        if key not in self._proposers:
            if self.proposer_factory is None:
                raise ConfigError("this engine has no draft proposers (speculative decoding is not set up)")
            self._proposers[key] = self.proposer_factory(config)
        return self._proposers[key]

    # -- propose --------------------------------------------------------------------------------
    def propose(self, running: list[Sequence], requests: dict[str, Request], blocks: BlockManager,
                num_waiting: int) -> list[tuple[Request, PluginError]]:
        """Put guesses into the spec_token_ids of every running sequence that is decoding with
        speculation on. A guess that would need KV blocks other sequences may need is not made:
        speculation never preempts anyone. Returns the requests whose proposer raised."""
        failed = []
        spare = blocks.num_free_blocks - num_waiting
        for seq in running:
            request = requests.get(seq.request_id)
            if request is None or request.spec is None or seq.num_uncomputed_tokens != 1 or not request.builders:
                continue
            builder = request.builders[seq.index]
            room = min(request.params.max_tokens - len(builder.token_ids), self.max_model_len - seq.num_tokens) - 1
            k = min(request.spec.wants(), room)
            if k <= 0:
                continue
            proposer = request.spec.proposer
            try:
                if proposer.asynchronous:
                    guesses = self._answer(seq, proposer, k)
                else:
                    guesses = [int(t) for t in proposer.propose(seq.token_ids, k)][:k]
            except Exception as exc:
                failed.append((request, PluginError(f"draft proposer {request.spec.config.method!r} failed: "
                                                    f"{type(exc).__name__}: {exc}")))
                continue
            if not guesses or not all(0 <= t < self.vocab_size for t in guesses):
                continue
            need = blocks.blocks_for(seq.num_tokens + len(guesses)) - len(seq.block_table)
            if need > spare:
                continue
            spare -= max(0, need)
            seq.spec_token_ids = guesses
        return failed

    def _answer(self, seq: Sequence, proposer: DraftProposer, k: int) -> list[int]:
        """An asynchronous proposer's guesses for now, if its answer is in; the next question leaves
        at once (assuming these guesses will be accepted), so it is answered while steps run."""
        guesses = []
        question = self._questions.get(seq.seq_id)
        if question is not None and question.future.done():
            del self._questions[seq.seq_id]
            try:
                guesses = question.usable(seq.token_ids, k)
            except Exception as exc:  # the proposer's future failed: no guesses, never the request
                self.num_async_failures += 1
                log.debug("asynchronous draft proposal failed: %s", exc)
        if seq.seq_id not in self._questions:
            context = seq.token_ids + guesses
            self._questions[seq.seq_id] = _Question(proposer.propose_async(context, k + 1), seq.num_tokens,
                                                    list(guesses))
        return guesses

    # -- verify ---------------------------------------------------------------------------------
    def verify(self, logits: torch.Tensor, groups: list[tuple[Sequence, int, int]], requests: dict[str, Request],
               sampler: SamplerPipeline) -> tuple[list[Verified], list[tuple[Request, Exception]]]:
        """groups: (sequence, tokens computed for it this step = 1 + guesses checked, its first
        logits row). Keeps each sequence's longest accepted run of guesses and one token of the
        target's; the guesses are cleared from every sequence (the caller appends what is kept)."""
        params, contexts, prompt_lens, generators, args, rows = [], [], [], [], [], []
        for seq, num, first in groups:
            request = requests[seq.request_id]
            context = seq.token_ids + seq.spec_token_ids
            for r in range(num):  # row r: the distribution after the real tokens and r guesses
                params.append(seq.params)
                contexts.append(context[:seq.num_tokens + r])
                prompt_lens.append(seq.num_prompt_tokens)
                generators.append(request.generator(seq.index, r))
                args.append(request.sampling_args)
                rows.append(first + r)
        processed, failures = sampler.process(logits[rows], SamplingBatch(params, contexts, prompt_lens, generators),
                                              args)
        failures.update(sampler.invalid_rows(processed, failures))
        verified, failed, row = [], [], 0
        for seq, num, _ in groups:
            request = requests[seq.request_id]
            checked, seq.spec_token_ids = seq.spec_token_ids[:num - 1], []  # guesses past the budget were not computed
            seq.num_computed_tokens = seq.num_tokens  # the last real token's KV is in now
            mine = range(row, row + num)
            row += num
            error = next((failures[r] for r in mine if r in failures), None)
            if error is not None:
                failed.append((request, error))
                continue
            if seq.params.greedy:
                accepted, token = verify_greedy(processed[mine.start:mine.stop].argmax(-1).tolist(), checked)
            else:
                try:
                    accepted, token = verify_sampled(processed[mine.start:mine.stop].softmax(-1), checked, None,
                                                     request.generator(seq.index))
                except RuntimeError as exc:  # this request's draw, not the batch's
                    failed.append((request, PluginError(f"sampling failed for this request: {exc}")))
                    continue
            request.spec.record(len(checked), accepted)
            self.num_proposed += len(checked)
            self.num_accepted += accepted
            kept = [*checked[:accepted], token]  # kept[j] was drawn from logits row rows[mine.start] + j
            logprobs = None
            if seq.params.logprobs is not None:
                from tandem.sampling import token_logprobs

                first = rows[mine.start]
                logprobs = token_logprobs(logits[first:first + len(kept)], kept, [seq.params.logprobs] * len(kept))
            verified.append(Verified(request, seq, kept, accepted, logprobs))
        return verified, failed

    def stats(self) -> dict:
        return {"spec_proposed_tokens": self.num_proposed, "spec_accepted_tokens": self.num_accepted,
                "spec_acceptance_rate": self.num_accepted / self.num_proposed if self.num_proposed else 0.0}
