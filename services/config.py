"""PipelineConfig: every setting of a served pipeline, from a YAML file, flags, or both (flags win).

The YAML keys are the flag names with underscores (`--grpc-port` <-> `grpc_port`), so a config
file and a command line say the same thing:

    # tandem.yaml
    model: smollm2-135m
    quantization: int8
    mode: disaggregated          # or aggregated: one worker runs prefill and decode
    replicas: {prefill: 1, decode: 2}
    grpc_port: 50051
    api_keys: [sk-local-1]       # or api_key_file / TANDEM_API_KEYS
    internal_token_file: /run/secrets/tandem-token   # or internal_token / TANDEM_INTERNAL_TOKEN
    kv_store_bytes: 1073741824
    speculative: {method: ngram, k: 5}   # or {method: remote, options: {method: draft_model}}: the draft service
    speculative_methods: [ngram]         # what requests may pick (never options); default: speculative's and ngram
    plugins: [tandem-plugin-example]     # third-party plugins allowed to load; default: every installed one
    http_request_timeout_s: 600
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError
from tandem.model.registry import DEFAULT_MODEL
from tandem import settings
from tandem.settings import check, json_schema, setting

MODES = ("auto", "disaggregated", "aggregated")
# mode auto: a local pipeline on fewer CPU cores than this runs aggregated (one engine keeps every
# core: split between a prefill and a decode worker, each would run at half speed; bench/RESULTS.md)
AUTO_DISAGGREGATED_MIN_CORES = 8
DISAGGREGATE = ("auto", "always", "never")  # the `disaggregate` policies (services.routing)
ROLES = ("prefill", "decode")
SERVICES = ("tokenizer", "prefill", "decode", "worker", "kvstore", "draft", "retrieval", "gateway")
# The EngineConfig fields a pipeline sets under `engine:` (kv_cache_memory is a setting of its own;
# num_kv_blocks follows from it on each worker).
ENGINE_KEYS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "enable_prefix_caching")
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # tandem.model.loader's names


# JSON Schemas of the settings whose values are structured (tandem.settings derives the others').
def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _replicas_schema() -> dict:
    return {"type": "object", "properties": {role: {"type": "integer", "minimum": 1} for role in ROLES},
            "additionalProperties": False}


def _engine_schema() -> dict:
    from tandem.engine.config import EngineConfig  # the engine loads torch: only when a schema is made

    schema = json_schema(EngineConfig)
    return {**schema, "properties": {k: v for k, v in schema["properties"].items() if k in ENGINE_KEYS}}


def _speculative_schema() -> dict:
    from tandem.speculative import MAX_K

    config = {"type": "object", "properties": {
        "method": {"type": "string", "minLength": 1}, "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
        "adaptive": {"type": "boolean"}, "options": {"type": "object"}}, "required": ["method"],
        "additionalProperties": False}
    return {"oneOf": [{"type": "null"}, config]}


@dataclass
class MigrationConfig:
    """In-flight request migration (services.migration): when a stream's decode or aggregated
    worker dies, stalls or drains, the gateway resumes the request on another serving worker (or
    the restarted one) from the tokens already sent; a failed prefill is retried on another
    prefill worker. YAML: `migration: {enabled: true, max_attempts: 3, stall_timeout_s: 120}`."""

    enabled: bool = setting(True, "resume a request on another worker when its worker dies, stalls or drains",
                            group="migration")
    max_attempts: int = setting(3, "resumes (and prefill retries) per request, beyond the first try", min=0,
                                group="migration")
    # A dead process is found sooner (its connection breaks, or keepalive pings go unanswered).
    stall_timeout_s: float = setting(
        120.0, "seconds without a message from a worker after which it counts as hung and the request moves; "
        "a prefill running longer counts too: keep it above the longest prompt's prefill time", gt=0,
        metavar="SECONDS", group="migration")
    worker_wait_s: float = setting(
        120.0, "seconds a request waits for a serving worker (one restarting, when no other serves) before it "
        "fails UNAVAILABLE, unless the client's deadline comes first", gt=0, metavar="SECONDS", group="migration")

    def __post_init__(self) -> None:
        check(self, "migration.")

    @classmethod
    def parse(cls, value) -> MigrationConfig:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"migration must be a mapping, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"migration: unknown keys {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}")
        return cls(**value)


@dataclass
class PipelineConfig:
    """Every setting of a served pipeline. Each field declares its help, bounds and choices
    (tandem.settings): the checks below, the flags of `tandem serve` / `tandem service` and the
    Helm chart's schema come from them. A new setting is a new field here."""

    # the model, as tandem.LLM takes it (tests/unit/test_settings.py checks that they agree)
    model: str = setting(DEFAULT_MODEL, "a short model name, a .gguf file or an HF directory", group="model")
    dtype: str = setting("float32", "the dtype weights and KV are held in (auto: float32)", choices=DTYPES,
                         group="model")
    device: str = setting("auto", "where the model runs: cpu, cuda, cuda:N, or auto (a GPU when there is one: "
                          "in a pipeline, the one Ray gave the worker)", pattern=r"auto|cpu|cuda(:[0-9]+)?",
                          what="auto, cpu, cuda or cuda:N",
                          group="model")  # resolved on each worker
    max_model_len: int | None = setting(None, "context length limit (null: the model's)", min=2, group="model")
    quantization: str | None = setting(None, "none (dequantize the weights), or a quantizer plugin re-quantizing them: "
                                       "int8, int4, nf4, fp8, ... (null: keep a GGUF file's Q4_0/Q4_1/Q8_0 blocks "
                                       "where the CPU kernel runs, dequantize the rest)", group="model")
    quantization_options: dict = setting({}, "an option of the quantizer, e.g. group_size=64",
                                         flag="--quantization-option", group="model")
    attention: str | None = setting(None, "an attention variant plugin: causal, sliding_window, sinks, alibi, "
                                    "local_global, ... (null: the model's own)", group="model")
    attention_options: dict = setting({}, "an option of the attention variant, e.g. window=256",
                                      flag="--attention-option", group="model")
    attention_backend: str = setting("sdpa", "sdpa, naive (the reference), triton (GPU kernels), or a plugin's",
                                     group="model")
    kv_cache_dtype: str = setting("auto", "KV-cache format: auto (the model's dtype), int8, or a plugin's",
                                  group="model")
    num_threads: int | None = setting(None, "torch threads (per worker in a pipeline; null: torch's default)",
                                      min=1, flag="--threads", group="model")
    tensor_parallel_size: int = setting(1, "split each worker's model over this many ranks by heads and columns "
                                        "(Megatron; a Ray actor a rank, packed on one node)", min=1, group="parallel")
    pipeline_parallel_size: int = setting(1, "split each worker's model into this many stages of layers (a Ray "
                                          "actor a stage; micro-batches overlap them)", min=1, group="parallel")
    expert_parallel_size: int = setting(1, "split an MoE model's experts over this many ranks (all-to-all "
                                        "dispatch); equal to tensor_parallel_size where both exceed 1",
                                        min=1, group="parallel")
    parallel_backend: str = setting("ray", "where a worker's other ranks run: ray (actors in a placement group) or "
                                    "mp (processes on the worker's machine)", choices=("ray", "mp"),
                                    group="parallel")
    parallel_timeout_s: float = setting(300.0, "how long a rank waits for the others in a collective before the "
                                        "step fails and the group restarts, seconds", gt=0, group="parallel")
    kv_cache_memory: int = setting(512 << 20, "each worker's KV-cache pool, bytes (per rank when split)", min=1,
                                   group="engine")
    speculative: dict | None = setting(
        None, "the requests' default speculative decoding, e.g. '{\"method\": \"ngram\", \"k\": 5}'; method "
        "\"remote\" runs the proposer in the draft service; requests override it (null: off)", json=True,
        schema=_speculative_schema, group="speculative decoding")
    speculative_methods: list[str] | None = setting(
        None, "a speculative method requests may pick, with its k and adaptive (null: speculative's and ngram); "
        "a proposer's options only ever come from speculative", flag="--speculative-method",
        group="speculative decoding")
    plugins: list[str] | None = setting(None, "a third-party plugin allowed to load (null: every installed one); "
                                        "only the listed ones load, since a plugin runs code with the server's "
                                        "rights", flag="--plugin", group="model")
    # LoRA adapters (tandem/model/lora.py): a request picks one by its `model`; /v1/models lists them
    lora_modules: dict = setting({}, "a LoRA adapter in PEFT's format every worker loads at start, "
                                 "name=/path/to/adapter (the path on the workers' machines)", metavar="NAME=PATH",
                                 flag="--lora-modules", group="lora")
    max_loras: int = setting(0, "adapters a worker runs at once, in its model's slots, least recently used out "
                             "(0: one per lora_modules entry; at least 1 with runtime_lora_dir)", min=0, group="lora")
    max_lora_rank: int = setting(16, "the highest adapter rank a worker accepts (the slots' size)", min=1,
                                 group="lora")
    runtime_lora_dir: str | None = setting(None, "allow loading and unloading adapters at run time "
                                           "(/v1/load_lora_adapter, /v1/unload_lora_adapter), from inside this "
                                           "directory only (null: off)", group="lora")
    engine: dict = setting({}, "more EngineConfig settings: " + ", ".join(ENGINE_KEYS), schema=_engine_schema,
                           group="engine")
    # the shape of the pipeline
    mode: str = setting("auto", "disaggregated (separate prefill and decode workers), aggregated (one worker doing "
                        f"both), or auto: aggregated for a local pipeline on fewer than {AUTO_DISAGGREGATED_MIN_CORES} "
                        "CPU cores and no GPU, else disaggregated", choices=MODES, group="pipeline")
    # Where a prompt runs in a disaggregated pipeline (services.routing): "auto" (the router
    # decides per request: on a decode worker when the prompt is short or the prefill workers are
    # busier than the hand-off costs, else on a prefill worker), "always" (a prefill worker, then a
    # decode worker), "never" (one decode worker runs it whole). A request may choose its own. No
    # effect in aggregated mode (there are no prefill workers).
    disaggregate: str = setting("auto", "where a prompt runs in disaggregated mode: auto (the router decides per "
                                "request), always (a prefill worker, then a decode worker), never (one decode "
                                "worker runs it whole); a request may choose its own", choices=DISAGGREGATE,
                                group="pipeline")
    # services.routing has the measurement behind the default.
    disaggregate_min_uncached_tokens: int = setting(64, "disaggregate auto: a prompt with fewer uncached tokens "
                                                    "than this runs whole on a decode worker", min=0,
                                                    group="pipeline")
    replicas: dict = setting({"prefill": 1, "decode": 1}, "worker replicas per role, e.g. decode=2 (aggregated "
                             "mode: decode is the number of workers)", metavar="ROLE=N", schema=_replicas_schema,
                             group="ray")
    kv_store_bytes: int = setting(1 << 30, "the KV-cache store's capacity, bytes", min=1, group="pipeline")
    # retrieval (RAG): where its documents live, hybrid BM25 + vector ranking, the ONNX export cache
    rag_data_dir: str = setting("~/.local/share/tandem/rag", "the retrieval service's document store",
                                group="retrieval")
    rag_hybrid: bool = setting(True, "fuse BM25 with the vector ranking", group="retrieval")
    rag_chunk_tokens: int = setting(200, "chunk size in the embedder's tokens", min=1, group="retrieval")
    rag_chunk_overlap: int = setting(40, "tokens consecutive chunks share", min=0, group="retrieval")
    rag_embedder: str = setting("all-MiniLM-L6-v2", "an embedder plugin", group="retrieval")
    rag_embedder_options: dict = setting({}, "an option of the embedder", flag="--rag-embedder-option",
                                         group="retrieval")
    onnx_cache_dir: str | None = setting(None, "the embedder's ONNX export cache (null: ~/.cache/tandem/onnx)",
                                         group="retrieval")
    # the gateway: where users connect, and what it admits
    host: str = setting("127.0.0.1", "the address the gateway binds (127.0.0.1: loopback only)", group="gateway")
    grpc_port: int = setting(50051, "the gateway's gRPC port", min=0, max=65535, what="a port number",
                             group="gateway")
    http_port: int | None = setting(8000, "the gateway's HTTP port: the OpenAI-compatible API, /metrics and /health "
                                    "(0: any free port; null in the YAML: no HTTP)", min=0, max=65535,
                                    what="a port number", group="gateway")
    api_keys: list = setting([], "accept this API key; also api_key_file and $TANDEM_API_KEYS", flag="--api-key",
                             metavar="KEY", group="gateway")
    api_key_file: str | None = setting(None, "a file with one API key per line", metavar="FILE", group="gateway")
    tls_cert: str | None = setting(None, "a PEM certificate: the gateway serves TLS (with tls_key)", metavar="PEM",
                                   group="gateway")
    tls_key: str | None = setting(None, "the PEM private key of tls_cert", metavar="PEM", group="gateway")
    max_inflight: int = setting(256, "samples (n per prompt) in flight at the gateway beyond which it answers "
                                "RESOURCE_EXHAUSTED", min=1, group="gateway")
    http_request_timeout_s: float | None = setting(600.0, "an HTTP request's deadline in seconds: 504 after it "
                                                   "(null: none)", gt=0, metavar="SECONDS", group="gateway")
    # On SIGTERM / Ctrl-C the gateway refuses new requests and lets those in flight finish for this
    # long, then every service stops. The chart sizes the pod's terminationGracePeriodSeconds from it.
    drain_grace_s: float = setting(30.0, "on SIGTERM / Ctrl-C, how many seconds requests in flight may finish "
                                   "before the services stop", min=0, max=3600, metavar="SECONDS", group="gateway")
    max_message_bytes: int = setting(16 << 20, "the gRPC message size limit, bytes", min=1, group="pipeline")
    migration: MigrationConfig = setting(MigrationConfig(), "in-flight request migration (a mapping of its fields)",
                                         group="migration")
    # the pipeline's credentials (services.credentials): every internal service requires the token
    # (`tandem serve` makes a random one when none is set); optional mutual TLS between services
    internal_token: str | None = setting(None, "the pipeline token internal services require (or "
                                         "internal_token_file, $TANDEM_INTERNAL_TOKEN); no flag: a command line "
                                         "is visible to every local user", flag="", repr=False, group="credentials")
    internal_token_file: str | None = setting(None, "a file holding the pipeline token internal services require "
                                              "(also internal_token, $TANDEM_INTERNAL_TOKEN; `tandem serve` makes one "
                                              "when none is set)", metavar="FILE", group="credentials")
    internal_tls_cert: str | None = setting(None, "mutual TLS between services: this service's PEM certificate "
                                            "(with internal_tls_key and internal_tls_ca)", metavar="PEM",
                                            group="credentials")
    internal_tls_key: str | None = setting(None, "the key of internal_tls_cert", metavar="PEM", group="credentials")
    internal_tls_ca: str | None = setting(None, "the CA that signed every service's certificate", metavar="PEM",
                                          group="credentials")
    internal_tls_server_name: str | None = setting(None, "the name in the services' certificates, if not their IPs",
                                                   group="credentials")
    # Ray (`tandem serve`)
    ray_address: str | None = setting(None, "join this Ray cluster instead of starting a local one", group="ray")
    dashboard: bool = setting(False, "start Ray's dashboard", group="ray")
    object_store_memory: int | None = setting(None, "Ray's object store, bytes (null: Ray's own sizing, at most "
                                              "1 GiB)", min=1, group="ray")
    service_host: str = setting("127.0.0.1", "where the internal services listen; 0.0.0.0 on a cluster: each then "
                                "advertises its node's IP to its peers", group="pipeline")
    gateway_resources: dict = setting({}, "a Ray custom resource the gateway actor asks for, e.g. tandem_gateway=1 "
                                      "offered only by the head pod (the chart): it lands there", group="ray")

    def __post_init__(self) -> None:
        self.migration = MigrationConfig.parse(self.migration)
        check(self)  # types, bounds, choices: what each field declares
        from tandem.parallel import ParallelConfig

        self.parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                       self.expert_parallel_size)
        self._mode_reason = "set in the configuration"
        if self.mode == "auto":
            self.mode, self._mode_reason = self._auto_mode()
        self.replicas = {**{"prefill": 1, "decode": 1}, **self.replicas}
        for role, count in self.replicas.items():
            if role not in ROLES:
                raise ConfigError(f"replicas: unknown role {role!r}; roles are {ROLES}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ConfigError(f"replicas: {role} must be a positive integer, got {count!r}")
        unknown = set(self.engine) - set(ENGINE_KEYS)
        if unknown:
            raise ConfigError(f"engine: unknown keys {sorted(unknown)}; known: {ENGINE_KEYS}")
        from tandem.errors import InvalidRequestError
        from tandem.speculative import SpeculativeConfig, SpeculativePolicy

        try:
            SpeculativePolicy.of(SpeculativeConfig.parse(self.speculative), self.speculative_methods)
        except InvalidRequestError as exc:
            raise ConfigError(str(exc)) from None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                   for v in self.gateway_resources.values()):
            raise ConfigError(f"gateway_resources must map Ray resource names to positive amounts, "
                              f"got {self.gateway_resources!r}")
        for name, path in self.lora_modules.items():
            if not isinstance(path, str) or not path or not name or len(name) > 128:
                raise ConfigError(f"lora_modules: {name!r}: give each adapter a name of 1-128 characters and a "
                                  f"path, got {path!r}")
        if (self.lora_modules or self.runtime_lora_dir) and self.parallel.world_size > 1:
            raise ConfigError("LoRA adapters on a model split over ranks are not supported yet")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        internal_tls = (self.internal_tls_cert, self.internal_tls_key, self.internal_tls_ca)
        if any(internal_tls) and not all(internal_tls):
            raise ConfigError("mutual TLS between services needs internal_tls_cert, internal_tls_key and internal_tls_ca")
        if self.internal_token is not None:
            _check_token(self.internal_token, "internal_token")
        if self.parallel.world_size > 1 and self.mode == "disaggregated":
            raise ConfigError("a worker split over several ranks cannot hand KV blocks to another worker yet: run "
                              "it with mode: aggregated")

    # -- sources ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> PipelineConfig:
        """Defaults, then the YAML file, then overrides: the flags given (tandem.settings.from_flags;
        None among them is an explicit null). An override of a nested mapping (migration) updates
        the file's keys; any other replaces the file's value."""
        values: dict = {}
        if path is not None:
            import yaml

            try:
                values = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path} must hold a mapping of settings")
        nested = {f.name for f, _, kind in settings.fields(cls) if dataclasses.is_dataclass(kind.base)}
        for key, value in overrides.items():
            merge = key in nested and isinstance(value, dict) and isinstance(values.get(key), dict)
            values[key] = {**values[key], **value} if merge else value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(names)}")
        return cls(**values)

    def _auto_mode(self) -> tuple[str, str]:
        if self.parallel.world_size > 1:
            return "aggregated", (f"auto: each worker is split over {self.parallel.world_size} ranks, which cannot "
                                  "hand KV blocks to another worker yet")
        if self.ray_address:
            return "disaggregated", "auto: a Ray cluster places each worker on its own resources"
        if self.device.startswith("cuda"):
            return "disaggregated", f"auto: device {self.device}"
        cores = os.cpu_count() or 1
        if cores < AUTO_DISAGGREGATED_MIN_CORES and not _has_gpu():
            return "aggregated", (f"auto: {cores} CPU cores and no GPU; one worker keeps them all (a prefill and "
                                  f"a decode worker would split them)")
        return "disaggregated", f"auto: {cores} CPU cores" + (", a GPU" if _has_gpu() else "")

    def mode_reason(self) -> str:
        """Why the pipeline has its shape (`mode: auto` resolves on the machine that starts it)."""
        return getattr(self, "_mode_reason", "set in the configuration")

    def worker_threads(self) -> int:
        """torch threads per worker: num_threads, else this machine's cores shared by the workers a
        local pipeline starts on it (so they do not oversubscribe them), or all of a node's cores
        on a cluster (the chart gives each worker its own pod)."""
        if self.num_threads:
            return self.num_threads
        cores = os.cpu_count() or 1
        if self.ray_address:
            return cores
        workers = self.replicas["decode"] + (self.replicas["prefill"] if self.mode == "disaggregated" else 0)
        return max(1, cores // (workers * self.parallel.world_size))  # a split worker's ranks share them too

    def resolved_api_keys(self) -> list[str]:
        """api_keys, plus one key per line of api_key_file, plus TANDEM_API_KEYS (comma-separated)."""
        keys = [str(k) for k in self.api_keys]
        if self.api_key_file:
            try:
                keys += [line.strip() for line in Path(self.api_key_file).read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise ConfigError(f"cannot read api_key_file: {exc}") from None
        keys += [k.strip() for k in os.environ.get("TANDEM_API_KEYS", "").split(",") if k.strip()]
        return keys

    def resolved_internal_token(self) -> str | None:
        """internal_token, else the first line of internal_token_file, else $TANDEM_INTERNAL_TOKEN."""
        if self.internal_token:
            return self.internal_token
        if self.internal_token_file:
            try:
                token = Path(self.internal_token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read internal_token_file: {exc}") from None
            return _check_token(token, "internal_token_file")
        token = os.environ.get("TANDEM_INTERNAL_TOKEN", "").strip()
        return _check_token(token, "TANDEM_INTERNAL_TOKEN") if token else None

    def with_internal_token(self) -> PipelineConfig:
        """This config with its token resolved, or a new random one when none is configured: what
        `tandem serve` gives every actor, so a pipeline it starts never has an open internal port."""
        token = self.resolved_internal_token() or secrets.token_urlsafe(32)
        return dataclasses.replace(self, internal_token=token, internal_token_file=None)

    def internal_credentials(self):
        """The services.credentials.InternalCredentials of this pipeline (empty: none configured)."""
        from .credentials import InternalCredentials

        return InternalCredentials(self.resolved_internal_token(), self.internal_tls_cert, self.internal_tls_key,
                                   self.internal_tls_ca, self.internal_tls_server_name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- what a worker builds ------------------------------------------------------------------
    def llm_kwargs(self) -> dict:
        """tandem.LLM's arguments for a worker of this pipeline."""
        split = self.parallel.world_size > 1  # each rank's threads: the share worker_threads gives it
        return dict(model=self.model, dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
                    num_threads=self.worker_threads() if split else self.num_threads, progress=False, quantization=self.quantization,
                    quantization_options=self.quantization_options or None, attention=self.attention,
                    attention_options=self.attention_options or None, attention_backend=self.attention_backend,
                    kv_cache_dtype=self.kv_cache_dtype, kv_cache_memory=self.kv_cache_memory,
                    speculative=self.speculative, speculative_methods=self.speculative_methods,
                    plugins=self.plugins, tensor_parallel_size=self.tensor_parallel_size,
                    pipeline_parallel_size=self.pipeline_parallel_size,
                    expert_parallel_size=self.expert_parallel_size, parallel_backend=self.parallel_backend,
                    parallel_timeout_s=self.parallel_timeout_s, lora_modules=self.lora_modules or None,
                    max_loras=self.max_loras or (1 if self.runtime_lora_dir and not self.lora_modules else 0),
                    max_lora_rank=self.max_lora_rank, **self.engine)

    def kv_namespace(self, model_path: Path, block_size: int, device: str = "cpu") -> str:
        """Names the KV layout: only workers that would compute bit-identical KV share blocks
        (device: the type a worker resolved, cpu or cuda: their kernels round differently)."""
        stat = model_path.stat() if model_path.is_file() else None
        key = json.dumps([str(model_path), stat.st_size if stat else None, self.dtype, device, self.quantization,
                          self.quantization_options, self.attention, self.attention_options,
                          self.kv_cache_dtype, block_size], sort_keys=True, default=str)
        return f"{model_path.stem}-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}"


MIN_TOKEN_CHARS = 16  # `tandem serve`'s own are 43 (32 random bytes); a short one is guessable


def _check_token(token: str, where: str) -> str:
    if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{where}: the pipeline token must be a string of at least {MIN_TOKEN_CHARS} characters")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: the pipeline token must be printable, without spaces (it travels in a header)")
    return token
