"""RAG core: chunking (windows, overlap, hashes, bad documents, parsers), MiniLMEmbedder against
the PyTorch model, and RagStore (round trip, re-ingest, delete, collections, k range, durability
across kill -9, rebuilding a corrupt index or refusing it in strict mode)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tandem.errors import ConfigError, InvalidRequestError
from tandem.rag import (ChunkingConfig, Document, IndexOutOfDateError, MiniLMEmbedder, RagStore, chunk_document,
                        parse_jsonl, parse_markdown, parse_text)


class CharTokenizer:
    """One token a character: window arithmetic checked by hand."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


DOCS = [Document("paris", "Paris", "Paris is the capital of France, home of the Eiffel Tower and the Louvre."),
        Document("python", "Python", "Python is a programming language created by Guido van Rossum in 1991."),
        Document("whale", "Blue whale", "The blue whale is the largest animal known to have ever lived, a marine mammal.")]


# -- chunking ----------------------------------------------------------------------------------
def test_windows_overlap_and_cover_the_text():
    text = "".join(chr(ord("a") + i % 26) for i in range(450))
    chunks = chunk_document(Document("d", "T", text), CharTokenizer(), ChunkingConfig(chunk_tokens=200, overlap=40))
    assert [len(c.text) for c in chunks] == [200, 200, 130]
    assert [c.position for c in chunks] == [0, 1, 2]
    assert chunks[1].text[:40] == chunks[0].text[-40:] and chunks[2].text[:40] == chunks[1].text[-40:]
    assert chunks[0].text + chunks[1].text[40:] + chunks[2].text[40:] == text
    assert all(c.content_hash == hashlib.blake2b(c.text.encode(), digest_size=16).hexdigest() for c in chunks)
    assert {(c.document_id, c.title) for c in chunks} == {("d", "T")}
    short = chunk_document(Document("s", "", "abc"), CharTokenizer())
    assert [c.text for c in short] == ["abc"]


def test_model_tokenizer_chunks_fit_its_limit_and_keep_case(embedder):
    text = " ".join(f"Sentence {i} mentions Zürich and NASA." for i in range(120))
    chunks = chunk_document(Document("d", "", text), embedder.tokenizer)
    assert len(chunks) > 2 and chunks[0].text.startswith("Sentence 0 mentions Zürich")
    assert all(len(embedder.tokenizer.encode(c.text)) <= 200 for c in chunks)
    assert chunks[0].content_hash != chunks[1].content_hash


@pytest.mark.parametrize("text, message", [("", "empty"), ("  \n\t ", "whitespace"), (b"PK\x03\x04\x00\x00", "NUL"),
                                           (b"\xff\xfe\xfa", "UTF-8"), ("a\x00b", "NUL")])
def test_bad_documents_are_rejected(text, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_text(text, "d")


def test_bad_chunking_config():
    with pytest.raises(ConfigError):
        ChunkingConfig(chunk_tokens=10, overlap=10)


def test_parsers():
    assert parse_markdown(b"intro\n# Heading One\nbody", "m").title == "Heading One"
    docs = parse_jsonl('{"id": "a", "title": "A", "text": "alpha"}\n\n{"id": 2, "text": "beta"}\n')
    assert docs == [Document("a", "A", "alpha"), Document("2", "", "beta")]
    with pytest.raises(InvalidRequestError, match="line 1"):
        parse_jsonl('{"title": "no id"}')
    with pytest.raises(InvalidRequestError, match="empty"):
        parse_jsonl('{"id": "a", "text": "  "}')


# -- embedder ----------------------------------------------------------------------------------
def test_onnx_embeddings_match_pytorch(embedder):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tandem.rag.embedding import minilm_model_dir
    sentences = ["What is the capital of France?", "A man is playing a guitar on stage.",
                 "Normandy is a region in France.", "x", " ".join(["long"] * 300)]  # the last is cut at 256
    tok = AutoTokenizer.from_pretrained(minilm_model_dir(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_model_dir(), local_files_only=True).eval()
    enc = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()
    got = embedder.embed(sentences)
    assert got.shape == (5, 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * ref).sum(axis=1).min() >= 0.999


# -- store -------------------------------------------------------------------------------------
@pytest.mark.parametrize("exact", [True, False])
def test_round_trip_reingest_delete(tmp_path, embedder, exact):
    with RagStore(tmp_path, embedder, exact=exact) as store:
        assert store.ingest(DOCS) == (3, 3)
        top = store.retrieve("Who created the Python language?", k=2)
        assert top[0].document_id == "python" and top[0].title == "Python" and top[0].position == 0
        assert top[0].score > top[1].score
        assert store.retrieve("largest mammal in the ocean", k=1, hybrid=True)[0].document_id == "whale"
        store.ingest([Document("python", "Snake", "The python is a large constricting snake found in Africa.")])
        assert store.stats()["chunks"] == 3 and store.stats()["indexed_vectors"] == 3
        hit = store.retrieve("a constricting snake", k=1)[0]
        assert (hit.document_id, hit.title) == ("python", "Snake")
        assert "Guido" not in " ".join(r.text for r in store.retrieve("Guido van Rossum", k=3))
        assert store.delete(["paris", "nope"]) == 1
        assert {r.document_id for r in store.retrieve("capital of France", k=5)} == {"python", "whale"}
        s = store.stats()
        assert (s["documents"], s["chunks"], s["indexed_vectors"]) == (2, 2, 2)


def test_collections_are_isolated_and_k_is_checked(tmp_path, embedder):
    with RagStore(tmp_path, embedder, exact=True) as store:
        store.ingest(DOCS[:1], collection="travel")
        store.ingest(DOCS[1:], collection="default")
        assert [r.document_id for r in store.retrieve("Eiffel Tower", k=5, collection="travel")] == ["paris"]
        assert "paris" not in {r.document_id for r in store.retrieve("Eiffel Tower", k=5)}
        assert store.delete(["paris"], collection="default") == 0
        with pytest.raises(InvalidRequestError, match=r"unknown collection 'music'.*'default', 'travel'"):
            store.retrieve("x", collection="music")
        for k in (0, 101, 2.5):
            with pytest.raises(InvalidRequestError, match="k must be"):
                store.retrieve("x", k=k)
        assert len(store.retrieve("anything", k=100)) == 2
        assert store.stats()["collections"] == {"travel": {"documents": 1, "chunks": 1},
                                                "default": {"documents": 2, "chunks": 2}}



HASH_EMBEDDER = '''
import zlib, numpy as np
from tandem.rag import Embedder
from tandem.rag.embedding import l2_normalize
class HashEmbedder(Embedder):
    name, dim = "hash", 64
    class tokenizer:  # a character a token
        encode = staticmethod(lambda text: [ord(c) for c in text])
        decode = staticmethod(lambda ids: "".join(map(chr, ids)))
    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for w in text.lower().split():
                out[row, zlib.crc32(w.encode()) % self.dim] += 1
        return l2_normalize(out + 1e-3)
'''


def hash_embedder():
    namespace = {}
    exec(HASH_EMBEDDER, namespace)
    return namespace["HashEmbedder"]()


def test_acknowledged_ingests_survive_kill_9(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(HASH_EMBEDDER + textwrap.dedent(f"""
        from tandem.rag import Document, RagStore
        store = RagStore({str(tmp_path / "data")!r}, HashEmbedder(), exact=True)
        for i in range(10_000):
            store.ingest([Document(f"doc-{{i}}", "", f"document number {{i}} word{{i}}")])
            print(f"doc-{{i}}", flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    acked = [proc.stdout.readline().strip() for _ in range(25)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with RagStore(tmp_path / "data", hash_embedder(), exact=True) as store:
        s = store.stats()
        assert s["documents"] >= 25 and s["indexed_vectors"] == s["chunks"]
        found = {r.document_id for r in store.retrieve("document", k=100)}
        assert set(acked) <= found


def test_corrupt_index_is_rebuilt_or_refused_in_strict_mode(tmp_path, caplog):
    with RagStore(tmp_path, hash_embedder(), exact=False) as store:
        store.ingest([Document("a", "", "alpha beta"), Document("b", "", "gamma delta")])
    index_file = tmp_path / "index-hnsw.faiss"
    index_file.write_bytes(index_file.read_bytes()[:50])
    with pytest.raises(IndexOutOfDateError, match=f"tandem rag rebuild --data-dir {tmp_path}"):
        RagStore(tmp_path, hash_embedder(), strict=True)
    with RagStore(tmp_path, hash_embedder()) as store:
        assert "corrupt" in caplog.text and store.stats()["indexed_vectors"] == 2
        assert store.retrieve("gamma delta", k=1)[0].document_id == "b"
    with RagStore(tmp_path, hash_embedder(), strict=True) as store:  # the rebuilt file was saved
        assert store.stats()["indexed_vectors"] == 2


def test_stale_index_is_rebuilt(tmp_path):
    with RagStore(tmp_path, hash_embedder(), exact=True) as store:
        store.ingest([Document("a", "", "alpha beta")])
    old = (tmp_path / "index-flat.faiss").read_bytes()
    with RagStore(tmp_path, hash_embedder(), exact=True) as store:
        store.ingest([Document("b", "", "gamma delta")])
    (tmp_path / "index-flat.faiss").write_bytes(old)  # as if the crash came before the index was saved
    with pytest.raises(IndexOutOfDateError, match="stale"):
        RagStore(tmp_path, hash_embedder(), exact=True, strict=True)
    with RagStore(tmp_path, hash_embedder(), exact=True) as store:
        assert store.retrieve("gamma delta", k=1)[0].document_id == "b"


def test_a_different_embedder_is_refused(tmp_path, embedder):
    RagStore(tmp_path, hash_embedder()).close()
    with pytest.raises(ConfigError, match="hash"):
        RagStore(tmp_path, embedder)


def test_an_embedder_plugin_is_found_by_name(tmp_path):
    from tandem.plugins import PluginManager, hookimpl
    from tandem.rag import Embedder
    from tandem.rag.embedding import create_embedder

    class HashEmbedder(Embedder):
        """Bag of hashed words: enough to tell documents apart, no model."""

        name, dim = "hash", 64
        tokenizer = CharTokenizer()

        def embed(self, texts):
            out = np.zeros((len(texts), self.dim), np.float32)
            for row, text in enumerate(texts):
                for word in text.lower().split():
                    out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1
            return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    class Plugin:
        @hookimpl
        def tandem_embedders(self, api_version):
            return [HashEmbedder]

    plugins = PluginManager()
    plugins.register(Plugin(), "hash-embedder")
    embedder = create_embedder("hash", plugins=plugins)
    assert isinstance(embedder, HashEmbedder) and "all-MiniLM-L6-v2" in plugins.names("embedder")
    with RagStore(tmp_path, embedder, exact=True) as store:
        store.ingest([Document("a", "A", "alpha beta gamma"), Document("b", "B", "delta epsilon")])
        assert store.retrieve("alpha beta", k=1)[0].document_id == "a"
    with pytest.raises(ConfigError, match="available"):
        create_embedder("nope", plugins=plugins)
