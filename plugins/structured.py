"""Structured outputs: decoding constrained to a JSON schema, any JSON object, a regular expression,
a choice among strings, or a Lark grammar, as a logits processor (`structured_output`).

The grammar engine is llguidance (the Guidance project's Rust engine, also used by vLLM, SGLang and
llama.cpp): of the three the issue names it needs no torch build of its own (xgrammar pins its own
torch, outlines-core compiles a regex index per schema up front), computes a 49,152-token mask in
microseconds lazily at each step (an Earley parser over the token trie), and supports JSON Schema's
nesting, enums, numeric bounds and string patterns. A request asks through
`SamplingParams.logits_processors`:

    {"structured_output": {"json_schema": {...}}}     # or {"json_object": true}, {"regex": "..."},
                                                      #    {"choice": ["yes", "no"]}, {"grammar": "<lark>"}

Each request's grammar is compiled once per distinct text (an LRU of COMPILED_CACHE entries) and
checked against the tokenizer before any work (a bad schema fails the request with
InvalidRequestError). At each step every constrained row's matcher advances by the tokens sampled
since its last step and fills its row of one (B, vocab/32) int32 bitmask; the mask is applied to
the batch in one call. It runs first (order 50), so the samplers after it (temperature, top-k/p,
min-p) only ever see allowed tokens; once the grammar is complete only end-of-sequence remains.
JSON is written compact (no free whitespace) and numbers with bounded digits (`bounded`), so an
answer to a schema whose strings and arrays are bounded always ends.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch

from tandem.errors import InvalidRequestError
from tandem.plugins import hookimpl
from tandem.sampling import LogitsProcessor, SamplingBatch

COMPILED_CACHE = 256  # distinct grammars kept compiled
# JSON without free whitespace between tokens (vLLM's disable-any-whitespace): a model cannot spin
# on newlines forever, so an answer whose strings and arrays are bounded always ends. A schema's own
# "x-guidance" options win.
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
# Numbers as the model writes them: at most FRACTION_DIGITS decimals and integers within JavaScript's
# safe range, unless the schema bounds them itself. Every document allowed still validates against
# the schema as given (a subset of its values), and a sampled number cannot run on forever: at
# temperature 1 the default model wrote 250-digit fractions for a plain {"type": "number"}.
FRACTION_DIGITS = 6
SAFE_INTEGER = 2**53 - 1
_NOT_SCHEMAS = ("enum", "const", "default", "examples")  # values, not subschemas


def bounded(node):
    """A copy of a JSON schema with every unbounded number bounded as above."""
    if isinstance(node, list):
        return [bounded(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: value if key in _NOT_SCHEMAS else bounded(value) for key, value in node.items()}
    types = node.get("type")
    types = types if isinstance(types, list) else [types]
    if "number" in types and "multipleOf" not in node:
        out["multipleOf"] = 10.0 ** -FRACTION_DIGITS
    if "number" in types or "integer" in types:
        if "minimum" not in node and "exclusiveMinimum" not in node:
            out["minimum"] = -SAFE_INTEGER
        if "maximum" not in node and "exclusiveMaximum" not in node:
            out["maximum"] = SAFE_INTEGER
    return out


KINDS = {"json_schema": "json_schema", "json_object": "json", "regex": "regex", "choice": "choice",
         "grammar": "lark"}


class _Vocabulary:
    """tandem's tokenizer as llguidance's TokenizerWrapper reads it: every token's bytes (control
    tokens marked with llguidance's 0xFF prefix), the end of sequence, and plain-text encoding."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids, default=0)
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.control_ids)
        self.tokens = [b"\xff" + b if i in tokenizer.control_ids else b for i, b in enumerate(tokenizer.token_bytes)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_bos=False)


class _Constraint:
    """One request's compiled grammar, and the matcher of each of its sequences (keyed by the
    sequence's token list, which lives as long as the sequence)."""

    def __init__(self, grammar: str, tokenizer):
        self.grammar, self.tokenizer = grammar, tokenizer
        self.matchers: dict[int, tuple[list[int], Any, int]] = {}

    def matcher(self, token_ids: list[int], num_prompt: int):
        """The matcher after this sequence's output so far, or None when the output left the
        grammar: only a speculative verification row can (its context holds unchecked guesses;
        the verifier rejects at the first guess the grammar refused, so the row is never used)."""
        import llguidance

        output = len(token_ids) - num_prompt
        entry = self.matchers.get(id(token_ids))
        if entry is None or entry[0] is not token_ids or entry[2] > output:  # new, or rolled back: start over
            entry = (token_ids, llguidance.LLMatcher(self.tokenizer, self.grammar), 0)
        holder, matcher, consumed = entry
        if consumed < output:
            taken = matcher.try_consume_tokens(list(token_ids[num_prompt + consumed:]))
            if taken != output - consumed:
                self.matchers.pop(id(token_ids), None)
                return None
        self.matchers[id(token_ids)] = (holder, matcher, output)
        return matcher


class StructuredOutput(LogitsProcessor):
    name = "structured_output"
    order = 50  # before every sampler: they see only the tokens the grammar allows

    def __init__(self):
        self._tokenizer = None  # llguidance.LLTokenizer, once bound
        self._compiled: OrderedDict[tuple[str, str], str] = OrderedDict()

    def bind(self, tokenizer) -> None:
        import llguidance

        vocabulary = _Vocabulary(tokenizer)
        self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary))
        self._eos = vocabulary.eos_token_id

    def validate(self, **kwargs) -> _Constraint:
        if self._tokenizer is None:
            raise InvalidRequestError("structured_output needs an engine that bound it to its tokenizer")
        if len(kwargs) != 1 or next(iter(kwargs)) not in KINDS:
            raise InvalidRequestError(f"structured_output takes exactly one of {', '.join(KINDS)}, got {sorted(kwargs)}")
        kind, value = next(iter(kwargs.items()))
        text = self._text(kind, value)
        return _Constraint(self._compile(KINDS[kind], text), self._tokenizer)

    @staticmethod
    def _text(kind: str, value) -> str:
        if kind == "json_schema":
            if not isinstance(value, dict):
                raise InvalidRequestError("structured_output json_schema must be a JSON Schema object")
            return json.dumps({**COMPACT, **bounded(value)}, sort_keys=True)
        if kind == "json_object":
            if value is not True:
                raise InvalidRequestError("structured_output json_object must be true")
            return json.dumps({**COMPACT, "type": "object"})
        if kind == "choice":
            if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
                raise InvalidRequestError("structured_output choice must be a non-empty list of non-empty strings")
            return json.dumps(value)
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(f"structured_output {kind} must be a non-empty string")
        return value

    def _compile(self, fmt: str, text: str) -> str:
        """The grammar for llguidance, checked against the tokenizer once per distinct text."""
        import llguidance

        key = (fmt, text)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        try:
            grammar = llguidance.grammar_from(fmt, text)
            problem = llguidance.LLMatcher.validate_grammar(grammar, self._tokenizer)  # "" when it compiles
        except Exception as exc:  # llguidance's own parse errors
            problem = str(exc)
        if problem:
            raise InvalidRequestError(f"structured_output: cannot compile the {fmt}: {problem.strip()}")
        self._compiled[key] = grammar
        if len(self._compiled) > COMPILED_CACHE:
            self._compiled.popitem(last=False)
        return grammar

    def __call__(self, logits: torch.Tensor, args: list, batch: SamplingBatch) -> torch.Tensor:
        import llguidance.torch as ltorch

        rows, vocab = logits.shape
        mask = ltorch.allocate_token_bitmask(rows, self._tokenizer.vocab_size)
        mask.fill_(-1)  # unconstrained rows: every token
        for row, constraint in enumerate(args):
            if constraint is None:
                continue
            num_prompt = batch.num_prompt_tokens[row] if batch.num_prompt_tokens else len(batch.token_ids[row])
            matcher = constraint.matcher(batch.token_ids[row], num_prompt)
            if matcher is None:  # a verification row past a refused guess: any finite row will do
                mask[row].zero_()
                bit = self._eos % 32
                mask[row, self._eos // 32] = 1 << bit if bit < 31 else -(1 << 31)  # int32 words
                continue
            ltorch.fill_next_token_bitmask(matcher, mask, row)
            if matcher.is_error():
                raise ValueError(f"the grammar cannot continue: {matcher.get_error()}")
        out = logits.clone()
        width = min(vocab, self._tokenizer.vocab_size)
        head = out[:, :width].contiguous()
        ltorch.apply_token_bitmask_inplace(head, mask)
        out[:, :width] = head
        constrained = torch.tensor([a is not None for a in args])
        if vocab > width and bool(constrained.any()):  # the model's padding rows are never allowed
            out[constrained, width:] = float("-inf")
        return out


@hookimpl
def tandem_logits_processors(api_version: int) -> list[type[LogitsProcessor]]:
    return [StructuredOutput]
