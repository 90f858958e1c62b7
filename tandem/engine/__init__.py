"""The engine: paged KV cache with prefix sharing, continuous batching, chunked prefill, preemption."""
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine

__all__ = ["EngineConfig", "LLMEngine"]
