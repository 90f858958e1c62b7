"""Reading GGUF files (llama.cpp's format) through the `gguf` package: metadata -> ModelConfig,
tensors -> dequantized torch tensors under HF parameter names, and the tokenizer's fields.

Any GGML tensor type the `gguf` package can dequantize loads (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q6_K, ...). Projections in Q4_0, Q4_1 or Q8_0 can instead stay in their blocks
(`block_weights`, `GGMLWeight`): the CPU kernel of tandem.kernels.ggml_cpu multiplies them as they
are. llama.cpp's converter permutes Q/K rows for interleaved RoPE; we undo it here (on rows of
values or of blocks alike) so the model runs one RoPE layout whatever the file format.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tandem.config import ModelConfig, MoEConfig, RopeScaling
from tandem.errors import ModelLoadError
from tandem.model.rope import unpermute_qk

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixture of experts (llama.cpp's names): the router, the shared expert and its gate, q/k norms
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Stacked experts (E, I, d) / (E, d, I): gate and up are joined into experts.gate_up_proj
_EXPERT_NAMES = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
# GGUF architectures tandem's decoder serves, and what each implies. llama.cpp permutes the Q/K rows
# of the "norm" RoPE architectures (llama, which Mixtral files use) and not of the NEOX ones.
_NEOX_ARCHITECTURES = ("qwen2moe", "qwen3moe", "olmoe")
_QK_NORM = {"olmoe": "full", "qwen3moe": "head"}
_NORMALIZE_TOP_K = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}  # llama.cpp's norm_w
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Projections the model fuses into one matmul (tandem.model.llama): their weights stay in blocks
# together or not at all (one kernel call needs one block type).
_FUSED_GROUPS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("attn_output",), ("ffn_down",))
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name to tandem's (HF) parameter name; None for tensors we do not load."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


class GGUFFile:
    """An opened GGUF file. Raises ModelLoadError for anything that is not a complete, valid file."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
            self.metadata = {k: f.contents() for k, f in self._reader.fields.items()}
            self.tensors = {t.name: t for t in self._reader.tensors}
        except Exception as exc:  # the reader raises many types on corrupt input
            raise ModelLoadError(f"{self.path}: not a valid GGUF file ({type(exc).__name__}: {exc})") from exc
        self._check_complete()
        self.architecture = self.metadata.get("general.architecture")
        if not self.architecture:
            raise ModelLoadError(f"{self.path}: GGUF metadata has no general.architecture")

    def _check_complete(self) -> None:
        import gguf

        for t in self._reader.tensors:
            block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            expected = int(np.prod(t.shape)) // block * type_size
            if t.data.nbytes != expected:
                raise ModelLoadError(f"{self.path}: tensor {t.name} has {t.data.nbytes} bytes, expected "
                                     f"{expected}: the file is truncated or corrupt")

    def _get(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def config(self) -> ModelConfig:
        heads = self._get("attention.head_count")
        try:
            vocab = self._get("vocab_size") or len(self.metadata["tokenizer.ggml.tokens"])
            return ModelConfig(
                architecture=self.architecture,
                vocab_size=int(vocab),
                hidden_size=int(self._get("embedding_length")),
                intermediate_size=int(self._get("feed_forward_length")),
                num_layers=int(self._get("block_count")),
                num_heads=int(heads),
                num_kv_heads=int(self._get("attention.head_count_kv", heads)),
                head_dim=int(self._get("attention.key_length", 0)),
                max_position=int(self._get("context_length")),
                rms_norm_eps=float(self._get("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(self._get("rope.freq_base", 10000.0)),
                rope_scaling=self._rope_scaling(),
                tie_word_embeddings="output.weight" not in self.tensors,
                attention_bias="blk.0.attn_q.bias" in self.tensors,
                sliding_window=int(self._get("attention.sliding_window", 0) or 0) or None,
                moe=self._moe(),
                qk_norm=_QK_NORM.get(self.architecture, "none"),
                name=str(self.metadata.get("general.name", self.path.stem)),
            )
        except (TypeError, KeyError) as exc:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks a required key ({exc})") from exc

    def _moe(self) -> MoEConfig | None:
        """Sparse layers: those with a router (blk.N.ffn_gate_inp), llama.cpp's expert_* keys."""
        experts = int(self._get("expert_count", 0) or 0)
        if not experts:
            return None
        layers = int(self._get("block_count"))
        sparse = tuple(i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" in self.tensors)
        return MoEConfig(
            num_experts=experts, top_k=int(self._get("expert_used_count")),
            expert_intermediate_size=int(self._get("expert_feed_forward_length") or self._get("feed_forward_length")),
            normalize_top_k=bool(self._get("expert_weights_norm", _NORMALIZE_TOP_K.get(self.architecture, True))),
            shared_expert_intermediate_size=int(self._get("expert_shared_feed_forward_length", 0) or 0),
            sparse_layers=None if len(sparse) == layers else sparse)

    def _rope_scaling(self) -> RopeScaling:
        kind = self._get("rope.scaling.type", "none")
        factor = self._get("rope.scaling.factor", 1.0)
        if kind == "none" or factor in (0.0, 1.0):
            return RopeScaling()
        return RopeScaling(
            kind=kind, factor=float(factor),
            original_max_position=self._get("rope.scaling.original_context_length"),
            beta_fast=float(self._get("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(self._get("rope.scaling.yarn_beta_slow", 1.0)),
        )

    def tensor_types(self) -> Counter:
        return Counter(t.tensor_type.name for t in self.tensors.values())

    def num_tensor_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())

    def load_tensor(self, name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[name]
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=not array.flags.writeable))

    def block_weights(self, config: ModelConfig) -> set[str]:
        """GGUF names of the projection weights that can stay in GGML blocks (Q4_0, Q4_1, Q8_0 as
        they are; K-quants and Q5 re-quantized to Q8_0: ggml_cpu.REQUANTIZED), by fused group:
        a layer's q/k/v (and gate/up) stay
        together when they share a kernel kind, or are all dequantized. The LM head's weight
        (output.weight, or token_embd.weight when tied: the embedding itself is dequantized for
        its lookups) is included on the same terms."""
        from tandem.kernels.ggml_cpu import KINDS

        def kind(gguf_name: str) -> str | None:
            t = self.tensors.get(gguf_name)
            if t is None or len(t.shape) != 2 or int(t.shape[0]) % 32:
                return None
            return KINDS.get(t.tensor_type.name)

        keep = set()
        for layer in range(config.num_layers):
            for group in _FUSED_GROUPS:
                names = [f"blk.{layer}.{part}.weight" for part in group]
                kinds = {kind(n) for n in names}
                if len(kinds) == 1 and None not in kinds:
                    keep.update(names)
        head = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
        if kind(head) is not None:
            keep.add(head)
        return keep

    def block_weight(self, gguf_name: str, config: ModelConfig):
        """The tensor as a GGMLWeight (kept in its blocks), Q/K rows un-permuted."""
        from tandem.kernels.ggml_cpu import GGMLWeight

        t = self.tensors[gguf_name]
        weight = GGMLWeight.from_blocks(t.tensor_type.name, t.data, (int(t.shape[1]), int(t.shape[0])))
        heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}.get(gguf_name.split(".")[-2])
        if heads is not None and self.architecture not in _NEOX_ARCHITECTURES:
            weight = weight.rows(unpermute_qk(torch.arange(weight.shape[0]), heads))
        return weight

    def iter_state_dict(self, config: ModelConfig, dtype: torch.dtype,
                        keep_blocks: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every model weight, Q/K rows un-permuted to the neox layout.
        Tensors named in keep_blocks (see block_weights) come as GGMLWeights instead."""
        experts: dict[str, dict[str, torch.Tensor]] = {}  # layer -> gate/up halves waiting for each other
        permuted = self.architecture not in _NEOX_ARCHITECTURES
        for gguf_name in self.tensors:
            match = _BLOCK_RE.fullmatch(gguf_name)
            if match and match.group(2) in _EXPERT_NAMES:
                layer, part = f"model.layers.{match.group(1)}.mlp.experts", _EXPERT_NAMES[match.group(2)]
                tensor = self.load_tensor(gguf_name).to(dtype)
                if part == "down":
                    yield f"{layer}.down_proj", tensor
                    continue
                halves = experts.setdefault(layer, {})
                halves[part] = tensor
                if len(halves) == 2:
                    yield f"{layer}.gate_up_proj", torch.cat([halves["gate"], halves["up"]], dim=1)
                    del experts[layer]
                continue
            name = hf_name(gguf_name)
            if name is None:
                continue
            if gguf_name in keep_blocks and gguf_name != "token_embd.weight":
                yield name, self.block_weight(gguf_name, config)
                continue
            tensor = self.load_tensor(gguf_name)
            if name.endswith("shared_expert_gate.weight"):
                tensor = tensor.reshape(1, -1)  # llama.cpp keeps it as a vector
            elif permuted and ".q_proj." in name:
                tensor = unpermute_qk(tensor, config.num_heads)
            elif permuted and ".k_proj." in name:
                tensor = unpermute_qk(tensor, config.num_kv_heads)
            yield name, tensor.to(dtype)
        if experts:
            raise ModelLoadError(f"{self.path}: {next(iter(experts))} lacks its ffn_gate_exps or ffn_up_exps")

    def rope_freq_divisors(self) -> torch.Tensor | None:
        return self.load_tensor(ROPE_FREQS) if ROPE_FREQS in self.tensors else None
