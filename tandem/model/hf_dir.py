"""Reading HF-format model directories: config.json + *.safetensors (+ tokenizer.json).

Handles both the transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) spellings.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tandem.config import ModelConfig, RopeScaling
from tandem.errors import ModelLoadError

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama"}


def _rope(cfg: dict) -> tuple[float, RopeScaling]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, RopeScaling()
    optional = {key: params[key] for key in ("beta_fast", "beta_slow", "attention_factor",
                                            "low_freq_factor", "high_freq_factor") if params.get(key) is not None}
    return theta, RopeScaling(
        kind=kind, factor=float(params.get("factor", 1.0)),
        original_max_position=params.get("original_max_position_embeddings")
        or cfg.get("original_max_position_embeddings"),
        **optional,
    )


class HFDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.raw_config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{self.path}: cannot read config.json ({exc})") from exc
        self.weight_files = sorted(self.path.glob("*.safetensors"))
        if not self.weight_files:
            raise ModelLoadError(f"{self.path}: no *.safetensors files")
        hf_arch = (self.raw_config.get("architectures") or ["?"])[0]
        if hf_arch not in HF_ARCHITECTURES:
            raise ModelLoadError(f"{self.path}: unsupported architecture {hf_arch!r}; "
                                 f"supported: {', '.join(HF_ARCHITECTURES)}")
        self.architecture = HF_ARCHITECTURES[hf_arch]

    def config(self) -> ModelConfig:
        cfg = self.raw_config
        theta, scaling = _rope(cfg)
        try:
            return ModelConfig(
                architecture=self.architecture,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=cfg["num_attention_heads"],
                num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                head_dim=cfg.get("head_dim") or 0,
                max_position=cfg["max_position_embeddings"],
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=theta,
                rope_scaling=scaling,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                sliding_window=(cfg.get("sliding_window") or None) if cfg.get("use_sliding_window", True) else None,
                name=self.path.name,
            )
        except KeyError as exc:
            raise ModelLoadError(f"{self.path}/config.json lacks {exc}") from exc

    def tensor_types(self) -> dict[str, int]:
        return {"safetensors": len(self.weight_files)}

    def num_tensor_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def iter_state_dict(self, config: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for file in self.weight_files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        if not name.endswith("rotary_emb.inv_freq"):
                            yield name, f.get_tensor(name).to(dtype)
            except Exception as exc:
                raise ModelLoadError(f"{file}: cannot read safetensors ({exc})") from exc

    def rope_freq_divisors(self) -> torch.Tensor | None:
        return None
