"""`tandem rag`: ingest documents into a retrieval store, query it, evaluate recall on a question
set, rebuild its vector index (tandem.rag; docs/rag.md)."""
from __future__ import annotations

import json


def add_parsers(sub) -> None:
    rag = sub.add_parser("rag", help="retrieval (RAG): ingest documents, query, evaluate, rebuild the index")
    rag_sub = rag.add_subparsers(dest="rag_command", required=True)
    ingest = rag_sub.add_parser("ingest", help="add documents (.txt, .md, .jsonl with id/title/text) to the store")
    ingest.add_argument("paths", nargs="+", help="files; re-ingesting a document id replaces it")
    query = rag_sub.add_parser("query", help="the chunks that best answer a question")
    query.add_argument("question")
    query.add_argument("--k", type=int, default=5, help="chunks to return, 1..100 (default 5)")
    query.add_argument("--json", action="store_true", help="print JSON")
    evaluate = rag_sub.add_parser("eval", help="recall@1, recall@k and MRR of a question set on a fresh store")
    evaluate.add_argument("questions", help="JSON lines: question, paragraph_id, is_impossible")
    evaluate.add_argument("--corpus", required=True, help='JSON: {"paragraphs": [{"id", "title", "text"}, ...]}')
    evaluate.add_argument("--k", type=int, default=5)
    evaluate.add_argument("--json", action="store_true", help="print JSON")
    rebuild = rag_sub.add_parser("rebuild", help="rebuild the vector index from the document store")
    for p_ in (ingest, query, rebuild):
        p_.add_argument("--data-dir", default="~/.local/share/tandem/rag", help="the store (default: %(default)s)")
    for p_ in (ingest, query, evaluate):
        p_.add_argument("--collection", default="default", help="collection name (default: %(default)s)")
    for p_ in (query, evaluate):
        p_.add_argument("--no-hybrid", dest="hybrid", action="store_false", help="vector ranking only (no BM25)")
    for p_ in (ingest, query, evaluate, rebuild):
        p_.add_argument("--onnx-cache-dir", default=None, help="ONNX export cache (default ~/.cache/tandem/onnx)")
        p_.add_argument("--embedder", default=None, help="embedder plugin (default: all-MiniLM-L6-v2)")
        p_.set_defaults(handler=cmd_rag)


def cmd_rag(args) -> int:
    import dataclasses
    import tempfile
    from pathlib import Path

    from tandem.rag import RagStore, evaluation, load_documents
    from tandem.rag.embedding import create_embedder

    embedder = create_embedder(args.embedder, cache_dir=args.onnx_cache_dir)
    if args.rag_command == "eval":
        docs, questions = evaluation.load_corpus(args.corpus), evaluation.load_questions(args.questions)
        with tempfile.TemporaryDirectory() as data_dir, RagStore(data_dir, embedder) as store:
            store.ingest(docs, args.collection)
            result = {"documents": len(docs), "k": args.k, "hybrid": args.hybrid,
                      **evaluation.evaluate(store, questions, args.k, args.hybrid, args.collection)}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"{result['questions']} answerable questions over {len(docs)} documents (k={args.k}, "
                  f"{'hybrid' if args.hybrid else 'vector only'})")
            for key in ("recall@1", f"recall@{args.k}", "mrr"):
                print(f"  {key:<10} {result[key]:.3f}")
            print(f"  latency    p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
        return 0
    with RagStore(Path(args.data_dir).expanduser(), embedder) as store:
        if args.rag_command == "ingest":
            docs = [d for path in args.paths for d in load_documents(path)]
            num_docs, num_chunks = store.ingest(docs, args.collection)
            print(f"ingested {num_docs} documents ({num_chunks} chunks) into {args.collection!r}")
        elif args.rag_command == "query":
            found = store.retrieve(args.question, args.k, args.collection, args.hybrid)
            if args.json:
                print(json.dumps([dataclasses.asdict(r) for r in found], indent=2))
            for rank, r in enumerate(found, 1):
                if not args.json:
                    print(f"[{rank}] {r.document_id}#{r.position} ({r.score:.3f}) {r.title}\n    {r.text[:300]}")
        else:
            print(f"rebuilt the index: {store.rebuild_index()} vectors")
    return 0
