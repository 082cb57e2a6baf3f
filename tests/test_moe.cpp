// MoE layer tests: a naive oracle (loops over tokens and slots) against the
// layer, EP parity under threads (and under mpirun via --gtest_filter=Mpi*),
// losses, plans, determinism, bad input.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <thread>

#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/core/threads.h"
#include "moe/moe/dispatch_plan.h"
#include "moe/moe/moe_layer.h"
#include "moe/moe/router.h"
#include "test_support.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

using namespace moe;

namespace {

torch::Tensor randn_seeded(std::vector<int64_t> shape, uint64_t seed, double std = 1.0) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::normal(0.0, std, shape, gen);
}

MoeConfig make_cfg(int64_t E, int64_t k, const std::string& score, double cf,
                   const std::string& act = "swiglu") {
  MoeConfig c;
  c.experts = E;
  c.top_k = k;
  c.d_expert = 12;
  EXPECT_TRUE(enum_from_name(score, c.score_fn)) << score;
  c.capacity_factor = cf;
  c.min_capacity = 1;
  EXPECT_TRUE(enum_from_name(act, c.activation)) << act;
  c.aux_loss_coef = 0.05;
  c.z_loss_coef = 0.01;
  return c;
}

// A single-rank communicator for references (works inside mpirun processes too).
struct Solo {
  std::vector<std::unique_ptr<comm::ThreadComm>> world = comm::ThreadComm::create_world(1, 30.0);
  comm::Communicator& operator*() { return *world[0]; }
};

// ---- the oracle: deliberately naive ---------------------------------------------------
struct Oracle {
  torch::Tensor y, aux, z;
};

Oracle oracle(const torch::Tensor& x, const torch::Tensor& wg, const torch::Tensor& w1,
              const torch::Tensor& w3, const torch::Tensor& w2, const MoeConfig& c) {
  const int64_t T = x.size(0), E = c.experts, k = c.top_k;
  torch::Tensor logits = torch::mm(x, wg.t()) / c.temperature;
  torch::Tensor scores =
      c.score_fn == ScoreFn::Softmax ? torch::softmax(logits, -1) : torch::sigmoid(logits);
  torch::Tensor idx = std::get<1>(scores.detach().topk(k, -1));
  torch::Tensor gate = scores.gather(1, idx);
  if (c.renormalize && k > 1) gate = gate / gate.sum(-1, true);
  const int64_t C = expert_capacity(T, k, E, c.capacity_factor, c.min_capacity);
  // Which slots are kept: walk slots in priority order, count per expert.
  std::vector<std::pair<int64_t, int64_t>> order;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) order.emplace_back(t, j);
  if (c.drop_policy == DropPolicy::Probability)
    std::stable_sort(
        order.begin(), order.end(),
        [&](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
          return gate[a.first][a.second].item<float>() > gate[b.first][b.second].item<float>();
        });
  std::vector<std::vector<bool>> kept(T, std::vector<bool>(k, false));
  std::vector<int64_t> used(E, 0);
  for (auto [t, j] : order) {
    int64_t e = idx[t][j].item<int64_t>();
    if (C == 0 || used[e] < C) kept[t][j] = true;
    used[e]++;
  }
  std::vector<torch::Tensor> rows;
  for (int64_t t = 0; t < T; ++t) {
    torch::Tensor acc = torch::zeros({x.size(1)});
    for (int64_t j = 0; j < k; ++j) {
      if (!kept[t][j]) continue;
      int64_t e = idx[t][j].item<int64_t>();
      torch::Tensor xt = x[t].unsqueeze(0);
      torch::Tensor h = c.activation == Activation::SwiGLU
                            ? torch::silu(torch::mm(xt, w1[e])) * torch::mm(xt, w3[e])
                            : torch::gelu(torch::mm(xt, w1[e]));
      acc = acc + gate[t][j] * torch::mm(h, w2[e]).squeeze(0);
    }
    rows.push_back(acc);
  }
  Oracle o;
  o.y = torch::stack(rows);
  torch::Tensor f = torch::zeros({E});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) f[idx[t][j].item<int64_t>()] += 1.0 / double(T * k);
  torch::Tensor probs = c.score_fn == ScoreFn::Softmax ? scores : scores / scores.sum(-1, true);
  o.aux = c.aux_loss_coef * E * (f * probs.mean(0)).sum();
  o.z = c.z_loss_coef * torch::logsumexp(logits, -1).pow(2).mean();
  return o;
}

void expect_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what,
                  double tol = 1e-5) {
  ASSERT_TRUE(a.defined() && b.defined()) << what;
  ASSERT_EQ(a.sizes(), b.sizes()) << what;
  double diff = (a - b).abs().max().item<double>();
  double scale = std::max(1.0, b.abs().max().item<double>());
  EXPECT_LE(diff, tol * scale) << what << ": max |diff| = " << diff << " (scale " << scale << ")";
}

struct OracleCase {
  int64_t E, k;
  std::string score;
  double cf;
  std::string policy, act;
};

void run_oracle_case(const OracleCase& oc) {
  SCOPED_TRACE("E=" + std::to_string(oc.E) + " k=" + std::to_string(oc.k) + " " + oc.score +
               " cf=" + std::to_string(oc.cf) + " " + oc.policy + " " + oc.act);
  MoeConfig c = make_cfg(oc.E, oc.k, oc.score, oc.cf, oc.act);
  EXPECT_TRUE(enum_from_name(oc.policy, c.drop_policy)) << oc.policy;
  const int64_t T = 40, D = 16;
  Solo solo;
  MoELayer layer(c, D, *solo, 99);
  // Spread router logits so top-k has no near-ties.
  {
    torch::NoGradGuard ng;
    layer.router->weight.copy_(randn_seeded({oc.E, D}, 5, 0.5));
  }
  torch::Tensor x = randn_seeded({T, D}, 11).requires_grad_(true);
  torch::Tensor probe = randn_seeded({T, D}, 12);
  MoEOutput out = layer.forward(x, /*training=*/false);
  torch::Tensor loss = (out.y * probe).sum() + out.aux_loss + out.z_loss;
  loss.backward();

  torch::Tensor x2 = x.detach().clone().requires_grad_(true);
  torch::Tensor wg = layer.router->weight.detach().clone().requires_grad_(true);
  torch::Tensor w1 = layer.w1.detach().clone().requires_grad_(true);
  torch::Tensor w3 =
      oc.act == "swiglu" ? layer.w3.detach().clone().requires_grad_(true) : torch::zeros_like(w1);
  torch::Tensor w2 = layer.w2.detach().clone().requires_grad_(true);
  Oracle o = oracle(x2, wg, w1, w3, w2, c);
  torch::Tensor loss2 = (o.y * probe).sum() + o.aux + o.z;
  loss2.backward();

  if (oc.cf > 0 && oc.cf < 1) {
    EXPECT_GT(out.stats.drop_fraction, 0.0) << "the case should drop tokens";
  }
  expect_close(out.y, o.y, "output");
  expect_close(out.aux_loss, o.aux, "aux loss");
  expect_close(out.z_loss, o.z, "z loss");
  expect_close(x.grad(), x2.grad(), "grad x");
  expect_close(layer.router->weight.grad(), wg.grad(), "grad router");
  expect_close(layer.w1.grad(), w1.grad(), "grad w1");
  expect_close(layer.w2.grad(), w2.grad(), "grad w2");
  if (oc.act == "swiglu") expect_close(layer.w3.grad(), w3.grad(), "grad w3");
}

}  // namespace

// ---- oracle --------------------------------------------------------------------------

TEST(MoeOracle, DroplessAcrossKAndE) {
  for (int64_t E : {1, 8, 64})
    for (int64_t k : {1, 2, 4})
      for (const char* score : {"softmax", "sigmoid"}) {
        if (k > E) continue;
        run_oracle_case({E, k, score, 0.0, "position", "swiglu"});
      }
}

TEST(MoeOracle, CapacityDropsByPositionAndProbability) {
  for (int64_t E : {8, 64})
    for (int64_t k : {1, 2, 4})
      for (const char* policy : {"position", "probability"})
        run_oracle_case({E, k, "softmax", 0.5, policy, "swiglu"});
  run_oracle_case({8, 2, "sigmoid", 0.75, "position", "swiglu"});
}

TEST(MoeOracle, GeluExperts) {
  run_oracle_case({8, 2, "softmax", 0.0, "position", "gelu"});
  run_oracle_case({8, 2, "softmax", 1.0, "position", "gelu"});
}

TEST(MoeOracle, ExpertsWithNoTokensGetZeroGradient) {
  // 64 experts, 40 tokens, k=1: most experts receive nothing.
  MoeConfig c = make_cfg(64, 1, "softmax", 0.0);
  Solo solo;
  MoELayer layer(c, 16, *solo, 3);
  torch::Tensor x = randn_seeded({40, 16}, 1);
  MoEOutput out = layer.forward(x, false);
  out.y.sum().backward();
  int64_t idle = 0;
  for (int64_t e = 0; e < 64; ++e) {
    bool routed = out.stats.tokens_per_expert[e] > 0;
    double g = layer.w1.grad()[e].abs().sum().item<double>();
    if (!routed) {
      ++idle;
      EXPECT_EQ(g, 0.0) << "expert " << e;
    } else {
      EXPECT_GT(g, 0.0) << "expert " << e;
    }
  }
  EXPECT_GT(idle, 10);
}

// ---- plans ---------------------------------------------------------------------------------

TEST(MoePlan, CapacityFormula) {
  EXPECT_EQ(expert_capacity(4096, 2, 8, 1.25, 4), 1280);
  EXPECT_EQ(expert_capacity(10, 1, 4, 1.0, 1), 3);  // ceil(2.5)
  EXPECT_EQ(expert_capacity(10, 1, 4, 1.0, 5), 5);  // min_capacity wins
  EXPECT_EQ(expert_capacity(10, 1, 4, 0.0, 5), 0);  // dropless
}

TEST(MoePlan, PositionPolicyKeepsEarlierTokens) {
  // 6 tokens, k=1, all to expert 1 except token 2 -> expert 0; capacity 2 per expert.
  torch::Tensor idx = torch::tensor({1, 1, 0, 1, 1, 1}, torch::kInt64).view({6, 1});
  torch::Tensor gate = torch::tensor({0.1f, 0.2f, 0.9f, 0.8f, 0.7f, 0.3f}).view({6, 1});
  DispatchPlan p = make_dispatch_plan(idx, gate, 2, 1, 2.0 / 3.0, 1, DropPolicy::Position);
  EXPECT_EQ(p.capacity, 2);
  std::vector<int64_t> rows(p.slot_row.data_ptr<int64_t>(), p.slot_row.data_ptr<int64_t>() + 6);
  EXPECT_EQ(rows, (std::vector<int64_t>{2, 3, 0, -1, -1, -1}));  // expert 1 rows start at C = 2
  EXPECT_EQ(p.dropped, 3);
  EXPECT_TRUE(torch::equal(p.routed, torch::tensor({1, 5}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(p.kept, torch::tensor({1, 2}, torch::kInt64)));
  p = make_dispatch_plan(idx, gate, 2, 1, 2.0 / 3.0, 1, DropPolicy::Probability);
  rows.assign(p.slot_row.data_ptr<int64_t>(), p.slot_row.data_ptr<int64_t>() + 6);
  EXPECT_EQ(rows, (std::vector<int64_t>{-1, -1, 0, 2, 3, -1}));  // tokens 3 (0.8) and 4 (0.7) win
}

TEST(MoePlan, DroplessCompactLayoutAndPeerCounts) {
  torch::Tensor idx = torch::tensor({3, 0, 1, 3, 2, 3}, torch::kInt64).view({3, 2});
  DispatchPlan p = make_dispatch_plan(idx, torch::ones({3, 2}), 4, 2, 0.0, 0, DropPolicy::Position);
  EXPECT_FALSE(p.padded);
  EXPECT_EQ(p.send_rows, 6);
  EXPECT_EQ(p.peer_rows, (std::vector<int64_t>{2, 4}));  // experts {0,1} on rank 0, {2,3} on rank 1
  std::vector<int64_t> toks(p.row_token.data_ptr<int64_t>(), p.row_token.data_ptr<int64_t>() + 6);
  EXPECT_EQ(toks,
            (std::vector<int64_t>{0, 1, 2, 0, 1, 2}));  // expert 0: t0; 1: t1; 2: t2; 3: t0, t1, t2
  EXPECT_EQ(p.dropped, 0);
}

// ---- losses ----------------------------------------------------------------------------------

TEST(MoeLosses, HandComputedAuxAndZ) {
  // 2 experts, k=1, 2 tokens; router weight picks logits directly from x.
  MoeConfig c = make_cfg(2, 1, "softmax", 0.0);
  c.aux_loss_coef = 1.0;
  c.z_loss_coef = 1.0;
  Solo solo;
  MoELayer layer(c, 2, *solo, 1);
  {
    torch::NoGradGuard ng;
    layer.router->weight.copy_(torch::eye(2));
  }
  torch::Tensor x = torch::tensor({{1.0f, 0.0f}, {0.0f, 3.0f}});
  MoEOutput out = layer.forward(x, false);
  // probs: t0 = softmax(1, 0), t1 = softmax(0, 3); choices: t0 -> 0, t1 -> 1: f = (0.5, 0.5).
  double p00 = std::exp(1.0) / (std::exp(1.0) + 1), p11 = std::exp(3.0) / (1 + std::exp(3.0));
  double P0 = (p00 + (1 - p11)) / 2, P1 = ((1 - p00) + p11) / 2;
  double aux = 1.0 * 2 * (0.5 * P0 + 0.5 * P1);
  double lse0 = std::log(std::exp(1.0) + 1), lse1 = std::log(1 + std::exp(3.0));
  double z = (lse0 * lse0 + lse1 * lse1) / 2;
  EXPECT_NEAR(out.aux_loss.item<double>(), aux, 1e-6);
  EXPECT_NEAR(out.stats.aux_loss, aux, 1e-6);
  EXPECT_NEAR(out.z_loss.item<double>(), z, 1e-5);
  EXPECT_EQ(out.stats.tokens_per_expert, (std::vector<int64_t>{1, 1}));
  EXPECT_NEAR(out.stats.router_entropy,
              -(p00 * std::log(p00) + (1 - p00) * std::log(1 - p00) + p11 * std::log(p11) +
                (1 - p11) * std::log(1 - p11)) /
                  2,
              1e-6);
}

TEST(MoeLosses, BalanceBiasMovesSkewedRouterTowardBalance) {
  MoeConfig c = make_cfg(4, 1, "sigmoid", 0.0);
  c.bias_update_rate = 0.01;
  Solo solo;
  MoELayer layer(c, 8, *solo, 2);
  {
    torch::NoGradGuard ng;
    layer.router->weight.copy_(randn_seeded({4, 8}, 6, 0.3));
    layer.router->weight[0].add_(0.6);  // tokens (all-positive inputs) prefer expert 0
  }
  torch::Tensor x = randn_seeded({256, 8}, 4).abs();
  MoEOutput first = layer.forward(x, true);
  double imbalance0 = first.stats.max_load / first.stats.mean_load;
  EXPECT_GT(imbalance0, 2.5);
  double late = 0;
  for (int step = 0; step < 60; ++step) {
    MoEOutput o = layer.forward(x, true);
    if (step >= 50) late += o.stats.max_load / o.stats.mean_load / 10;
    layer.update_balance_bias(o.stats);
  }
  EXPECT_LT(late, 1.0 + (imbalance0 - 1.0) / 2) << "bias " << layer.router->balance_bias;
  EXPECT_GT(layer.router->balance_bias[1].item<float>(),
            layer.router->balance_bias[0].item<float>());
  EXPECT_EQ(layer.router->weight.grad().defined(), false);  // no gradient was involved
}

// ---- router options, through the public Router API against a naive reference -----------

namespace {

// Options are set as config overrides (as users set them), on top of E 8, k 2.
MoeConfig router_cfg(std::vector<std::string> overrides) {
  std::vector<std::string> all = {"moe.experts=8", "moe.top_k=2"};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return default_config(all).moe;
}

struct NaiveRoute {
  torch::Tensor idx, gate;  // [T, k] int64, [T, k] float
};

// Token by token: candidates = scores (+ balance bias when the bias is on);
// with groups, only experts of the topk_groups groups whose best candidate
// is highest; the k best candidates, best first; gate = the SCORES there
// (never the bias), renormalised to sum to 1 when asked.
NaiveRoute naive_route(const torch::Tensor& scores, const MoeConfig& c, const torch::Tensor& bias) {
  const int64_t T = scores.size(0), E = c.experts, k = c.top_k;
  const int64_t G = c.n_groups, per = E / G;
  NaiveRoute r{torch::zeros({T, k}, torch::kInt64), torch::zeros({T, k})};
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> cand(E);
    for (int64_t e = 0; e < E; ++e)
      cand[e] = scores[t][e].item<double>() +
                (c.bias_update_rate > 0 ? bias[e].item<double>() : 0.0);
    std::vector<bool> allowed(E, true);
    if (G > 1 && c.topk_groups < G) {
      std::vector<std::pair<double, int64_t>> groups;
      for (int64_t g = 0; g < G; ++g)
        groups.push_back({*std::max_element(cand.begin() + g * per, cand.begin() + (g + 1) * per), g});
      std::sort(groups.begin(), groups.end(), std::greater<>());
      std::fill(allowed.begin(), allowed.end(), false);
      for (int64_t i = 0; i < c.topk_groups; ++i)
        for (int64_t e = 0; e < per; ++e) allowed[groups[i].second * per + e] = true;
    }
    std::vector<std::pair<double, int64_t>> order;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[e]) order.push_back({cand[e], e});
    std::sort(order.begin(), order.end(), std::greater<>());
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += scores[t][order[j].second].item<double>();
    for (int64_t j = 0; j < k; ++j) {
      r.idx[t][j] = order[j].second;
      const double s = scores[t][order[j].second].item<double>();
      r.gate[t][j] = c.renormalize && k > 1 ? s / sum : s;
    }
  }
  return r;
}

// Routes x with the router and checks it against the naive reference built on
// `logits` (what the router should have computed before scoring).
void expect_route(const RouterOutput& out, const torch::Tensor& logits, const MoeConfig& c,
                  const torch::Tensor& bias) {
  torch::Tensor scores =
      c.score_fn == ScoreFn::Softmax ? torch::softmax(logits, -1) : torch::sigmoid(logits);
  expect_close(out.logits.detach(), logits, "logits");
  expect_close(out.scores.detach(), scores, "scores");
  NaiveRoute n = naive_route(scores, c, bias);
  EXPECT_TRUE(torch::equal(out.expert_idx, n.idx)) << "expert ids differ from the reference";
  expect_close(out.gate.detach(), n.gate, "gate weights", 1e-6);
}

struct RouterFixture {
  MoeConfig cfg;
  Router router;
  torch::Tensor x, clean;  // input [T, D] and its plain logits x W^T
  RouterFixture(const MoeConfig& c, int64_t T = 64, int64_t D = 16)
      : cfg(c), router(c, D, 5), x(randn_seeded({T, D}, 21)) {
    {
      torch::NoGradGuard ng;
      router.weight.copy_(randn_seeded({c.experts, D}, 22, 0.5));  // spread: no near-ties
    }
    clean = torch::mm(x, router.weight.detach().t());
  }
};

}  // namespace

TEST(RouterOptions, DefaultsMatchTheReference) {
  for (const char* score : {"softmax", "sigmoid"}) {
    SCOPED_TRACE(score);
    RouterFixture f(router_cfg({std::string("moe.score_fn=") + score}));
    expect_route(f.router.forward(f.x, false), f.clean, f.cfg, f.router.balance_bias);
  }
}

TEST(RouterOptions, TemperatureDividesTheLogits) {
  for (double temp : {2.0, 0.5}) {
    SCOPED_TRACE("temperature " + std::to_string(temp));
    RouterFixture f(router_cfg({"moe.temperature=" + std::to_string(temp)}));
    RouterOutput out = f.router.forward(f.x, false);
    expect_route(out, f.clean / temp, f.cfg, f.router.balance_bias);
    // It matters: the scores are not those at temperature 1.
    EXPECT_GT((out.scores - torch::softmax(f.clean, -1)).abs().max().item<double>(), 1e-2);
  }
}

TEST(RouterOptions, RenormalizeFalseKeepsTheRawScores) {
  for (const char* score : {"softmax", "sigmoid"}) {
    SCOPED_TRACE(score);
    RouterFixture f(router_cfg({std::string("moe.score_fn=") + score, "moe.renormalize=false"}));
    RouterOutput out = f.router.forward(f.x, false);
    expect_route(out, f.clean, f.cfg, f.router.balance_bias);
    EXPECT_GT((out.gate.sum(-1) - 1).abs().max().item<double>(), 1e-2);  // not summing to 1
  }
}

TEST(RouterOptions, GroupLimitedTopK) {
  // 16 experts in 4 groups of 4; each token picks 4 experts from its best 2 groups.
  RouterFixture f(router_cfg({"moe.experts=16", "moe.top_k=4", "moe.n_groups=4",
                              "moe.topk_groups=2"}),
                  128);
  RouterOutput out = f.router.forward(f.x, false);
  expect_route(out, f.clean, f.cfg, f.router.balance_bias);
  // Not vacuous: the group limit changed some token's choice from plain top-k.
  torch::Tensor plain = std::get<1>(torch::softmax(f.clean, -1).topk(4, -1));
  int64_t differ = 0;
  for (int64_t t = 0; t < 128; ++t)
    differ += !torch::equal(std::get<0>(out.expert_idx[t].sort()), std::get<0>(plain[t].sort()));
  EXPECT_GT(differ, 0);
}

TEST(RouterOptions, BalanceBiasSteersSelectionButNotTheGates) {
  RouterFixture f(router_cfg({"moe.bias_update_rate=0.05"}), 256);
  // Mean load 95: expert 0 (400) is above it and moves down, the others move up.
  torch::Tensor load = torch::tensor({400, 60, 60, 60, 60, 60, 60, 0}, torch::kInt64);
  for (int i = 0; i < 3; ++i) f.router.update_balance_bias(load);
  EXPECT_NEAR(f.router.balance_bias[0].item<double>(), -0.15, 1e-6);
  EXPECT_NEAR(f.router.balance_bias[7].item<double>(), 0.15, 1e-6);
  RouterOutput out = f.router.forward(f.x, false);
  expect_route(out, f.clean, f.cfg, f.router.balance_bias);
  // Not vacuous: the bias changed some token's choice.
  torch::Tensor unbiased = std::get<1>(torch::softmax(f.clean, -1).topk(2, -1));
  EXPECT_FALSE(torch::equal(out.expert_idx, unbiased));
}

TEST(RouterOptions, NoiseOnlyWhileTrainingWithTheGivenStd) {
  RouterFixture f(router_cfg({"moe.router_noise_std=0.5"}), 2048);
  expect_route(f.router.forward(f.x, false), f.clean, f.cfg, f.router.balance_bias);
  RouterOutput a = f.router.forward(f.x, true, 11), b = f.router.forward(f.x, true, 11),
               c = f.router.forward(f.x, true, 12);
  EXPECT_TRUE(torch::equal(a.logits, b.logits)) << "same seed, same noise";
  EXPECT_FALSE(torch::equal(a.logits, c.logits)) << "another seed, other noise";
  torch::Tensor noise = a.logits.detach() - f.clean;  // 16384 draws of N(0, 0.5^2)
  EXPECT_NEAR(noise.mean().item<double>(), 0.0, 0.02);
  EXPECT_NEAR(noise.std().item<double>(), 0.5, 0.02);
  expect_route(a, a.logits.detach(), f.cfg, f.router.balance_bias);  // routed on the noisy logits
}

TEST(RouterOptions, JitterOnlyWhileTrainingWithinItsBound) {
  const double j = 0.1;
  RouterFixture f(router_cfg({"moe.router_jitter=" + std::to_string(j)}), 512);
  expect_route(f.router.forward(f.x, false), f.clean, f.cfg, f.router.balance_bias);
  RouterOutput a = f.router.forward(f.x, true, 11), b = f.router.forward(f.x, true, 11);
  EXPECT_TRUE(torch::equal(a.logits, b.logits));
  // Input jitter: x * u, u ~ U[1 - j, 1 + j] per element, so each logit moves by
  // at most j * sum_d |x_d W_ed|, and by a fair part of that on some.
  torch::Tensor bound = j * torch::mm(f.x.abs(), f.router.weight.detach().abs().t());
  torch::Tensor moved = (a.logits.detach() - f.clean).abs();
  EXPECT_LE((moved - bound).max().item<double>(), 1e-5);
  EXPECT_GT((moved / bound).max().item<double>(), 0.3);
  expect_route(a, a.logits.detach(), f.cfg, f.router.balance_bias);
}

// Noise reaches the router through the layer while training, and not in eval.
TEST(RouterOptions, MoELayerPassesTrainingAndSeedToTheRouter) {
  MoeConfig c = router_cfg({"moe.router_noise_std=1.0", "moe.capacity_factor=0"});
  Solo solo;
  MoELayer layer(c, 16, *solo, 3);
  torch::Tensor x = randn_seeded({64, 16}, 4);
  torch::NoGradGuard ng;
  torch::Tensor eval1 = layer.forward(x, false, 1).y, eval2 = layer.forward(x, false, 2).y;
  torch::Tensor train1 = layer.forward(x, true, 1).y, train1b = layer.forward(x, true, 1).y;
  EXPECT_TRUE(torch::equal(eval1, eval2));
  EXPECT_TRUE(torch::equal(train1, train1b));
  EXPECT_FALSE(torch::equal(train1, eval1));
}

// ---- determinism and bad input ----------------------------------------------------------

// Big enough that the permute / unpermute loops split over the rank's threads
// (T k = 8192 rows, at least 1024 tokens per thread): a sum whose order
// depends on thread timing would show between two runs (bitwise), and a loop
// that mishandles the split (a token lost or done twice at a boundary) would
// show against a run on a single thread. That comparison has a tolerance:
// OpenBLAS runs its products on every core in one case and on one in the
// other, and rounds differently. Each run happens on a fresh thread with its
// CPU budget set as for a one-rank process (every core) or as for one of
// `cores` thread ranks (1).
TEST(MoeLayer, TwoRunsAreBitwiseEqual) {
  MoeConfig c = make_cfg(8, 2, "softmax", 1.0);
  const int64_t T = 4096, D = 32;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  torch::Tensor x = randn_seeded({T, D}, 8);
  struct Run {
    torch::Tensor y, gx, gw1, gw2, grouter;
    int budget = 0;
  };
  auto one_run = [&](int ranks_sharing_the_cores) {
    Run r;
    std::thread worker([&] {
      configure_cpu_threads(ranks_sharing_the_cores);
      r.budget = cpu_budget();
      Solo solo;
      MoELayer layer(c, D, *solo, 7);
      torch::Tensor xi = x.clone().requires_grad_(true);
      auto o = layer.forward(xi);
      (o.y.pow(2).sum() + o.aux_loss).backward();
      r.y = o.y.detach();
      r.gx = xi.grad();
      r.gw1 = layer.w1.grad();
      r.gw2 = layer.w2.grad();
      r.grouter = layer.router->weight.grad();
    });
    worker.join();
    return r;
  };
  Run a = one_run(1), b = one_run(1), single = one_run(cores);
  EXPECT_EQ(single.budget, 1);
  if (cores > 1) EXPECT_GT(a.budget, 1) << "the loops should have run on several threads";
  EXPECT_TRUE(torch::equal(a.y, b.y)) << "output";
  EXPECT_TRUE(torch::equal(a.gx, b.gx)) << "grad x";
  EXPECT_TRUE(torch::equal(a.gw1, b.gw1)) << "grad w1";
  EXPECT_TRUE(torch::equal(a.gw2, b.gw2)) << "grad w2";
  EXPECT_TRUE(torch::equal(a.grouter, b.grouter)) << "grad router";
  expect_close(a.y, single.y, "output, several threads vs one");
  expect_close(a.gx, single.gx, "grad x, several threads vs one");
  expect_close(a.gw1, single.gw1, "grad w1, several threads vs one");
  expect_close(a.gw2, single.gw2, "grad w2, several threads vs one");
  expect_close(a.grouter, single.grouter, "grad router, several threads vs one");
}

TEST(MoeLayer, BadInputIsTyped) {
  Solo solo;
  MoELayer layer(make_cfg(8, 2, "softmax", 1.0), 16, *solo, 1);
  try {
    layer.forward(torch::zeros({4, 12}));
    FAIL();
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("hidden size 12"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("16"), std::string::npos) << e.what();
  }
  EXPECT_THROW(MoELayer(make_cfg(4, 5, "softmax", 1.0), 16, *solo, 1), ConfigError);
  torch::Tensor x = torch::zeros({4, 16});
  x[2][3] = std::nan("");
  try {
    layer.forward(x);
    FAIL();
  } catch (const NumericError& e) {
    EXPECT_NE(std::string(e.what()).find("token 2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("nan"), std::string::npos) << e.what();
  }
}

// ---- EP parity --------------------------------------------------------------------------------

namespace {

torch::Tensor tokens_of(int rank, int64_t T, int64_t D) {
  return randn_seeded({T, D}, 1000 + rank);
}
torch::Tensor probe_of(int rank, int64_t T, int64_t D) {
  return randn_seeded({T, D}, 2000 + rank);
}

// EP = world: each rank routes its own tokens to experts sharded over the
// world. Reference: one rank running the same layer on every rank's tokens.
//   local aux scope:  per-rank references (capacity applies per source rank)
//   global aux scope: one reference on all tokens concatenated (dropless)
void body_ep_parity(comm::Communicator& world, MoeConfig c) {
  const int W = world.size(), r = world.rank();
  const int64_t T = 24, D = 16;
  const bool global = c.aux_loss_scope == AuxLossScope::Global;
  MoELayer layer(c, D, world, 42);
  torch::Tensor x = tokens_of(r, T, D).requires_grad_(true);
  MoEOutput out = layer.forward(x, false);
  ((out.y * probe_of(r, T, D)).sum() + out.aux_loss + out.z_loss).backward();

  Solo solo;
  MoELayer ref(c, D, *solo, 42);
  torch::Tensor my_ref_y, my_ref_gx;
  double ref_aux_global = 0;
  if (global) {
    std::vector<torch::Tensor> xs, ps;
    for (int q = 0; q < W; ++q) xs.push_back(tokens_of(q, T, D)), ps.push_back(probe_of(q, T, D));
    torch::Tensor xcat = torch::cat(xs).requires_grad_(true);
    MoEOutput o = ref.forward(xcat, false);
    ((o.y * torch::cat(ps)).sum() + W * (o.aux_loss + o.z_loss)).backward();
    my_ref_y = o.y.narrow(0, r * T, T);
    my_ref_gx = xcat.grad().narrow(0, r * T, T);
    ref_aux_global = o.stats.aux_loss;
    EXPECT_NEAR(out.stats.aux_loss, ref_aux_global, 1e-6);
  } else {
    for (int q = 0; q < W; ++q) {
      torch::Tensor xq = tokens_of(q, T, D).requires_grad_(true);
      MoEOutput o = ref.forward(xq, false);
      ((o.y * probe_of(q, T, D)).sum() + o.aux_loss + o.z_loss).backward();
      if (q == r) {
        my_ref_y = o.y;
        my_ref_gx = xq.grad();
        expect_close(out.aux_loss, o.aux_loss, "aux loss");
        expect_close(out.z_loss, o.z_loss, "z loss");
        EXPECT_EQ(out.stats.capacity, o.stats.capacity);
      }
    }
  }
  expect_close(out.y, my_ref_y, "output");
  expect_close(x.grad(), my_ref_gx, "grad x");
  const int64_t EL = layer.experts_per_rank(), first = layer.first_expert();
  expect_close(layer.w1.grad(), ref.w1.grad().narrow(0, first, EL), "grad w1");
  expect_close(layer.w3.grad(), ref.w3.grad().narrow(0, first, EL), "grad w3");
  expect_close(layer.w2.grad(), ref.w2.grad().narrow(0, first, EL), "grad w2");
  torch::Tensor router_grad = layer.router->weight.grad().clone();
  world.all_reduce(router_grad, comm::ReduceOp::Sum);
  expect_close(router_grad, ref.router->weight.grad(), "grad router (summed over ranks)");
}

std::vector<MoeConfig> parity_configs() {
  MoeConfig capacity = make_cfg(8, 2, "softmax", 1.0);
  capacity.aux_loss_scope = AuxLossScope::Local;
  MoeConfig dropless_local = make_cfg(8, 2, "sigmoid", 0.0);
  dropless_local.aux_loss_scope = AuxLossScope::Local;
  MoeConfig dropless_global = make_cfg(8, 2, "softmax", 0.0);
  MoeConfig capacity_shared = make_cfg(8, 4, "softmax", 0.5);
  capacity_shared.aux_loss_scope = AuxLossScope::Local;
  capacity_shared.shared_experts = 1;
  return {capacity, dropless_local, dropless_global, capacity_shared};
}

}  // namespace

class MoeEpParity : public testing::TestWithParam<int> {};
TEST_P(MoeEpParity, MatchesSingleRankReference) {
  for (const auto& c : parity_configs()) {
    SCOPED_TRACE("cf=" + std::to_string(c.capacity_factor) + " scope=" + std::string(enum_name(c.aux_loss_scope)));
    comm::run_ranks(GetParam(), 30.0, [&](comm::Communicator& w) { body_ep_parity(w, c); });
  }
}
INSTANTIATE_TEST_SUITE_P(World, MoeEpParity, testing::Values(1, 2, 4),
                         [](const testing::TestParamInfo<int>& i) {
                           return "ep" + std::to_string(i.param);
                         });

TEST(MoeEpParity, ExpertsThatReceiveNothingStillTakePart) {
  // Every token prefers expert 0 (rank 0): rank 1's experts get no rows.
  MoeConfig c = make_cfg(4, 1, "softmax", 0.0);
  comm::run_ranks(2, 30.0, [&](comm::Communicator& w) {
    MoELayer layer(c, 8, w, 5);
    {
      torch::NoGradGuard ng;
      layer.router->weight.zero_();
      layer.router->weight[0].fill_(1.0);
    }
    torch::Tensor x = randn_seeded({16, 8}, 9 + w.rank()).abs();
    MoEOutput out = layer.forward(x, false);
    out.y.sum().backward();
    EXPECT_EQ(out.stats.tokens_per_expert[0], 32);
    if (w.rank() == 1) {
      EXPECT_EQ(layer.w1.grad().abs().sum().item<double>(), 0.0);
    }
  });
}

#if MOE_HAVE_MPI
TEST(MpiMoeEpParity, MatchesSingleRankReference) {
  static std::unique_ptr<comm::MpiComm> world;
  auto mpi_world = [&]() -> comm::MpiComm& {
    if (!world) world = comm::MpiComm::world(60.0);
    return *world;
  };
  MOE_REQUIRE_MPI_WORLD(comm::MpiComm::launched_by_mpirun(), mpi_world().size());
  set_current_rank(world->rank());
  for (const auto& c : parity_configs()) body_ep_parity(*world, c);
  world->barrier();
}
#endif
