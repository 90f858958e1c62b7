"""Retrieval quality on a labelled set: recall@1, recall@k and MRR of the gold document, and the
latency of each retrieval. Used by `tandem rag eval` and bench/rag.py.

Formats (those of tandem/data/squad_*): a corpus JSON {"paragraphs": [{"id", "title", "text"}, ...]}
(or a plain list of those), and questions as JSON lines {"question", "paragraph_id",
"is_impossible"}; questions without an answer (is_impossible) are left out.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tandem.errors import InvalidRequestError
from tandem.rag.chunking import Document

NUM_WARMUP = 20


def load_corpus(path: str | Path) -> list[Document]:
    data = json.loads(Path(path).read_text())
    paragraphs = data["paragraphs"] if isinstance(data, dict) else data
    try:
        return [Document(p["id"], p.get("title", ""), p["text"]) for p in paragraphs]
    except (KeyError, TypeError) as exc:
        raise InvalidRequestError(f"{path}: each paragraph needs id and text ({exc})") from None


def load_questions(path: str | Path) -> list[dict]:
    lines = filter(None, (line.strip() for line in Path(path).read_text().splitlines()))
    questions = [q for q in map(json.loads, lines) if not q.get("is_impossible")]
    for q in questions:
        if "question" not in q or "paragraph_id" not in q:
            raise InvalidRequestError(f"{path}: every question needs question and paragraph_id")
    return questions


def evaluate(store, questions: list[dict], k: int, hybrid: bool, collection: str = "default") -> dict:
    """recall@1, recall@k, MRR (a hit: any retrieved chunk of the gold document) and p50/p99 ms."""
    for q in questions[:NUM_WARMUP]:
        store.retrieve(q["question"], k=k, collection=collection, hybrid=hybrid)
    hits1 = hitsk = rr = 0.0
    latencies = []
    for q in questions:
        start = time.perf_counter()
        results = store.retrieve(q["question"], k=k, collection=collection, hybrid=hybrid)
        latencies.append((time.perf_counter() - start) * 1e3)
        ranks = [r for r, res in enumerate(results, 1) if res.document_id == q["paragraph_id"]]
        if ranks:
            hits1 += ranks[0] == 1
            hitsk += 1
            rr += 1 / ranks[0]
    n = len(questions)
    if n < 2:
        raise InvalidRequestError("evaluation needs at least 2 answerable questions")
    cuts = statistics.quantiles(latencies, n=100)
    return {"questions": n, "recall@1": hits1 / n, f"recall@{k}": hitsk / n, "mrr": rr / n,
            "p50_ms": cuts[49], "p99_ms": cuts[98]}
