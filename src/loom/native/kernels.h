// The building blocks of loom's native CPU code, shared by the torch ops (quant_gemm.cpp,
// paged_attention.cpp, fused.cpp) and the native decode step (decode_step.cpp), which calls them
// directly inside one parallel region instead of through the dispatcher.
//
// Every function here works on raw fp32 (or cache-typed) pointers over a range of its output, so a
// caller decides how the work is split between threads.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace loom_native {

[[gnu::always_inline]] inline void store(float* y, float v, bool accumulate) { *y = accumulate ? *y + v : v; }

// ---------------------------------------------------------------------------------------------
// Group-quantized weights times fp32 activations (see quant_gemm.cpp for the format).

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
  // fp16 scales and offsets (raw bits) instead of s / z, where the weights' are exact in fp16 (GGUF's d and m):
  // half the bytes per group the kernel streams besides the codes
  const uint16_t* hs = nullptr;
  const uint16_t* hz = nullptr;
};

// Bytes of one 32-input chunk of a row: int4 16 (two codes a byte), int5 20 (the int4 nibbles, then a
// little-endian uint32 whose bit i is input i's fifth bit: GGUF Q5_0's qs | qh, reordered), int8 32.
constexpr int64_t chunk_bytes(int bits) { return bits == 4 ? 16 : bits == 5 ? 20 : 32; }

// Codes per row from the bytes per row.
inline int64_t inputs_of(int64_t row_bytes, int64_t bits) {
  return bits == 4 ? row_bytes * 2 : bits == 5 ? row_bytes / 20 * 32 : row_bytes;
}

// fp16 bits -> fp32 (every value, subnormals and infinities included; F16C where the build has it).
[[gnu::always_inline]] inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while ((m & 0x400) == 0);
    bits = sign | ((112 - e) << 23) | ((m & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// The most groups per row whose fp16 scales a kernel widens into its stack (quant_weight checks it).
constexpr int64_t kMaxHalfGroups = 1024;

// A QuantWeight over codes q [n, row_bytes] with scales s and offsets z (z undefined or empty: none), both
// fp32 or both fp16 (read as raw bits): the checks every entry point makes, in one place.
inline QuantWeight quant_weight(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t bits,
                                int64_t group, const char* op) {
  const int64_t n = q.size(0), k = inputs_of(q.size(1), bits);
  const bool half = s.scalar_type() == at::kHalf;
  TORCH_CHECK((half || s.scalar_type() == at::kFloat) && s.is_contiguous() && s.numel() == n * (k / group), op,
              ": scales must be contiguous fp32 or fp16 [N, K / group]");
  const bool has_z = z.defined() && z.numel() > 0;
  TORCH_CHECK(!has_z || (z.scalar_type() == s.scalar_type() && z.is_contiguous() && z.numel() == s.numel()), op,
              ": offsets must be empty or contiguous like the scales (same dtype)");
  TORCH_CHECK(!half || k / group <= kMaxHalfGroups, op, ": fp16 scales take at most ", kMaxHalfGroups,
              " groups per row (give fp32 scales)");
  QuantWeight w{static_cast<const uint8_t*>(q.data_ptr()), nullptr, nullptr, n, k, group, q.size(1),
                static_cast<int>(bits)};
  if (half) {
    w.hs = static_cast<const uint16_t*>(s.data_ptr());
    w.hz = has_z ? static_cast<const uint16_t*>(z.data_ptr()) : nullptr;
  } else {
    w.s = s.data_ptr<float>();
    w.z = has_z ? z.data_ptr<float>() : nullptr;
  }
  return w;
}

// Row n's scales and offsets as fp32 (zn null: none): pointers into the weight's fp32 arrays, or its fp16
// ones widened 16 at a time into sbuf / zbuf, once per row (a conversion per chunk costs more than it saves).
template <typename S>
[[gnu::always_inline]] inline void row_scales(const QuantWeight& w, int64_t n, int64_t groups, float* sbuf, float* zbuf,
                                              const float*& sn, const float*& zn) {
  if constexpr (std::is_same_v<S, float>) {
    sn = w.s + n * groups;
    zn = w.z != nullptr ? w.z + n * groups : nullptr;
  } else {
    auto widen = [&](const uint16_t* src, float* dst) {
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= groups; i += 16)
        _mm512_store_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
      for (; i < groups; ++i) dst[i] = half_to_float(src[i]);
    };
    widen(w.hs + n * groups, sbuf);
    sn = sbuf;
    if (w.hz != nullptr) widen(w.hz + n * groups, zbuf);
    zn = w.hz != nullptr ? zbuf : nullptr;
  }
}

#if defined(__AVX512F__)

// The 32 dequantized weights of chunk c of a row, as two vectors of 16. For int4 the 16 possible
// values q s + z of the chunk's group form a table and vpermps looks each nibble up (it reads only
// the low 4 bits of each index lane, so the low nibbles need no masking): two shuffles replace
// two int->float conversions and two FMAs per chunk.
// int8 codes may change group at the chunk's middle (groups of 16: GGUF's Q6_K sub-blocks), so the second
// half takes its own scale and offset; int4 groups are whole chunks (the table is built once).
template <int BITS>
[[gnu::always_inline]] inline void load_chunk(const uint8_t* row, int64_t c, float scale, float offset, float scale1,
                                              float offset1, __m512& w0, __m512& w1) {
  if constexpr (BITS == 4) {
    const __m512 table = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 16)));
    w0 = _mm512_permutexvar_ps(b, table);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
  } else if constexpr (BITS == 5) {
    // 32 values (q - 16) s + z in two registers; vpermt2ps looks up a 5-bit index: the nibble, plus 16
    // where the input's fifth bit is set (the bit mask selects the lanes).
    const __m512 lo = _mm512_fmadd_ps(_mm512_setr_ps(-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3,
                                                     -2, -1),
                                      _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    const __m512 hi = _mm512_fmadd_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    const uint8_t* chunk = row + c * 20;
    uint32_t high;
    std::memcpy(&high, chunk + 16, 4);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk)));
    const __m512i sixteen = _mm512_set1_epi32(16), low_nibble = _mm512_set1_epi32(15);
    const __m512i i0 = _mm512_mask_or_epi32(_mm512_and_si512(b, low_nibble), static_cast<__mmask16>(high),
                                            _mm512_and_si512(b, low_nibble), sixteen);
    const __m512i n1 = _mm512_srli_epi32(b, 4);
    const __m512i i1 = _mm512_mask_or_epi32(n1, static_cast<__mmask16>(high >> 16), n1, sixteen);
    w0 = _mm512_permutex2var_ps(lo, i0, hi);
    w1 = _mm512_permutex2var_ps(lo, i1, hi);
  } else {
    const __m512i lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 32)));
    const __m512i hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c * 32 + 16)));
    w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(scale1), _mm512_set1_ps(offset1));
  }
}

template <int BITS, int ROWS, bool ACC, typename S>
void rows_times_weights(const float* x, int64_t ldx, const QuantWeight& w, float* y, int64_t ldy, int64_t n0,
                        int64_t n1, const int32_t* group_of_half) {
  // Two chunks per iteration, each with its own accumulators (4 independent FMA chains per row):
  // with one chain, a GEMV waits on FMA latency instead of streaming weights.
  const int64_t groups = w.k / w.group, chunks = w.k / kChunk;
  alignas(64) float sbuf[kMaxHalfGroups], zbuf[kMaxHalfGroups];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    const float *sn, *zn;
    row_scales<S>(w, n, groups, sbuf, zbuf, sn, zn);
    __m512 acc[ROWS][4];
    for (int r = 0; r < ROWS; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; c += 2) {
      const bool pair = c + 1 < chunks;
      const int32_t* ga = group_of_half + 2 * c;
      const int32_t* gb = group_of_half + 2 * (pair ? c + 1 : c);
      __m512 a0, a1, b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
      load_chunk<BITS>(row, c, sn[ga[0]], (zn != nullptr ? zn[ga[0]] : 0.f), sn[ga[1]],
                       (zn != nullptr ? zn[ga[1]] : 0.f), a0, a1);
      if (pair)
        load_chunk<BITS>(row, c + 1, sn[gb[0]], (zn != nullptr ? zn[gb[0]] : 0.f), sn[gb[1]],
                         (zn != nullptr ? zn[gb[1]] : 0.f), b0, b1);
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
      store(y + r * ldy + n, _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                                _mm512_add_ps(acc[r][2], acc[r][3]))),
            ACC);
  }
}

// Five to eight rows (e.g. a speculative verification: the last token and its drafts): one chunk per
// iteration with two accumulators per row, so the dequantized chunk is reused by every row while the
// 16 accumulators stay in registers, instead of dequantizing it again for a second tile.
template <int BITS, int ROWS, bool ACC, typename S>
void wide_rows_times_weights(const float* x, int64_t ldx, const QuantWeight& w, float* y, int64_t ldy, int64_t n0,
                             int64_t n1, const int32_t* group_of_half) {
  const int64_t groups = w.k / w.group, chunks = w.k / kChunk;
  alignas(64) float sbuf[kMaxHalfGroups], zbuf[kMaxHalfGroups];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    const float *sn, *zn;
    row_scales<S>(w, n, groups, sbuf, zbuf, sn, zn);
    __m512 acc[ROWS][2];
    for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int32_t* g = group_of_half + 2 * c;
      __m512 a0, a1;
      load_chunk<BITS>(row, c, sn[g[0]], (zn != nullptr ? zn[g[0]] : 0.f), sn[g[1]], (zn != nullptr ? zn[g[1]] : 0.f),
                       a0, a1);
      const float* xc = x + c * kChunk;
#pragma GCC unroll 8
      for (int r = 0; r < ROWS; ++r) {
        acc[r][0] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(xc + r * ldx), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(xc + r * ldx + 16), acc[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r)
      store(y + r * ldy + n, _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1])), ACC);
  }
}

#else  // portable: the same arithmetic, one weight at a time

template <int BITS, int ROWS, bool ACC, typename S>
void rows_times_weights(const float* x, int64_t ldx, const QuantWeight& w, float* y, int64_t ldy, int64_t n0,
                        int64_t n1, const int32_t* /*group_of_chunk*/) {
  const int64_t groups = w.k / w.group;
  std::vector<float> sbuf(groups), zbuf(groups);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * w.row_bytes;
    const float *sn, *zn;
    row_scales<S>(w, n, groups, sbuf.data(), zbuf.data(), sn, zn);
    float acc[ROWS] = {};
    for (int64_t k = 0; k < w.k; ++k) {
      int code;
      if constexpr (BITS == 4) {
        const int64_t c = k / kChunk, i = k % kChunk;
        const uint8_t b = row[c * 16 + (i & 15)];
        code = i < 16 ? (b & 0xF) : (b >> 4);
      } else if constexpr (BITS == 5) {
        const int64_t c = k / kChunk, i = k % kChunk;
        const uint8_t b = row[c * 20 + (i & 15)];
        const int bit = (row[c * 20 + 16 + i / 8] >> (i % 8)) & 1;
        code = ((i < 16 ? (b & 0xF) : (b >> 4)) | (bit << 4)) - 16;
      } else {
        code = static_cast<int8_t>(row[k]);
      }
      const int64_t g = k / w.group;
      const float wk = static_cast<float>(code) * sn[g] + (zn != nullptr ? zn[g] : 0.f);
      for (int r = 0; r < ROWS; ++r) acc[r] += wk * x[r * ldx + k];
    }
    for (int r = 0; r < ROWS; ++r) store(y + r * ldy + n, acc[r], ACC);
  }
}

#endif


// y[r, n] (+)= x[r] . W_hat[n] for rows r < m and outputs n in [n0, n1): the rows in tiles of up to
// kMaxWideRows, each tile streaming the weights once.
template <int BITS, bool ACC, typename S>
void quant_rows(const float* x, int64_t m, const QuantWeight& w, float* y, int64_t n0, int64_t n1,
                const int32_t* gc) {
  for (int64_t r = 0; r < m;) {
    const float* xr = x + r * w.k;
    float* yr = y + r * w.n;
    const int64_t rows = std::min<int64_t>(kMaxWideRows, m - r);
    switch (rows) {
      case 1: rows_times_weights<BITS, 1, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
      case 2: rows_times_weights<BITS, 2, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
      case 3: rows_times_weights<BITS, 3, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
      case 4: rows_times_weights<BITS, 4, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
#if defined(__AVX512F__)
      case 5: wide_rows_times_weights<BITS, 5, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
      case 6: wide_rows_times_weights<BITS, 6, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
      case 7: wide_rows_times_weights<BITS, 7, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
      default: wide_rows_times_weights<BITS, 8, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
#else
      default: rows_times_weights<BITS, 4, ACC, S>(xr, w.k, w, yr, w.n, n0, n1, gc); break;
#endif
    }
    r += rows;
  }
}

template <typename S>
inline void quant_rows_of(const float* x, int64_t m, const QuantWeight& w, float* y, int64_t n0, int64_t n1,
                          const int32_t* group_of_chunk, bool accumulate) {
  if (w.bits == 4) {
    if (accumulate) quant_rows<4, true, S>(x, m, w, y, n0, n1, group_of_chunk);
    else quant_rows<4, false, S>(x, m, w, y, n0, n1, group_of_chunk);
  } else if (w.bits == 5) {
    if (accumulate) quant_rows<5, true, S>(x, m, w, y, n0, n1, group_of_chunk);
    else quant_rows<5, false, S>(x, m, w, y, n0, n1, group_of_chunk);
  } else {
    if (accumulate) quant_rows<8, true, S>(x, m, w, y, n0, n1, group_of_chunk);
    else quant_rows<8, false, S>(x, m, w, y, n0, n1, group_of_chunk);
  }
}

inline void quant_rows(const float* x, int64_t m, const QuantWeight& w, float* y, int64_t n0, int64_t n1,
                       const int32_t* group_of_chunk, bool accumulate) {
  // Storing and accumulating are separate instantiations: a runtime flag in the stores cost ~15% on
  // small many-row products.
  if (w.hs != nullptr) {
    quant_rows_of<uint16_t>(x, m, w, y, n0, n1, group_of_chunk, accumulate);
  } else {
    quant_rows_of<float>(x, m, w, y, n0, n1, group_of_chunk, accumulate);
  }
}

// The group of each half (16 inputs) of each 32-input chunk: entries 2c and 2c + 1 are chunk c's (the kernels
// index scales by them; they differ only for int8 groups of 16).
inline std::vector<int32_t> group_of_chunks(int64_t k, int64_t group) {
  std::vector<int32_t> g(2 * (k / kChunk));
  for (size_t h = 0; h < g.size(); ++h) g[h] = static_cast<int32_t>(static_cast<int64_t>(h) * (kChunk / 2) / group);
  return g;
}

// Whether the kernels take a group size: int4 / int5 groups are whole 32-input chunks, int8 groups halves of one.
inline bool group_supported(int64_t bits, int64_t group, int64_t k) {
  const int64_t unit = bits == 8 ? kChunk / 2 : kChunk;
  return group > 0 && group % unit == 0 && k % group == 0 && k % kChunk == 0;
}

// y[r, n] (+)= x[r] . W[n] for a dense fp32 W [N, K] (row-major), rows r < m, outputs n in [n0, n1).
inline void dense_rows(const float* x, int64_t m, const float* w, int64_t n, int64_t k, float* y, int64_t n0,
                       int64_t n1, bool accumulate) {
  for (int64_t j = n0; j < n1; ++j) {
    const float* wj = w + j * k;
    for (int64_t r = 0; r < m; ++r) {
      const float* xr = x + r * k;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += xr[i] * wj[i];
      store(y + r * n + j, s, accumulate);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise pieces of the decoder layer, one row at a time, in fp32.

// exp(x) in fp32 that the compiler can vectorize: libm's expf stays a scalar call unless
// finite-math is assumed, which we refuse (inf and NaN must behave as in PyTorch). Cody-Waite
// reduction x = n ln2 + r with |r| <= ln2/2, a degree-7 Taylor polynomial for e^r (relative error
// 1.2e-7, about one ulp) and 2^n built from exponent bits in two halves so n = 128 stays finite.
// Overflow gives inf, underflow 0 (no subnormals), NaN propagates. Branch-free: ternaries, since
// std::fmin/fmax's NaN rules also block vectorization. Always inlined: a call inside an `omp simd`
// loop (an external-linkage inline function GCC chose not to inline) made SiLU-and-multiply 10x slower.
// Inputs are clamped below at ln(FLT_MIN), so that no intermediate is subnormal either: a clamp at -87.5
// gave 0.85 x 2^-126 for every underflowing input, and each subnormal product costs a microcode assist
// (a softmax over scores hundreds apart ran 4x slower); the result there is 0 anyway.
constexpr float kLnFltMin = -87.33654f;
[[gnu::always_inline]] inline float exp_vec(float x) {
  float xc = x > 88.72f ? 88.72f : x;
  xc = xc < kLnFltMin ? kLnFltMin : xc;
  const float n = std::floor(std::fma(xc, 1.44269504f, 0.5f));
  float r = std::fma(n, -0.693145751953125f, xc);  // ln2 split into a short high part ...
  r = std::fma(n, -1.428606765330187e-06f, r);     // ... and the rest, so n ln2_hi is exact
  float p = 1.f / 5040.f;
  p = std::fma(p, r, 1.f / 720.f);
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  float y = p * __builtin_bit_cast(float, (half + 127) << 23) * __builtin_bit_cast(float, (ni - half + 127) << 23);
  y = x > 88.72f ? std::numeric_limits<float>::infinity() : y;
  y = x < kLnFltMin ? 0.f : y;
  return x != x ? x : y;
}

// y = x / sqrt(mean(x^2) + eps) * w  (fp32 storage: HF's rounding to the storage type is a no-op).
inline void rms_norm_row(const float* x, const float* w, float* y, int64_t h, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < h; ++j) ss += x[j] * x[j];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) y[j] = (x[j] * inv) * w[j];
}

// o = silu(g) * u = g sigmoid(g) u over f features.
inline void silu_and_mul_row(const float* g, const float* u, float* o, int64_t f) {
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) o[j] = g[j] * (1.f / (1.f + exp_vec(-g[j]))) * u[j];
}

// o = gelu_tanh(g) * u over f features (GeGLU with GELU's tanh approximation, Gemma's MLP):
// gelu_tanh(g) = g / 2 (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanh(z) = 1 - 2 / (exp(2 z) + 1).
inline void gelu_tanh_and_mul_row(const float* g, const float* u, float* o, int64_t f) {
  constexpr float kRoot2OverPi = 0.7978845608028654f;
#pragma omp simd
  for (int64_t j = 0; j < f; ++j) {
    const float x = g[j], z = kRoot2OverPi * (x + 0.044715f * x * x * x);
    o[j] = 0.5f * x * (2.f - 2.f / (exp_vec(2.f * z) + 1.f)) * u[j];
  }
}

// o = x cos + roll(x, d/2) sin for one head (sin carries rotate-half's sign).
inline void rope_row(const float* x, const float* c, const float* s, float* o, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < d; ++j) o[j] = x[j] * c[j] + x[j < half ? j + half : j - half] * s[j];
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention for one sequence and one KV head (with the query heads that read it):
//   s_t = q_j . k_t * scale for every visible position t,  p_t = exp(s_t - max s) / sum exp(. - max s),
//   out_j = sum_t p_t v_t.
// Two passes (scores, then weighted values) keep it exact and simple.

// bf16 storage as its raw bits (the layout of c10::BFloat16), with conversions that vectorize: c10's
// own conversion functions keep elementwise loops scalar (SiLU-and-multiply of 64 x 1536 bf16 values
// took 0.7 ms through them).
struct bf16 {
  uint16_t bits;
};

[[gnu::always_inline]] inline float bf16_to_float(uint16_t b) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(b) << 16);  // exact
}

// Round to nearest, ties to even; NaN becomes the quiet NaN 0x7FC0: exactly c10::BFloat16's rounding.
[[gnu::always_inline]] inline uint16_t float_to_bf16(float f) {
  const uint32_t u = __builtin_bit_cast(uint32_t, f);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// Storage -> fp32 for elementwise loops over raw buffers: floats as they are, bf16 bits widened exactly.
[[gnu::always_inline]] inline float widen(float x) { return x; }
[[gnu::always_inline]] inline float widen(uint16_t bf16_bits) { return bf16_to_float(bf16_bits); }

// Element i of a cache row as a float, read in the loops that use it (a bf16 row widens in registers: no
// converted copy of the row, which made bf16 attention 1.85x slower than fp32's for half the bytes).
[[gnu::always_inline]] inline float at(const float* row, int64_t i) { return row[i]; }
[[gnu::always_inline]] inline float at(const bf16* row, int64_t i) {
  return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
}
template <typename T>
[[gnu::always_inline]] inline float at(const T* row, int64_t i) { return static_cast<float>(row[i]); }

// Rows live in scattered blocks, which defeats the hardware prefetcher at every block boundary:
// ask for the row a few tokens ahead explicitly.
constexpr int64_t kAhead = 4;
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off);
}

// exp(s_t - max_t s) in place over one head's n scores; returns their sum (exp_vec: libm's scalar expf was a
// third of the attention kernel's time).
inline float softmax_numerators(float* s, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t t = 0; t < n; ++t) mx = s[t] > mx ? s[t] : mx;
  float z = 0.f;
#pragma omp simd reduction(+ : z)
  for (int64_t t = 0; t < n; ++t) {
    s[t] = exp_vec(s[t] - mx);
    z += s[t];
  }
  return z;
}

struct AttentionScratch {  // reused by one thread across items
  std::vector<float> scores, acc, denom, qs, zsum;
  std::vector<int16_t> q16;
  std::vector<int64_t> offsets;
};

// q [hq, d] and out [hq, d] are the sequence's; the caches are [blocks, block_size, hkv, d]. Computes the
// query heads of KV heads g0 .. g1-1. Tokens are the outer loop and heads the inner one, so a token's row of
// the cache (all its KV heads, contiguous) is read once and in order: with one work item per (sequence, KV
// head) each item read a 128-byte slice of every 384-byte row (SmolLM2), three passes over the same lines,
// and bf16 attention at 64 sequences ran at half the machine's bandwidth.
template <typename T>
void attend_heads(const float* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len, int64_t g0,
                  int64_t g1, int64_t hq, int64_t hkv, int64_t d, int64_t block_size, float scale, int64_t window,
                  float* out, AttentionScratch& s, int64_t first_head = 0, int64_t last_head = -1) {
  // [first_head, last_head) of the query heads of groups g0 .. g1 - 1 (default: all of them); a range
  // inside one group lets threads share a sequence whose few KV heads would leave threads idle.
  const int64_t groups = hq / hkv, row = hkv * d, j0 = g0 * groups + first_head;
  const int64_t heads = (last_head < 0 ? (g1 - g0) * groups : last_head) - first_head;
  const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  const int64_t n = len - start;
  s.offsets.resize(n);  // element offset of token t's slice for KV head g0
  for (int64_t t = 0; t < n; ++t) {
    const int64_t p = start + t;
    s.offsets[t] = (table[p / block_size] * block_size + p % block_size) * row + g0 * d;
  }
  const int64_t span = (g1 - g0) * d;  // the elements of a row this call reads
  s.scores.assign(heads * std::max<int64_t>(n, 1), 0.f);
  s.acc.assign(heads * d, 0.f);
  s.denom.assign(heads, 0.f);
  // Pass 1: scores. Four tokens at a time: four independent accumulators keep the FMA units busy.
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const int64_t m = std::min<int64_t>(4, n - t0);
    const T* k[4];
    for (int64_t u = 0; u < 4; ++u) {
      if (t0 + u + kAhead < n) prefetch_row(k_cache + s.offsets[t0 + u + kAhead], span);
      k[u] = k_cache + s.offsets[t0 + std::min(u, m - 1)];
    }
    for (int64_t h = 0; h < heads; ++h) {
      const float* qj = q + (j0 + h) * d;
      const int64_t off = ((first_head + h) / groups) * d;
      const T *k0 = k[0] + off, *k1 = k[1] + off, *k2 = k[2] + off, *k3 = k[3] + off;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t i = 0; i < d; ++i) {
        s0 += qj[i] * at(k0, i);
        s1 += qj[i] * at(k1, i);
        s2 += qj[i] * at(k2, i);
        s3 += qj[i] * at(k3, i);
      }
      const float sv[4] = {s0, s1, s2, s3};
      for (int64_t u = 0; u < m; ++u) s.scores[h * n + t0 + u] = sv[u] * scale;
    }
  }
  for (int64_t h = 0; h < heads; ++h) s.denom[h] = softmax_numerators(s.scores.data() + h * n, n);
  // Pass 2: acc_h = sum_t p[h][t] v_t, four tokens per pass over acc_h.
  for (int64_t t0 = 0; t0 < n; t0 += 4) {
    const int64_t m = std::min<int64_t>(4, n - t0);
    const T* v[4];
    for (int64_t u = 0; u < 4; ++u) {
      if (t0 + u + kAhead < n) prefetch_row(v_cache + s.offsets[t0 + u + kAhead], span);
      v[u] = v_cache + s.offsets[t0 + std::min(u, m - 1)];
    }
    for (int64_t h = 0; h < heads; ++h) {
      const float* sj = s.scores.data() + h * n + t0;
      const float p0 = sj[0], p1 = m > 1 ? sj[1] : 0.f, p2 = m > 2 ? sj[2] : 0.f, p3 = m > 3 ? sj[3] : 0.f;
      const int64_t off = ((first_head + h) / groups) * d;
      const T *v0 = v[0] + off, *v1 = v[1] + off, *v2 = v[2] + off, *v3 = v[3] + off;
      float* a = s.acc.data() + h * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) a[i] += p0 * at(v0, i) + p1 * at(v1, i) + p2 * at(v2, i) + p3 * at(v3, i);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float inv = n > 0 ? 1.f / s.denom[h] : 0.f;
    float* o = out + (j0 + h) * d;
    for (int64_t i = 0; i < d; ++i) o[i] = s.acc[h * d + i] * inv;
  }
}

// One KV head (and the query heads that read it) of one sequence.
template <typename T>
void attend_group(const float* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t len, int64_t g,
                  int64_t hq, int64_t hkv, int64_t d, int64_t block_size, float scale, int64_t window, float* out,
                  AttentionScratch& s, int64_t first_head = 0, int64_t last_head = -1) {
  attend_heads(q, k_cache, v_cache, table, len, g, g + 1, hq, hkv, d, block_size, scale, window, out, s, first_head,
               last_head);
}

#if defined(__AVX512F__)
// Sixteen vectors of partial sums -> one vector of their totals (lane i = the sum of a[i]): pairs of
// vectors interleaved and added, four levels, 15 adds and 30 shuffles for sixteen reductions.
[[gnu::always_inline]] inline __m512 reduce16(const __m512* a) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane of u[i]: partial sums of a[4i .. 4i+3], in order
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}

// reduce16 on int32 lanes: lane i of the result is the sum of a[i]'s lanes (exact).
[[gnu::always_inline]] inline __m512i reduce16i(const __m512i* a) {
  __m512i t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
  const __m512i v0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
  const __m512i v1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(v0, v1, 0x88), _mm512_shuffle_i32x4(v0, v1, 0xDD));
}
#endif

#if defined(__AVX512BF16__)
// ---------------------------------------------------------------------------------------------
// The same attention for a bf16 query and bf16 caches with AVX512-BF16: q . k as vdpbf16ps (bf16 pairs
// multiplied exactly, summed in fp32), sixteen tokens' dot products reduced together (reduce16), and
// each head's output accumulated in registers across all tokens. The portable kernel above spent ~125
// cycles per (token, KV head), most of them reducing one dot product at a time and converting V.

// Scores of one query head (its D bf16 values in qv) against tokens t0 .. t0+15 (rows[u], the head's
// slice of each token's row; a short last tile repeats a valid row and masks the store).
template <int D>
[[gnu::always_inline]] inline void score_tile(const __m512bh* qv, const uint16_t* const* rows, float scale,
                                              float* out, int m) {
  __m512 a[16];
  for (int u = 0; u < 16; ++u) {
    a[u] = _mm512_setzero_ps();
    for (int c = 0; c < D / 32; ++c)
      a[u] = _mm512_dpbf16_ps(a[u], (__m512bh)_mm512_loadu_si512(rows[u] + 32 * c), qv[c]);
  }
  const __m512 sc = _mm512_mul_ps(reduce16(a), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << m) - 1u), sc);
}

// acc[h] += p[h][t] v_t over all n tokens for H query heads that read the same V slice; acc stays in
// registers (H * D / 16 of them) and is written once, divided by each head's softmax denominator.
template <int D, int H>
inline void weigh_values(const float* const* p, const int64_t* offsets, int64_t n, const uint16_t* v_cache,
                         const float* inv, float* const* out) {
  __m512 acc[H][D / 16];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    if (t + kAhead < n) prefetch_row(v_cache + offsets[t + kAhead], D);
    const uint16_t* row = v_cache + offsets[t];
    __m512 v[D / 16];
    for (int c = 0; c < D / 16; ++c)
      v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * c))), 16));
    for (int h = 0; h < H; ++h) {
      const __m512 ph = _mm512_set1_ps(p[h][t]);
      for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_fmadd_ps(ph, v[c], acc[h][c]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < D / 16; ++c) _mm512_storeu_ps(out[h] + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
}

// attend_heads for a bf16 query (q, [hq, D] as bf16 bits) and bf16 caches; D is 64, 128 or 256.
template <int D>
void attend_heads_bf16(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* table,
                       int64_t len, int64_t g0, int64_t g1, int64_t hq, int64_t hkv, int64_t block_size, float scale,
                       int64_t window, float* out, AttentionScratch& s) {
  const int64_t groups = hq / hkv, row = hkv * D, heads = (g1 - g0) * groups, j0 = g0 * groups;
  const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  const int64_t n = len - start;
  const int64_t padded = (n + 15) / 16 * 16;
  s.offsets.resize(padded);  // element offset of token t's row (KV head g0); a short last tile repeats the last row
  for (int64_t t = 0; t < padded; ++t) {
    const int64_t p = start + std::min(t, n - 1);
    s.offsets[t] = (table[p / block_size] * block_size + p % block_size) * row + g0 * D;
  }
  s.scores.resize(heads * padded);
  s.denom.resize(heads);
  // Pass 1: a tile of sixteen tokens' K rows (all the KV heads asked for) is read once and stays in L1
  // while every query head scores it.
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - t0));
    for (int64_t u = 0; u < 16 && t0 + 16 + u < n; ++u) prefetch_row(k_cache + s.offsets[t0 + 16 + u], (g1 - g0) * D);
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t off = (h / groups) * D;
      const uint16_t* rows[16];
      for (int u = 0; u < 16; ++u) rows[u] = k_cache + s.offsets[t0 + u] + off;
      __m512bh qv[D / 32];
      for (int c = 0; c < D / 32; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + (j0 + h) * D + 32 * c);
      score_tile<D>(qv, rows, scale, s.scores.data() + h * padded + t0, m);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float z = softmax_numerators(s.scores.data() + h * padded, n);
    s.denom[h] = n > 0 ? 1.f / z : 0.f;
  }
  // Pass 2, per KV head: its query heads in chunks whose accumulators fit the 32 vector registers.
  constexpr int kHeads = D == 64 ? 4 : D == 128 ? 2 : 1;
  for (int64_t g = 0; g < g1 - g0; ++g) {
    for (int64_t h0 = g * groups; h0 < (g + 1) * groups; h0 += kHeads) {
      const int hc = static_cast<int>(std::min<int64_t>(kHeads, (g + 1) * groups - h0));
      const float* p[kHeads];
      float* o[kHeads];
      for (int i = 0; i < hc; ++i) {
        p[i] = s.scores.data() + (h0 + i) * padded;
        o[i] = out + (j0 + h0 + i) * D;
      }
      const uint16_t* vc = v_cache + g * D;
      const float* inv = s.denom.data() + h0;
      switch (hc) {
        case 1: weigh_values<D, 1>(p, s.offsets.data(), n, vc, inv, o); break;
        case 2: if constexpr (kHeads >= 2) weigh_values<D, 2>(p, s.offsets.data(), n, vc, inv, o); break;
        case 3: if constexpr (kHeads >= 3) weigh_values<D, 3>(p, s.offsets.data(), n, vc, inv, o); break;
        default: if constexpr (kHeads >= 4) weigh_values<D, 4>(p, s.offsets.data(), n, vc, inv, o); break;
      }
    }
  }
}

// Whether attend_heads_bf16 takes a head size.
inline bool bf16_attention_fast(int64_t d) { return d == 64 || d == 128 || d == 256; }
#endif

// ---------------------------------------------------------------------------------------------
// Decode attention over the int8 KV cache (layers/kv_quant.py, KIVI's split): keys k = c_k s with a fixed scale
// per (KV head, channel), values v = c_v s_t + z_t with a scale and zero per (token, KV head). Neither is
// dequantized into a copy:
//   q . k_t = (q * s) . c_k          the key scale (and the softmax scale) folded into the query once
//   sum_t p_t v_t = sum_t (p_t s_t) c_v + (sum_t p_t z_t) 1
// so the kernel reads 2 D + 8 bytes per (token, KV head), against 4 D for a bf16 cache.
struct Int8KV {
  const int8_t* k;        // [blocks, block_size, hkv, d] codes
  const int8_t* v;
  const float* k_scale;   // [hkv, d]
  const float* v_scale;   // [blocks, block_size, hkv]
  const float* v_zero;
};

// The cache slot (block * block_size + offset) of each visible token t (the last `window` of `len`, or all),
// into s.offsets; with `pad16` the list is padded to a multiple of sixteen by repeating the last slot.
inline void visible_slots(const int64_t* table, int64_t len, int64_t window, int64_t block_size, bool pad16,
                          AttentionScratch& s, int64_t& n) {
  const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
  n = len - start;
  const int64_t count = pad16 ? (n + 15) / 16 * 16 : n;
  s.offsets.resize(count);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t p = start + std::min(t, n - 1);
    s.offsets[t] = table[p / block_size] * block_size + p % block_size;
  }
}

// The portable kernel (any head size): q [hq, d] fp32, the query heads of KV heads g0 .. g1-1.
inline void attend_heads_int8_ref(const float* q, const Int8KV& c, const int64_t* table, int64_t len, int64_t g0,
                                  int64_t g1, int64_t hq, int64_t hkv, int64_t d, int64_t block_size, float scale,
                                  int64_t window, float* out, AttentionScratch& s) {
  const int64_t groups = hq / hkv, heads = (g1 - g0) * groups, j0 = g0 * groups;
  int64_t n;
  visible_slots(table, len, window, block_size, false, s, n);
  s.qs.resize(heads * d);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = g0 + h / groups;
    for (int64_t i = 0; i < d; ++i) s.qs[h * d + i] = q[(j0 + h) * d + i] * c.k_scale[g * d + i] * scale;
  }
  s.scores.assign(heads * std::max<int64_t>(n, 1), 0.f);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int8_t* k = c.k + (s.offsets[t] * hkv + g0 + h / groups) * d;
      const float* qh = s.qs.data() + h * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += qh[i] * static_cast<float>(k[i]);
      s.scores[h * n + t] = dot;
    }
  }
  s.acc.assign(heads * d, 0.f);
  s.zsum.assign(heads, 0.f);
  s.denom.resize(heads);
  for (int64_t h = 0; h < heads; ++h) s.denom[h] = softmax_numerators(s.scores.data() + h * n, n);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t at_t = s.offsets[t] * hkv + g0 + h / groups;
      const float p = s.scores[h * n + t], w = p * c.v_scale[at_t];
      s.zsum[h] += p * c.v_zero[at_t];
      const int8_t* v = c.v + at_t * d;
      float* a = s.acc.data() + h * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) a[i] += w * static_cast<float>(v[i]);
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float inv = n > 0 ? 1.f / s.denom[h] : 0.f;
    for (int64_t i = 0; i < d; ++i) out[(j0 + h) * d + i] = (s.acc[h * d + i] + s.zsum[h]) * inv;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// Sixteen int8 codes -> sixteen floats (exact).
[[gnu::always_inline]] inline __m512 int8x16_to_ps(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// out[h] = (sum_t p[h][t] (s_t c_t + z_t)) inv[h] for H query heads reading KV head g's int8 values (slots[t]: the
// tokens' cache slots): the weights p s_t multiply the widened codes, sum_t p z_t is added once at the end; the
// H * D / 16 accumulators stay in registers across all tokens.
template <int D, int H>
inline void weigh_values_int8(const float* const* p, const int64_t* slots, int64_t n, const Int8KV& c, int64_t g,
                              int64_t hkv, const float* inv, float* const* out) {
  constexpr int V = D / 16;
  __m512 acc[H][V];
  float zs[H] = {};
  for (int h = 0; h < H; ++h)
    for (int cc = 0; cc < V; ++cc) acc[h][cc] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    if (t + kAhead < n) prefetch_row(c.v + (slots[t + kAhead] * hkv + g) * D, D);
    const int64_t at = slots[t] * hkv + g;
    const int8_t* row = c.v + at * D;
    const float vs = c.v_scale[at], vz = c.v_zero[at];
    __m512 w[H];
    for (int h = 0; h < H; ++h) {
      zs[h] += p[h][t] * vz;
      w[h] = _mm512_set1_ps(p[h][t] * vs);
    }
    for (int cc = 0; cc < V; ++cc) {
      const __m512 v = int8x16_to_ps(row + 16 * cc);
      for (int h = 0; h < H; ++h) acc[h][cc] = _mm512_fmadd_ps(w[h], v, acc[h][cc]);
    }
  }
  for (int h = 0; h < H; ++h) {
    const __m512 zv = _mm512_set1_ps(zs[h]), iv = _mm512_set1_ps(inv[h]);
    for (int cc = 0; cc < V; ++cc) _mm512_storeu_ps(out[h] + 16 * cc, _mm512_mul_ps(_mm512_add_ps(acc[h][cc], zv), iv));
  }
}

// The same with AVX-512 VNNI for D = 64, 128 or 256. Pass 1 scores in integers: each scaled query head is
// rounded once to int16 on its own grid (q' ~ r_q c_q, |c_q| <= 32767: a relative error of 2^-16 of the head's
// largest element, far below the keys' own int8 grid), so q' . c_k = r_q (c_q . c_k), exact in int32
// (vpdpwssd: 32 products per instruction against 16 fused multiply-adds on widened floats). Each token's key
// slice is widened to int16 once for all the query heads of its group, and sixteen tokens' partial sums reduce
// together (reduce16). Pass 2 weighs the widened values in floats, each head's output in registers across all
// tokens, as the bf16 kernel does.
template <int D>
void attend_heads_int8(const float* q, const Int8KV& c, const int64_t* table, int64_t len, int64_t g0, int64_t g1,
                       int64_t hq, int64_t hkv, int64_t block_size, float scale, int64_t window, float* out,
                       AttentionScratch& s) {
  constexpr int C = D / 32;                            // int16 vectors per query head
  const int64_t groups = hq / hkv, heads = (g1 - g0) * groups, j0 = g0 * groups;
  int64_t n;
  visible_slots(table, len, window, block_size, true, s, n);
  const int64_t padded = (n + 15) / 16 * 16;
  s.q16.resize(heads * D);
  s.zsum.resize(heads);  // here: each head's query grid r_q
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t g = g0 + h / groups;
    __m512 qh[D / 16];
    __m512 mx = _mm512_setzero_ps();
    for (int cc = 0; cc < D / 16; ++cc) {
      qh[cc] = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(q + (j0 + h) * D + 16 * cc),
                                           _mm512_loadu_ps(c.k_scale + g * D + 16 * cc)), sc);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(qh[cc]));
    }
    const float top = _mm512_reduce_max_ps(mx);
    const float r = top > 0.f ? top / 32767.f : 1.f;
    const __m512 inv = _mm512_set1_ps(top > 0.f ? 32767.f / top : 1.f);
    for (int cc = 0; cc < D / 16; ++cc)  // round half to even (MXCSR), saturated to int16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(s.q16.data() + h * D + 16 * cc),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(qh[cc], inv))));
    s.zsum[h] = r;
  }
  s.scores.resize(heads * std::max<int64_t>(padded, 1));
  s.denom.resize(heads);
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int m = static_cast<int>(std::min<int64_t>(16, n - t0));
    for (int64_t u = 0; u < 16 && t0 + 16 + u < n; ++u)
      prefetch_row(c.k + (s.offsets[t0 + 16 + u] * hkv + g0) * D, (g1 - g0) * D);
    for (int64_t g = g0; g < g1; ++g) {
      const int8_t* rows[16];
      for (int u = 0; u < 16; ++u) rows[u] = c.k + (s.offsets[t0 + u] * hkv + g) * D;
      for (int64_t h = (g - g0) * groups; h < (g - g0 + 1) * groups; ++h) {
        __m512i qv[C];
        for (int cc = 0; cc < C; ++cc) qv[cc] = _mm512_loadu_si512(s.q16.data() + h * D + 32 * cc);
        __m512i acc[16];
        for (int u = 0; u < 16; ++u) {
          acc[u] = _mm512_setzero_si512();
          for (int cc = 0; cc < C; ++cc)
            acc[u] = _mm512_dpwssd_epi32(
                acc[u], _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[u] + 32 * cc))),
                qv[cc]);
        }
        _mm512_mask_storeu_ps(s.scores.data() + h * padded + t0, static_cast<__mmask16>((1u << m) - 1u),
                              _mm512_mul_ps(_mm512_cvtepi32_ps(reduce16i(acc)), _mm512_set1_ps(s.zsum[h])));
      }
    }
  }
  for (int64_t h = 0; h < heads; ++h) {
    const float z = softmax_numerators(s.scores.data() + h * padded, n);
    s.denom[h] = n > 0 ? 1.f / z : 0.f;
  }
  constexpr int kV = D == 64 ? 4 : D == 128 ? 2 : 1;   // heads whose outputs stay in registers: kV * D / 16
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t h0 = (g - g0) * groups; h0 < (g - g0 + 1) * groups; h0 += kV) {
      const int hc = static_cast<int>(std::min<int64_t>(kV, (g - g0 + 1) * groups - h0));
      const float* p[kV];
      float* o[kV];
      for (int i = 0; i < hc; ++i) {
        p[i] = s.scores.data() + (h0 + i) * padded;
        o[i] = out + (j0 + h0 + i) * D;
      }
      const float* inv = s.denom.data() + h0;
      switch (hc) {
        case 1: weigh_values_int8<D, 1>(p, s.offsets.data(), n, c, g, hkv, inv, o); break;
        case 2: if constexpr (kV >= 2) weigh_values_int8<D, 2>(p, s.offsets.data(), n, c, g, hkv, inv, o); break;
        case 3: if constexpr (kV >= 3) weigh_values_int8<D, 3>(p, s.offsets.data(), n, c, g, hkv, inv, o); break;
        default: if constexpr (kV >= 4) weigh_values_int8<D, 4>(p, s.offsets.data(), n, c, g, hkv, inv, o); break;
      }
    }
  }
}
#define LOOM_INT8_ATTENTION_FAST 1
#endif

// Whether attend_heads_int8 (the vectorized kernel) takes a head size.
inline bool int8_attention_fast(int64_t d) {
#if defined(LOOM_INT8_ATTENTION_FAST)
  return d == 64 || d == 128 || d == 256;
#else
  (void)d;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// Multi-LoRA (layers/multi_lora.py): rows of a batch each add their own adapter's low-rank product,
//   shrink  t[row, j] = x[row] . A_s[j]                       j < J = parts * r
//   expand  y[row, c] += t[row, p r : (p + 1) r] . B_s[c]     c in part p (cols[p] <= c < cols[p + 1])
// over the rows of a group (rows sharing slot s), each A_s / B_s row read once per group (Punica's BGMV,
// vectorized over the group). Rows are named by index: row i of the group reads x + rows[i] ldx and writes
// t + rows[i] ldt, y + rows[i] ldy. Callers split the work: the shrink by (group, j) items, the expand by
// output columns, so the decode step runs each expand on the columns its thread's GEMV just wrote.
//
// The adapter weights W (A and B) are fp32 or bf16 (uint16_t bits, vLLM's --lora-dtype: half the bytes a
// decode step streams), widened exactly in registers as they are read. x and t are fp32; y is fp32 or bf16,
// and a bf16 y is widened, added to in fp32 and rounded once (to nearest even, as c10::BFloat16).

// The rows of a batch grouped by adapter slot: group g is slot[g], its rows order[start[g] .. start[g + 1]),
// ascending. Rows of slot -1 are in no group.
struct LoraGroups {
  std::vector<int64_t> order, start, slot;
  int64_t size() const { return static_cast<int64_t>(slot.size()); }
  int64_t rows(int64_t g) const { return start[g + 1] - start[g]; }
  const int64_t* row_ids(int64_t g) const { return order.data() + start[g]; }
};

// Groups of n rows by slots[row] (each in [-1, num_slots): the caller checks), a counting sort.
inline void lora_group_rows(const int64_t* slots, int64_t n, int64_t num_slots, LoraGroups& g) {
  std::vector<int64_t> count(num_slots + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] >= 0) ++count[slots[i] + 1];
  for (int64_t s = 0; s < num_slots; ++s) count[s + 1] += count[s];  // count[s]: first position of slot s
  g.order.assign(count[num_slots], 0);
  g.start.clear();
  g.slot.clear();
  for (int64_t s = 0; s < num_slots; ++s) {
    if (count[s + 1] > count[s]) {
      g.slot.push_back(s);
      g.start.push_back(count[s]);
    }
  }
  g.start.push_back(count[num_slots]);
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] >= 0) g.order[count[slots[i]]++] = i;
}

// A value into fp32 or bf16 storage (bf16: rounded to nearest even).
[[gnu::always_inline]] inline void put(float* y, float v) { *y = v; }
[[gnu::always_inline]] inline void put(uint16_t* y, float v) { *y = float_to_bf16(v); }

#if defined(__AVX512F__)
// Sixteen fp32 or bf16 weights as fp32 lanes (bf16: zero-extended to 32 bits and shifted into the high half,
// exact); the masked forms read only the lanes of m and zero the others.
[[gnu::always_inline]] inline __m512 bf16x16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
[[gnu::always_inline]] inline __m512 lora_load(const float* p) { return _mm512_loadu_ps(p); }
[[gnu::always_inline]] inline __m512 lora_load(const uint16_t* p) {
  return bf16x16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
[[gnu::always_inline]] inline __m512 lora_load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
[[gnu::always_inline]] inline __m512 lora_load(__mmask16 m, const uint16_t* p) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return bf16x16_to_ps(_mm256_maskz_loadu_epi16(m, p));
#else
  alignas(32) uint16_t buf[16] = {};
  for (int u = 0; u < 16; ++u)
    if ((m >> u) & 1) buf[u] = p[u];
  return bf16x16_to_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
#endif
}

// fp32 lanes -> their bf16 bits in the low half of each 32-bit lane: float_to_bf16, sixteen at a time.
[[gnu::always_inline]] inline __m512i round_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
#endif

// tr[i][j] = xr[i] . a[j] for R rows and j in [j0, j1); a is [*, k] row-major, fp32 or bf16.
template <int R, typename W>
inline void lora_shrink_tile(const float* const* xr, const W* a, int64_t k, float* const* tr, int64_t j0,
                             int64_t j1) {
#if defined(__AVX512F__)
  for (int64_t j = j0; j < j1; ++j) {
    const W* aj = a + j * k;
    __m512 acc[R][2];  // two chains per row: one would wait on FMA latency
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      const __m512 w0 = lora_load(aj + i), w1 = lora_load(aj + i + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr[r] + i), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr[r] + i + 16), acc[r][1]);
      }
    }
    for (; i < k; i += 16) {
      const __mmask16 m = k - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (k - i)) - 1u);
      const __m512 w0 = lora_load(m, aj + i);
      for (int r = 0; r < R; ++r) acc[r][0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, xr[r] + i), acc[r][0]);
    }
    for (int r = 0; r < R; ++r) tr[r][j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
  }
#else
  for (int64_t j = j0; j < j1; ++j) {
    const W* aj = a + j * k;
    for (int r = 0; r < R; ++r) {
      const float* x = xr[r];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += widen(aj[i]) * x[i];
      tr[r][j] = s;
    }
  }
#endif
}

// Shrink of m rows under one adapter: t[rows[i], j] = x[rows[i]] . a[j] for j in [j0, j1), where a is the
// slot's [J, k]. Rows go in tiles of four, each tile reading a's rows once.
template <typename W>
inline void lora_shrink_rows(const float* x, int64_t ldx, const int64_t* rows, int64_t m, const W* a, int64_t k,
                             float* t, int64_t ldt, int64_t j0, int64_t j1) {
  for (int64_t i0 = 0; i0 < m; i0 += 4) {
    const int64_t mm = std::min<int64_t>(4, m - i0);
    const float* xr[4];
    float* tr[4];
    for (int64_t u = 0; u < mm; ++u) {
      xr[u] = x + rows[i0 + u] * ldx;
      tr[u] = t + rows[i0 + u] * ldt;
    }
    switch (mm) {
      case 1: lora_shrink_tile<1>(xr, a, k, tr, j0, j1); break;
      case 2: lora_shrink_tile<2>(xr, a, k, tr, j0, j1); break;
      case 3: lora_shrink_tile<3>(xr, a, k, tr, j0, j1); break;
      default: lora_shrink_tile<4>(xr, a, k, tr, j0, j1); break;
    }
  }
}

// The shrink's work items [i0, i1) of groups x J (item g J + j: column j of group g), a thread's share;
// a is the pool [slots, J, k].
template <typename W>
inline void lora_shrink_items(const float* x, int64_t ldx, const LoraGroups& g, const W* a, int64_t J, int64_t k,
                              float* t, int64_t ldt, int64_t i0, int64_t i1) {
  for (int64_t item = i0; item < i1;) {
    const int64_t grp = item / J, j0 = item % J, j1 = std::min<int64_t>(J, j0 + (i1 - item));
    lora_shrink_rows(x, ldx, g.row_ids(grp), g.rows(grp), a + g.slot[grp] * J * k, k, t, ldt, j0, j1);
    item += j1 - j0;
  }
}

#if defined(__AVX512F__)
// Sixteen rows of 16 floats -> their transpose in place (v[k] lane u = the old v[u] lane k): unpacks,
// in-lane shuffles, then two rounds of 128-bit lane shuffles, 64 shuffles in all.
[[gnu::always_inline]] inline void transpose16(__m512* v) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);      // per 128-bit lane: a0 b0 a1 b1
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);  //                   a2 b2 a3 b3
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + j] lane L: rows i .. i+3 at column 4 L + j
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {  // t[j]: rows 0-7 at columns j, j + 8; t[j + 4]: at j + 4, j + 12 (likewise rows 8-15)
    t[j] = _mm512_shuffle_f32x4(u[j], u[j + 4], 0x88);
    t[j + 4] = _mm512_shuffle_f32x4(u[j], u[j + 4], 0xDD);
    t[j + 8] = _mm512_shuffle_f32x4(u[j + 8], u[j + 12], 0x88);
    t[j + 12] = _mm512_shuffle_f32x4(u[j + 8], u[j + 12], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    v[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
    v[j + 4] = _mm512_shuffle_f32x4(t[j + 4], t[j + 12], 0x88);
    v[j + 12] = _mm512_shuffle_f32x4(t[j + 4], t[j + 12], 0xDD);
  }
}
#endif

// Rows of a group at or above which the expand transposes each 16-column tile of B (its 64 shuffles then
// serve every row, each row costing r broadcast FMAs); below it, each row's sixteen dot products are
// summed by reduce16 (45 operations per row and tile, but no transpose). Measured on SmolLM2's shapes at
// rank 16: reduce16 is ahead for one row (7.6 against 9.6 us at 1536 -> 576), the transpose from two on
// (8 rows of 576 -> 3072: 24.5 us against 41.9).
constexpr int64_t kLoraTransposeRows = 2;

#if defined(__AVX512F__)
// One tile of sixteen output columns: y[i][0 .. 16) += tr[i][0 : r] . bc[u] (bc[u]: the tile's column u of B,
// r weights; y[i]: fp32, lanes outside out_mask untouched) for m <= 16 rows; mk: the nk rank vectors' masks.
template <typename W>
[[gnu::always_inline]] inline void lora_expand_cols16(const float* const* tr, int64_t m, const W* const* bc, int64_t r,
                                                      int64_t nk, const __mmask16* mk, float* const* y,
                                                      __mmask16 out_mask) {
  if (m < kLoraTransposeRows) {
    // Each row's sixteen dot products as sixteen vectors, summed together by reduce16.
    for (int64_t i = 0; i < m; ++i) {
      __m512 tv[4];
      for (int64_t q = 0; q < nk; ++q) tv[q] = _mm512_maskz_loadu_ps(mk[q], tr[i] + 16 * q);
      __m512 acc[16];
      for (int u = 0; u < 16; ++u) {
        acc[u] = _mm512_mul_ps(lora_load(mk[0], bc[u]), tv[0]);
        for (int64_t q = 1; q < nk; ++q) acc[u] = _mm512_fmadd_ps(lora_load(mk[q], bc[u] + 16 * q), tv[q], acc[u]);
      }
      _mm512_mask_storeu_ps(y[i], out_mask, _mm512_add_ps(_mm512_maskz_loadu_ps(out_mask, y[i]), reduce16(acc)));
    }
    return;
  }
  // The tile of B transposed, 16 ranks at a time (bt[k]: the tile's 16 columns at rank 16 q + k), then
  // per row y[c .. c + 16] += sum_k t[k] bt[k]; four rows at a time keep four FMA chains going.
  for (int64_t q = 0; q < nk; ++q) {
    __m512 bt[16];
    for (int u = 0; u < 16; ++u) bt[u] = lora_load(mk[q], bc[u] + 16 * q);
    transpose16(bt);
    const int kk = static_cast<int>(std::min<int64_t>(16, r - 16 * q));
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) {
      const float *t0 = tr[i] + 16 * q, *t1 = tr[i + 1] + 16 * q, *t2 = tr[i + 2] + 16 * q, *t3 = tr[i + 3] + 16 * q;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int k = 0; k < kk; ++k) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(t0[k]), bt[k], a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(t1[k]), bt[k], a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(t2[k]), bt[k], a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(t3[k]), bt[k], a3);
      }
      const __m512 acc[4] = {a0, a1, a2, a3};
      for (int v = 0; v < 4; ++v)
        _mm512_mask_storeu_ps(y[i + v], out_mask, _mm512_add_ps(_mm512_maskz_loadu_ps(out_mask, y[i + v]), acc[v]));
    }
    for (; i < m; ++i) {
      const float* ti = tr[i] + 16 * q;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;  // even and odd ranks: two chains
      int k = 0;
      for (; k + 2 <= kk; k += 2) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(ti[k]), bt[k], a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(ti[k + 1]), bt[k + 1], a1);
      }
      if (k < kk) a0 = _mm512_fmadd_ps(_mm512_set1_ps(ti[k]), bt[k], a0);
      _mm512_mask_storeu_ps(y[i], out_mask, _mm512_add_ps(_mm512_maskz_loadu_ps(out_mask, y[i]), _mm512_add_ps(a0, a1)));
    }
  }
}
#endif

// yr[i][c] += tr[i][0 : r] . b[c] for m <= 16 rows and columns c in [c0, c1); b is [*, r] row-major, fp32 or
// bf16; y fp32 or bf16 (a bf16 tile is widened into fp32 rows first, and rounded once when all r ranks are in).
template <typename W, typename Y>
inline void lora_expand_tile(const float* const* tr, int64_t m, const W* b, int64_t r, Y* const* yr, int64_t c0,
                             int64_t c1) {
#if defined(__AVX512F__)
  if (r <= 64) {
    const int64_t nk = (r + 15) / 16;
    __mmask16 mk[4];
    for (int64_t q = 0; q < nk; ++q)
      mk[q] = r - 16 * q >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (r - 16 * q)) - 1u);
    for (int64_t c = c0; c < c1; c += 16) {
      const int mc = static_cast<int>(std::min<int64_t>(16, c1 - c));
      const __mmask16 out_mask = static_cast<__mmask16>((1u << mc) - 1u);
      const W* bc[16];  // a short last tile repeats its last column and masks the store
      for (int u = 0; u < 16; ++u) bc[u] = b + (c + std::min(u, mc - 1)) * r;
      float* y[16];
      if constexpr (std::is_same_v<Y, float>) {
        for (int64_t i = 0; i < m; ++i) y[i] = yr[i] + c;
        lora_expand_cols16(tr, m, bc, r, nk, mk, y, out_mask);
      } else {
        alignas(64) float wide[16][16];
        for (int64_t i = 0; i < m; ++i) {
          _mm512_store_ps(wide[i], lora_load(out_mask, yr[i] + c));
          y[i] = wide[i];
        }
        lora_expand_cols16(tr, m, bc, r, nk, mk, y, out_mask);
        for (int64_t i = 0; i < m; ++i)
          _mm512_mask_cvtepi32_storeu_epi16(yr[i] + c, out_mask, round_to_bf16(_mm512_load_ps(wide[i])));
      }
    }
    return;
  }
#endif
  for (int64_t c = c0; c < c1; ++c) {
    const W* bc = b + c * r;
    for (int64_t i = 0; i < m; ++i) {
      const float* t = tr[i];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t q = 0; q < r; ++q) s += t[q] * widen(bc[q]);
      put(yr[i] + c, widen(yr[i][c]) + s);
    }
  }
}

// Expand of m rows under one adapter over output columns [c0, c1): y[rows[i], c] += t[rows[i], p r : (p + 1) r]
// . b[c] where part p holds column c (cols [parts + 1] its offsets), b the slot's [out, r].
template <typename W, typename Y>
inline void lora_expand_rows(const float* t, int64_t ldt, const int64_t* rows, int64_t m, const W* b, int64_t r,
                             const int64_t* cols, int64_t parts, Y* y, int64_t ldy, int64_t c0, int64_t c1) {
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t lo = std::max(c0, cols[p]), hi = std::min(c1, cols[p + 1]);
    if (lo >= hi) continue;
    for (int64_t i0 = 0; i0 < m; i0 += 16) {
      const int64_t mm = std::min<int64_t>(16, m - i0);
      const float* tr[16];
      Y* yr[16];
      for (int64_t u = 0; u < mm; ++u) {
        tr[u] = t + rows[i0 + u] * ldt + p * r;
        yr[u] = y + rows[i0 + u] * ldy;
      }
      lora_expand_tile(tr, mm, b, r, yr, lo, hi);
    }
  }
}

// The expand of every group over output columns [c0, c1) (a thread's share); b is the pool [slots, out, r].
template <typename W, typename Y>
inline void lora_expand_groups(const float* t, int64_t ldt, const LoraGroups& g, const W* b, int64_t out, int64_t r,
                               const int64_t* cols, int64_t parts, Y* y, int64_t ldy, int64_t c0, int64_t c1) {
  if (c0 >= c1) return;
  for (int64_t grp = 0; grp < g.size(); ++grp)
    lora_expand_rows(t, ldt, g.row_ids(grp), g.rows(grp), b + g.slot[grp] * out * r, r, cols, parts, y, ldy, c0, c1);
}

}  // namespace loom_native
