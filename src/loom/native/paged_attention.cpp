// Paged decode attention for CPUs: one query per sequence against its cached keys and values,
// read in place through the block table (no gather into a padded copy).
//
// For each sequence and query head j (reading kv head j / (Hq / Hkv): GQA):
//   s_t = q_j . k_t * scale for every visible position t,  p_t = exp(s_t - max s) / sum exp(. - max s),
//   out_j = sum_t p_t v_t.
// Two passes (scores, then weighted values) keep it exact and simple; each token's key and value
// rows are read once. Sequences are spread over threads with at::parallel_for.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// A row of the cache as floats: itself when the cache is fp32, else converted into `buf`.
inline const float* load(const float* row, float*, int64_t) { return row; }
template <typename T>
inline const float* load(const T* row, float* buf, int64_t d) {
  for (int64_t i = 0; i < d; ++i) buf[i] = static_cast<float>(row[i]);
  return buf;
}

// Rows live in scattered blocks, which defeats the hardware prefetcher at every block boundary:
// ask for the row a few tokens ahead explicitly.
constexpr int64_t kAhead = 4;
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off);
}

template <typename scalar_t>
void decode_kernel(const float* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* tables,
                   const int64_t* lens, float* out, int64_t batch, int64_t hq, int64_t hkv, int64_t d,
                   int64_t block_size, int64_t max_blocks, float scale, int64_t window) {
  const int64_t groups = hq / hkv;
  const int64_t row = hkv * d;  // one token's keys (all kv heads) are contiguous: [Hkv, D]
  // One work item per sequence, so each token's [Hkv, D] row is read whole and once.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(hq * d), buf(4 * row);
    std::vector<const scalar_t*> rows;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - start;
      const int64_t* table = tables + b * max_blocks;
      rows.resize(n);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t p = start + t;
        rows[t] = k_cache + (table[p / block_size] * block_size + p % block_size) * row;
      }
      scores.assign(hq * std::max<int64_t>(n, 1), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* qb = q + b * hq * d;
      // Pass 1: scores s[j][t] = q_j . k_{t, j / groups} * scale for every query head j. Four tokens at a
      // time: four independent accumulators keep the FMA units busy instead of waiting on one chain.
      for (int64_t t0 = 0; t0 < n; t0 += 4) {
        const int64_t m = std::min<int64_t>(4, n - t0);
        const float* k[4];
        for (int64_t u = 0; u < 4; ++u) {
          if (t0 + u + kAhead < n) prefetch_row(rows[t0 + u + kAhead], row);
          k[u] = u < m ? load(rows[t0 + u], buf.data() + u * row, row) : k[0];
        }
        for (int64_t j = 0; j < hq; ++j) {
          const float* qj = qb + j * d;
          const int64_t off = (j / groups) * d;
          const float *k0 = k[0] + off, *k1 = k[1] + off, *k2 = k[2] + off, *k3 = k[3] + off;
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t i = 0; i < d; ++i) {
            s0 += qj[i] * k0[i];
            s1 += qj[i] * k1[i];
            s2 += qj[i] * k2[i];
            s3 += qj[i] * k3[i];
          }
          const float sv[4] = {s0, s1, s2, s3};
          for (int64_t u = 0; u < m; ++u) scores[j * n + t0 + u] = sv[u] * scale;
        }
      }
      // Softmax over t for every query head.
      std::vector<float> denom(hq, 0.f);
      for (int64_t j = 0; j < hq; ++j) {
        float* sj = scores.data() + j * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sj[t]);
        float z = 0.f;
#pragma omp simd reduction(+ : z)
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = std::exp(sj[t] - m);
          z += sj[t];
        }
        denom[j] = z;
      }
      // Pass 2: acc_j = sum_t p[j][t] v_{t, j / groups}, four tokens per pass over acc_j.
      const std::ptrdiff_t to_v = v_cache - k_cache;
      for (int64_t t0 = 0; t0 < n; t0 += 4) {
        const int64_t m = std::min<int64_t>(4, n - t0);
        const float* v[4];
        for (int64_t u = 0; u < 4; ++u) {
          if (t0 + u + kAhead < n) prefetch_row(rows[t0 + u + kAhead] + to_v, row);
          v[u] = u < m ? load(rows[t0 + u] + to_v, buf.data() + u * row, row) : v[0];
        }
        for (int64_t j = 0; j < hq; ++j) {
          const float* sj = scores.data() + j * n + t0;
          const float p0 = sj[0], p1 = m > 1 ? sj[1] : 0.f, p2 = m > 2 ? sj[2] : 0.f, p3 = m > 3 ? sj[3] : 0.f;
          const int64_t off = (j / groups) * d;
          const float *v0 = v[0] + off, *v1 = v[1] + off, *v2 = v[2] + off, *v3 = v[3] + off;
          float* a = acc.data() + j * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p0 * v0[i] + p1 * v1[i] + p2 * v2[i] + p3 * v3[i];
        }
      }
      float* o = out + b * hq * d;
      for (int64_t j = 0; j < hq; ++j) {
        const float inv = n > 0 ? 1.f / denom[j] : 0.f;
        for (int64_t i = 0; i < d; ++i) o[j * d + i] = acc[j * d + i] * inv;
      }
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "paged_decode_attention", [&] {
    decode_kernel<scalar_t>(qf.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                            tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(),
                            q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), tables.size(1),
                            static_cast<float>(scale), window);
  });
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
