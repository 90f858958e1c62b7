"""`tandem.LLM`: the in-process API (library mode) — load a model, generate, chat, score.

No Ray, no gRPC: the fastest path, and the reference the services are tested against. It is
also where components are composed: it asks the plugin manager for the quantizer, attention
variant and backend, KV-cache format and logits processors by name and hands them to the engine.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch

from tandem.engine import EngineConfig, LLMEngine
from tandem.engine.config import resolve_device
from tandem.errors import ConfigError, InvalidRequestError, PluginError
from tandem.model.kv_cache import KVCache
from tandem.model.loader import load_model
from tandem.model.quantization import quantize_model
from tandem.model.registry import DEFAULT_MODEL
from tandem.outputs import RequestOutput, ScoreOutput
from tandem.sampling_params import SamplingParams
from tandem.speculative import SpeculativeConfig

# score() runs in chunks of this many tokens: it bounds the attention-score buffer to
# chunk x context x heads floats (512 x 8192 x 9 x 4 B = 150 MB for the default model).
PREFILL_CHUNK = 512
log = logging.getLogger(__name__)

Prompt = str | list[int]


def _blocks_usable(device: torch.device) -> bool:
    """Whether GGUF blocks can stay packed here (the CPU kernel builds and runs); says why not."""
    if device.type != "cpu":
        return False
    from tandem.kernels import cpu

    reason = cpu.unavailable_reason()
    if reason is not None:
        log.warning("GGUF weights are dequantized (slower, larger): the CPU kernels are unavailable: %s", reason)
    return reason is None


def _runs_on_kernels(model: torch.nn.Module) -> bool:
    from tandem.kernels.ggml_cpu import runs_on_kernels

    return runs_on_kernels(model)


def _use_fused_moe(model: torch.nn.Module) -> None:
    """On a GPU, MoE layers run the Triton fused-MoE kernel (tandem.kernels.fused_moe)."""
    from tandem.model.moe import Experts

    experts = [m for m in model.modules() if isinstance(m, Experts)]
    if experts:
        from tandem.kernels.fused_moe import fused_moe_triton

        for module in experts:
            module.impl = fused_moe_triton


def _has_blocks(model: torch.nn.Module) -> bool:
    from tandem.kernels.ggml_cpu import GGMLLinear

    return any(isinstance(m, GGMLLinear) for m in model.modules())


class LLM:
    """An in-process model.

    >>> llm = tandem.LLM("smollm2-135m")
    >>> llm.generate("The capital of France is", tandem.SamplingParams(temperature=0))[0].text
    ' Paris.'
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "float32", max_model_len: int | None = None,
                 num_threads: int | None = None, progress: bool = True, *, quantization: str | None = None,
                 quantization_options: dict | None = None, attention: str | None = None,
                 attention_options: dict | None = None, attention_backend: str = "sdpa",
                 kv_cache_dtype: str = "auto", speculative: dict | None = None, device: str = "cpu", plugins=None,
                 speculative_methods: list[str] | None = None, **engine_options):
        """quantization: None (the default) keeps a GGUF file's Q4_0/Q4_1/Q8_0 projections in their
        blocks, multiplied as llama.cpp does (int8 activations per block of 32; tandem.kernels.ggml_cpu)
        where the CPU can run that kernel, and dequantizes everything else (and everything on a GPU);
        "none" dequantizes every weight to `dtype`; a quantizer plugin ("int8", "int4", "nf4",
        "fp8", ...) re-quantizes the dequantized weights, its options e.g. {"group_size": 64}. attention: a variant
        plugin ("sliding_window", "sinks", "alibi", "local_global", ...) with its options; None
        takes the model's own (its config's sliding window, else causal). attention_backend:
        "sdpa" or "naive" (the reference) or a plugin's. kv_cache_dtype: "auto" (the model's dtype)
        or "int8". speculative: the requests' default speculative decoding, e.g. {"method": "ngram",
        "k": 5} (keys: method, k, adaptive, options; None: off); SamplingParams.speculative
        overrides it per request with a method among speculative_methods (None: the default's and
        "ngram"); a proposer's options come only from here, never from a request.
        device: "cpu" (default), "cuda", "cuda:N" or "auto" (a GPU when PyTorch sees one): where
        the weights, the KV pool and the forward live; sampling runs on the host. On a GPU pick attention_backend="triton" and the "int8_triton"/"int4_triton"
        quantizers: "int8"/"int4" are PyTorch's packed CPU kernels.
        plugins: a tandem.plugins.PluginManager (default: the process's), or a list of the
        third-party plugins allowed to load (the config's `plugins:`; the built-ins always load).
        engine_options are EngineConfig's fields: block_size, num_kv_blocks, kv_cache_memory,
        max_num_seqs, max_num_batched_tokens, max_waiting, enable_prefix_caching.
        Every name and option is checked before the model loads."""
        from tandem.plugins import get_plugin_manager  # the plugins build on the core: import on use

        try:
            engine_config = EngineConfig(**engine_options)
        except TypeError as exc:
            raise ConfigError(f"unknown engine option: {exc}") from None
        if num_threads is not None:
            if not (isinstance(num_threads, int) and num_threads > 0):
                raise ConfigError(f"num_threads must be a positive integer, got {num_threads!r}")
            torch.set_num_threads(num_threads)
            from tandem.kernels import cpu  # the composition root picks the kernels (docs/architecture.md)

            cpu.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.plugins = plugins if plugins is not None and not isinstance(plugins, (list, tuple)) \
            else get_plugin_manager(plugins)
        quantizer = None if quantization in (None, "none") else self.plugins.create(
            "quantizer", quantization, quantization_options)
        if quantization == "none" and quantization_options:
            raise ConfigError("quantization_options needs a quantizer (quantization 'none' takes none)")
        backend = self.plugins.create("attention_backend", attention_backend)
        try:
            spec = SpeculativeConfig.parse(speculative)
        except InvalidRequestError as exc:
            raise ConfigError(str(exc)) from None
        # The default's proposer is built now, so a bad method or option fails before the model
        # loads, and handed to the engine: a draft model is loaded once, not twice.
        default = None if spec is None else self.plugins.create("draft_proposer", spec.method, spec.options)

        def proposers(config: SpeculativeConfig):
            if default is not None and (config.method, config.options) == (spec.method, spec.options):
                return default
            return self.plugins.create("draft_proposer", config.method, config.options)
        kv_format = self.plugins.create("kv_cache_format", kv_cache_dtype)
        if attention is not None:  # before loading, so a bad name or option costs nothing
            variant = self.plugins.create("attention_variant", attention, attention_options)
        elif attention_options:
            raise ConfigError("attention_options needs attention (the variant they are for)")
        loaded = load_model(model, dtype, progress, keep_blocks=quantization is None and _blocks_usable(self.device))
        self.model, self.config, self.tokenizer, self.model_path = (
            loaded.model, loaded.config, loaded.tokenizer, loaded.path)
        if attention is None:
            variant = self.plugins.create("attention_variant", *self.config.attention_variant())
        if quantizer is not None:
            try:
                quantize_model(self.model, quantizer)
            except (ConfigError, PluginError):
                raise
            except Exception as exc:
                raise PluginError(f"quantizer {quantization!r} from plugin "
                                  f"{self.plugins.owner('quantizer', quantization)!r} failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        self.model.to(self.device)  # after quantizing: the quantizers work on host weights
        self.variant, self.backend = variant, backend
        # what the weights are: the plugin's name, "gguf" (blocks kept), or "none"
        self.quantization = quantization or ("gguf" if _has_blocks(self.model) else "none")
        self.dtype = next(self.model.parameters()).dtype
        limit = self.config.max_position
        if max_model_len is not None and not (isinstance(max_model_len, int) and 2 <= max_model_len <= limit):
            raise ConfigError(f"max_model_len must be an integer in [2, {limit}], got {max_model_len!r}")
        self.engine = LLMEngine(self.model, self.tokenizer, max_model_len or limit, engine_config,
                                sampler=self.plugins.sampler_pipeline(self.config.vocab_size),
                                variant=variant, backend=backend, kv_format=kv_format, speculative=spec,
                                proposer_factory=proposers, speculative_methods=speculative_methods,
                                serial_torch=_runs_on_kernels(self.model))
        if self.device.type == "cuda":
            _use_fused_moe(self.model)
        self.max_model_len = self.engine.max_model_len
        self._request_ids = itertools.count()

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
        """Generate for one prompt or many, batched continuously. A prompt is a str or a list of
        token ids. Returns one RequestOutput per prompt, in order (n samples in .outputs).

        Bad input raises before any work. A request that fails while running (a plugin raised
        for it, its logits could not be sampled) comes back with `.error` set and finish_reason
        "error"; the other requests of the call are unaffected."""
        prompt_list = self._prompt_list(prompts)
        param_list = self._param_list(params, len(prompt_list))
        token_lists = [self._prompt_ids(p) for p in prompt_list]  # validate all before any work
        ids = [f"llm-{next(self._request_ids)}" for _ in token_lists]
        results: dict[str, RequestOutput] = {}
        try:
            for request_id, tokens, p in zip(ids, token_lists, param_list):
                self.engine.add_request(request_id, tokens, p)
            while len(results) < len(ids):
                for output in self.engine.step()[1]:
                    results[output.request_id] = output
        finally:  # an error mid-way must not leave requests holding KV blocks
            for request_id in ids:
                self.engine.abort(request_id)
        return [results[i] for i in ids]

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """Generate the assistant's reply to messages ([{"role": ..., "content": ...}, ...])."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)  # content's control text stays text
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

    def _forward(self, token_ids: list[int], cache: KVCache) -> torch.Tensor:
        positions = torch.arange(cache.length, cache.length + len(token_ids), device=self.device).unsqueeze(0)
        hidden = self.model(torch.tensor([token_ids], device=self.device), positions, cache)
        cache.advance(len(token_ids))
        return hidden

    # -- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, token_ids: Sequence[int]) -> ScoreOutput:
        """Teacher-forced log-probabilities of token_ids[1:] and the argmax at each position."""
        ids = list(token_ids)
        self.tokenizer.check_ids(ids)
        if not 2 <= len(ids) <= self.max_model_len:
            raise InvalidRequestError(f"score needs 2 to {self.max_model_len} tokens, got {len(ids)}")
        cache = KVCache(self.config, len(ids), self.dtype, self.device, variant=self.variant, backend=self.backend)
        logprobs, argmax = [], []
        for start in range(0, len(ids) - 1, PREFILL_CHUNK):
            chunk = ids[start:start + PREFILL_CHUNK]
            targets = torch.tensor(ids[start + 1:start + 1 + len(chunk)], device=self.device)
            logits = self.model.compute_logits(self._forward(chunk, cache)[0, :len(targets)])
            logprobs += logits.log_softmax(-1).gather(-1, targets.unsqueeze(1)).squeeze(1).tolist()
            argmax += logits.argmax(-1).tolist()
        return ScoreOutput(logprobs, argmax)
