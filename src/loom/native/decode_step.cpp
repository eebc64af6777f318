// The decode step in C++: the forward of one new token for each of B sequences of a Llama-shaped
// model (pre-norm RMSNorm, SwiGLU, rotate-half RoPE, GQA, optional q/k/v bias, sliding windows) over a
// paged fp32 KV cache, run inside one OpenMP parallel region.
//
// Why: at batch 1 a decode step of SmolLM2 is 121 GEMVs of 20-500 us and ~300 small ops. The
// TorchScript step (engine/step/scripted.py) pays for each op an interpreter and dispatcher visit,
// an output allocation, and for each GEMV the start of a parallel region: ~4 ms of a 13.4 ms step
// went there (measured with torch.profiler). Here the threads start once per step and meet at a
// barrier between dependent stages (llama.cpp's CPU backend works the same way), buffers are
// allocated once per step, the bias add, RoPE and cache write are one pass, and the residual adds
// happen inside the GEMVs' stores.
//
// It computes what the scripted step's DecodeProgram computes, op for op, with the same kernels
// (kernels.h); tests hold the two to the same logits. Linears must be loom's group-quantized
// int4 / int8 kind or dense fp32; anything else stays on the TorchScript step.
//
// Multi-LoRA (layers/multi_lora.py): a decoder layer's linears may carry a pool of adapter slots
// (set_lora), and step's lora_slots names each row's slot (-1: the base model). A linear with a pool then
// runs its shrink over its input (t = x A_s^T, split over the threads by (adapter group, rank column)),
// one barrier, and after the base GEMV of a thread's output columns the expand of the same columns
// (y += t B_s^T): the columns a thread adds to are the ones it just wrote, so the expand needs no barrier
// of its own. It computes what the module forward plus add_lora computes. The pools are fp32 or bf16 (vLLM's
// --lora-dtype; bf16 halves the adapter bytes a step reads), widened exactly as they are read.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

// One linear layer: dense fp32 [N, K], or loom's quantized codes with scales and offsets.
struct LinearWeight {
  at::Tensor w, s, z;  // kept alive; s is empty for dense weights
  loom_native::QuantWeight q{};
  std::vector<int32_t> group_of_chunk;
  bool dense = true;
  int64_t n = 0, k = 0;

  LinearWeight() = default;
  LinearWeight(const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& offsets, int64_t bits,
               int64_t group)
      : w(weight), s(scales), z(offsets), dense(scales.numel() == 0) {
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "NativeDecoder: weights must be contiguous 2-D CPU tensors");
    n = w.size(0);
    if (dense) {
      TORCH_CHECK(w.scalar_type() == at::kFloat, "NativeDecoder: dense weights must be fp32");
      k = w.size(1);
      return;
    }
    TORCH_CHECK(bits == 4 || bits == 5 || bits == 8, "NativeDecoder: quantized weights must be int4, int5 or int8, got ",
                bits, " bits");
    TORCH_CHECK(w.scalar_type() == at::kByte || w.scalar_type() == at::kChar, "NativeDecoder: codes must be uint8 / int8");
    TORCH_CHECK(bits != 5 || w.size(1) % 20 == 0, "NativeDecoder: int5 rows are whole 20-byte chunks");
    k = loom_native::inputs_of(w.size(1), bits);
    TORCH_CHECK(loom_native::group_supported(bits, group, k), "NativeDecoder: group size ", group,
                " must be a multiple of 32 (int4) or 16 (int8) dividing ", k);
    q = loom_native::quant_weight(w, s, z, bits, group, "NativeDecoder");
    group_of_chunk = loom_native::group_of_chunks(k, group);
  }

  // y[r, j] (+)= x[r] . W[j] for r < m, j in [n0, n1); y has n columns.
  void run(const float* x, int64_t m, float* y, int64_t n0, int64_t n1, bool accumulate) const {
    if (n0 >= n1) return;
    if (dense) loom_native::dense_rows(x, m, w.data_ptr<float>(), n, k, y, n0, n1, accumulate);
    else loom_native::quant_rows(x, m, q, y, n0, n1, group_of_chunk.data(), accumulate);
  }
};

// One linear's adapter pool (layers/multi_lora.py's LoraWeights): a [slots, parts * r, in], b [slots, out, r],
// both fp32 or both bf16. The tensors are held, not copied: adapters are loaded into the pool in place, and
// each step reads their data where they are then.
struct LoraLinear {
  at::Tensor a, b;
  std::vector<int64_t> cols;  // [parts + 1] output column offsets of the parts
  int64_t parts = 0, r = 0, j = 0, k = 0, n = 0;
  bool bf16 = false;  // a and b hold bf16 (else fp32)

  bool on() const { return j > 0; }
  int64_t slots() const { return a.size(0); }

  // t[rows, j] = x[rows] . A_s[j] for the shrink's items [i0, i1) (lora_shrink_items).
  void shrink(const float* x, const loom_native::LoraGroups& g, float* t, int64_t ldt, int64_t i0, int64_t i1) const {
    if (bf16) loom_native::lora_shrink_items(x, k, g, static_cast<const uint16_t*>(a.data_ptr()), j, k, t, ldt, i0, i1);
    else loom_native::lora_shrink_items(x, k, g, a.data_ptr<float>(), j, k, t, ldt, i0, i1);
  }

  // y[rows, c] += t[rows, part of c] . B_s[c] for output columns [c0, c1) (lora_expand_groups).
  void expand(const float* t, int64_t ldt, const loom_native::LoraGroups& g, float* y, int64_t c0, int64_t c1) const {
    if (bf16)
      loom_native::lora_expand_groups(t, ldt, g, static_cast<const uint16_t*>(b.data_ptr()), n, r, cols.data(), parts, y,
                                      n, c0, c1);
    else
      loom_native::lora_expand_groups(t, ldt, g, b.data_ptr<float>(), n, r, cols.data(), parts, y, n, c0, c1);
  }
};

struct Layer {
  at::Tensor attn_norm, mlp_norm, qkv_bias, k_cache, v_cache;  // caches [blocks, block_size, n_kv, head_dim]
  int64_t window = 0;
  // Gemma-style extras (set_layer_extras; empty: none): per-head RMSNorm of q and k before RoPE, the
  // sandwich norms of the attention and MLP outputs before their residual adds, and which RoPE table rotates
  // this layer (0: the global one, 1: the sliding-window layers' own).
  at::Tensor q_norm, k_norm, post_attn_norm, post_mlp_norm;
  int64_t rope = 0;
  std::vector<LinearWeight> linears;  // qkv, o, gate_up, down
  std::array<LoraLinear, 4> lora{};   // the linears' adapter pools, if any
};

// [n0, n1): thread t's share of `total` outputs, in pieces of `align` (both cores get work, rows stay
// in whole kernel tiles).
inline void share(int64_t total, int t, int nt, int64_t align, int64_t& n0, int64_t& n1) {
  const int64_t per = ((total + nt - 1) / nt + align - 1) / align * align;
  n0 = std::min<int64_t>(total, t * per);
  n1 = std::min<int64_t>(total, n0 + per);
}

class NativeDecoder : public torch::CustomClassHolder {
 public:
  NativeDecoder(at::Tensor embed, at::Tensor final_norm, int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps,
                double scale)
      : embed_(std::move(embed)), final_norm_(std::move(final_norm)), hq_(n_heads), hkv_(n_kv), hd_(head_dim),
        eps_(static_cast<float>(eps)), scale_(static_cast<float>(scale)) {
    TORCH_CHECK(embed_.dim() == 2 && embed_.scalar_type() == at::kFloat && embed_.is_contiguous(),
                "NativeDecoder: the embedding must be a contiguous fp32 [vocab, hidden]");
    TORCH_CHECK(hq_ > 0 && hkv_ > 0 && hq_ % hkv_ == 0, "NativeDecoder: query heads must be a multiple of KV heads");
    d_ = embed_.size(1);
    check_vector(final_norm_, d_, "final norm");
  }

  void set_head(at::Tensor w, at::Tensor scales, at::Tensor offsets, int64_t bits, int64_t group) {
    head_ = LinearWeight(w, scales, offsets, bits, group);
    TORCH_CHECK(head_.k == d_, "NativeDecoder: the output layer takes ", head_.k, " inputs, not the hidden size ", d_);
  }

  void add_layer(at::Tensor attn_norm, at::Tensor mlp_norm, at::Tensor qkv_bias, at::Tensor k_cache, at::Tensor v_cache,
                 int64_t window) {
    check_vector(attn_norm, d_, "attention norm");
    check_vector(mlp_norm, d_, "MLP norm");
    TORCH_CHECK(qkv_bias.numel() == 0 || qkv_bias.numel() == qkv_width(), "NativeDecoder: bad q/k/v bias size");
    TORCH_CHECK(qkv_bias.numel() == 0 || (qkv_bias.scalar_type() == at::kFloat && qkv_bias.is_contiguous()),
                "NativeDecoder: the q/k/v bias must be contiguous fp32");
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == hkv_ &&
                    k_cache.size(3) == hd_ && k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                    k_cache.is_contiguous() && v_cache.is_contiguous(),
                "NativeDecoder: caches must be contiguous fp32 [blocks, block_size, n_kv, head_dim]");
    Layer l;
    l.attn_norm = attn_norm, l.mlp_norm = mlp_norm, l.qkv_bias = qkv_bias, l.k_cache = k_cache, l.v_cache = v_cache;
    l.window = window;
    layers_.push_back(std::move(l));
  }

  // The last layer's Gemma-style extras (see Layer); empty tensors leave a part out.
  void set_layer_extras(at::Tensor q_norm, at::Tensor k_norm, at::Tensor post_attn_norm, at::Tensor post_mlp_norm,
                        int64_t rope) {
    TORCH_CHECK(!layers_.empty(), "NativeDecoder: set_layer_extras after add_layer");
    TORCH_CHECK(q_norm.numel() == k_norm.numel(), "NativeDecoder: q and k norms come together");
    if (q_norm.numel() > 0) {
      check_vector(q_norm, hd_, "q norm");
      check_vector(k_norm, hd_, "k norm");
    }
    TORCH_CHECK(post_attn_norm.numel() == post_mlp_norm.numel(), "NativeDecoder: sandwich norms come together");
    if (post_attn_norm.numel() > 0) {
      check_vector(post_attn_norm, d_, "post-attention norm");
      check_vector(post_mlp_norm, d_, "post-MLP norm");
    }
    TORCH_CHECK(rope == 0 || rope == 1, "NativeDecoder: rope table must be 0 (global) or 1 (local)");
    auto& l = layers_.back();
    l.q_norm = q_norm, l.k_norm = k_norm, l.post_attn_norm = post_attn_norm, l.post_mlp_norm = post_mlp_norm;
    l.rope = rope;
  }

  // A new lookup table (same width). A model whose embedding stays quantized (layers/quantized.py:
  // QuantizedEmbedding) hands each step the rows of its tokens, dequantized, and steps tokens 0 .. B-1.
  void set_embedding(at::Tensor embed) {
    TORCH_CHECK(embed.dim() == 2 && embed.scalar_type() == at::kFloat && embed.is_contiguous() && embed.size(1) == d_,
                "NativeDecoder: the embedding must be a contiguous fp32 [vocab, hidden]");
    embed_ = std::move(embed);
  }

  // The embedding's multiplier (Gemma: sqrt(hidden)) and the MLP's gate activation: 0 SiLU, 1 GELU (tanh).
  void set_options(double embedding_scale, int64_t activation) {
    TORCH_CHECK(activation == 0 || activation == 1, "NativeDecoder: activation must be 0 (silu) or 1 (gelu_tanh)");
    embed_scale_ = static_cast<float>(embedding_scale);
    gelu_ = activation == 1;
  }

  // The linears of the last layer added, in the order q|k|v, o, gate|up, down.
  void add_linear(at::Tensor w, at::Tensor scales, at::Tensor offsets, int64_t bits, int64_t group) {
    TORCH_CHECK(!layers_.empty() && layers_.back().linears.size() < 4, "NativeDecoder: add_linear after add_layer, four per layer");
    auto& ls = layers_.back().linears;
    LinearWeight l(w, scales, offsets, bits, group);
    const int64_t i = static_cast<int64_t>(ls.size());
    const int64_t want_k = i == 0 || i == 2 ? d_ : i == 1 ? hq_ * hd_ : ls[2].n / 2;
    const int64_t want_n = i == 0 ? qkv_width() : i == 2 ? l.n : d_;
    TORCH_CHECK(l.k == want_k && l.n == want_n && (i != 2 || l.n % 2 == 0), "NativeDecoder: linear ", i,
                " of a layer is [", l.n, ", ", l.k, "], expected [", want_n, ", ", want_k, "]");
    ls.push_back(std::move(l));
  }

  // The adapter pool of linear `linear` (0..3: q|k|v, o, gate|up, down) of layer `layer`: a [slots, parts *
  // r, in] and b [slots, out, r] (scale folded in), both fp32 or both bf16, cols [parts + 1] the parts' output
  // column offsets. An empty a removes the pool. The tensors are read at each step, so loading an adapter into them in place
  // needs no new call.
  void set_lora(int64_t layer, int64_t linear, at::Tensor a, at::Tensor b, std::vector<int64_t> cols) {
    TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()), "NativeDecoder: set_lora: layer ", layer,
                " out of range (", layers_.size(), " layers)");
    TORCH_CHECK(linear >= 0 && linear < 4, "NativeDecoder: set_lora: linear ", linear,
                " must be 0..3 (q|k|v, o, gate|up, down)");
    auto& ls = layers_[layer].linears;
    TORCH_CHECK(linear < static_cast<int64_t>(ls.size()), "NativeDecoder: set_lora before add_linear of that linear");
    if (a.numel() == 0) {
      layers_[layer].lora[linear] = LoraLinear{};
      return;
    }
    const int64_t in = ls[linear].k, out = ls[linear].n;
    TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.is_contiguous() && b.is_contiguous() && a.device().is_cpu() &&
                    b.device().is_cpu(),
                "NativeDecoder: set_lora: a [slots, parts * rank, in] and b [slots, out, rank] must be contiguous CPU "
                "tensors");
    TORCH_CHECK((a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16) &&
                    b.scalar_type() == a.scalar_type(),
                "NativeDecoder: set_lora: a and b must both be fp32 or both bf16, got ", a.scalar_type(), " and ",
                b.scalar_type());
    const int64_t parts = static_cast<int64_t>(cols.size()) - 1, r = b.size(2);
    TORCH_CHECK(a.size(0) == b.size(0) && a.size(0) > 0, "NativeDecoder: set_lora: a has ", a.size(0),
                " slots, b has ", b.size(0));
    TORCH_CHECK(a.size(2) == in && b.size(1) == out, "NativeDecoder: set_lora: linear ", linear, " is [", out, ", ",
                in, "] but a takes ", a.size(2), " inputs and b gives ", b.size(1), " outputs");
    TORCH_CHECK(parts >= 1 && cols[0] == 0 && cols[parts] == out && std::is_sorted(cols.begin(), cols.end()),
                "NativeDecoder: set_lora: cols must rise from 0 to the linear's ", out, " outputs");
    TORCH_CHECK(r >= 1 && a.size(1) == parts * r, "NativeDecoder: set_lora: a has ", a.size(1),
                " rows per slot, expected parts * rank = ", parts, " * ", r);
    const bool bf16 = a.scalar_type() == at::kBFloat16;
    layers_[layer].lora[linear] = LoraLinear{a, b, std::move(cols), parts, r, parts * r, in, out, bf16};
  }

  // Logits [B, vocab] for tokens [B] at cos/sin [B, head_dim] (RoPE tables of their positions, sin
  // signed); each token's K/V is written at slots[b]; it attends over context_lens[b] positions read
  // through block_tables [B, W].
  //
  // lora_slots: empty (no adapters this step), or [B] int64, each row's adapter slot in the pools of
  // set_lora (-1: the base model), or [4, B]: one such row per linear (q|k|v, o, gate|up, down).
  at::Tensor step(const at::Tensor& tokens, const at::Tensor& slots, const at::Tensor& block_tables,
                  const at::Tensor& context_lens, const at::Tensor& cos, const at::Tensor& sin,
                  const at::Tensor& lora_slots) {
    TORCH_CHECK(head_.n > 0, "NativeDecoder: set_head was not called");
    for (const auto& l : layers_) TORCH_CHECK(l.linears.size() == 4, "NativeDecoder: a layer lacks linears");
    const int64_t b = tokens.size(0);
    TORCH_CHECK(b > 0 && tokens.dim() == 1 && slots.numel() == b && context_lens.numel() == b &&
                    block_tables.dim() == 2 && block_tables.size(0) == b,
                "NativeDecoder: tokens, slots, context_lens [B] and block_tables [B, W] disagree");
    auto tok = tokens.to(at::kLong).contiguous();
    auto slot = slots.to(at::kLong).contiguous();
    auto tables = block_tables.to(at::kLong).contiguous();
    auto lens = context_lens.to(at::kLong).contiguous();
    // cos / sin: [B, head_dim] (one table), or [2, B, head_dim]: the global and the local layers' tables
    auto c = cos.to(at::kFloat).reshape({-1, b, hd_}).contiguous();
    auto sn = sin.to(at::kFloat).reshape({-1, b, hd_}).contiguous();
    TORCH_CHECK(c.size(0) == sn.size(0) && c.size(0) <= 2, "NativeDecoder: cos/sin must be [B, D] or [2, B, D]");
    for (const auto& l : layers_)
      TORCH_CHECK(l.rope < c.size(0), "NativeDecoder: a layer rotates with the local table, which was not given");
    const int64_t vocab = embed_.size(0), width = tables.size(1);
    const int64_t blocks = layers_.empty() ? 0 : layers_[0].k_cache.size(0);
    const int64_t block_size = layers_.empty() ? 1 : layers_[0].k_cache.size(1);
    const int64_t* tp = tok.data_ptr<int64_t>();
    const int64_t* sp = slot.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    const int64_t* tabp = tables.data_ptr<int64_t>();
    for (int64_t i = 0; i < b; ++i) {
      TORCH_CHECK(tp[i] >= 0 && tp[i] < vocab, "NativeDecoder: token ", tp[i], " outside the vocabulary");
      TORCH_CHECK(layers_.empty() || (sp[i] >= 0 && sp[i] < blocks * block_size), "NativeDecoder: slot out of range");
      TORCH_CHECK(lp[i] >= 1 && lp[i] <= width * block_size, "NativeDecoder: context length out of range");
    }
    for (int64_t i = 0; i < tables.numel(); ++i)
      TORCH_CHECK(tabp[i] >= 0 && (layers_.empty() || tabp[i] < blocks), "NativeDecoder: block id out of range");

    // Per linear (q|k|v, o, gate|up, down): the rows grouped by adapter (an empty grouping: no LoRA there this
    // step), and the shrink's output [B, J]. lora_slots [B] applies to all four linears; [4, B] names each
    // linear's row slots (-1 where the row's adapter does not adapt that linear: nothing to compute).
    std::array<loom_native::LoraGroups, 4> groups;
    int64_t lora_j = 0;
    at::Tensor lora_t;
    bool lora_on = false;
    // One row: each thread computes the whole (tiny) shrink into its own buffer, so no barrier separates
    // the shrink from the GEMV and expand (the barrier and the split's imbalance cost more than the
    // shrink's 16-48 dot products, measured at batch 1).
    const bool lora_private = b == 1;
    if (lora_slots.numel() > 0) {
      const bool per_linear = lora_slots.dim() == 2;
      TORCH_CHECK(!lora_slots.is_floating_point() &&
                      ((lora_slots.dim() == 1 && lora_slots.numel() == b) ||
                       (per_linear && lora_slots.size(0) == 4 && lora_slots.size(1) == b)),
                  "NativeDecoder: lora_slots must be empty or an integer [B] or [4, B] tensor");
      int64_t num_slots = -1;
      for (const auto& l : layers_)
        for (const auto& p : l.lora)
          if (p.on()) {
            num_slots = num_slots < 0 ? p.slots() : std::min(num_slots, p.slots());
            lora_j = std::max(lora_j, p.j);
          }
      if (num_slots > 0) {
        auto ls = lora_slots.to(at::kLong).contiguous();
        const int64_t* lsp = ls.data_ptr<int64_t>();
        for (int64_t i = 0; i < ls.numel(); ++i)
          TORCH_CHECK(lsp[i] >= -1 && lsp[i] < num_slots, "NativeDecoder: LoRA slot ", lsp[i], " of row ", i % b,
                      " out of range [-1, ", num_slots, ")");
        for (int k = 0; k < 4; ++k) {
          loom_native::lora_group_rows(lsp + (per_linear ? k * b : 0), b, num_slots, groups[k]);
          lora_on = lora_on || groups[k].size() > 0;
        }
        if (lora_on) lora_t = at::empty({lora_private ? at::get_num_threads() : 1, b, lora_j}, embed_.options());
      }
    }
    float* ltp = lora_on ? lora_t.data_ptr<float>() : nullptr;

    const int64_t f = layers_.empty() ? 0 : layers_[0].linears[2].n / 2;
    const int64_t attn_split =
        std::max<int64_t>(1, std::min<int64_t>(hq_ / hkv_, at::get_num_threads() / std::max<int64_t>(1, b * hkv_)));
    const int64_t qkv_n = qkv_width(), heads_total = hq_ + 2 * hkv_;
    auto opts = embed_.options();
    auto h = at::empty({b, d_}, opts), x = at::empty({b, d_}, opts), qkv = at::empty({b, qkv_n}, opts);
    auto q = at::empty({b, hq_ * hd_}, opts), attn = at::empty({b, hq_ * hd_}, opts);
    auto gu = at::empty({b, 2 * f}, opts), act = at::empty({b, f}, opts);
    auto logits = at::empty({b, head_.n}, opts);
    float *hp = h.data_ptr<float>(), *xp = x.data_ptr<float>(), *qkvp = qkv.data_ptr<float>();
    float *qp = q.data_ptr<float>(), *ap = attn.data_ptr<float>(), *gup = gu.data_ptr<float>();
    float *actp = act.data_ptr<float>(), *outp = logits.data_ptr<float>();
    const float *cp = c.data_ptr<float>(), *sinp = sn.data_ptr<float>(), *ep = embed_.data_ptr<float>();

#pragma omp parallel num_threads(at::get_num_threads())
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      loom_native::AttentionScratch scratch;
      std::vector<float> tmp(hd_);
      int64_t n0, n1;
      auto norm_rows = [&](const at::Tensor& w) {
        for (int64_t r = t; r < b; r += nt) loom_native::rms_norm_row(hp + r * d_, w.data_ptr<float>(), xp + r * d_, d_, eps_);
      };
      // LoRA: the shrink of the thread's (group, rank column) items over the linear's input x [B, k]
      // (true: it ran, and a barrier must follow), and the expand of output columns [n0, n1) into y.
      float* own_t = lora_on && lora_private ? ltp + t * b * lora_j : ltp;  // this thread's shrink output
      auto lora_shrink = [&](const LoraLinear& l, int k, const float* in) {
        if (!lora_on || !l.on() || groups[k].size() == 0) return false;
        if (lora_private) {
          l.shrink(in, groups[k], own_t, lora_j, 0, groups[k].size() * l.j);
          return false;
        }
        int64_t i0, i1;
        share(groups[k].size() * l.j, t, nt, 1, i0, i1);
        l.shrink(in, groups[k], ltp, lora_j, i0, i1);
        return true;
      };
      auto lora_expand = [&](const LoraLinear& l, int k, float* y, int64_t n0, int64_t n1) {
        if (!lora_on || !l.on() || groups[k].size() == 0) return;
        l.expand(own_t, lora_j, groups[k], y, n0, n1);
      };
      std::vector<float> normed(d_);
      // h += norm'(y) for the thread's rows: a sandwich norm's residual add (y: a block's output rows)
      auto add_normed_rows = [&](const at::Tensor& w, const float* y) {
        for (int64_t r = t; r < b; r += nt) {
          loom_native::rms_norm_row(y + r * d_, w.data_ptr<float>(), normed.data(), d_, eps_);
          float* hr = hp + r * d_;
#pragma omp simd
          for (int64_t j = 0; j < d_; ++j) hr[j] += normed[j];
        }
      };
      for (int64_t r = t; r < b; r += nt) {
        std::memcpy(hp + r * d_, ep + tp[r] * d_, d_ * sizeof(float));
        if (embed_scale_ != 1.f)
          for (int64_t j = 0; j < d_; ++j) hp[r * d_ + j] *= embed_scale_;
      }
#pragma omp barrier
      for (const Layer& layer : layers_) {
        const auto& lin = layer.linears;
        const auto& lora = layer.lora;
        norm_rows(layer.attn_norm);
#pragma omp barrier
        if (lora_shrink(lora[0], 0, xp)) {
#pragma omp barrier
        }
        share(qkv_n, t, nt, 16, n0, n1);
        lin[0].run(xp, b, qkvp, n0, n1, false);
        lora_expand(lora[0], 0, qkvp, n0, n1);
#pragma omp barrier
        // Bias, RoPE on q and k, and the cache writes: one pass per (sequence, head).
        float* kc = layer.k_cache.data_ptr<float>();
        float* vc = layer.v_cache.data_ptr<float>();
        const float* bias = layer.qkv_bias.numel() > 0 ? layer.qkv_bias.data_ptr<float>() : nullptr;
        const bool qk_norm = layer.q_norm.numel() > 0;
        const int64_t table = layer.rope * b * hd_;
        for (int64_t item = t; item < b * heads_total; item += nt) {
          const int64_t r = item / heads_total, head = item % heads_total;
          const float* src = qkvp + r * qkv_n + head * hd_;
          if (bias != nullptr) {
            for (int64_t i = 0; i < hd_; ++i) tmp[i] = src[i] + bias[head * hd_ + i];
            src = tmp.data();
          }
          if (qk_norm && head < hq_ + hkv_) {  // in place: rms_norm_row reads each value before writing it
            loom_native::rms_norm_row(src, (head < hq_ ? layer.q_norm : layer.k_norm).data_ptr<float>(), tmp.data(),
                                      hd_, eps_);
            src = tmp.data();
          }
          const float *cr = cp + table + r * hd_, *sr = sinp + table + r * hd_;
          if (head < hq_) {
            loom_native::rope_row(src, cr, sr, qp + (r * hq_ + head) * hd_, hd_);
          } else if (head < hq_ + hkv_) {
            loom_native::rope_row(src, cr, sr, kc + (sp[r] * hkv_ + head - hq_) * hd_, hd_);
          } else {
            std::memcpy(vc + (sp[r] * hkv_ + head - hq_ - hkv_) * hd_, src, hd_ * sizeof(float));
          }
        }
#pragma omp barrier
        // Work items: (row, KV head), each split by query heads when there are fewer items than threads (one
        // sequence of an MQA model: Gemma 3's single KV head would leave all but one thread idle).
        for (int64_t item = t; item < b * hkv_ * attn_split; item += nt) {
          const int64_t part = item % attn_split, r = item / attn_split / hkv_, g = item / attn_split % hkv_;
          const int64_t per_group = hq_ / hkv_;
          loom_native::attend_group(qp + r * hq_ * hd_, kc, vc, tabp + r * width, lp[r], g, hq_, hkv_, hd_, block_size,
                                    scale_, layer.window, ap + r * hq_ * hd_, scratch, part * per_group / attn_split,
                                    (part + 1) * per_group / attn_split);
        }
#pragma omp barrier
        if (lora_shrink(lora[1], 1, ap)) {
#pragma omp barrier
        }
        // Pre-norm: h += attn O^T (+ attn (B A)^T) in the GEMV's stores. Sandwich: the output to x, then
        // h += norm'(x).
        const bool sandwich = layer.post_attn_norm.numel() > 0;
        float* block_out = sandwich ? xp : hp;
        share(d_, t, nt, 16, n0, n1);
        lin[1].run(ap, b, block_out, n0, n1, !sandwich);
        lora_expand(lora[1], 1, block_out, n0, n1);
#pragma omp barrier
        // (no barrier between the residual add and the next norm: a thread norms the rows it just added to)
        if (sandwich) add_normed_rows(layer.post_attn_norm, xp);
        norm_rows(layer.mlp_norm);
#pragma omp barrier
        if (lora_shrink(lora[2], 2, xp)) {
#pragma omp barrier
        }
        share(2 * f, t, nt, 16, n0, n1);
        lin[2].run(xp, b, gup, n0, n1, false);
        lora_expand(lora[2], 2, gup, n0, n1);
#pragma omp barrier
        share(f, t, nt, 16, n0, n1);
        for (int64_t r = 0; r < b && n0 < n1; ++r) {
          if (gelu_)
            loom_native::gelu_tanh_and_mul_row(gup + r * 2 * f + n0, gup + r * 2 * f + f + n0, actp + r * f + n0, n1 - n0);
          else
            loom_native::silu_and_mul_row(gup + r * 2 * f + n0, gup + r * 2 * f + f + n0, actp + r * f + n0, n1 - n0);
        }
#pragma omp barrier
        if (lora_shrink(lora[3], 3, actp)) {
#pragma omp barrier
        }
        share(d_, t, nt, 16, n0, n1);
        lin[3].run(actp, b, block_out, n0, n1, !sandwich);  // h += act D^T (sandwich: into x)
        lora_expand(lora[3], 3, block_out, n0, n1);           // h += act (B A)^T
#pragma omp barrier
        if (sandwich) add_normed_rows(layer.post_mlp_norm, xp);  // the next norm_rows takes the same rows
      }
      norm_rows(final_norm_);
#pragma omp barrier
      share(head_.n, t, nt, 16, n0, n1);
      head_.run(xp, b, outp, n0, n1, false);
    }
    return logits;
  }

 private:
  int64_t qkv_width() const { return (hq_ + 2 * hkv_) * hd_; }

  static void check_vector(const at::Tensor& v, int64_t n, const char* what) {
    TORCH_CHECK(v.dim() == 1 && v.numel() == n && v.scalar_type() == at::kFloat && v.is_contiguous(),
                "NativeDecoder: the ", what, " weight must be a contiguous fp32 vector of ", n);
  }

  at::Tensor embed_, final_norm_;
  int64_t hq_, hkv_, hd_, d_ = 0;
  float eps_, scale_;
  float embed_scale_ = 1.f;
  bool gelu_ = false;
  LinearWeight head_;
  std::vector<Layer> layers_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(loom, m) {
  m.class_<NativeDecoder>("NativeDecoder")
      .def(torch::init<at::Tensor, at::Tensor, int64_t, int64_t, int64_t, double, double>())
      .def("set_head", &NativeDecoder::set_head)
      .def("add_layer", &NativeDecoder::add_layer)
      .def("add_linear", &NativeDecoder::add_linear)
      .def("set_layer_extras", &NativeDecoder::set_layer_extras)
      .def("set_options", &NativeDecoder::set_options)
      .def("set_embedding", &NativeDecoder::set_embedding)
      .def("set_lora", &NativeDecoder::set_lora)
      .def("step", &NativeDecoder::step);
}
