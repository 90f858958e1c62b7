"""RAG retrieval core: documents are chunked (chunking), embedded (embedding: an embedder plugin,
all-MiniLM-L6-v2 on onnxruntime built in) and kept in a durable SQLite + FAISS store (store);
evaluation measures recall; prompt puts retrieved chunks and a question into one prompt (the
gateway's). The retrieval service and `tandem rag` are built on this package.
Names load on first use (the plugin manager imports the Embedder base without FAISS)."""
from __future__ import annotations

import importlib

_LAZY = {
    "Chunk": "chunking", "ChunkingConfig": "chunking", "Document": "chunking", "chunk_document": "chunking",
    "load_documents": "chunking", "parse_jsonl": "chunking", "parse_markdown": "chunking", "parse_text": "chunking",
    "Embedder": "embedding", "MiniLMEmbedder": "embedding",
    "IndexOutOfDateError": "store", "RagStore": "store", "Retrieved": "store",
    "RAG_INSTRUCTION": "prompt", "canonical": "prompt", "rag_prompt": "prompt",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"tandem.rag.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tandem.rag' has no attribute {name!r}")
