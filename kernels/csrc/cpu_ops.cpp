// The decode step's small ops on the CPU, fp32, each one pass over its data (the eager torch
// versions cost 5-20 torch calls each; at batch 1 those calls are most of a small model's step).
//
// rms_norm(x (M, K), w (K,), eps) -> (M, K): x / sqrt(mean(x^2) + eps) * w.
// paged_decode(q (B, H, D), k_pool, v_pool (blocks, block_size, Hkv, D), tables (B, max_blocks)
//              int64, lengths (B,) int64) -> (B, H, D): each sequence's one query attends over the
//   first lengths[b] keys of its blocks (plain causal attention: the query is the last of them),
//   query heads grouped over KV heads (GQA). Exact softmax in two passes over the keys, fp32.
// paged_attention(q (N, H, D), pools, tables (R, max_blocks), row_table, first, end (N,) int64):
//   row n attends over the keys at positions [first, end) of its table (see below).
// fused_layer(...): a whole Llama decoder layer for a flat batch of tokens whose projections are
//   GGML blocks: RMSNorm, qkv, RoPE (neox), K/V stored to their slots,
//   paged_decode, o + residual, RMSNorm, gate_up, SiLU(gate) * up, down + residual. One call a
//   layer instead of ~40 torch calls (tandem/model/llama.py's eager forward is the reference).
//   `lora`: empty, or the step's LoRA adapters (order, runs, scaling: tandem.model.lora's
//   LoRAContext) and the layer's slots (A and B^T of qkv, o, gate_up and down), whose low-rank
//   updates lora_add (lora_cpu.cpp) adds to each projection's output before it is used.
#include <torch/extension.h>
#include "thread_pool.h"
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

torch::Tensor ggml_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w);
void lora_add(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& bt,
              const std::vector<int64_t>& part_ends, const torch::Tensor& order, const torch::Tensor& runs,
              const torch::Tensor& scaling);

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {  // y += alpha * x
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// exp(x) for 16 lanes: 2^(x log2 e) split into 2^n (scalef) and a degree-7 polynomial of 2^f,
// |f| <= 0.5 (relative error ~1e-7, as std::exp's float result); x below -87 gives 0.
inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5252734e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// In place: x <- softmax(x) over n values.
inline void softmax(float* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(x + i));
  if (i < n) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), (__mmask16)((1u << (n - i)) - 1), x + i));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(m, k, x + i), m));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
  for (; i < n; ++i) x[i] *= _mm512_cvtss_f32(inv);
}

// scores[g * S + s] = q_g . k_s * scale for the G query heads of one KV head, D = 16 * DV: the
// same products and sums, in the same order, as dot() (an fma chain over D, then one reduce).
template <int DV>
void key_scores(const float* q, int64_t G, const float* pool, const int64_t* table, int64_t start, int64_t S,
                int64_t block, int64_t block_stride, int64_t token_stride, int64_t head_offset, float scale,
                float* scores) {
  __m512 qv[8][DV];
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < DV; ++j) qv[g][j] = _mm512_loadu_ps(q + g * DV * 16 + j * 16);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t pos = start + s;
    const float* k = pool + table[pos / block] * block_stride + (pos % block) * token_stride + head_offset;
    __m512 kv[DV];
    for (int j = 0; j < DV; ++j) kv[j] = _mm512_loadu_ps(k + j * 16);
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int j = 0; j < DV; ++j) acc = _mm512_fmadd_ps(qv[g][j], kv[j], acc);
      scores[g * S + s] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous (M, K) float32");
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == at::kFloat && w.is_contiguous() && w.size(0) == x.size(1),
              "w must be a contiguous (K,) float32 tensor");
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  tandem::parallel_for(M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = X + m * K;
      float* yr = Y + m * K;
      const float scale = 1.f / std::sqrt(dot(xr, xr, K) / (float)K + (float)eps);
      int64_t i = 0;
      const __m512 s = _mm512_set1_ps(scale);
      for (; i + 16 <= K; i += 16)
        _mm512_storeu_ps(yr + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), s), _mm512_loadu_ps(W + i)));
      for (; i < K; ++i) yr[i] = xr[i] * scale * W[i];
    }
  });
  return y;
}

// Every row n of a flat batch (prefill chunks and decode tokens alike) attends over the keys at
// positions [first[n], end[n]) of the block table row_table[n]: the same loop, in the same order,
// whatever the batch around it, so a token's attention is bit for bit the same whether it is
// computed in a prefill chunk, a decode step or a speculative verification (batch invariance).
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor tables,
                              torch::Tensor row_table, torch::Tensor first, torch::Tensor end) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be (N, H, D) float32");
  TORCH_CHECK(k_pool.dim() == 4 && k_pool.scalar_type() == at::kFloat && k_pool.is_contiguous() &&
              v_pool.sizes() == k_pool.sizes() && v_pool.scalar_type() == at::kFloat && v_pool.is_contiguous(),
              "k_pool and v_pool must be contiguous (blocks, block_size, Hkv, D) float32 tensors");
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong, "tables must be (R, max_blocks) int64");
  for (const auto* t : {&row_table, &first, &end})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == at::kLong, "row_table, first and end must be (N,) int64");
  q = q.contiguous();
  tables = tables.contiguous();
  const int64_t num_blocks = k_pool.size(0), block = k_pool.size(1), Hkv = k_pool.size(2);
  const int64_t R = tables.size(0), max_blocks = tables.size(1);
  TORCH_CHECK(k_pool.size(3) == D && H % Hkv == 0, "head dims do not match");
  const int64_t G = H / Hkv;
  const int64_t* T = tables.data_ptr<int64_t>();
  const auto rt = row_table.contiguous(), f = first.contiguous(), e = end.contiguous();
  const int64_t* RT = rt.data_ptr<int64_t>();
  const int64_t* F = f.data_ptr<int64_t>();
  const int64_t* E = e.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(RT[n] >= 0 && RT[n] < R, "row ", n, " names table ", RT[n], " of ", R);
    TORCH_CHECK(F[n] >= 0 && F[n] < E[n], "row ", n, " has no key: length ", E[n] - F[n]);
    TORCH_CHECK(E[n] <= max_blocks * block, "length ", E[n], " does not fit ", max_blocks, " blocks");
    for (int64_t j = F[n] / block; j < (E[n] + block - 1) / block; ++j)
      TORCH_CHECK(T[RT[n] * max_blocks + j] >= 0 && T[RT[n] * max_blocks + j] < num_blocks, "block id out of range");
  }
  auto out = torch::empty({N, H, D}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* KP = k_pool.data_ptr<float>();
  const float* VP = v_pool.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.f / std::sqrt((float)D);
  const int64_t token_stride = Hkv * D, block_stride = block * Hkv * D;
  tandem::parallel_for(N * Hkv, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = w / Hkv, h = w % Hkv, start = F[n], S = E[n] - F[n];
      const int64_t* table = T + RT[n] * max_blocks;
      const float* qh = Q + (n * H + h * G) * D;  // the G query heads of KV head h, consecutive
      scores.resize(G * S);
      if (D == 64 && G <= 8) {  // the common head size: each key loaded once for the G heads, q in registers
        key_scores<4>(qh, G, KP, table, start, S, block, block_stride, token_stride, h * D, scale, scores.data());
      } else if (D == 128 && G <= 4) {
        key_scores<8>(qh, G, KP, table, start, S, block, block_stride, token_stride, h * D, scale, scores.data());
      } else {
        for (int64_t s = 0; s < S; ++s) {
          const int64_t pos = start + s;
          const float* k = KP + table[pos / block] * block_stride + (pos % block) * token_stride + h * D;
          for (int64_t g = 0; g < G; ++g) scores[g * S + s] = dot(qh + g * D, k, D) * scale;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        softmax(scores.data() + g * S, S);
        float* o = O + (n * H + h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
      }
      for (int64_t s = 0; s < S; ++s) {
        const int64_t pos = start + s;
        const float* v = VP + table[pos / block] * block_stride + (pos % block) * token_stride + h * D;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * S + s], v, O + (n * H + h * G + g) * D, D);
      }
    }
  });
  return out;
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor tables,
                           torch::Tensor lengths) {
  TORCH_CHECK(q.dim() == 3 && lengths.dim() == 1 && lengths.size(0) == q.size(0) && tables.size(0) == q.size(0),
              "q must be (B, H, D), tables (B, max_blocks) and lengths (B,)");
  auto rows = torch::arange(q.size(0), lengths.options());
  return paged_attention(q, k_pool, v_pool, tables, rows, torch::zeros_like(lengths), lengths);
}

namespace {

// SiLU(g) * u over the two halves of gu (N, 2I) -> (N, I), by the same ATen ops as the eager
// layer (F.silu(gate) * up), so the fused layer's result is the eager one's bit for bit.
torch::Tensor silu_and_mul(const torch::Tensor& gu) {
  const int64_t I = gu.size(1) / 2;
  return at::silu(gu.narrow(1, 0, I)).mul_(gu.narrow(1, I, I));
}

}  // namespace

torch::Tensor fused_layer(torch::Tensor x, torch::Tensor norm1, torch::Tensor norm2, double eps,
                           std::vector<torch::Tensor> qkv_w, std::vector<torch::Tensor> o_w,
                           std::vector<torch::Tensor> gate_up_w, std::vector<torch::Tensor> down_w,
                           torch::Tensor cos, torch::Tensor sin, torch::Tensor k_pool, torch::Tensor v_pool,
                           torch::Tensor slots, torch::Tensor tables, torch::Tensor row_table, torch::Tensor first,
                           torch::Tensor end, int64_t H, int64_t Hkv, std::vector<torch::Tensor> lora) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous (N, d) float32");
  TORCH_CHECK(lora.empty() || lora.size() == 11, "lora must be empty or (order, runs, scaling, then A and B^T of qkv, "
              "o, gate_up and down)");
  // y += the step's adapters' updates of projection `which` (0 qkv, 1 o, 2 gate_up, 3 down) on input in
  auto adapt = [&](torch::Tensor& y, const torch::Tensor& in, int which, std::vector<int64_t> part_ends) {
    if (!lora.empty())
      lora_add(y, in, lora[3 + 2 * which], lora[4 + 2 * which], part_ends, lora[0], lora[1], lora[2]);
  };
  const int64_t N = x.size(0), D = k_pool.size(3), width = (H + 2 * Hkv) * D;
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == N && cos.size(1) == D && cos.is_contiguous() &&
              sin.is_contiguous() && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "cos and sin must be contiguous (N, D) float32");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == N && slots.scalar_type() == at::kLong, "slots must be (N,) int64");
  TORCH_CHECK(k_pool.size(2) == Hkv && k_pool.is_contiguous() && v_pool.is_contiguous() && D % 2 == 0,
              "the pools must be contiguous (blocks, block_size, Hkv, D)");
  const auto normed = rms_norm(x, norm1, eps);
  auto qkv = ggml_linear(normed, qkv_w);
  TORCH_CHECK(qkv.size(1) == width, "qkv has ", qkv.size(1), " outputs, expected (H + 2 Hkv) D = ", width);
  adapt(qkv, normed, 0, {H * D, (H + Hkv) * D, width});
  float* QKV = qkv.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t pool_slots = k_pool.size(0) * k_pool.size(1), half = D / 2;
  float* KP = k_pool.data_ptr<float>();
  float* VP = v_pool.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(slot[n] >= 0 && slot[n] < pool_slots, "slot ", slot[n], " is outside the pool");
    const float* c = C + n * D;
    const float* s = S + n * D;
    for (int64_t h = 0; h < H + Hkv; ++h) {  // x * cos + rotate_half(x) * sin, rotate_half = (-x2, x1)
      float* v = QKV + n * width + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] + (-b) * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
    std::memcpy(KP + slot[n] * Hkv * D, QKV + n * width + H * D, Hkv * D * sizeof(float));
    std::memcpy(VP + slot[n] * Hkv * D, QKV + n * width + (H + Hkv) * D, Hkv * D * sizeof(float));
  }
  auto attn = paged_attention(qkv.narrow(1, 0, H * D).view({N, H, D}), k_pool, v_pool, tables, row_table, first, end);
  const auto attn_rows = attn.view({N, H * D});
  auto o = ggml_linear(attn_rows, o_w);
  adapt(o, attn_rows, 1, {o.size(1)});
  auto h = x + o;
  const auto normed2 = rms_norm(h, norm2, eps);
  auto gate_up = ggml_linear(normed2, gate_up_w);
  adapt(gate_up, normed2, 2, {gate_up.size(1) / 2, gate_up.size(1)});
  const auto act = silu_and_mul(gate_up);
  auto down = ggml_linear(act, down_w);
  adapt(down, act, 3, {down.size(1)});
  return h.add_(down);
}
