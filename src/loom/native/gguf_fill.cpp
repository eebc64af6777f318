// GGUF blocks -> loom's quantized containers, in place (weights/slots.py: a streamed layer's slot refilled with the
// next layer's bytes). The legacy block formats hold loom's containers verbatim, interleaved with their scales:
//
//   Q4_0  [d | qs 16]          int4 container row chunk = qs        scale d, offset -8 d
//   Q4_1  [d | m | qs 16]      int4 container row chunk = qs        scale d, offset m
//   Q5_0  [d | qh 4 | qs 16]   int5 container row chunk = qs | qh   scale d, offset -16 d
//   Q5_1  [d | m | qh 4 | qs 16]                      = qs | qh     scale d, offset m
//   Q8_0  [d | qs 32]          int8 container row chunk = qs        scale d, offset -128 d
//
// (d, m fp16). One pass de-interleaves them: the byte copies and the fp32 arithmetic weights/native.py uses (d and
// m widened exactly, products by powers of two exact), so a refilled slot equals the loader's layer bit for bit.
// ``heads`` > 0 undoes llama.cpp's Q/K row permutation on the way (gguf.py: unpermute_rope): output row
// h R + p R / 2 + i reads input row h R + 2 i + p (R = rows / heads).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels.h"

namespace {

struct BlockFormat {
  int64_t bytes, qs, qs_bytes, qh, offset_kind;  // offset_kind: 0 m (at byte 2), else offset = -kind x d
};

bool format_of(int64_t qtype, BlockFormat& f) {
  switch (qtype) {  // GGML type ids
    case 2: f = {18, 2, 16, -1, 8}; return true;     // Q4_0
    case 3: f = {20, 4, 16, -1, 0}; return true;     // Q4_1
    case 6: f = {22, 6, 16, 2, 16}; return true;     // Q5_0
    case 7: f = {24, 8, 16, 4, 0}; return true;      // Q5_1
    case 8: f = {34, 2, 32, -1, 128}; return true;   // Q8_0
    default: return false;
  }
}

void gguf_fill(const at::Tensor& raw, int64_t qtype, int64_t heads, at::Tensor q, at::Tensor scales,
               at::Tensor offsets) {
  BlockFormat f;
  TORCH_CHECK(format_of(qtype, f), "gguf_fill: GGML type ", qtype, " is not a legacy block format");
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous(), "gguf_fill: raw must be contiguous bytes");
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2, "gguf_fill: q must be uint8 rows");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  offsets.is_contiguous() && scales.dim() == 2 && scales.sizes() == offsets.sizes(),
              "gguf_fill: scales and offsets must be contiguous fp32 [rows, blocks]");
  const int64_t rows = q.size(0), nb = scales.size(1);
  const int64_t chunk = f.qs_bytes + (f.qh >= 0 ? 4 : 0);  // container bytes per block
  TORCH_CHECK(scales.size(0) == rows && q.size(1) == nb * chunk, "gguf_fill: q holds ", q.size(1),
              " bytes a row, the blocks ", nb * chunk);
  TORCH_CHECK(raw.numel() == rows * nb * f.bytes, "gguf_fill: ", raw.numel(), " bytes for ", rows, " rows of ", nb,
              " blocks of ", f.bytes);
  TORCH_CHECK(heads >= 0 && (heads == 0 || rows % (2 * heads) == 0), "gguf_fill: rows must split into heads");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  float* op = offsets.data_ptr<float>();
  const int64_t per_head = heads > 0 ? rows / heads : 0;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t from = r;
    if (heads > 0) {
      const int64_t h = r / per_head, j = r % per_head, half = per_head / 2;
      from = h * per_head + 2 * (j % half) + j / half;
    }
    const uint8_t* in = src + from * nb * f.bytes;
    uint8_t* out = qp + r * nb * chunk;
    for (int64_t b = 0; b < nb; ++b, in += f.bytes, out += chunk) {
      uint16_t dh, mh;
      std::memcpy(&dh, in, 2);
      const float d = loom_native::half_to_float(dh);
      sp[r * nb + b] = d;
      if (f.offset_kind == 0) {
        std::memcpy(&mh, in + 2, 2);
        op[r * nb + b] = loom_native::half_to_float(mh);
      } else {
        op[r * nb + b] = d * -static_cast<float>(f.offset_kind);
      }
      std::memcpy(out, in + f.qs, f.qs_bytes);
      if (f.qh >= 0) std::memcpy(out + f.qs_bytes, in + f.qh, 4);
    }
  }
}

// QuantizedLinear.refresh_kernel's arithmetic in one pass (layers/quantized.py: _kernel_scales_offsets): the
// kernel's offsets o + shift s (shift 16 for the int5 container, 128 for int8, 0 for int4), dropped when all zero
// and ``drop_zero``; both as fp16 where both hold exactly there (GGUF's d and m), else fp32. Writes them into the
// tensors the kernel reads now (ks, ko) when those have the dtype and size the rules give (a tensor that is the
// buffer itself is already current) and returns 1; returns 0, writing nothing, when they do not (the caller then
// derives new tensors). o + shift s rounds once, as PyTorch's mul-then-add does: shift is a power of two, so shift s
// is exact and a fused multiply-add gives the same float.
int64_t refresh_kernel_scales(const at::Tensor& scales, const at::Tensor& offsets, double shift, bool drop_zero,
                              at::Tensor ks, at::Tensor ko) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  offsets.is_contiguous() && scales.numel() == offsets.numel(),
              "refresh_kernel_scales: scales and offsets must be contiguous fp32 of one size");
  const int64_t n = scales.numel();
  const float* s = scales.data_ptr<float>();
  const float* o = offsets.data_ptr<float>();
  const float sh = static_cast<float>(shift);
  TORCH_CHECK(shift == 0.0 || shift == 16.0 || shift == 128.0, "refresh_kernel_scales: shift is 0, 16 or 128");
  auto to_half = [](float x) { return static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); };
  auto exact16 = [&](float x) {  // NaN fails ==, an overflow to inf fails isfinite
    const float back = _cvtsh_ss(to_half(x));
    return std::isfinite(back) && back == x;
  };
  bool any = false, exact_s = true, exact_o = true;
  int64_t i = 0;
#if defined(__AVX512F__)
  {  // sixteen at a time: exact in fp16 <=> the round trip gives x back and |x| <= 65504 (no overflow to inf)
    const __m512 shv = _mm512_set1_ps(sh), top = _mm512_set1_ps(65504.f);
    auto exact = [&](__m512 x) {
      const __m512 back = _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return _mm512_cmp_ps_mask(back, x, _CMP_EQ_OQ) & _mm512_cmp_ps_mask(_mm512_abs_ps(x), top, _CMP_LE_OQ);
    };
    __mmask16 all_s = 0xFFFF, all_o = 0xFFFF, nonzero = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 sv = _mm512_loadu_ps(s + i), kv = _mm512_fmadd_ps(shv, sv, _mm512_loadu_ps(o + i));
      nonzero |= _mm512_cmp_ps_mask(kv, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      all_s &= exact(sv);
      all_o &= exact(kv);
    }
    any = nonzero != 0;
    exact_s = all_s == 0xFFFF;
    exact_o = all_o == 0xFFFF;
  }
#endif
  for (; i < n; ++i) {
    const float k = o[i] + sh * s[i];
    any |= k != 0.f;
    exact_s &= exact16(s[i]);
    exact_o &= exact16(k);
  }
  const bool empty = drop_zero && !any;
  const bool half = exact_s && (empty || exact_o);
  const auto want = half ? at::kHalf : at::kFloat;
  const bool ks_same = ks.data_ptr() == scales.data_ptr(), ko_same = ko.data_ptr() == offsets.data_ptr();
  if (!(ks.scalar_type() == want && ks.numel() == n && ks.is_contiguous())) return 0;
  if (empty ? ko.numel() != 0 : !(ko.scalar_type() == want && ko.numel() == n && ko.is_contiguous())) return 0;
  if (!empty && ko_same && sh != 0.f) return 0;  // the kernel would read the raw offsets: not this layout
  if (half) {  // exact: the conversion's rounding mode never acts
    auto* kp = reinterpret_cast<uint16_t*>(ks.data_ptr());
    for (int64_t i = 0; i < n; ++i) kp[i] = to_half(s[i]);
    if (!empty) {
      auto* op = reinterpret_cast<uint16_t*>(ko.data_ptr());
      for (int64_t i = 0; i < n; ++i) op[i] = to_half(o[i] + sh * s[i]);
    }
    return 1;
  }
  if (!ks_same) std::memcpy(ks.data_ptr<float>(), s, n * sizeof(float));
  if (!empty && !ko_same) {
    float* op = ko.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) op[i] = o[i] + sh * s[i];
  }
  return 1;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("gguf_fill(Tensor raw, int qtype, int heads, Tensor(a!) q, Tensor(b!) scales, Tensor(c!) offsets) -> ()");
  m.def("refresh_kernel_scales(Tensor scales, Tensor offsets, float shift, bool drop_zero, Tensor(a!) ks, "
        "Tensor(b!) ko) -> int");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("gguf_fill", gguf_fill);
  m.impl("refresh_kernel_scales", refresh_kernel_scales);
}
