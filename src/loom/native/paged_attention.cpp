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

// Decode attention over the int8 cache (kernels.h: attend_heads_int8; layers/kv_quant.py defines the format).
at::Tensor paged_decode_attention_int8(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       const at::Tensor& k_scale, const at::Tensor& v_scale, const at::Tensor& v_zero,
                                       const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                       int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar, "int8 caches expected");
  const int64_t hkv = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(q.size(1) % hkv == 0 && q.size(2) == d, "query heads must be a multiple of kv heads of the same size");
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && k_scale.numel() == hkv * d && k_scale.is_contiguous(),
              "k_scale: fp32 [kv_heads, head_dim]");
  TORCH_CHECK(v_scale.scalar_type() == at::kFloat && v_zero.scalar_type() == at::kFloat &&
                  v_scale.numel() == k_cache.numel() / d && v_zero.numel() == v_scale.numel() &&
                  v_scale.is_contiguous() && v_zero.is_contiguous(),
              "v_scale / v_zero: fp32 [blocks, block_size, kv_heads]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto tables = block_tables.to(at::kLong).contiguous();
  auto lens = context_lens.to(at::kLong).contiguous();
  auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({q.size(0), q.size(1), d}, q.options().dtype(at::kFloat));
  const loom_native::Int8KV c{k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scale.data_ptr<float>(),
                              v_scale.data_ptr<float>(), v_zero.data_ptr<float>()};
  const float* qp = qf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t hq = q.size(1), bs = k_cache.size(1), mb = tables.size(1);
  const float sc = static_cast<float>(scale);
  auto each = [&](auto&& attend) {
    for_each_item(q.size(0), hkv, [&](int64_t b, int64_t g0, int64_t g1, loom_native::AttentionScratch& scratch) {
      attend(qp + b * hq * d, tp + b * mb, lp[b], g0, g1, op + b * hq * d, scratch);
    });
  };
#if defined(LOOM_INT8_ATTENTION_FAST)
  if (loom_native::int8_attention_fast(d)) {
    auto kernel = d == 64 ? loom_native::attend_heads_int8<64>
                : d == 128 ? loom_native::attend_heads_int8<128> : loom_native::attend_heads_int8<256>;
    each([&](const float* qb, const int64_t* table, int64_t len, int64_t g0, int64_t g1, float* ob,
             loom_native::AttentionScratch& scratch) {
      kernel(qb, c, table, len, g0, g1, hq, hkv, bs, sc, window, ob, scratch);
    });
    return out.to(q.scalar_type());
  }
#endif
  each([&](const float* qb, const int64_t* table, int64_t len, int64_t g0, int64_t g1, float* ob,
           loom_native::AttentionScratch& scratch) {
    loom_native::attend_heads_int8_ref(qb, c, table, len, g0, g1, hq, hkv, d, bs, sc, window, ob, scratch);
  });
  return out.to(q.scalar_type());
}

// Quantize tokens' keys and values [T, hkv, d] into the int8 cache at flat slots [T], exactly as
// layers/kv_quant.py's quantize_keys / quantize_values round (true divisions, no fused multiply-adds: the
// build's -ffast-math is switched off here, so a token written here or by PyTorch gets the same codes).
#pragma GCC push_options
#pragma GCC optimize("no-fast-math", "fp-contract=off")
void quantize_kv_rows(const float* k, const float* v, const int64_t* slots, int64_t items, int64_t hkv, int64_t d,
                      const float* k_scale, int8_t* kc, int8_t* vc, float* vs, float* vz) {
  at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / hkv, g = item % hkv, at_slot = slots[t] * hkv + g;
      const float* kr = k + item * d;
      const float* vr = v + item * d;
      int8_t* ko = kc + at_slot * d;
      int8_t* vo = vc + at_slot * d;
      for (int64_t i = 0; i < d; ++i) {
        const float code = std::nearbyint(kr[i] / k_scale[g * d + i]);
        ko[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, code)));
      }
      float lo = vr[0], hi = vr[0];
      for (int64_t i = 1; i < d; ++i) {
        lo = std::min(lo, vr[i]);
        hi = std::max(hi, vr[i]);
      }
      const float range = hi - lo;
      const float step = std::max(range / 255.0f, 1e-8f);
      const float shifted = 128.0f * step;
      const float zero = lo + shifted;
      for (int64_t i = 0; i < d; ++i) {
        const float code = std::nearbyint((vr[i] - zero) / step);
        vo[i] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, code)));
      }
      vs[at_slot] = step;
      vz[at_slot] = zero;
    }
  });
}
#pragma GCC pop_options

void int8_kv_write(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, at::Tensor k_cache,
                   at::Tensor v_cache, const at::Tensor& k_scale, at::Tensor v_scale, at::Tensor v_zero) {
  TORCH_CHECK(k_cache.scalar_type() == at::kChar && v_cache.scalar_type() == at::kChar && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "int8 caches [blocks, block_size, kv_heads, head_dim] expected");
  const int64_t hkv = k_cache.size(2), d = k_cache.size(3), capacity = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k.numel() == slots.numel() * hkv * d && v.numel() == k.numel(), "k, v: [tokens, kv_heads, head_dim]");
  TORCH_CHECK(k_scale.scalar_type() == at::kFloat && k_scale.numel() == hkv * d && k_scale.is_contiguous(),
              "k_scale: fp32 [kv_heads, head_dim]");
  TORCH_CHECK(v_scale.scalar_type() == at::kFloat && v_zero.scalar_type() == at::kFloat &&
                  v_scale.numel() == capacity * hkv && v_zero.numel() == v_scale.numel() && v_scale.is_contiguous() &&
                  v_zero.is_contiguous(),
              "v_scale / v_zero: fp32 [blocks, block_size, kv_heads]");
  auto kf = k.to(at::kFloat).contiguous();
  auto vf = v.to(at::kFloat).contiguous();
  auto sl = slots.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t t = 0; t < sl.numel(); ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot out of range");
  quantize_kv_rows(kf.data_ptr<float>(), vf.data_ptr<float>(), sp, sl.numel() * hkv, hkv, d, k_scale.data_ptr<float>(),
                   k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), v_scale.data_ptr<float>(),
                   v_zero.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(loom, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window) -> Tensor");
  m.def("paged_decode_attention_int8(Tensor q, Tensor k_cache, Tensor v_cache, Tensor k_scale, Tensor v_scale, "
        "Tensor v_zero, Tensor block_tables, Tensor context_lens, float scale, int window) -> Tensor");
  m.def("int8_kv_write(Tensor k, Tensor v, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k_scale, "
        "Tensor(c!) v_scale, Tensor(d!) v_zero) -> ()");
}

TORCH_LIBRARY_IMPL(loom, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("paged_decode_attention_int8", paged_decode_attention_int8);
  m.impl("int8_kv_write", int8_kv_write);
}
