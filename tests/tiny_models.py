"""Builders of tiny random Llama models for unit tests: an HF directory written by transformers
itself (the independent reference), and a GGUF file converted from it the way llama.cpp's
converter does (Q/K rows permuted for interleaved RoPE, tokenizer in tokenizer.ggml.* fields)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tandem.data import SHAKESPEARE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
                 " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")

TINY_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.2)


def train_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE (SmolLM2's pre-tokenizer) trained on a little Shakespeare; specials at ids 0-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = SHAKESPEARE.read_text()[:50_000]
    tok.train_from_iterator(text.splitlines(), trainer)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    return tok


def write_tiny_tokenizer(directory: Path, vocab_size: int) -> None:
    tok = train_tiny_tokenizer(vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "chat_template": CHAT_TEMPLATE}))


def write_tiny_hf_dir(directory: Path, config: dict, rope_scaling: dict | None = None, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    write_tiny_tokenizer(directory, config["vocab_size"])
    torch.manual_seed(seed)
    hf_config = LlamaConfig(**config, rope_scaling=rope_scaling, eos_token_id=2, bos_token_id=None)
    LlamaForCausalLM(hf_config).save_pretrained(str(directory), safe_serialization=True)
    return directory


# Tiny sparse-MoE models of each routing family, built with transformers' own classes: 4 experts,
# 2 a token; Qwen2-MoE with a gated shared expert and its second layer dense (mlp_only_layers).
_MOE_COMMON = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, num_experts_per_tok=2, eos_token_id=2, bos_token_id=None)
MOE_ARCHITECTURES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=96, num_local_experts=4)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=128, num_experts=4, moe_intermediate_size=48, norm_topk_prob=False,
                       shared_expert_intermediate_size=80, decoder_sparse_step=1, mlp_only_layers=[1],
                       use_sliding_window=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=128, num_experts=4, moe_intermediate_size=48, norm_topk_prob=True,
                       head_dim=24, use_sliding_window=False)),  # head_dim apart from hidden / heads, as Qwen3 has
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=4, norm_topk_prob=False)),
}


def write_tiny_moe_dir(directory: Path, arch: str, per_expert_tensors: bool = False, seed: int = 0):
    """A tiny random MoE model of `arch` saved as an HF directory; returns (directory, the
    transformers model). per_expert_tensors: the checkpoint keeps one tensor per expert (as the
    published Mixtral, Qwen-MoE and OLMoE checkpoints do) instead of transformers 5's stacked
    experts.gate_up_proj / down_proj."""
    import torch
    import transformers
    from safetensors.torch import save_file

    config_class, model_class, extra = MOE_ARCHITECTURES[arch]
    write_tiny_tokenizer(directory, _MOE_COMMON["vocab_size"])
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**_MOE_COMMON, **extra)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # every weight random and away from its init (norms near 1, routers spread)
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.2 * torch.randn_like(param))
    model.save_pretrained(str(directory), safe_serialization=True)
    if per_expert_tensors:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        split = {}
        for name, tensor in state.items():
            if name.endswith("experts.gate_up_proj"):
                prefix = name[:-len("gate_up_proj")]
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    split[f"{prefix}{e}.gate_proj.weight"], split[f"{prefix}{e}.up_proj.weight"] = gate[e], up[e]
            elif name.endswith("experts.down_proj"):
                for e in range(tensor.shape[0]):
                    split[name[:-len("down_proj")] + f"{e}.down_proj.weight"] = tensor[e]
            else:
                split[name] = tensor
        if arch == "mixtral":  # the published Mixtral names
            names = {".mlp.": ".block_sparse_moe.", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
            renamed = {}
            for name, tensor in split.items():
                for old, new in names.items():
                    name = name.replace(old, new)
                renamed[name] = tensor
            split = renamed
        for file in directory.glob("*.safetensors"):
            file.unlink()
        save_file({k: v.clone().contiguous() for k, v in split.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
    return directory, model


_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    _, _, layer, *rest = hf.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{_GGUF_LAYER[module]}.{kind}"


def _gguf_writer(hf_dir: Path, path: Path, arch: str, name: str):
    """A GGUFWriter with the tiny model's hyper-parameters and tokenizer (llama.cpp's keys)."""
    import gguf
    from tokenizers import Tokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    return w, cfg


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_gguf(hf_dir: Path, path: Path, qtype: str = "F32") -> Path:
    """Convert the tiny HF model to GGUF, 2-D weights stored as qtype (F32, F16, BF16, Q8_0, Q4_0, Q4_1)."""
    import gguf
    from safetensors.numpy import load_file

    from tandem.model.rope import permute_qk

    w, cfg = _gguf_writer(hf_dir, path, "llama", "tiny-llama")
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, array in load_file(str(hf_dir / "model.safetensors")).items():
        array = array.astype(np.float32)
        if ".q_proj." in name or ".k_proj." in name:
            import torch

            heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            array = permute_qk(torch.from_numpy(array), heads).numpy()
        if array.ndim == 2 and qtype != "F32":
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qt), raw_dtype=qt)
        else:
            w.add_tensor(_gguf_name(name), array)
    _finish(w)
    return path


# llama.cpp's architecture for each MoE family (Mixtral files are "llama", with Q/K rows permuted)
MOE_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
_GGUF_MOE_LAYER = {"mlp.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
                   "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
                   "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm"}


def write_tiny_moe_gguf(hf_dir: Path, model, arch: str, path: Path) -> Path:
    """The tiny MoE model (write_tiny_moe_dir's) as llama.cpp's converter writes it: stacked experts
    as ffn_{gate,up,down}_exps, the router as ffn_gate_inp, the shared expert as *_shexp, F32."""
    import torch

    from tandem.model.rope import permute_qk

    gguf_arch = MOE_GGUF_ARCH[arch]
    w, cfg = _gguf_writer(hf_dir, path, gguf_arch, f"tiny-{arch}")
    m = model.config
    w.add_expert_count(getattr(m, "num_local_experts", None) or m.num_experts)
    w.add_expert_used_count(m.num_experts_per_tok)
    if getattr(m, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(m.moe_intermediate_size)
    if getattr(m, "shared_expert_intermediate_size", None):
        w.add_expert_shared_feed_forward_length(m.shared_expert_intermediate_size)
    if getattr(m, "head_dim", None):
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float()
        if name.endswith("experts.gate_up_proj"):
            layer = name.split(".")[2]
            gate, up = array.chunk(2, dim=1)
            w.add_tensor(f"blk.{layer}.ffn_gate_exps.weight", gate.contiguous().numpy())
            w.add_tensor(f"blk.{layer}.ffn_up_exps.weight", up.contiguous().numpy())
            continue
        if name.endswith("experts.down_proj"):
            w.add_tensor(f"blk.{name.split('.')[2]}.ffn_down_exps.weight", array.contiguous().numpy())
            continue
        if gguf_arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            array = permute_qk(array, heads)
        if name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)
        if name in _GGUF_NAMES:
            gguf_name = _GGUF_NAMES[name]
        else:
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gguf_name = f"blk.{layer}.{_GGUF_MOE_LAYER.get(module) or _GGUF_LAYER[module]}.{kind}"
        w.add_tensor(gguf_name, torch.as_tensor(array).contiguous().numpy())
    _finish(w)
    return path


def write_peft_adapter(base_dir: Path, directory: Path, rank: int = 8, alpha: int = 16, seed: int = 0,
                       targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """A LoRA adapter made with PEFT on the HF model in base_dir, every A and B random and non-zero
    (PEFT starts B at zero), saved in PEFT's format; returns (directory, the PEFT model)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                            lora_dropout=0.0, bias="none"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory))
    return directory, model.eval()
