"""tandem.kernels: Triton kernels for the GPU workers, each beside its plain-torch reference (#5).

Each module NAME holds a private @triton.jit kernel, `NAME_triton` (checks shapes, strides and
dtypes, computes the grid, launches), `NAME_reference` (plain torch, the same signature) and
`NAME`, which runs the kernel on CUDA tensors and the reference otherwise:

- flash_attention: prefill attention, FlashAttention-2 (causal, sliding window, ALiBi, GQA).
- paged_attention_decode: decode over the paged KV pool, PagedAttention + Flash-Decoding split-K.
- rms_norm, rotary_embedding, silu_and_mul, quantized_matmul: the model's other hot ops.
- fused_moe: a mixture-of-experts layer as two grouped matmuls over expert-sorted tokens.

Import a kernel from its module (`from tandem.kernels.flash_attention import flash_attention`).
Nothing is re-exported here: each function has its module's name, and a package attribute
cannot be both (the import system rebinds it to the module once the module is imported).

Triton decides whether kernels compile for a GPU or run in its CPU interpreter when a kernel is
decorated, i.e. when its module is first imported: set TRITON_INTERPRET=1 before that (the tests
do, in tests/conftest.py). On the CPU the serving path never uses the interpreter.
"""
