"""tandem's CPU extension (tandem.kernels.cpu, ggml_cpu): the GGML block matmuls against the same
arithmetic in plain torch, the blocks against the gguf package's own dequantization, RMSNorm and
paged attention against torch, the fused layer against the eager layers (same
tokens), bad input refused, and the build cache reused. Skipped, with the reason, on a CPU the
kernels do not support (they need AVX512-VNNI; the model then runs torch's eager ops)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tandem
from tandem.kernels import cpu
from tests.tiny_models import write_tiny_gguf

REASON = cpu.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"tandem's CPU kernels are unavailable: {REASON}")


def _blocks(qtype: str, n: int, k: int, seed: int = 0):
    """(GGMLWeight, the gguf package's dequantization) of a random (n, k) weight stored as qtype."""
    import gguf

    from tandem.kernels.ggml_cpu import GGMLWeight

    weight = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[qtype])
    exact = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    return GGMLWeight.from_blocks(qtype, raw, (n, k)), torch.from_numpy(np.array(exact, dtype=np.float32))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_exactly_as_gguf_does(qtype):
    weight, exact = _blocks(qtype, 48, 128)
    assert torch.equal(weight.dequantize(), exact)  # nothing rounded twice (Q4_0's -8 d is exact in fp16)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 17, 64])
@pytest.mark.parametrize("k, n", [(64, 40), (96, 48), (192, 136), (1536, 64)])
def test_block_matmul_matches_its_arithmetic_in_torch(qtype, m, k, n):
    from tandem.kernels.ggml_cpu import GGMLLinear, reference_linear

    weight, exact = _blocks(qtype, n, k, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    got, ref = GGMLLinear(weight)(x), reference_linear(x, weight)
    assert got.shape == (m, n)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and the int8 activations are llama.cpp's rounding, not a different product: near x @ W^T
    full = x @ exact.T
    assert float((got - full).norm() / full.norm()) < 0.02


@pytest.mark.parametrize("qtype, scale_offsets", [("Q4_K", (0, 2)), ("Q6_K", (208,)), ("Q5_0", (0,))])
def test_k_quants_are_requantized_to_q8_blocks_close_to_their_values(qtype, scale_offsets):
    """Types without a lossless form here become Q8_0 blocks of their exact values: each weight
    within half an int8 step (1/254 of its block's largest) of the file's value, plus what the
    fp16 rounding of the block's scale adds (at most 127 x 2^-11 of a step)."""
    import gguf

    from tandem.kernels.ggml_cpu import GGMLLinear, GGMLWeight

    n, k, q = 48, 512, gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    for offset in scale_offsets:  # the blocks' fp16 scales: small and finite
        raw[:, offset:offset + 2] = rng.uniform(0.001, 0.01, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(n, -1)
    exact = torch.from_numpy(np.array(gguf.quants.dequantize(raw, q), dtype=np.float32).reshape(n, k))
    weight = GGMLWeight.from_blocks(qtype, raw, (n, k))
    assert weight.ggml_type == "Q8_0"
    step = exact.view(n, k // 32, 32).abs().amax(-1, keepdim=True) / 127
    bound = step * (0.5 + 127 / 2048) + 1e-7
    assert bool(((weight.dequantize().view(n, k // 32, 32) - exact.view(n, k // 32, 32)).abs() <= bound).all())
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2))
    full = x @ exact.T
    assert float((GGMLLinear(weight)(x) - full).norm() / full.norm()) < 0.02


def test_block_matmul_refuses_bad_input():
    weight, _ = _blocks("Q4_1", 16, 64)
    qs, d, m = weight.pack()
    kernels = cpu.extension()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernels.ggml_linear(torch.randn(1, 48), qs, d, m)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.ggml_linear(torch.randn(1, 64).double(), qs, d, m)
    with pytest.raises(RuntimeError, match="qs"):
        kernels.ggml_linear(torch.randn(1, 128), qs, d, m)
    with pytest.raises(RuntimeError, match="qs"):
        kernels.ggml_linear(torch.randn(1, 64), weight.qs, d, m)  # the file's layout, not packed
    with pytest.raises(RuntimeError, match="m must"):
        kernels.ggml_linear(torch.randn(1, 64), qs, d, m[:, :1].contiguous())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_matmul_rows_do_not_depend_on_the_batch(qtype):
    """Batch invariance: each row of a batch is bit for bit the row computed alone, across every
    tile shape (1-4 rows, 1-4 groups of 16 outputs) and thread split."""
    from tandem.kernels.ggml_cpu import GGMLLinear

    linear = GGMLLinear(_blocks(qtype, 112, 256, seed=3)[0])
    x = torch.randn(23, 256, generator=torch.Generator().manual_seed(5))
    batch = linear(x)
    for i in range(x.shape[0]):
        assert torch.equal(linear(x[i:i + 1]), batch[i:i + 1])
    assert torch.equal(linear(x[5:12]), batch[5:12])


@pytest.mark.parametrize("m, k", [(1, 576), (7, 64), (3, 100)])
def test_rms_norm_matches_torch(m, k):
    x, w = torch.randn(m, k), torch.randn(k)
    torch.testing.assert_close(cpu.extension().rms_norm(x, w, 1e-5), F.rms_norm(x, (k,), w, 1e-5))


def _paged_reference(q, k_pool, v_pool, tables, lengths):
    out = []
    heads, kv_heads = q.shape[1], k_pool.shape[2]
    for b in range(q.shape[0]):
        n = int(lengths[b])
        keys = k_pool[tables[b]].flatten(0, 1)[:n].transpose(0, 1)  # (Hkv, S, D)
        values = v_pool[tables[b]].flatten(0, 1)[:n].transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[b].unsqueeze(1), keys, values, enable_gqa=heads != kv_heads)
                   .squeeze(1))
    return torch.stack(out)


@pytest.mark.parametrize("batch, lengths", [(1, [1]), (1, [16]), (1, [17]), (3, [5, 40, 33]), (16, None)])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_paged_decode_matches_sdpa(batch, lengths, head_dim):
    gen = torch.Generator().manual_seed(batch)
    k_pool, v_pool = torch.randn(64, 16, 3, head_dim, generator=gen), torch.randn(64, 16, 3, head_dim, generator=gen)
    lengths = torch.tensor(lengths or torch.randint(1, 120, (batch,), generator=gen).tolist())
    tables = torch.stack([torch.randperm(64, generator=gen)[:8] for _ in range(batch)])  # shuffled block ids
    q = torch.randn(batch, 9, head_dim, generator=gen)
    got = cpu.extension().paged_decode(q, k_pool, v_pool, tables, lengths)
    torch.testing.assert_close(got, _paged_reference(q, k_pool, v_pool, tables, lengths), rtol=1e-5, atol=1e-5)


def _flat_batch(seed=0, window=0):
    """A step of 3 sequences: a 13-token prefill chunk after 20 cached, a fresh 9-token prompt,
    and one decode token at position 40; shuffled block ids, block size 8."""
    gen = torch.Generator().manual_seed(seed)
    pools = torch.randn(32, 8, 2, 16, generator=gen), torch.randn(32, 8, 2, 16, generator=gen)
    tables = torch.stack([torch.randperm(32, generator=gen)[:6] for _ in range(3)])
    spans = [(0, 20, 13), (1, 0, 9), (2, 40, 1)]  # (table, cached, new)
    row_table = torch.tensor([t for t, _, n in spans for _ in range(n)])
    end = torch.tensor([c + j + 1 for _, c, n in spans for j in range(n)])
    first = (end - window).clamp(min=0) if window else torch.zeros_like(end)
    q = torch.randn(len(end), 6, 16, generator=gen)
    return q, pools, tables, row_table, first, end


@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_rows_match_sdpa_over_their_key_ranges(window):
    q, (k_pool, v_pool), tables, row_table, first, end = _flat_batch(window=window)
    got = cpu.extension().paged_attention(q, k_pool, v_pool, tables, row_table, first, end)
    for n in range(q.shape[0]):
        keys = k_pool[tables[row_table[n]]].flatten(0, 1)[first[n]:end[n]].transpose(0, 1)
        values = v_pool[tables[row_table[n]]].flatten(0, 1)[first[n]:end[n]].transpose(0, 1)
        want = F.scaled_dot_product_attention(q[n].unsqueeze(1), keys, values, enable_gqa=True).squeeze(1)
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5)


def test_paged_attention_is_batch_invariant():
    """A row's result is the same floats alone as in any batch (prefill chunk, decode step and
    speculative verification then agree bit for bit)."""
    q, (k_pool, v_pool), tables, row_table, first, end = _flat_batch(seed=3)
    kernels = cpu.extension()
    together = kernels.paged_attention(q, k_pool, v_pool, tables, row_table, first, end)
    for n in (0, 7, 12, 13, 21, 22):
        alone = kernels.paged_attention(q[n:n + 1], k_pool, v_pool, tables, row_table[n:n + 1], first[n:n + 1],
                                        end[n:n + 1])
        assert torch.equal(alone[0], together[n])


def test_paged_decode_refuses_out_of_range_blocks_and_lengths():
    pools = torch.zeros(4, 16, 1, 16), torch.zeros(4, 16, 1, 16)
    q = torch.zeros(1, 1, 16)
    kernels = cpu.extension()
    with pytest.raises(RuntimeError, match="block id"):
        kernels.paged_decode(q, *pools, torch.tensor([[7]]), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="does not fit"):
        kernels.paged_decode(q, *pools, torch.tensor([[0]]), torch.tensor([17]))
    with pytest.raises(RuntimeError, match="no key"):
        kernels.paged_decode(q, *pools, torch.tensor([[0]]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="names table"):
        kernels.paged_attention(q, *pools, torch.tensor([[0]]), torch.tensor([1]), torch.tensor([0]), torch.tensor([1]))


@pytest.fixture(scope="module")
def tiny_q4_llm(tiny_hf_dir, tmp_path_factory):
    path = write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf", "Q4_1")
    return tandem.LLM(str(path), progress=False, num_kv_blocks=64, block_size=4)


def test_gguf_blocks_are_kept_and_the_fused_layer_is_taken(tiny_q4_llm):
    from tandem.kernels.ggml_cpu import GGMLLinear

    assert tiny_q4_llm.quantization == "gguf"
    assert sum(isinstance(m, GGMLLinear) for m in tiny_q4_llm.model.modules()) == 4 * 2 + 1  # 4 a layer + head
    assert tiny_q4_llm.model._ggml_layer_args() is not None


@pytest.mark.parametrize("num_prompts", [1, 2, 3, 5, 8, 17])
def test_fused_layer_gives_the_eager_layers_tokens(tiny_q4_llm, num_prompts):
    """Every batch size: the fused C++ layer and the eager torch layers (same kernels for
    the matmuls) produce the same greedy tokens, prompts of different lengths across block edges."""
    prompts = [[5 + i, 9, 13 + i, 21, 34][: 1 + i % 5] * (1 + i % 3) for i in range(num_prompts)]
    params = tandem.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    model = tiny_q4_llm.model
    fused = [o.outputs[0].token_ids for o in tiny_q4_llm.generate(prompts, params)]
    model.fused_layers = False
    try:
        eager = [o.outputs[0].token_ids for o in tiny_q4_llm.generate(prompts, params)]
    finally:
        model.fused_layers = True
    assert fused == eager


def test_fused_layer_logits_match_the_eager_layers(tiny_q4_llm):
    """The top-5 log-probabilities at each decode step agree to 1e-5: the fused layer runs the
    eager layer's arithmetic op for op (the same kernels, SiLU through the same ATen op); they
    differ by a few float32 ulps (measured 2.4e-7), not yet traced to the op that rounds apart."""
    scores = {}
    try:
        for fused in (True, False):
            tiny_q4_llm.model.fused_layers = fused
            scores[fused] = tiny_q4_llm.generate([[7, 8, 9, 10, 11]], tandem.SamplingParams(
                temperature=0, max_tokens=10, ignore_eos=True, logprobs=5))[0].outputs[0].logprobs
    finally:
        tiny_q4_llm.model.fused_layers = True
    assert len(scores[True]) == len(scores[False]) == 10
    for a, b in zip(scores[True], scores[False]):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-5


def test_serving_never_builds_again(tiny_q4_llm):
    """Whatever the batch sizes and prompt lengths, the kernels are built at most once per process
    (nothing is specialized per shape: no recompiles in the steady state)."""
    before = cpu.builds
    assert before <= 1
    for n in (1, 2, 5, 16):
        tiny_q4_llm.generate([[3 + i] * (1 + 7 * i) for i in range(n)], tandem.SamplingParams(max_tokens=4))
    assert cpu.builds == before


def test_the_build_is_cached_for_the_next_process():
    """A second process finds the compiled extension in the cache: it loads without compiling."""
    code = ("import logging, time; logging.basicConfig(level=logging.INFO); t = time.monotonic(); "
            "from tandem.kernels import cpu; cpu.extension(); print(round(time.monotonic() - t, 1))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr
    assert float(result.stdout.strip()) < 20


def test_kernel_threads_do_not_change_results_and_serve_concurrent_callers():
    """The kernels' own pool (kernels/csrc/thread_pool.h): any thread count gives the same bits,
    and callers on several threads at once (the second runs its job inline) get their own
    answers."""
    import threading

    from tandem.kernels.ggml_cpu import GGMLLinear

    linear = GGMLLinear(_blocks("Q4_0", 256, 512, seed=7)[0])
    inputs = [torch.randn(m, 512, generator=torch.Generator().manual_seed(m)) for m in (1, 3, 16, 40)]
    kernels = cpu.extension()
    before = kernels.num_threads()
    try:
        kernels.set_num_threads(1)
        serial = [linear(x) for x in inputs]
        for threads in (2, 3):
            kernels.set_num_threads(threads)
            assert all(torch.equal(linear(x), y) for x, y in zip(inputs, serial))
        results, errors = {}, []

        def call(k):
            try:
                for _ in range(20):
                    results[k] = linear(inputs[k % len(inputs)])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert all(torch.equal(results[k], serial[k % len(inputs)]) for k in range(8))
    finally:
        kernels.set_num_threads(before)


def test_engine_step_leaves_torch_threads_to_the_kernels(tiny_q4_llm):
    """While a step runs on the kernels, torch's ops run on the calling thread alone (its OpenMP
    workers would otherwise spin on the cores the pool needs); the caller's setting comes back."""
    from tandem.kernels.ggml_cpu import runs_on_kernels

    assert runs_on_kernels(tiny_q4_llm.model) and tiny_q4_llm.engine.serial_torch
    before, seen = torch.get_num_threads(), []
    sampler = tiny_q4_llm.engine.sampler
    original = sampler.sample

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    try:
        torch.set_num_threads(2)
        sampler.sample = spy
        tiny_q4_llm.generate("hello", tandem.SamplingParams(max_tokens=3, temperature=0))
        assert torch.get_num_threads() == 2
    finally:
        del sampler.sample
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
