"""`tandem model info`: a model's architecture, sizes and the memory it needs, from its file's
metadata (no weights are loaded)."""
from __future__ import annotations

from tandem.model.registry import DEFAULT_MODEL


def add_parsers(sub) -> None:
    model = sub.add_parser("model", help="model commands")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    info = model_sub.add_parser("info", help="architecture, sizes and memory needed (loads no weights)")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    info.add_argument("--dtype", default="float32", help="dtype weights and KV are held in (default: float32)")
    info.add_argument("--tokens", type=int, default=None, help="KV tokens to plan for (default: context length)")
    info.set_defaults(handler=cmd_model_info)


def cmd_model_info(args) -> int:
    from tandem.model.loader import open_model_source, parse_dtype
    from tandem.model.registry import resolve_model_path

    path = resolve_model_path(args.model)
    source = open_model_source(path)
    c = source.config()
    dtype_bytes = parse_dtype(args.dtype).itemsize
    tokens = args.tokens if args.tokens is not None else c.max_position
    if tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {tokens}")
    weights = c.num_params() * dtype_bytes
    kv_per_token = c.kv_bytes_per_token(dtype_bytes)
    rope = c.rope_scaling.kind if c.rope_scaling.kind == "none" else f"{c.rope_scaling.kind} x{c.rope_scaling.factor}"
    rows = [
        ("model", c.name), ("file", str(path)), ("architecture", c.architecture),
        ("stored tensors", ", ".join(f"{k} x{v}" for k, v in sorted(source.tensor_types().items()))),
        ("file weight bytes", f"{source.num_tensor_bytes() / 2**20:.1f} MiB"),
        ("parameters", f"{c.num_params() / 1e6:.1f} M"),
        ("layers", c.num_layers), ("hidden size", c.hidden_size), ("intermediate size", c.intermediate_size),
        ("attention heads", f"{c.num_heads} query, {c.num_kv_heads} key/value, head dim {c.head_dim}"),
        ("vocabulary", c.vocab_size), ("context length", c.max_position),
        ("rope", f"theta {c.rope_theta:g}, scaling {rope}"), ("tied embeddings", c.tie_word_embeddings),
        (f"weights in memory ({args.dtype})", f"{weights / 2**20:.1f} MiB"),
        (f"KV bytes per token ({args.dtype})", f"{kv_per_token} (2 x {c.num_layers} layers x {c.num_kv_heads} "
                                               f"kv heads x {c.head_dim} x {dtype_bytes} B)"),
        (f"memory for {tokens} KV tokens", f"{(weights + kv_per_token * tokens) / 2**20:.1f} MiB "
                                           "(weights + 2*layers*kv_heads*head_dim*tokens*bytes)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
