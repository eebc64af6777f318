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
// by copying. int5 (GGUF Q5_0 / Q5_1): the same 16 bytes, then 4 bytes of fifth bits (bit i: input i),
// and the value is (q - 16) s + z, as int8's is q s + z with q signed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
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
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "quant_linear: bits must be 4, 5 or 8, got ", bits);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "quant_linear: activations must be fp32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte || qweight.scalar_type() == at::kChar,
              "quant_linear: codes must be uint8 (int4 pairs) or int8");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), "quant_linear: codes must be a contiguous [N, bytes]");
  const int64_t n = qweight.size(0), k = x.size(-1);
  TORCH_CHECK(loom_native::group_supported(bits, group, k), "quant_linear: group size ", group,
              " must be a multiple of 32 (int4) or 16 (int8) dividing the input size ", k, " (a multiple of 32)");
  const int64_t want_bytes = k / kChunk * loom_native::chunk_bytes(static_cast<int>(bits));
  TORCH_CHECK(qweight.size(1) == want_bytes, "quant_linear: codes have ", qweight.size(1),
              " bytes per row; expected ", want_bytes);
  // fp16 scales (and offsets) are read as they are; anything else as fp32
  const bool half = scales.scalar_type() == at::kHalf;
  auto s = half ? scales.contiguous() : scales.to(at::kFloat).contiguous();
  at::Tensor z;
  if (offsets.has_value() && offsets->defined() && offsets->numel() > 0)
    z = offsets->to(half ? at::kHalf : at::kFloat).contiguous();
  const QuantWeight w = loom_native::quant_weight(qweight, s, z, bits, group, "quant_linear");
  auto xc = x.contiguous();
  const int64_t m = xc.numel() / k;
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  auto y = at::empty(sizes, x.options());
  gemm(xc.data_ptr<float>(), m, w, y.data_ptr<float>());
  return y;
}

// The fp32 weight [N, K] (q s + z per group), for products with many rows, where a BLAS GEMM on the
// dequantized weight beats dequantizing in registers once per row tile.
// Rows n0 .. n1-1 of W_hat (q s + z per group) into out (row stride k), as fp32 or as bf16 bits (rounded to
// nearest-even once, from the fp32 value).
[[gnu::always_inline]] inline void put(float* o, int64_t i, float v) { o[i] = v; }
[[gnu::always_inline]] inline void put(uint16_t* o, int64_t i, float v) { o[i] = loom_native::float_to_bf16(v); }

template <typename T>
void dequant_rows(const uint8_t* q, const float* sp, const float* zp, int64_t bits, int64_t group, int64_t k,
                  int64_t row_bytes, int64_t n0, int64_t n1, T* out) {
  const int64_t groups = k / group;
  for (int64_t r = n0; r < n1; ++r) {
    const uint8_t* row = q + r * row_bytes;
    T* orow = out + (r - n0) * k;
    for (int64_t g = 0; g < groups; ++g) {
      const float sc = sp[r * groups + g], off = zp != nullptr ? zp[r * groups + g] : 0.f;
      T* o = orow + g * group;
      if (bits == 4) {
        for (int64_t c = 0; c < group / kChunk; ++c) {
          const uint8_t* b = row + (g * group + c * kChunk) / 2;
          T* oc = o + c * kChunk;
#pragma omp simd
          for (int i = 0; i < 16; ++i) {
            put(oc, i, static_cast<float>(b[i] & 0xF) * sc + off);
            put(oc, i + 16, static_cast<float>(b[i] >> 4) * sc + off);
          }
        }
      } else if (bits == 5) {  // (q - 16) s + z, q = nibble | fifth bit << 4 (kernels.h: chunk_bytes)
        for (int64_t c = 0; c < group / kChunk; ++c) {
          const uint8_t* b = row + (g * group + c * kChunk) / kChunk * 20;
          uint32_t high;
          std::memcpy(&high, b + 16, 4);
          T* oc = o + c * kChunk;
          for (int i = 0; i < 16; ++i) {
            const int lo = (b[i] & 0xF) | (((high >> i) & 1) << 4), hi = (b[i] >> 4) | (((high >> (i + 16)) & 1) << 4);
            put(oc, i, static_cast<float>(lo - 16) * sc + off);
            put(oc, i + 16, static_cast<float>(hi - 16) * sc + off);
          }
        }
      } else {
        const int8_t* b = reinterpret_cast<const int8_t*>(row) + g * group;
#pragma omp simd
        for (int64_t i = 0; i < group; ++i) put(o, i, static_cast<float>(b[i]) * sc + off);
      }
    }
  }
}

struct Codes {
  const uint8_t* q;
  at::Tensor s, z;  // fp32 scales, offsets (undefined: none)
  int64_t n, k, row_bytes;
};

Codes codes_of(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
               int64_t bits, int64_t group, const char* op) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, op, ": bits must be 4, 5 or 8");
  TORCH_CHECK(qweight.dim() == 2 && qweight.is_contiguous(), op, ": codes must be a contiguous [N, bytes]");
  TORCH_CHECK(bits != 5 || qweight.size(1) % 20 == 0, op, ": int5 rows are whole 20-byte chunks");
  const int64_t n = qweight.size(0), k = loom_native::inputs_of(qweight.size(1), bits);
  TORCH_CHECK(group > 0 && k % group == 0 && (bits == 8 || group % kChunk == 0), op, ": bad group size");
  Codes c{static_cast<const uint8_t*>(qweight.data_ptr()), scales.to(at::kFloat).contiguous(), at::Tensor(), n, k,
          qweight.size(1)};
  TORCH_CHECK(c.s.numel() == n * (k / group), op, ": scales must be [N, K / group]");
  if (offsets.has_value() && offsets->defined() && offsets->numel() > 0) c.z = offsets->to(at::kFloat).contiguous();
  return c;
}

at::Tensor quant_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                            int64_t bits, int64_t group) {
  const Codes c = codes_of(qweight, scales, offsets, bits, group, "quant_dequantize");
  auto w = at::empty({c.n, c.k}, scales.options().dtype(at::kFloat));
  const float* zp = c.z.defined() ? c.z.data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, c.n, 64, [&](int64_t n0, int64_t n1) {
    dequant_rows(c.q, c.s.data_ptr<float>(), zp, bits, group, c.k, c.row_bytes, n0, n1, wp + n0 * c.k);
  });
  return w;
}

// y = x W_hat^T for many rows x (a batched decode step, a prefill) on the bf16 matrix units: W_hat is
// dequantized to bf16 one tile of output rows at a time (about 1 MB: it stays in L2 for the product), x is
// rounded to bf16 once, each tile's product runs through oneDNN (AMX), and y comes back in x's dtype. The
// codes stay the only copy of the weight; dequantizing all of W to fp32 for an fp32 GEMM (the previous path)
// wrote and read 4 bytes per weight per call and ran at the fp32 rate. A CPU without bf16 GEMMs (the build
// targets the machine it runs on) gets the same tiles in fp32.
#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
constexpr bool kTilesInBf16 = true;
using TileT = uint16_t;
#else
constexpr bool kTilesInBf16 = false;
using TileT = float;
#endif

at::Tensor quant_linear_tiled(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& offsets, int64_t bits, int64_t group) {
  const Codes c = codes_of(qweight, scales, offsets, bits, group, "quant_linear_tiled");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == c.k, "quant_linear_tiled: x must be [M, K]");
  const auto tile_type = kTilesInBf16 ? at::kBFloat16 : at::kFloat;
  auto xt = x.to(tile_type).contiguous();
  auto y = at::empty({x.size(0), c.n}, x.options());
  const int64_t tile = std::max<int64_t>(64, ((1 << 20) / (2 * c.k)) / 64 * 64);
  auto buf = at::empty({std::min(tile, c.n), c.k}, x.options().dtype(tile_type));
  const float* zp = c.z.defined() ? c.z.data_ptr<float>() : nullptr;
  TileT* bp = static_cast<TileT*>(buf.data_ptr());
  for (int64_t t0 = 0; t0 < c.n; t0 += tile) {
    const int64_t rows = std::min(tile, c.n - t0);
    at::parallel_for(t0, t0 + rows, 16, [&](int64_t n0, int64_t n1) {
      dequant_rows(c.q, c.s.data_ptr<float>(), zp, bits, group, c.k, c.row_bytes, n0, n1, bp + (n0 - t0) * c.k);
    });
    y.narrow(1, t0, rows).copy_(at::linear(xt, buf.narrow(0, 0, rows)));
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("quant_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
  m.def("quant_dequantize(Tensor qweight, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
  m.def("quant_linear_tiled(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("quant_linear", quant_linear);
  m.impl("quant_dequantize", quant_dequantize);
  m.impl("quant_linear_tiled", quant_linear_tiled);
}
