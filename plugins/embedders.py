"""Built-in embedder: all-MiniLM-L6-v2 (sentence-transformers), exported to ONNX once and run
in onnxruntime (tandem.rag.embedding.MiniLMEmbedder)."""
from __future__ import annotations

from tandem.plugins import hookimpl
from tandem.rag.embedding import MiniLMEmbedder


@hookimpl
def tandem_embedders(api_version: int):
    return [MiniLMEmbedder]
