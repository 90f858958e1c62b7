"""Real text that ships with tandem: what the tests, the benchmarks and `tandem bench --dataset
shared` read (README.md beside this file says where each file comes from, its licence and how it
was cut). Installed as package data, so a clone or a wheel needs nothing outside itself."""
from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"  # 250,297 characters of plain ASCII
SQUAD_CORPUS = DATA_DIR / "squad_corpus.json"  # {"paragraphs": [{"id", "title", "text"}]}: 173 paragraphs
SQUAD_QUESTIONS = DATA_DIR / "squad_dev_questions.jsonl"  # 626 questions, 293 answerable

__all__ = ["DATA_DIR", "SHAKESPEARE", "SQUAD_CORPUS", "SQUAD_QUESTIONS"]
