"""The tokenizer: byte-level BPE built with HF `tokenizers` from a GGUF's vocabulary or a
tokenizer.json, the chat template rendered with jinja2, and byte-exact decoding.

Encoding must equal llama.cpp's token for token (tests/unit/test_tokenizer_parity.py holds golden
ids from llama.cpp). Decoding goes through each token's raw bytes, so incremental decoding can hold
back a half-received UTF-8 character instead of emitting U+FFFD.
"""
from __future__ import annotations

import codecs
import json
import re
import secrets
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tandem.errors import InvalidRequestError, ModelLoadError

# llama.cpp's GGUF `tokenizer.ggml.token_type` values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer families by GGUF `tokenizer.ggml.pre`: llama.cpp splits these with
# "\p{N}" (every digit alone) and then GPT-2's regex; HF expresses the same as Digits + ByteLevel.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"default", "gpt2", "gpt-2"}

# Control tokens llama.cpp also treats as end-of-generation, whatever the metadata says.
_EOG_TEXTS = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>"}


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable stand-in character -> raw byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _token_bytes(token: str, is_special: bool) -> bytes:
    if is_special:
        return token.encode("utf-8")
    table = _unicode_to_byte()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:  # a token outside the byte alphabet (added plain-text token)
        return token.encode("utf-8")


class Tokenizer:
    """encode/decode/apply_chat_template for one model. Thread-safe (HF tokenizers is)."""

    def __init__(self, hf_tokenizer, token_types: list[int], bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None, eog_ids: set[int] | None = None):
        self._tok = hf_tokenizer
        self._tok_plain = hf_tokenizer.__class__.from_str(hf_tokenizer.to_str())
        self._tok_plain.encode_special_tokens = True  # special-token text stays text
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        tokens = [""] * len(token_types)
        for text, idx in vocab.items():
            if idx < len(tokens):
                tokens[idx] = text
        self.tokens = tokens
        self.control_ids = frozenset(i for i, t in enumerate(token_types) if t == TOKEN_CONTROL)
        self.token_bytes = [_token_bytes(t, i in self.control_ids) for i, t in enumerate(tokens)]
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        found = {i for i in self.control_ids if tokens[i] in _EOG_TEXTS}
        self.eog_ids = frozenset((eog_ids or set()) | found | ({eos_id} if eos_id is not None else set()))
        self.chat_template = chat_template
        # the control tokens' texts, longest first (the tokenizer's own leftmost-longest split)
        self._special_ids = {tokens[i]: i for i in sorted(self.control_ids) if tokens[i]}
        self._specials = re.compile("|".join(map(re.escape, sorted(self._special_ids, key=len, reverse=True)))
                                    or "(?!)")

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, metadata: dict) -> Tokenizer:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
        if kind != "gpt2":
            raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 (byte-level BPE)")
        if pre not in _DIGITS_THEN_GPT2 | _GPT2:
            raise ModelLoadError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: "
                                 f"{', '.join(sorted(_DIGITS_THEN_GPT2 | _GPT2))}")
        tokens = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                            if pre in _DIGITS_THEN_GPT2 else byte_level)
        hf.decoder = decoders.ByteLevel()
        # Control tokens are split out only when asked (parse_special); user-defined ones always,
        # as in llama.cpp's tokenizer_st_partition.
        hf.add_tokens([AddedToken(tokens[i], special=types[i] == TOKEN_CONTROL, normalized=False)
                       for i in range(len(tokens)) if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)])
        eot = metadata.get("tokenizer.ggml.eot_token_id")
        return cls(hf, types, metadata.get("tokenizer.ggml.bos_token_id"),
                   metadata.get("tokenizer.ggml.eos_token_id"),
                   bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
                   metadata.get("tokenizer.chat_template"), {eot} if eot is not None else None)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            tok_config = json.loads((path / "tokenizer_config.json").read_text()) \
                if (path / "tokenizer_config.json").is_file() else {}
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read tokenizer.json ({exc})") from exc
        if type(hf.decoder).__name__ != "ByteLevel":
            raise ModelLoadError(f"{path}: only byte-level BPE tokenizers are supported "
                                 f"(decoder is {type(hf.decoder).__name__})")
        size = hf.get_vocab_size(with_added_tokens=True)
        types = [TOKEN_NORMAL] * size
        for idx, added in hf.get_added_tokens_decoder().items():
            types[idx] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED

        def token_id(key: str) -> int | None:
            value = tok_config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return hf.token_to_id(value) if value else None

        bos = token_id("bos_token")
        with_specials = hf.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and with_specials[:1] == [bos]
        hf.post_processor = None  # BOS is added by Tokenizer.encode, once, where the model wants it
        return cls(hf, types, bos, token_id("eos_token"), add_bos, tok_config.get("chat_template"))

    # -- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids of text. BOS only where the model wants it (or as add_bos says)."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"text to tokenize must be a str, got {type(text).__name__}")
        tok = self._tok if parse_special else self._tok_plain
        ids = tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int], skip_special_tokens: bool = True) -> bytes:
        self.check_ids(ids)
        return b"".join(self.token_bytes[i] for i in ids if not (skip_special_tokens and i in self.control_ids))

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise InvalidRequestError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")

    # -- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages ({"role", "content"} dicts) with the model's jinja2 chat template."""
        if not self.chat_template:
            raise InvalidRequestError("this model has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InvalidRequestError(f"each message needs str 'role' and 'content', got {m!r}")
        return _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._text(self.bos_id), eos_token=self._text(self.eos_id))

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a chat through the template, the way an attacker cannot steer: the
        template's own markers (<|im_start|>, ...) become their special tokens, while the same
        text inside a message's content stays text. Content free of special-token text gives
        exactly encode(apply_chat_template(messages), parse_special=True)."""
        nonce = secrets.token_hex(8)  # content cannot forge a shield it cannot guess
        hidden: list[str] = []

        def shield(match: re.Match) -> str:
            hidden.append(match.group(0))
            return f"\ue000{nonce}:{len(hidden) - 1}\ue001"

        specials = self._specials
        shielded = [{**m, "content": specials.sub(shield, m["content"]) if isinstance(m.get("content"), str)
                     else m.get("content")} if isinstance(m, dict) else m for m in messages]
        text = self.apply_chat_template(shielded, add_generation_prompt)
        # split the rendered text at the template's special tokens; shielded content goes back as text
        pieces, plain, at = [], [], 0
        for match in re.finditer(f"\ue000{nonce}:(\\d+)\ue001|{specials.pattern}", text):
            plain.append(text[at:match.start()])
            if match.group(1) is not None:
                plain.append(hidden[int(match.group(1))])
            else:
                pieces += self._tok_plain.encode("".join(plain), add_special_tokens=False).ids
                pieces.append(self._special_ids[match.group(0)])
                plain = []
            at = match.end()
        plain.append(text[at:])
        pieces += self._tok_plain.encode("".join(plain), add_special_tokens=False).ids
        return [self.bos_id, *pieces] if self.add_bos and self.bos_id is not None else pieces

    def _text(self, idx: int | None) -> str:
        return self.tokens[idx] if idx is not None else ""


@lru_cache(maxsize=16)
def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if self._skip and token_id in self._tokenizer.control_ids:
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes[token_id])

    def flush(self) -> str:
        """Whatever bytes are still pending, with U+FFFD for an incomplete character."""
        return self._decoder.decode(b"", final=True)
