"""Reading HF-format model directories: config.json + *.safetensors (+ tokenizer.json).

Handles both the transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) spellings.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from tandem.config import ModelConfig, MoEConfig, RopeScaling
from tandem.errors import ModelLoadError

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                    "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}


def _moe(arch: str, cfg: dict) -> MoEConfig | None:
    """The sparse layers of an MoE architecture, from its config.json (transformers' field names)."""
    if arch == "llama":
        return None
    if arch == "mixtral":
        return MoEConfig(num_experts=cfg["num_local_experts"], top_k=cfg["num_experts_per_tok"],
                         expert_intermediate_size=cfg["intermediate_size"], normalize_top_k=True)
    if arch == "olmoe":
        return MoEConfig(num_experts=cfg["num_experts"], top_k=cfg["num_experts_per_tok"],
                         expert_intermediate_size=cfg["intermediate_size"],
                         normalize_top_k=bool(cfg.get("norm_topk_prob", False)))
    # Qwen2-MoE / Qwen3-MoE: every decoder_sparse_step-th layer is sparse, except mlp_only_layers
    step, dense = cfg.get("decoder_sparse_step", 1) or 1, set(cfg.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(cfg["num_hidden_layers"]) if (i + 1) % step == 0 and i not in dense)
    experts = cfg.get("num_experts") or cfg["num_local_experts"]  # transformers 5 writes Qwen3-MoE's as the latter
    return MoEConfig(num_experts=experts, top_k=cfg["num_experts_per_tok"],
                     expert_intermediate_size=cfg["moe_intermediate_size"],
                     normalize_top_k=bool(cfg.get("norm_topk_prob", False)),
                     shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size", 0) or 0,
                     sparse_layers=None if len(sparse) == cfg["num_hidden_layers"] else sparse)


# one tensor per expert in the checkpoint -> (module, which half of gate_up_proj or down_proj)
_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


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
                attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", self.architecture == "qwen2_moe"))),
                sliding_window=(cfg.get("sliding_window") or None) if cfg.get("use_sliding_window", True) else None,
                moe=_moe(self.architecture, cfg),
                qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(self.architecture, "none"),
                clip_qkv=cfg.get("clip_qkv"),
                name=self.path.name,
            )
        except KeyError as exc:
            raise ModelLoadError(f"{self.path}/config.json lacks {exc}") from exc

    def tensor_types(self) -> dict[str, int]:
        return {"safetensors": len(self.weight_files)}

    def num_tensor_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    def iter_state_dict(self, config: ModelConfig, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(tandem name, tensor). MoE checkpoints with one tensor per expert (Mixtral's w1/w2/w3,
        Qwen-MoE's and OLMoE's gate/up/down_proj) come stacked as experts.gate_up_proj (E, 2I, d)
        and experts.down_proj (E, d, I); Mixtral's block_sparse_moe is renamed mlp."""
        experts: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
        num = config.moe.num_experts if config.moe else 0
        for name, tensor in self._tensors(dtype):
            match = _EXPERT.match(name)
            if match is None:
                yield name.replace(".block_sparse_moe.", ".mlp."), tensor
                continue
            layer, expert, part = match.group(1), int(match.group(2)), _EXPERT_PART[match.group(3)]
            if not 0 <= expert < num:
                raise ModelLoadError(f"{self.path}: tensor {name} names expert {expert} of {num}")
            parts = experts.setdefault(layer, {})
            parts[(part, expert)] = tensor
            if len(parts) == 3 * num:  # the layer's experts are complete: stack them
                del experts[layer]
                yield f"{layer}.mlp.experts.gate_up_proj", torch.stack(
                    [torch.cat([parts[("gate", e)], parts[("up", e)]]) for e in range(num)])
                yield f"{layer}.mlp.experts.down_proj", torch.stack([parts[("down", e)] for e in range(num)])
        if experts:
            layer, parts = next(iter(experts.items()))
            raise ModelLoadError(f"{self.path}: {layer} has {len(parts)} of the {3 * num} expert tensors")

    def _tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
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
