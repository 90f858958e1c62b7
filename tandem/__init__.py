"""tandem: an LLM inference serving pipeline.

The public API users import; everything else is internal and may change. The names load on first
use, so `import tandem.sdk` (a client) or a service without a model does not pay for torch.
"""
from __future__ import annotations

import importlib

from tandem.errors import ConfigError, InvalidRequestError, ModelLoadError, PluginError, QueueFullError, TandemError
from tandem.sampling_params import SamplingParams

__version__ = "0.1.0"

_LAZY = {"LLM": "tandem.llm", "RequestOutput": "tandem.outputs", "ScoreOutput": "tandem.outputs"}

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "ScoreOutput",
    "TandemError",
    "InvalidRequestError",
    "ConfigError",
    "ModelLoadError",
    "PluginError",
    "QueueFullError",
    "__version__",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
