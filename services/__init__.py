"""tandem.services: one module per gRPC service (tokenizer, prefill/decode worker, KV-cache store,
draft, retrieval, gateway), each a thin servicer over the core, and `build` that makes any of them
into a running server: what `tandem service NAME` and the Ray actors of `tandem serve` both call.
"""
from __future__ import annotations

from .common import ServerOptions, ServiceHost
from .config import SERVICES, PipelineConfig


def build(name: str, config: PipelineConfig, port: int = 0, peers: dict | None = None,
          host: str | None = None, resolve=None, any_port_if_taken: bool = False,
          exit_on_fatal: bool = False) -> ServiceHost:
    """A ServiceHost (not started) for service `name` of the pipeline.

    resolve: where a peer that moved (restarted elsewhere) listens now, given the address it was
    first given (services.routing.Resolve). any_port_if_taken: an internal service whose port is
    taken listens on another one (a restarted actor: its peers find it through resolve).
    exit_on_fatal: a worker whose engine loop dies ends its process, for its supervisor to restart.

    peers: where the others listen: {"kvstore": "h:p", "tokenizer": "h:p", "prefill": ["h:p"],
    "decode": ["h:p"]}. Workers need "kvstore" for disaggregated serving; the gateway needs
    "tokenizer" and "decode" (and "prefill" in disaggregated mode). Only the gateway takes API keys
    and TLS; the internal services listen on config.service_host and require the pipeline's
    credentials (config.internal_credentials()), which the gateway and workers present to them."""
    from tandem.errors import ConfigError

    peers = peers or {}
    from tandem.plugins import get_plugin_manager

    get_plugin_manager(config.plugins)  # the allowlist holds before anything in this process loads a plugin
    credentials = config.internal_credentials()
    internal = ServerOptions(host=host or config.service_host, port=port, max_message_bytes=config.max_message_bytes,
                             credentials=credentials or None, grace_s=config.drain_grace_s)
    internal.any_port_if_taken = any_port_if_taken
    if name == "tokenizer":
        from tandem.model.loader import load_tokenizer

        from . import tokenizer

        tok, _, path = load_tokenizer(config.model)
        return ServiceHost([tokenizer.registration(tok, path.stem)], internal)
    if name in ("prefill", "decode", "worker"):
        from . import worker

        role = "both" if name == "worker" else name
        w = worker.Worker.build(_with_draft_service(config, peers.get("draft"), credentials), role,
                                peers.get("kvstore"), resolve, exit_on_fatal)
        return ServiceHost(worker.registrations(w), internal, healthy=w.healthy, on_stop=w.close)
    if name == "kvstore":
        from tandem.kv_store import KVBlockStore

        from . import kvstore

        return ServiceHost([kvstore.registration(KVBlockStore(config.kv_store_bytes))], internal)
    if name == "draft":
        from . import draft

        return ServiceHost([draft.registration()], internal)
    if name == "retrieval":
        from tandem.rag.chunking import ChunkingConfig

        from . import retrieval

        reg = retrieval.registration(config.rag_data_dir, config.rag_hybrid, config.onnx_cache_dir,
                                     config.rag_embedder, config.rag_embedder_options,
                                     ChunkingConfig(config.rag_chunk_tokens, config.rag_chunk_overlap))
        return ServiceHost([reg], internal, on_stop=reg.servicer.close)
    if name == "gateway":
        from . import gateway

        for key in ("tokenizer", "decode"):
            if not peers.get(key):
                raise ConfigError(f"the gateway needs the address of the {key} service")
        public = ServerOptions(host=host or config.host, port=port, max_message_bytes=config.max_message_bytes,
                               api_keys=config.resolved_api_keys(), tls_cert=config.tls_cert, tls_key=config.tls_key,
                               grace_s=config.drain_grace_s)
        holder = {}

        def registrations():
            holder["servicer"] = gateway.GatewayServicer(
                peers["tokenizer"], list(peers["decode"]),
                list(peers.get("prefill") or []) if config.mode == "disaggregated" else [],
                config.max_inflight, config.max_message_bytes, peers.get("retrieval"), peers.get("kvstore"),
                peers.get("draft"), migration=config.migration, resolve=resolve,
                credentials=credentials or None, salt_per_key=bool(public.api_keys),
                disaggregate=config.disaggregate,
                disaggregate_min_uncached_tokens=config.disaggregate_min_uncached_tokens,
                model_aliases=(config.model,))
            return [gateway.registration(holder["servicer"])]

        frontend = None
        if config.http_port is not None:
            from .http import HttpFrontend, HttpOptions, create_app

            options = HttpOptions(host=public.host, port=config.http_port, api_keys=public.api_keys,
                                  max_body_bytes=config.max_message_bytes, served_model_name=config.model,
                                  tls_cert=config.tls_cert, tls_key=config.tls_key,
                                  request_timeout_s=config.http_request_timeout_s, grace_s=config.drain_grace_s)
            frontend = HttpFrontend(lambda: create_app(holder["servicer"], options), options)
        healthy = lambda: "servicer" in holder and holder["servicer"].healthy()  # noqa: E731
        def drain():  # new requests get UNAVAILABLE (HTTP 503, /health 503) while in-flight ones finish
            if "servicer" in holder:
                holder["servicer"].draining = True

        service = ServiceHost(registrations, public, healthy=healthy, on_start=frontend and frontend.start,
                              on_stop=frontend and frontend.stop, on_drain=drain)
        service.http = frontend
        return service
    raise ConfigError(f"unknown service {name!r}; services are {SERVICES}")


def _with_draft_service(config: PipelineConfig, draft: str | None, credentials) -> PipelineConfig:
    """speculative {method: remote} without a target means this pipeline's draft service, reached
    with the pipeline's credentials; a draft model there defaults to the pipeline's model."""
    import dataclasses

    spec = config.speculative
    if not spec or spec.get("method") != "remote" or (spec.get("options") or {}).get("target"):
        return config
    from tandem.errors import ConfigError

    if not draft:
        raise ConfigError("speculative method 'remote' needs the draft service's address")
    options = {**(spec.get("options") or {}), "target": draft}
    if credentials:
        options["credentials"] = credentials
    if options.get("method") == "draft_model":
        options["options"] = {"model": config.model, **(options.get("options") or {})}
    return dataclasses.replace(config, speculative={**spec, "options": options})


__all__ = ["build", "PipelineConfig", "ServerOptions", "ServiceHost", "SERVICES"]
