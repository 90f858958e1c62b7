"""Load a model by name or path: pick the file reader, build the module on the meta device, fill
it with weights (a progress bar on stderr), and build the tokenizer from the same source.

Either everything loads or a ModelLoadError is raised and nothing is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.errors import ConfigError, ModelLoadError
from tandem.model.gguf_file import GGUFFile
from tandem.model.hf_dir import HFDirectory
from tandem.model.registry import model_class, resolve_model_path
from tandem.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def open_model_source(path: Path) -> GGUFFile | HFDirectory:
    return GGUFFile(path) if path.suffix == ".gguf" else HFDirectory(path)


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    source: GGUFFile | HFDirectory


def _tokenizer_of(source: GGUFFile | HFDirectory, path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(source.metadata) if isinstance(source, GGUFFile) else Tokenizer.from_hf_dir(path)


def load_tokenizer(name: str) -> tuple[Tokenizer, ModelConfig, Path]:
    """The model's tokenizer and config without its weights (the tokenizer service needs no more)."""
    path = resolve_model_path(name)
    source = open_model_source(path)
    return _tokenizer_of(source, path), source.config(), path


def load_model(name: str, dtype: str | torch.dtype = "float32", progress: bool = True) -> LoadedModel:
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(name)
    source = open_model_source(path)
    config = source.config()
    tokenizer = _tokenizer_of(source, path)
    model = build_model(config, source, torch_dtype, progress)
    return LoadedModel(model, config, tokenizer, path, source)


def build_model(config: ModelConfig, source: GGUFFile | HFDirectory, dtype: torch.dtype,
                progress: bool) -> nn.Module:
    from tqdm import tqdm

    cls = model_class(config.architecture)
    with torch.device("meta"):
        model = cls(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state = {}
    num_tensors = len(getattr(source, "tensors", ())) or None
    bar = tqdm(source.iter_state_dict(config, dtype), total=num_tensors, desc=f"loading {config.name}",
               unit="tensor", disable=not progress, leave=False)
    for name, tensor in bar:
        if name not in expected:
            raise ModelLoadError(f"{source.path}: unexpected tensor {name}")
        if tensor.shape != expected[name]:
            raise ModelLoadError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[name])}")
        state[name] = tensor
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing = sorted(set(expected) - {k for k, v in state.items() if v is not None})
    if missing:
        raise ModelLoadError(f"{source.path}: missing tensors {', '.join(missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope(source.rope_freq_divisors())
    model.fuse_projections()
    return model.eval().requires_grad_(False)
