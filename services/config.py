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
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from tandem.errors import ConfigError
from tandem.model.registry import DEFAULT_MODEL

MODES = ("disaggregated", "aggregated")
DISAGGREGATE = ("auto", "always", "never")  # the `disaggregate` policies (services.disaggregation)
ROLES = ("prefill", "decode")
SERVICES = ("tokenizer", "prefill", "decode", "worker", "kvstore", "draft", "retrieval", "gateway")
ENGINE_KEYS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting", "enable_prefix_caching")


@dataclass
class MigrationConfig:
    """In-flight request migration (services.migration): when a stream's decode or aggregated
    worker dies, stalls or drains, the gateway resumes the request on another serving worker (or
    the restarted one) from the tokens already sent; a failed prefill is retried on another
    prefill worker. YAML: `migration: {enabled: true, max_attempts: 3, stall_timeout_s: 120}`."""

    enabled: bool = True
    max_attempts: int = 3  # resumes (and prefill retries) per request, beyond the first try
    # No message from a worker for this long means it hangs: the request moves. A dead process is
    # found sooner (its connection breaks, or keepalive pings go unanswered). A prefill that runs
    # longer than this counts as stalled too: keep it above the longest prompt's prefill time.
    stall_timeout_s: float = 120.0
    # How long a request waits for a serving worker (one restarting, when no other serves) before
    # it fails UNAVAILABLE, unless the client's deadline comes first.
    worker_wait_s: float = 120.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"migration.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) or self.max_attempts < 0:
            raise ConfigError(f"migration.max_attempts must be an integer >= 0, got {self.max_attempts!r}")
        for key in ("stall_timeout_s", "worker_wait_s"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ConfigError(f"migration.{key} must be a positive number of seconds, got {value!r}")

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
    # the model, as tandem.LLM takes it
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "auto"  # where each worker runs: auto (its GPU when Ray gave it one), cpu, cuda
    max_model_len: int | None = None
    quantization: str | None = None
    quantization_options: dict = field(default_factory=dict)
    attention: str | None = None
    attention_options: dict = field(default_factory=dict)
    attention_backend: str = "sdpa"
    kv_cache_dtype: str = "auto"
    num_threads: int | None = None  # torch threads per worker (default: the worker's CPUs)
    kv_cache_memory: int = 512 << 20  # each worker's KV pool, bytes
    speculative: dict | None = None  # the requests' default, e.g. {method: ngram, k: 5}; requests override it
    # the methods a request may pick (its k and adaptive too; the options are only ever the
    # config's): None = speculative's method and ngram
    speculative_methods: list | None = None
    plugins: list | None = None  # third-party plugins allowed to load, by name; None: every installed one
    engine: dict = field(default_factory=dict)  # more EngineConfig fields: block_size, max_num_seqs, ...
    # the shape of the pipeline
    mode: str = "disaggregated"
    # Where a prompt runs in a disaggregated pipeline (services.disaggregation): "auto" (the router
    # decides per request: on a decode worker when the prompt is short or the prefill workers are
    # busier than the hand-off costs, else on a prefill worker), "always" (a prefill worker, then a
    # decode worker), "never" (one decode worker runs it whole). A request may choose its own. No
    # effect in aggregated mode (there are no prefill workers).
    disaggregate: str = "auto"
    # auto: a prompt with fewer uncached tokens than this runs whole on a decode worker (see
    # services.disaggregation for the measurement behind the default).
    disaggregate_min_uncached_tokens: int = 256
    replicas: dict = field(default_factory=lambda: {"prefill": 1, "decode": 1})
    kv_store_bytes: int = 1 << 30
    # retrieval (RAG): where its documents live, hybrid BM25 + vector ranking, the ONNX export cache
    rag_data_dir: str = "~/.local/share/tandem/rag"
    rag_hybrid: bool = True
    rag_chunk_tokens: int = 200  # chunk size in the embedder's tokens, and the overlap between chunks
    rag_chunk_overlap: int = 40
    rag_embedder: str = "all-MiniLM-L6-v2"  # an embedder plugin
    rag_embedder_options: dict = field(default_factory=dict)
    onnx_cache_dir: str | None = None  # default ~/.cache/tandem/onnx
    # the gateway: where users connect, and what it admits
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int | None = 8000  # the OpenAI-compatible API, /metrics, /health; null: no HTTP
    api_keys: list = field(default_factory=list)
    api_key_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_inflight: int = 256  # samples (n per prompt) in flight at the gateway beyond which it answers RESOURCE_EXHAUSTED
    http_request_timeout_s: float | None = 600.0  # an HTTP request's deadline (504 after); null: none
    # On SIGTERM / Ctrl-C the gateway refuses new requests and lets those in flight finish for this
    # long, then every service stops. The chart sizes the pod's terminationGracePeriodSeconds from it.
    drain_grace_s: float = 30.0
    max_message_bytes: int = 16 << 20
    migration: MigrationConfig = field(default_factory=MigrationConfig)  # or a mapping of its fields
    # the pipeline's credentials (services.credentials): every internal service requires the token
    # (`tandem serve` makes a random one when none is set); optional mutual TLS between services
    internal_token: str | None = field(default=None, repr=False)  # or internal_token_file, TANDEM_INTERNAL_TOKEN
    internal_token_file: str | None = None
    internal_tls_cert: str | None = None  # PEM: this service's certificate, key, and the CA that signed all
    internal_tls_key: str | None = None
    internal_tls_ca: str | None = None
    internal_tls_server_name: str | None = None  # the name in the services' certificates, if not their IPs
    # Ray
    ray_address: str | None = None
    dashboard: bool = False
    object_store_memory: int | None = None  # bytes; default: Ray's own sizing, capped at 1 GiB
    service_host: str = "127.0.0.1"  # where the internal services listen; 0.0.0.0 on a cluster: each
    # then advertises its node's IP to its peers
    gateway_resources: dict = field(default_factory=dict)  # Ray custom resources the gateway actor
    # asks for, e.g. {tandem_gateway: 1} offered only by the head pod (the chart): it lands there

    def __post_init__(self) -> None:
        self.migration = MigrationConfig.parse(self.migration)
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.disaggregate not in DISAGGREGATE:
            raise ConfigError(f"disaggregate must be one of {DISAGGREGATE}, got {self.disaggregate!r}")
        threshold = self.disaggregate_min_uncached_tokens
        if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 0:
            raise ConfigError(f"disaggregate_min_uncached_tokens must be an integer >= 0, got {threshold!r}")
        if not isinstance(self.replicas, dict):
            raise ConfigError(f"replicas must map roles to counts, got {self.replicas!r}")
        self.replicas = {**{"prefill": 1, "decode": 1}, **self.replicas}
        for role, count in self.replicas.items():
            if role not in ROLES:
                raise ConfigError(f"replicas: unknown role {role!r}; roles are {ROLES}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ConfigError(f"replicas: {role} must be a positive integer, got {count!r}")
        for key in ("grpc_port", "http_port"):
            value = getattr(self, key)
            if value is None and key == "http_port":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
                raise ConfigError(f"{key} must be a port number, got {value!r}")
        for key in ("kv_store_bytes", "kv_cache_memory", "max_inflight", "max_message_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        unknown = set(self.engine) - set(ENGINE_KEYS)
        if unknown:
            raise ConfigError(f"engine: unknown keys {sorted(unknown)}; known: {ENGINE_KEYS}")
        from tandem.errors import InvalidRequestError
        from tandem.speculative import SpeculativeConfig, SpeculativePolicy

        try:
            SpeculativePolicy.of(SpeculativeConfig.parse(self.speculative), self.speculative_methods)
        except InvalidRequestError as exc:
            raise ConfigError(str(exc)) from None
        if self.plugins is not None and not (isinstance(self.plugins, list)
                                             and all(isinstance(p, str) and p for p in self.plugins)):
            raise ConfigError(f"plugins must be a list of plugin names, got {self.plugins!r}")
        if not (isinstance(self.drain_grace_s, (int, float)) and not isinstance(self.drain_grace_s, bool)
                and 0 <= self.drain_grace_s <= 3600):
            raise ConfigError(f"drain_grace_s must be a number of seconds in [0, 3600], got {self.drain_grace_s!r}")
        timeout = self.http_request_timeout_s
        if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                        and timeout > 0):
            raise ConfigError(f"http_request_timeout_s must be a positive number of seconds or null, got {timeout!r}")
        amounts = self.gateway_resources.values() if isinstance(self.gateway_resources, dict) else [None]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in amounts):
            raise ConfigError(f"gateway_resources must map Ray resource names to positive amounts, "
                              f"got {self.gateway_resources!r}")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")  # resolved per worker
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        internal_tls = (self.internal_tls_cert, self.internal_tls_key, self.internal_tls_ca)
        if any(internal_tls) and not all(internal_tls):
            raise ConfigError("mutual TLS between services needs internal_tls_cert, internal_tls_key and internal_tls_ca")
        if self.internal_token is not None:
            _check_token(self.internal_token, "internal_token")

    # -- sources ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, **overrides) -> PipelineConfig:
        """Defaults, then the YAML file, then overrides whose value is not None."""
        values: dict = {}
        if path is not None:
            import yaml

            try:
                values = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read config file {path}: {exc}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path} must hold a mapping of settings")
        values.update({k: v for k, v in overrides.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known: {sorted(names)}")
        return cls(**values)

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
        return dict(model=self.model, dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
                    num_threads=self.num_threads, progress=False, quantization=self.quantization,
                    quantization_options=self.quantization_options or None, attention=self.attention,
                    attention_options=self.attention_options or None, attention_backend=self.attention_backend,
                    kv_cache_dtype=self.kv_cache_dtype, kv_cache_memory=self.kv_cache_memory,
                    speculative=self.speculative, speculative_methods=self.speculative_methods,
                    plugins=self.plugins, **self.engine)

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
