"""Many LoRA adapters on one base model at once (Hu et al. 2021, LoRA; Punica and S-LoRA for serving
many): each adapted projection W gets a low-rank update, y = W x + s * B (A x), s = alpha / r
(alpha / sqrt(r) with rsLoRA), and each token of a batch picks its own adapter, or none.

- `load_peft_adapter(path, config, max_rank)` reads PEFT's format (adapter_config.json and
  adapter_model.safetensors) for the projections q, k, v, o, gate, up and down, checks every
  shape against the base model and the rank against the limit, and names what is wrong.
- `attach_lora(model, max_loras, max_rank)` wraps every projection of the (fused) model in a
  `LoRAProjection` that holds `max_loras` slots of stacked, zero-padded A and B. A fused projection
  (qkv, gate_up) stacks its parts' A (parts x R rows) and places each part's B on its own output
  rows (block-diagonal), so one gathered matmul pair serves the fused weight.
- `LoRASlots` puts adapters in slots, least recently used out, and `set_token_slots` tells every
  projection which slot each token of the next forward uses (-1: the bare base).
- `bgmv(x, A, B, slots, scaling)` is the gathered low-rank matmul (Punica's BGMV shape): the
  tokens grouped by slot, one (x A^T) B^T pair per adapter present, never a loop over tokens;
  tandem.kernels has its Triton kernel for GPU workers with this as the reference.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.errors import ConfigError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# which fused module of tandem's model each PEFT projection lives in, and its part
FUSED = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1), "v_proj": ("self_attn.qkv_proj", 2),
         "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
         "down_proj": ("mlp.down_proj", 0)}


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each adaptable projection."""
    d, hd, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, i),
            "up_proj": (d, i), "down_proj": (i, d)}


@dataclass
class LoRAAdapter:
    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, projection) -> (A (r, in), B (out, r))

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def load_peft_adapter(name: str, path: str | Path, config: ModelConfig, max_rank: int) -> LoRAAdapter:
    """A PEFT LoRA adapter directory, checked against the base model; ConfigError says what is wrong."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise ConfigError(f"LoRA adapter {name!r}: {needed} is missing (PEFT's format: adapter_config.json and "
                              "adapter_model.safetensors)")
    try:
        spec = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"LoRA adapter {name!r}: cannot read {config_file}: {exc}") from None
    rank, alpha = spec.get("r"), spec.get("lora_alpha", spec.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA adapter {name!r}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ConfigError(f"LoRA adapter {name!r}: rank {rank} exceeds max_lora_rank {max_rank}")
    if spec.get("use_dora"):
        raise ConfigError(f"LoRA adapter {name!r}: DoRA adapters are not supported")
    scaling = alpha / math.sqrt(rank) if spec.get("use_rslora") else alpha / rank
    shapes = projection_shapes(config)
    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        parts = key.split(".")
        try:
            layer = int(parts[parts.index("layers") + 1])
            projection = next(p for p in parts if p in PROJECTIONS)
            which = next(p for p in parts if p in ("lora_A", "lora_B"))
        except (ValueError, StopIteration):
            raise ConfigError(f"LoRA adapter {name!r}: unexpected tensor {key} (adapters on q, k, v, o, gate, up "
                              "and down projections only)") from None
        if not 0 <= layer < config.num_layers:
            raise ConfigError(f"LoRA adapter {name!r}: {key} names layer {layer}; the base model has "
                              f"{config.num_layers}")
        weights.setdefault((layer, projection), {})[which] = tensor.float()
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, projection), pair in weights.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConfigError(f"LoRA adapter {name!r}: layer {layer} {projection} lacks lora_A or lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        fan_in, fan_out = shapes[projection]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise ConfigError(f"LoRA adapter {name!r}: layer {layer} {projection} has A {tuple(a.shape)} and B "
                              f"{tuple(b.shape)}; this base model needs A ({rank}, {fan_in}) and B ({fan_out}, {rank})")
        out[(layer, projection)] = (a, b)
    if not out:
        raise ConfigError(f"LoRA adapter {name!r}: no LoRA weights in {weights_file}")
    return LoRAAdapter(name, rank, float(scaling), out)


def slot_groups(slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, its tokens' rows) for every adapter slot present (slot -1, the bare base, left out)."""
    return [(slot, (slots == slot).nonzero().squeeze(1)) for slot in slots.unique().tolist() if slot >= 0]


def bgmv(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor,
         scaling: torch.Tensor, groups: list[tuple[int, torch.Tensor]] | None = None) -> torch.Tensor:
    """sum over each token's slot s (slots[n] >= 0) of scaling[s] * (x[n] A[s]^T) B[s]^T, zeros for
    slot -1. x (N, in), a (S, R, in), b (S, out, R), slots (N,) int64, scaling (S,) -> (N, out) in
    x's dtype. One matmul pair per slot present, the tokens gathered by slot (`groups`: the
    slot_groups of slots, computed once a forward by the caller)."""
    out = x.new_zeros(x.shape[0], b.shape[1])
    for slot, rows in slot_groups(slots) if groups is None else groups:
        low = x[rows].to(a.dtype) @ a[slot].T
        out[rows] = ((low @ b[slot].T) * scaling[slot]).to(x.dtype)
    return out


class LoRAProjection(nn.Module):
    """A base projection plus `slots` adapter slots: forward(x) = base(x) + bgmv over the tokens'
    slots (LoRAContext.slots, set for each forward)."""

    def __init__(self, base: nn.Module, fan_in: int, part_outs: list[int], slots: int, max_rank: int,
                 context: LoRAContext):
        super().__init__()
        self.base, self.part_outs, self.max_rank, self.context = base, part_outs, max_rank, context
        parts = len(part_outs)
        self.register_buffer("lora_a", torch.zeros(slots, parts * max_rank, fan_in), persistent=False)
        self.register_buffer("lora_b", torch.zeros(slots, sum(part_outs), parts * max_rank), persistent=False)
        self.impl = bgmv

    def set_slot(self, slot: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter's (A, B) for some of this projection's parts into a slot (others zero)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        start = 0
        for part, width in enumerate(self.part_outs):
            if part in parts:
                a, b = parts[part]
                rank = a.shape[0]
                rows = slice(part * self.max_rank, part * self.max_rank + rank)
                self.lora_a[slot, rows] = a.to(self.lora_a.dtype)
                self.lora_b[slot, start:start + width, rows] = b.to(self.lora_b.dtype)
            start += width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        context = self.context
        if context.slots is None:
            return out
        flat = x.reshape(-1, x.shape[-1])
        delta = self.impl(flat, self.lora_a, self.lora_b, context.slots.to(flat.device), context.scaling,
                          context.groups)
        return out + delta.view(*out.shape[:-1], -1).to(out.dtype)


class LoRAContext:
    """What every LoRAProjection of a model reads: each token's slot for the current forward (None
    or all -1: the bare base) and each slot's scaling."""

    def __init__(self, slots: int):
        self.slots: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []
        self.scaling = torch.zeros(slots)

    def set_slots(self, slots: torch.Tensor | None) -> None:
        """The next forward's per-token slots (None, or none >= 0: the bare base), grouped once
        for every projection of the forward."""
        groups = [] if slots is None else slot_groups(slots)
        self.slots, self.groups = (slots, groups) if groups else (None, [])


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> LoRAContext:
    """Wrap every adaptable projection of a loaded, fused model in a LoRAProjection, in place."""
    c = model.config
    shapes = projection_shapes(c)
    context = LoRAContext(max_loras)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(mlp, "gate_up_proj") or attn.qkv_proj is None:
            raise ConfigError("LoRA adapters need a dense model with fused projections (not an MoE model)")
        attn.qkv_proj = LoRAProjection(attn.qkv_proj, c.hidden_size, [shapes[p][1] for p in ("q_proj", "k_proj",
                                                                                                "v_proj")],
                                       max_loras, max_rank, context)
        attn.o_proj = LoRAProjection(attn.o_proj, shapes["o_proj"][0], [c.hidden_size], max_loras, max_rank, context)
        mlp.gate_up_proj = LoRAProjection(mlp.gate_up_proj, c.hidden_size, [c.intermediate_size] * 2, max_loras,
                                          max_rank, context)
        mlp.down_proj = LoRAProjection(mlp.down_proj, c.intermediate_size, [c.hidden_size], max_loras, max_rank,
                                       context)
    return context


class LoRASlots:
    """Adapters in the model's slots, least recently used out (a slot in use by a running request
    is never taken: `acquire` raises when every slot is busy)."""

    def __init__(self, model: nn.Module, context: LoRAContext, max_loras: int):
        self.model, self.context, self.max_loras = model, context, max_loras
        self.slot_of: OrderedDict[str, int] = OrderedDict()
        self.users: dict[str, int] = {}

    def acquire(self, adapter: LoRAAdapter) -> int:
        """The adapter's slot, written into the model if it was not there."""
        if adapter.name in self.slot_of:
            self.slot_of.move_to_end(adapter.name)
        else:
            taken = set(self.slot_of.values())
            free = [s for s in range(self.max_loras) if s not in taken]
            if not free:
                idle = next((n for n in self.slot_of if not self.users.get(n)), None)
                if idle is None:
                    raise RuntimeError(f"all {self.max_loras} LoRA slots are in use by running requests")
                free = [self.slot_of.pop(idle)]
            self._write(free[0], adapter)
            self.slot_of[adapter.name] = free[0]
        self.users[adapter.name] = self.users.get(adapter.name, 0) + 1
        return self.slot_of[adapter.name]

    def release(self, name: str) -> None:
        self.users[name] = max(0, self.users.get(name, 0) - 1)

    def forget(self, name: str) -> None:
        """Drop an adapter's slot (it was unloaded); its rows are zeroed."""
        slot = self.slot_of.pop(name, None)
        if slot is not None:
            self._write(slot, None)

    def _write(self, slot: int, adapter: LoRAAdapter | None) -> None:
        by_module: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        if adapter is not None:
            for (layer, projection), pair in adapter.weights.items():
                module, part = FUSED[projection]
                by_module.setdefault((layer, module), {})[part] = pair
        for index, layer in enumerate(self.model.model.layers):
            for module in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                layer.get_submodule(module).set_slot(slot, by_module.get((index, module), {}))
        self.context.scaling[slot] = 0.0 if adapter is None else adapter.scaling


class LoRARegistry:
    """The adapters an engine may run, by name, and their slots: what `tandem.LLM(lora_modules=...)`
    builds and the engine asks when a request names an adapter."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int):
        if not (isinstance(max_loras, int) and max_loras >= 1):
            raise ConfigError(f"max_loras must be a positive integer, got {max_loras!r}")
        if not (isinstance(max_rank, int) and max_rank >= 1):
            raise ConfigError(f"max_lora_rank must be a positive integer, got {max_rank!r}")
        self.config, self.max_rank = model.config, max_rank
        self.context = attach_lora(model, max_loras, max_rank)
        model.lora_context = self.context
        self.slots = LoRASlots(model, self.context, max_loras)
        self.adapters: dict[str, LoRAAdapter] = {}

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load an adapter (checked first: a bad one changes nothing)."""
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ConfigError(f"a LoRA adapter's name must be 1-128 characters, got {name!r}")
        if name in self.adapters:
            raise ConfigError(f"a LoRA adapter named {name!r} is loaded already")
        adapter = load_peft_adapter(name, path, self.config, self.max_rank)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise ConfigError(f"no LoRA adapter named {name!r} is loaded")
        if self.slots.users.get(name):
            raise ConfigError(f"LoRA adapter {name!r} is in use by running requests")
        del self.adapters[name]
        self.slots.forget(name)

    def acquire(self, name: str) -> int:
        from tandem.errors import InvalidRequestError, QueueFullError

        adapter = self.adapters.get(name)
        if adapter is None:
            raise InvalidRequestError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        try:
            return self.slots.acquire(adapter)
        except RuntimeError as exc:  # every slot busy: retry later
            raise QueueFullError(str(exc)) from None

    def release(self, name: str) -> None:
        self.slots.release(name)
