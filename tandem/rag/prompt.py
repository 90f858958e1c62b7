"""RAG prompt assembly: retrieved chunks and a question become one prompt, sources first.

The sources go in a canonical order (document, then position), whatever order retrieval ranked
them in, so questions that retrieve the same chunks share a prompt prefix and its KV comes from
the prefix cache (docs/rag.md). Used by the gateway for `rag` requests; a chunk is a retrieval
service's tandem.v1.Chunk, or anything with its id, document_id, position, title and text.
"""
from __future__ import annotations

RAG_INSTRUCTION = ("Answer the question using the sources below. Cite the sources you use by their "
                   "number in square brackets, like [1].")


def canonical(chunks) -> list:
    """The chunks in the order the prompt lists them: by document, then position in it."""
    return sorted(chunks, key=lambda c: (c.document_id, c.position, c.id))


def rag_prompt(question: str, chunks) -> str:
    """The instruction, the chunks numbered [1], [2], ... in the order given (canonical's), then the
    question: the same sources give the same prompt prefix, whatever the question."""
    sources = "\n\n".join(f"[{i}] {c.title}: {c.text}" if c.title else f"[{i}] {c.text}"
                          for i, c in enumerate(chunks, 1))
    return f"{RAG_INSTRUCTION}\n\n{sources}\n\nQuestion: {question}"
