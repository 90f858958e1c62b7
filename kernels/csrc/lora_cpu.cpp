// Multi-LoRA's low-rank updates on the CPU, fp32 (Punica's gathered matmul shape, tokens grouped by
// adapter): what the fused layer adds after each of its four projections when some token of the
// step runs an adapter (tandem/model/lora.py's `lora_delta` is the reference, op for op in shape).
//
// lora_add(y (N, O), x (N, K), a (S, P R, K), bt (S, R, O), part_ends, order (M,), runs (G, 3),
//          scaling (S,)) adds in place, for every token n = order[i] of a run (slot s, begin, end)
//   with begin <= i < end, y[n, c] += scaling[s] * sum_r (x[n] . a[s, p R + r]) bt[s, r, c], where
//   p is output column c's part (part_ends: each part's end column, the last one O). A fused
//   projection (qkv: 3 parts, gate_up: 2) stacks its parts' A and keeps B^T per part: no zero
//   block of a block-diagonal B is read or multiplied. Tokens in no run (the bare base) get nothing.
//   a and bt are both fp32 or both fp16 (tandem.model.lora.slot_dtype), x, y and the sums fp32.
//
// Two passes over the thread pool: low (M, P R) = each token's x . A rows (4 A rows by 4 tokens of a
// run a register block), then y += scaling * low B^T by 64-column blocks of one part (4 tokens a
// register block, each B^T load used by all 4). Each output element is computed by one thread in a fixed order,
// whatever the split (batch invariance).
#include <torch/extension.h>
#include "thread_pool.h"
#include <immintrin.h>

#include <vector>

namespace {

// Register blocks (Zen 4 loads one zmm a cycle and fmas one: a block's loads must feed several fmas).
// Each block also prefetches the weights the next block reads: the adapters' weights stream from
// memory (2.6 MB a layer for 4 rank-16 adapters on smollm2-135m), and without it the loads waited
// on memory instead of overlapping the fmas (12% faster a layer on one thread, busy machine).
constexpr int kTokens = 4;  // tokens sharing each weight load (a decode run of one adapter is ~1-8)
constexpr int kRows = 4;    // A rows sharing each x load (pass 1: 8 loads feed 16 fmas)
constexpr int kVecs = 4;    // 16-column vectors of B^T a pass-2 block spans (4 loads, 4 broadcasts: 16 fmas)

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

// 16 weights as fp32 (the slots hold fp32 or fp16: tandem.model.lora.slot_dtype)
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// low[t * ld + j] = x_t . a_j over K for kTokens tokens xs and kRows rows as (an fma chain of 16
// lanes, then one reduce); only t < T, j < J are stored (the others repeat a token or row)
template <typename W>
void dot_block(const float* const* xs, int64_t T, const W* const* as, int64_t J, int64_t K, float* low, int64_t ld) {
  __m512 acc[kTokens][kRows];
  for (int t = 0; t < kTokens; ++t)
    for (int j = 0; j < kRows; ++j) acc[t][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 av[kRows];
    for (int j = 0; j < kRows; ++j) {
      av[j] = load16(as[j] + k, 0xFFFF);
      _mm_prefetch((const char*)(as[j] + kRows * K + k), _MM_HINT_T0);  // the next item's rows
    }
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_loadu_ps(xs[t] + k);
      for (int j = 0; j < kRows; ++j) acc[t][j] = _mm512_fmadd_ps(xv, av[j], acc[t][j]);
    }
  }
  if (k < K) {
    const __mmask16 m = tail_mask(K - k);
    __m512 av[kRows];
    for (int j = 0; j < kRows; ++j) av[j] = load16(as[j] + k, m);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xs[t] + k);
      for (int j = 0; j < kRows; ++j) acc[t][j] = _mm512_fmadd_ps(xv, av[j], acc[t][j]);
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < J; ++j) low[t * ld + j] = _mm512_reduce_add_ps(acc[t][j]);
}

// y_t[c:c + 16 kVecs] += scale * sum_r l_t[r] b[r * ldb + c...] for kTokens tokens (masks: each
// vector's columns; only t < T stored), r in order
template <typename W>
void expand_block(const float* const* l, int64_t T, const W* b, int64_t ldb, int64_t R, const __mmask16* m,
                  __m512 scale, float* const* ys) {
  __m512 acc[kTokens][kVecs];
  for (int t = 0; t < kTokens; ++t)
    for (int v = 0; v < kVecs; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    __m512 bv[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      bv[v] = load16(b + r * ldb + 16 * v, m[v]);
      _mm_prefetch((const char*)(b + r * ldb + 16 * (kVecs + v)), _MM_HINT_T0);  // the next block's columns
    }
    for (int t = 0; t < kTokens; ++t) {
      const __m512 lv = _mm512_set1_ps(l[t][r]);
      for (int v = 0; v < kVecs; ++v) acc[t][v] = _mm512_fmadd_ps(lv, bv[v], acc[t][v]);
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int v = 0; v < kVecs; ++v) {
      float* y = ys[t] + 16 * v;
      _mm512_mask_storeu_ps(y, m[v], _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], y), _mm512_mul_ps(acc[t][v], scale)));
    }
}

template <typename W>
void lora_add_impl(float* Y, const float* X, const W* A, const W* BT, const std::vector<int64_t>& part_ends,
                   const int64_t* ord, const int64_t* run, int64_t M, int64_t G, const float* scale, int64_t K,
                   int64_t O, int64_t R) {
  const int64_t P = (int64_t)part_ends.size();
  const int64_t PR = P * R;

  // pass 1: low[i, j] = x[order[i]] . a[slot, j], one item per (run, kRows rows of A)
  std::vector<float> low(M * PR);
  const int64_t row_blocks = (PR + kRows - 1) / kRows;
  tandem::parallel_for(G * row_blocks, 2, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t g = w / row_blocks, j0 = (w % row_blocks) * kRows, J = std::min<int64_t>(kRows, PR - j0);
      const int64_t end = run[3 * g + 2];
      const W* as[kRows];
      for (int64_t j = 0; j < kRows; ++j) as[j] = A + (run[3 * g] * PR + j0 + std::min(j, J - 1)) * K;
      for (int64_t i = run[3 * g + 1]; i < end; i += kTokens) {
        const int64_t T = std::min<int64_t>(kTokens, end - i);
        const float* xs[kTokens];
        for (int64_t t = 0; t < kTokens; ++t) xs[t] = X + ord[i + std::min(t, T - 1)] * K;
        dot_block(xs, T, as, J, K, low.data() + i * PR + j0, PR);
      }
    }
  });

  // pass 2: y[order[i], c] += scaling[slot] * low[i, p R:(p + 1) R] . bt[slot, :, c], one item per
  // (run, block of 16 kVecs columns of one part)
  constexpr int64_t width = 16 * kVecs;
  std::vector<int64_t> block_col, block_part;
  for (int64_t p = 0, c = 0; p < P; ++p)
    for (; c < part_ends[p]; c += std::min<int64_t>(width, part_ends[p] - c)) {
      block_col.push_back(c);
      block_part.push_back(p);
    }
  const int64_t B = (int64_t)block_col.size();
  tandem::parallel_for(G * B, 2, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t g = w / B, blk = w % B, slot = run[3 * g], end = run[3 * g + 2];
      const int64_t c = block_col[blk], p = block_part[blk];
      __mmask16 m[kVecs];
      for (int v = 0; v < kVecs; ++v) m[v] = tail_mask(part_ends[p] - c - 16 * v);
      const __m512 s = _mm512_set1_ps(scale[slot]);
      for (int64_t i = run[3 * g + 1]; i < end; i += kTokens) {
        const int64_t T = std::min<int64_t>(kTokens, end - i);
        const float* l[kTokens];
        float* ys[kTokens];
        for (int64_t t = 0; t < kTokens; ++t) {
          l[t] = low.data() + (i + std::min(t, T - 1)) * PR + p * R;
          ys[t] = Y + ord[i + std::min(t, T - 1)] * O + c;
        }
        expand_block(l, T, BT + slot * R * O + c, O, R, m, s, ys);
      }
    }
  });
}

}  // namespace

void lora_add(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
              const std::vector<int64_t>& part_ends, const torch::Tensor& order, const torch::Tensor& runs,
              const torch::Tensor& scaling) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.is_contiguous() && y.is_contiguous() &&
              x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "x (N, K) and y (N, O) must be contiguous float32");
  TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && a.is_contiguous() && bt.is_contiguous() &&
              (a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf) &&
              a.scalar_type() == bt.scalar_type() && a.size(0) == bt.size(0),
              "a (S, P R, K) and bt (S, R, O) must be contiguous, both float32 or both float16");
  const int64_t N = x.size(0), K = x.size(1), O = y.size(1), S = a.size(0), R = bt.size(1), P = (int64_t)part_ends.size();
  TORCH_CHECK(a.size(2) == K && bt.size(2) == O && P >= 1 && a.size(1) == P * R && part_ends.back() == O,
              "a must be (S, ", P, " x R, ", K, "), bt (S, R, ", O, ") and the last part end ", O);
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(part_ends[p] > (p ? part_ends[p - 1] : 0), "part ends must increase");
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.is_contiguous() && runs.dim() == 2 &&
              runs.size(1) == 3 && runs.scalar_type() == at::kLong && runs.is_contiguous(),
              "order must be (M,) int64 and runs (G, 3) int64");
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == S && scaling.scalar_type() == at::kFloat && scaling.is_contiguous(),
              "scaling must be (S,) float32");
  const int64_t M = order.size(0), G = runs.size(0);
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* run = runs.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) TORCH_CHECK(ord[i] >= 0 && ord[i] < N, "order names token ", ord[i], " of ", N);
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(run[3 * g] >= 0 && run[3 * g] < S && 0 <= run[3 * g + 1] && run[3 * g + 1] <= run[3 * g + 2] &&
                run[3 * g + 2] <= M, "run ", g, " (slot ", run[3 * g], ") is out of range");
  if (G == 0) return;
  if (a.scalar_type() == at::kHalf)
    lora_add_impl(y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<at::Half>(), bt.data_ptr<at::Half>(), part_ends,
                  ord, run, M, G, scaling.data_ptr<float>(), K, O, R);
  else
    lora_add_impl(y.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), bt.data_ptr<float>(), part_ends, ord,
                  run, M, G, scaling.data_ptr<float>(), K, O, R);
}
