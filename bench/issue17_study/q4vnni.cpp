// A llama.cpp-style CPU matmul for torch: activations rounded to int8 per block of 32 (like Q8_1),
// weights kept in the GGUF's own Q4_1 (4-bit + fp16 scale + fp16 min per 32) or Q8_0 (int8 + fp16
// scale per 32) blocks, integer dot products with AVX512-VNNI (vpdpbusd), fp32 accumulation across
// blocks. Built at first use with torch.utils.cpp_extension (gcc); see vnni_ext.py.
//
// q41_linear(x (M,K) f32, qs (N,K/2) u8, d (N,K/32) f16, mn (N,K/32) f16) -> (M,N) f32
//   weight element j of group g of row n: d*q + mn, q = (j < 16 ? qs[g*16+j] & 15 : qs[g*16+j-16] >> 4)
//   (exactly the Q4_1 block layout: the GGUF bytes split into scales, mins and nibbles).
// q80_linear(x (M,K) f32, qu (N,K) u8 = q + 128, d (N,K/32) f16) -> (M,N) f32   (Q8_0)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

// Quantize each row of x to int8 per block of 32 (symmetric, amax/127 as llama.cpp's Q8_0/Q8_1).
// dxpat: (M, G/2, 16) the per-lane scale pattern of a pair of blocks in the kernel's lane order;
// sx: (M, G) = d * sum(q) (Q8_1's s), used by the min / offset term.
// q4order: per pair of blocks the 64 bytes are [g0 0..15, g1 0..15, g0 16..31, g1 16..31]
// (matching the nibble unpacking), else natural order [g0 0..31, g1 0..31].
void quant_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dxpat, float* sx, bool q4order) {
  const int64_t G = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = xq + m * K;
    for (int64_t g = 0; g < G; ++g) {
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xr[g * 32 + j]));
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      int8_t tmp[32];
      int sum = 0;
      for (int j = 0; j < 32; ++j) {
        const int v = (int)std::nearbyint(xr[g * 32 + j] * id);
        tmp[j] = (int8_t)v;
        sum += v;
      }
      sx[m * G + g] = d * (float)sum;
      const int64_t p = g / 2, s = g % 2;
      float* pat = dxpat + (m * (G / 2) + p) * 16;
      if (q4order) {
        for (int l = 0; l < 4; ++l) { pat[s * 4 + l] = d; pat[8 + s * 4 + l] = d; }
        int8_t* base = qr + p * 64 + s * 16;
        for (int j = 0; j < 16; ++j) { base[j] = tmp[j]; base[32 + j] = tmp[16 + j]; }
      } else {
        for (int l = 0; l < 8; ++l) pat[s * 8 + l] = d;
        for (int j = 0; j < 32; ++j) qr[g * 32 + j] = tmp[j];
      }
    }
  }
}

inline __m512 load_pair_pattern_f16(const at::Half* p2, const __m512i& idx) {
  // two fp16 scales -> 16 floats in the kernel's lane pattern
  int32_t bits;
  std::memcpy(&bits, p2, 4);
  __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f));
}

template <int MB, bool Q4>
inline void row_kernel(const uint8_t* wr, const at::Half* dr, const at::Half* mr, int64_t K, int64_t G,
                       const int8_t* xq, const float* dxpat, const float* sx, float* y, int64_t N, int64_t n) {
  const __m512i idx = Q4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1)
                         : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m512 acc[MB];
  __m128 accm[MB];
  for (int i = 0; i < MB; ++i) { acc[i] = _mm512_setzero_ps(); accm[i] = _mm_setzero_ps(); }
  const int64_t P = G / 2;
  for (int64_t p = 0; p < P; ++p) {
    __m512i w;
    if constexpr (Q4) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(wr + p * 32));
      const __m256i lo = _mm256_and_si256(v, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    } else {
      w = _mm512_loadu_si512((const void*)(wr + p * 64));
    }
    const __m512 dw = load_pair_pattern_f16(dr + 2 * p, idx);
    int32_t mbits;
    std::memcpy(&mbits, (Q4 ? mr : dr) + 2 * p, 4);
    const __m128 mv = _mm_cvtph_ps(_mm_cvtsi32_si128(mbits));  // lanes 0, 1: the pair's min (or scale)
    for (int i = 0; i < MB; ++i) {
      const __m512i a = _mm512_loadu_si512((const void*)(xq + i * K + p * 64));
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
      const __m512 dx = _mm512_loadu_ps(dxpat + (i * P + p) * 16);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, dx), acc[i]);
      const __m128 s2 = _mm_castpd_ps(_mm_load_sd((const double*)(sx + i * G + 2 * p)));
      accm[i] = _mm_fmadd_ps(mv, s2, accm[i]);
    }
  }
  for (int i = 0; i < MB; ++i) {
    float r = _mm512_reduce_add_ps(acc[i]);
    alignas(16) float t[4];
    _mm_store_ps(t, accm[i]);
    const float off = t[0] + t[1];
    y[i * N + n] = Q4 ? r + off : r - 128.f * off;  // Q8_0 stored as q + 128: subtract 128 * d * sum(qx)
  }
}

template <bool Q4>
torch::Tensor linear_impl(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor mn) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) float32");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / 32;
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.size(0) == N && d.size(1) == G, "d must be (N, K/32) f16");
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto dxpat = torch::empty({M, G / 2, 16}, torch::kFloat);
  auto sx = torch::empty({M, G}, torch::kFloat);
  quant_rows(x.data_ptr<float>(), M, K, xq.data_ptr<int8_t>(), dxpat.data_ptr<float>(), sx.data_ptr<float>(), Q4);
  auto y = torch::empty({M, N}, torch::kFloat);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const at::Half* D = d.data_ptr<at::Half>();
  const at::Half* MN = Q4 ? mn.data_ptr<at::Half>() : D;
  const int8_t* XQ = xq.data_ptr<int8_t>();
  const float* DX = dxpat.data_ptr<float>();
  const float* SX = sx.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t row_bytes = Q4 ? K / 2 : K;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* wr = W + n * row_bytes;
      const at::Half* dr = D + n * G;
      const at::Half* mr = MN + n * G;
      int64_t m0 = 0;
      for (; m0 + 4 <= M; m0 += 4)
        row_kernel<4, Q4>(wr, dr, mr, K, G, XQ + m0 * K, DX + m0 * (G / 2) * 16, SX + m0 * G, Y + m0 * N, N, n);
      switch (M - m0) {
        case 3: row_kernel<3, Q4>(wr, dr, mr, K, G, XQ + m0 * K, DX + m0 * (G / 2) * 16, SX + m0 * G, Y + m0 * N, N, n); break;
        case 2: row_kernel<2, Q4>(wr, dr, mr, K, G, XQ + m0 * K, DX + m0 * (G / 2) * 16, SX + m0 * G, Y + m0 * N, N, n); break;
        case 1: row_kernel<1, Q4>(wr, dr, mr, K, G, XQ + m0 * K, DX + m0 * (G / 2) * 16, SX + m0 * G, Y + m0 * N, N, n); break;
        default: break;
      }
    }
  });
  return y;
}

}  // namespace

torch::Tensor q41_linear(torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor mn) {
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.size(1) * 2 == x.size(1), "qs must be (N, K/2) uint8");
  return linear_impl<true>(x, qs.contiguous(), d.contiguous(), mn.contiguous());
}

torch::Tensor q80_linear(torch::Tensor x, torch::Tensor qu, torch::Tensor d) {
  TORCH_CHECK(qu.scalar_type() == at::kByte && qu.size(1) == x.size(1), "qu must be (N, K) uint8 (q + 128)");
  return linear_impl<false>(x, qu.contiguous(), d.contiguous(), d);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q41_linear", &q41_linear, "Q4_1 weights x int8 (per-32) activations, AVX512-VNNI");
  m.def("q80_linear", &q80_linear, "Q8_0 weights x int8 (per-32) activations, AVX512-VNNI");
}
