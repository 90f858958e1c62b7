"""The RAG store: documents and their chunks in SQLite (the source of truth, chunk embeddings
included), and a FAISS vector index over the chunk embeddings, one per collection, persisted to
one file beside the database. Optional hybrid retrieval fuses BM25 (Robertson & Zaragoza, 2009)
with the vector ranking by reciprocal rank fusion (Cormack et al., SIGIR 2009).

Durability: an ingest or delete returns only after its SQLite transaction commits (WAL,
synchronous=FULL). The index file is written after that (temporary file, fsync, atomic rename)
and records the database version it reflects, so a crash in between leaves a stale index, never a
lost document: on open a missing, stale or unreadable index is rebuilt from SQLite (or, with
`strict=True`, reported with the command that rebuilds it). The whole index file is rewritten on
each change: fine for thousands of chunks; millions would want an append log.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import struct
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from tandem.errors import ConfigError, InvalidRequestError, TandemError
from tandem.rag.chunking import ChunkingConfig, Document, chunk_document, content_hash, make_document
from tandem.rag.embedding import Embedder

log = logging.getLogger(__name__)

DB_NAME = "rag.sqlite3"
INDEX_MAGIC = b"TNDMRAG1"
MAX_K = 100
HNSW_M = 32  # graph degree; with the ef values below, HNSW recall@5 on bench/rag.py equals exact's
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
HYBRID_DEPTH = 50  # candidates each ranking contributes to the fusion
RRF_K = 60  # Cormack et al.'s constant

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY, collection TEXT NOT NULL, doc_id TEXT NOT NULL, title TEXT NOT NULL,
    content_hash TEXT NOT NULL, UNIQUE (collection, doc_id));
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: an id in a stale index names no new chunk
    document INTEGER NOT NULL REFERENCES documents (id), collection TEXT NOT NULL,
    position INTEGER NOT NULL, text TEXT NOT NULL, content_hash TEXT NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks (document);
"""


class IndexOutOfDateError(TandemError):
    """The vector index file does not match the database (strict mode); the message says how to
    rebuild it."""


@dataclass(frozen=True)
class Retrieved:
    chunk_id: int
    document_id: str
    title: str
    text: str
    score: float  # cosine similarity; with hybrid, the fused reciprocal-rank score
    position: int


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _fsync_rename(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


class RagStore:
    """Thread-safe (one lock). `exact` picks IndexFlatIP (exact) over IndexHNSWFlat (approximate);
    each kind has its own index file, so both can be kept for one database."""

    def __init__(self, data_dir: str | Path, embedder: Embedder, exact: bool = False, strict: bool = False,
                 chunking: ChunkingConfig = ChunkingConfig(), faiss_threads: int | None = 1):
        # FAISS's OpenMP threads (a process-wide setting) spin against onnxruntime's for the same
        # cores: one query, one thread measured 5.2 ms p50 per retrieve against 8.0 ms with two
        # threads (bench/rag.py questions, 2-core machine). None leaves FAISS's setting alone.
        if faiss_threads is not None:
            faiss.omp_set_num_threads(faiss_threads)
        self.data_dir, self.embedder, self.exact, self.chunking = Path(data_dir), embedder, exact, chunking
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.index_path = self.data_dir / f"index-{'flat' if exact else 'hnsw'}.faiss"
        self._lock = threading.RLock()
        self._bm25: dict[str, tuple[list[int], object]] = {}
        self._db = sqlite3.connect(self.data_dir / DB_NAME, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._check_embedder()
        self._indexes: dict[str, faiss.Index] = {}
        problem = self._load_index()
        if problem == "missing" and self._num_chunks() == 0:  # a new store: nothing to warn about
            self.rebuild_index()
        elif problem:
            if strict:
                raise IndexOutOfDateError(f"the vector index {self.index_path} is {problem}; rebuild it with: "
                                          f"tandem rag rebuild --data-dir {self.data_dir}")
            log.warning("vector index %s is %s: rebuilding it from %s", self.index_path, problem, DB_NAME)
            self.rebuild_index()

    # -- database ------------------------------------------------------------------------------
    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def _set_meta(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    def _version(self) -> int:
        return int(self._meta("version", "0"))

    def _num_chunks(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def _check_embedder(self) -> None:
        with self._transaction():
            name, dim = self._meta("embedder"), self._meta("dim")
            if name is None:
                self._set_meta("embedder", self.embedder.name)
                self._set_meta("dim", self.embedder.dim)
            elif (name, int(dim)) != (self.embedder.name, self.embedder.dim):
                raise ConfigError(f"{self.data_dir} holds embeddings of {name} ({dim} dims), "
                                  f"not of {self.embedder.name} ({self.embedder.dim} dims)")

    # -- vector index --------------------------------------------------------------------------
    def _new_index(self) -> faiss.Index:
        if self.exact:
            return faiss.IndexIDMap(faiss.IndexFlatIP(self.embedder.dim))
        hnsw = faiss.IndexHNSWFlat(self.embedder.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        return faiss.IndexIDMap(hnsw)

    def _build_index(self, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
        index = self._new_index()
        if len(ids):
            index.add_with_ids(vectors, ids)
        return index

    def _collection_vectors(self, collection: str | None) -> tuple[list[str], np.ndarray, np.ndarray]:
        where, args = ("WHERE collection = ?", (collection,)) if collection is not None else ("", ())
        rows = self._db.execute(f"SELECT collection, id, embedding FROM chunks {where} ORDER BY id", args).fetchall()
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), self.embedder.dim)
        return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64), vectors

    def rebuild_index(self) -> int:
        """Rebuild the vector index from the embeddings in SQLite and save it; returns the number
        of chunks indexed. (What `tandem rag rebuild --data-dir DIR` runs.)"""
        with self._lock:
            collections, ids, vectors = self._collection_vectors(None)
            names = np.array(collections, dtype=object)
            self._indexes = {c: self._build_index(ids[names == c], vectors[names == c]) for c in sorted(set(collections))}
            self._bm25.clear()
            self._save_index()
            return len(ids)

    def _save_index(self) -> None:
        blobs = {c: faiss.serialize_index(index).tobytes() for c, index in self._indexes.items()}
        header = json.dumps({"version": self._version(), "num_chunks": self._num_chunks(), "exact": self.exact,
                             "dim": self.embedder.dim, "collections": {c: len(b) for c, b in blobs.items()}}).encode()
        _fsync_rename(INDEX_MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs.values()), self.index_path)

    def _load_index(self) -> str | None:
        """Load the index file; None if it matches the database, else what is wrong with it."""
        if not self.index_path.exists():
            return "missing"
        try:
            data = self.index_path.read_bytes()
            if data[:8] != INDEX_MAGIC:
                return "corrupt (not an index file)"
            offset = 12 + struct.unpack("<I", data[8:12])[0]
            header = json.loads(data[12:offset])
            indexes = {}
            for collection, nbytes in header["collections"].items():
                blob = np.frombuffer(data[offset:offset + nbytes], dtype=np.uint8)
                indexes[collection] = faiss.deserialize_index(blob)
                offset += nbytes
        except Exception as e:  # any failure to read it means: rebuild it
            return f"corrupt ({type(e).__name__}: {e})"
        expected = {"version": self._version(), "num_chunks": self._num_chunks(), "exact": self.exact,
                    "dim": self.embedder.dim}
        found = {key: header.get(key) for key in expected}
        if found != expected or sum(i.ntotal for i in indexes.values()) != expected["num_chunks"]:
            return f"stale (it records {found}, the database is at {expected})"
        self._indexes = indexes
        return None

    def _update_index(self, collection: str, removed: list[int], added: list[int], vectors: np.ndarray) -> None:
        """Bring a collection's index up to the committed database, then save the index file."""
        if removed and not self.exact:  # HNSW cannot remove: rebuild the graph from SQLite
            _, ids, all_vectors = self._collection_vectors(collection)
            self._indexes[collection] = self._build_index(ids, all_vectors)
        else:
            index = self._indexes.setdefault(collection, self._new_index())
            if removed:
                index.remove_ids(np.array(removed, dtype=np.int64))
            if added:
                index.add_with_ids(vectors, np.array(added, dtype=np.int64))
        if self._indexes[collection].ntotal == 0:
            del self._indexes[collection]
        self._bm25.pop(collection, None)
        self._save_index()

    # -- writes --------------------------------------------------------------------------------
    def ingest(self, documents: list[Document | dict], collection: str = "default") -> tuple[int, int]:
        """Chunk, embed and store documents; a document already in the collection (same id) is
        replaced, chunks and all. Returns (num_docs, num_chunks) once the transaction commits."""
        if not isinstance(collection, str) or not collection:
            raise InvalidRequestError(f"collection must be a non-empty string, got {collection!r}")
        docs = [d if isinstance(d, Document) else make_document(d.get("id"), d.get("title", ""), d.get("text", ""))
                for d in documents]
        if len({d.id for d in docs}) != len(docs):
            raise InvalidRequestError("the same document id appears twice in one ingest")
        if not docs:
            return 0, 0
        chunks = [chunk_document(d, self.embedder.tokenizer, self.chunking) for d in docs]
        flat = [c for cs in chunks for c in cs]
        vectors = self.embedder.embed([c.text for c in flat]) if flat else np.empty((0, self.embedder.dim), np.float32)
        with self._lock:
            with self._transaction() as db:
                _, removed = self._delete_rows(db, [d.id for d in docs], collection)
                new_ids = []
                for doc, doc_chunks in zip(docs, chunks):
                    row = db.execute("INSERT INTO documents (collection, doc_id, title, content_hash) "
                                     "VALUES (?, ?, ?, ?)", (collection, doc.id, doc.title, content_hash(doc.text)))
                    for c in doc_chunks:
                        new_ids.append(db.execute(
                            "INSERT INTO chunks (document, collection, position, text, content_hash, embedding) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (row.lastrowid, collection, c.position, c.text,
                                                          c.content_hash, vectors[len(new_ids)].tobytes())).lastrowid)
                self._set_meta("version", self._version() + 1)
            self._update_index(collection, removed, new_ids, vectors)
        return len(docs), len(flat)

    def delete(self, document_ids: list[str], collection: str = "default") -> int:
        """Delete documents (and their chunks) by id; returns how many there were."""
        with self._lock:
            with self._transaction() as db:
                num_deleted, removed = self._delete_rows(db, list(document_ids), collection)
                if num_deleted:
                    self._set_meta("version", self._version() + 1)
            if num_deleted:
                self._update_index(collection, removed, [], np.empty((0, self.embedder.dim), np.float32))
            return num_deleted

    def _delete_rows(self, db: sqlite3.Connection, document_ids: list[str], collection: str) -> tuple[int, list[int]]:
        """Delete the documents' rows; returns how many there were and the ids of their chunks."""
        num_deleted, removed = 0, []
        for doc_id in document_ids:
            row = db.execute("SELECT id FROM documents WHERE collection = ? AND doc_id = ?", (collection, doc_id)).fetchone()
            if row is None:
                continue
            removed += [r[0] for r in db.execute("SELECT id FROM chunks WHERE document = ?", row)]
            db.execute("DELETE FROM chunks WHERE document = ?", row)
            db.execute("DELETE FROM documents WHERE id = ?", row)
            num_deleted += 1
        return num_deleted, removed

    # -- reads ---------------------------------------------------------------------------------
    def collections(self) -> list[str]:
        with self._lock:
            return sorted(self._indexes)

    def retrieve(self, query: str, k: int = 5, collection: str = "default", hybrid: bool = False) -> list[Retrieved]:
        """The k chunks closest to the query, best first."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidRequestError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        if not isinstance(query, str) or not query.strip():
            raise InvalidRequestError("the query is empty")
        if collection not in self._indexes:
            raise InvalidRequestError(f"unknown collection {collection!r}; known: {self.collections()}")
        qvec = self.embedder.embed([query])  # (1, dim)
        with self._lock:
            index = self._indexes.get(collection)
            if index is None:  # deleted while the query was embedded
                return []
            scores, ids = index.search(qvec, max(k, HYBRID_DEPTH) if hybrid else k)
            ranked = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            if hybrid:
                ranked = self._fuse(ranked, self._bm25_ranking(collection, query))
            return self._rows(ranked[:k])

    def _bm25_ranking(self, collection: str, query: str) -> list[int]:
        from rank_bm25 import BM25Okapi
        if collection not in self._bm25:
            rows = self._db.execute("SELECT id, text FROM chunks WHERE collection = ? ORDER BY id", (collection,)).fetchall()
            self._bm25[collection] = ([r[0] for r in rows], BM25Okapi([_tokens(r[1]) for r in rows]))
        chunk_ids, bm25 = self._bm25[collection]
        scores = bm25.get_scores(_tokens(query))
        top = np.argsort(-scores, kind="stable")[:HYBRID_DEPTH]
        return [chunk_ids[i] for i in top if scores[i] > 0]

    @staticmethod
    def _fuse(vector_ranked: list[tuple[int, float]], bm25_ranked: list[int]) -> list[tuple[int, float]]:
        fused: dict[int, float] = {}
        for ranking in ([i for i, _ in vector_ranked], bm25_ranked):
            for rank, chunk_id in enumerate(ranking):
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        return sorted(fused.items(), key=lambda item: -item[1])

    def _rows(self, ranked: list[tuple[int, float]]) -> list[Retrieved]:
        marks = ",".join("?" * len(ranked))
        rows = {r[0]: r for r in self._db.execute(
            f"SELECT c.id, d.doc_id, d.title, c.text, c.position FROM chunks c JOIN documents d ON c.document = d.id "
            f"WHERE c.id IN ({marks})", [i for i, _ in ranked])}
        return [Retrieved(i, rows[i][1], rows[i][2], rows[i][3], score, rows[i][4]) for i, score in ranked if i in rows]

    def stats(self) -> dict:
        with self._lock:
            per = {c: {"documents": nd, "chunks": 0} for c, nd in self._db.execute(
                "SELECT collection, COUNT(*) FROM documents GROUP BY collection")}
            for c, nc in self._db.execute("SELECT collection, COUNT(*) FROM chunks GROUP BY collection"):
                per[c]["chunks"] = nc
            return {"documents": sum(p["documents"] for p in per.values()), "chunks": self._num_chunks(),
                    "collections": per, "index": "flat" if self.exact else "hnsw",
                    "indexed_vectors": sum(i.ntotal for i in self._indexes.values()),
                    "embedder": self.embedder.name, "dim": self.embedder.dim, "version": self._version()}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> RagStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
