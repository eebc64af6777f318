// Multi-LoRA serving on the CPU: y[row] += B_s A_s x[row] under each row's own adapter slot s (-1: none),
// the op behind layers/multi_lora.py's add_lora (its PyTorch twin: add_lora_torch).
//
//   lora_add_(y [n, out], x [n, in], a [S, P r, in], b [S, out, r], slots [n], cols [P + 1]) -> y
//
// a and b are both fp32 or both bf16 (the pool's dtype, vLLM's --lora-dtype); x and y both fp32 or both bf16
// (the model's). Products are computed and summed in fp32 from the weights as stored, and a bf16 y is rounded
// once, when its row's product is complete.
//
// Rows are grouped by slot. A group of few rows (decode: a handful of sequences per adapter) runs the
// vectorized shrink and expand of kernels.h, all groups inside one parallel region (Punica's BGMV): each
// A_s / B_s row is read once per group, and the threads split the shrink by (group, rank column) and the
// expand by output column. A group of many rows (a prefill chunk) is a pair of fp32 GEMMs (Punica's SGMV), on
// a view of its rows when they are contiguous, else on a gathered copy added back with index_add_ (bf16
// weights, rows or outputs are converted to fp32 copies for the GEMMs: a copy of A_s and B_s costs less than
// the GEMMs of 32 or more rows).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <vector>

#include "kernels.h"

namespace {

// Groups of at least this many rows take the GEMM path. Measured at 1 thread on SmolLM2's shapes (rank 16,
// one adapter): the vectorized kernel is ahead of the GEMMs up to about 32 rows (16 rows: 21 against 45 us
// at 576 -> 960, 34 against 43 at 576 -> 3072), about even at 32, and behind from 48 (576 -> 3072: 89
// against 74 us; 128 rows: 250 against 175).
constexpr int64_t kGemmRows = 32;
// Below this many multiply-adds the kernel runs on the calling thread (a parallel region's start costs more).
constexpr int64_t kParallelWork = 1 << 15;

// The groups of few rows: shrink, barrier, expand in one parallel region. W: the weights' storage (float or
// bf16 bits), Y: y's; x is fp32 (t [n, J] fp32 scratch).
template <typename W, typename Y>
void small_groups(const loom_native::LoraGroups& small, const float* xp, int64_t in, const W* ap, const W* bp,
                  int64_t J, int64_t r, const std::vector<int64_t>& col, float* tp, Y* yp, int64_t out, int threads) {
  const int64_t parts = static_cast<int64_t>(col.size()) - 1, items = small.size() * J;
#pragma omp parallel num_threads(threads)
  {
    const int th = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t per = (items + nt - 1) / nt;
    const int64_t i0 = std::min<int64_t>(items, th * per), i1 = std::min<int64_t>(items, i0 + per);
    loom_native::lora_shrink_items(xp, in, small, ap, J, in, tp, J, i0, i1);
#pragma omp barrier
    const int64_t cper = ((out + nt - 1) / nt + 15) / 16 * 16;
    const int64_t c0 = std::min<int64_t>(out, th * cper), c1 = std::min<int64_t>(out, c0 + cper);
    loom_native::lora_expand_groups(tp, J, small, bp, out, r, col.data(), parts, yp, out, c0, c1);
  }
}

template <typename W>
void small_groups(const loom_native::LoraGroups& small, const float* xp, int64_t in, const W* ap, const W* bp,
                  int64_t J, int64_t r, const std::vector<int64_t>& col, float* tp, const at::Tensor& y, int threads) {
  if (y.scalar_type() == at::kFloat)
    small_groups(small, xp, in, ap, bp, J, r, col, tp, y.data_ptr<float>(), y.size(1), threads);
  else
    small_groups(small, xp, in, ap, bp, J, r, col, tp, static_cast<uint16_t*>(y.data_ptr()), y.size(1), threads);
}

bool fp32_or_bf16(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

at::Tensor lora_add_(const at::Tensor& y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& slots_in, at::IntArrayRef cols) {
  TORCH_CHECK(y.dim() == 2 && fp32_or_bf16(y.scalar_type()) && y.is_contiguous() && y.device().is_cpu(),
              "lora_add_: y must be a contiguous fp32 or bf16 CPU [rows, out] tensor, got ", y.scalar_type(), " ",
              y.sizes());
  const int64_t n = y.size(0), out = y.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == n && x_in.scalar_type() == y.scalar_type() && x_in.device().is_cpu(),
              "lora_add_: x must be a CPU [rows, in] tensor of y's dtype (", y.scalar_type(), ") and y's ", n,
              " rows, got ", x_in.scalar_type(), " ", x_in.sizes());
  const int64_t in = x_in.size(1);
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() && a.device().is_cpu() &&
                  b.device().is_cpu(),
              "lora_add_: a [slots, parts * rank, in] and b [slots, out, rank] must be contiguous CPU tensors");
  TORCH_CHECK(fp32_or_bf16(a.scalar_type()) && b.scalar_type() == a.scalar_type(),
              "lora_add_: a and b must both be fp32 or both bf16, got ", a.scalar_type(), " and ", b.scalar_type());
  const int64_t num_slots = a.size(0), r = b.size(2);
  TORCH_CHECK(b.size(0) == num_slots, "lora_add_: a has ", num_slots, " slots but b has ", b.size(0));
  TORCH_CHECK(a.size(2) == in, "lora_add_: a takes ", a.size(2), " inputs but x has ", in);
  TORCH_CHECK(b.size(1) == out, "lora_add_: b has ", b.size(1), " output rows but y has ", out, " columns");
  TORCH_CHECK(r >= 1, "lora_add_: the rank (b's last dimension) must be at least 1");
  const int64_t parts = static_cast<int64_t>(cols.size()) - 1;
  TORCH_CHECK(parts >= 1 && cols[0] == 0 && cols[parts] == out,
              "lora_add_: cols must be the parts' column offsets from 0 to y's ", out, " columns, got ", cols);
  for (int64_t p = 0; p < parts; ++p)
    TORCH_CHECK(cols[p] <= cols[p + 1], "lora_add_: cols must not decrease, got ", cols);
  TORCH_CHECK(a.size(1) == parts * r, "lora_add_: a has ", a.size(1), " rows per slot, expected parts * rank = ",
              parts, " * ", r, " = ", parts * r);
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.numel() == n && !slots_in.is_floating_point(),
              "lora_add_: slots must be an integer [rows] tensor of ", n, " slots, got ", slots_in.sizes());
  if (n == 0) return y;
  const auto slots = slots_in.to(at::kLong).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(sp[i] >= -1 && sp[i] < num_slots, "lora_add_: slot ", sp[i], " of row ", i, " out of range [-1, ",
                num_slots, ")");

  loom_native::LoraGroups all, small;
  loom_native::lora_group_rows(sp, n, num_slots, all);
  if (all.size() == 0) return y;
  const auto x = x_in.contiguous();
  const int64_t J = parts * r;
  const bool y_fp32 = y.scalar_type() == at::kFloat;

  // Many rows of one adapter: fp32 GEMMs.
  small.start.push_back(0);
  for (int64_t g = 0; g < all.size(); ++g) {
    const int64_t m = all.rows(g), s = all.slot[g];
    const int64_t* rows = all.row_ids(g);
    if (m < kGemmRows) {
      small.slot.push_back(s);
      small.order.insert(small.order.end(), rows, rows + m);
      small.start.push_back(static_cast<int64_t>(small.order.size()));
      continue;
    }
    const bool contiguous = rows[m - 1] - rows[0] + 1 == m;  // rows ascend: a segment of the batch
    at::Tensor idx;
    at::Tensor xs;
    if (contiguous) {
      xs = x.narrow(0, rows[0], m);
    } else {
      idx = at::from_blob(const_cast<int64_t*>(rows), {m}, at::kLong);
      xs = x.index_select(0, idx);
    }
    const auto bs = b[s].to(at::kFloat);  // [out, r] (a copy only of bf16 weights, as is A_s's below)
    const auto t = at::mm(xs.to(at::kFloat), a[s].to(at::kFloat).t());  // [m, J]
    // The group's sums: into y itself (fp32, contiguous rows), else into an fp32 block written back once (the
    // products alone, added with index_add_, for scattered fp32 rows; y + products, rounded once, for bf16).
    const at::Tensor ys = contiguous ? y.narrow(0, rows[0], m) : at::Tensor();
    const bool in_place = y_fp32 && contiguous;
    at::Tensor acc = in_place ? ys
                     : y_fp32 ? at::zeros({m, out}, y.options())
                              : (contiguous ? ys : y.index_select(0, idx)).to(at::kFloat);
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t c0 = cols[p], w = cols[p + 1] - c0;
      if (w == 0) continue;
      acc.narrow(1, c0, w).addmm_(t.narrow(1, p * r, r), bs.narrow(0, c0, w).t());
    }
    if (in_place) continue;
    if (y_fp32) y.index_add_(0, idx, acc);
    else if (contiguous) ys.copy_(acc);
    else y.index_copy_(0, idx, acc.to(at::kBFloat16));
  }
  if (small.size() == 0) return y;

  // Few rows per adapter: the vectorized kernels, on fp32 rows of x (bf16 rows widened once here: the shrink
  // reads each row J times).
  at::Tensor xf = x;
  if (x.scalar_type() != at::kFloat) {
    xf = at::empty({n, in}, x.options().dtype(at::kFloat));
    const uint16_t* xb = static_cast<const uint16_t*>(x.data_ptr());
    float* xfp = xf.data_ptr<float>();
    for (const int64_t row : small.order) {
      const uint16_t* src = xb + row * in;
      float* dst = xfp + row * in;
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) dst[i] = loom_native::bf16_to_float(src[i]);
    }
  }
  auto t = at::empty({n, J}, x.options().dtype(at::kFloat));
  const std::vector<int64_t> col(cols.begin(), cols.end());
  const int64_t work = static_cast<int64_t>(small.order.size()) * J * (in + out / parts);
  const int threads = work < kParallelWork ? 1 : at::get_num_threads();
  if (a.scalar_type() == at::kFloat)
    small_groups(small, xf.data_ptr<float>(), in, a.data_ptr<float>(), b.data_ptr<float>(), J, r, col,
                 t.data_ptr<float>(), y, threads);
  else
    small_groups(small, xf.data_ptr<float>(), in, static_cast<const uint16_t*>(a.data_ptr()),
                 static_cast<const uint16_t*>(b.data_ptr()), J, r, col, t.data_ptr<float>(), y, threads);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor slots, int[] cols) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) { m.impl("lora_add_", lora_add_); }
