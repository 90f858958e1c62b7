"""RAG retrieval core: documents are chunked (chunking), embedded (embedding) and kept in a
durable SQLite + FAISS store (store). The gRPC service and CLI are built on this package."""
from tandem.rag.chunking import (Chunk, ChunkingConfig, Document, chunk_document, load_documents, parse_jsonl,
                                 parse_markdown, parse_text)
from tandem.rag.embedding import Embedder, MiniLMEmbedder
from tandem.rag.store import IndexOutOfDateError, RagStore, Retrieved

__all__ = ["Chunk", "ChunkingConfig", "Document", "Embedder", "IndexOutOfDateError", "MiniLMEmbedder", "RagStore",
           "Retrieved", "chunk_document", "load_documents", "parse_jsonl", "parse_markdown", "parse_text"]
