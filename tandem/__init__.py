"""tandem: an LLM inference serving pipeline.

The public API users import; everything else is internal and may change.
"""
from tandem.errors import ConfigError, InvalidRequestError, ModelLoadError, PluginError, QueueFullError, TandemError
from tandem.llm import LLM
from tandem.outputs import RequestOutput, ScoreOutput
from tandem.sampling_params import SamplingParams

__version__ = "0.1.0"

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
