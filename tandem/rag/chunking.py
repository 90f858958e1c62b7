"""Documents and their chunks for RAG retrieval: parsers (plain text, Markdown as text, JSON lines
of {"id", "title", "text"}) and a token-window chunker with overlap, sized in the embedder's own
tokens so every chunk fits its input limit (the fixed-size overlapping chunks of the RAG paper,
Lewis et al. 2020, and LangChain's token splitter).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError, InvalidRequestError


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Chunk:
    document_id: str
    title: str
    position: int  # index of the chunk within its document, from 0
    text: str
    content_hash: str  # blake2b of the text, hex


@dataclass(frozen=True)
class ChunkingConfig:
    """Windows of `chunk_tokens` tokens, each starting `chunk_tokens - overlap` after the last.
    The defaults leave room in MiniLM's 256-token limit for [CLS]/[SEP] and for re-tokenizing
    a sliced chunk to a few more tokens than its window."""

    chunk_tokens: int = 200
    overlap: int = 40

    def __post_init__(self):
        if self.chunk_tokens < 1:
            raise ConfigError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if not 0 <= self.overlap < self.chunk_tokens:
            raise ConfigError(f"overlap must be in [0, chunk_tokens={self.chunk_tokens}), got {self.overlap}")


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


# -- parsers -----------------------------------------------------------------------------------
def decode_text(data: bytes | str, source: str = "document") -> str:
    """Text of a document; InvalidRequestError for binary content (NUL bytes, not UTF-8) or text
    that is empty or only whitespace."""
    if isinstance(data, bytes):
        if b"\x00" in data:
            raise InvalidRequestError(f"{source} looks binary: it contains NUL bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(f"{source} is not UTF-8 text: {e}") from None
    if "\x00" in data:
        raise InvalidRequestError(f"{source} looks binary: it contains NUL characters")
    if not data.strip():
        raise InvalidRequestError(f"{source} is empty or only whitespace")
    return data


def make_document(doc_id: str, title: str, text: bytes | str) -> Document:
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidRequestError(f"a document needs a non-empty string id, got {doc_id!r}")
    return Document(doc_id, title or "", decode_text(text, f"document {doc_id!r}"))


def parse_text(data: bytes | str, doc_id: str, title: str = "") -> Document:
    return make_document(doc_id, title, data)


def parse_markdown(data: bytes | str, doc_id: str, title: str = "") -> Document:
    """Markdown is kept as text; without a title, the first `# ` heading is the title."""
    text = decode_text(data, f"document {doc_id!r}")
    if not title:
        title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "")
    return make_document(doc_id, title, text)


def parse_jsonl(data: bytes | str) -> list[Document]:
    """One {"id", "title", "text"} object a line ("title" optional); blank lines are skipped."""
    docs = []
    for num, line in enumerate(decode_text(data, "JSON lines").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"line {num} is not JSON: {e}") from None
        if not isinstance(obj, dict) or "id" not in obj or "text" not in obj:
            raise InvalidRequestError(f"line {num} needs an object with \"id\" and \"text\"")
        docs.append(make_document(str(obj["id"]), str(obj.get("title", "")), obj["text"]))
    return docs


def load_documents(path: str | Path) -> list[Document]:
    """A file by its suffix: .jsonl -> one document a line; .md/.markdown -> Markdown; else text
    (the file name, without suffix, is the document id)."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        return parse_jsonl(data)
    if path.suffix in (".md", ".markdown"):
        return [parse_markdown(data, path.stem)]
    return [parse_text(data, path.stem, path.stem)]


# -- chunking ----------------------------------------------------------------------------------
def chunk_document(doc: Document, tokenizer, config: ChunkingConfig = ChunkingConfig()) -> list[Chunk]:
    """Token windows of the document. With `encode_with_offsets` on the tokenizer, a chunk is the
    slice of the original text its tokens cover (case and spacing kept); otherwise the decoded
    tokens."""
    text = decode_text(doc.text, f"document {doc.id!r}")
    if hasattr(tokenizer, "encode_with_offsets"):
        ids, offsets = tokenizer.encode_with_offsets(text)
    else:
        ids, offsets = tokenizer.encode(text), None
    if not ids:
        raise InvalidRequestError(f"document {doc.id!r} has no tokens")
    step = config.chunk_tokens - config.overlap
    chunks = []
    for start in range(0, max(len(ids) - config.overlap, 1), step):
        end = min(start + config.chunk_tokens, len(ids))
        piece = text[offsets[start][0]:offsets[end - 1][1]] if offsets else tokenizer.decode(ids[start:end])
        chunks.append(Chunk(doc.id, doc.title, len(chunks), piece, content_hash(piece)))
    return chunks
