// Group-quantized weights times fp32 activations: y = x W_hat^T with W_hat = q * s + z per group.
//
//   q      codes, int4 (two per byte) or int8, one row of K per output feature
//   s, z   fp32 scale and offset per (output row, group of G inputs); z = -zero_point * s, or the
//          GGUF "min" (Q4_1: w = d q + m), or 0 (symmetric / Q8_0)
//
// The weights are dequantized in registers, one 32-input chunk at a time, and multiplied against up
// to eight activation rows while they are hot, so a decode step reads each quantized byte once.
// Activations stay fp32 (no activation rounding: the result equals the dequantized matmul up to
// summation order), unlike torch's int4/int8 CPU kernels, whose fast paths take bf16 activations
// and bf16 scales.
//
// int4 layout: within each chunk of 32 inputs, byte i holds input i in its low nibble and input
// i + 16 in its high nibble: exactly the byte order of GGUF's Q4_0 / Q4_1 blocks, so those repack
// by copying.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunk = 32;
// Rows per tile: up to 4 in the two-chunk kernel, 5 to 8 in the one-chunk ("wide") kernel.
#if defined(__AVX512F__)
constexpr int kMaxWideRows = 8;
#else
constexpr int kMaxWideRows = 4;
#endif

struct QuantWeight {
  const uint8_t* q;
  const float* s;
  const float* z;  // may be null
  int64_t n, k, group, row_bytes;
  int bits;
};

#if defined(__AVX512F__)

// The 32 dequantized weights of chunk c of a row, as two vectors of 16. For int4 the 16 possible
// values q s + z of the chunk's group form a table and vpermps looks each nibble up (it reads only
// the low 4 bits of each index lane, so the low nibbles need no masking): two shuffles replace
// two int->float conversions and two FMAs per chunk.
template <int BITS>
inline void load_chunk(const uint8_t* row, int64_t c, float scale, float offset, __m512& w0, __m512& w1) {
  if constexpr (BITS == 4) {
    const __m512 table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
    w0 = _mm512_permutexvar_ps(b, table);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  } else {
    const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 32)));
    const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 32 + 16)));
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
  }
}

template <int BITS, int ROWS>
void rows_times_weights(const float* x, int64_t ldx, const QuantWeight& w, float* y, int64_t ldy, int64_t n0,
                        int64_t n1, const int32_t* group_of_chunk) {
  // Two chunks per iteration, each with its own accumulators (4 independent FMA chains per row):
  // with one chain, a GEMV waits on FMA latency instead of streaming weights.
  const int64_t groups = w.k / w.group, chunks = w.k / kChunk;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    const float* sn = w.s + n * groups;
    const float* zn = w.z != nullptr ? w.z + n * groups : nullptr;
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c += 2) {
      const bool pair = c + 1 < chunks;
      const int32_t ga = group_of_chunk[c], gb = group_of_chunk[pair ? c + 1 : c];
      __m512 a0, a1, b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
      load_chunk<BITS>(row, c, sn[ga], zn != nullptr ? zn[ga] : 0.f, a0, a1);
      if (pair) load_chunk<BITS>(row, c + 1, sn[gb], zn != nullptr ? zn[gb] : 0.f, b0, b1);
      const float* xc = x + c * kChunk;
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        const float* xr = xc + r * ldx;
        acc[r][0] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(xr), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(xr + 16), acc[r][1]);
        if (pair) {
          acc[r][2] = _mm512_fmadd_ps(b0, _mm512_loadu_ps(xr + 32), acc[r][2]);
          acc[r][3] = _mm512_fmadd_ps(b1, _mm512_loadu_ps(xr + 48), acc[r][3]);
        }
      }
    }
    for (int r = 0; r < ROWS; ++r)
      y[r * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                          _mm512_add_ps(acc[r][2], acc[r][3])));
  }
}

// Five to eight rows (e.g. a speculative verification: the last token and its drafts): one chunk per
// iteration with two accumulators per row, so the dequantized chunk is reused by every row while the
// 16 accumulators stay in registers, instead of dequantizing it again for a second tile.
template <int BITS, int ROWS>
void wide_rows_times_weights(const float* x, int64_t ldx, const QuantWeight& w, float* y, int64_t ldy, int64_t n0,
                             int64_t n1, const int32_t* group_of_chunk) {
  const int64_t groups = w.k / w.group, chunks = w.k / kChunk;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    const float* sn = w.s + n * groups;
    const float* zn = w.z != nullptr ? w.z + n * groups : nullptr;
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t g = group_of_chunk[c];
      __m512 a0, a1;
      load_chunk<BITS>(row, c, sn[g], zn != nullptr ? zn[g] : 0.f, a0, a1);
      const float* xc = x + c * kChunk;
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        acc[r][0] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(xc + r * ldx), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(xc + r * ldx + 16), acc[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r) y[r * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
  }
}

#else  // portable: the same arithmetic, one weight at a time

template <int BITS, int ROWS>
void rows_times_weights(const float* x, int64_t ldx, const QuantWeight& w, float* y, int64_t ldy, int64_t n0,
                        int64_t n1, const int32_t* /*group_of_chunk*/) {
  const int64_t groups = w.k / w.group;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    float acc[ROWS] = {};
    for (int64_t k = 0; k < w.k; ++k) {
      int code;
      if constexpr (BITS == 4) {
        const int64_t c = k / kChunk, i = k % kChunk;
        const uint8_t b = row[c * 16 + (i & 15)];
        code = i < 16 ? (b & 0xF) : (b >> 4);
      } else {
        code = static_cast<int8_t>(row[k]);
      }
      const int64_t g = k / w.group;
      const float wk = static_cast<float>(code) * w.s[n * groups + g] + (w.z != nullptr ? w.z[n * groups + g] : 0.f);
      for (int r = 0; r < ROWS; ++r) acc[r] += wk * x[r * ldx + k];
    }
    for (int r = 0; r < ROWS; ++r) y[r * ldy + n] = acc[r];
  }
}

#endif

template <int BITS>
void gemm(const float* x, int64_t m, const QuantWeight& w, float* y) {
  std::vector<int32_t> group_of_chunk(w.k / kChunk);
  for (size_t c = 0; c < group_of_chunk.size(); ++c) group_of_chunk[c] = static_cast<int32_t>(c * kChunk / w.group);
  const int32_t* gc = group_of_chunk.data();
  // Few output rows per task: a decode GEMV has N of a few hundred, and both cores must get work.
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = 0; r < m;) {
      const float* xr = x + r * w.k;
      float* yr = y + r * w.n;
      const int64_t rows = std::min<int64_t>(kMaxWideRows, m - r);
      switch (rows) {
        case 1: rows_times_weights<BITS, 1>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
        case 2: rows_times_weights<BITS, 2>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
        case 3: rows_times_weights<BITS, 3>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
        case 4: rows_times_weights<BITS, 4>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
#if defined(__AVX512F__)
        case 5: wide_rows_times_weights<BITS, 5>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
        case 6: wide_rows_times_weights<BITS, 6>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
        case 7: wide_rows_times_weights<BITS, 7>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
        default: wide_rows_times_weights<BITS, 8>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
#else
        default: rows_times_weights<BITS, 4>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
#endif
      }
      r += rows;
    }
  });
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& offsets, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quant_linear: activations must be fp32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte || qweight.scalar_type() == at::kChar,
              "quant_linear: codes must be uint8 (int4 pairs) or int8");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "quant_linear: codes must be a contiguous [N, bytes]");
  const int64_t n = qweight.size(0), k = x.size(-1);
  TORCH_CHECK(group % kChunk == 0 && k % group == 0, "quant_linear: group size ", group,
              " must be a multiple of 32 dividing the input size ", k);
  TORCH_CHECK(qweight.size(1) == (bits == 4 ? k / 2 : k), "quant_linear: codes have ", qweight.size(1),
              " bytes per row; expected ", bits == 4 ? k / 2 : k);
  auto s = scales.to(at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == n * (k / group), "quant_linear: scales must be [N, K / group]");
  at::Tensor z;
  if (offsets.has_value() && offsets->defined()) {
    z = offsets->to(at::kFloat).contiguous();
    TORCH_CHECK(z.numel() == s.numel(), "quant_linear: offsets must match scales");
  }
  auto xc = x.contiguous();
  const int64_t m = xc.numel() / k;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = at::empty(sizes, x.options());
  const QuantWeight w{static_cast<const uint8_t*>(qweight.data_ptr()),
                      s.data_ptr<float>(), z.defined() ? z.data_ptr<float>() : nullptr, n, k, group, qweight.size(1),
                      static_cast<int>(bits)};
  if (bits == 4) gemm<4>(xc.data_ptr<float>(), m, w, y.data_ptr<float>());
  else gemm<8>(xc.data_ptr<float>(), m, w, y.data_ptr<float>());
  return y;
}

// The fp32 weight [N, K] (q s + z per group), for products with many rows, where a BLAS GEMM on the
// dequantized weight beats dequantizing in registers once per row tile.
at::Tensor quant_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                            int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 8, "quant_dequantize: bits must be 4 or 8");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "quant_dequantize: codes must be a contiguous [N, bytes]");
  const int64_t n = qweight.size(0), k = bits == 4 ? qweight.size(1) * 2 : qweight.size(1);
  TORCH_CHECK(group > 0 && k % group == 0 && (bits == 8 || group % kChunk == 0), "quant_dequantize: bad group size");
  auto s = scales.to(at::kFloat).contiguous();
  TORCH_CHECK(s.numel() == n * (k / group), "quant_dequantize: scales must be [N, K / group]");
  at::Tensor z;
  if (offsets.has_value() && offsets->defined() && offsets->numel() > 0) z = offsets->to(at::kFloat).contiguous();
  auto w = at::empty({n, k}, scales.options().dtype(at::kFloat));
  const uint8_t* q = static_cast<const uint8_t*>(qweight.data_ptr());
  const float* sp = s.data_ptr<float>();
  const float* zp = z.defined() ? z.data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  const int64_t groups = k / group, row_bytes = qweight.size(1);
  at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r) {
      const uint8_t* row = q + r * row_bytes;
      float* out = wp + r * k;
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = sp[r * groups + g], off = zp != nullptr ? zp[r * groups + g] : 0.f;
        float* o = out + g * group;
        if (bits == 4) {
          for (int64_t c = 0; c < group / kChunk; ++c) {
            const uint8_t* b = row + (g * group + c * kChunk) / 2;
            float* oc = o + c * kChunk;
#pragma omp simd
            for (int i = 0; i < 16; ++i) {
              oc[i] = static_cast<float>(b[i] & 0xF) * sc + off;
              oc[i + 16] = static_cast<float>(b[i] >> 4) * sc + off;
            }
          }
        } else {
          const int8_t* b = reinterpret_cast<const int8_t*>(row) + g * group;
#pragma omp simd
          for (int64_t i = 0; i < group; ++i) o[i] = static_cast<float>(b[i]) * sc + off;
        }
      }
    }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
  m.def("quant_dequantize(Tensor qweight, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("quant_linear", quant_linear);
  m.impl("quant_dequantize", quant_dequantize);
}
