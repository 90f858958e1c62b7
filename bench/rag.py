"""RAG retrieval benchmark: the SQuAD v2.0 dev paragraphs in tandem/data/squad_corpus.json (each
one document) in a fresh temporary store, queried with the answerable questions of
squad_dev_questions.jsonl. A question is a hit at rank r when a chunk of its gold paragraph is
among the first r retrieved. Recall@1, recall@k, MRR (over the first k) and per-query latency
(p50/p99, after warm-up; embedding the query included) for exact and HNSW search, with and
without BM25 hybrid fusion.

    .venv/bin/python bench/rag.py [--k 5] [--cache-dir DIR] [--json bench/rag.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tandem.data import SQUAD_CORPUS, SQUAD_QUESTIONS
from tandem.rag import Document, MiniLMEmbedder, RagStore, evaluation


def load_corpus() -> tuple[list[Document], list[dict]]:
    return evaluation.load_corpus(SQUAD_CORPUS), evaluation.load_questions(SQUAD_QUESTIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--cache-dir", default=None, help="ONNX export cache (default ~/.cache/tandem/onnx)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    docs, questions = load_corpus()
    embedder = MiniLMEmbedder(cache_dir=args.cache_dir)
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        for exact in (True, False):
            with RagStore(data_dir, embedder, exact=exact) as store:
                if exact:
                    start = time.perf_counter()
                    num_docs, num_chunks = store.ingest(docs)
                    ingest_s = time.perf_counter() - start
                for hybrid in (False, True):
                    rows.append({"index": "flat" if exact else "hnsw", "hybrid": hybrid,
                                 **evaluation.evaluate(store, questions, args.k, hybrid)})
    print(f"{num_docs} documents, {num_chunks} chunks ingested in {ingest_s:.1f} s; "
          f"{len(questions)} answerable questions, k={args.k}")
    cols = list(rows[0])
    print(" | ".join(f"{c:>9}" for c in cols))
    for row in rows:
        print(" | ".join(f"{v:>9.3f}" if isinstance(v, float) else f"{str(v):>9}" for v in row.values()))
    if args.json:
        args.json.write_text(json.dumps({"num_documents": num_docs, "num_chunks": num_chunks, "ingest_s": ingest_s,
                                         "num_questions": len(questions), "k": args.k, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
