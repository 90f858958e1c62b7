"""tandem.plugins.testing: the compatibility suite a plugin author runs in their own tests.

Each `check_*` function exercises one component against the contract tandem relies on: shapes,
dtypes, batch behaviour (a row's result does not depend on its batch mates), determinism, input
left unmodified, and agreement with tandem's reference implementations. A broken contract raises
`ContractError` (an AssertionError, so pytest reports it as a failure) saying what was expected.

    from tandem.plugins.testing import check_plugin

    def test_my_plugin_honours_the_contract():
        check_plugin("my_plugin")          # every component the entry point registers

Components are built with their class attribute `example_options` (constructor options) and
processors turned on with `example_args` (per-request keyword arguments); both default to {}.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tandem.draft import DraftProposer
from tandem.model.attention import AttentionBackend, AttentionMask, AttentionVariant, fresh_causal_mask, mask_problem
from tandem.model.kv_pool import KVCacheFormat
from tandem.model.lora import AdapterFormat, LoRAAdapter, check_adapter
from tandem.model.quantization import Quantizer
from tandem.plugins.manager import PluginManager, get_plugin_manager
from tandem.sampling import LogitsProcessor, SamplerPipeline, SamplingBatch, make_generator
from tandem.sampling_params import SamplingParams


class ContractError(AssertionError):
    """A plugin component broke tandem's plugin contract."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContractError(message)


def _instance(component, base: type):
    if isinstance(component, type):
        _require(issubclass(component, base), f"{component!r} is not a subclass of {base.__name__}")
        return component(**getattr(component, "example_options", {}))
    _require(isinstance(component, base), f"{component!r} is not a {base.__name__}")
    return component


# -- logits processors --------------------------------------------------------------------------

def check_logits_processor(component, args: dict | None = None, vocab_size: int = 97, batch_size: int = 4,
                           seed: int = 0) -> None:
    """Rows with the processor off are untouched; rows with it on give the same result alone as in
    a batch; (B, V) fp32 in and out; input not modified; deterministic; never NaN, never all -inf;
    the pipeline samples through it."""
    proc = _instance(component, LogitsProcessor)
    name = proc.name
    _require(isinstance(name, str) and bool(name), "a logits processor needs a non-empty `name`")
    _require(isinstance(proc.order, int), f"{name}: `order` must be an int")
    args = dict(getattr(type(proc), "example_args", {}) if args is None else args)
    params = SamplingParams(temperature=0.8, seed=seed, logits_processors={name: args})
    row_arg = proc.parse(params, vocab_size)
    _require(row_arg is not None, f"{name}: parse() returned None for a request that turned it on")

    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch_size, vocab_size, generator=gen) * 3
    histories = [torch.randint(0, vocab_size, (5 + row,), generator=gen).tolist() for row in range(batch_size)]
    column = [row_arg if row % 2 == 0 else None for row in range(batch_size)]  # on, off, on, off

    def run(rows: list[int], column_rows: list) -> torch.Tensor:
        batch = SamplingBatch([params] * len(rows), [histories[r] for r in rows], [3] * len(rows),
                              [make_generator(seed + r) for r in rows])
        source = logits[rows].clone()
        out = proc(source, column_rows, batch)
        _require(torch.equal(source, logits[rows]), f"{name}: modified its input logits in place")
        return out

    out = run(list(range(batch_size)), column)
    _require(isinstance(out, torch.Tensor) and out.shape == logits.shape,
             f"{name}: returned {getattr(out, 'shape', type(out))}, expected {tuple(logits.shape)}")
    _require(out.dtype == torch.float32, f"{name}: returned {out.dtype}, expected torch.float32")
    _require(not torch.isnan(out).any(), f"{name}: produced NaN")
    for row in range(batch_size):
        if column[row] is None:
            _require(torch.equal(out[row], logits[row]), f"{name}: changed row {row}, whose request did not use it")
        else:
            _require(torch.isfinite(out[row]).any(), f"{name}: excluded every token of row {row}")
            alone = run([row], [row_arg])[0]
            same_excluded = torch.equal(torch.isfinite(alone), torch.isfinite(out[row]))
            _require(same_excluded and torch.allclose(alone[torch.isfinite(alone)], out[row][torch.isfinite(out[row])],
                                                      atol=1e-5),
                     f"{name}: row {row} differs when computed alone vs in a batch")
    again = run(list(range(batch_size)), column)
    _require(torch.equal(again, out), f"{name}: not deterministic for the same input and seeds")

    pipeline = SamplerPipeline([proc], vocab_size, {name: "under test"})
    batch = SamplingBatch([params] * 2, [histories[0]] * 2, [3, 3], [make_generator(seed), make_generator(seed)])
    result = pipeline.sample(logits[:1].expand(2, -1), batch, [pipeline.prepare(params)] * 2)
    _require(not result.failures, f"{name}: failed inside the pipeline: {result.failures}")
    _require(result.tokens[0] == result.tokens[1], f"{name}: the same seed drew different tokens")


# -- attention ------------------------------------------------------------------------------------

def _random_qkv(num_q: int, num_k: int, heads: int, kv_heads: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_q, heads, dim, generator=gen)
    k = torch.randn(num_k, kv_heads, dim, generator=gen)
    v = torch.randn(num_k, kv_heads, dim, generator=gen)
    return q, k, v


def check_attention_variant(component, num_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 16,
                            length: int = 40, atol: float = 1e-4) -> None:
    """The mask is causal and lets every query see itself; the bias is finite fp32 (H, T, S);
    `retention` never frees a key a later query may see; SDPA and the naive reference agree on it
    for a fresh prompt, a chunk over a cache, and batched decode (each row as if alone)."""
    from tandem.plugins.attention import NaiveBackend

    variant = _instance(component, AttentionVariant)
    name = variant.name
    pos = torch.arange(length)
    allowed = variant.allowed(pos.view(-1, 1), pos.view(1, -1))
    _require(allowed.dtype == torch.bool and allowed.shape == (length, length),
             f"{name}: allowed() must return a bool tensor broadcast to (T, S), got {allowed.dtype} {tuple(allowed.shape)}")
    problem = mask_problem(variant, pos)
    _require(problem is None, f"{name}: the mask {problem}")
    bias = variant.bias(pos.view(-1, 1), pos.view(1, -1), num_heads)
    if bias is not None:
        _require(bias.shape == (num_heads, length, length) and bias.dtype == torch.float32,
                 f"{name}: bias() must be fp32 (H, T, S), got {bias.dtype} {tuple(bias.shape)}")
        _require(bool(torch.isfinite(bias).all()), f"{name}: bias() has non-finite values")
    retention = variant.retention()
    if retention is not None:
        for query in range(length):
            kept = (pos < retention.num_sink) | (pos >= retention.first_live_position(query))
            later = variant.allowed(torch.arange(query, length).view(-1, 1), pos.view(1, -1)).any(0)
            _require(not bool((later & ~kept).any()),
                     f"{name}: retention() frees keys that a query at position >= {query} can still see")
    check_attention_backend(AttentionBackend(), variant, num_heads, num_kv_heads, head_dim, length, atol,
                            reference=NaiveBackend())


def check_attention_backend(component, variant: AttentionVariant | None = None, num_heads: int = 4,
                            num_kv_heads: int = 2, head_dim: int = 16, length: int = 40, atol: float = 1e-4,
                            reference: AttentionBackend | None = None) -> None:
    """prefill and decode agree with the naive reference for `variant` (default: causal), with
    grouped-query heads, a cached prefix, and a decode batch of different lengths."""
    from tandem.plugins.attention import NaiveBackend

    backend = _instance(component, AttentionBackend)
    reference = reference or NaiveBackend()
    variant = variant or AttentionVariant()
    label = f"backend {backend.name!r} with variant {variant.name!r}"
    q, k, v = _random_qkv(length, length, num_heads, num_kv_heads, head_dim, seed=1)
    mask = fresh_causal_mask(variant, length, num_heads)
    _close(backend.prefill(q, k, v, mask), reference.prefill(q, k, v, mask), atol, f"{label}: fresh prefill")
    cached = length // 2
    pos = torch.arange(length)
    chunk_mask = AttentionMask.build(variant, pos[cached:], pos, num_heads)
    chunk = backend.prefill(q[cached:], k, v, chunk_mask)
    _require(chunk.shape == (length - cached, num_heads, head_dim), f"{label}: prefill returned {tuple(chunk.shape)}")
    _close(chunk, reference.prefill(q[cached:], k, v, chunk_mask), atol, f"{label}: prefill over a cache")
    _close(chunk, backend.prefill(q, k, v, mask)[cached:], atol, f"{label}: chunked prefill vs whole prefill")

    lengths = [length, length // 2, 3]
    qs = torch.stack([q[n - 1] for n in lengths])  # (B, H, D)
    keys = torch.zeros(len(lengths), length, num_kv_heads, head_dim)
    values = torch.zeros_like(keys)
    for i, n in enumerate(lengths):
        keys[i, :n], values[i, :n] = k[:n], v[:n]
    valid = pos.unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    decode_mask = AttentionMask.build(variant, (torch.tensor(lengths) - 1).unsqueeze(1), pos.expand(len(lengths), -1),
                                      num_heads, valid)
    out = backend.decode(qs, keys, values, decode_mask)
    _require(out.shape == qs.shape, f"{label}: decode returned {tuple(out.shape)}, expected {tuple(qs.shape)}")
    for i, n in enumerate(lengths):
        alone = backend.prefill(q[:n], k[:n], v[:n], fresh_causal_mask(variant, n, num_heads))[-1]
        _close(out[i], alone, atol, f"{label}: decode row {i} vs the same query in a prefill")


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    error = (actual.float() - expected.float()).abs().max().item()
    _require(error <= atol, f"{what}: max |difference| {error:.2e} > {atol:.0e}")


# -- quantizers -------------------------------------------------------------------------------

def check_quantizer(component, max_relative_error: float = 0.1, shape: tuple[int, int] = (96, 256),
                    seed: int = 0) -> None:
    """quantize(weight (N, K)) gives a module mapping (..., K) -> (..., N) in the input's dtype,
    close to x @ weight.T (relative Frobenius error), deterministic, batch-independent, and no
    larger than the fp32 weight."""
    quantizer = _instance(component, Quantizer)
    name = quantizer.name
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(*shape, generator=gen) * 0.05
    quantizer.check("test.weight", weight)
    module = quantizer.quantize(weight.clone())
    x = torch.randn(2, 5, shape[1], generator=gen)
    with torch.inference_mode():
        out = module(x)
        _require(out.shape == (2, 5, shape[0]), f"{name}: output shape {tuple(out.shape)}, expected (2, 5, {shape[0]})")
        _require(out.dtype == x.dtype, f"{name}: output dtype {out.dtype} for {x.dtype} input")
        expected = x @ weight.T
        error = ((out - expected).norm() / expected.norm()).item()
        _require(error <= max_relative_error, f"{name}: relative error {error:.3f} > {max_relative_error}")
        _require(torch.equal(module(x), out), f"{name}: not deterministic")
        _require(torch.equal(quantizer.quantize(weight.clone())(x), out), f"{name}: quantizing twice differs")
        row = module(x[1, 3:4])
        _close(row[0], out[1, 3], 1e-2 * expected.abs().max().item(), f"{name}: a row alone vs in a batch")
        out_bf16 = module(x.bfloat16())
        _require(out_bf16.dtype == torch.bfloat16, f"{name}: output dtype {out_bf16.dtype} for bfloat16 input")
    stored = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    _require(stored <= weight.numel() * 4, f"{name}: stores {stored} bytes, more than the fp32 weight")


def check_kv_cache_format(component, num_kv_heads: int = 2, head_dim: int = 16, block_size: int = 4,
                          max_relative_error: float = 0.05) -> None:
    """Writes then gathers round-trip within the error bound; copy_blocks copies; state_tensors
    (what the KV-cache store moves between workers) are indexed by block; the byte count per token
    is positive."""
    fmt = _instance(component, KVCacheFormat)
    pool = fmt.create_pool(6, block_size, num_kv_heads, head_dim, torch.float32)
    x = torch.randn(block_size * 2, num_kv_heads, head_dim)
    pool.write(torch.arange(block_size, block_size * 3), x)  # blocks 1 and 2
    back = pool.gather(torch.tensor([[1, 2]])).flatten(1, 2)[0].float()
    error = ((back - x).norm() / x.norm()).item()
    _require(error <= max_relative_error, f"{fmt.name}: round-trip relative error {error:.3f}")
    pool.copy_blocks(torch.tensor([1]), torch.tensor([4]))
    _require(torch.equal(pool.gather(torch.tensor([4])), pool.gather(torch.tensor([1]))),
             f"{fmt.name}: copy_blocks did not copy")
    states = pool.state_tensors()
    _require(bool(states) and all(isinstance(t, torch.Tensor) and t.shape[0] == 6 for t in states),
             f"{fmt.name}: state_tensors() must return tensors indexed by block id in dim 0")
    _require(fmt.bytes_per_token(2, num_kv_heads, head_dim, torch.float32) > 0, f"{fmt.name}: bytes_per_token <= 0")


def check_draft_proposer(component, seed: int = 0) -> None:
    """propose() returns at most num_tokens ints, deterministically, and nothing for num_tokens=0."""
    proposer = _instance(component, DraftProposer)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50, (64,), generator=gen).tolist() * 2
    for num in (0, 1, 4):
        out = proposer.propose(tokens, num)
        _require(isinstance(out, list) and all(isinstance(t, int) for t in out) and len(out) <= num,
                 f"{proposer.name}: propose(..., {num}) returned {out!r}")
        _require(proposer.propose(tokens, num) == out, f"{proposer.name}: not deterministic")


def check_adapter_format(component, adapter_path: str | Path | None = None, config=None, max_rank: int = 64) -> None:
    """detect() answers a bool, without raising, for a missing path and an empty directory; given an
    adapter of the format (adapter_path) and its base model's ModelConfig, detect claims it and
    load returns a LoRAAdapter of that name that fits the model (tandem.model.lora.check_adapter)."""
    fmt = _instance(component, AdapterFormat)
    with tempfile.TemporaryDirectory() as empty:
        for path in (Path(empty), Path(empty) / "missing"):
            answer = fmt.detect(path)
            _require(isinstance(answer, bool), f"{fmt.name}: detect({path}) returned {answer!r}, not a bool")
    if adapter_path is not None:
        path = Path(adapter_path)
        _require(fmt.detect(path), f"{fmt.name}: detect does not claim {path}")
        adapter = fmt.load("checked", path, config, max_rank)
        _require(isinstance(adapter, LoRAAdapter) and adapter.name == "checked",
                 f"{fmt.name}: load returned {adapter!r}, not the LoRAAdapter named 'checked'")
        check_adapter(adapter, config, max_rank)


CHECKS = {
    "logits_processor": check_logits_processor,
    "attention_variant": check_attention_variant,
    "attention_backend": check_attention_backend,
    "quantizer": check_quantizer,
    "kv_cache_format": check_kv_cache_format,
    "draft_proposer": check_draft_proposer,
    "adapter_format": check_adapter_format,
}


def check_plugin(plugin_name: str, manager: PluginManager | None = None) -> list[tuple[str, str]]:
    """Check every component a loaded plugin registered; returns the (category, name) pairs checked."""
    manager = manager or get_plugin_manager()
    info = manager.plugins.get(plugin_name)
    _require(info is not None, f"no plugin named {plugin_name!r}; loaded: {sorted(manager.plugins)}")
    _require(info.loaded, f"plugin {plugin_name!r} did not load: {info.error}")
    _require(bool(info.components), f"plugin {plugin_name!r} registered no components")
    for category, name in info.components:
        CHECKS[category](manager.get(category, name))
    return list(info.components)

