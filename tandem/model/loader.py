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


def load_model(name: str, dtype: str | torch.dtype = "float32", progress: bool = True,
               keep_blocks: bool = False) -> LoadedModel:
    """keep_blocks: keep a GGUF file's Q4_0/Q4_1/Q8_0 projections in their blocks, multiplied by
    tandem.kernels.ggml_cpu (the caller checks the kernel is available); the rest is dequantized."""
    torch_dtype = parse_dtype(dtype)
    path = resolve_model_path(name)
    source = open_model_source(path)
    config = source.config()
    tokenizer = _tokenizer_of(source, path)
    model = build_model(config, source, torch_dtype, progress, keep_blocks)
    return LoadedModel(model, config, tokenizer, path, source)


def build_model(config: ModelConfig, source: GGUFFile | HFDirectory, dtype: torch.dtype,
                progress: bool, keep_blocks: bool = False) -> nn.Module:
    from tqdm import tqdm

    cls = model_class(config.architecture)
    with torch.device("meta"):
        model = cls(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state, blocks = {}, {}
    keep = source.block_weights(config) if keep_blocks and isinstance(source, GGUFFile) else set()
    num_tensors = len(getattr(source, "tensors", ())) or None
    tensors = source.iter_state_dict(config, dtype, keep) if keep else source.iter_state_dict(config, dtype)
    bar = tqdm(tensors, total=num_tensors, desc=f"loading {config.name}", unit="tensor", disable=not progress,
               leave=False)
    for name, tensor in bar:
        if name not in expected:
            raise ModelLoadError(f"{source.path}: unexpected tensor {name}")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ModelLoadError(f"{source.path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[name])}")
        if not isinstance(tensor, torch.Tensor):  # a GGMLWeight: its module replaces the Linear below
            blocks[name] = tensor
            tensor = torch.empty(tensor.shape, dtype=dtype, device="meta")
        state[name] = tensor
    if config.tie_word_embeddings and "token_embd.weight" in keep:
        blocks["lm_head.weight"] = source.block_weight("token_embd.weight", config)
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
    if blocks:
        _attach_blocks(model, blocks)
    return model.eval().requires_grad_(False)


# fused module -> the checkpoint's projections it concatenates (tandem.model.llama's fuse())
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
          "self_attn.o_proj": ("self_attn.o_proj",), "mlp.down_proj": ("mlp.down_proj",)}


def _attach_blocks(model: nn.Module, blocks: dict) -> None:
    """Replace each (fused) projection whose weights came as GGMLWeights by a GGMLLinear over them."""
    from tandem.kernels.ggml_cpu import GGMLLinear, GGMLWeight

    targets = [("lm_head", ("lm_head",))] if "lm_head.weight" in blocks else []
    for i in range(len(model.model.layers)):
        targets += [(f"model.layers.{i}.{fused}", tuple(f"model.layers.{i}.{p}" for p in parts))
                    for fused, parts in _FUSED.items() if f"model.layers.{i}.{parts[0]}.weight" in blocks]
    for target, parts in targets:
        weight = GGMLWeight.cat([blocks.pop(f"{p}.weight") for p in parts])
        parent_name, _, attr = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, GGMLLinear(weight, getattr(parent, attr).bias))
    if blocks:
        raise ModelLoadError(f"GGML block weights with no module to hold them: {', '.join(sorted(blocks))}")
    stray = [name for name, p in model.named_parameters() if p.is_meta]
    if stray:
        raise ModelLoadError(f"weights left unloaded: {', '.join(stray[:5])}")
