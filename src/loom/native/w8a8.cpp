// The activation side of int8 x int8 GEMMs (W8A8, LinearKind.ONEDNN_W8A8): each row of x quantized to int8
// with its own scale, optionally after a block Hadamard transform, and the int32-exact products scaled
// back row by row.
//
//   quantize_rows_int8:  x'_m = x_m H_b (H_b: b x b Sylvester Hadamard blocks, unnormalized, b = 0: none)
//                        s_m = max_k |x'_mk| / 127,  q_mk = round(x'_mk / s_m) in [-127, 127]
//                        returns (q, s_m / sqrt(b)) so that q_m s_m ~ x_m H_b / sqrt(b), an orthonormal map
//   scale_rows:          y_mn = acc_mn s_m (+ bias_n), rounded once to the output type
//
// The Hadamard transform spreads a row's outlier channels over its block (QuaRot, Ashkboos et al. 2024), so
// one scale per row loses less; the weights were multiplied by the same orthonormal blocks offline.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using loom_native::widen;

#if defined(__AVX512F__)
// The butterflies of strides 1, 2, 4 and 8 inside one vector of 16: x_j +- x_{j^h}, the upper member of each
// pair taking the difference. (Scalar, these stages had inner loops of 1 to 8 elements: 14x slower.)
[[gnu::always_inline]] inline __m512 hadamard16(__m512 a) {
  __m512 y = _mm512_shuffle_f32x4(a, a, 0x4E);  // stride 8: swap the 256-bit halves
  a = _mm512_mask_sub_ps(_mm512_add_ps(a, y), 0xFF00, y, a);
  y = _mm512_shuffle_f32x4(a, a, 0xB1);  // stride 4: swap neighbouring 128-bit lanes
  a = _mm512_mask_sub_ps(_mm512_add_ps(a, y), 0xF0F0, y, a);
  y = _mm512_permute_ps(a, 0x4E);  // stride 2
  a = _mm512_mask_sub_ps(_mm512_add_ps(a, y), 0xCCCC, y, a);
  y = _mm512_permute_ps(a, 0xB1);  // stride 1
  return _mm512_mask_sub_ps(_mm512_add_ps(a, y), 0xAAAA, y, a);
}
#endif

// In place: row (length n, a multiple of b) times the unnormalized Sylvester Hadamard matrix, block by block:
// one butterfly stage per bit of the index (the stages commute).
void hadamard_blocks(float* row, int64_t n, int64_t b) {
  for (int64_t base = 0; base < n; base += b) {
    float* x = row + base;
    int64_t h = 1;
#if defined(__AVX512F__)
    if (b >= 16) {
      for (int64_t i = 0; i < b; i += 16) _mm512_storeu_ps(x + i, hadamard16(_mm512_loadu_ps(x + i)));
      h = 16;
    }
#endif
    for (; h < b; h *= 2) {
      for (int64_t i = 0; i < b; i += 2 * h) {
#pragma omp simd
        for (int64_t j = i; j < i + h; ++j) {
          const float a = x[j], c = x[j + h];
          x[j] = a + c;
          x[j + h] = a - c;
        }
      }
    }
  }
}

template <typename T>
void quantize_rows(const T* x, int8_t* q, float* scales, int64_t rows, int64_t k, int64_t block) {
  const float norm = block > 0 ? 1.f / std::sqrt(static_cast<float>(block)) : 1.f;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(k);
    for (int64_t m = begin; m < end; ++m) {
      const T* xm = x + m * k;
      float* v = buf.data();
#pragma omp simd
      for (int64_t i = 0; i < k; ++i) v[i] = widen(xm[i]);
      if (block > 0) hadamard_blocks(v, k, block);
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int64_t i = 0; i < k; ++i) amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
      const float s = amax > 0.f ? amax / 127.f : 1.f;
      const float inv = 1.f / s;
      int8_t* qm = q + m * k;
      int64_t i = 0;
#if defined(__AVX512F__)
      // cvtps_epi32 rounds half to even (the default MXCSR mode), as torch.round; nearbyint kept the loop scalar.
      const __m512 vinv = _mm512_set1_ps(inv), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
      for (; i + 16 <= k; i += 16) {
        const __m512 r = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(v + i), vinv), lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qm + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
      }
#endif
      for (; i < k; ++i) {
        float r = std::nearbyint(v[i] * inv);  // round half to even, as torch.round
        r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
        qm[i] = static_cast<int8_t>(r);
      }
      scales[m] = s * norm;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 2, "quantize_rows_int8: x must be [rows, k]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "quantize_rows_int8: fp32 or bf16");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(block == 0 || (block > 0 && (block & (block - 1)) == 0 && k % block == 0),
              "quantize_rows_int8: the Hadamard block must be a power of two dividing k");
  auto xc = x.contiguous();
  auto q = at::empty({rows, k}, x.options().dtype(at::kChar));
  auto s = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16) {
    quantize_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), q.data_ptr<int8_t>(),
                  s.data_ptr<float>(), rows, k, block);
  } else {
    quantize_rows(xc.data_ptr<float>(), q.data_ptr<int8_t>(), s.data_ptr<float>(), rows, k, block);
  }
  return {q, s};
}

at::Tensor scale_rows(const at::Tensor& acc, const at::Tensor& scales, const at::Tensor& bias, at::ScalarType dtype) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kFloat, "scale_rows: acc must be fp32 [rows, n]");
  TORCH_CHECK(scales.numel() == acc.size(0) && scales.scalar_type() == at::kFloat, "scale_rows: one fp32 scale a row");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "scale_rows: the output is fp32 or bf16");
  const int64_t rows = acc.size(0), n = acc.size(1);
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == n, "scale_rows: bias must have n elements");
  auto a = acc.contiguous();
  auto sc = scales.contiguous();
  auto bf = bias.numel() > 0 ? bias.to(at::kFloat).contiguous() : bias;
  auto out = at::empty({rows, n}, acc.options().dtype(dtype));
  const float *ap = a.data_ptr<float>(), *sp = sc.data_ptr<float>();
  const float* bp = bias.numel() > 0 ? bf.data_ptr<float>() : nullptr;
  const bool narrow = dtype == at::kBFloat16;
  float* of = narrow ? nullptr : out.data_ptr<float>();
  uint16_t* ob = narrow ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float s = sp[m];
      const float* am = ap + m * n;
      if (narrow) {
        uint16_t* o = ob + m * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = loom_native::float_to_bf16(am[j] * s + (bp ? bp[j] : 0.f));
      } else {
        float* o = of + m * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) o[j] = am[j] * s + (bp ? bp[j] : 0.f);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("quantize_rows_int8(Tensor x, int block) -> (Tensor, Tensor)");
  m.def("scale_rows(Tensor acc, Tensor scales, Tensor bias, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("quantize_rows_int8", quantize_rows_int8);
  m.impl("scale_rows", scale_rows);
}
