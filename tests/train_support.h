// Helpers of the training suites (test_train.cpp, test_memory.cpp): small
// configs, runs on thread ranks, reading a run's checkpoint and metrics.
#pragma once
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

#include "moe/comm/thread_comm.h"
#include "moe/config/config.h"
#include "moe/parallel/checkpoint.h"
#include "moe/parallel/safetensors.h"
#include "moe/train/trainer.h"

namespace moe::train_support {

inline std::string fresh_dir(const std::string& name) {
  std::string d = testing::TempDir() + "moe_train_" + name + "_" + std::to_string(::getpid());
  std::system(("rm -rf '" + d + "'").c_str());
  return d;
}

// A small model on synthetic data; dropless so the layouts route identically.
inline Config small_config(int64_t world, int64_t ep, int64_t steps, std::vector<std::string> extra = {}) {
  std::vector<std::string> ov = {"model.vocab=32",
                                 "model.d_model=32",
                                 "model.layers=2",
                                 "model.heads=2",
                                 "model.d_ff=64",
                                 "model.seq_len=12",
                                 "moe.experts=4",
                                 "moe.top_k=2",
                                 "moe.d_expert=24",
                                 "moe.capacity_factor=0",
                                 "moe.aux_loss_coef=0",
                                 "moe.z_loss_coef=0.001",
                                 "train.warmup=2",
                                 "train.lr=0.003",
                                 "train.log_every=1000",
                                 "train.steps=" + std::to_string(steps),
                                 "train.batch=" + std::to_string(8 / world),
                                 "parallel.ep=" + std::to_string(ep),
                                 "parallel.dp=" + std::to_string(world / ep)};
  ov.insert(ov.end(), extra.begin(), extra.end());
  return default_config(ov);
}

inline TrainResult run(int world, const Config& cfg, const TrainOptions& opts) {
  TrainResult out;
  comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
    TrainResult r = train(c, cfg, opts);
    if (c.rank() == 0) out = r;
  });
  return out;
}

// Every tensor of a run's final checkpoint, keyed globally (experts from all
// files): parameters, and with `buffers` the router balance biases too.
inline std::map<std::string, torch::Tensor> checkpoint_tensors(const std::string& run_dir,
                                                        bool buffers = false) {
  std::string dir = find_checkpoint(run_dir);
  EXPECT_FALSE(dir.empty()) << run_dir;
  std::map<std::string, torch::Tensor> all;
  for (const char* f : {"shared.safetensors", "experts.ep0.safetensors", "experts.ep1.safetensors",
                        "experts.ep2.safetensors", "experts.ep3.safetensors"}) {
    struct stat st;
    std::string path = dir + "/" + f;
    if (::stat(path.c_str(), &st) != 0) continue;
    for (auto& [k, v] : read_safetensors(path))
      if (k.rfind("param.", 0) == 0 || (buffers && k.rfind("buffer.", 0) == 0)) all[k] = v;
  }
  return all;
}

// Parameters and router balance biases of two runs' final checkpoints agree to `tol`.
inline void expect_same_params(const std::string& a, const std::string& b, double tol) {
  auto ta = checkpoint_tensors(a, true), tb = checkpoint_tensors(b, true);
  ASSERT_EQ(ta.size(), tb.size());
  ASSERT_GT(ta.size(), 10u);
  for (auto& [k, v] : ta) {
    ASSERT_TRUE(tb.count(k)) << k;
    double diff = (v - tb[k]).abs().max().item<double>();
    EXPECT_LE(diff, tol) << k;
  }
}

inline void expect_losses_close(const std::vector<double>& a, const std::vector<double>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], tol) << "step " << i;
}

// One JSON object per line of RUN_DIR/metrics.jsonl.
inline std::vector<nlohmann::json> read_metrics(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

// Per step, the loss and the global gradient norm (before clipping) agree to
// `tol` relative (the norm is what a mis-scaled gradient changes even where
// AdamW's scale invariance hides it in the parameters).
inline void expect_same_steps(const std::string& a, const std::string& b, double tol) {
  auto ma = read_metrics(a), mb = read_metrics(b);
  ASSERT_EQ(ma.size(), mb.size());
  ASSERT_FALSE(ma.empty());
  for (size_t i = 0; i < ma.size(); ++i) {
    const double ga = ma[i]["grad_norm"].get<double>(), gb = mb[i]["grad_norm"].get<double>();
    EXPECT_NEAR(ga, gb, tol * std::max(1.0, std::abs(gb))) << "grad_norm at step " << i + 1;
    EXPECT_NEAR(ma[i]["loss"].get<double>(), mb[i]["loss"].get<double>(), tol)
        << "loss at step " << i + 1;
  }
}

// A run of `world` ranks writing to a fresh directory; returns the directory.
inline std::string run_to_dir(const std::string& name, int world, const Config& cfg) {
  std::string dir = fresh_dir(name);
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  run(world, cfg, o);
  return dir;
}

}  // namespace moe::train_support
