// Paged decode attention for CPUs: one query per sequence against its cached keys and values,
// read in place through the block table (no gather into a padded copy).
//
// For each sequence and query head j (reading kv head j / (Hq / Hkv): GQA):
//   s_t = q_j . k_t * scale for every visible position t,  p_t = exp(s_t - max s) / sum exp(. - max s),
//   out_j = sum_t p_t v_t.
// The kernel itself is loom_native::attend_heads (kernels.h); sequences (or, for small batches,
// (sequence, KV head) pairs) are spread over threads with at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

// Calls attend(b, g0, g1, scratch) for every work item, spread over the threads. Enough sequences to keep
// every thread busy: one item per sequence, all its KV heads (each token's row read once, in order).
// Fewer (a batch of one): one item per (sequence, KV head), so the heads still spread over the threads.
template <typename F>
void for_each_item(int64_t batch, int64_t hkv, const F& attend) {
  const bool per_sequence = batch >= 4 * at::get_num_threads();
  const int64_t items = per_sequence ? batch : batch * hkv;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    loom_native::AttentionScratch scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = per_sequence ? item : item / hkv, g0 = per_sequence ? 0 : item % hkv;
      attend(b, g0, per_sequence ? hkv : g0 + 1, scratch);
    }
  });
}

template <typename scalar_t>
void decode_kernel(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* tables,
                   const int64_t* lens, float* out, int64_t batch, int64_t hq, int64_t hkv, int64_t d,
                   int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  for_each_item(batch, hkv, [&](int64_t b, int64_t g0, int64_t g1, loom_native::AttentionScratch& scratch) {
    loom_native::attend_heads(q + b * hq * d, k_cache, v_cache, tables + b * max_blocks, lens[b], g0, g1, hq, hkv, d,
                              block_size, scale, window, out + b * hq * d, scratch);
  });
}

#if defined(__AVX512BF16__)
void bf16_kernel(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const int64_t* tables,
                 const int64_t* lens, float* out, int64_t batch, int64_t hq, int64_t hkv, int64_t d, int64_t block_size,
                 int64_t max_blocks, float scale, int64_t window) {
  auto attend = d == 64 ? loom_native::attend_heads_bf16<64>
              : d == 128 ? loom_native::attend_heads_bf16<128> : loom_native::attend_heads_bf16<256>;
  for_each_item(batch, hkv, [&](int64_t b, int64_t g0, int64_t g1, loom_native::AttentionScratch& scratch) {
    attend(q + b * hq * d, k_cache, v_cache, tables + b * max_blocks, lens[b], g0, g1, hq, hkv, block_size, scale,
           window, out + b * hq * d, scratch);
  });
}
#endif

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "head_dim mismatch");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto tables = block_tables.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  auto run = [&](auto* k, auto* v) {
    auto qf = q.to(at::kFloat).contiguous();
    decode_kernel(qf.data_ptr<float>(), k, v, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                  out.data_ptr<float>(), q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1),
                  tables.size(1), static_cast<float>(scale), window);
  };
#if defined(__AVX512BF16__)
  if (k_cache.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kBFloat16 &&
      loom_native::bf16_attention_fast(q.size(2))) {
    auto qb = q.contiguous();
    bf16_kernel(reinterpret_cast<const uint16_t*>(qb.data_ptr<at::BFloat16>()),
                reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>()),
                reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>()), tables.data_ptr<int64_t>(),
                lens.data_ptr<int64_t>(), out.data_ptr<float>(), q.size(0), q.size(1), k_cache.size(2), q.size(2),
                k_cache.size(1), tables.size(1), static_cast<float>(scale), window);
    return out.to(q.scalar_type());
  }
#endif
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
