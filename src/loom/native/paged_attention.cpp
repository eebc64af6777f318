// Paged decode attention for CPUs: one query per sequence against its cached keys and values,
// read in place through the block table (no gather into a padded copy).
//
// For each sequence and query head j (reading kv head j / (Hq / Hkv): GQA):
//   s_t = q_j . k_t * scale for every visible position t,  p_t = exp(s_t - max s) / sum exp(. - max s),
//   out_j = sum_t p_t v_t.
// The kernel itself is loom_native::attend_group (kernels.h); (sequence, KV head) items are spread
// over threads with at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

template <typename scalar_t>
void decode_kernel(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* tables,
                   const int64_t* lens, float* out, int64_t batch, int64_t hq, int64_t hkv, int64_t d,
                   int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  // One work item per (sequence, KV head): a batch of one still spreads its heads over the threads.
  at::parallel_for(0, batch * hkv, 1, [&](int64_t begin, int64_t end) {
    loom_native::AttentionScratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / hkv, g = item % hkv;
      loom_native::attend_group(q + b * hq * d, k_cache, v_cache, tables + b * max_blocks, lens[b], g, hq, hkv, d,
                                block_size, scale, window, out + b * hq * d, scratch);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  auto run = [&](auto* k, auto* v) {
    decode_kernel(qf.data_ptr<float>(), k, v, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                  out.data_ptr<float>(), q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1),
                  tables.size(1), static_cast<float>(scale), window);
  };
  if (k_cache.scalar_type() == at::kBFloat16) {  // read as raw bits: conversions that vectorize (kernels.h)
    run(reinterpret_cast<const loom_native::bf16*>(k_cache.data_ptr<at::BFloat16>()),
        reinterpret_cast<const loom_native::bf16*>(v_cache.data_ptr<at::BFloat16>()));
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kHalf, k_cache.scalar_type(), "paged_decode_attention", [&] {
      run(static_cast<const scalar_t*>(k_cache.data_ptr<scalar_t>()),
          static_cast<const scalar_t*>(v_cache.data_ptr<scalar_t>()));
    });
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(loom, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
}
