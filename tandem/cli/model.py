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
    info.add_argument("--tensor-parallel-size", type=int, default=1, metavar="T",
                      help="ranks each layer is split over (heads, feed-forward columns, vocabulary)")
    info.add_argument("--pipeline-parallel-size", type=int, default=1, metavar="P",
                      help="stages the layers are split into")
    info.add_argument("--expert-parallel-size", type=int, default=1, metavar="E",
                      help="ranks an MoE layer's experts are split over (at most T)")
    info.add_argument("--memory-per-rank", type=float, default=None, metavar="GIB",
                      help="memory a rank has for weights and KV, in GiB: prints how many KV tokens fit")
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
    if c.moe is not None:
        m = c.moe
        rows.insert(8, ("experts", f"{m.num_experts}, {m.top_k} a token, expert intermediate size "
                                   f"{m.expert_intermediate_size}"
                                   + (f", shared expert {m.shared_expert_intermediate_size}"
                                      if m.shared_expert_intermediate_size else "")))
    rows += _rank_rows(args, c, dtype_bytes, tokens)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _rank_rows(args, c, dtype_bytes: int, tokens: int) -> list[tuple[str, object]]:
    """The per-rank plan of a parallel layout (tandem.parallel), when one is asked for."""
    from tandem.parallel import ParallelConfig

    layout = ParallelConfig(args.tensor_parallel_size, args.pipeline_parallel_size, args.expert_parallel_size)
    if layout.world_size == 1 and args.expert_parallel_size == 1 and args.memory_per_rank is None:
        return []
    plan = layout.rank_memory(c, dtype_bytes)
    rows = [("layout", f"tensor {layout.tensor_parallel_size} x pipeline {layout.pipeline_parallel_size} = "
                       f"{layout.world_size} ranks, expert {layout.expert_parallel_size}"),
            ("per rank (busiest stage)", f"{plan['layers']} layers, {plan['query_heads']} query heads, "
                                         f"{plan['kv_heads']} key/value heads"
                                         + (f", {plan['experts']} experts" if plan["experts"] else "")),
            ("weights per rank", f"{plan['weight_bytes'] / 2**20:.1f} MiB"),
            ("KV bytes per token per rank", f"{plan['kv_bytes_per_token']:.0f}"),
            (f"memory per rank for {tokens} KV tokens",
             f"{(plan['weight_bytes'] + plan['kv_bytes_per_token'] * tokens) / 2**20:.1f} MiB")]
    if args.memory_per_rank is not None:
        if args.memory_per_rank <= 0:
            raise ValueError(f"--memory-per-rank must be positive, got {args.memory_per_rank}")
        free = args.memory_per_rank * 2**30 - plan["weight_bytes"]
        fits = int(free // plan["kv_bytes_per_token"]) if free > 0 else 0
        rows.append((f"KV tokens that fit in {args.memory_per_rank:g} GiB a rank",
                     f"{fits}" if free > 0 else "none: the weights alone do not fit"))
    return rows
