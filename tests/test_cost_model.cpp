// Cost model: exact FLOP, byte and parameter counts for a small config worked
// out by hand, monotonicity, hardware profiles, the memory estimate against
// measured peak RSS, and the sweep's prediction columns and projection mode.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/core/error.h"
#include "moe/train/cost_model.h"
#include "test_support.h"

using namespace moe;
using moe::testing_support::run_moe;

namespace {

// Hand-checked shapes: per rank T = batch 2 x seq 4 = 8 tokens, D 8, V 16
// (tied), 1 MoE block, 2 heads (hd 4), E 4, k 2, H 6 (swiglu), capacity
// factor 1 -> C = ceil(1 x 8 x 2 / 4) = 4; world 2 = EP 2 (E_local 2).
Config hand_config(std::vector<std::string> extra = {}) {
  std::vector<std::string> ov = {"model.vocab=16",    "model.d_model=8",        "model.layers=1",
                                 "model.heads=2",     "model.d_ff=16",          "model.seq_len=4",
                                 "moe.experts=4",     "moe.top_k=2",            "moe.d_expert=6",
                                 "moe.min_capacity=1", "moe.capacity_factor=1.0", "train.batch=2"};
  ov.insert(ov.end(), extra.begin(), extra.end());
  return default_config(ov);
}

std::string temp_path(const std::string& name) {
  return ::testing::TempDir() + "moe_cost_" + name + "_" + std::to_string(::getpid());
}

}  // namespace

TEST(CostModel, HandCheckedCountsForASmallConfig) {
  const StepCost c = step_cost(hand_config(), 2);
  EXPECT_EQ(c.ep, 2);
  EXPECT_EQ(c.dp, 1);
  EXPECT_EQ(c.tokens_per_rank, 8);
  EXPECT_EQ(c.capacity, 4);
  EXPECT_EQ(c.expert_rows_per_rank, 16);  // T k, every slot kept
  // Forward + backward = 3 x 2 m n k:
  //   qkv 6*8*24*8 = 9216, output 6*8*8*8 = 3072, scores and att.v
  //   2 x 6*(2*2*4)*4*4 = 3072, head 6*8*16*8 = 6144.
  EXPECT_EQ(c.phase("attention_dense").flops(), 9216 + 3072 + 3072 + 6144);
  EXPECT_EQ(c.phase("router").flops(), 6 * 8 * 4 * 8);                   // 1536
  EXPECT_EQ(c.phase("experts").flops(), 2 * 6 * 16 * 6 * 8 + 6 * 16 * 8 * 6);  // w1,w3 + w2
  EXPECT_EQ(c.flops(), 21504 + 1536 + 13824);
  // Padded exchange: E C = 16 rows of 8 floats = 512 bytes each way, half of
  // it (E_local C = 8 rows) to the other rank; the forward and its backward
  // each, plus the fill counts (E int64, E_local of them off-rank).
  EXPECT_EQ(c.phase("dispatch").all_to_all_bytes(), 4 * 8 + 2 * 512);
  EXPECT_EQ(c.phase("dispatch").all_to_all_off_rank_bytes(), 2 * 8 + 2 * 256);
  EXPECT_EQ(c.phase("combine").all_to_all_bytes(), 2 * 512);
  EXPECT_EQ(c.phase("combine").all_to_all_off_rank_bytes(), 2 * 256);
  // Replicated parameters: embedding 128 + final norm 8 + norms 16 + wqkv,
  // wo 256 + router 32 = 440 floats, all-reduced over the world (one
  // partial bucket) plus the squared norm (8 bytes); no expert-DP group.
  EXPECT_EQ(c.phase("grad_sync").all_reduce_bytes(), 440 * 4 + 8);
  // Memory: 440 replicated + 2 local experts x 3 x 8 x 6 = 288 expert floats.
  const MemoryEstimate m = estimate_memory(hand_config(), 2);
  EXPECT_EQ(m.params, (440 + 288) * 4);
  EXPECT_EQ(m.grads, m.params);
  EXPECT_EQ(m.optimizer, 2 * m.params);
  EXPECT_GT(m.activations, 0);
  // MFU numerator: 3 x (2 x active matrix weights 256 + 32 + 3*8*12 + 128
  // + attention 4 S D = 128) per token.
  EXPECT_DOUBLE_EQ(c.train_flops_per_token, 3.0 * (2.0 * 704 + 128));
}

TEST(CostModel, OneRankHasNoExchangesAndDroplessSendsEverySlot) {
  const StepCost one = step_cost(hand_config(), 1);
  EXPECT_EQ(one.phase("dispatch").collectives.size(), 0u);
  EXPECT_EQ(one.phase("grad_sync").collectives.size(), 0u);
  const StepCost dropless = step_cost(hand_config({"moe.capacity_factor=0"}), 2);
  EXPECT_EQ(dropless.capacity, 0);
  // T k = 16 rows of 32 bytes; uniform routing sends half of them off-rank.
  EXPECT_EQ(dropless.phase("combine").all_to_all_bytes(), 2 * 16 * 32);
  EXPECT_EQ(dropless.phase("combine").all_to_all_off_rank_bytes(), 2 * 8 * 32);
  // Drops shrink expert work; imbalance grows the busiest rank's.
  RoutingStats drops;
  drops.drop_frac = 0.25;
  EXPECT_EQ(step_cost(hand_config({"moe.capacity_factor=0"}), 2, drops).expert_rows_per_rank, 12);
  RoutingStats skew;
  skew.load_imbalance = 3.0;  // hottest expert 3x the mean, diluted over 2 local experts
  EXPECT_EQ(step_cost(hand_config({"moe.capacity_factor=0"}), 2, skew).expert_rows_per_rank, 32);
  // In capacity mode the rows never exceed what the buffers hold (E C = 16).
  EXPECT_EQ(step_cost(hand_config(), 2, skew).expert_rows_per_rank, 16);
  RoutingStats bad;
  bad.drop_frac = 1.5;
  EXPECT_THROW(step_cost(hand_config(), 2, bad), ConfigError);
  EXPECT_THROW(step_cost(hand_config(), 3), ConfigError);  // 4 experts over EP 3
}

TEST(CostModel, MoreRanksFewerExpertFlopsPerRankMoreBytesOffRank) {
  // Strong scaling (global batch 16 sequences): per-rank expert work falls.
  int64_t previous = INT64_MAX;
  for (int world : {1, 2, 4, 8}) {
    const Config cfg = hand_config({"moe.experts=8", "train.batch=" + std::to_string(16 / world)});
    const int64_t flops = step_cost(cfg, world).phase("experts").flops();
    EXPECT_LT(flops, previous) << world;
    previous = flops;
  }
  // Weak scaling: a larger EP group sends a larger share of the rows away.
  for (const char* cf : {"moe.capacity_factor=0", "moe.capacity_factor=1.25"}) {
    int64_t off = -1;
    for (int world : {2, 4, 8}) {
      const Config cfg = hand_config({"moe.experts=8", cf});
      const int64_t now = step_cost(cfg, world).phase("dispatch").all_to_all_off_rank_bytes();
      EXPECT_GT(now, off) << cf << " world " << world;
      off = now;
    }
  }
}

TEST(CostModel, PredictionAddsUpAndRespondsToTheHardware) {
  const std::string path = temp_path("hw.yaml");
  std::ofstream(path) << "name: test\nkind: gpu\nranks_per_node: 2\npeak_gflops: 1000\n"
                         "gemm_gflops: [[8, 100], [64, 400]]\nmemory_gbps: 100\n"
                         "op_overhead_us: 1\nintra_node: {gbps: 50, latency_us: 2}\n"
                         "inter_node: {gbps: 5, latency_us: 20}\n";
  const HardwareProfile hw = load_hardware_profile(path);
  EXPECT_DOUBLE_EQ(hw.gemm_rate(4), 100);    // below the table: its first rate
  EXPECT_DOUBLE_EQ(hw.gemm_rate(64), 400);   // at a point
  EXPECT_DOUBLE_EQ(hw.gemm_rate(1e4), 400);  // above: its last rate
  EXPECT_NEAR(hw.gemm_rate(std::sqrt(8.0 * 64.0)), 250, 1e-9);  // halfway in log(size)
  const StepPrediction p2 = predict_step(step_cost(hand_config({"moe.experts=8"}), 2), hw);
  double sum = 0;
  for (const auto& [name, ms] : p2.phase_ms) sum += ms;
  EXPECT_NEAR(sum, p2.step_ms, 1e-9);
  EXPECT_GT(p2.all_to_all_ms, 0);
  EXPECT_GT(p2.mfu, 0);
  EXPECT_LT(p2.mfu, 1);
  // Past one node (2 ranks per node) the exchanges cross the slower link:
  // a larger share of the step.
  const StepPrediction p4 = predict_step(step_cost(hand_config({"moe.experts=8"}), 4), hw);
  EXPECT_GT(p4.all_to_all_ms / p4.step_ms, p2.all_to_all_ms / p2.step_ms);
  // A slower inter-node link only slows the multi-node world.
  HardwareProfile slow = hw;
  slow.inter_node.gbps = 0.5;
  EXPECT_DOUBLE_EQ(predict_step(step_cost(hand_config({"moe.experts=8"}), 2), slow).step_ms,
                   p2.step_ms);
  EXPECT_GT(predict_step(step_cost(hand_config({"moe.experts=8"}), 4), slow).step_ms, p4.step_ms);
  // dump -> load round trip.
  const std::string copy = temp_path("hw_copy.yaml");
  std::ofstream(copy) << dump_hardware_profile(hw, "copy");
  const HardwareProfile back = load_hardware_profile(copy);
  EXPECT_DOUBLE_EQ(predict_step(step_cost(hand_config({"moe.experts=8"}), 4), back).step_ms,
                   p4.step_ms);
}

TEST(CostModel, BadHardwareProfilesAreConfigErrorsNamingTheKey) {
  const std::string base = "name: x\nkind: cpu\npeak_gflops: 1\nmemory_gbps: 1\n";
  struct Case {
    std::string body, needle;
  };
  for (const Case& c : std::vector<Case>{
           {base + "gemm_gflops: 10\nmemry_gbps: 3\n", "did you mean 'memory_gbps'"},
           {"name: x\nkind: cpu\npeak_gflops: 1\ngemm_gflops: 10\n", "'memory_gbps' is required"},
           {base + "gemm_gflops: [[64, 1], [32, 2]]\n", "sizes must increase"},
           {base + "gemm_gflops: [[64]]\n", "[size, GFLOP/s] pairs"},
           {"name: x\nkind: tpu\npeak_gflops: 1\nmemory_gbps: 1\ngemm_gflops: 10\n",
            "'kind' = 'tpu'"},
           {base + "gemm_gflops: -5\n", "'gemm_gflops' = -5"},
           {base + "gemm_gflops: 10\nintra_node: 5\n", "'intra_node' is a mapping"},
       }) {
    const std::string path = temp_path("bad.yaml");
    std::ofstream(path) << c.body;
    try {
      load_hardware_profile(path);
      ADD_FAILURE() << "accepted: " << c.body;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(c.needle), std::string::npos)
          << c.body << " -> " << e.what();
    }
  }
  EXPECT_THROW(load_hardware_profile(temp_path("missing.yaml")), ConfigError);
}

// The estimate is checked against what the process really held: one rank in
// its own process with the caching allocator off (with it on, idle cached
// blocks add up to ~50%), on a config whose activations dominate.
TEST(CostModel, MemoryEstimateMatchesPeakRssGrowth) {
  const std::string dir = temp_path("mem");
  std::string out;
  ASSERT_EQ(run_moe("train " + std::string(MOE_SOURCE_DIR) +
                        "/configs/scaling/small-lm.yaml --ranks 1 train.steps=2 train.batch=32 "
                        "model.seq_len=256 moe.experts=16 --out " + dir,
                    &out, "MOE_CPU_CACHE_MB=0"),
            0)
      << out;
  EXPECT_NE(out.find("memory per rank (estimate): params"), std::string::npos) << out;
  std::ifstream in(dir + "/memory.json");
  const auto m = nlohmann::json::parse(in);
  const double estimate = m["total_bytes"].get<double>();
  const double growth = m["process_peak_rss_bytes"].get<double>() -
                        m["process_rss_at_start_bytes"].get<double>();
  EXPECT_EQ(m["total_bytes"].get<int64_t>(),
            m["params_bytes"].get<int64_t>() + m["grads_bytes"].get<int64_t>() +
                m["optimizer_bytes"].get<int64_t>() + m["activations_bytes"].get<int64_t>());
  EXPECT_GT(growth, 0.8 * estimate) << "estimate " << estimate << " growth " << growth;
  EXPECT_LT(growth, 1.5 * estimate) << "estimate " << estimate << " growth " << growth;
}
