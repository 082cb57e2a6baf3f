#include "moe/moe/moe_layer.h"

#include <cmath>

#include "moe/core/error.h"
#include "moe/core/random.h"
#include "moe/core/timer.h"

namespace moe {

namespace {
uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t h = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull + (a << 6) + (a >> 2));
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ull;
  return h ^ (h >> 29);
}
// A weight in the compute dtype (a no-op in float32 training).
torch::Tensor cast_to(const torch::Tensor& w, c10::ScalarType dtype) {
  return w.defined() && w.scalar_type() != dtype ? w.to(dtype) : w;
}
}  // namespace

RoutingTotals::RoutingTotals(int64_t e, const torch::TensorOptions& options)
    : experts(e), packed(torch::zeros({3 * e + 4}, options.dtype(torch::kFloat64))) {}
RoutingTotals::RoutingTotals(int64_t e, torch::Tensor p) : experts(e), packed(std::move(p)) {
  MOE_CHECK(packed.numel() == 3 * e + 4,
            "routing totals hold " << packed.numel() << " values, expected " << 3 * e + 4);
}

MoELayer::MoELayer(const MoeConfig& cfg, int64_t d_model, comm::Communicator& ep_group,
                   uint64_t seed)
    : cfg_(cfg), d_model_(d_model), ep_(&ep_group), dispatcher_(cfg, ep_group) {
  const int ep = ep_group.size();
  MOE_CHECK_T(ConfigError, cfg.experts % ep == 0,
              "moe.experts = " << cfg.experts << " is not divisible by the EP group size " << ep);
  MOE_CHECK_T(ConfigError, cfg.top_k <= cfg.experts,
              "moe.top_k = " << cfg.top_k << " exceeds moe.experts = " << cfg.experts);
  experts_local_ = cfg.experts / ep;
  first_expert_ = ep_group.rank() * experts_local_;
  router = register_module("router", std::make_shared<Router>(cfg, d_model, mix(seed, 0xA11CE)));
  const int64_t D = d_model, H = cfg.d_expert;
  const bool swiglu = cfg.activation == Activation::SwiGLU;
  std::vector<torch::Tensor> a, b, c;
  for (int64_t le = 0; le < experts_local_; ++le) {
    uint64_t s = mix(seed, 1000 + first_expert_ + le);
    a.push_back(seeded_normal({D, H}, 1.0 / std::sqrt(double(D)), mix(s, 1)));
    b.push_back(seeded_normal({D, H}, 1.0 / std::sqrt(double(D)), mix(s, 3)));
    c.push_back(seeded_normal({H, D}, 1.0 / std::sqrt(double(H)), mix(s, 2)));
  }
  w1 = register_parameter("w1", torch::stack(a));
  if (swiglu) w3 = register_parameter("w3", torch::stack(b));
  w2 = register_parameter("w2", torch::stack(c));
  if (cfg.shared_experts > 0) {
    const int64_t HS = cfg.shared_experts * H;
    shared_w1 = register_parameter(
        "shared_w1", seeded_normal({1, D, HS}, 1.0 / std::sqrt(double(D)), mix(seed, 7)));
    if (swiglu)
      shared_w3 = register_parameter(
          "shared_w3", seeded_normal({1, D, HS}, 1.0 / std::sqrt(double(D)), mix(seed, 8)));
    shared_w2 = register_parameter(
        "shared_w2", seeded_normal({1, HS, D}, 1.0 / std::sqrt(double(HS)), mix(seed, 9)));
  }
}

void MoELayer::load_global_experts(const torch::Tensor& g1, const torch::Tensor& g3,
                                   const torch::Tensor& g2) {
  torch::NoGradGuard ng;
  auto slice = [&](const torch::Tensor& g, torch::Tensor& w, const char* name) {
    if (!w.defined()) return;
    std::vector<int64_t> want = w.sizes().vec();
    want[0] = cfg_.experts;
    MOE_CHECK_T(ShapeError, g.sizes().vec() == want,
                "load_global_experts: " << name << " has shape " << comm::shape_str(g)
                                        << ", expected [" << want[0] << ", " << want[1] << ", "
                                        << want[2] << "]");
    w.copy_(g.narrow(0, first_expert_, experts_local_));
  };
  slice(g1, w1, "w1");
  slice(g3, w3, "w3");
  slice(g2, w2, "w2");
}

void MoELayer::update_balance_bias(const LayerStats& stats) {
  router->update_balance_bias(torch::tensor(stats.tokens_per_expert, torch::kInt64)
                                  .to(router->balance_bias.device()));
}

MoELayer::Routing MoELayer::route(const torch::Tensor& x, bool training, uint64_t noise_seed,
                                  MoEOutput& out) {
  const int64_t T = x.size(0), E = cfg_.experts, k = cfg_.top_k;
  Stopwatch sw;
  Routing r;
  // Router math in float32 whatever the compute dtype (Megatron's --moe-router-dtype fp32).
  r.router = router->forward(cast_to(x, torch::kFloat32), training, noise_seed);
  const RouterOutput& ro = r.router;
  DispatchPlan plan = dispatcher_.plan_slots(ro.expert_idx, ro.gate);
  torch::Tensor probs =
      cfg_.score_fn == ScoreFn::Softmax ? ro.scores : ro.scores / ro.scores.sum(-1, true);
  torch::Tensor p_local = probs.mean(0);  // [E], differentiable
  RoutingTotals totals(E, x.options());
  {
    torch::NoGradGuard ng;
    torch::Tensor pd = probs.detach().to(torch::kFloat64);
    totals.routed().copy_(plan.routed);
    totals.dropped().fill_(double(T * k)).sub_(plan.kept.sum());
    totals.tokens().fill_(double(T));
    totals.prob_sum().copy_(pd.sum(0));
    totals.entropy_sum().copy_(-(pd * pd.clamp_min(1e-30).log()).sum().view({1}));
    totals.gate_sum().index_add_(0, ro.expert_idx.reshape({-1}),
                                 ro.gate.detach().reshape({-1}).to(torch::kFloat64));
    totals.nonfinite_logits().copy_((~torch::isfinite(ro.logits)).sum().view({1}));
  }
  times().forward[PhaseTimes::Router] += sw.seconds();
  r.handle = dispatcher_.exchange(std::move(plan), totals.packed);
  sw.reset();
  const RoutingTotals g(E, r.handle.totals);  // host, summed over the EP group
  const double nonfinite = g.nonfinite_logits().item<double>();
  const double tokens_g = g.tokens().item<double>();
  const double* routed_g = g.routed().data_ptr<double>();
  if (nonfinite > 0) {
    // Every rank of the group sees the count, so every rank stops here together.
    torch::Tensor bad = (~torch::isfinite(ro.logits)).nonzero().cpu();
    std::ostringstream where;
    if (bad.size(0) > 0)
      where << "; on this rank first at token " << bad[0][0].item<int64_t>() << ", expert "
            << bad[0][1].item<int64_t>() << " = "
            << ro.logits.index({bad[0][0].item<int64_t>(), bad[0][1].item<int64_t>()})
                   .item<double>();
    else
      where << "; this rank's are finite (another rank of the EP group has them)";
    MOE_THROW(NumericError, "router logits are not finite: "
                                << static_cast<int64_t>(nonfinite) << " of "
                                << static_cast<int64_t>(tokens_g) * E
                                << " values over the EP group" << where.str()
                                << " (check the input and the learning rate)");
  }

  // Losses: aux with f counted over the EP group ("global") or this rank ("local").
  const DispatchPlan& plan_done = r.handle.plan;
  torch::Tensor f = cfg_.aux_loss_scope == AuxLossScope::Global
                        ? totals.routed().to(torch::kFloat32) / (tokens_g * k)
                        : plan_done.routed.to(torch::kFloat32) / double(T * k);
  out.aux_loss = cfg_.aux_loss_coef * E * (f * p_local).sum();
  out.z_loss = cfg_.z_loss_coef * torch::logsumexp(ro.logits, -1).pow(2).mean();

  LayerStats& st = out.stats;
  st.tokens_per_expert.resize(E);
  double mx = 0, sum = 0;
  for (int64_t e = 0; e < E; ++e) {
    st.tokens_per_expert[e] = static_cast<int64_t>(std::llround(routed_g[e]));
    mx = std::max(mx, routed_g[e]);
    sum += routed_g[e];
  }
  const double* gate_g = g.gate_sum().data_ptr<double>();
  st.gate_per_expert.assign(gate_g, gate_g + E);
  st.tokens = static_cast<int64_t>(std::llround(tokens_g));
  st.capacity = plan_done.capacity;
  st.drop_fraction = tokens_g > 0 ? g.dropped().item<double>() / (tokens_g * k) : 0.0;
  st.router_entropy = tokens_g > 0 ? g.entropy_sum().item<double>() / tokens_g : 0.0;
  st.max_load = mx;
  st.mean_load = sum / E;
  {
    // Host values for logging, from the host totals (no further device sync),
    // except the local-scope aux and z, which are this rank's own losses.
    torch::NoGradGuard ng;
    if (cfg_.aux_loss_scope == AuxLossScope::Global) {
      torch::Tensor pg = g.prob_sum() / std::max(tokens_g, 1.0);
      torch::Tensor fg = g.routed() / std::max(tokens_g * k, 1.0);
      st.aux_loss = cfg_.aux_loss_coef * E * (fg * pg).sum().item<double>();
    } else {
      st.aux_loss = out.aux_loss.item<double>();
    }
    st.z_loss = out.z_loss.item<double>();
  }
  times().forward[PhaseTimes::Router] += sw.seconds();
  return r;
}

torch::Tensor MoELayer::experts(const torch::Tensor& rows,
                                const std::vector<ExpertSegment>& segments) {
  const auto dt = rows.scalar_type();
  return expert_mlp(rows, cast_to(w1, dt), cast_to(w3, dt), cast_to(w2, dt), segments,
                    cfg_.activation == Activation::SwiGLU, &times());
}

MoEOutput MoELayer::forward(const torch::Tensor& x, bool training, uint64_t noise_seed) {
  MOE_CHECK_T(ShapeError, x.dim() == 2 && x.size(1) == d_model_,
              "MoE layer: input has hidden size "
                  << (x.dim() == 2 ? x.size(1) : -1) << " (shape " << comm::shape_str(x)
                  << "), the layer expects [T, " << d_model_ << "] (model.d_model)");
  MOE_CHECK_T(ShapeError, x.device() == w1.device(),
              "MoE layer: input on " << x.device() << " but the layer's weights on "
                                     << w1.device());
  MoEOutput out;
  Routing r = route(x, training, noise_seed, out);
  torch::Tensor rows = dispatcher_.dispatch(x, r.handle);
  torch::Tensor expert_out = experts(rows, r.handle.segments);
  out.y = dispatcher_.combine(expert_out, r.router.gate, r.handle);
  if (shared_w1.defined()) {
    const auto dt = x.scalar_type();
    out.y = out.y + expert_mlp(x, cast_to(shared_w1, dt), cast_to(shared_w3, dt), cast_to(shared_w2, dt),
                               {{0, 0, x.size(0)}}, cfg_.activation == Activation::SwiGLU,
                               &times());
  }
  return out;
}

}  // namespace moe
