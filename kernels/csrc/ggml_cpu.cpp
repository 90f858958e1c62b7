// CPU matmuls over llama.cpp's own quantized blocks (GGUF Q4_0, Q4_1, Q8_0), with llama.cpp's
// arithmetic: each row of activations is rounded to int8 per block of 32 (its Q8_0/Q8_1 rule:
// scale = amax / 127), the weights stay in their file's 4- or 8-bit blocks with their fp16 scales,
// and every block's dot product is an integer one (AVX512-VNNI vpdpbusd), summed across blocks in
// fp32. Part of the CPU extension tandem/kernels/cpu.py builds at first use (bindings.cpp).
//
// Weight layout: the rows are packed in groups of 16 (tandem.kernels.ggml_cpu.pack), so that one
// 512-bit register holds the same 4 bytes of a block for 16 output rows, one row per int32 lane:
//   qs (N/16, G, W, 16, 4) uint8, G = K/32 blocks; word c of a block for each of the 16 rows.
//     Q4 (W = 4): the file's nibble bytes; word c holds elements 4c..4c+3 in its low nibbles and
//       16+4c..16+4c+3 in its high ones. Q8 (W = 8): q + 128 (vpdpbusd multiplies unsigned
//       weight bytes by signed activation bytes); word c holds elements 4c..4c+3.
//   d (N/16, G, 16) fp16: the block scales, in the same lane order.
//   m: Q4_1's block minimums, shaped like d; empty for Q4_0 and Q8_0.
// Per block, output row n and activation row i:
//   s = sum_k qw[n, k] * qx[i, k] - off * sum_k qx[i, k]   (int32, exact; off: Q4_0 8, Q8_0 128)
//   y[i, n] += float(s) * (d[n] * dx[i])   then, Q4_1 only: y[i, n] += m[n] * (dx[i] * sum_k qx[i, k])
// which is llama.cpp's ggml_vec_dot_q4_0_q8_0 / q4_1_q8_1 / q8_0_q8_0 block for block. The lanes
// are the output rows, so no horizontal sums are needed, and the same sequence of operations makes
// y[i, n] whatever the batch and the tile around it (batch invariance).
#include <torch/extension.h>
#include "thread_pool.h"
#include <immintrin.h>

#include <array>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32, kLanes = 16;
enum Kind { kQ4_0, kQ4_1, kQ8_0 };

// One row of activations per block: q (K) int8; dx (G) the scale; init (G) = -off * sum(q), the
// integer sum's starting value; sx (G) = dx * sum(q), Q4_1's offset term. Held in buffers of the
// calling thread, reused call after call (a decode step makes ~120 of these calls).
struct Activations {
  int8_t* q;
  float* dx;
  int32_t* init;
  float* sx;
};

inline void quantize_row(const float* x, int64_t K, int32_t off, int8_t* q, float* dx, int32_t* init, float* sx) {
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t g = 0; g < K / kBlock; ++g) {
    const __m512 a = _mm512_loadu_ps(x + g * kBlock), b = _mm512_loadu_ps(x + g * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, sign_off), _mm512_and_ps(b, sign_off)));
    const float d = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));  // round to nearest even
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    _mm_storeu_si128((__m128i*)(q + g * kBlock), _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128((__m128i*)(q + g * kBlock + 16), _mm512_cvtsepi32_epi8(qb));
    dx[g] = d;
    init[g] = -off * sum;
    sx[g] = d * (float)sum;
  }
}

Activations quantize_activations(const torch::Tensor& x, int32_t off) {
  const int64_t M = x.size(0), K = x.size(1), G = K / kBlock;
  thread_local std::vector<int8_t> q_buffer;
  thread_local std::vector<float> dx_buffer, sx_buffer;
  thread_local std::vector<int32_t> init_buffer;
  q_buffer.resize(M * K);
  dx_buffer.resize(M * G);
  init_buffer.resize(M * G);
  sx_buffer.resize(M * G);
  Activations a{q_buffer.data(), dx_buffer.data(), init_buffer.data(), sx_buffer.data()};
  const float* X = x.data_ptr<float>();
  tandem::parallel_for(M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(X + m * K, K, off, a.q + m * K, a.dx + m * G, a.init + m * G, a.sx + m * G);
  });
  return a;
}

inline __m512i broadcast4(const int8_t* p) {  // 4 activation bytes into every int32 lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// y[i, 16 j + l] for a register tile of MB activation rows x NB groups of 16 weight rows: each
// weight word is loaded (and its nibbles split) once for the MB rows, each activation word
// broadcast once per group.
template <int MB, int NB, Kind kind>
void tile(const uint8_t* w, int64_t group_bytes, const at::Half* d, const at::Half* m, int64_t group_scales,
          int64_t G, const Activations& a, int64_t K, float* y, int64_t ldy) {
  constexpr int W = kind == kQ8_0 ? 8 : 4;  // 64-byte words per block per group
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[MB][NB];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i s[MB][NB];
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) s[i][j] = _mm512_set1_epi32(a.init[i * G + g]);
    for (int c = 0; c < W; ++c) {
      for (int j = 0; j < NB; ++j) {
        const __m512i v = _mm512_loadu_si512((const void*)(w + j * group_bytes + (g * W + c) * 64));
        if constexpr (kind == kQ8_0) {
          for (int i = 0; i < MB; ++i)
            s[i][j] = _mm512_dpbusd_epi32(s[i][j], v, broadcast4(a.q + i * K + g * kBlock + 4 * c));
        } else {
          const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
          for (int i = 0; i < MB; ++i) {
            s[i][j] = _mm512_dpbusd_epi32(s[i][j], lo, broadcast4(a.q + i * K + g * kBlock + 4 * c));
            s[i][j] = _mm512_dpbusd_epi32(s[i][j], hi, broadcast4(a.q + i * K + g * kBlock + 16 + 4 * c));
          }
        }
      }
    }
    for (int j = 0; j < NB; ++j) {
      const int64_t at = j * group_scales + g * kLanes;
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d + at)));
      for (int i = 0; i < MB; ++i)
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][j]), _mm512_mul_ps(dw, _mm512_set1_ps(a.dx[i * G + g])),
                                    acc[i][j]);
      if constexpr (kind == kQ4_1) {
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(m + at)));
        for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.sx[i * G + g]), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(y + i * ldy + j * kLanes, acc[i][j]);
}

constexpr int kTileM = 4, kTileN = 4;

template <Kind kind>
using TileFn = void (*)(const uint8_t*, int64_t, const at::Half*, const at::Half*, int64_t, int64_t,
                        const Activations&, int64_t, float*, int64_t);

template <Kind kind, int MB>
constexpr std::array<TileFn<kind>, kTileN> tiles_of() {
  return {&tile<MB, 1, kind>, &tile<MB, 2, kind>, &tile<MB, 3, kind>, &tile<MB, 4, kind>};
}

template <Kind kind>
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m) {
  static const std::array<std::array<TileFn<kind>, kTileN>, kTileM> tiles = {
      tiles_of<kind, 1>(), tiles_of<kind, 2>(), tiles_of<kind, 3>(), tiles_of<kind, 4>()};
  const int64_t M = x.size(0), K = x.size(1), G = K / kBlock, groups = qs.size(0), N = groups * kLanes;
  const Activations a = quantize_activations(x, kind == kQ4_0 ? 8 : kind == kQ8_0 ? 128 : 0);
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint8_t* Wq = qs.data_ptr<uint8_t>();
  const at::Half* D = d.data_ptr<at::Half>();
  const at::Half* Mn = kind == kQ4_1 ? m.data_ptr<at::Half>() : nullptr;
  float* Y = y.data_ptr<float>();
  const int64_t group_bytes = G * (kind == kQ8_0 ? 8 : 4) * 64, group_scales = G * kLanes;
  // One activation row: 4 groups a tile (4 independent integer sums in flight); more rows: 2
  // groups by 4 rows (each weight word serves 4 rows, and the tile's sums fit the 32 registers).
  const int64_t tile_n = M == 1 ? 4 : 2, tasks = (groups + tile_n - 1) / tile_n;
  tandem::parallel_for(tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * tile_n, nb = std::min(tile_n, groups - j0);
      for (int64_t i = 0; i < M; i += kTileM) {
        const int64_t mb = std::min<int64_t>(kTileM, M - i);
        const Activations rows{a.q + i * K, a.dx + i * G, a.init + i * G, a.sx + i * G};
        tiles[mb - 1][nb - 1](Wq + j0 * group_bytes, group_bytes, D + j0 * group_scales,
                              Mn ? Mn + j0 * group_scales : nullptr, group_scales, G, rows, K,
                              Y + i * N + j0 * kLanes, N);
      }
    }
  });
  return y;
}

}  // namespace

// x (M, K) f32 @ a packed GGML weight (see the layout above)^T -> (M, N) f32, N = 16 * qs.size(0).
torch::Tensor ggml_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                          const torch::Tensor& m) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous (M, K) float32 CPU tensor");
  const int64_t K = x.size(1), G = K / kBlock;
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.dim() == 5 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == G &&
              (qs.size(2) == 4 || qs.size(2) == 8) && qs.size(3) == kLanes && qs.size(4) == 4,
              "qs must be a contiguous packed (N/16, K/32, 4 or 8, 16, 4) uint8 tensor for K = ", K);
  TORCH_CHECK(d.dim() == 3 && d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == qs.size(0) &&
              d.size(1) == G && d.size(2) == kLanes, "d must be a contiguous (N/16, K/32, 16) float16 tensor");
  const bool q8 = qs.size(2) == 8, has_m = m.numel() > 0;
  TORCH_CHECK(!has_m || (!q8 && m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous()),
              "m must be empty, or shaped like d for Q4_1 blocks");
  return q8 ? linear<kQ8_0>(x, qs, d, m) : has_m ? linear<kQ4_1>(x, qs, d, m) : linear<kQ4_0>(x, qs, d, m);
}

// One GGML weight as the decode layer passes it: {qs, d, m}.
torch::Tensor ggml_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w) {
  TORCH_CHECK(w.size() == 3, "a GGML weight is {qs, d, m}");
  return ggml_linear(x, w[0], w[1], w[2]);
}
