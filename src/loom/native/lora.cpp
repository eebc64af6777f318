// Multi-LoRA serving on the CPU: y[row] += B_s A_s x[row] under each row's own adapter slot s (-1: none),
// the op behind layers/multi_lora.py's add_lora (its PyTorch twin: add_lora_torch).
//
//   lora_add_(y [n, out], x [n, in], a [S, P r, in], b [S, out, r], slots [n], cols [P + 1]) -> y
//
// Rows are grouped by slot. A group of few rows (decode: a handful of sequences per adapter) runs the
// vectorized shrink and expand of kernels.h, all groups inside one parallel region (Punica's BGMV): each
// A_s / B_s row is read once per group, and the threads split the shrink by (group, rank column) and the
// expand by output column. A group of many rows (a prefill chunk) is a pair of GEMMs (Punica's SGMV), on a
// view of its rows when they are contiguous, else on a gathered copy added back with index_add_.

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

at::Tensor lora_add_(const at::Tensor& y, const at::Tensor& x_in, const at::Tensor& a, const at::Tensor& b,
                     const at::Tensor& slots_in, at::IntArrayRef cols) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.device().is_cpu(),
              "lora_add_: y must be a contiguous fp32 CPU [rows, out] tensor, got ", y.scalar_type(), " ", y.sizes());
  const int64_t n = y.size(0), out = y.size(1);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == n && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "lora_add_: x must be fp32 CPU [rows, in] with y's ", n, " rows, got ", x_in.scalar_type(), " ",
              x_in.sizes());
  const int64_t in = x_in.size(1);
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                  a.is_contiguous() && b.is_contiguous() && a.device().is_cpu() && b.device().is_cpu(),
              "lora_add_: a [slots, parts * rank, in] and b [slots, out, rank] must be contiguous fp32 CPU tensors");
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

  // Many rows of one adapter: GEMMs.
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
    const auto t = at::mm(xs, a[s].t());  // [m, J]
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t c0 = cols[p], w = cols[p + 1] - c0;
      if (w == 0) continue;
      const auto bp = b[s].narrow(0, c0, w).t();
      const auto tp = t.narrow(1, p * r, r);
      if (contiguous) {
        auto ys = y.narrow(0, rows[0], m).narrow(1, c0, w);
        ys.addmm_(tp, bp);
      } else {
        y.narrow(1, c0, w).index_add_(0, idx, at::mm(tp, bp));
      }
    }
  }
  if (small.size() == 0) return y;

  // Few rows per adapter: shrink, barrier, expand in one parallel region.
  auto t = at::empty({n, J}, x.options());
  float* tp = t.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  const std::vector<int64_t> col(cols.begin(), cols.end());
  const int64_t items = small.size() * J, work = static_cast<int64_t>(small.order.size()) * J * (in + out / parts);
  const int threads = work < kParallelWork ? 1 : at::get_num_threads();
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
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.def("lora_add_(Tensor(a!) y, Tensor x, Tensor a, Tensor b, Tensor slots, int[] cols) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) { m.impl("lora_add_", lora_add_); }
