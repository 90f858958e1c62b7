"""Hook specifications of tandem's plugin API (project "tandem", entry-point group "tandem").

Every hook is a registration hook: the plugin manager calls it once per plugin when it loads the
plugin (at start-up of every service that uses plugins: the tokenizer, prefill, decode and draft
workers, and library mode's `tandem.LLM`), and the plugin returns the component classes it adds.
Components are then looked up by name: a model's config, a server flag (`--attention`,
`--quantization`, `--kv-cache-dtype`) or a request (`SamplingParams.logits_processors`) picks them.
No hook runs on the per-token path: the engine calls the components' own methods.

Every hook takes `api_version` (tandem.plugins.API_VERSION of the running tandem) so a plugin can
adapt or decline; an implementation may leave out arguments it does not need. Hooks only ever
gain arguments. None is `firstresult`: every plugin's results are collected.
"""
from __future__ import annotations

from tandem.plugins import hookspec


@hookspec
def tandem_logits_processors(api_version: int) -> list[type]:
    """Register samplers: logits processors that rewrite the batch's logits before the draw.

    Called once when the plugin loads, in every service that samples (the decode worker and
    library mode).

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.LogitsProcessor` subclasses, each with a unique `name`
        and an `order` (built-ins run at 100-700; the default 450 puts a plugin after temperature
        and before top-k). The class is instantiated once per engine, without arguments; a request
        turns it on with `SamplingParams(logits_processors={name: {...keyword arguments...}})`
        (`--logits-processor NAME=JSON` on the command line), which the engine passes to
        `validate(**kwargs)` before any work. It runs for greedy rows too (greedy takes the argmax
        of the processed logits) unless `parse` returns None for them.

    Not firstresult. Example::

        class TypicalP(LogitsProcessor):
            name, order = "typical_p", 450

            def validate(self, mass: float = 0.9):
                if not 0 < mass <= 1:
                    raise InvalidRequestError("typical_p mass must be in (0, 1]")
                return mass

            def __call__(self, logits, args, batch):   # (B, V) fp32; args[i] None: leave row i alone
                ...

        @hookimpl
        def tandem_logits_processors():
            return [TypicalP]

    .. versionadded:: 1
    """


@hookspec
def tandem_attention_variants(api_version: int) -> list[type]:
    """Register attention variants: rules for which keys a query sees, and score biases.

    Called once when the plugin loads, in the prefill and decode workers and library mode.

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.AttentionVariant` subclasses with unique names. One is
        instantiated per engine with the options of `--attention-option KEY=VALUE` (or the
        model's config: a Mistral-style `sliding_window` picks "sliding_window"); its constructor
        validates them. Override `allowed(q_pos, k_pos)` (a boolean mask: True where the query
        may see the key; it must allow each query its own key), `bias(q_pos, k_pos, num_heads)`
        (an additive fp32 bias, or None), and `retention()` when old keys stop being visible
        (the engine then frees their KV blocks). Set `rotary = False` if the variant replaces RoPE.
        Override `key_window()` to return W when the mask is exactly "the last W keys up to the
        query" (0: all of them) with no bias: the CPU's paged attention then computes it from key
        ranges in one call a step; other masks (the default for a subclass: None) take the
        mask-based path.

    Not firstresult. Example::

        class Chunked(AttentionVariant):      # Llama-4-style chunked local attention
            name = "chunked"

            def __init__(self, chunk: int = 256):
                self.chunk = chunk

            def allowed(self, q_pos, k_pos):
                return (k_pos <= q_pos) & (k_pos // self.chunk == q_pos // self.chunk)

        @hookimpl
        def tandem_attention_variants():
            return [Chunked]

    .. versionadded:: 1
    """


@hookspec
def tandem_attention_backends(api_version: int) -> list[type]:
    """Register attention backends: the code that computes attention for any variant's mask.

    Called once when the plugin loads, in the prefill and decode workers and library mode.

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.AttentionBackend` subclasses with unique names,
        implementing `prefill(q, keys, values, mask)` and `decode(q, keys, values, mask)` (and,
        for a kernel that reads the paged pool in place, `paged_decode`). Selected with
        `--attention-backend NAME`; the default is "sdpa" on the CPU.

    Not firstresult. Example::

        class MyFlash(AttentionBackend):
            name = "my_flash"

            def prefill(self, q, keys, values, mask):      # (T, H, D), (S, Hkv, D) -> (T, H, D)
                return my_kernel(q, keys, values, mask.allowed, mask.bias)

        @hookimpl
        def tandem_attention_backends():
            return [MyFlash]

    .. versionadded:: 1
    """


@hookspec
def tandem_quantizers(api_version: int) -> list[type]:
    """Register weight quantizers.

    Called once when the plugin loads, in the services that load weights (prefill, decode and
    draft workers, library mode).

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.Quantizer` subclasses with unique names. One is
        instantiated with the options of `--quantization-option KEY=VALUE` when a model loads
        with `quantization=NAME`; `check(name, weight)` may refuse a layer (ConfigError) before
        anything changes, and `quantize(weight)` returns a module computing x @ weight.T.

    Not firstresult. Example::

        class Int8PerTensor(Quantizer):
            name = "int8_tensor"

            def quantize(self, weight):                    # (N, K) fp32 -> nn.Module
                scale = weight.abs().max() / 127
                return DequantLinear((weight / scale).round().to(torch.int8), scale)

        @hookimpl
        def tandem_quantizers():
            return [Int8PerTensor]

    .. versionadded:: 1
    """


@hookspec
def tandem_kv_cache_formats(api_version: int) -> list[type]:
    """Register KV-cache formats (KV quantizers): how the paged pool stores keys and values.

    Called once when the plugin loads, in the prefill and decode workers and library mode.

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.KVCacheFormat` subclasses with unique names. Selected
        with `--kv-cache-dtype NAME`; `create_pool(...)` returns one layer's pool (write, gather,
        copy_blocks) and `bytes_per_token(...)` sizes the pool from the memory budget.

    Not firstresult. Example: the built-in "int8" format in `tandem.plugins.kv_cache`.

    .. versionadded:: 1
    """


@hookspec
def tandem_draft_proposers(api_version: int) -> list[type]:
    """Register draft proposers for speculative decoding.

    Called once when the plugin loads, in every process that proposes: library mode, the prefill
    and decode workers, and the draft service. The operator configures one, options included
    (`LLM(speculative={"method": name, "k": 5, "options": {...}})`, the config's `speculative`;
    options go to its constructor), and a request may pick it by name when it is among
    `speculative_methods`; the engine verifies every guess against the target model, so wrong
    guesses cost speed, never correctness.

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.DraftProposer` subclasses with unique names;
        `propose(token_ids, num_tokens)` returns up to num_tokens guessed next tokens for the
        sequence whose prompt and output so far are token_ids. One instance per engine and
        (method, options) serves every request and sequence, one call at a time: key any state
        by the context shown, as `draft_model` does. A proposer with `asynchronous = True`
        overrides `propose_async(token_ids, num_tokens)` (a future of the guesses): the engine
        asks ahead and never waits for it (docs/plugins.md).

    Not firstresult. Example::

        class RepeatLast(DraftProposer):
            name = "repeat_last"

            def propose(self, token_ids, num_tokens):
                return [token_ids[-1]] * num_tokens

        @hookimpl
        def tandem_draft_proposers():
            return [RepeatLast]

    .. versionadded:: 1
    """


@hookspec
def tandem_embedders(api_version: int) -> list[type]:
    """Register embedding models for retrieval (RAG).

    Called once when the plugin loads, in the retrieval service and wherever `tandem rag` runs.

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.rag.Embedder` subclasses with unique names. An embedder has `dim`,
        `tokenizer` (encode/decode, to size chunks) and `embed(texts) -> (N, dim)` float32 rows of
        unit length; its constructor takes the options of the `rag_embedder_options` setting.
        Selected with `rag_embedder: NAME` (the server) or `--embedder NAME` (`tandem rag`).
        A store remembers the embedder that filled it and refuses another.

    Not firstresult. Example: the built-in "all-MiniLM-L6-v2" in `tandem.plugins.embedders`.

    .. versionadded:: 1
    """


@hookspec
def tandem_adapter_formats(api_version: int) -> list[type]:
    """Register on-disk formats of LoRA adapters (multi-LoRA serving reads adapters through them).

    Called once when the plugin loads, in the prefill and decode workers and library mode.

    :param api_version: the running tandem's plugin API version.
    :returns: a list of `tandem.plugins.AdapterFormat` subclasses with unique names, instantiated
        without options. When an adapter is loaded (`lora_modules`, `LLM.load_lora`,
        /v1/load_lora_adapter), each format's `detect(path)` is asked in name order, the built-in
        "peft" last; the first that claims the path `load`s it into a `tandem.model.lora.LoRAAdapter`
        (rank, scaling, {(layer, projection): (A, B)}, a digest of its bytes: the adapter's KV is
        keyed by it). tandem then checks every shape against the base model and the rank against
        max_lora_rank, whatever the format; a ConfigError from `load` reaches the caller as is (a
        400), any other exception as a PluginError naming the plugin.

    Not firstresult. Example: the built-in "peft" in `tandem.plugins.lora`; a format storing A
    and B in one .npz::

        class NpzFormat(AdapterFormat):
            name = "npz"

            def detect(self, path):
                return path.suffix == ".npz"

            def load(self, name, path, config, max_rank):
                ...  # read, then LoRAAdapter(name, rank, scaling, weights, digest)

        @hookimpl
        def tandem_adapter_formats():
            return [NpzFormat]

    .. versionadded:: 1
    """
