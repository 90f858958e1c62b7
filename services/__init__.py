"""tandem.services: one module per gRPC service (tokenizer, prefill, decode, KV-cache store, draft,
retrieval, gateway), each a thin servicer over the core. Built by the pipeline issue (#6)."""
