#include "moe/train/cost_model.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "moe/core/error.h"
#include "moe/moe/dispatch_plan.h"

namespace moe {

const std::vector<std::string>& step_phase_names() {
  static const std::vector<std::string> names = {
      "router",          "permute",   "dispatch", "experts", "combine", "unpermute",
      "attention_dense", "grad_sync", "optimizer"};
  return names;
}

int64_t PhaseCost::flops() const {
  int64_t f = 0;
  for (const auto& g : gemms) f += g.flops();
  return f;
}
int64_t PhaseCost::all_to_all_bytes() const {
  int64_t b = 0;
  for (const auto& c : collectives)
    if (c.kind == "all_to_all") b += c.bytes * c.repeat;
  return b;
}
int64_t PhaseCost::all_to_all_off_rank_bytes() const {
  int64_t b = 0;
  for (const auto& c : collectives)
    if (c.kind == "all_to_all") b += c.off_rank_bytes * c.repeat;
  return b;
}
int64_t PhaseCost::all_reduce_bytes() const {
  int64_t b = 0;
  for (const auto& c : collectives)
    if (c.kind == "all_reduce") b += c.bytes * c.repeat;
  return b;
}

const PhaseCost& StepCost::phase(const std::string& name) const {
  for (const auto& p : phases)
    if (p.name == name) return p;
  MOE_THROW(UsageError, "cost model: no phase '" << name << "'");
}
PhaseCost& StepCost::phase(const std::string& name) {
  return const_cast<PhaseCost&>(static_cast<const StepCost&>(*this).phase(name));
}
int64_t StepCost::flops() const {
  int64_t f = 0;
  for (const auto& p : phases) f += p.flops();
  return f;
}

namespace {

// The shapes every count below is written in.
struct Shapes {
  int64_t B, S, T, D, V, L, heads, kv_dim, F, E, k, H, shared_H, micro;
  int64_t moe_layers, dense_layers, dense_width, act_mats;
  int ep, dp, world;
  bool tied;
};

Shapes shapes_of(const Config& cfg, int world) {
  const ParallelLayout layout = resolve_layout(cfg, world);
  const auto& m = cfg.model;
  const auto& e = cfg.moe;
  Shapes s{};
  s.B = cfg.train.batch;
  s.S = m.seq_len;
  s.T = s.B * s.S;
  s.D = m.d_model;
  s.V = m.vocab;
  s.L = m.layers;
  s.heads = m.heads;
  s.kv_dim = kv_heads_of(m) * (m.d_model / m.heads);  // width of k (and of v)
  s.F = m.d_ff;
  s.E = e.experts;
  s.k = e.top_k;
  s.H = e.d_expert;
  s.shared_H = e.shared_experts * e.d_expert;
  s.micro = cfg.train.grad_accum;
  s.moe_layers = 0;
  for (int64_t i = 0; i < s.L; ++i)
    if (!m.dense && (i + 1) % m.moe_every == 0) ++s.moe_layers;
  s.dense_layers = s.L - s.moe_layers;
  s.dense_width = m.dense ? e.top_k * e.d_expert + s.shared_H : m.d_ff;
  s.act_mats = e.activation == Activation::SwiGLU ? 3 : 2;
  s.ep = layout.ep;
  s.dp = layout.dp;
  s.world = world;
  s.tied = m.tie_embeddings;
  return s;
}

// Parameter elements held by one rank: replicated ones and its experts, and
// how many parameter tensors (each costs optimizer and sync op launches).
struct ParamCount {
  int64_t shared = 0, expert = 0, tensors = 0;
};
ParamCount param_count(const Shapes& s) {
  ParamCount p;
  p.shared = s.V * s.D * (s.tied ? 1 : 2) + s.D;  // embedding (+ head), final norm
  p.tensors = s.tied ? 2 : 3;
  p.shared += s.L * (2 * s.D + s.D * (2 * s.D + 2 * s.kv_dim));  // norms, wqkv, wo
  p.tensors += s.L * 4;
  p.shared += s.dense_layers * 3 * s.D * s.dense_width;
  p.tensors += s.dense_layers * 3;
  const int64_t EL = s.E / s.ep;
  p.shared += s.moe_layers * (s.E * s.D + s.act_mats * s.D * s.shared_H);
  p.expert = s.moe_layers * EL * s.act_mats * s.D * s.H;
  p.tensors += s.moe_layers * (1 + s.act_mats + (s.shared_H > 0 ? s.act_mats : 0));
  return p;
}

}  // namespace

namespace {

// train.recompute: the recomputed layers' forward runs again in backward:
// one more product per GEMM (3 -> 4), a third more element-wise work, and
// the forward collectives (routing statistics, counts, one of each pair of
// row all-to-alls) once more.
void add_recompute(StepCost& c, Recompute mode) {
  std::vector<std::string> phases = {"router", "permute", "unpermute", "experts", "dispatch",
                                     "combine"};
  if (mode == Recompute::Block) phases.push_back("attention_dense");
  for (const auto& name : phases) {
    PhaseCost& ph = c.phase(name);
    // The LM head (the last product of attention_dense) is not inside a block.
    const size_t gemms = name == "attention_dense" ? ph.gemms.size() - 1 : ph.gemms.size();
    for (size_t i = 0; i < gemms; ++i) ph.gemms[i].passes = 4;
    ph.memory_bytes += ph.memory_bytes / 3;
    ph.transcendentals += ph.transcendentals / 3;
    ph.ops += ph.ops / 3;
    // As step_cost builds them: the router's statistics all-reduce and the
    // dispatch counts (dispatch's first) are forward only; the row
    // all-to-alls come in forward/backward pairs.
    for (size_t i = 0; i < ph.collectives.size(); ++i) {
      CollectiveCost& col = ph.collectives[i];
      const bool forward_only = name == "router" || (name == "dispatch" && i == 0);
      col.repeat += forward_only ? col.repeat : col.repeat / 2;
    }
  }
}

// train.zero 1: gradients reduce-scattered into each rank's shard, parameters
// all-gathered after the update (the same bytes as an all-reduce, in two
// halves), the squared norm summed once over the world.
void add_sharded_optimizer(StepCost& c, const Shapes& s, const ParamCount& pc) {
  PhaseCost& sync = c.phase("grad_sync");
  PhaseCost& opt = c.phase("optimizer");
  if (s.world > 1) {
    const int64_t padded = (pc.shared + s.world - 1) / s.world * s.world * 4;
    sync.collectives.push_back({"reduce_scatter", s.world, padded, 0, 1});
    opt.collectives.push_back({"all_gather", s.world, padded, 0, 1});
    sync.collectives.push_back({"all_reduce", s.world, 8, 0, 1});  // squared norm
  }
  if (s.dp > 1 && pc.expert > 0) {
    const int64_t padded = (pc.expert + s.dp - 1) / s.dp * s.dp * 4;
    sync.collectives.push_back({"reduce_scatter", s.dp, padded, 0, 1});
    opt.collectives.push_back({"all_gather", s.dp, padded, 0, 1});
  }
}

}  // namespace

StepCost step_cost(const Config& cfg, int world, const RoutingStats& routing) {
  MOE_CHECK_T(ConfigError, routing.drop_frac >= 0 && routing.drop_frac <= 1,
              "cost model: drop fraction " << routing.drop_frac << " is outside [0, 1]");
  MOE_CHECK_T(ConfigError, routing.load_imbalance >= 1,
              "cost model: load imbalance (max/mean) " << routing.load_imbalance
                                                       << " must be >= 1");
  const Shapes s = shapes_of(cfg, world);
  const int64_t eb = 4;  // fp32: what this framework trains in
  const int64_t EL = s.E / s.ep, R = s.micro, Lm = s.moe_layers;
  StepCost c;
  c.world = world;
  c.ep = s.ep;
  c.dp = s.dp;
  c.tokens_per_rank = s.T * s.micro;

  // Routing: capacity C per expert on each rank's tokens; in capacity mode
  // across ranks every rank sends E x C padded rows. The busiest rank's
  // experts process the kept slots, stretched by the load imbalance spread
  // over its E_local experts, never more than its buffers hold.
  const bool dropless = cfg.moe.capacity_factor <= 0;
  c.capacity = dropless ? 0
                        : expert_capacity(s.T, s.k, s.E, cfg.moe.capacity_factor,
                                          cfg.moe.min_capacity);
  const bool padded = !dropless && s.ep > 1;
  const double rank_imbalance = 1.0 + (routing.load_imbalance - 1.0) / double(EL);
  int64_t rows = s.T * s.k;
  if (routing.drop_frac > 0 || routing.load_imbalance > 1)
    rows = std::llround(double(s.T * s.k) * (1.0 - routing.drop_frac) * rank_imbalance);
  if (!dropless) rows = std::min(rows, s.E * c.capacity);
  c.expert_rows_per_rank = rows;
  const int64_t send_rows = padded ? s.E * c.capacity : s.T * s.k;
  const int64_t off_rank_rows =
      padded ? (s.ep - 1) * EL * c.capacity
             : std::llround(double(send_rows) * double(s.ep - 1) / double(s.ep));

  for (const auto& name : step_phase_names()) {
    PhaseCost phase;
    phase.name = name;
    phase.streaming = name != "attention_dense";
    c.phases.push_back(phase);
  }


  // ---- attention and dense blocks, embedding, head and loss (forward + backward)
  PhaseCost& att = c.phase("attention_dense");
  att.gemms.push_back({s.T, s.D + 2 * s.kv_dim, s.D, 1, s.L * R});            // qkv
  att.gemms.push_back({s.T, s.D, s.D, 1, s.L * R});                           // output projection
  // q k^T and att v: B x heads products of [S, hd] x [hd, S] and [S, S] x [S, hd] (same FLOPs).
  att.gemms.push_back({s.S * s.B * s.heads, s.S, s.D / s.heads, s.B * s.heads, 2 * s.L * R});
  if (s.dense_layers > 0) {
    att.gemms.push_back({s.T, s.dense_width, s.D, 1, 2 * s.dense_layers * R});  // w1, w3
    att.gemms.push_back({s.T, s.D, s.dense_width, 1, s.dense_layers * R});      // w2
  }
  att.gemms.push_back({s.T, s.V, s.D, 1, R});  // head
  // Element-wise passes (read or write of a whole tensor), counted from the
  // code: per block ~100 over [T, D] (norms, rotary, reshapes, residuals,
  // forward and backward) and 14 over the [B, heads, S, S] scores; 12 over
  // each dense MLP's [T, F]; 8 over the logits (cross-entropy).
  const int64_t TD = s.T * s.D, scores = s.B * s.heads * s.S * s.S;
  att.memory_bytes = R * eb *
                     (s.L * (100 * TD + 14 * scores) + s.dense_layers * 12 * s.T * s.dense_width +
                      8 * s.T * s.V + 6 * TD);
  att.ops = R * (s.L * 150 + s.dense_layers * 20 + 30);
  // exp in the softmax of the scores; SiLU forward and its backward in dense
  // MLPs; log-softmax of the logits and its backward.
  att.transcendentals =
      R * (s.L * scores + s.dense_layers * 2 * s.T * s.dense_width + 2 * s.T * s.V);

  // ---- MoE layers
  if (Lm > 0) {
    PhaseCost& router = c.phase("router");
    router.gemms.push_back({s.T, s.E, s.D, 1, Lm * R});
    router.memory_bytes = Lm * R * eb * (30 * s.T * s.E + 4 * s.T * s.k);
    router.ops = Lm * R * 90;
    router.transcendentals = Lm * R * 3 * s.T * s.E;  // scores, logsumexp (z-loss), entropy
    if (s.ep > 1)  // routing statistics: one all-reduce of 3E + 3 doubles
      router.collectives.push_back({"all_reduce", s.ep, (3 * s.E + 3) * 8, 0, Lm * R});

    PhaseCost& permute = c.phase("permute");
    permute.memory_bytes = Lm * R * eb * 2 * (TD + send_rows * s.D);
    permute.ops = Lm * R * 6;
    PhaseCost& unpermute = c.phase("unpermute");
    unpermute.memory_bytes = Lm * R * eb * (3 * TD + 3 * send_rows * s.D);
    unpermute.ops = Lm * R * 10;

    PhaseCost& experts = c.phase("experts");
    const int64_t segments = s.ep > 1 ? EL * s.ep : s.E;
    experts.gemms.push_back({rows, s.H, s.D, segments, (s.act_mats - 1) * Lm * R});  // w1 (w3)
    experts.gemms.push_back({rows, s.D, s.H, segments, Lm * R});                      // w2
    // Per [rows, H] element: SiLU forward, SiLU and its derivative's sigmoid
    // in backward (3 transcendentals), ~30 plain passes (products, the
    // derivative's arithmetic); the backward also zeroes and fills weight
    // gradients the size of the local experts (~3 passes).
    experts.transcendentals = Lm * R * 3 * rows * s.H;
    experts.memory_bytes =
        Lm * R * eb * (30 * rows * s.H + 4 * rows * s.D + 3 * EL * s.act_mats * s.D * s.H);
    experts.ops = Lm * R * (segments * 21 + 4);
    if (s.shared_H > 0) {
      experts.gemms.push_back({s.T, s.shared_H, s.D, 1, (s.act_mats - 1) * Lm * R});
      experts.gemms.push_back({s.T, s.D, s.shared_H, 1, Lm * R});
      experts.transcendentals += Lm * R * 3 * s.T * s.shared_H;
      experts.memory_bytes += Lm * R * eb * (30 * s.T * s.shared_H + 4 * TD);
      experts.ops += Lm * R * 25;
    }
    if (s.ep > 1) {
      // Dispatch: fill counts, then the rows; its backward sends the
      // gradients back with the counts swapped. Combine is the mirror image.
      const int64_t bytes = send_rows * s.D * eb, off = off_rank_rows * s.D * eb;
      PhaseCost& dispatch = c.phase("dispatch");
      dispatch.collectives.push_back({"all_to_all", s.ep, s.E * 8, (s.E - EL) * 8, Lm * R});
      dispatch.collectives.push_back({"all_to_all", s.ep, bytes, off, 2 * Lm * R});
      dispatch.ops = Lm * R * 8;
      PhaseCost& combine = c.phase("combine");
      combine.collectives.push_back({"all_to_all", s.ep, bytes, off, 2 * Lm * R});
      combine.ops = Lm * R * 4;
    }
  }

  if (cfg.train.recompute != Recompute::None) add_recompute(c, cfg.train.recompute);

  // ---- gradient sync: replicated parameters over the world, experts over
  // their expert-DP group, in buckets; then the global norm for clipping.
  const ParamCount pc = param_count(s);
  PhaseCost& sync = c.phase("grad_sync");
  const int64_t bucket = std::max<int64_t>(1, int64_t(cfg.parallel.grad_bucket_mb * 1048576.0));
  if (cfg.train.zero == 1) {
    add_sharded_optimizer(c, s, pc);
  } else if (s.world > 1) {
    const int64_t bytes = pc.shared * 4;
    sync.collectives.push_back({"all_reduce", s.world, bucket, 0, bytes / bucket});
    if (bytes % bucket) sync.collectives.push_back({"all_reduce", s.world, bytes % bucket, 0, 1});
    sync.collectives.push_back({"all_reduce", s.world, 8, 0, 1});  // squared norm
  }
  if (cfg.train.zero == 0 && s.dp > 1 && pc.expert > 0) {
    const int64_t bytes = pc.expert * 4;
    sync.collectives.push_back({"all_reduce", s.dp, bucket, 0, bytes / bucket});
    if (bytes % bucket) sync.collectives.push_back({"all_reduce", s.dp, bytes % bucket, 0, 1});
  }
  // pack, scale, unpack the buckets; norms and clipping scale: ~6 passes.
  sync.memory_bytes = 6 * 4 * (pc.shared + pc.expert);
  sync.working_set_bytes = 2 * 4 * (pc.shared + pc.expert);  // gradients and buckets
  sync.ops = 6 * pc.tensors;

  // ---- AdamW: ~16 passes over parameter-sized tensors (decay, both moments,
  // bias corrections, the update), ~12 ops per tensor; zeroing the gradients.
  PhaseCost& opt = c.phase("optimizer");
  opt.memory_bytes = 17 * 4 * (pc.shared + pc.expert);
  opt.working_set_bytes = 4 * 4 * (pc.shared + pc.expert);  // parameters, gradients, 2 moments
  opt.ops = 13 * pc.tensors;

  if (cfg.train.zero == 1) {
    // Each rank updates only its shards: replicated over the world, experts over expert-DP.
    const int64_t shard = (pc.shared + s.world - 1) / s.world + (pc.expert + s.dp - 1) / s.dp;
    opt.memory_bytes = 17 * 4 * shard;
    opt.working_set_bytes = 4 * 4 * shard;
  }

  // Model FLOPs per token for MFU: forward matrix products of the active
  // parameters (head included, embedding lookup excluded) and attention, x3.
  const double active = double(s.L * s.D * (2 * s.D + 2 * s.kv_dim) + s.dense_layers * 3 * s.D * s.dense_width +
                               Lm * (s.E * s.D + s.act_mats * s.D * (s.k * s.H + s.shared_H)) +
                               s.V * s.D);
  c.train_flops_per_token = 3.0 * (2.0 * active + 4.0 * double(s.L * s.S * s.D));
  return c;
}

MemoryEstimate estimate_memory(const Config& cfg, int world) {
  const Shapes s = shapes_of(cfg, world);
  const ParamCount pc = param_count(s);
  const auto& t = cfg.train;
  MemoryEstimate m;
  // fp32 master parameters and gradients (train.zero 1 keeps them in flat
  // buffers padded to the group size: at most one element per rank more).
  m.params = 4 * (pc.shared + pc.expert);
  m.grads = m.params;
  // AdamW's two moments: of everything (zero 0) or of this rank's shards:
  // replicated parameters over the world, experts over their expert-DP group.
  const int64_t shared_shard = t.zero == 1 ? (pc.shared + s.world - 1) / s.world : pc.shared;
  const int64_t expert_shard = t.zero == 1 ? (pc.expert + s.dp - 1) / s.dp : pc.expert;
  m.optimizer = 8 * (shared_shard + expert_shard);
  // Tensors autograd keeps for backward, one micro-batch, counted from the
  // code: per block the residual, two norm outputs each, qkv, rotated q and
  // k, a contiguous k^T, the attention output (~11 [T, D]) and the softmax
  // output; a dense MLP's 4 [T, F]; an MoE layer's router tensors, received
  // rows, expert hidden pair and combined rows; the head's normed input,
  // logits and log-probabilities. The peak comes early in backward, when the
  // top block's gradients (scores: ~3, [T, D]: ~4, logits: ~2) are alive too.
  const int64_t TD = s.T * s.D, scores = s.B * s.heads * s.S * s.S;
  const bool dropless = cfg.moe.capacity_factor <= 0;
  const int64_t C = dropless ? 0
                             : expert_capacity(s.T, s.k, s.E, cfg.moe.capacity_factor,
                                               cfg.moe.min_capacity);
  const int64_t recv_rows = dropless || s.ep == 1 ? s.T * s.k : s.E * C;
  const int64_t attention = 11 * TD + scores;
  const int64_t dense = 4 * s.T * s.dense_width;
  const int64_t moe = TD + 6 * s.T * s.E + 3 * recv_rows * s.D + 2 * recv_rows * s.H +
                      (s.shared_H > 0 ? TD + 3 * s.T * s.shared_H : 0);
  const int64_t widest_ffn = std::max(s.moe_layers > 0 ? moe : 0, s.dense_layers > 0 ? dense : 0);
  // Recomputation keeps a layer's input instead of its activations, and
  // rebuilds one layer's (the widest) at a time in backward.
  int64_t elems = 0;
  if (t.recompute == Recompute::Block)
    elems = s.L * TD + attention + widest_ffn;
  else if (t.recompute == Recompute::Moe)
    elems = s.L * attention + s.dense_layers * dense + s.moe_layers * TD +
            (s.moe_layers > 0 ? moe : 0);
  else
    elems = s.L * attention + s.dense_layers * dense + s.moe_layers * moe;
  elems += 2 * TD + 3 * scores + 4 * TD;  // head input; backward transients
  const int64_t vocab_elems = 4 * s.T * s.V;  // logits, log-probabilities and their gradients
  if (t.dtype == DType::BFloat16) {
    // bf16 activations (the logits stay fp32), plus the bf16 weight copies
    // each matrix product keeps for backward.
    m.activations = 2 * elems + 4 * vocab_elems + 2 * (pc.shared + pc.expert);
  } else {
    m.activations = 4 * (elems + vocab_elems);
  }
  return m;
}

std::string describe_memory(const MemoryEstimate& m) {
  auto mib = [](int64_t b) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f MiB", double(b) / 1048576.0);
    return std::string(buf);
  };
  return "params " + mib(m.params) + ", grads " + mib(m.grads) + ", AdamW state " +
         mib(m.optimizer) + ", activations ~" + mib(m.activations) + " (one micro-batch); total ~" +
         mib(m.total());
}

double HardwareProfile::gemm_rate(double size) const {
  if (gemm_gflops.size() == 1 || size <= gemm_gflops.front().first)
    return gemm_gflops.front().second;
  if (size >= gemm_gflops.back().first) return gemm_gflops.back().second;
  for (size_t i = 1; i < gemm_gflops.size(); ++i) {
    const auto& [s1, r1] = gemm_gflops[i];
    const auto& [s0, r0] = gemm_gflops[i - 1];
    if (size <= s1) {
      const double t = std::log(size / s0) / std::log(s1 / s0);
      return r0 + t * (r1 - r0);
    }
  }
  return gemm_gflops.back().second;
}

HardwareProfile load_hardware_profile(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    MOE_THROW(ConfigError, "cannot open hardware profile '"
                               << path
                               << "' (configs/hardware/ has the shipped ones; `moe bench "
                                  "calibrate --out FILE` writes one for this machine)");
  } catch (const YAML::Exception& e) {
    MOE_THROW(ConfigError, path << ": YAML syntax error: " << e.msg);
  }
  MOE_CHECK_T(ConfigError, root.IsMap(), path << ": a hardware profile is a mapping");
  static const std::vector<std::string> keys = {
      "name",          "kind",          "cores_per_node", "ranks_per_node",
      "peak_gflops",   "gemm_gflops",   "multicore_gemm_speedup", "expert_gemm_efficiency",
      "memory_gbps",   "stream_gbps",   "cache_gbps", "cache_mib", "transcendental_gelems",
      "op_overhead_us", "activation_bytes",
      "device_memory_gib", "intra_node", "inter_node"};
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string k = it->first.Scalar();
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) {
      const std::string near = closest_match(k, keys);
      MOE_THROW(ConfigError, path << ": unknown hardware profile key '" << k << "'"
                                  << (near.empty() ? "" : " (did you mean '" + near + "'?)"));
    }
  }
  HardwareProfile hw;
  hw.path = path;
  auto number = [&](const YAML::Node& n, const std::string& key, double lo, double hi) {
    double v = 0;
    try {
      v = n.as<double>();
    } catch (const YAML::Exception&) {
      MOE_THROW(ConfigError, path << ": '" << key << "' must be a number");
    }
    MOE_CHECK_T(ConfigError, v >= lo && v <= hi,
                path << ": '" << key << "' = " << v << " is outside [" << lo << ", " << hi << "]");
    return v;
  };
  auto opt = [&](const char* key, double& field, double lo, double hi) {
    if (root[key]) field = number(root[key], key, lo, hi);
  };
  for (const char* req : {"name", "kind", "peak_gflops", "gemm_gflops", "memory_gbps"})
    MOE_CHECK_T(ConfigError, root[req], path << ": hardware profile key '" << req
                                              << "' is required");
  hw.name = root["name"].Scalar();
  hw.kind = root["kind"].Scalar();
  MOE_CHECK_T(ConfigError, hw.kind == "cpu" || hw.kind == "gpu",
              path << ": 'kind' = '" << hw.kind << "': allowed cpu | gpu");
  double cores = 1, ranks = 0, ab = 4;
  opt("cores_per_node", cores, 1, 4096);
  opt("ranks_per_node", ranks, 0, 4096);
  opt("activation_bytes", ab, 1, 8);
  hw.cores_per_node = int(cores);
  hw.ranks_per_node = int(ranks);
  hw.activation_bytes = int(ab);
  opt("peak_gflops", hw.peak_gflops, 1e-3, 1e9);
  opt("multicore_gemm_speedup", hw.multicore_gemm_speedup, 0.1, 4096);
  opt("expert_gemm_efficiency", hw.expert_gemm_efficiency, 1e-3, 10);
  opt("memory_gbps", hw.memory_gbps, 1e-3, 1e6);
  opt("stream_gbps", hw.stream_gbps, 0, 1e6);
  opt("cache_gbps", hw.cache_gbps, 0, 1e6);
  opt("cache_mib", hw.cache_mib, 0, 1e6);
  opt("transcendental_gelems", hw.transcendental_gelems, 0, 1e6);
  opt("op_overhead_us", hw.op_overhead_us, 0, 1e6);
  opt("device_memory_gib", hw.device_memory_gib, 0, 1e6);
  const YAML::Node g = root["gemm_gflops"];
  if (g.IsScalar()) {
    hw.gemm_gflops.push_back({1.0, number(g, "gemm_gflops", 1e-3, 1e9)});
  } else {
    MOE_CHECK_T(ConfigError, g.IsSequence() && g.size() > 0,
                path << ": 'gemm_gflops' is a number or a list of [size, GFLOP/s] pairs");
    for (const auto& pt : g) {
      MOE_CHECK_T(ConfigError, pt.IsSequence() && pt.size() == 2,
                  path << ": 'gemm_gflops' entries are [size, GFLOP/s] pairs");
      const double size = number(pt[0], "gemm_gflops size", 1, 1e7);
      MOE_CHECK_T(ConfigError, hw.gemm_gflops.empty() || size > hw.gemm_gflops.back().first,
                  path << ": 'gemm_gflops' sizes must increase (" << size << " after "
                       << hw.gemm_gflops.back().first << ")");
      hw.gemm_gflops.push_back({size, number(pt[1], "gemm_gflops rate", 1e-3, 1e9)});
    }
  }
  for (const char* key : {"intra_node", "inter_node"}) {
    LinkProfile& link = std::string(key) == "intra_node" ? hw.intra_node : hw.inter_node;
    const YAML::Node n = root[key];
    if (!n) continue;
    MOE_CHECK_T(ConfigError, n.IsMap() && n["gbps"],
                path << ": '" << key << "' is a mapping {gbps: N, latency_us: N}");
    link.gbps = number(n["gbps"], std::string(key) + ".gbps", 1e-3, 1e6);
    if (n["latency_us"])
      link.latency_us = number(n["latency_us"], std::string(key) + ".latency_us", 0, 1e7);
  }
  hw.has_inter_node = bool(root["inter_node"]);
  if (!hw.has_inter_node) hw.inter_node = hw.intra_node;
  return hw;
}

std::string dump_hardware_profile(const HardwareProfile& hw, const std::string& header) {
  std::ostringstream o;
  std::istringstream h(header);
  for (std::string line; std::getline(h, line);) o << "# " << line << "\n";
  o << "name: " << hw.name << "\nkind: " << hw.kind << "\ncores_per_node: " << hw.cores_per_node
    << "\nranks_per_node: " << hw.ranks_per_node << "\npeak_gflops: " << hw.peak_gflops
    << "\ngemm_gflops: [";
  for (size_t i = 0; i < hw.gemm_gflops.size(); ++i)
    o << (i ? ", " : "") << "[" << hw.gemm_gflops[i].first << ", " << hw.gemm_gflops[i].second
      << "]";
  o << "]\nmulticore_gemm_speedup: " << hw.multicore_gemm_speedup
    << "\nexpert_gemm_efficiency: " << hw.expert_gemm_efficiency
    << "\nmemory_gbps: " << hw.memory_gbps << "\nstream_gbps: " << hw.stream_gbps
    << "\ncache_gbps: " << hw.cache_gbps << "\ncache_mib: " << hw.cache_mib
    << "\ntranscendental_gelems: " << hw.transcendental_gelems
    << "\nop_overhead_us: " << hw.op_overhead_us
    << "\nactivation_bytes: " << hw.activation_bytes
    << "\ndevice_memory_gib: " << hw.device_memory_gib << "\nintra_node: {gbps: "
    << hw.intra_node.gbps << ", latency_us: " << hw.intra_node.latency_us
    << "}\n";
  if (hw.has_inter_node)
    o << "inter_node: {gbps: " << hw.inter_node.gbps << ", latency_us: " << hw.inter_node.latency_us
      << "}\n";
  return o.str();
}

StepPrediction predict_step(const StepCost& cost, const HardwareProfile& hw) {
  const int W = cost.world;
  const int per_node = hw.ranks_per_node > 0 ? std::min(hw.ranks_per_node, W) : W;
  // CPU: ranks of a node share its cores. With fewer ranks than cores a rank's
  // GEMMs use its share of the cores; with more, everything takes turns.
  double gemm_speedup = 1.0, share = 1.0;
  if (hw.kind == "cpu") {
    const double cores_per_rank = double(hw.cores_per_node) / double(per_node);
    if (cores_per_rank >= 1.0) {
      if (hw.cores_per_node > 1)
        gemm_speedup = 1.0 + (hw.multicore_gemm_speedup - 1.0) * (cores_per_rank - 1.0) /
                                 double(hw.cores_per_node - 1);
    } else {
      share = 1.0 / cores_per_rank;
    }
  }
  // Messages are counted in fp32; a profile with 2-byte activations moves half.
  const double msg_scale = double(hw.activation_bytes) / 4.0;
  auto collective_s = [&](const CollectiveCost& c) {
    if (c.group <= 1) return 0.0;
    // Ranks of a group are spread over nodes of per_node ranks: the share of
    // peers off the node goes over the inter-node link.
    const bool spans_nodes = c.group > per_node;
    const double inter_peers =
        spans_nodes ? double(c.group - per_node) / double(c.group - 1) : 0.0;
    double bytes_intra = 0, bytes_inter = 0;
    if (c.kind == "all_to_all") {
      const double off = double(c.off_rank_bytes) * msg_scale;
      bytes_inter = off * inter_peers;
      bytes_intra = off - bytes_inter;
    } else {
      // Ring all-reduce: 2 (n-1)/n of the buffer in and out of every rank;
      // reduce-scatter and all-gather are its two halves.
      const double halves = c.kind == "all_reduce" ? 2.0 : 1.0;
      const double moved = halves * double(c.group - 1) / double(c.group) * double(c.bytes);
      (spans_nodes ? bytes_inter : bytes_intra) = moved;
    }
    const LinkProfile& slow = spans_nodes ? hw.inter_node : hw.intra_node;
    const double log_steps = std::ceil(std::log2(double(c.group)));
    const double steps = c.kind == "all_reduce"                                  ? 2.0 * log_steps
                         : c.kind == "reduce_scatter" || c.kind == "all_gather" ? log_steps
                                                                                 : 1.0;
    return steps * slow.latency_us * 1e-6 +
           std::max(bytes_intra / (hw.intra_node.gbps * 1e9),
                    bytes_inter / (hw.inter_node.gbps * 1e9));
  };
  // Plain passes: at cache speed for the part of the working set the cache
  // holds, at DRAM streaming speed for the rest.
  const double dram_gbps = hw.stream_gbps > 0 ? hw.stream_gbps : hw.memory_gbps;
  const double cache_gbps = hw.cache_gbps > 0 ? hw.cache_gbps : dram_gbps;
  auto seconds_per_byte = [&](const PhaseCost& ph) {
    if (!ph.streaming) return 1.0 / (hw.memory_gbps * 1e9);
    const double cache_bytes = hw.cache_mib * 1048576.0;
    const double in_cache =
        ph.working_set_bytes <= 0 ? 1.0
                                  : std::min(1.0, cache_bytes / double(ph.working_set_bytes));
    return in_cache / (cache_gbps * 1e9) + (1.0 - in_cache) / (dram_gbps * 1e9);
  };
  StepPrediction p;
  for (const auto& ph : cost.phases) {
    double s = 0;
    for (const auto& g : ph.gemms) {
      const double m_each = double(g.m) / double(std::max<int64_t>(1, g.groups));
      const double size = std::cbrt(std::max(1.0, m_each * double(g.n) * double(g.k)));
      const double efficiency = ph.name == "experts" ? hw.expert_gemm_efficiency : 1.0;
      s += double(g.flops()) / (hw.gemm_rate(size) * efficiency * gemm_speedup * 1e9);
    }
    // Activation traffic scales with the element size; parameter and optimizer traffic is fp32.
    const bool param_phase = ph.name == "grad_sync" || ph.name == "optimizer";
    const double bytes = double(ph.memory_bytes) * (param_phase ? 1.0 : msg_scale);
    s += bytes * seconds_per_byte(ph);
    if (hw.transcendental_gelems > 0)
      s += double(ph.transcendentals) / (hw.transcendental_gelems * 1e9);
    s += double(ph.ops) * hw.op_overhead_us * 1e-6;
    double comm = 0;
    for (const auto& c : ph.collectives) comm += double(c.repeat) * collective_s(c);
    s = (s + comm) * share;
    p.phase_ms.push_back({ph.name, s * 1e3});
    p.step_ms += s * 1e3;
    if (ph.name == "dispatch" || ph.name == "combine") p.all_to_all_ms += s * 1e3;
  }
  const double global_tokens = double(cost.tokens_per_rank) * W;
  p.tokens_per_s = p.step_ms > 0 ? global_tokens / (p.step_ms * 1e-3) : 0.0;
  // Peak of the hardware in use: every core of each node (cpu), every device (gpu).
  const int nodes = (W + per_node - 1) / per_node;
  const double peak = hw.kind == "cpu" ? hw.peak_gflops * hw.cores_per_node * nodes
                                       : hw.peak_gflops * W;
  p.mfu = p.tokens_per_s * cost.train_flops_per_token / (peak * 1e9);
  return p;
}

}  // namespace moe
