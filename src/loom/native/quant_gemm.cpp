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

#include "kernels.h"

namespace {

using loom_native::kChunk;
using loom_native::QuantWeight;

void gemm(const float* x, int64_t m, const QuantWeight& w, float* y) {
  const std::vector<int32_t> gc = loom_native::group_of_chunks(w.k, w.group);
  // Few output rows per task: a decode GEMV has N of a few hundred, and both cores must get work.
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    loom_native::quant_rows(x, m, w, y, n0, n1, gc.data(), false);
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
  gemm(xc.data_ptr<float>(), m, w, y.data_ptr<float>());
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
