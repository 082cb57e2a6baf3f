// Memory at scale: the distributed optimizer (train.zero 1) against the
// replicated one, resharding its checkpoints, activation recomputation
// (train.recompute) against none, and the start-up memory guard.
#include <gtest/gtest.h>
#include <torch/nn/functional/loss.h>

#include <cmath>
#include <fstream>
#include <map>
#include <string>

#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/config/config.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/model/transformer.h"
#include "moe/parallel/optimizer.h"
#include "moe/train/cost_model.h"
#include "moe/train/data.h"
#include "test_support.h"
#include "train_support.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

using namespace moe;
using namespace moe::train_support;

namespace {

// Parameters of two final checkpoints agree to `rel`: |a - b| <= rel |b| per tensor (L2).
void expect_params_relatively_close(const std::string& a, const std::string& b, double rel) {
  auto ta = checkpoint_tensors(a, true), tb = checkpoint_tensors(b, true);
  ASSERT_EQ(ta.size(), tb.size());
  ASSERT_GT(ta.size(), 10u);
  for (auto& [k, v] : ta) {
    ASSERT_TRUE(tb.count(k)) << k;
    const double norm = std::max(1e-6, tb[k].to(torch::kFloat64).norm().item<double>());
    EXPECT_LE((v - tb[k]).to(torch::kFloat64).norm().item<double>(), rel * norm) << k;
  }
}

void expect_losses_relatively_close(const std::vector<double>& a, const std::vector<double>& b,
                                    double rel) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], rel * std::abs(b[i])) << "step " << i;
}

struct ZeroCase {
  int world, ep;
};
void PrintTo(const ZeroCase& c, std::ostream* os) {
  *os << "ep " << c.ep << " x dp " << c.world / c.ep;
}

}  // namespace

// ---- distributed optimizer ------------------------------------------------------

class TrainZero : public testing::TestWithParam<ZeroCase> {};

// 20 fp32 steps with weight decay and clipping: zero 1 follows zero 0 (LibTorch's
// AdamW) to rounding, in losses, gradient norms and every parameter.
TEST_P(TrainZero, ShardedOptimizerMatchesReplicated) {
  const ZeroCase c = GetParam();
  const std::vector<std::string> common = {"train.clip=0.5", "train.weight_decay=0.1"};
  auto with = [&](const char* zero) {
    std::vector<std::string> ov = common;
    ov.push_back(zero);
    return small_config(c.world, c.ep, 20, ov);
  };
  TrainOptions o;
  o.quiet = true;
  const std::string tag = std::to_string(c.ep) + "x" + std::to_string(c.world / c.ep);
  o.out_dir = fresh_dir("zero0_" + tag);
  TrainResult replicated = run(c.world, with("train.zero=0"), o);
  const std::string replicated_dir = o.out_dir;
  o.out_dir = fresh_dir("zero1_" + tag);
  TrainResult sharded = run(c.world, with("train.zero=1"), o);
  ASSERT_EQ(sharded.losses.size(), 20u);
  expect_losses_relatively_close(sharded.losses, replicated.losses, 1e-6);
  expect_same_steps(o.out_dir, replicated_dir, 1e-6);
  expect_params_relatively_close(o.out_dir, replicated_dir, 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Layouts, TrainZero,
                         testing::Values(ZeroCase{4, 2}, ZeroCase{4, 1}, ZeroCase{4, 4}));

// Moments per rank shrink with the group they are sharded over: replicated
// parameters over the world, experts over their expert-DP group.
TEST(TrainZero, MomentBytesShrinkWithTheDataParallelSize) {
  auto state_bytes = [](int world, int ep, int zero) {
    const Config cfg = small_config(world, ep, 1, {"train.zero=" + std::to_string(zero)});
    int64_t bytes = 0;
    comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
      comm::ProcessMesh mesh(c, ep, world / ep);
      TransformerLM model(cfg, mesh.ep_group(), 7);
      auto opt = make_optimizer(model, mesh, cfg.train, cfg.parallel.grad_bucket_mb);
      opt->zero_grad();
      opt->synchronize_and_clip(0);
      opt->step(1e-3);
      if (c.rank() == 0) bytes = opt->state_bytes();
    });
    return bytes;
  };
  const int64_t full = state_bytes(1, 1, 0);
  ASSERT_GT(full, 1000);
  EXPECT_EQ(state_bytes(1, 1, 1), full);  // one rank: nothing to shard (no padding)
  for (int dp : {2, 4}) {
    SCOPED_TRACE("dp " + std::to_string(dp));
    const int64_t sharded = state_bytes(dp, 1, 1);
    EXPECT_GE(sharded, full / dp);
    EXPECT_LE(sharded, full / dp + 2 * 8 * dp);  // padding: < one element per rank and group
    EXPECT_EQ(state_bytes(dp, 1, 0), full);
  }
}

// A checkpoint saved at one (EP, DP, zero) resumes at another and continues
// as the uninterrupted run.
TEST(TrainZero, CheckpointsReshardAcrossDpEpAndZero) {
  struct Leg {
    int world, ep, zero;
  };
  struct Case {
    Leg saved;
    std::vector<Leg> resumed;
  };
  const std::vector<Case> cases = {
      {{4, 1, 1}, {{2, 1, 1}, {4, 1, 0}, {1, 1, 1}}},  // DP 4 -> DP 2, zero 1 -> 0
      {{4, 1, 0}, {{4, 1, 1}}},                        // zero 0 -> 1
      {{4, 4, 1}, {{2, 2, 1}, {4, 2, 1}}},             // EP 4 -> EP 2
  };
  auto cfg_of = [](const Leg& l) {
    return small_config(l.world, l.ep, 6, {"train.ckpt_every=3", "train.zero=" + std::to_string(l.zero)});
  };
  for (const Case& c : cases) {
    const std::string name = "reshard_" + std::to_string(c.saved.ep) + "x" +
                             std::to_string(c.saved.world / c.saved.ep) + "_z" +
                             std::to_string(c.saved.zero);
    std::string dir = fresh_dir(name);
    TrainOptions o;
    o.quiet = true;
    o.out_dir = dir;
    TrainResult full = run(c.saved.world, cfg_of(c.saved), o);
    std::system(("rm -rf '" + dir + "/checkpoints/step_00000006'").c_str());
    for (const Leg& l : c.resumed) {
      const std::string to = "ep" + std::to_string(l.ep) + "_dp" + std::to_string(l.world / l.ep) +
                             "_zero" + std::to_string(l.zero);
      SCOPED_TRACE(name + " resumed at " + to);
      std::string copy = fresh_dir(name + "_" + to);
      std::system(("cp -r '" + dir + "' '" + copy + "'").c_str());
      TrainOptions r = o;
      r.out_dir = r.resume_dir = copy;
      TrainResult resumed = run(l.world, cfg_of(l), r);
      EXPECT_EQ(resumed.first_step, 3);
      ASSERT_EQ(resumed.losses.size(), 3u);
      for (int i = 0; i < 3; ++i) EXPECT_NEAR(resumed.losses[i], full.losses[3 + i], 1e-5);
    }
  }
}

// Pieces of a sharded checkpoint that do not tile their unit are a typed error.
TEST(TrainZero, MissingOptimizerShardIsACheckpointError) {
  std::string dir = fresh_dir("zero_missing_shard");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  const Config cfg = small_config(2, 1, 2, {"train.zero=1"});
  run(2, cfg, o);
  const std::string ckpt = find_checkpoint(dir);
  ASSERT_FALSE(ckpt.empty());
  // Drop rank 1's shard and its manifest entry (the checksum check would catch a plain delete).
  std::system(("rm '" + ckpt + "/optim.rank1.safetensors'").c_str());
  std::ifstream in(ckpt + "/manifest.json");
  nlohmann::json m;
  in >> m;
  in.close();
  m["files"].erase("optim.rank1.safetensors");
  std::ofstream(ckpt + "/manifest.json") << m.dump(2);
  o.resume_dir = dir;
  Config more = cfg;
  more.train.steps = 3;
  EXPECT_THROW_MSG(run(2, more, o), CheckpointError, "optim.rank*.safetensors");
}

// ---- activation recomputation ---------------------------------------------------

namespace {

// Every parameter gradient after one forward/backward on `world` thread
// ranks (rank 0's), in `mode`. Router noise, jitter and capacity drops on,
// so recomputation must replay random and data-dependent choices.
std::map<std::string, torch::Tensor> gradients(int world, int ep, Recompute mode,
                                               const std::string& dtype = "float32") {
  const Config cfg = small_config(world, ep, 1,
                                  {"moe.router_noise_std=0.3", "moe.router_jitter=0.05",
                                   "moe.capacity_factor=1.0", "moe.aux_loss_coef=0.01",
                                   "model.moe_every=1", "train.dtype=" + dtype});
  std::map<std::string, torch::Tensor> grads;
  comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
    comm::ProcessMesh mesh(c, ep, world / ep);
    TransformerLM model(cfg, mesh.ep_group(), 11);
    model.set_compute_dtype(dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat32);
    model.set_recompute(mode);
    auto data = make_data_source(cfg, c.rank(), world);
    const Batch b = data->batch(0, 0, cfg.train.batch);
    LMOutput out = model.forward(b.inputs, /*training=*/true, 5);
    torch::Tensor lm = torch::nn::functional::cross_entropy(out.logits.view({-1, cfg.model.vocab}),
                                                            b.targets.view({-1}));
    (lm + out.aux_loss + out.z_loss).backward();
    if (c.rank() == 0)
      for (const auto& p : model.named_parameters())
        grads[p.key()] = p.value().grad().defined() ? p.value().grad().clone() : torch::Tensor();
  });
  return grads;
}

void expect_bitwise_equal(const std::map<std::string, torch::Tensor>& a,
                          const std::map<std::string, torch::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, g] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    ASSERT_EQ(g.defined(), b.at(k).defined()) << k;
    if (g.defined()) {
      EXPECT_TRUE(torch::equal(g, b.at(k))) << k;
    }
  }
}

}  // namespace

TEST(TrainRecompute, MoeAndBlockGiveBitwiseTheGradientsOfNone) {
  for (auto [world, ep] : {std::pair{1, 1}, std::pair{2, 2}, std::pair{4, 2}}) {
    SCOPED_TRACE("world " + std::to_string(world) + " ep " + std::to_string(ep));
    const auto none = gradients(world, ep, Recompute::None);
    size_t nonzero = 0;
    for (const auto& [k, g] : none) nonzero += g.defined() && g.abs().sum().item<double>() > 0;
    EXPECT_GT(nonzero, none.size() / 2);  // the comparison has something to compare
    for (Recompute mode : {Recompute::Moe, Recompute::Block}) {
      SCOPED_TRACE(enum_name(mode));
      expect_bitwise_equal(gradients(world, ep, mode), none);
    }
  }
}

// The layers do run again in backward (so the bitwise checks above compare
// two different executions): the MoE forward phases accrue time during
// backward with recompute and not without.
TEST(TrainRecompute, RecomputedLayersRunTheirForwardAgainInBackward) {
  const Config cfg = small_config(1, 1, 1);
  for (Recompute mode : {Recompute::None, Recompute::Moe, Recompute::Block}) {
    SCOPED_TRACE(enum_name(mode));
    comm::run_ranks(1, 60.0, [&](comm::Communicator& c) {
      comm::ProcessMesh mesh(c, 1, 1);
      TransformerLM model(cfg, mesh.ep_group(), 3);
      model.set_recompute(mode);
      auto data = make_data_source(cfg, 0, 1);
      const Batch b = data->batch(0, 0, cfg.train.batch);
      LMOutput out = model.forward(b.inputs, /*training=*/true, 1);
      const double after_forward = model.moe_layers()[0]->times().forward[PhaseTimes::Experts];
      EXPECT_GT(after_forward, 0);
      torch::nn::functional::cross_entropy(out.logits.view({-1, cfg.model.vocab}),
                                           b.targets.view({-1}))
          .backward();
      const double after_backward = model.moe_layers()[0]->times().forward[PhaseTimes::Experts];
      if (mode == Recompute::None)
        EXPECT_EQ(after_backward, after_forward);
      else
        EXPECT_GT(after_backward, after_forward);
    });
  }
}

TEST(TrainRecompute, Bfloat16ComputeToo) {
  const auto none = gradients(2, 2, Recompute::None, "bfloat16");
  expect_bitwise_equal(gradients(2, 2, Recompute::Block, "bfloat16"), none);
}

// Whole runs: losses, gradient norms and parameters bitwise equal over steps.
TEST(TrainRecompute, TrainingRunsAreBitwiseEqual) {
  const std::string none = run_to_dir("recompute_none", 2, small_config(2, 2, 4));
  for (const char* mode : {"moe", "block"}) {
    SCOPED_TRACE(mode);
    const std::string dir = run_to_dir(std::string("recompute_") + mode, 2,
                                       small_config(2, 2, 4, {std::string("train.recompute=") + mode}));
    expect_same_steps(dir, none, 0.0);
    expect_same_params(dir, none, 0.0);
  }
}

// ---- memory guard -----------------------------------------------------------------

// Tens of terabytes per rank: refused with exit 2 before the model is
// allocated, naming the estimate, the limit and the knobs.
const char* kHugeModel =
    "model.d_model=8192 model.heads=64 model.layers=32 model.seq_len=256 moe.experts=64 "
    "moe.top_k=2 moe.d_expert=16384";

TEST(TrainMemoryGuard, ConfigThatCannotFitIsRefusedBeforeAllocating) {
  std::string out;
  const int rc = testing_support::run_moe(std::string("train ") + MOE_SOURCE_DIR +
                                              "/configs/tiny.yaml " + kHugeModel + " --ranks 2",
                                          &out);
  EXPECT_EQ(rc, 2) << out;
  for (const char* needle : {"memory guard", "per rank", "MemAvailable", "train.zero=1",
                             "train.recompute=block", "train.memory_guard=false"})
    EXPECT_NE(out.find(needle), std::string::npos) << needle << "\n" << out;
  EXPECT_EQ(out.find("bad_alloc"), std::string::npos) << out;
}

TEST(TrainMemoryGuard, FittingConfigsStartAndTheEstimateCountsZeroAndRecompute) {
  // The estimate in memory.json follows the settings the run used.
  const std::string dir = fresh_dir("guard_fits");
  std::string out;
  ASSERT_EQ(testing_support::run_moe(std::string("train ") + MOE_SOURCE_DIR +
                                         "/configs/tiny.yaml train.steps=2 train.zero=1 "
                                         "train.recompute=moe --ranks 2 --out " + dir,
                                     &out),
            0)
      << out;
  std::ifstream in(dir + "/memory.json");
  nlohmann::json mem;
  in >> mem;
  EXPECT_EQ(mem["zero"].get<int>(), 1);
  EXPECT_EQ(mem["recompute"].get<std::string>(), "moe");
  const Config cfg = load_config(std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml",
                                 {"train.zero=1", "train.recompute=moe"});
  EXPECT_EQ(mem["optimizer_bytes"].get<int64_t>(), estimate_memory(cfg, 2).optimizer);
  // Rank 0's shards: within padding of the estimate.
  EXPECT_NEAR(double(mem["optimizer_state_bytes_rank0"].get<int64_t>()),
              double(estimate_memory(cfg, 2).optimizer), 64.0);
}

// ---- under mpirun ---------------------------------------------------------------

#if MOE_HAVE_MPI
namespace {
// A directory every process names alike: rank 0's pid, broadcast.
std::string shared_dir(comm::Communicator& world, const std::string& name) {
  torch::Tensor pid = torch::tensor({static_cast<int64_t>(::getpid())});
  world.broadcast(pid, 0);
  const std::string d =
      testing::TempDir() + "moe_mpi_" + name + "_" + std::to_string(pid.item<int64_t>());
  if (world.rank() == 0) std::system(("rm -rf '" + d + "'").c_str());
  world.barrier();
  return d;
}
}  // namespace

// Under mpirun -np 4 at EP 2 x DP 2: zero 1 matches zero 0; recompute moe and
// block match none bitwise; a zero-1 checkpoint resumes at zero 0.
TEST(MpiTrainMemory, ZeroAndRecomputeAtEp2Dp2) {
  std::unique_ptr<comm::MpiComm> world;
  MOE_REQUIRE_MPI_WORLD(comm::MpiComm::launched_by_mpirun(),
                        (world = comm::MpiComm::world(60.0))->size());
  set_current_rank(world->rank());
  ASSERT_EQ(world->size(), 4);
  TrainOptions o;
  o.quiet = true;
  auto train_in = [&](const std::string& name, std::vector<std::string> ov) {
    ov.push_back("train.ckpt_every=5");
    o.out_dir = shared_dir(*world, name);
    TrainResult r = train(*world, small_config(4, 2, 10, ov), o);
    world->barrier();
    return std::pair{r, o.out_dir};
  };
  auto [zero0, zero0_dir] = train_in("zero0", {"train.zero=0"});
  auto [zero1, zero1_dir] = train_in("zero1", {"train.zero=1"});
  expect_losses_relatively_close(zero1.losses, zero0.losses, 1e-6);
  if (world->rank() == 0) {
    expect_same_steps(zero1_dir, zero0_dir, 1e-6);
    expect_params_relatively_close(zero1_dir, zero0_dir, 1e-6);
  }
  for (const char* mode : {"moe", "block"}) {
    SCOPED_TRACE(mode);
    auto [r, dir] = train_in(std::string("recompute_") + mode,
                             {"train.zero=0", std::string("train.recompute=") + mode});
    ASSERT_EQ(r.losses.size(), zero0.losses.size());
    for (size_t i = 0; i < r.losses.size(); ++i) EXPECT_EQ(r.losses[i], zero0.losses[i]) << i;
    if (world->rank() == 0) expect_same_params(dir, zero0_dir, 0.0);
  }
  // Resume the zero-1 run's step-5 checkpoint at zero 0.
  if (world->rank() == 0)
    std::system(("rm -rf '" + zero1_dir + "/checkpoints/step_00000010'").c_str());
  world->barrier();
  o.out_dir = o.resume_dir = zero1_dir;
  TrainResult resumed = train(*world, small_config(4, 2, 10, {"train.zero=0"}), o);
  ASSERT_EQ(resumed.losses.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(resumed.losses[i], zero1.losses[5 + i], 1e-5);
  world->barrier();
}
#endif
