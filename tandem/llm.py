"""`tandem.LLM`: the in-process API (library mode) — load a model, generate, chat, score.

No Ray, no gRPC: the fastest path, and the reference the services are tested against.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from tandem.errors import ConfigError, InvalidRequestError
from tandem.model.kv_cache import KVCache
from tandem.model.loader import load_model
from tandem.model.registry import DEFAULT_MODEL
from tandem.outputs import OutputBuilder, RequestOutput, ScoreOutput
from tandem.sampling import make_generator, sample
from tandem.sampling_params import SamplingParams

# Prefill runs in chunks of this many tokens: it bounds the attention-score buffer to
# chunk x context x heads floats (512 x 8192 x 9 x 4 B = 150 MB for the default model).
PREFILL_CHUNK = 512

Prompt = str | list[int]


class LLM:
    """An in-process model.

    >>> llm = tandem.LLM("smollm2-135m")
    >>> llm.generate("The capital of France is", tandem.SamplingParams(temperature=0))[0].text
    ' Paris.'
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "float32", max_model_len: int | None = None,
                 num_threads: int | None = None, progress: bool = True):
        if num_threads is not None:
            if not (isinstance(num_threads, int) and num_threads > 0):
                raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
            torch.set_num_threads(num_threads)
        loaded = load_model(model, dtype, progress)
        self.model, self.config, self.tokenizer, self.model_path = (
            loaded.model, loaded.config, loaded.tokenizer, loaded.path)
        self.dtype = next(self.model.parameters()).dtype
        limit = self.config.max_position
        if max_model_len is not None and not (isinstance(max_model_len, int) and 2 <= max_model_len <= limit):
            raise ConfigError(f"max_model_len must be an integer in [2, {limit}], got {max_model_len!r}")
        self.max_model_len = max_model_len or limit

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of text. BOS is added only where the model's metadata asks for it (and
        add_special_tokens is True); text that looks like a special token stays plain text unless
        parse_special=True."""
        return self.tokenizer.encode(text, add_bos=None if add_special_tokens else False, parse_special=parse_special)

    def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or many. A prompt is a str or a list of token ids.
        Returns one RequestOutput per prompt, in order."""
        prompt_list = self._prompt_list(prompts)
        param_list = self._param_list(params, len(prompt_list))
        token_lists = [self._prompt_ids(p) for p in prompt_list]  # validate all before any work
        return [self._generate_one(ids, p) for ids, p in zip(token_lists, param_list)]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """Generate the assistant's reply to messages ([{"role": ..., "content": ...}, ...])."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, parse_special=True)
        return self.generate([ids], params)[0]

    @staticmethod
    def _prompt_list(prompts) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and not isinstance(prompts, (bytes, bytearray)):
            return list(prompts)
        raise InvalidRequestError("prompts must be a non-empty str, a list of token ids, or a list of those")

    @staticmethod
    def _param_list(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidRequestError(f"params must be one SamplingParams or a list of {count}")
        return params

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        elif isinstance(prompt, list):
            ids = list(prompt)
            self.tokenizer.check_ids(ids)
        else:
            raise InvalidRequestError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens; the context window is {self.max_model_len} "
                                      "and at least one token must be left to generate")
        return ids

    @torch.inference_mode()
    def _generate_one(self, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        started = time.perf_counter()
        builder = OutputBuilder(self.tokenizer, params, len(prompt_ids), self.max_model_len)
        cache = KVCache(self.config, 1, min(len(prompt_ids) + params.max_tokens, self.max_model_len), self.dtype)
        generator = make_generator(params.seed)
        hidden = self._prefill(prompt_ids, cache)
        first_token_at = None
        while True:
            logits = self.model.compute_logits(hidden[:, -1])  # (1, V)
            token = sample(logits, [params], [generator], [prompt_ids + builder.token_ids])[0]
            first_token_at = first_token_at or time.perf_counter()
            builder.append(token)
            if builder.finished:
                break
            hidden = self._forward([token], cache)
        done = time.perf_counter()
        metrics = {"ttft_s": first_token_at - started, "e2e_s": done - started,
                   "decode_tokens_per_s": (len(builder.token_ids) - 1) / max(done - first_token_at, 1e-9)}
        return RequestOutput(prompt_ids, builder.token_ids, builder.text, builder.finish_reason, metrics)

    def _forward(self, token_ids: list[int], cache: KVCache) -> torch.Tensor:
        positions = torch.arange(cache.length, cache.length + len(token_ids)).unsqueeze(0)
        return self.model(torch.tensor([token_ids]), positions, cache)

    def _prefill(self, token_ids: list[int], cache: KVCache) -> torch.Tensor:
        for start in range(0, len(token_ids), PREFILL_CHUNK):
            hidden = self._forward(token_ids[start:start + PREFILL_CHUNK], cache)
        return hidden

    # -- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> ScoreOutput:
        """Teacher-forced log-probabilities of token_ids[1:] and the argmax at each position."""
        ids = list(token_ids)
        self.tokenizer.check_ids(ids)
        if not 2 <= len(ids) <= self.max_model_len:
            raise InvalidRequestError(f"score needs 2 to {self.max_model_len} tokens, got {len(ids)}")
        cache = KVCache(self.config, 1, len(ids), self.dtype)
        logprobs, argmax = [], []
        for start in range(0, len(ids) - 1, PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            targets = torch.tensor(ids[start + 1:start + 1 + len(chunk)])
            logits = self.model.compute_logits(self._forward(chunk, cache)[0, :len(targets)])
            logprobs += logits.log_softmax(-1).gather(-1, targets.unsqueeze(1)).squeeze(1).tolist()
            argmax += logits.argmax(-1).tolist()
        return ScoreOutput(logprobs, argmax)
