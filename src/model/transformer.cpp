#include "moe/model/transformer.h"

#include <cmath>

#include "moe/core/error.h"
#include "moe/core/hash.h"
#include "moe/core/random.h"
#include "moe/core/recompute.h"
#include "moe/core/torch_version.h"

namespace moe {

namespace {
uint64_t name_seed(uint64_t seed, const std::string& name) {
  return fnv1a64(name.data(), name.size(), kFnv1aOffset ^ seed);
}
torch::Tensor init_normal(std::vector<int64_t> shape, double std, uint64_t seed,
                          const std::string& name) {
  return seeded_normal(shape, std, name_seed(seed, name));
}
// A parameter in the compute dtype (no-op in float32 training).
torch::Tensor cast_to(const torch::Tensor& w, c10::ScalarType dtype) {
  return w.defined() && w.scalar_type() != dtype ? w.to(dtype) : w;
}
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  // The mean square in float32 (a no-op cast in float32 training).
  torch::Tensor xf = x.to(torch::kFloat32);
  return (xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps)).to(x.scalar_type()) * w;
}
// Rotates pairs (even, odd) of the last dimension by position-dependent angles.
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos,
                         const torch::Tensor& sin) {
  // x [B, H, S, hd]; cos/sin [S, hd/2]
  auto x2 = x.unflatten(-1, {-1, 2});
  auto a = x2.select(-1, 0), b = x2.select(-1, 1);
  return torch::stack({a * cos - b * sin, a * sin + b * cos}, -1).flatten(-2);
}
// [B, KV, S, hd] -> [B, KV * rep, S, hd]: query head h reads key/value head h / rep.
torch::Tensor repeat_kv(const torch::Tensor& x, int64_t rep) {
  if (rep == 1) return x;
  const auto s = x.sizes();
  return x.unsqueeze(2).expand({s[0], s[1], rep, s[2], s[3]}).reshape({s[0], s[1] * rep, s[2], s[3]});
}
}  // namespace

struct DenseMlp : torch::nn::Module {
  torch::Tensor w1, w3, w2;
  DenseMlp(int64_t D, int64_t F, uint64_t seed, const std::string& name) {
    w1 = register_parameter("w1",
                            init_normal({D, F}, 1.0 / std::sqrt(double(D)), seed, name + ".w1"));
    w3 = register_parameter("w3",
                            init_normal({D, F}, 1.0 / std::sqrt(double(D)), seed, name + ".w3"));
    w2 = register_parameter("w2",
                            init_normal({F, D}, 1.0 / std::sqrt(double(F)), seed, name + ".w2"));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto dt = x.scalar_type();
    return torch::mm(torch::silu(torch::mm(x, cast_to(w1, dt))) * torch::mm(x, cast_to(w3, dt)), cast_to(w2, dt));
  }
};

struct Block : torch::nn::Module {
  torch::Tensor norm1, norm2, wqkv, wo;
  std::shared_ptr<DenseMlp> mlp;
  std::shared_ptr<MoELayer> moe;
};

TransformerLM::TransformerLM(const Config& cfg, comm::Communicator& ep_group, uint64_t seed)
    : cfg_(cfg) {
  const auto& m = cfg.model;
  const int64_t D = m.d_model, V = m.vocab, hd = D / m.heads, kvd = kv_heads_of(m) * hd;
  embedding_ = register_parameter("embedding", init_normal({V, D}, 0.02, seed, "embedding"));
  if (!m.tie_embeddings)
    head_ = register_parameter("head", init_normal({V, D}, 0.02, seed, "head"));
  final_norm_ = register_parameter("final_norm", torch::ones({D}));
  auto layer_list = register_module("layers", std::make_shared<torch::nn::Module>());
  const int64_t dense_twin_ff =
      cfg.moe.top_k * cfg.moe.d_expert + cfg.moe.shared_experts * cfg.moe.d_expert;
  for (int64_t i = 0; i < m.layers; ++i) {
    auto b = std::make_shared<Block>();
    const std::string name = "layers." + std::to_string(i);
    b->norm1 = b->register_parameter("norm1", torch::ones({D}));
    b->norm2 = b->register_parameter("norm2", torch::ones({D}));
    // Columns: q (heads x hd) | k (kv_heads x hd) | v (kv_heads x hd).
    b->wqkv = b->register_parameter(
        "wqkv", init_normal({D, D + 2 * kvd}, 1.0 / std::sqrt(double(D)), seed, name + ".wqkv"));
    // Output projections start small (scaled by depth) so the residual stream starts near identity.
    b->wo = b->register_parameter(
        "wo", init_normal({D, D}, 1.0 / std::sqrt(double(D) * 2 * m.layers), seed, name + ".wo"));
    const bool is_moe = !m.dense && (i + 1) % m.moe_every == 0;
    if (is_moe) {
      b->moe = b->register_module(
          "moe", std::make_shared<MoELayer>(cfg.moe, D, ep_group, name_seed(seed, name + ".moe")));
      moe_layers_.push_back(b->moe);
    } else {
      b->mlp = b->register_module(
          "mlp",
          std::make_shared<DenseMlp>(D, m.dense ? dense_twin_ff : m.d_ff, seed, name + ".mlp"));
    }
    blocks_.push_back(layer_list->register_module(std::to_string(i), b));
  }
  // Rotary tables for positions [0, seq_len).
  auto inv = torch::pow(m.rope_theta, -torch::arange(0, hd, 2, torch::kFloat64) / double(hd));
  auto ang = torch::outer(torch::arange(m.seq_len, torch::kFloat64), inv);
  rope_cos_ = ang.cos().to(torch::kFloat32);
  rope_sin_ = ang.sin().to(torch::kFloat32);
}

torch::Tensor causal_attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, AttentionImpl impl, int64_t q_offset) {
  const int64_t Sq = q.size(-2), Sk = k.size(-2);
  MOE_CHECK_T(ShapeError, Sk == q_offset + Sq,
              "causal_attention: " << Sk << " keys for " << Sq << " queries at offset " << q_offset
                                   << " (expected offset + queries)");
  // SDPA's is_causal aligns the mask top-left, right only when Sq == Sk; one
  // query after a cache sees every key (no mask). Several queries after a
  // cache take the explicit product.
  if (impl != AttentionImpl::Explicit && (q_offset == 0 || Sq == 1)) {
    const bool is_causal = q_offset == 0 && Sq > 1;
#if MOE_HAVE_PUBLIC_SDPA
    return at::scaled_dot_product_attention(q, k, v, {}, 0.0, is_causal);
#else
    return std::get<0>(at::_scaled_dot_product_attention(q, k, v, {}, 0.0, false, is_causal));
#endif
  }
  torch::Tensor causal = torch::ones({Sq, Sk}, q.options().dtype(torch::kBool)).triu(1 + q_offset);
  torch::Tensor att = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(double(q.size(-1)));
  att = torch::softmax(att.masked_fill(causal, -std::numeric_limits<float>::infinity()), -1);
  return torch::matmul(att, v);
}

namespace {

// What one block needs besides its input: shapes, rotary tables, settings,
// and (generation) the KV cache with P positions already in it.
struct BlockArgs {
  int64_t B, S, D, H, KV, P;
  torch::Tensor cos, sin;
  c10::ScalarType dtype;
  double norm_eps;
  AttentionImpl attention;
  bool training;
  uint64_t noise_seed;
  bool recompute_moe;
  KVCache* cache;
  size_t layer;
};

// An MoE layer's forward as tensors [y, aux_loss, z_loss] (what recompute carries).
std::vector<torch::Tensor> moe_forward(MoELayer& moe, const torch::Tensor& x, bool training,
                                       uint64_t noise_seed, LayerStats* stats) {
  MoEOutput mo = moe.forward(x, training, noise_seed);
  if (stats) *stats = mo.stats;
  return {mo.y, mo.aux_loss, mo.z_loss};
}

// One pre-norm block: [x_out, aux_loss, z_loss] (zeros for a dense block).
// `stats` receives the MoE layer's statistics (the first run's, when recomputed).
std::vector<torch::Tensor> block_forward(Block& b, const torch::Tensor& x, const BlockArgs& a,
                                         LayerStats* stats) {
  const int64_t B = a.B, S = a.S, D = a.D, H = a.H, hd = D / H, KV = a.KV;
  const auto dt = a.dtype;
  torch::Tensor h = rms_norm(x, cast_to(b.norm1, dt), a.norm_eps);
  torch::Tensor qkv = torch::matmul(h, cast_to(b.wqkv, dt));  // [B, S, D + 2 KV hd]
  auto heads_of = [&](int64_t first, int64_t n) {             // [B, n, S, hd]
    return qkv.narrow(-1, first, n * hd).view({B, S, n, hd}).transpose(1, 2);
  };
  torch::Tensor q = apply_rope(heads_of(0, H), a.cos, a.sin);
  torch::Tensor k = apply_rope(heads_of(D, KV), a.cos, a.sin), v = heads_of(D + KV * hd, KV);
  if (a.cache) {
    if (a.P > 0) {
      k = torch::cat({a.cache->k[a.layer], k}, 2);
      v = torch::cat({a.cache->v[a.layer], v}, 2);
    }
    a.cache->k[a.layer] = k;
    a.cache->v[a.layer] = v;
  }
  torch::Tensor att = causal_attention(q, repeat_kv(k, H / KV), repeat_kv(v, H / KV), a.attention, a.P)
                          .transpose(1, 2)
                          .reshape({B, S, D});
  torch::Tensor x1 = x + torch::matmul(att, cast_to(b.wo, dt));
  torch::Tensor h2 = rms_norm(x1, cast_to(b.norm2, dt), a.norm_eps).view({B * S, D});
  if (!b.moe) {
    torch::Tensor zero = torch::zeros({}, b.norm1.options());
    return {x1 + b.mlp->forward(h2).view({B, S, D}), zero, zero};
  }
  std::vector<torch::Tensor> mo;
  if (a.recompute_moe) {
    // Only h2 is kept; the layer (router, all-to-alls, experts) runs again in backward.
    std::shared_ptr<MoELayer> layer = b.moe;
    const bool training = a.training;
    const uint64_t seed = a.noise_seed;
    auto first = std::make_shared<bool>(true);
    LayerStats* out = stats;
    mo = recompute(
        [layer, training, seed, first, out](const std::vector<torch::Tensor>& in) {
          auto r = moe_forward(*layer, in[0], training, seed, *first ? out : nullptr);
          *first = false;
          return r;
        },
        {h2});
  } else {
    mo = moe_forward(*b.moe, h2, a.training, a.noise_seed, stats);
  }
  return {x1 + mo[0].view({B, S, D}), mo[1], mo[2]};
}

}  // namespace

LMOutput TransformerLM::forward(const torch::Tensor& tokens, bool training, uint64_t noise_seed,
                                KVCache* cache) {
  const auto& m = cfg_.model;
  MOE_CHECK_T(ShapeError, tokens.dim() == 2 && tokens.scalar_type() == torch::kInt64,
              "model input must be [batch, seq] int64 tokens, got " << comm::shape_str(tokens)
                                                                    << " " << tokens.scalar_type());
  const int64_t B = tokens.size(0), S = tokens.size(1), D = m.d_model,
                P = cache ? cache->length : 0;
  MOE_CHECK_T(ShapeError, P + S <= m.seq_len,
              "sequence length " << P + S << (P > 0 ? " (cached and new)" : "")
                                 << " exceeds model.seq_len = " << m.seq_len);
  if (cache && P == 0) {
    cache->k.assign(blocks_.size(), {});
    cache->v.assign(blocks_.size(), {});
  }
  MOE_CHECK_T(ShapeError, !cache || cache->k.size() == blocks_.size(),
              "KV cache holds " << cache->k.size() << " blocks, the model has " << blocks_.size());
  const auto dt = compute_dtype_;
  const torch::Tensor tok = tokens.to(embedding_.device());
  torch::Tensor x = cast_to(embedding_, dt).index_select(0, tok.reshape({-1})).view({B, S, D});
  // Recomputation only pays when a graph is being recorded for backward.
  const bool recording = training && torch::GradMode::is_enabled() && !cache;
  BlockArgs args{B,
                 S,
                 D,
                 m.heads,
                 kv_heads_of(m),
                 P,
                 rope_cos_.narrow(0, P, S).to(dt),
                 rope_sin_.narrow(0, P, S).to(dt),
                 dt,
                 m.norm_eps,
                 m.attention,
                 training,
                 0,
                 recording && recompute_ == Recompute::Moe,
                 cache,
                 0};
  LMOutput out;
  out.aux_loss = torch::zeros({}, embedding_.options());
  out.z_loss = torch::zeros({}, embedding_.options());
  for (size_t i = 0; i < blocks_.size(); ++i) {
    std::shared_ptr<Block> b = blocks_[i];
    args.noise_seed = noise_seed * 1000003ull + i;
    args.layer = i;
    LayerStats stats;
    std::vector<torch::Tensor> r;
    if (recording && recompute_ == Recompute::Block) {
      // Only the block's input is kept; attention and FFN/MoE run again in backward.
      auto first = std::make_shared<bool>(true);
      LayerStats* into = &stats;
      r = recompute(
          [b, args, first, into](const std::vector<torch::Tensor>& in) {
            auto y = block_forward(*b, in[0], args, *first ? into : nullptr);
            *first = false;
            return y;
          },
          {x});
    } else {
      r = block_forward(*b, x, args, &stats);
    }
    x = r[0];
    if (b->moe) {
      out.aux_loss = out.aux_loss + r[1];
      out.z_loss = out.z_loss + r[2];
      out.stats.push_back(stats);
    }
  }
  if (cache) cache->length = P + S;
  x = rms_norm(x, cast_to(final_norm_, dt), m.norm_eps);
  // Logits in float32: the loss (log-softmax over the vocabulary) wants the range.
  out.logits = torch::matmul(x, cast_to(head_.defined() ? head_ : embedding_, dt).t()).to(torch::kFloat32);
  return out;
}

void TransformerLM::set_recompute(Recompute mode) {
  recompute_ = mode;
}

void TransformerLM::set_compute_dtype(c10::ScalarType dtype) {
  MOE_CHECK_T(ConfigError, dtype == torch::kFloat32 || dtype == torch::kBFloat16,
              "compute dtype " << dtype << " is not supported: allowed float32 | bfloat16");
  compute_dtype_ = dtype;
}

void TransformerLM::to_device(const torch::Device& device) {
  to(device);
  rope_cos_ = rope_cos_.to(device);
  rope_sin_ = rope_sin_.to(device);
}

std::vector<std::pair<std::string, torch::Tensor>> TransformerLM::expert_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : named_parameters()) {
    const std::string& n = p.key();
    bool expert = n.find(".moe.w1") != std::string::npos ||
                  n.find(".moe.w2") != std::string::npos || n.find(".moe.w3") != std::string::npos;
    if (expert) out.emplace_back(n, p.value());
  }
  return out;
}

std::vector<std::pair<std::string, torch::Tensor>> TransformerLM::shared_parameters() const {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto experts = expert_parameters();
  for (const auto& p : named_parameters()) {
    bool expert = false;
    for (const auto& e : experts) expert = expert || e.first == p.key();
    if (!expert) out.emplace_back(p.key(), p.value());
  }
  return out;
}

ModelCounts TransformerLM::counts() const {
  ModelCounts c;
  const auto& m = cfg_.model;
  int64_t per_expert = (cfg_.moe.activation == Activation::SwiGLU ? 3 : 2) * m.d_model * cfg_.moe.d_expert;
  int64_t shared = 0;
  for (const auto& p : shared_parameters()) shared += p.second.numel();
  int64_t moe_layers = static_cast<int64_t>(moe_layers_.size());
  c.expert_params = moe_layers * cfg_.moe.experts * per_expert;
  c.total_params = shared + c.expert_params;
  c.active_params = shared + moe_layers * cfg_.moe.top_k * per_expert;
  // Matrix products: 2 FLOPs per weight touched (embedding lookup excluded, head included),
  // attention scores and values: 2 * 2 * S * D per layer (full, not causal-halved).
  int64_t embedding = m.vocab * m.d_model;
  c.flops_per_token = 2.0 * double(c.active_params - (m.tie_embeddings ? 0 : embedding)) +
                      4.0 * double(m.layers * m.seq_len * m.d_model);
  return c;
}

}  // namespace moe
