// CPU matmuls over llama.cpp's own quantized blocks (GGUF Q4_0, Q4_1, Q8_0), with llama.cpp's
// arithmetic: each row of activations is rounded to int8 per block of 32 (its Q8_0/Q8_1 rule:
// scale = amax / 127), the weights stay in their file's 4- or 8-bit blocks with their fp16 scales,
// and every block's dot product is an integer one (AVX512-VNNI vpdpbusd), summed across blocks in
// fp32. Part of the CPU extension tandem/kernels/cpu.py builds at first use (bindings.cpp).
//
// Weight layout (tandem.kernels.ggml_cpu.GGMLWeight splits the file's blocks into these):
//   Q4 (Q4_0 and Q4_1): qs (N, K/2) uint8 -- byte j of block g holds element j in its low nibble
//     and element j + 16 in its high one (the GGUF byte order); d, m (N, K/32) fp16: element
//     = d * q + m (Q4_0 is m = -8 d, exactly).
//   Q8: qs (N, K) uint8 = q + 128 (vpdpbusd multiplies unsigned by signed bytes); d (N, K/32) fp16.
// K must be a multiple of 64 (blocks are taken in pairs: one 512-bit register).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;

// Activation blocks in the order the weight loads expect. Per pair p of blocks (64 bytes):
//   q4 order: [g0 0..15, g1 0..15, g0 16..31, g1 16..31] (the nibble unpacking's order)
//   q8 order: [g0 0..31, g1 0..31] (natural)
// dpat (M, K/64, 16) fp32: the activation scale of each int32 lane's block (lanes of 4 bytes);
// sx (M, K/32) fp32: scale * sum(q) per block, for the weight offset (Q4's m, Q8's 128).
// Held in buffers of the calling thread, reused call after call (a decode step makes ~120 of these
// calls; three tensor allocations each were a measurable share of a batch-1 step).
struct Activations {
  int8_t* q;
  float* dpat;
  float* sx;
};

inline void quantize_row(const float* x, int64_t K, bool q4order, int8_t* q, float* dpat, float* sx) {
  const int64_t G = K / kBlock;
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t g = 0; g < G; ++g) {
    const __m512 a = _mm512_loadu_ps(x + g * kBlock), b = _mm512_loadu_ps(x + g * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, sign_off), _mm512_and_ps(b, sign_off)));
    const float d = amax / 127.f;
    const __m512 id = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));  // round to nearest even
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
    sx[g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    const __m128i lo = _mm512_cvtsepi32_epi8(qa), hi = _mm512_cvtsepi32_epi8(qb);  // elements 0..15, 16..31
    const int64_t p = g / 2, s = g % 2;
    float* pat = dpat + p * 16;
    if (q4order) {
      _mm_storeu_si128((__m128i*)(q + p * 64 + s * 16), lo);
      _mm_storeu_si128((__m128i*)(q + p * 64 + 32 + s * 16), hi);
      for (int l = 0; l < 4; ++l) pat[s * 4 + l] = pat[8 + s * 4 + l] = d;
    } else {
      _mm_storeu_si128((__m128i*)(q + g * kBlock), lo);
      _mm_storeu_si128((__m128i*)(q + g * kBlock + 16), hi);
      for (int l = 0; l < 8; ++l) pat[s * 8 + l] = d;
    }
  }
}

Activations quantize_activations(const torch::Tensor& x, bool q4order) {
  const int64_t M = x.size(0), K = x.size(1);
  thread_local std::vector<int8_t> q_buffer;
  thread_local std::vector<float> dpat_buffer, sx_buffer;
  q_buffer.resize(M * K);
  dpat_buffer.resize(M * (K / 64) * 16);
  sx_buffer.resize(M * (K / kBlock));
  Activations a{q_buffer.data(), dpat_buffer.data(), sx_buffer.data()};
  const float* X = x.data_ptr<float>();
  int8_t* Q = a.q;
  float* P = a.dpat;
  float* S = a.sx;
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(X + m * K, K, q4order, Q + m * K, P + m * (K / 64) * 16, S + m * (K / kBlock));
  });
  return a;
}

// Two fp16 values -> 16 fp32 lanes laid out by idx.
inline __m512 pair_pattern(const at::Half* two, const __m512i& idx) {
  int32_t bits;
  std::memcpy(&bits, two, 4);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(bits))));
}

// sum over the G blocks of w[g] * sx[g], w fp16 (Q4: the blocks' m; Q8: their d), in a fixed order.
inline float offset_dot(const at::Half* w, const float* sx, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= G; g += 16)
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + g))), _mm512_loadu_ps(sx + g), acc);
  if (g < G) {
    const __mmask16 k = (__mmask16)((1u << (G - g)) - 1);
    acc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w + g)), _mm512_maskz_loadu_ps(k, sx + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// y[i, n] for a register tile of MB activation rows x NB weight rows: each weight pair is
// unpacked once for the MB rows, each activation pair loaded once for the NB rows. For every
// (n, i) the arithmetic is the same whatever the tile (the sum over pairs in order, one reduce,
// then the offset term), so a row's result never depends on the batch around it.
template <int MB, int NB, bool Q4>
void dot_tile(const uint8_t* w, int64_t row_bytes, const at::Half* d, const at::Half* m, int64_t K,
              const int8_t* xq, const float* dpat, const float* sx, float* y, int64_t ldy) {
  const __m512i idx = Q4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                         : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t P = K / 64, G = K / kBlock;
  __m512 acc[NB][MB];
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512i wq[NB];
    __m512 dw[NB];
    for (int j = 0; j < NB; ++j) {
      const uint8_t* wr = w + j * row_bytes;
      if constexpr (Q4) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(wr + p * 32));
        wq[j] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, nibble)),
                                   _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), 1);
      } else {
        wq[j] = _mm512_loadu_si512((const void*)(wr + p * 64));
      }
      dw[j] = pair_pattern(d + j * G + 2 * p, idx);
    }
    for (int i = 0; i < MB; ++i) {
      const __m512i a = _mm512_loadu_si512((const void*)(xq + i * K + p * 64));
      const __m512 dx = _mm512_loadu_ps(dpat + (i * P + p) * 16);
      for (int j = 0; j < NB; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[j], a);
        acc[j][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw[j], dx), acc[j][i]);
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int i = 0; i < MB; ++i) {
      // Q4: + sum over blocks of m * dx * sum(qx); Q8 holds q + 128: - 128 * d * dx * sum(qx)
      const float off = offset_dot((Q4 ? m : d) + j * G, sx + i * G, G);
      y[i * ldy + j] = _mm512_reduce_add_ps(acc[j][i]) + (Q4 ? off : -128.f * off);
    }
}

template <bool Q4>
using TileFn = void (*)(const uint8_t*, int64_t, const at::Half*, const at::Half*, int64_t, const int8_t*,
                        const float*, const float*, float*, int64_t);

template <bool Q4, int MB>
constexpr std::array<TileFn<Q4>, 4> tiles_of() {
  return {&dot_tile<MB, 1, Q4>, &dot_tile<MB, 2, Q4>, &dot_tile<MB, 3, Q4>, &dot_tile<MB, 4, Q4>};
}

template <bool Q4>
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, const torch::Tensor& m) {
  constexpr int64_t kTileN = 2, kTileM = 4;
  static const std::array<std::array<TileFn<Q4>, 4>, 4> tiles = {tiles_of<Q4, 1>(), tiles_of<Q4, 2>(),
                                                                  tiles_of<Q4, 3>(), tiles_of<Q4, 4>()};
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), G = K / kBlock, P = K / 64;
  const Activations a = quantize_activations(x, Q4);
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint8_t* W = qs.data_ptr<uint8_t>();
  const at::Half* D = d.data_ptr<at::Half>();
  const at::Half* Mn = Q4 ? m.data_ptr<at::Half>() : D;
  const int8_t* XQ = a.q;
  const float* DP = a.dpat;
  const float* SX = a.sx;
  float* Y = y.data_ptr<float>();
  const int64_t row_bytes = Q4 ? K / 2 : K;
  const int64_t groups = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n = g * kTileN, nb = std::min(kTileN, N - n);
      for (int64_t i = 0; i < M; i += kTileM) {
        const int64_t mb = std::min(kTileM, M - i);
        tiles[mb - 1][nb - 1](W + n * row_bytes, row_bytes, D + n * G, Mn + n * G, K, XQ + i * K,
                              DP + i * P * 16, SX + i * G, Y + i * N + n, N);
      }
    }
  });
  return y;
}

void check(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d, bool q4) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous (M, K) float32 CPU tensor");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64, got ", K);
  TORCH_CHECK(qs.dim() == 2 && qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.size(1) == (q4 ? K / 2 : K),
              "qs must be a contiguous (N, ", q4 ? "K/2" : "K", ") uint8 tensor for K = ", K);
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == qs.size(0) &&
              d.size(1) == K / kBlock, "d must be a contiguous (N, K/32) float16 tensor");
}

}  // namespace

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m) {
  check(x, qs, d, true);
  TORCH_CHECK(m.sizes() == d.sizes() && m.scalar_type() == at::kHalf && m.is_contiguous(), "m must be shaped like d");
  return linear<true>(x, qs, d, m);
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d) {
  check(x, qs, d, false);
  return linear<false>(x, qs, d, d);
}

// One GGML weight as the decode layer passes it: {qs, d} (Q8) or {qs, d, m} (Q4).
torch::Tensor ggml_linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w) {
  TORCH_CHECK(w.size() == 2 || w.size() == 3, "a GGML weight is {qs, d} (Q8) or {qs, d, m} (Q4)");
  return w.size() == 3 ? q4_linear(x, w[0], w[1], w[2]) : q8_linear(x, w[0], w[1]);
}
