// Training tests: EP x DP parity against one rank on the concatenated global
// batch, resume (bitwise and resharded), crash safety, learning, bad input.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <nlohmann/json.hpp>

#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/parallel/checkpoint.h"
#include "moe/parallel/safetensors.h"
#include "moe/train/trainer.h"
#include "test_support.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

using namespace moe;

namespace {

std::string fresh_dir(const std::string& name) {
  std::string d = testing::TempDir() + "moe_train_" + name + "_" + std::to_string(::getpid());
  std::system(("rm -rf '" + d + "'").c_str());
  return d;
}

// A small model on synthetic data; dropless so the layouts route identically.
Config small_config(int64_t world, int64_t ep, int64_t steps, std::vector<std::string> extra = {}) {
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

TrainResult run(int world, const Config& cfg, const TrainOptions& opts) {
  TrainResult out;
  comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
    TrainResult r = train(c, cfg, opts);
    if (c.rank() == 0) out = r;
  });
  return out;
}

// Every tensor of a run's final checkpoint, keyed globally (experts from all files).
std::map<std::string, torch::Tensor> checkpoint_tensors(const std::string& run_dir) {
  std::string dir = find_checkpoint(run_dir);
  EXPECT_FALSE(dir.empty()) << run_dir;
  std::map<std::string, torch::Tensor> all;
  for (const char* f : {"shared.safetensors", "experts.ep0.safetensors", "experts.ep1.safetensors",
                        "experts.ep2.safetensors", "experts.ep3.safetensors"}) {
    struct stat st;
    std::string path = dir + "/" + f;
    if (::stat(path.c_str(), &st) != 0) continue;
    for (auto& [k, v] : read_safetensors(path))
      if (k.rfind("param.", 0) == 0) all[k] = v;
  }
  return all;
}

void expect_same_params(const std::string& a, const std::string& b, double tol) {
  auto ta = checkpoint_tensors(a), tb = checkpoint_tensors(b);
  ASSERT_EQ(ta.size(), tb.size());
  ASSERT_GT(ta.size(), 10u);
  for (auto& [k, v] : ta) {
    ASSERT_TRUE(tb.count(k)) << k;
    double diff = (v - tb[k]).abs().max().item<double>();
    EXPECT_LE(diff, tol) << k;
  }
}

void expect_losses_close(const std::vector<double>& a, const std::vector<double>& b, double tol) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], tol) << "step " << i;
}

struct Layout {
  int world, ep;
};

}  // namespace

class TrainParity : public testing::TestWithParam<Layout> {};

// The DeepSpeed #5618 class of bug (expert gradients scaled by the DP size
// instead of the world) makes this fail at every layout with dp > 1.
TEST_P(TrainParity, MatchesOneRankOnTheConcatenatedBatch) {
  const Layout l = GetParam();
  std::string ref_dir = fresh_dir("ref"), dir = fresh_dir("par");
  TrainOptions quiet;
  quiet.quiet = true;
  TrainOptions ro = quiet, po = quiet;
  ro.out_dir = ref_dir;
  po.out_dir = dir;
  TrainResult ref = run(1, small_config(1, 1, 5), ro);
  TrainResult par = run(l.world, small_config(l.world, l.ep, 5), po);
  expect_losses_close(par.losses, ref.losses, 1e-5);
  expect_same_params(dir, ref_dir, 1e-4);
}
INSTANTIATE_TEST_SUITE_P(Layouts, TrainParity,
                         testing::Values(Layout{4, 2}, Layout{4, 4}, Layout{4, 1}, Layout{2, 2}),
                         [](const testing::TestParamInfo<Layout>& i) {
                           return "ep" + std::to_string(i.param.ep) + "_dp" +
                                  std::to_string(i.param.world / i.param.ep);
                         });

TEST(TrainParityAux, GlobalAuxLossAtFullEp) {
  // With dp = 1 the EP group is the world, so global aux statistics equal the reference's.
  std::vector<std::string> aux = {"moe.aux_loss_coef=0.05", "moe.bias_update_rate=0.01"};
  TrainOptions q;
  q.quiet = true;
  TrainResult ref = run(1, small_config(1, 1, 5, aux), q);
  TrainResult par = run(4, small_config(4, 4, 5, aux), q);
  expect_losses_close(par.losses, ref.losses, 1e-5);
}

TEST(TrainResume, BitwiseAtTheSameLayout) {
  std::string dir = fresh_dir("resume");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  Config cfg = small_config(2, 2, 6, {"train.ckpt_every=3"});
  TrainResult full = run(2, cfg, o);
  ASSERT_EQ(full.losses.size(), 6u);
  std::system(("rm -rf '" + dir + "/checkpoints/step_00000006'").c_str());
  o.resume_dir = dir;
  TrainResult resumed = run(2, cfg, o);
  EXPECT_EQ(resumed.first_step, 3);
  ASSERT_EQ(resumed.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], full.losses[3 + i]) << "step " << 3 + i;
}

TEST(TrainResume, ReshardedFromEp4ToEp2AndEp1) {
  std::string dir = fresh_dir("reshard");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  TrainResult full = run(4, small_config(4, 4, 6, {"train.ckpt_every=3"}), o);
  std::system(("rm -rf '" + dir + "/checkpoints/step_00000006'").c_str());
  for (Layout l : {Layout{2, 2}, Layout{1, 1}}) {
    SCOPED_TRACE("resume at ep " + std::to_string(l.ep));
    std::string copy = fresh_dir("reshard_ep" + std::to_string(l.ep));
    std::system(("cp -r '" + dir + "' '" + copy + "'").c_str());
    TrainOptions r = o;
    r.out_dir = r.resume_dir = copy;
    TrainResult resumed = run(l.world, small_config(l.world, l.ep, 6, {"train.ckpt_every=3"}), r);
    EXPECT_EQ(resumed.first_step, 3);
    ASSERT_EQ(resumed.losses.size(), 3u);
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(resumed.losses[i], full.losses[3 + i], 1e-5);
  }
}

TEST(TrainCheckpoint, CrashDuringWriteKeepsThePreviousCheckpoint) {
  std::string dir = fresh_dir("crash");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  Config cfg = small_config(2, 2, 6, {"train.ckpt_every=3"});
  set_checkpoint_crash_for_test(2);  // the step-6 save dies after its temporary files
  EXPECT_THROW(run(2, cfg, o), CheckpointError);
  set_checkpoint_crash_for_test(0);
  struct stat st;
  EXPECT_EQ(::stat((dir + "/checkpoints/step_00000006.tmp").c_str(), &st), 0)
      << "temporary files were written";
  EXPECT_EQ(find_checkpoint(dir), dir + "/checkpoints/step_00000003");
  o.resume_dir = dir;
  TrainResult resumed = run(2, cfg, o);
  EXPECT_EQ(resumed.first_step, 3);
  EXPECT_EQ(resumed.losses.size(), 3u);
}

TEST(TrainCheckpoint, CorruptOrMismatchedCheckpointsAreTypedErrors) {
  std::string dir = fresh_dir("corrupt");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  Config cfg = small_config(1, 1, 2);
  run(1, cfg, o);
  o.resume_dir = dir;
  // Wrong expert count.
  try {
    run(1, small_config(1, 1, 4, {"moe.experts=8"}), o);
    FAIL() << "no CheckpointError";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("moe.experts = 8"), std::string::npos) << e.what();
  }
  // Flip a byte: the checksum catches it and no valid checkpoint remains.
  std::string file = dir + "/checkpoints/step_00000002/shared.safetensors";
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x7f');
  }
  try {
    run(1, small_config(1, 1, 4), o);
    FAIL() << "no CheckpointError";
  } catch (const CheckpointError& e) {
    EXPECT_NE(std::string(e.what()).find("shared.safetensors fails its checksum"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(read_safetensors(dir + "/nonexistent.safetensors"), CheckpointError);
}

TEST(TrainLearning, TinyConfigLossFalls) {
  Config cfg = load_config(std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml");
  TrainOptions o;
  o.quiet = true;
  TrainResult r = run(2, cfg, o);
  ASSERT_EQ(static_cast<int64_t>(r.losses.size()), cfg.train.steps);
  double first = r.losses.front(), last = r.losses.back();
  EXPECT_LT(last, first - 0.5) << "loss " << first << " -> " << last;
}

TEST(TrainBadInput, MissingDataAndBadLayouts) {
  TrainOptions o;
  o.quiet = true;
  Config text =
      small_config(1, 1, 2, {"data.kind=text", "data.path=/nonexistent/corpus", "model.vocab=256"});
  try {
    run(1, text, o);
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/corpus"), std::string::npos) << e.what();
  }
  std::string tiny_file = fresh_dir("short") + ".txt";
  std::ofstream(tiny_file) << "too short";
  Config short_text =
      small_config(1, 1, 2, {"data.kind=text", "data.path=" + tiny_file, "model.vocab=256"});
  EXPECT_THROW(run(1, short_text, o), DataError);
  EXPECT_THROW(run(3, small_config(1, 1, 2, {"parallel.ep=0", "parallel.dp=0"}), o),
               ConfigError);  // 4 experts, ep 3
}

using moe::testing_support::run_moe;

TEST(TrainCli, CheckpointInfoExportImportRoundTrip) {
  std::string dir = fresh_dir("cli"), dir2 = fresh_dir("cli_import"),
              file = fresh_dir("cli") + ".safetensors";
  std::string tiny = std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml";
  std::string out;
  ASSERT_EQ(
      run_moe("train " + tiny + " train.steps=3 moe.shared_experts=1 --ranks 2 --out " + dir, &out),
      0)
      << out;
  ASSERT_EQ(run_moe("ckpt info " + dir, &out), 0) << out;
  EXPECT_NE(out.find("step          3"), std::string::npos) << out;
  EXPECT_NE(out.find("checksums verified"), std::string::npos) << out;
  ASSERT_EQ(run_moe("ckpt export " + dir + " --safetensors " + file, &out), 0) << out;
  auto mixtral = read_safetensors(file);
  EXPECT_TRUE(mixtral.count("model.layers.0.block_sparse_moe.experts.3.w1.weight")) << out;
  EXPECT_TRUE(mixtral.count("model.layers.1.block_sparse_moe.gate.weight"));
  EXPECT_EQ(mixtral["model.layers.0.block_sparse_moe.experts.0.w1.weight"].size(0), 64);  // [H, D]
  ASSERT_EQ(run_moe("ckpt import " + dir2 + " --safetensors " + file, &out), 0) << out;
  auto a = checkpoint_tensors(dir), b = checkpoint_tensors(dir2);
  ASSERT_EQ(a.size(), b.size());
  for (auto& [k, v] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(torch::equal(v, b[k])) << k;
  }
  // The imported checkpoint resumes (at another EP size).
  EXPECT_EQ(
      run_moe("train " + tiny + " train.steps=2 moe.shared_experts=1 --ranks 4 --resume " + dir2,
              &out),
      0)
      << out;
  // Exit codes: missing checkpoint 2, missing data file 2.
  EXPECT_EQ(run_moe("ckpt info /nonexistent/run"), 2);
  EXPECT_EQ(run_moe("train " + tiny + " data.kind=text data.path=/nonexistent model.vocab=256"), 2);
}

TEST(TrainCli, UpcycledModelComputesWhatTheDenseModelDid) {
  // Every expert a copy of the dense MLP and gates renormalised to sum to 1:
  // the MoE model's loss on the next batch equals the dense model's.
  std::string dense_dir = fresh_dir("dense"), moe_dir = fresh_dir("upcycled");
  std::vector<std::string> common = {"moe.aux_loss_coef=0", "moe.z_loss_coef=0",
                                     "moe.capacity_factor=0", "train.steps=3",
                                     "train.ckpt_every=2"};
  std::vector<std::string> dense_ov = common;
  dense_ov.push_back("model.dense=true");
  Config dense_cfg = load_config(std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml", dense_ov);
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dense_dir;
  TrainResult dense = run(1, dense_cfg, o);
  ASSERT_EQ(dense.losses.size(), 3u);
  const int64_t width = dense_cfg.moe.top_k * dense_cfg.moe.d_expert;  // the dense twin's MLP width
  std::string out;
  ASSERT_EQ(run_moe("ckpt upcycle " + dense_dir + "/checkpoints/step_00000002 " + moe_dir +
                        " --experts 4",
                    &out),
            0)
      << out;
  EXPECT_NE(out.find("moe.d_expert=" + std::to_string(width)), std::string::npos) << out;
  std::vector<std::string> moe_ov = common;
  moe_ov.push_back("moe.d_expert=" + std::to_string(width));
  moe_ov.push_back("train.batch=2");  // 2 ranks x 2 = the dense run's global batch of 4 sequences
  Config moe_cfg = load_config(std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml", moe_ov);
  TrainOptions r = o;
  r.out_dir = r.resume_dir = moe_dir;
  TrainResult moe = run(2, moe_cfg, r);  // and at another layout: EP 2
  EXPECT_EQ(moe.first_step, 2);
  ASSERT_EQ(moe.losses.size(), 1u);
  EXPECT_NEAR(moe.losses[0], dense.losses[2], 1e-4);
  EXPECT_EQ(run_moe("ckpt upcycle " + moe_dir + " /tmp/x --experts 2"), 2);  // no dense blocks left
}

TEST(TrainCli, BenchLayerJsonAndDump) {
  // Small shapes: this checks the program's outputs, not its speed.
  std::string dir = fresh_dir("dump"), out;
  std::string tiny = std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml";
  ASSERT_EQ(run_moe("bench layer " + tiny +
                        " bench.tokens=64 bench.reps=1 bench.warmup=0 --json --dump " + dir,
                    &out),
            0)
      << out;
  for (const char* name : {"expert_only_limit", "naive_loop", "moe_layer", "breakdown_ms"})
    EXPECT_NE(out.find(name), std::string::npos) << name << " missing from: " << out;
  auto t = read_safetensors(dir + "/layer_rank0.safetensors");
  for (const char* key : {"input", "output", "grad_input", "gate.weight", "experts.3.w1.weight",
                          "experts.3.w2.weight", "experts.3.w3.weight", "experts.0.w1.weight.grad",
                          "routing.expert_ids", "routing.gate_weights"})
    EXPECT_TRUE(t.count(key)) << key;
  EXPECT_EQ(t["experts.0.w1.weight"].sizes(),
            torch::IntArrayRef({64, 64}));  // [H, D] as nn.Linear stores it
  EXPECT_EQ(t["routing.expert_ids"].sizes(), torch::IntArrayRef({64, 2}));
  // The dumped math checks out from the outside: output = sum_j gate_j * expert_j(input) for token
  // 0 (first in position order, so never dropped).
  torch::Tensor x = t["input"], ids = t["routing.expert_ids"], g = t["routing.gate_weights"];
  torch::Tensor y0 = torch::zeros({64});
  for (int j = 0; j < 2; ++j) {
    std::string e = "experts." + std::to_string(ids[0][j].item<int64_t>()) + ".";
    torch::Tensor h =
        torch::silu(torch::mv(t[e + "w1.weight"], x[0])) * torch::mv(t[e + "w3.weight"], x[0]);
    y0 += g[0][j] * torch::mv(t[e + "w2.weight"], h);
  }
  EXPECT_TRUE(
      torch::allclose(y0, t["output"][0], 1e-4, 1e-5));  // token 0 is first in line: never dropped
}

TEST(TrainCli, PruneDropsTheLeastImportantExpertsAndResumes) {
  std::string dir = fresh_dir("prune_src"), pruned = fresh_dir("pruned"), out;
  std::string tiny = std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml";
  ASSERT_EQ(run_moe("train " + tiny + " train.steps=6 --out " + dir, &out), 0) << out;
  // Threshold 1.0 (the mean importance): some expert of every layer is below it
  // unless routing is exactly uniform.
  ASSERT_EQ(
      run_moe("ckpt prune " + dir + " " + pruned + " --config " + tiny + " --threshold 1.0", &out),
      0)
      << out;
  EXPECT_NE(out.find("layer 0: removed "), std::string::npos) << out;
  auto hint = out.find("moe.experts=");
  ASSERT_NE(hint, std::string::npos) << out;
  const int keep = std::stoi(out.substr(hint + 12));
  EXPECT_GE(keep, 2);  // top_k
  EXPECT_LT(keep, 4) << out;
  auto t = checkpoint_tensors(pruned);
  EXPECT_EQ(t["param.layers.0.moe.router.weight"].size(0), keep);
  EXPECT_TRUE(t.count("param.layers.1.moe.experts." + std::to_string(keep - 1) + ".w2"));
  EXPECT_FALSE(t.count("param.layers.1.moe.experts." + std::to_string(keep) + ".w2"));
  EXPECT_EQ(run_moe("train " + tiny + " train.steps=8 moe.experts=" + std::to_string(keep) +
                        " --resume " + pruned,
                    &out),
            0)
      << out;
  EXPECT_EQ(run_moe("ckpt prune " + dir + " " + pruned + "_x"), 2);  // --config is required
}

TEST(TrainMetrics, StepTimeBreakdownPerPhase) {
  std::string dir = fresh_dir("metrics");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  run(2, small_config(2, 2, 3), o);
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line, last;
  int lines = 0;
  while (std::getline(in, line)) last = line, ++lines;
  ASSERT_EQ(lines, 3);
  auto j = nlohmann::json::parse(last);
  for (const char* key :
       {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
        "drop_frac", "expert_load", "step_ms", "phase_ms", "phase_ms_max"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["expert_load"].size(), 2u);     // two MoE layers
  EXPECT_EQ(j["expert_load"][0].size(), 4u);  // four experts each
  for (const char* phase : {"router", "permute", "dispatch", "experts", "combine", "unpermute",
                            "attention_dense", "grad_sync", "optimizer"}) {
    ASSERT_TRUE(j["phase_ms"].contains(phase)) << phase;
    EXPECT_GE(j["phase_ms"][phase].get<double>(), 0.0) << phase;
    EXPECT_GE(j["phase_ms_max"][phase].get<double>(), j["phase_ms"][phase].get<double>()) << phase;
  }
  EXPECT_GT(j["phase_ms"]["experts"].get<double>(), 0.0);
  EXPECT_GT(j["phase_ms"]["dispatch"].get<double>(), 0.0);  // EP 2: a real exchange
}

namespace {
std::string write_sweep(const std::string& name, const std::string& body) {
  std::string path = fresh_dir(name) + ".yaml";
  std::ofstream(path) << "base: " << MOE_SOURCE_DIR << "/configs/tiny.yaml\n" << body;
  return path;
}
}  // namespace

TEST(Sweep, TwoPointsEndToEndThenResumeSkipsThem) {
  std::string sweep = write_sweep("sweep2",
                                  "ranks: 2\nsteps: 3\noverrides: [train.log_every=1000]\n"
                                  "hardware: " MOE_SOURCE_DIR "/configs/hardware/cpu-local.yaml\n"
                                  "grid:\n  moe.capacity_factor: [0, 1.0]\n");
  std::string out_dir = fresh_dir("sweep_out"), out;
  ASSERT_EQ(run_moe("sweep " + sweep + " --out " + out_dir, &out), 0) << out;
  EXPECT_NE(out.find("2 ran, 0 skipped"), std::string::npos) << out;
  EXPECT_NE(out.find("(predicted "), std::string::npos) << out;
  std::ifstream csv(out_dir + "/results.csv");
  std::string header, row1, row2, extra;
  std::getline(csv, header);
  std::getline(csv, row1);
  std::getline(csv, row2);
  EXPECT_FALSE(std::getline(csv, extra));
  EXPECT_EQ(header.rfind("point,status,launcher,ranks,ep,dp,moe.capacity_factor,tokens_per_s,"
                         "measured_step_ms,predicted_step_ms,error_pct,",
                         0),
            0u)
      << header;
  EXPECT_NE(row1.find(",ok,thread,2,2,1,0,"), std::string::npos) << row1;
  EXPECT_NE(row2.find(",ok,thread,2,2,1,1.0,"), std::string::npos) << row2;
  // Every finished point has its prediction beside its measurement.
  std::ifstream jsonl(out_dir + "/results.jsonl");
  int rows = 0;
  for (std::string line; std::getline(jsonl, line); ++rows) {
    auto r = nlohmann::json::parse(line);
    EXPECT_GT(r["measured_step_ms"].get<double>(), 0) << line;
    EXPECT_GT(r["predicted_step_ms"].get<double>(), 0) << line;
    EXPECT_GT(r["memory_estimate_mib"].get<double>(), 0) << line;
    EXPECT_GT(r["peak_rss_mib"].get<double>(), 0) << line;
    EXPECT_TRUE(r.contains("predicted_experts_ms")) << line;
  }
  EXPECT_EQ(rows, 2);
  ASSERT_EQ(run_moe("sweep " + sweep + " --out " + out_dir, &out), 0) << out;
  EXPECT_NE(out.find("0 ran, 2 skipped"), std::string::npos) << out;
}

#if MOE_HAVE_MPI
// The same point under threads and under mpirun trains the same model.
TEST(Sweep, LauncherAsAGridKeyThreadsAndMpirunAgree) {
  std::string sweep = write_sweep("sweep_launch",
                                  "ranks: 2\nsteps: 3\noverrides: [train.log_every=1000]\n"
                                  "grid:\n  launcher: [thread, mpirun]\n");
  std::string out_dir = fresh_dir("sweep_launch_out"), out;
  ASSERT_EQ(run_moe("sweep " + sweep + " --out " + out_dir, &out), 0) << out;
  std::ifstream jsonl(out_dir + "/results.jsonl");
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(jsonl, line);) rows.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0]["launcher"], "thread");
  EXPECT_EQ(rows[1]["launcher"], "mpirun");
  EXPECT_EQ(rows[0]["ep"], 2);
  EXPECT_NEAR(rows[0]["final_loss"].get<double>(), rows[1]["final_loss"].get<double>(), 1e-5);
}
#endif

// repeats: every point runs that many times (interleaved); the row holds the medians.
TEST(Sweep, RepeatsReportTheMedianRun) {
  std::string sweep = write_sweep("sweep_rep",
                                  "ranks: 1\nsteps: 2\nrepeats: 3\n"
                                  "overrides: [train.log_every=1000]\n"
                                  "grid:\n  moe.capacity_factor: [0, 1.0]\n");
  std::string out_dir = fresh_dir("sweep_rep_out"), out;
  ASSERT_EQ(run_moe("sweep " + sweep + " --out " + out_dir, &out), 0) << out;
  EXPECT_NE(out.find("repeat 3/3"), std::string::npos) << out;
  std::ifstream runs(out_dir + "/runs.jsonl");
  int run_lines = 0;
  for (std::string line; std::getline(runs, line);) ++run_lines;
  EXPECT_EQ(run_lines, 6);
  std::ifstream jsonl(out_dir + "/results.jsonl");
  int rows = 0;
  for (std::string line; std::getline(jsonl, line); ++rows) {
    auto r = nlohmann::json::parse(line);
    EXPECT_EQ(r["repeats"], 3);
    std::vector<double> reps = r["step_ms_repeats"].get<std::vector<double>>();
    ASSERT_EQ(reps.size(), 3u);
    std::sort(reps.begin(), reps.end());
    EXPECT_DOUBLE_EQ(r["step_ms"].get<double>(), reps[1]) << line;
  }
  EXPECT_EQ(rows, 2);
}

// --predict runs nothing: the projection of every point, invalid grid corners skipped.
TEST(Sweep, PredictProjectsEveryValidPointWithoutRunning) {
  std::string out_dir = fresh_dir("predict_out"), out;
  ASSERT_EQ(run_moe("sweep " MOE_SOURCE_DIR "/configs/scaling/project-deepseek.yaml --predict --out " +
                        out_dir,
                    &out),
            0)
      << out;
  EXPECT_NE(out.find("ranks=8__parallel.ep=64"), std::string::npos) << out;
  EXPECT_NE(out.find("invalid, skipped"), std::string::npos) << out;
  EXPECT_NE(out.find("MFU"), std::string::npos) << out;
  std::ifstream csv(out_dir + "/predictions.csv");
  std::string header, line;
  std::getline(csv, header);
  EXPECT_NE(header.find("tokens_per_s,mfu,all_to_all_share"), std::string::npos) << header;
  std::map<std::string, double> a2a_share;
  int rows = 0;
  for (; std::getline(csv, line); ++rows) {
    std::stringstream ss(line);
    std::vector<std::string> f;
    for (std::string cell; std::getline(ss, cell, ',');) f.push_back(cell);
    ASSERT_GE(f.size(), 9u) << line;
    a2a_share[f[0]] = std::stod(f[8]);
  }
  EXPECT_EQ(rows, 13);  // 8 worlds x 2 EP sizes, minus EP 64 on 8, 16 and 32 GPUs
  // EP 64 sends most rows off the node; EP 8 keeps them on NVLink.
  EXPECT_GT(a2a_share["ranks=64__parallel.ep=64"], a2a_share["ranks=64__parallel.ep=8"]);
  // A CPU profile, ranks sharing the cores: 4 ranks on 2 cores take twice as long as 2.
  std::string cpu = write_sweep("predict_cpu",
                                "hardware: " MOE_SOURCE_DIR "/configs/hardware/cpu-local.yaml\n"
                                "grid:\n  ranks: [2, 4]\n");
  const std::string cpu_out = fresh_dir("predict_cpu_out");
  ASSERT_EQ(run_moe("sweep " + cpu + " --predict --out " + cpu_out, &out), 0) << out;
  std::ifstream cpu_csv(cpu_out + "/predictions.csv");
  std::vector<double> step_ms;
  std::getline(cpu_csv, line);
  while (std::getline(cpu_csv, line)) {
    std::stringstream ss(line);
    std::vector<std::string> f;
    for (std::string cell; std::getline(ss, cell, ',');) f.push_back(cell);
    step_ms.push_back(std::stod(f[5]));
  }
  ASSERT_EQ(step_ms.size(), 2u);
  EXPECT_GT(step_ms[1], 1.5 * step_ms[0]);
}

// Strong scaling: global_batch fixes the sequences per step over all ranks.
TEST(Sweep, GlobalBatchSplitsOverTheRanks) {
  std::string sweep = write_sweep(
      "sweep_strong", "global_batch: 8\nhardware: " MOE_SOURCE_DIR
                      "/configs/hardware/cpu-local.yaml\ngrid:\n  ranks: [1, 2, 4, 3]\n");
  std::string out_dir = fresh_dir("strong_out"), out;
  ASSERT_EQ(run_moe("sweep " + sweep + " --predict --out " + out_dir, &out), 0) << out;
  EXPECT_NE(out.find("global_batch 8 is not divisible by ranks x train.grad_accum = 3"),
            std::string::npos)
      << out;
  std::ifstream csv(out_dir + "/predictions.csv");
  std::string line;
  std::getline(csv, line);
  std::vector<std::string> tokens;
  while (std::getline(csv, line)) {
    std::stringstream ss(line);
    std::vector<std::string> f;
    for (std::string cell; std::getline(ss, cell, ',');) f.push_back(cell);
    tokens.push_back(f[4]);
  }
  // tiny.yaml: 32-token sequences; 8, 4 and 2 sequences per rank.
  EXPECT_EQ(tokens, (std::vector<std::string>{"256", "128", "64"}));
}

TEST(Sweep, FailedPointIsRecordedAndTheSweepGoesOn) {
  // The text corpus is missing for one point only: that point fails, the other runs.
  std::string sweep =
      write_sweep("sweepfail",
                  "steps: 2\ngrid:\n  data.path: [/nonexistent/corpus, "
                  "/usr/share/games/fortunes]\noverrides: [data.kind=text, model.vocab=256]\n");
  std::string out_dir = fresh_dir("sweepfail_out"), out;
  EXPECT_EQ(run_moe("sweep " + sweep + " --out " + out_dir, &out), 1) << out;
  EXPECT_NE(out.find("1 ran, 0 skipped (done earlier), 1 failed"), std::string::npos) << out;
  EXPECT_NE(out.find("DataError"), std::string::npos) << out;
}

TEST(Sweep, BadSweepFilesAreConfigErrorsNamingTheKey) {
  struct Case {
    std::string body, needle;
  };
  for (const Case& c : std::vector<Case>{
           {"grid:\n  moe.top_k: [1]\nlauncher: slurm\n", "'launcher' = 'slurm'"},
           {"grid: {}\n", "'grid' must be a non-empty mapping"},
           {"grid:\n  moe.top_k: []\n", "grid key 'moe.top_k'"},
           {"gird:\n  moe.top_k: [1]\n", "did you mean 'grid'"},
           {"grid:\n  moe.nosuch: [1]\n", "moe.nosuch"},
           {"grid:\n  moe.top_k: [99]\n", "moe.top_k = 99"},
           {"grid:\n  launcher: [thread, slurm]\n", "grid key 'launcher' has value 'slurm'"},
           {"grid:\n  ranks: [2, 0]\n", "grid key 'ranks' has value '0'"},
           {"global_batch: -4\ngrid:\n  ranks: [1]\n", "'global_batch' = -4"},
           {"repeats: 0\ngrid:\n  ranks: [1]\n", "'repeats' = 0"},
           {"hardware: /nonexistent.yaml\ngrid:\n  ranks: [1]\n", "cannot open hardware profile"},
       }) {
    std::string out;
    EXPECT_EQ(
        run_moe("sweep " + write_sweep("bad", c.body) + " --out " + fresh_dir("bad_out"), &out), 2)
        << c.body;
    EXPECT_NE(out.find(c.needle), std::string::npos) << c.body << " -> " << out;
  }
}

TEST(TrainSchedule, WarmupThenCosineToFloor) {
  TrainConfig t;
  t.lr = 1.0;
  t.warmup = 4;
  t.steps = 14;
  t.min_lr_ratio = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(t, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(t, 3), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(t, 4), 1.0);
  EXPECT_NEAR(learning_rate(t, 13), 0.1, 1e-12);
  t.schedule = LrSchedule::Constant;
  EXPECT_DOUBLE_EQ(learning_rate(t, 10), 1.0);
}

#if MOE_HAVE_MPI
TEST(MpiTrainParity, Ep2MatchesOneRank) {
  if (!comm::MpiComm::launched_by_mpirun()) GTEST_SKIP() << "run under mpirun (ctest does)";
  auto world = comm::MpiComm::world(60.0);
  set_current_rank(world->rank());
  TrainOptions q;
  q.quiet = true;
  TrainResult par = train(*world, small_config(2, 2, 5), q);
  // The reference runs inside each process on a private one-rank world.
  TrainResult ref;
  comm::run_ranks(1, 60.0,
                  [&](comm::Communicator& c) { ref = train(c, small_config(1, 1, 5), q); });
  set_current_rank(world->rank());
  expect_losses_close(par.losses, ref.losses, 1e-5);
  world->barrier();
}
#endif
