"""RAG prompt assembly (tandem.rag.prompt): the canonical order of sources and the prompt's text,
on retrieval's own messages."""
from __future__ import annotations

from tandem.rag.prompt import RAG_INSTRUCTION, canonical, rag_prompt
from tandem.v1 import retrieval_pb2


def chunk(document_id, position, text, title="", id=None):
    return retrieval_pb2.Chunk(id=id or f"{document_id}#{position}", document_id=document_id, position=position,
                               title=title, text=text)


def test_canonical_orders_by_document_then_position_then_id_whatever_the_ranking():
    ranked = [chunk("paris", 2, "c"), chunk("everest", 7, "b"), chunk("paris", 0, "a"),
              chunk("everest", 7, "d", id="everest#7b")]
    assert [(c.document_id, c.position, c.id) for c in canonical(ranked)] == [
        ("everest", 7, "everest#7"), ("everest", 7, "everest#7b"), ("paris", 0, "paris#0"), ("paris", 2, "paris#2")]
    assert canonical(reversed(ranked)) == canonical(ranked)


def test_prompt_numbers_the_sources_before_the_question():
    sources = [chunk("python", 0, "Guido van Rossum created Python.", title="Python"), chunk("paris", 0, "Paris.")]
    assert rag_prompt("Who created Python?", sources) == (
        f"{RAG_INSTRUCTION}\n\n[1] Python: Guido van Rossum created Python.\n\n[2] Paris.\n\n"
        "Question: Who created Python?")


def test_the_same_sources_give_the_same_prefix_whatever_the_question():
    sources = canonical([chunk("b", 1, "two"), chunk("a", 0, "one")])
    first, second = rag_prompt("first?", sources), rag_prompt("second?", sources)
    prefix = first[:first.index("Question:")]
    assert second.startswith(prefix) and prefix.endswith("[2] two\n\n")
