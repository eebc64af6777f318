// Fused elementwise kernels for the decoder layer: each reads its inputs once and writes once, where
// the PyTorch composition makes several passes (RMSNorm alone is six ops: pow, mean, add, rsqrt,
// mul, mul). Statistics and activations are computed in fp32 whatever the storage type.
//
//   rms_norm(x, w, eps)            y = x / sqrt(mean(x^2) + eps) * w               (Zhang & Sennrich 2019)
//   add_rms_norm(x, r, w, eps)     h = x + r;  (rms_norm(h, w, eps), h)           (residual add fused in)
//   silu_and_mul(gu)               gu = [g | u]:  silu(g) * u = g sigmoid(g) u      (SwiGLU, Shazeer 2020)
//   rope(x, cos, sin)              x cos + roll(x, d/2) sin   (sin carries rotate-half's sign)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "kernels.h"

namespace {

constexpr int64_t kRowsPerTask = 8;

template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, T* h_out, const T* r, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * h;
      T* yi = y + i * h;
      float ss = 0.f;
      if (r != nullptr) {  // h = x + r, kept (in the storage type, as the residual stream is)
        const T* ri = r + i * h;
        T* hi = h_out + i * h;
        for (int64_t j = 0; j < h; ++j) hi[j] = static_cast<T>(static_cast<float>(xi[j]) + static_cast<float>(ri[j]));
        xi = hi;
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < h; ++j) {
        const float v = static_cast<float>(xi[j]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
      for (int64_t j = 0; j < h; ++j) {
        // As HF: normalize in fp32, round to the storage type, then scale by the weight.
        yi[j] = static_cast<T>(static_cast<float>(static_cast<T>(static_cast<float>(xi[j]) * inv)) *
                               static_cast<float>(w[j]));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.size(-1) == w.size(0), "rms_norm: weight size mismatch");
  auto xc = x.contiguous();
  auto wc = w.to(x.scalar_type()).contiguous();
  auto y = at::empty_like(xc);
  const int64_t h = x.size(-1), rows = xc.numel() / h;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), nullptr,
                            nullptr, rows, h, static_cast<float>(eps));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w,
                                                double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: shape mismatch");
  auto xc = x.contiguous();
  auto rc = residual.to(x.scalar_type()).contiguous();
  auto wc = w.to(x.scalar_type()).contiguous();
  auto y = at::empty_like(xc);
  auto hsum = at::empty_like(xc);
  const int64_t h = x.size(-1), rows = xc.numel() / h;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                            hsum.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), rows, h, static_cast<float>(eps));
  });
  return {y, hsum};
}

using loom_native::exp_vec;

// Storage <-> fp32 for the elementwise loops: plain casts, and bf16 as raw bits (kernels.h: c10's own
// conversions kept the loop scalar, 0.7 ms for 64 x 1536 values).
using loom_native::widen;
[[gnu::always_inline]] inline float widen(double x) { return static_cast<float>(x); }
template <typename T>
[[gnu::always_inline]] inline T narrow(float x) { return static_cast<T>(x); }
template <>
[[gnu::always_inline]] inline uint16_t narrow<uint16_t>(float x) { return loom_native::float_to_bf16(x); }

// (Loops with pragmas live in templates: a pragma cannot sit inside the AT_DISPATCH macro's argument.)
// Computed in fp32 and rounded once to the storage type.
template <typename T>
void silu_and_mul_rows(const T* in, T* o, int64_t rows, int64_t f) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gi = in + i * 2 * f;
      const T* ui = gi + f;
      T* oi = o + i * f;
#pragma omp simd
      for (int64_t j = 0; j < f; ++j) {
        const float a = widen(gi[j]);
        oi[j] = narrow<T>(a * (1.f / (1.f + exp_vec(-a))) * widen(ui[j]));
      }
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.size(-1) % 2 == 0, "silu_and_mul: last dimension must be even");
  auto g = gu.contiguous();
  const int64_t f = g.size(-1) / 2, rows = g.numel() / (2 * f);
  auto sizes = g.sizes().vec();
  sizes.back() = f;
  auto out = at::empty(sizes, g.options());
  if (g.scalar_type() == at::kBFloat16) {
    silu_and_mul_rows(reinterpret_cast<const uint16_t*>(g.data_ptr<at::BFloat16>()),
                      reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), rows, f);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(g.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, f);
  });
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // x [T, H, D] (any strides with unit stride on D); cos, sin [T, D] (or broadcastable [T, 1, D]).
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope: x must be [T, H, D] with contiguous D");
  const int64_t t = x.size(0), nh = x.size(1), d = x.size(2), half = d / 2;
  auto c = cos.reshape({t, d}).to(x.scalar_type()).contiguous();
  auto s = sin.reshape({t, d}).to(x.scalar_type()).contiguous();
  auto out = at::empty({t, nh, d}, x.options());
  const int64_t st = x.stride(0), sh = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, t * nh, kRowsPerTask * 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t ti = r / nh, hi = r % nh;
        const scalar_t* xi = in + ti * st + hi * sh;
        const scalar_t* ci = cp + ti * d;
        const scalar_t* si = sp + ti * d;
        scalar_t* oi = o + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const float rolled = static_cast<float>(xi[j < half ? j + half : j - half]);
          oi[j] = static_cast<scalar_t>(static_cast<float>(xi[j]) * static_cast<float>(ci[j]) +
                                        rolled * static_cast<float>(si[j]));
        }
      }
    });
  });
  return out;
}

}  // namespace

// Row-wise argmax of fp32 logits [rows, n]: the first index of the largest value, a NaN counting as the
// largest (torch.argmax's rule). Two passes over a row that stays in cache: a vectorized max, then the first
// chunk holding it. torch's argmax carries (value, index) pairs element by element: 3.5 ms for 64 x 49,152
// logits, where amax takes 0.25 ms.
// The same for logits stored column-major (x.t() contiguous: [n, rows] in memory, as an output layer computed
// as W h^T leaves them): every row's running maximum advances together, vectorized across rows, over chunks
// of the vocabulary spread across threads, then merged in vocabulary order (so the first maximum wins).
at::Tensor argmax_columns(const at::Tensor& x) {
  const int64_t rows = x.size(0), n = x.size(1);
  const float* p = x.data_ptr<float>();
  constexpr int64_t kSpan = 4096;
  const int64_t chunks = (n + kSpan - 1) / kSpan;
  std::vector<float> best(chunks * rows, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> where(chunks * rows, 0);
  std::vector<int32_t> nan(chunks * rows, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* b = best.data() + c * rows;
      int64_t* w = where.data() + c * rows;
      int32_t* f = nan.data() + c * rows;
      for (int64_t r = 0; r < rows; ++r) w[r] = c * kSpan;
      for (int64_t j = c * kSpan; j < std::min(n, (c + 1) * kSpan); ++j) {
        const float* col = p + j * rows;
#pragma omp simd
        for (int64_t r = 0; r < rows; ++r) {
          const float v = col[r];
          const bool take = !f[r] && (v != v || v > b[r]);
          f[r] = f[r] || v != v;
          b[r] = take ? v : b[r];
          w[r] = take ? j : w[r];
        }
      }
    }
  });
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    int64_t c = 0;
    for (int64_t k = 1; k < chunks && !nan[c * rows + r]; ++k) {
      const int64_t i = k * rows + r;
      if (nan[i] || best[i] > best[c * rows + r]) c = k;
    }
    o[r] = where[c * rows + r];
  }
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows: x must be fp32 [rows, n > 0]");
  if (x.size(0) > 1 && x.stride(0) == 1 && x.stride(1) == x.size(0)) return argmax_columns(x);
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), n = xc.size(1);
  auto out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* p = xc.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  constexpr int64_t kChunk = 64;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = p + r * n;
      float mx = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : mx) reduction(max : nan)
      for (int64_t j = 0; j < n; ++j) {
        mx = row[j] > mx ? row[j] : mx;
        nan = row[j] != row[j] ? 1 : nan;
      }
      int64_t idx = 0;
      for (int64_t j0 = 0; j0 < n; j0 += kChunk) {  // the first chunk with a hit, then the hit inside it
        const int64_t j1 = std::min(n, j0 + kChunk);
        int hit = 0;
#pragma omp simd reduction(max : hit)
        for (int64_t j = j0; j < j1; ++j) hit = (nan ? row[j] != row[j] : row[j] == mx) ? 1 : hit;
        if (hit) {
          idx = j0;
          while (nan ? row[idx] == row[idx] : row[idx] != mx) ++idx;
          break;
        }
      }
      o[r] = idx;
    }
  });
  return out;
}

// LayerNorm(x + y) * w + b per row (post-LN residual blocks: BERT's h = LN(h + f(h))): the sum rounded to the
// storage type first (as `x + y` then LayerNorm would), mean and variance of it in fp32 (two passes over the
// row, in registers' reach), the output rounded once. One pass over memory instead of an add and a norm.
template <typename T>
void add_layer_norm_rows(const T* x, const T* y, const T* w, const T* b, T* o, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    std::vector<float> s(d);
    for (int64_t i = begin; i < end; ++i) {
      const T *xi = x + i * d, *yi = y + i * d;
      float mean = 0.f;
#pragma omp simd reduction(+ : mean)
      for (int64_t j = 0; j < d; ++j) {
        s[j] = widen(narrow<T>(widen(xi[j]) + widen(yi[j])));
        mean += s[j];
      }
      mean /= static_cast<float>(d);
      float var = 0.f;
#pragma omp simd reduction(+ : var)
      for (int64_t j = 0; j < d; ++j) var += (s[j] - mean) * (s[j] - mean);
      const float inv = 1.f / std::sqrt(var / static_cast<float>(d) + eps);
      T* oi = o + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) oi[j] = narrow<T>((s[j] - mean) * inv * widen(w[j]) + widen(b[j]));
    }
  });
}

at::Tensor add_layer_norm(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, const at::Tensor& bias,
                          double eps) {
  TORCH_CHECK(x.sizes() == y.sizes() && x.scalar_type() == y.scalar_type(), "add_layer_norm: x and y must match");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.numel() == d && bias.numel() == d && weight.scalar_type() == x.scalar_type() &&
                  bias.scalar_type() == x.scalar_type(),
              "add_layer_norm: weight and bias must be [D] in x's dtype");
  auto xc = x.contiguous(), yc = y.contiguous(), wc = weight.contiguous(), bc = bias.contiguous();
  auto out = at::empty_like(xc);
  const int64_t rows = d > 0 ? xc.numel() / d : 0;
  if (x.scalar_type() == at::kBFloat16) {
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); };
    add_layer_norm_rows(bits(xc), bits(yc), bits(wc), bits(bc),
                        reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), rows, d, static_cast<float>(eps));
    return out;
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat, "add_layer_norm: fp32 or bf16");
  add_layer_norm_rows(xc.data_ptr<float>(), yc.data_ptr<float>(), wc.data_ptr<float>(), bc.data_ptr<float>(),
                      out.data_ptr<float>(), rows, d, static_cast<float>(eps));
  return out;
}

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor y, Tensor weight, Tensor bias, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("rope", rope);
  m.impl("argmax_rows", argmax_rows);
  m.impl("add_layer_norm", add_layer_norm);
}
