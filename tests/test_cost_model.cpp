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

// train.zero and train.recompute in the estimate and the step cost, by hand.
TEST(CostModel, ZeroAndRecomputeByHand) {
  // World 4 at EP 2 x DP 2: 440 replicated floats (sharded over 4: 110 each),
  // 288 expert floats per EP rank (sharded over its 2 replicas: 144 each).
  const MemoryEstimate base = estimate_memory(hand_config({"parallel.ep=2"}), 4);
  const MemoryEstimate zero = estimate_memory(hand_config({"parallel.ep=2", "train.zero=1"}), 4);
  EXPECT_EQ(base.optimizer, 8 * (440 + 288));
  EXPECT_EQ(zero.optimizer, 8 * (110 + 144));
  EXPECT_EQ(zero.params, base.params);
  EXPECT_EQ(zero.activations, base.activations);
  // Recomputation keeps less once there are a few layers (each keeps its
  // input, and one layer's activations are rebuilt at a time).
  const MemoryEstimate moe = estimate_memory(hand_config({"model.layers=4", "train.recompute=moe"}), 2);
  const MemoryEstimate block = estimate_memory(hand_config({"model.layers=4", "train.recompute=block"}), 2);
  const MemoryEstimate none4 = estimate_memory(hand_config({"model.layers=4"}), 2);
  EXPECT_LT(moe.activations, none4.activations);
  EXPECT_LT(block.activations, none4.activations);
  EXPECT_EQ(block.params, none4.params);

  // Step cost: recompute adds one forward product per recomputed GEMM (the
  // head excepted) and the forward collectives once more.
  const StepCost plain = step_cost(hand_config(), 2);
  const StepCost rb = step_cost(hand_config({"train.recompute=block"}), 2);
  EXPECT_EQ(rb.phase("attention_dense").flops(), (9216 + 3072 + 3072) * 4 / 3 + 6144);
  EXPECT_EQ(rb.phase("experts").flops(), plain.phase("experts").flops() * 4 / 3);
  EXPECT_EQ(rb.phase("router").collectives[0].repeat, 2 * plain.phase("router").collectives[0].repeat);
  EXPECT_EQ(rb.phase("dispatch").collectives[1].repeat,
            plain.phase("dispatch").collectives[1].repeat * 3 / 2);
  const StepCost rm = step_cost(hand_config({"train.recompute=moe"}), 2);
  EXPECT_EQ(rm.phase("attention_dense").flops(), plain.phase("attention_dense").flops());
  EXPECT_EQ(rm.phase("experts").flops(), rb.phase("experts").flops());

  // zero 1: reduce-scatter + all-gather of the padded flat buffers instead of all-reduce.
  const StepCost z = step_cost(hand_config({"parallel.ep=2", "train.zero=1"}), 4);
  EXPECT_EQ(z.phase("grad_sync").all_reduce_bytes(), 8);  // the squared norm only
  int64_t scattered = 0, gathered = 0;
  for (const auto& c : z.phase("grad_sync").collectives)
    if (c.kind == "reduce_scatter") scattered += c.bytes;
  for (const auto& c : z.phase("optimizer").collectives)
    if (c.kind == "all_gather") gathered += c.bytes;
  EXPECT_EQ(scattered, (440 + 288) * 4);
  EXPECT_EQ(gathered, scattered);
  const HardwareProfile hw = load_hardware_profile(std::string(MOE_SOURCE_DIR) + "/configs/hardware/h100-8x-nvlink.yaml");
  EXPECT_GT(predict_step(z, hw).step_ms, 0);
}

TEST(CostModel, GroupedQueryAttentionShrinksKAndV) {
  // kv_heads 1 of 2 heads: k and v are 4 wide instead of 8, so wqkv is
  // [8, 16] (128 floats, not 192) and its products shrink by a third.
  const Config gqa = hand_config({"model.kv_heads=1"});
  const StepCost c = step_cost(gqa, 2);
  EXPECT_EQ(c.phase("attention_dense").flops(), 6 * 8 * 16 * 8 + 3072 + 3072 + 6144);
  EXPECT_EQ(c.phase("grad_sync").all_reduce_bytes(), (440 - 64) * 4 + 8);
  EXPECT_EQ(estimate_memory(gqa, 2).params, (440 - 64 + 288) * 4);
  EXPECT_DOUBLE_EQ(c.train_flops_per_token, 3.0 * (2.0 * (704 - 64) + 128));
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

// predict_step against figures worked out by hand, term by term, on a
// synthetic step cost (the phases and numbers chosen so each term is easy
// to compute) and a synthetic profile.
TEST(CostModel, PredictionMatchesHandComputedFigures) {
  HardwareProfile hw;
  hw.kind = "gpu";
  hw.ranks_per_node = 2;
  hw.peak_gflops = 1000;
  hw.gemm_gflops = {{8, 100}, {64, 400}};
  hw.expert_gemm_efficiency = 0.5;
  hw.memory_gbps = 100;
  hw.stream_gbps = 20;
  hw.cache_gbps = 80;
  hw.cache_mib = 1;
  hw.transcendental_gelems = 1;
  hw.op_overhead_us = 1;
  hw.intra_node = {50, 2};
  hw.inter_node = {5, 20};
  hw.has_inter_node = true;
  StepCost cost;
  cost.world = 2;
  cost.ep = 2;
  cost.tokens_per_rank = 100;
  cost.train_flops_per_token = 1e6;
  PhaseCost router;  // 3000 transcendentals at 1 G/s = 3 us; 2 ops = 2 us
  router.name = "router";
  router.transcendentals = 3000;
  router.ops = 2;
  PhaseCost experts;  // 4 products of 64x64x64 (m = 256 over 4 groups): size 64 -> 400 GFLOP/s
  experts.name = "experts";
  experts.gemms.push_back({256, 64, 64, 4, 1});
  experts.memory_bytes = 1000000;  // strided (not streaming): 1e6 B / 100 GB/s = 10 us
  experts.ops = 5;                 // 5 us
  PhaseCost dispatch;  // all_to_all x2 within the node: 2 x (2 us + 1e6 B / 50 GB/s) = 44 us
  dispatch.name = "dispatch";
  dispatch.collectives.push_back({"all_to_all", 2, 2000000, 1000000, 2});
  PhaseCost grad_sync;  // ring all-reduce of 1e6 B over 2: moves 1e6 B, 2 latency steps = 24 us
  grad_sync.name = "grad_sync";
  grad_sync.collectives.push_back({"all_reduce", 2, 1000000, 0, 1});
  PhaseCost optimizer;  // streaming 4e6 B over a 4 MiB working set, a quarter of it in the
  optimizer.name = "optimizer";  // 1 MiB cache: 1e6 / 80 GB/s + 3e6 / 20 GB/s = 12.5 + 150 us
  optimizer.memory_bytes = 4000000;
  optimizer.streaming = true;
  optimizer.working_set_bytes = 4 * 1048576;
  cost.phases = {router, experts, dispatch, grad_sync, optimizer};
  // experts GEMMs: 6 x 256 x 64 x 64 = 6291456 FLOPs at 400 x 0.5 GFLOP/s = 31.45728 us.
  const double want_us[] = {5.0, 31.45728 + 10 + 5, 44.0, 24.0, 162.5};
  const StepPrediction p = predict_step(cost, hw);
  ASSERT_EQ(p.phase_ms.size(), 5u);
  double total_us = 0;
  for (size_t i = 0; i < 5; ++i) {
    EXPECT_EQ(p.phase_ms[i].first, cost.phases[i].name);
    EXPECT_NEAR(p.phase_ms[i].second * 1e3, want_us[i], 1e-6) << cost.phases[i].name;
    total_us += want_us[i];
  }
  EXPECT_NEAR(p.step_ms * 1e3, total_us, 1e-6);  // 281.95728 us
  EXPECT_NEAR(p.all_to_all_ms * 1e3, 44.0, 1e-6);
  EXPECT_NEAR(p.tokens_per_s, 200 / (total_us * 1e-6), 1e-3);
  EXPECT_NEAR(p.mfu, p.tokens_per_s * 1e6 / (2 * 1000e9), 1e-12);  // gpu peak x 2 ranks
  // 2-byte activations: the exchange and the experts' strided bytes halve
  // (1e6 / 2 / 50 GB/s = 10 us per call; 5 us), the optimizer's fp32 bytes do not.
  HardwareProfile bf16 = hw;
  bf16.activation_bytes = 2;
  const StepPrediction h = predict_step(cost, bf16);
  EXPECT_NEAR(h.phase_ms[1].second * 1e3, 31.45728 + 5 + 5, 1e-6);
  EXPECT_NEAR(h.phase_ms[2].second * 1e3, 2 * (2 + 10), 1e-6);
  EXPECT_NEAR(h.phase_ms[4].second * 1e3, 162.5, 1e-6);
  // World 4 over 2-rank nodes: 2 of the 3 peers are off the node. The
  // exchange's off-rank 1e6 B: 2/3 over the inter-node link (6.67e5 B / 5 GB/s
  // = 133.33 us, slower than the intra-node third), plus its 20 us latency.
  // The all-reduce spans nodes: 2 x 3/4 x 1e6 B / 5 GB/s + 2 x 2 steps x 20 us = 380 us.
  StepCost wide = cost;
  wide.world = 4;
  wide.phases[2].collectives[0].group = 4;
  wide.phases[3].collectives[0].group = 4;
  const StepPrediction w = predict_step(wide, hw);
  EXPECT_NEAR(w.phase_ms[2].second * 1e3, 2 * (20 + 1e6 * 2 / 3 / 5e9 * 1e6), 1e-6);
  EXPECT_NEAR(w.phase_ms[3].second * 1e3, 1.5e6 / 5e9 * 1e6 + 4 * 20, 1e-6);
  // A CPU node of 4 cores with 2 ranks: each rank's GEMMs get 2 cores, a
  // speedup of 1 + (4 - 1) x (2 - 1) / (4 - 1) = 2 with multicore_gemm_speedup 4.
  // With 1 core and 2 ranks, everything takes turns: every phase doubles.
  HardwareProfile cpu = hw;
  cpu.kind = "cpu";
  cpu.cores_per_node = 4;
  cpu.multicore_gemm_speedup = 4;
  EXPECT_NEAR(predict_step(cost, cpu).phase_ms[1].second * 1e3, 31.45728 / 2 + 10 + 5, 1e-6);
  cpu.cores_per_node = 1;
  const StepPrediction shared = predict_step(cost, cpu);
  for (size_t i = 0; i < 5; ++i)
    EXPECT_NEAR(shared.phase_ms[i].second * 1e3, 2 * want_us[i], 1e-6) << cost.phases[i].name;
  EXPECT_NEAR(shared.mfu, shared.tokens_per_s * 1e6 / (1000e9 * 1), 1e-12);  // 1 core x 1 node
}

TEST(CostModel, PredictionRespondsToTheHardware) {
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
