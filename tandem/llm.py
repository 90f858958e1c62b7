"""`tandem.LLM`: the in-process API (library mode) — load a model, generate, chat, score.

No Ray, no gRPC: the fastest path, and the reference the services are tested against. It is
also where components are composed: it asks the plugin manager for the quantizer, attention
variant and backend, KV-cache format and logits processors by name and hands them to the engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.engine import EngineConfig, LLMEngine
from tandem.engine.config import resolve_device
from tandem.engine.llm_engine import torch_on_one_thread
from tandem.errors import ConfigError, InvalidRequestError, PluginError
from tandem.model.kv_cache import KVCache
from tandem.model.loader import load_model, load_tokenizer
from tandem.model.quantization import quantize_model
from tandem.model.registry import DEFAULT_MODEL
from tandem.outputs import RequestOutput, ScoreOutput
from tandem.parallel import ParallelConfig
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


def runs_on_kernels(model: torch.nn.Module) -> bool:
    from tandem.kernels.ggml_cpu import runs_on_kernels as kernels_run

    return kernels_run(model)


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


@dataclass(frozen=True)
class _ShareOptions:
    """What loads a rank's share of the model: plain values, the same on every rank."""

    model: str
    dtype: str
    quantization: str | None
    quantization_options: dict | None
    attention: str | None
    attention_options: dict | None
    attention_backend: str
    kv_cache_dtype: str
    plugins: list[str] | None
    num_threads: int | None


def _load_share(share: _ShareOptions, plugins, quantizer, device: torch.device, progress: bool, place=None):
    """Load the model, cut it to this rank's share (place: a RankPlace; None: the whole model),
    re-quantize it with the quantizer plugin, move it to the device. Returns (LoadedModel, the
    config of the share's heads, or None for the whole model)."""
    split = place is not None and place.parallel.stage_size > 1  # heads or experts split: plain weights
    keep = share.quantization is None and not split and _blocks_usable(device)
    loaded = load_model(share.model, share.dtype, progress, keep_blocks=keep)
    local_config = None
    if place is not None:
        from tandem.engine.distributed import shard

        local_config = shard(loaded.model, place)
    if quantizer is not None:
        try:
            quantize_model(loaded.model, quantizer)
        except (ConfigError, PluginError):
            raise
        except Exception as exc:
            raise PluginError(f"quantizer {share.quantization!r} from plugin "
                              f"{plugins.owner('quantizer', share.quantization)!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    loaded.model.to(device)  # after quantizing: the quantizers work on host weights
    return loaded, local_config


def run_rank(share: _ShareOptions, parallel: ParallelConfig, rank: int, init_method: str, timeout_s: float) -> None:
    """The life of a rank other than 0 (in a Ray actor or a spawned process): join the group, load
    this rank's share, build its KV pools once rank 0 says how many blocks, then run the steps
    rank 0 broadcasts until it says stop."""
    import datetime

    import torch.distributed as dist

    from tandem.engine.distributed import place_rank, serve_rank
    from tandem.engine.model_runner import ModelRunner
    from tandem.plugins import get_plugin_manager

    threads = share.num_threads or 1
    torch.set_num_threads(threads)
    from tandem.kernels import cpu

    cpu.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=parallel.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        manager = get_plugin_manager(share.plugins)
        quantizer = None if share.quantization in (None, "none") else manager.create(
            "quantizer", share.quantization, share.quantization_options)
        backend = manager.create("attention_backend", share.attention_backend)
        kv_format = manager.create("kv_cache_format", share.kv_cache_dtype)
        _, config, _ = load_tokenizer(share.model)
        place = place_rank(parallel, rank, config.num_layers)
        loaded, local_config = _load_share(share, manager, quantizer, torch.device("cpu"), False, place)
        variant = manager.create("attention_variant", share.attention, share.attention_options) \
            if share.attention is not None else manager.create("attention_variant", *config.attention_variant())
        sizes = torch.empty(2, dtype=torch.long)
        dist.broadcast(sizes, src=0)  # (num_blocks, block_size): rank 0's engine decides
        runner = ModelRunner(loaded.model, local_config, int(sizes[0]), int(sizes[1]), kv_format, variant, backend,
                             layers=place.layers)
        dist.barrier()  # every rank's pools exist: rank 0 may step
        with torch_on_one_thread() if runs_on_kernels(loaded.model) else contextlib.nullcontext():
            serve_rank(runner, place)
        dist.barrier()  # rank 0 said stop: leave together, no message in flight
    finally:
        dist.destroy_process_group()


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
                 speculative_methods: list[str] | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, expert_parallel_size: int = 1, parallel_backend: str = "ray",
                 parallel_timeout_s: float = 300.0, lora_modules: dict[str, str] | None = None,
                 max_loras: int = 0, max_lora_rank: int = 16, **engine_options):
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
        tensor_parallel_size, pipeline_parallel_size, expert_parallel_size: split the model over
        T x P ranks (max(T, E) x P with experts split alone): this process is rank 0 (it schedules
        and samples) and starts the others, local Ray actors in a placement group
        (parallel_backend "ray"; "mp": spawned processes, one machine) joined over gloo; close()
        stops them. Each rank takes num_threads threads (default: this machine's cores / the
        ranks). Tensor and expert parallelism dequantize a GGUF's blocks (quantization "none"
        implied; a quantizer plugin re-quantizes each share). kv_cache_memory is then per rank.
        A step whose collectives fail (a rank died, or hung past parallel_timeout_s) fails its
        requests with ParallelGroupError; the next step restarts the group. CPU only (gloo).
        lora_modules: LoRA adapters in PEFT's format by name, {"name": "path"}, loaded now (more with
        load_lora); a request picks one with generate(..., lora="name"), and one batch mixes them and
        the bare base. max_loras (default: len(lora_modules), at least 1 when adapters are given)
        is how many sit in the model's slots at once (least recently used out), max_lora_rank the
        largest rank accepted. An adapter's requests never share KV with another's.
        engine_options are EngineConfig's fields: block_size, num_kv_blocks, kv_cache_memory,
        max_num_seqs, max_num_batched_tokens, max_waiting, enable_prefix_caching.
        Every name and option is checked before the model loads."""
        from tandem.plugins import get_plugin_manager  # the plugins build on the core: import on use

        try:
            engine_config = EngineConfig(**engine_options)
        except TypeError as exc:
            raise ConfigError(f"unknown engine option: {exc}") from None
        parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, expert_parallel_size)
        self._group = None
        if num_threads is None and parallel.world_size > 1:  # the ranks share this machine's cores
            num_threads = max(1, (os.cpu_count() or 1) // parallel.world_size)
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
        variant = None  # None: the model's own, known once it loads
        if attention is not None:  # before loading, so a bad name or option costs nothing
            variant = self.plugins.create("attention_variant", attention, attention_options)
        elif attention_options:
            raise ConfigError("attention_options needs attention (the variant they are for)")
        if parallel.world_size > 1 and engine_config.kv_cache_memory <= 1:  # a fraction: of the memory ranks share
            engine_config = dataclasses.replace(engine_config,
                                                kv_cache_memory=engine_config.kv_cache_memory / parallel.world_size)
        share = _ShareOptions(model, dtype, quantization, quantization_options, attention, attention_options,
                              attention_backend, kv_cache_dtype,
                              list(plugins) if isinstance(plugins, (list, tuple)) else plugins, num_threads)
        place = None
        if parallel.world_size > 1:
            place = self._start_group(share, parallel, parallel_backend, parallel_timeout_s)
        try:
            self._build(share, quantizer, progress, place, attention, variant, backend, kv_format, spec, proposers,
                        speculative_methods, engine_config, max_model_len, lora_modules, max_loras, max_lora_rank)
        except BaseException:
            self.close()
            raise

    def _build(self, share, quantizer, progress, place, attention, variant, backend, kv_format, spec, proposers,
               speculative_methods, engine_config, max_model_len, lora_modules, max_loras, max_lora_rank) -> None:
        """Load the model (rank 0's share of it in a group) and build the engine."""
        loaded, local_config = _load_share(share, self.plugins, quantizer, self.device, progress, place)
        self.model, self.config, self.tokenizer, self.model_path = (
            loaded.model, loaded.config, loaded.tokenizer, loaded.path)
        if attention is None:
            variant = self.plugins.create("attention_variant", *self.config.attention_variant())
        self.variant, self.backend = variant, backend
        # what the weights are: the plugin's name, "gguf" (blocks kept), or "none"
        self.quantization = share.quantization or ("gguf" if _has_blocks(self.model) else "none")
        self.dtype = next(self.model.parameters()).dtype
        limit = self.config.max_position
        if max_model_len is not None and not (isinstance(max_model_len, int) and 2 <= max_model_len <= limit):
            raise ConfigError(f"max_model_len must be an integer in [2, {limit}], got {max_model_len!r}")
        self.lora = None
        if lora_modules or max_loras:
            if place is not None:
                raise ConfigError("LoRA adapters on a model split over ranks are not supported yet")
            from tandem.model.lora import LoRARegistry

            formats = [self.plugins.create("adapter_format", n) for n in self.plugins.names("adapter_format")]
            self.lora = LoRARegistry(self.model, max_loras or max(1, len(lora_modules or {})), max_lora_rank, formats)
            if self.device.type == "cuda":  # the gathered low-rank matmul as one Triton kernel a part
                from tandem.kernels.lora_bgmv import lora_delta_triton

                self.lora.context.kernel = lora_delta_triton
            for name, path in (lora_modules or {}).items():
                self.lora.add(name, path)
        group_options = {}
        if place is not None:
            group_options = self._group_engine_options(share, quantizer, place, local_config, variant, backend,
                                                       kv_format, engine_config)
        self.engine = LLMEngine(self.model, self.tokenizer, max_model_len or limit, engine_config,
                                sampler=self.plugins.sampler_pipeline(self.config.vocab_size).bind(self.tokenizer),
                                variant=variant, backend=backend, kv_format=kv_format, speculative=spec,
                                proposer_factory=proposers, speculative_methods=speculative_methods,
                                serial_torch=runs_on_kernels(self.model), lora=self.lora, **group_options)
        if self.device.type == "cuda":
            _use_fused_moe(self.model)
        self.max_model_len = self.engine.max_model_len
        self._request_ids = itertools.count()

    # -- the parallel group -------------------------------------------------------------------
    def _start_group(self, share: _ShareOptions, parallel: ParallelConfig, backend: str, timeout_s: float):
        if self.device.type != "cpu":
            raise ConfigError("parallel sizes above 1 run on CPUs (gloo) in this release; NCCL groups on GPUs "
                              "are not implemented yet")
        if share.plugins is not None and not isinstance(share.plugins, (list, tuple)):
            raise ConfigError("with parallel sizes above 1, give plugins as a list of names (each rank loads them)")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ConfigError(f"parallel_timeout_s must be a positive number, got {timeout_s!r}")
        from tandem.engine.distributed import place_rank

        _, config, _ = load_tokenizer(share.model)
        parallel.check(config)  # before any process starts
        from tandem.orchestration.rank_group import RankGroup  # the composition root picks the launcher

        self._group = RankGroup(backend, parallel, share, timeout_s)
        self._group.start()
        return place_rank(parallel, 0, config.num_layers)

    def _group_engine_options(self, share, quantizer, place, local_config, variant, backend, kv_format,
                              engine_config) -> dict:
        """The engine's runner for a group: rank 0's share and pools behind a DistributedRunner,
        which restarts the whole group after a failure."""
        import torch.distributed as dist

        from tandem.engine.distributed import DistributedRunner, kv_bytes_per_token, place_rank
        from tandem.engine.model_runner import ModelRunner

        parallel, block_size = place.parallel, engine_config.block_size

        def local_runner(model, config, where, num_blocks: int) -> ModelRunner:
            dist.broadcast(torch.tensor([num_blocks, block_size], dtype=torch.long), src=0)
            runner = ModelRunner(model, config, num_blocks, block_size, kv_format, variant, backend,
                                 layers=where.layers)
            dist.barrier()  # every rank's pools exist
            return runner

        def factory(num_blocks: int) -> DistributedRunner:
            def restart():
                self._group.start()
                where = place_rank(parallel, 0, self.config.num_layers)
                loaded, config = _load_share(share, self.plugins, quantizer, self.device, False, where)
                self.model = loaded.model
                return local_runner(loaded.model, config, where, num_blocks), where, self._group
            return DistributedRunner(local_runner(self.model, local_config, place, num_blocks), place, self._group,
                                     restart)
        return {"runner_factory": factory,
                "kv_bytes_per_token": kv_bytes_per_token(parallel, self.config, kv_format, self.dtype)}

    def close(self) -> None:
        """Stop a parallel group's other ranks (and the local Ray this LLM started). Idempotent;
        a single-process LLM has nothing to stop."""
        runner = getattr(getattr(self, "engine", None), "runner", None)
        if hasattr(runner, "close"):
            runner.close()
        elif self._group is not None:
            self._group.close(graceful=False)
        self._group = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or many, batched continuously. A prompt is a str or a list of
        token ids. Returns one RequestOutput per prompt, in order (n samples in .outputs).

        Bad input raises before any work. A request that fails while running (a plugin raised
        for it, its logits could not be sampled) comes back with `.error` set and finish_reason
        "error"; the other requests of the call are unaffected.

        lora: a LoRA adapter's name for every prompt, or one per prompt (None: the bare base)."""
        prompt_list = self._prompt_list(prompts)
        param_list = self._param_list(params, len(prompt_list))
        loras = [lora] * len(prompt_list) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompt_list):
            raise InvalidRequestError(f"lora must be one name or a list of {len(prompt_list)}")
        token_lists = [self._prompt_ids(p) for p in prompt_list]  # validate all before any work
        ids = [f"llm-{next(self._request_ids)}" for _ in token_lists]
        results: dict[str, RequestOutput] = {}
        try:
            for request_id, tokens, p, adapter in zip(ids, token_lists, param_list, loras):
                self.engine.add_request(request_id, tokens, p, lora=adapter)
            while len(results) < len(ids):
                for output in self.engine.step()[1]:
                    results[output.request_id] = output
        finally:  # an error mid-way must not leave requests holding KV blocks
            for request_id in ids:
                self.engine.abort(request_id)
        return [results[i] for i in ids]

    # -- LoRA adapters --------------------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Load a PEFT adapter under `name` while serving (a bad one raises ConfigError and changes nothing)."""
        self.add_lora(self.read_lora(name, path))

    def read_lora(self, name: str, path: str):
        """load_lora's first half, which touches no engine state (a server runs it off the engine
        thread): the adapter read and checked against this model (tandem.model.lora.LoRAAdapter)."""
        if self.lora is None:
            raise ConfigError("this LLM has no LoRA slots: create it with lora_modules or max_loras")
        return self.lora.read(name, path)

    def add_lora(self, adapter) -> None:
        """load_lora's second half: the adapter read_lora returned joins the registry."""
        self.lora.insert(adapter)

    def unload_lora(self, name: str) -> None:
        """Forget an adapter (refused while a request runs with it)."""
        if self.lora is None:
            raise ConfigError("this LLM has no LoRA adapters")
        self.lora.remove(name)

    @property
    def loras(self) -> list[str]:
        return [] if self.lora is None else list(self.lora.adapters)

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
    def score(self, token_ids: Sequence[int], lora: str | None = None) -> ScoreOutput:
        """Teacher-forced log-probabilities of token_ids[1:] and the argmax at each position
        (lora: through that LoRA adapter; None: the bare base)."""
        if self._group is not None:
            raise ConfigError("score() runs the whole model in this process: not on a parallel group")
        ids = list(token_ids)
        self.tokenizer.check_ids(ids)
        if not 2 <= len(ids) <= self.max_model_len:
            raise InvalidRequestError(f"score needs 2 to {self.max_model_len} tokens, got {len(ids)}")
        if lora is not None and self.lora is None:
            raise InvalidRequestError("this LLM has no LoRA adapters (create it with lora_modules or max_loras)")
        slot = None if lora is None else self.lora.acquire(lora)
        cache = KVCache(self.config, len(ids), self.dtype, self.device, variant=self.variant, backend=self.backend)
        logprobs, argmax = [], []
        try:
            for start in range(0, len(ids) - 1, PREFILL_CHUNK):
                chunk = ids[start:start + PREFILL_CHUNK]
                targets = torch.tensor(ids[start + 1:start + 1 + len(chunk)], device=self.device)
                if slot is not None:  # every token of this forward through the adapter's slot
                    self.model.lora_context.set_slots(torch.full((len(chunk),), slot))
                logits = self.model.compute_logits(self._forward(chunk, cache)[0, :len(targets)])
                logprobs += logits.log_softmax(-1).gather(-1, targets.unsqueeze(1)).squeeze(1).tolist()
                argmax += logits.argmax(-1).tolist()
        finally:
            if slot is not None:
                self.model.lora_context.set_slots(None)
                self.lora.release(lora)
        return ScoreOutput(logprobs, argmax)
