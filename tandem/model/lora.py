"""Many LoRA adapters on one base model at once (Hu et al. 2021, LoRA; Punica and S-LoRA for serving
many): each adapted projection W gets a low-rank update, y = W x + s * B (A x), s = alpha / r
(alpha / sqrt(r) with rsLoRA), and each token of a batch picks its own adapter, or none.

- `load_peft_adapter(path, config, max_rank)` reads PEFT's format (adapter_config.json and
  adapter_model.safetensors) for the projections q, k, v, o, gate, up and down; `PEFTFormat` is
  its `AdapterFormat`, the built-in of the `tandem_adapter_formats` plugins (others read other
  formats). `check_adapter` checks whatever a format loads: every shape against the base model
  and the rank against the limit, naming what is wrong. An adapter's KV is keyed by its
  `cache_key` (name and a digest of its files).
- `attach_lora(model, max_loras, max_rank)` wraps every projection of the (fused) model in a
  `LoRAProjection` that holds `max_loras` slots of stacked, zero-padded A and B^T. A fused
  projection (qkv, gate_up) stacks its parts' A (parts x R rows) and keeps B^T per part: B^T's
  columns are the fused output's, each multiplying its own part's R columns of x A^T (no zero
  blocks of a block-diagonal B stored or multiplied; the slots cost the adapters' own size, half
  of it where the base is kept in GGML blocks: `slot_dtype`).
- `LoRASlots` puts adapters in slots, least recently used out (the engine keeps a request waiting
  while every slot is held by running ones), and `LoRAContext.set_slots` tells every projection
  which slot each token of the next forward uses (-1: the bare base), grouping the tokens by slot
  once for the whole forward. `LoRARegistry` holds the loaded adapters by name, for tandem.LLM.
- `lora_delta(x, A, B^T, parts, scaling, groups)` is the projections' low-rank update in torch,
  one x A^T and one matmul per part for each adapter present, never a loop over tokens: the
  eager layers run it, and it is the reference of the CPU extension's `lora_add`, which the fused
  C++ layer runs (tandem.kernels.cpu; tandem/model/llama.py's `_fused_layers`).
- `bgmv(x, A, B, slots, scaling)` is the gathered low-rank matmul of one part (Punica's BGMV
  shape); tandem.kernels.lora_bgmv has its Triton kernel for GPU workers with this as the
  reference, and `lora_delta_triton` (lora_delta's contract, one launch a part), which tandem.LLM
  installs as a CUDA model's `LoRAContext.kernel`.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tandem.config import ModelConfig
from tandem.errors import ConfigError, ModelNotFoundError, PluginError

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
    digest: str = ""  # of its files' bytes: the same name loaded again with other weights is another adapter

    @property
    def cache_key(self) -> str:
        """What its requests' KV is keyed by (the prefix cache's chain root, hence the KV-cache
        store's keys): its name and its weights, so two adapters, or two versions of one name,
        never share KV."""
        return f"{self.name}@{self.digest}"

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


class AdapterFormat:
    """Base class of adapter-format plugins (hook `tandem_adapter_formats`): reads one on-disk
    format of LoRA adapters into a LoRAAdapter. tandem checks what `load` returns against the base
    model (check_adapter) whatever the format, and keys the adapter's KV by its `digest`."""

    name: str = "adapter_format"
    api_version: int = 1  # the tandem.plugins.API_VERSION it was written for

    def detect(self, path: Path) -> bool:
        """Whether the directory (or file) at path is in this format (cheap: look, do not load)."""
        raise NotImplementedError

    def load(self, name: str, path: Path, config: ModelConfig, max_rank: int) -> LoRAAdapter:
        """The adapter at path for a base model of `config`; ConfigError naming what is wrong.
        weights: {(layer, projection): (A (r, in), B (out, r))}, projection one of PROJECTIONS;
        digest: a hash of everything that makes its outputs (its files' bytes)."""
        raise NotImplementedError


def check_adapter(adapter: LoRAAdapter, config: ModelConfig, max_rank: int) -> LoRAAdapter:
    """An adapter's rank, layers and every A and B shape against the base model and the slots'
    rank; ConfigError naming the first fault. Whatever format it came from."""
    name, rank = adapter.name, adapter.rank
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"LoRA adapter {name!r}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ConfigError(f"LoRA adapter {name!r}: rank {rank} exceeds max_lora_rank {max_rank}")
    if not adapter.weights:
        raise ConfigError(f"LoRA adapter {name!r}: no LoRA weights")
    if not adapter.digest:
        raise ConfigError(f"LoRA adapter {name!r}: no digest (its KV would be shared with another's)")
    shapes = projection_shapes(config)
    for (layer, projection), (a, b) in adapter.weights.items():
        if projection not in shapes:
            raise ConfigError(f"LoRA adapter {name!r}: {projection} is not an adaptable projection ({PROJECTIONS})")
        if not 0 <= layer < config.num_layers:
            raise ConfigError(f"LoRA adapter {name!r}: layer {layer} {projection}; the base model has "
                              f"{config.num_layers} layers")
        fan_in, fan_out = shapes[projection]
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise ConfigError(f"LoRA adapter {name!r}: layer {layer} {projection} has A {tuple(a.shape)} and B "
                              f"{tuple(b.shape)}; this base model needs A ({rank}, {fan_in}) and B ({fan_out}, {rank})")
    return adapter


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
    if rank > max_rank:  # before reading the weights
        raise ConfigError(f"LoRA adapter {name!r}: rank {rank} exceeds max_lora_rank {max_rank}")
    if spec.get("use_dora"):
        raise ConfigError(f"LoRA adapter {name!r}: DoRA adapters are not supported")
    scaling = alpha / math.sqrt(rank) if spec.get("use_rslora") else alpha / rank
    weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(str(weights_file))
    except Exception as exc:  # safetensors' own error for a truncated or corrupt file
        raise ConfigError(f"LoRA adapter {name!r}: cannot read {weights_file}: {exc}") from None
    for key, tensor in tensors.items():
        parts = key.split(".")
        try:
            layer = int(parts[parts.index("layers") + 1])
            projection = next(p for p in parts if p in PROJECTIONS)
            which = next(p for p in parts if p in ("lora_A", "lora_B"))
        except (ValueError, StopIteration):
            raise ConfigError(f"LoRA adapter {name!r}: unexpected tensor {key} (adapters on q, k, v, o, gate, up "
                              "and down projections only)") from None
        weights.setdefault((layer, projection), {})[which] = tensor.float()
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, projection), pair in weights.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConfigError(f"LoRA adapter {name!r}: layer {layer} {projection} lacks lora_A or lora_B")
        out[(layer, projection)] = (pair["lora_A"], pair["lora_B"])
    if not out:
        raise ConfigError(f"LoRA adapter {name!r}: no LoRA weights in {weights_file}")
    digest = hashlib.blake2b(config_file.read_bytes(), digest_size=16)
    with open(weights_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return check_adapter(LoRAAdapter(name, rank, float(scaling), out, digest.hexdigest()), config, max_rank)


class PEFTFormat(AdapterFormat):
    """PEFT's format (adapter_config.json + adapter_model.safetensors): the built-in, and the one
    tried last, so it names what a directory no format claims lacks."""

    name = "peft"

    def detect(self, path: Path) -> bool:
        return (path / "adapter_config.json").is_file()

    def load(self, name: str, path: Path, config: ModelConfig, max_rank: int) -> LoRAAdapter:
        return load_peft_adapter(name, path, config, max_rank)


def group_by_slot(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, runs): the rows of the tokens with an adapter (slot >= 0), sorted by slot (stable),
    and for each slot present (slot, begin, end) into order. order (M,), runs (G, 3), int64."""
    adapted = (slots >= 0).nonzero().squeeze(1)
    order = adapted[torch.argsort(slots[adapted], stable=True)]
    present, counts = torch.unique_consecutive(slots[order], return_counts=True)
    ends = counts.cumsum(0)
    return order, torch.stack([present, ends - counts, ends], 1).long()


def slot_groups(slots: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(slot, its tokens' rows) for every adapter slot present (slot -1, the bare base, left out)."""
    order, runs = group_by_slot(slots)
    return [(slot, order[begin:end]) for slot, begin, end in runs.tolist()]


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


def lora_delta(x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, part_outs: list[int], scaling: torch.Tensor,
               groups: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The low-rank update of a (fused) projection: for each token n of each group (slot s, rows),
    scaling[s] * (x[n] A[s]^T)[p R:(p + 1) R] B^T[s][:, part p's columns] for each part p, zeros
    for tokens in no group. x (N, in), a (S, P R, in), bt (S, R, out), part_outs: the parts'
    widths (sum: out) -> (N, out) in x's dtype."""
    out = x.new_zeros(x.shape[0], bt.shape[2])
    rank, dtype = bt.shape[1], torch.promote_types(a.dtype, torch.float32)  # fp16 slots compute in fp32
    for slot, rows in groups:
        low = x[rows].to(dtype) @ a[slot].to(dtype).T  # (n, P R)
        parts, start = [], 0
        for part, width in enumerate(part_outs):
            parts.append(low[:, part * rank:(part + 1) * rank] @ bt[slot, :, start:start + width].to(dtype))
            start += width
        out[rows] = ((parts[0] if len(parts) == 1 else torch.cat(parts, 1)) * scaling[slot]).to(x.dtype)
    return out


class LoRAProjection(nn.Module):
    """A base projection plus `slots` adapter slots: forward(x) = base(x) + lora_delta over the
    tokens' slots (LoRAContext, set for each forward). lora_a (slots, parts x R, in) stacks the
    parts' A; lora_bt (slots, R, out) holds each part's B^T on that part's output columns; both in
    `dtype` (slot_dtype)."""

    def __init__(self, base: nn.Module, fan_in: int, part_outs: list[int], slots: int, max_rank: int,
                 context: LoRAContext, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base, self.part_outs, self.max_rank, self.context = base, part_outs, max_rank, context
        parts = len(part_outs)
        self.register_buffer("lora_a", torch.zeros(slots, parts * max_rank, fan_in, dtype=dtype), persistent=False)
        self.register_buffer("lora_bt", torch.zeros(slots, max_rank, sum(part_outs), dtype=dtype), persistent=False)

    def set_slot(self, slot: int, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter's (A, B) for some of this projection's parts into a slot (others zero)."""
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        start = 0
        for part, width in enumerate(self.part_outs):
            if part in parts:
                a, b = parts[part]
                rank = a.shape[0]
                self.lora_a[slot, part * self.max_rank:part * self.max_rank + rank] = a.to(self.lora_a.dtype)
                self.lora_bt[slot, :rank, start:start + width] = b.T.to(self.lora_bt.dtype)
            start += width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        context = self.context
        if context.slots is None:
            return out
        delta = context.delta(x.reshape(-1, x.shape[-1]), self.lora_a, self.lora_bt, self.part_outs)
        return out + delta.view(*out.shape[:-1], -1).to(out.dtype)


class LoRAContext:
    """What every LoRAProjection of a model reads: each token's slot for the current forward (None
    or all -1: the bare base), those tokens grouped by slot, and each slot's scaling."""

    def __init__(self, slots: int):
        self.slots: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []  # (slot, rows): the eager layers' grouping
        self.fused_args: list[torch.Tensor] = []  # [order, runs, scaling]: the fused layer's (group_by_slot)
        self.scaling = torch.zeros(slots)
        # lora_delta's contract on a GPU kernel, kernel(x, a, bt, part_outs, scaling, slots):
        # tandem.LLM installs tandem.kernels.lora_bgmv.lora_delta_triton on a CUDA model
        self.kernel = None
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # (slots, scaling) where the kernel runs

    def delta(self, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, part_outs: list[int]) -> torch.Tensor:
        """A projection's low-rank update for this forward's tokens: the installed kernel, or
        lora_delta (the tokens grouped by slot, one matmul pair per adapter and part)."""
        if self.kernel is not None:
            if self._on_device is None:  # once a forward, not once a projection
                self._on_device = (self.slots.to(x.device), self.scaling.to(x.device))
            return self.kernel(x, a, bt, part_outs, self._on_device[1], self._on_device[0])
        return lora_delta(x, a, bt, part_outs, self.scaling, self.groups)

    def set_slots(self, slots: torch.Tensor | None) -> None:
        """The next forward's per-token slots (None, or none >= 0: the bare base), grouped once
        for every projection of the forward."""
        self.slots, self.groups, self.fused_args, self._on_device = None, [], [], None
        if slots is None:
            return
        order, runs = group_by_slot(slots)
        if len(runs):
            self.slots, self.fused_args = slots, [order, runs, self.scaling]
            self.groups = [(slot, order[begin:end]) for slot, begin, end in runs.tolist()]


def slot_dtype(model: nn.Module) -> torch.dtype:
    """What the slots store: fp16 where every base projection is kept in GGML blocks (a 4-8 bit
    base on the CPU extension, whose fused layer streams the step's adapters from memory: fp16
    halves those bytes, and its rounding, 5e-4 of each weight, is far below the base's own), else
    fp32. The updates are computed in fp32 either way."""
    from tandem.kernels.ggml_cpu import GGMLLinear

    projections = [m for layer in model.model.layers
                   for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                             layer.mlp.down_proj)]
    return torch.float16 if all(isinstance(m, GGMLLinear) for m in projections) else torch.float32


def attach_lora(model: nn.Module, max_loras: int, max_rank: int) -> LoRAContext:
    """Wrap every adaptable projection of a loaded, fused model in a LoRAProjection, in place."""
    c = model.config
    shapes = projection_shapes(c)
    context = LoRAContext(max_loras)
    for layer in model.model.layers:
        if not hasattr(layer.mlp, "gate_up_proj") or layer.self_attn.qkv_proj is None:
            raise ConfigError("LoRA adapters need a dense model with fused projections (not an MoE model)")
    dtype = slot_dtype(model)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        slots = (max_loras, max_rank, context, dtype)
        attn.qkv_proj = LoRAProjection(attn.qkv_proj, c.hidden_size,
                                       [shapes[p][1] for p in ("q_proj", "k_proj", "v_proj")], *slots)
        attn.o_proj = LoRAProjection(attn.o_proj, shapes["o_proj"][0], [c.hidden_size], *slots)
        mlp.gate_up_proj = LoRAProjection(mlp.gate_up_proj, c.hidden_size, [c.intermediate_size] * 2, *slots)
        mlp.down_proj = LoRAProjection(mlp.down_proj, c.intermediate_size, [c.hidden_size], *slots)
    return context


class LoRASlots:
    """Adapters in the model's slots, least recently used out (a slot in use by a running request
    is never taken: `acquire` raises when every slot is busy; the engine then keeps the request
    waiting until one is released)."""

    def __init__(self, model: nn.Module, context: LoRAContext, max_loras: int):
        self.model, self.context, self.max_loras = model, context, max_loras
        self.slot_of: OrderedDict[str, int] = OrderedDict()
        self.users: dict[str, int] = {}
        self.num_loads = 0  # adapters written into a slot (a miss of the slots' LRU)

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
            self.num_loads += 1
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

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, formats: list[AdapterFormat] | None = None):
        """formats: the adapter formats to read (the plugins' AdapterFormats; default: PEFT's),
        asked in order which one a path is in; PEFT's is always asked last."""
        if not (isinstance(max_loras, int) and max_loras >= 1):
            raise ConfigError(f"max_loras must be a positive integer, got {max_loras!r}")
        if not (isinstance(max_rank, int) and max_rank >= 1):
            raise ConfigError(f"max_lora_rank must be a positive integer, got {max_rank!r}")
        self.config, self.max_rank = model.config, max_rank
        self.context = attach_lora(model, max_loras, max_rank)
        model.lora_context = self.context
        self.slots = LoRASlots(model, self.context, max_loras)
        self.adapters: dict[str, LoRAAdapter] = {}
        self.holders: dict[str, int] = {}  # requests (waiting or running) that name each adapter
        formats = [f for f in formats or [] if f.name != PEFTFormat.name]
        self.formats = [*formats, PEFTFormat()]

    def add(self, name: str, path: str | Path) -> LoRAAdapter:
        """Load an adapter (checked first: a bad one changes nothing)."""
        return self.insert(self.read(name, path))

    def read(self, name: str, path: str | Path) -> LoRAAdapter:
        """An adapter read and checked, not yet added (touches no state: any thread may run it)."""
        if not isinstance(name, str) or not name or len(name) > 128:
            raise ConfigError(f"a LoRA adapter's name must be 1-128 characters, got {name!r}")
        if name in self.adapters:
            raise ConfigError(f"a LoRA adapter named {name!r} is loaded already")
        path = Path(path)
        fmt = self.formats[-1]  # PEFT's: it names what a directory no format claims lacks
        try:
            for candidate in self.formats:
                fmt = candidate
                if candidate.detect(path):
                    break
            adapter = fmt.load(name, path, self.config, self.max_rank)
        except ConfigError:
            raise
        except Exception as exc:  # a plugin's bug, not the adapter's fault
            raise PluginError(f"adapter format {fmt.name!r} failed on LoRA adapter {name!r}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(adapter, LoRAAdapter) or adapter.name != name:
            raise ConfigError(f"adapter format {fmt.name!r} returned {type(adapter).__name__} for {name!r}, "
                              "not its LoRAAdapter")
        return check_adapter(adapter, self.config, self.max_rank)

    def insert(self, adapter: LoRAAdapter) -> LoRAAdapter:
        if adapter.name in self.adapters:  # loaded meanwhile
            raise ConfigError(f"a LoRA adapter named {adapter.name!r} is loaded already")
        self.adapters[adapter.name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise ModelNotFoundError(f"no LoRA adapter named {name!r} is loaded")
        if self.slots.users.get(name) or self.holders.get(name):
            raise ConfigError(f"LoRA adapter {name!r} is in use by requests")
        del self.adapters[name]
        self.slots.forget(name)

    def acquire(self, name: str) -> int:
        from tandem.errors import QueueFullError

        adapter = self.adapters.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        try:
            return self.slots.acquire(adapter)
        except RuntimeError as exc:  # every slot busy: retry later
            raise QueueFullError(str(exc)) from None

    def try_acquire(self, name: str) -> int | None:
        """acquire, or None while every slot is held by running requests (the caller waits)."""
        try:
            return self.slots.acquire(self.adapters[name])
        except RuntimeError:
            return None

    def release(self, name: str) -> None:
        """Give back a slot acquire / try_acquire gave."""
        self.slots.release(name)

    def stats(self) -> dict:
        """What a worker's Stats (and /metrics) report of its adapters."""
        return {"lora_adapters_loaded": len(self.adapters), "lora_slots_total": self.slots.max_loras,
                "lora_slots_in_use": sum(1 for n in self.slots.slot_of if self.slots.users.get(n)),
                "lora_slot_loads": self.slots.num_loads}

    def hold(self, name: str) -> str:
        """A request names the adapter: it stays loaded (unload is refused) until unhold; returns
        its cache_key. ModelNotFoundError for an adapter that is not loaded."""
        key = self.cache_key(name)
        self.holders[name] = self.holders.get(name, 0) + 1
        return key

    def unhold(self, name: str) -> None:
        self.holders[name] = max(0, self.holders.get(name, 0) - 1)

    def cache_key(self, name: str) -> str:
        """The loaded adapter's LoRAAdapter.cache_key (ModelNotFoundError: none of that name)."""
        adapter = self.adapters.get(name)
        if adapter is None:
            raise ModelNotFoundError(f"unknown LoRA adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return adapter.cache_key


def write_random_adapter(directory: str | Path, config: ModelConfig, rank: int = 8, seed: int = 0,
                         scale: float = 0.01, projections=PROJECTIONS) -> int:
    """Write a LoRA adapter with random A and B (seeded, normal times `scale`) for a model of
    `config` in PEFT's format: what tests and benchmarks serve when they need an adapter without
    training one. Returns the weights' bytes (fp32)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for projection in projections:
            fan_in, fan_out = projection_shapes(config)[projection]
            module = "self_attn" if FUSED[projection][0].startswith("self_attn") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{module}.{projection}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * scale
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"r": rank, "lora_alpha": 2 * rank, "peft_type": "LORA", "target_modules": list(projections)}))
    return sum(t.numel() * t.element_size() for t in tensors.values())
