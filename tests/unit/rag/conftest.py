"""One ONNX export of the MiniLM embedder per test session, shared by the RAG tests."""
from __future__ import annotations

import pytest

from tandem.rag import MiniLMEmbedder


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def embedder(onnx_cache):
    return MiniLMEmbedder(cache_dir=onnx_cache)
