// Training tests: EP x DP parity against one rank on the concatenated global
// batch, resume (bitwise and resharded), crash safety, learning, bad input.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <torch/nn/functional/loss.h>
#include <unistd.h>

#include <signal.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <nlohmann/json.hpp>

#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/core/signals.h"
#include "moe/model/transformer.h"
#include "moe/moe/moe_layer.h"
#include "moe/parallel/checkpoint.h"
#include "moe/parallel/grad_sync.h"
#include "moe/parallel/safetensors.h"
#include "moe/train/data.h"
#include "moe/train/evaluate.h"
#include "moe/train/trainer.h"
#include "test_support.h"
#include "train_support.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

using namespace moe;
using namespace moe::train_support;

namespace {

struct Layout {
  int world, ep;
};

}  // namespace

struct ParityCase {
  int world, ep;
  double clip;  // train.clip (0 = off)
};
void PrintTo(const ParityCase& c, std::ostream* os) {
  *os << "world " << c.world << ", ep " << c.ep << ", clip " << c.clip;
}
class TrainParity : public testing::TestWithParam<ParityCase> {};

// Each step's loss and gradient norm, and the parameters after 5 steps, match
// one rank on the concatenated global batch, with clipping on and off. The
// DeepSpeed #5618 class of bug (expert gradients divided by the expert-DP
// group size instead of the world size) fails this at every layout where the
// two sizes differ (ep > 1): through grad_norm at once, and with clipping on
// through the parameters too. (At ep = 1 the expert-DP group is the world.)
TEST_P(TrainParity, MatchesOneRankOnTheConcatenatedBatch) {
  const ParityCase l = GetParam();
  const std::string clip = "train.clip=" + std::to_string(l.clip);
  std::string ref = run_to_dir("ref", 1, small_config(1, 1, 5, {clip}));
  std::string par = run_to_dir("par", l.world, small_config(l.world, l.ep, 5, {clip}));
  expect_same_steps(par, ref, 1e-5);
  expect_same_params(par, ref, 1e-5);
  if (l.clip > 0) {  // the case exercises clipping: some step's norm is above the threshold
    double max_norm = 0;
    for (auto& m : read_metrics(ref)) max_norm = std::max(max_norm, m["grad_norm"].get<double>());
    EXPECT_GT(max_norm, l.clip);
  }
}
INSTANTIATE_TEST_SUITE_P(Layouts, TrainParity,
                         testing::Values(ParityCase{4, 2, 1.0}, ParityCase{4, 2, 0.0},
                                         ParityCase{4, 4, 1.0}, ParityCase{4, 4, 0.0},
                                         ParityCase{4, 1, 1.0}, ParityCase{4, 1, 0.0},
                                         ParityCase{2, 2, 1.0}, ParityCase{2, 2, 0.0}),
                         [](const testing::TestParamInfo<ParityCase>& i) {
                           return "ep" + std::to_string(i.param.ep) + "_dp" +
                                  std::to_string(i.param.world / i.param.ep) +
                                  (i.param.clip > 0 ? "_clip" : "_noclip");
                         });

// The aux-loss-free balance bias moves from world-wide expert loads: at EP2 x
// DP2 each EP group sees only its half of the tokens, so the loads must be
// summed over the expert-DP group before the update (else the DP replicas'
// biases, and their routing, drift apart from the one-rank run).
TEST(TrainParityBias, BalanceBiasAtEp2Dp2MatchesOneRank) {
  // 5 steps: the sign updates of a small model's bias can oscillate back to
  // exactly 0 over an even number of steps.
  std::vector<std::string> bias = {"moe.bias_update_rate=0.02"};
  std::string ref = run_to_dir("bias_ref", 1, small_config(1, 1, 5, bias));
  std::string par = run_to_dir("bias_par", 4, small_config(4, 2, 5, bias));
  expect_same_steps(par, ref, 1e-5);
  expect_same_params(par, ref, 1e-5);  // includes buffer.*.balance_bias
  // Not vacuous: the bias moved.
  auto t = checkpoint_tensors(ref, true);
  for (const char* k :
       {"buffer.layers.0.moe.router.balance_bias", "buffer.layers.1.moe.router.balance_bias"}) {
    ASSERT_TRUE(t.count(k)) << k;
    EXPECT_GT(t[k].abs().max().item<double>(), 0.01) << k;
  }
}

// aux_loss_scope: global counts the expert loads f over the EP group's
// tokens (README, "aux loss"), not the whole world's: at EP2 x DP2 each EP
// group balances its own 4 sequences, exactly as EP1 x DP2 ranks with 4
// sequences each do, and unlike one rank balancing all 8.
TEST(TrainParityAux, GlobalScopeAtDp2CountsTheEpGroupsTokens) {
  std::vector<std::string> aux = {"moe.aux_loss_coef=0.05", "moe.aux_loss_scope=global"};
  std::string ep2dp2 = run_to_dir("aux_ep2dp2", 4, small_config(4, 2, 5, aux));
  std::string ep1dp2 = run_to_dir("aux_ep1dp2", 2, small_config(2, 1, 5, aux));
  std::string whole = run_to_dir("aux_whole", 1, small_config(1, 1, 5, aux));
  expect_same_steps(ep2dp2, ep1dp2, 1e-5);
  // 1e-4: one AdamW element on a near-zero gradient amplifies rounding (3e-5 seen);
  // the scopes' own difference is of order 1e-3 and larger.
  expect_same_params(ep2dp2, ep1dp2, 1e-4);
  double max_diff = 0;
  auto a = read_metrics(ep2dp2), w = read_metrics(whole);
  ASSERT_EQ(a.size(), w.size());
  for (size_t i = 0; i < a.size(); ++i)
    max_diff = std::max(max_diff, std::abs(a[i]["aux_loss"].get<double>() -
                                           w[i]["aux_loss"].get<double>()));
  EXPECT_GT(max_diff, 1e-4) << "global scope at DP 2 matched the whole-world balancing";
}

TEST(TrainParityAux, GlobalAuxLossAtFullEp) {
  // With dp = 1 the EP group is the world, so global aux statistics equal the reference's.
  std::vector<std::string> aux = {"moe.aux_loss_coef=0.05", "moe.bias_update_rate=0.01"};
  TrainOptions q;
  q.quiet = true;
  TrainResult ref = run(1, small_config(1, 1, 5, aux), q);
  TrainResult par = run(4, small_config(4, 4, 5, aux), q);
  expect_losses_close(par.losses, ref.losses, 1e-5);
}

// train.grad_accum = 2 micro-batches of 4 sequences give the step that one
// micro-batch of their 8 sequences gives: the loss and the gradient (its
// norm) of the model on the concatenated batch, computed here directly.
// (aux_loss_coef 0: the Switch loss of a concatenation is not the mean of
// its parts'; the LM and z losses are means over tokens, so they are.)
TEST(TrainGradAccum, TwoMicroBatchesEqualOneOfTheSummedSize) {
  Config cfg = small_config(1, 1, 1, {"train.grad_accum=2", "train.batch=4", "train.clip=0"});
  std::string dir = run_to_dir("accum", 1, cfg);
  auto rows = read_metrics(dir);
  ASSERT_EQ(rows.size(), 1u);
  double ref_loss = 0, ref_norm = 0;
  comm::run_ranks(1, 60.0, [&](comm::Communicator& world) {
    TransformerLM model(cfg, world, static_cast<uint64_t>(cfg.train.seed));
    auto data = make_data_source(cfg, 0, 1);
    Batch m0 = data->batch(0, 0, 4), m1 = data->batch(0, 1, 4);
    torch::Tensor inputs = torch::cat({m0.inputs, m1.inputs}),
                  targets = torch::cat({m0.targets, m1.targets});
    LMOutput out = model.forward(inputs, /*training=*/true, 0);
    torch::Tensor loss =
        torch::nn::functional::cross_entropy(out.logits.view({-1, cfg.model.vocab}),
                                             targets.view({-1})) +
        out.aux_loss + out.z_loss;
    loss.backward();
    ref_loss = loss.item<double>();
    double sq = 0;
    for (const auto& p : model.parameters())
      if (p.grad().defined()) sq += p.grad().pow(2).sum().item<double>();
    ref_norm = std::sqrt(sq);
  });
  EXPECT_NEAR(rows[0]["loss"].get<double>(), ref_loss, 1e-5);
  EXPECT_NEAR(rows[0]["grad_norm"].get<double>(), ref_norm, 1e-5 * std::max(1.0, ref_norm));
}

// Accumulation across layouts: grad_accum 2 at EP2 x DP2 (one sequence per
// rank and micro-batch) matches one rank with grad_accum 2 (four).
TEST(TrainGradAccum, ParityAtEp2Dp2) {
  std::string ref = run_to_dir("accum_ref", 1,
                               small_config(1, 1, 4, {"train.grad_accum=2", "train.batch=4"}));
  std::string par = run_to_dir("accum_par", 4,
                               small_config(4, 2, 4, {"train.grad_accum=2", "train.batch=1"}));
  expect_same_steps(par, ref, 1e-5);
  expect_same_params(par, ref, 1e-5);
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

namespace {
void flip_byte(const std::string& file, std::streamoff at) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << file;
  f.seekg(at);
  char c = 0;
  f.get(c);
  f.seekp(at);
  f.put(static_cast<char>(c ^ 0x5a));
}
}  // namespace

TEST(TrainCheckpoint, CrashDuringWriteKeepsThePreviousCheckpoint) {
  std::string dir = fresh_dir("crash"), full_dir = fresh_dir("crash_full");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  Config cfg = small_config(2, 2, 6, {"train.ckpt_every=3"});
  TrainOptions f = o;
  f.out_dir = full_dir;
  TrainResult full = run(2, cfg, f);  // the same run, uninterrupted
  set_checkpoint_crash_for_test(2);  // the step-6 save dies after its temporary files
  EXPECT_THROW(run(2, cfg, o), CheckpointError);
  set_checkpoint_crash_for_test(0);
  struct stat st;
  EXPECT_EQ(::stat((dir + "/checkpoints/step_00000006.tmp").c_str(), &st), 0)
      << "temporary files were written";
  std::string problems;
  EXPECT_EQ(find_checkpoint(dir, &problems), dir + "/checkpoints/step_00000003");
  EXPECT_EQ(problems, "");  // step 3's files all pass their size and checksum checks
  // A torn write that reached the final name: the files without their
  // manifest, or one file cut short, is rejected and step 3 is used.
  ASSERT_EQ(std::rename((dir + "/checkpoints/step_00000006.tmp").c_str(),
                        (dir + "/checkpoints/step_00000006").c_str()),
            0);
  EXPECT_EQ(find_checkpoint(dir, &problems), dir + "/checkpoints/step_00000003");
  EXPECT_NE(problems.find("step_00000006/manifest.json is missing"), std::string::npos) << problems;
  std::system(("cp '" + full_dir + "/checkpoints/step_00000006/manifest.json' '" + dir +
               "/checkpoints/step_00000006/'")
                  .c_str());
  const std::string torn = dir + "/checkpoints/step_00000006/experts.ep1.safetensors";
  ASSERT_EQ(::truncate(torn.c_str(), 100), 0);
  EXPECT_EQ(find_checkpoint(dir, &problems), dir + "/checkpoints/step_00000003");
  EXPECT_NE(problems.find("experts.ep1.safetensors has 100 bytes"), std::string::npos) << problems;
  // Resuming from step 3 reproduces the uninterrupted run's last steps bitwise.
  o.resume_dir = dir;
  TrainResult resumed = run(2, cfg, o);
  EXPECT_EQ(resumed.first_step, 3);
  ASSERT_EQ(resumed.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(resumed.losses[i], full.losses[3 + i]) << "step " << 3 + i;
}

// The newest checkpoint fails its checksum (same size, one byte changed):
// resume falls back to the older one, says so, and continues exactly as the
// uninterrupted run did from there.
TEST(TrainCheckpoint, CorruptNewestFallsBackToTheOlderOneWithAWarning) {
  std::string dir = fresh_dir("fallback");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  Config cfg = small_config(2, 2, 6, {"train.ckpt_every=2"});
  TrainResult full = run(2, cfg, o);  // checkpoints at steps 2, 4, 6
  std::system(("rm -rf '" + dir + "/checkpoints/step_00000006'").c_str());
  const std::string bad = dir + "/checkpoints/step_00000004/experts.ep1.safetensors";
  struct stat st;
  ASSERT_EQ(::stat(bad.c_str(), &st), 0);
  flip_byte(bad, st.st_size - 3);  // in the tensor data, not the header
  o.resume_dir = dir;
  testing::internal::CaptureStderr();
  TrainResult resumed = run(2, cfg, o);
  const std::string log = testing::internal::GetCapturedStderr();
  EXPECT_EQ(resumed.first_step, 2);
  EXPECT_NE(log.find("skipped invalid checkpoints"), std::string::npos) << log;
  EXPECT_NE(log.find("step_00000004/experts.ep1.safetensors fails its checksum"), std::string::npos)
      << log;
  ASSERT_EQ(resumed.losses.size(), 4u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(resumed.losses[i], full.losses[2 + i]) << "step " << 2 + i;
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

// Non-square shapes throughout (vocab 72, d_model 48, d_ff 80, d_expert 40,
// untied head, a dense block then an MoE block with a shared expert), so a
// missing or extra transpose changes a shape and a q/k/v or w1/w3 mix-up
// changes values. The exported tensors are checked against the model's own:
// names and values one by one, and the MoE block as a whole by computing it
// from the exported (Hugging Face Mixtral layout) tensors and comparing with
// MoELayer::forward on the checkpoint's weights.
TEST(TrainCli, CheckpointInfoExportImportRoundTrip) {
  std::string dir = fresh_dir("cli"), dir2 = fresh_dir("cli_import"),
              file = fresh_dir("cli") + ".safetensors";
  std::string tiny = std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml";
  const std::string shapes =
      " model.vocab=72 model.d_model=48 model.heads=4 model.d_ff=80 model.moe_every=2"
      " model.tie_embeddings=false moe.d_expert=40 moe.shared_experts=1";
  std::string out;
  ASSERT_EQ(run_moe("train " + tiny + shapes + " train.steps=3 --ranks 2 --out " + dir, &out), 0)
      << out;
  ASSERT_EQ(run_moe("ckpt info " + dir, &out), 0) << out;
  EXPECT_NE(out.find("step          3"), std::string::npos) << out;
  EXPECT_NE(out.find("checksums verified"), std::string::npos) << out;
  ASSERT_EQ(run_moe("ckpt export " + dir + " --safetensors " + file, &out), 0) << out;
  auto hf = read_safetensors(file);
  auto ours = checkpoint_tensors(dir, true);
  const int64_t V = 72, D = 48, F = 80, H = 40, E = 4;
  auto expect_tensor = [&](const std::string& name, const torch::Tensor& want) {
    ASSERT_TRUE(hf.count(name)) << name;
    ASSERT_EQ(hf[name].sizes(), want.sizes()) << name;
    EXPECT_TRUE(torch::equal(hf[name], want)) << name;
  };
  auto shape_of = [&](const std::string& name) { return hf.at(name).sizes().vec(); };
  using Shape = std::vector<int64_t>;
  // Shapes as Hugging Face's nn.Linear stores them: [out_features, in_features].
  EXPECT_EQ(shape_of("model.embed_tokens.weight"), (Shape{V, D}));
  EXPECT_EQ(shape_of("lm_head.weight"), (Shape{V, D}));
  EXPECT_EQ(shape_of("model.layers.0.mlp.gate_proj.weight"), (Shape{F, D}));
  EXPECT_EQ(shape_of("model.layers.0.mlp.down_proj.weight"), (Shape{D, F}));
  EXPECT_EQ(shape_of("model.layers.1.block_sparse_moe.gate.weight"), (Shape{E, D}));
  EXPECT_EQ(shape_of("model.layers.1.block_sparse_moe.experts.3.w1.weight"), (Shape{H, D}));
  EXPECT_EQ(shape_of("model.layers.1.block_sparse_moe.experts.3.w2.weight"), (Shape{D, H}));
  EXPECT_EQ(shape_of("model.layers.1.block_sparse_moe.shared_expert.down_proj.weight"),
            (Shape{D, H}));
  // Values against the model's own tensors ([in, out] in our checkpoint).
  expect_tensor("model.embed_tokens.weight", ours.at("param.embedding"));
  expect_tensor("lm_head.weight", ours.at("param.head"));
  expect_tensor("model.norm.weight", ours.at("param.final_norm"));
  for (int layer : {0, 1}) {
    const std::string l = std::to_string(layer), pre = "model.layers." + l + ".",
                      our = "param.layers." + l + ".";
    const torch::Tensor wqkv = ours.at(our + "wqkv");  // [D, 3D]: q | k | v columns
    expect_tensor(pre + "self_attn.q_proj.weight", wqkv.narrow(1, 0, D).t());
    expect_tensor(pre + "self_attn.k_proj.weight", wqkv.narrow(1, D, D).t());
    expect_tensor(pre + "self_attn.v_proj.weight", wqkv.narrow(1, 2 * D, D).t());
    expect_tensor(pre + "self_attn.o_proj.weight", ours.at(our + "wo").t());
    expect_tensor(pre + "input_layernorm.weight", ours.at(our + "norm1"));
    expect_tensor(pre + "post_attention_layernorm.weight", ours.at(our + "norm2"));
  }
  expect_tensor("model.layers.0.mlp.gate_proj.weight", ours.at("param.layers.0.mlp.w1").t());
  expect_tensor("model.layers.0.mlp.up_proj.weight", ours.at("param.layers.0.mlp.w3").t());
  expect_tensor("model.layers.0.mlp.down_proj.weight", ours.at("param.layers.0.mlp.w2").t());
  expect_tensor("model.layers.1.block_sparse_moe.gate.weight",
                ours.at("param.layers.1.moe.router.weight"));
  for (int64_t e = 0; e < E; ++e)
    for (const char* w : {"w1", "w2", "w3"})
      expect_tensor("model.layers.1.block_sparse_moe.experts." + std::to_string(e) + "." + w +
                        ".weight",
                    ours.at("param.layers.1.moe.experts." + std::to_string(e) + "." + w).t());
  // The MoE block computed from the exported tensors the way Mixtral does
  // (softmax router, top-2 renormalised, expert = w2(silu(w1 x) * w3 x)) plus
  // the shared expert (down(silu(gate x) * up x)) equals our layer's output.
  {
    Config cfg = load_config(tiny, {"model.d_model=48", "moe.d_expert=40", "moe.shared_experts=1",
                                    "moe.capacity_factor=0"});
    auto solo = comm::ThreadComm::create_world(1, 30.0);
    MoELayer layer(cfg.moe, D, *solo[0], 1);
    std::vector<torch::Tensor> w1s, w3s, w2s;
    for (int64_t e = 0; e < E; ++e) {
      const std::string k = "param.layers.1.moe.experts." + std::to_string(e) + ".";
      w1s.push_back(ours.at(k + "w1"));
      w3s.push_back(ours.at(k + "w3"));
      w2s.push_back(ours.at(k + "w2"));
    }
    {
      torch::NoGradGuard ng;
      layer.load_global_experts(torch::stack(w1s), torch::stack(w3s), torch::stack(w2s));
      layer.router->weight.copy_(ours.at("param.layers.1.moe.router.weight"));
      layer.shared_w1.copy_(ours.at("param.layers.1.moe.shared_w1"));
      layer.shared_w3.copy_(ours.at("param.layers.1.moe.shared_w3"));
      layer.shared_w2.copy_(ours.at("param.layers.1.moe.shared_w2"));
    }
    torch::NoGradGuard ng;
    torch::manual_seed(3);
    torch::Tensor x = torch::randn({16, D});
    torch::Tensor y = layer.forward(x, /*training=*/false).y;
    const std::string m = "model.layers.1.block_sparse_moe.";
    auto linear = [&](const torch::Tensor& in, const std::string& w) {
      return torch::mm(in, hf.at(m + w + ".weight").t());
    };
    torch::Tensor probs = torch::softmax(linear(x, "gate"), -1);
    auto top = probs.topk(2, -1);
    torch::Tensor gates = std::get<0>(top) / std::get<0>(top).sum(-1, true);
    torch::Tensor ref = torch::zeros({16, D});
    for (int64_t t = 0; t < 16; ++t)
      for (int j = 0; j < 2; ++j) {
        const std::string ex = "experts." + std::to_string(std::get<1>(top)[t][j].item<int64_t>());
        torch::Tensor xt = x[t].unsqueeze(0);
        torch::Tensor h = torch::silu(linear(xt, ex + ".w1")) * linear(xt, ex + ".w3");
        ref[t] += gates[t][j] * linear(h, ex + ".w2")[0];
      }
    ref += linear(torch::silu(linear(x, "shared_expert.gate_proj")) *
                      linear(x, "shared_expert.up_proj"),
                  "shared_expert.down_proj");
    EXPECT_TRUE(torch::allclose(y, ref, 1e-4, 1e-5))
        << "max |diff| " << (y - ref).abs().max().item<double>();
  }
  ASSERT_EQ(run_moe("ckpt import " + dir2 + " --safetensors " + file, &out), 0) << out;
  auto a = checkpoint_tensors(dir, true), b = checkpoint_tensors(dir2, true);
  ASSERT_EQ(a.size(), b.size());
  for (auto& [k, v] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(torch::equal(v, b[k])) << k;
  }
  // The imported checkpoint resumes (at another EP size).
  EXPECT_EQ(run_moe("train " + tiny + shapes + " train.steps=2 --ranks 4 --resume " + dir2, &out),
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

// Importance (share of a layer's gate mass over the data sample, x E) is
// recomputed here from the source checkpoint through the model's public API;
// the pruned checkpoint must keep exactly each layer's most important experts,
// renumbered in order, with their weights and router rows copied unchanged.
TEST(TrainCli, PruneDropsTheLeastImportantExpertsAndResumes) {
  std::string dir = fresh_dir("prune_src"), pruned = fresh_dir("pruned"), out;
  std::string tiny = std::string(MOE_SOURCE_DIR) + "/configs/tiny.yaml";
  ASSERT_EQ(run_moe("train " + tiny + " train.steps=6 --out " + dir, &out), 0) << out;
  // Threshold 1.0 (the mean importance): some expert of every layer is below it
  // unless routing is exactly uniform.
  ASSERT_EQ(run_moe("ckpt prune " + dir + " " + pruned + " --config " + tiny +
                        " --threshold 1.0 --batches 4",
                    &out),
            0)
      << out;
  EXPECT_NE(out.find("layer 0: removed "), std::string::npos) << out;
  auto hint = out.find("moe.experts=");
  ASSERT_NE(hint, std::string::npos) << out;
  const int keep = std::stoi(out.substr(hint + 12));
  EXPECT_GE(keep, 2);  // top_k
  EXPECT_LT(keep, 4) << out;
  // Gate mass per expert, as prune measures it: `batches` micro-batches from the checkpoint's step.
  const Config cfg = load_config(tiny, {"parallel.ranks=0"});
  const int64_t E = cfg.moe.experts;
  std::vector<std::vector<double>> mass;
  comm::run_ranks(1, 60.0, [&](comm::Communicator& world) {
    comm::ProcessMesh mesh(world, 1, 1);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    const int64_t step = load_checkpoint(dir, model, nullptr, mesh, cfg);
    auto data = make_data_source(cfg, 0, 1);
    torch::NoGradGuard ng;
    for (int64_t b = 0; b < 4; ++b) {
      LMOutput o = model.forward(data->batch(step + b, 0, cfg.train.batch).inputs, false);
      mass.resize(o.stats.size(), std::vector<double>(E, 0.0));
      for (size_t l = 0; l < o.stats.size(); ++l)
        for (int64_t e = 0; e < E; ++e) mass[l][e] += o.stats[l].gate_per_expert[e];
    }
  });
  ASSERT_EQ(mass.size(), 2u);
  auto src = checkpoint_tensors(dir, true), dst = checkpoint_tensors(pruned, true);
  for (int layer = 0; layer < 2; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return mass[layer][a] > mass[layer][b]; });
    std::vector<int64_t> kept(order.begin(), order.begin() + keep);
    std::sort(kept.begin(), kept.end());
    // The report names the same removed experts: "layer L: removed 2 (0.512) 3 (0.730); ...".
    const std::string tag = "layer " + std::to_string(layer) + ": removed";
    const auto at = out.find(tag);
    ASSERT_NE(at, std::string::npos) << out;
    std::stringstream line(out.substr(at + tag.size(), out.find(';', at) - at - tag.size()));
    std::vector<int64_t> printed;
    for (std::string id, importance; line >> id >> importance;) printed.push_back(std::stoll(id));
    std::sort(printed.begin(), printed.end());
    std::vector<int64_t> removed;
    for (int64_t e = 0; e < E; ++e)
      if (!std::binary_search(kept.begin(), kept.end(), e)) removed.push_back(e);
    EXPECT_EQ(printed, removed) << out;
    const std::string pre = "layers." + std::to_string(layer) + ".moe.";
    for (int64_t i = 0; i < keep; ++i) {
      SCOPED_TRACE("kept expert " + std::to_string(kept[i]) + " -> " + std::to_string(i));
      for (const char* w : {"w1", "w2", "w3"}) {
        const std::string from = "param." + pre + "experts." + std::to_string(kept[i]) + "." + w,
                          to = "param." + pre + "experts." + std::to_string(i) + "." + w;
        ASSERT_TRUE(dst.count(to)) << to;
        EXPECT_TRUE(torch::equal(dst[to], src.at(from))) << to << " is not " << from;
      }
      EXPECT_TRUE(torch::equal(dst.at("param." + pre + "router.weight")[i],
                               src.at("param." + pre + "router.weight")[kept[i]]));
      EXPECT_TRUE(torch::equal(dst.at("buffer." + pre + "router.balance_bias")[i],
                               src.at("buffer." + pre + "router.balance_bias")[kept[i]]));
    }
    EXPECT_EQ(dst.at("param." + pre + "router.weight").size(0), keep);
    EXPECT_FALSE(dst.count("param." + pre + "experts." + std::to_string(keep) + ".w2"));
  }
  // Everything else is copied unchanged.
  for (const char* k : {"param.embedding", "param.layers.0.wqkv", "param.layers.1.wo"})
    EXPECT_TRUE(torch::equal(dst.at(k), src.at(k))) << k;
  EXPECT_EQ(run_moe("train " + tiny + " train.steps=8 moe.experts=" + std::to_string(keep) +
                        " --resume " + pruned,
                    &out),
            0)
      << out;
  EXPECT_EQ(run_moe("ckpt prune " + dir + " " + pruned + "_x"), 2);  // --config is required
}

// The step-time breakdown accounts for the step: its phases are disjoint
// slices of the step, so they add up to at most the step time, and the only
// work outside them is a few small all-reduces of statistics and the metrics
// bookkeeping, so at least half of the step (a loose margin for scheduling
// noise on shared cores; measured on a busy 2-core machine: 83-98%). Every phase does work at
// EP 2 (a real exchange, two ranks to synchronise), so each is positive.
TEST(TrainMetrics, StepTimeBreakdownPerPhase) {
  std::string dir = fresh_dir("metrics");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = dir;
  run(2, small_config(2, 2, 4), o);
  auto rows = read_metrics(dir);
  ASSERT_EQ(rows.size(), 4u);
  const auto& j = rows.back();
  for (const char* key :
       {"step", "loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s",
        "drop_frac", "expert_load", "step_ms", "phase_ms", "phase_ms_max"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["expert_load"].size(), 2u);     // two MoE layers
  EXPECT_EQ(j["expert_load"][0].size(), 4u);  // four experts each
  const std::vector<std::string> phases = {"router",   "permute", "dispatch",
                                           "experts",  "combine", "unpermute",
                                           "attention_dense", "grad_sync", "optimizer"};
  EXPECT_EQ(j["phase_ms"].size(), phases.size()) << j["phase_ms"].dump();
  std::vector<double> shares;
  for (const auto& row : rows) {
    const int step = row["step"].get<int>();
    double sum = 0;
    for (const auto& phase : phases) {
      ASSERT_TRUE(row["phase_ms"].contains(phase)) << phase;
      const double ms = row["phase_ms"][phase].get<double>();
      EXPECT_GT(ms, 0.0) << phase << " at step " << step;
      EXPECT_GE(row["phase_ms_max"][phase].get<double>(), ms) << phase << " at step " << step;
      sum += ms;
    }
    const double step_ms = row["step_ms"].get<double>();
    EXPECT_LE(sum, step_ms * (1 + 1e-9) + 1e-6) << "phases overlap or double count, step " << step;
    shares.push_back(sum / step_ms);
  }
  // The median step (one slow step on a busy machine does not decide it).
  std::sort(shares.begin(), shares.end());
  EXPECT_GE(shares[shares.size() / 2], 0.5) << "the phases miss part of the step";
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

namespace {
TrainConfig schedule_config(const std::string& schedule) {
  return default_config({"train.lr=1", "train.warmup=4", "train.steps=14", "train.min_lr_ratio=0.1",
                         "train.schedule=" + schedule})
      .train;
}
}  // namespace

// Warmup 4 steps, then 10 steps of decay over span = steps - warmup - 1 = 9,
// progress p = (step - 4) / 9: p = 1/3 at step 7 and 2/3 at step 10, where
// cosine and linear differ (they agree at the ends).
TEST(TrainSchedule, WarmupThenCosineLinearOrConstant) {
  for (const char* schedule : {"cosine", "linear", "constant"}) {
    SCOPED_TRACE(schedule);
    const TrainConfig t = schedule_config(schedule);
    EXPECT_DOUBLE_EQ(learning_rate(t, 0), 0.25);  // linear warmup, whatever the decay
    EXPECT_DOUBLE_EQ(learning_rate(t, 1), 0.5);
    EXPECT_DOUBLE_EQ(learning_rate(t, 3), 1.0);
    EXPECT_DOUBLE_EQ(learning_rate(t, 4), 1.0);
  }
  const TrainConfig cosine = schedule_config("cosine");
  EXPECT_NEAR(learning_rate(cosine, 7), 0.1 + 0.45 * (1 + std::cos(M_PI / 3)), 1e-12);  // 0.775
  EXPECT_NEAR(learning_rate(cosine, 10), 0.1 + 0.45 * (1 + std::cos(2 * M_PI / 3)), 1e-12);  // .325
  EXPECT_NEAR(learning_rate(cosine, 13), 0.1, 1e-12);
  const TrainConfig linear = schedule_config("linear");
  EXPECT_NEAR(learning_rate(linear, 7), 0.7, 1e-12);
  EXPECT_NEAR(learning_rate(linear, 10), 0.4, 1e-12);
  EXPECT_NEAR(learning_rate(linear, 13), 0.1, 1e-12);
  const TrainConfig constant = schedule_config("constant");
  for (int64_t step : {4, 7, 10, 13}) EXPECT_DOUBLE_EQ(learning_rate(constant, step), 1.0) << step;
  // No warmup: decay starts at step 0 (span = steps - 1 = 13).
  TrainConfig nowarm = default_config({"train.lr=1", "train.warmup=0", "train.steps=14",
                                       "train.min_lr_ratio=0", "train.schedule=linear"})
                           .train;
  EXPECT_DOUBLE_EQ(learning_rate(nowarm, 0), 1.0);
  EXPECT_NEAR(learning_rate(nowarm, 13), 0.0, 1e-12);
}

// The trainer applies the schedule: metrics.jsonl's lr column, step by step.
TEST(TrainSchedule, TrainerUsesTheScheduleEachStep) {
  for (const char* schedule : {"cosine", "linear"}) {
    SCOPED_TRACE(schedule);
    Config cfg = small_config(1, 1, 6, {std::string("train.schedule=") + schedule,
                                        "train.min_lr_ratio=0.2"});
    std::string dir = run_to_dir(std::string("sched_") + schedule, 1, cfg);
    auto rows = read_metrics(dir);
    ASSERT_EQ(rows.size(), 6u);
    for (int64_t step = 0; step < 6; ++step)
      EXPECT_DOUBLE_EQ(rows[step]["lr"].get<double>(), learning_rate(cfg.train, step)) << step;
    EXPECT_NE(rows[3]["lr"].get<double>(), rows[2]["lr"].get<double>());
  }
}

#if MOE_HAVE_MPI
TEST(MpiTrainParity, Ep2MatchesOneRank) {
  std::unique_ptr<comm::MpiComm> world;
  MOE_REQUIRE_MPI_WORLD(comm::MpiComm::launched_by_mpirun(),
                        (world = comm::MpiComm::world(60.0))->size());
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

// Clipping scales every gradient by clip / norm: after synchronize_and_clip the
// global gradient norm equals the threshold when it was above it, and is
// unchanged when it was below it or clipping is off. (Parity tests cannot see a
// wrong clip factor: the one-rank reference clips the same wrong way.)
TEST(TrainClip, ClippedGradientNormEqualsTheThreshold) {
  const Config cfg = small_config(1, 1, 1);
  comm::run_ranks(1, 60.0, [&](comm::Communicator& world) {
    comm::ProcessMesh mesh(world, 1, 1);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    GradSync sync(model, mesh, cfg.parallel.grad_bucket_mb);
    auto data = make_data_source(cfg, 0, 1);
    const Batch b = data->batch(0, 0, cfg.train.batch);
    auto grad_norm = [&] {
      double sq = 0;
      for (const auto& p : model.parameters())
        if (p.grad().defined()) sq += p.grad().to(torch::kFloat64).pow(2).sum().item<double>();
      return std::sqrt(sq);
    };
    for (double clip : {0.0, 1e-3, 1e6}) {
      SCOPED_TRACE("clip " + std::to_string(clip));
      for (auto& p : model.parameters())
        if (p.grad().defined()) p.mutable_grad().zero_();
      LMOutput out = model.forward(b.inputs, /*training=*/true, 1);
      torch::Tensor lm = torch::nn::functional::cross_entropy(
          out.logits.view({-1, cfg.model.vocab}), b.targets.view({-1}));
      (lm + out.aux_loss + out.z_loss).backward();
      const double before = grad_norm();
      ASSERT_GT(before, 1e-2);  // so 1e-3 clips and 1e6 does not
      EXPECT_NEAR(sync.synchronize_and_clip(clip), before, 1e-5 * before);
      const double after = grad_norm();
      if (clip > 0 && clip < before)
        EXPECT_NEAR(after, clip, 1e-4 * clip);
      else
        EXPECT_NEAR(after, before, 1e-5 * before);
    }
  });
}

// ---- token shards, validation split, evaluation, preemption ----------------------

namespace {

// An llm.c shard (header: magic, version, count; then uint16 tokens), with
// `version` and `count` overridable to make bad headers.
void write_llmc_shard(const std::string& path, const std::vector<uint16_t>& tokens,
                      int32_t version = kLlmcShardVersion, int32_t count = -1) {
  std::vector<int32_t> header(256, 0);
  header[0] = kLlmcShardMagic;
  header[1] = version;
  header[2] = count >= 0 ? count : static_cast<int32_t>(tokens.size());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header.data()), header.size() * 4);
  out.write(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
}
void write_raw_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 2);
}
std::vector<uint16_t> iota_tokens(int n, int first, int modulo) {
  std::vector<uint16_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<uint16_t>((first + i) % modulo);
  return t;
}
Config token_config(const std::string& path, std::vector<std::string> extra = {}) {
  std::vector<std::string> ov = {"data.kind=tokens", "data.path=" + path, "model.vocab=1000",
                                 "model.seq_len=8"};
  ov.insert(ov.end(), extra.begin(), extra.end());
  return default_config(ov);
}
std::vector<int64_t> row(const torch::Tensor& t, int64_t i) {
  torch::Tensor r = t[i].contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

}  // namespace

// One llm.c shard, val_fraction 0.25 of 400 tokens: training reads tokens
// [0, 300) (each rank its half), validation windows tokens 300.. with stride
// seq_len. Tokens are their own positions, so every row says where it came from.
TEST(TrainData, LlmcShardSplitsIntoRankSharesAndATailValidation) {
  const std::string dir = fresh_dir("llmc");
  std::system(("mkdir -p '" + dir + "'").c_str());
  write_llmc_shard(dir + "/corpus.bin", iota_tokens(400, 0, 1000));
  const Config cfg = token_config(dir + "/corpus.bin", {"data.val_fraction=0.25"});
  for (int rank = 0; rank < 2; ++rank) {
    auto data = make_data_source(cfg, rank, 2);
    EXPECT_FALSE(data->byte_level());
    EXPECT_EQ(data->val_windows(), (100 - 1) / 8);
    const Batch b = data->batch(3, 0, 16);
    for (int64_t i = 0; i < 16; ++i) {
      const auto in = row(b.inputs, i), tg = row(b.targets, i);
      EXPECT_GE(in[0], 150 * rank);
      EXPECT_LE(tg.back(), 150 * rank + 149);  // inside this rank's share
      for (size_t k = 0; k < in.size(); ++k) {
        EXPECT_EQ(in[k], in[0] + int64_t(k));
        EXPECT_EQ(tg[k], in[k] + 1);
      }
    }
    const Batch v = data->val_batch({0, 5});
    EXPECT_EQ(row(v.inputs, 0)[0], 300);
    EXPECT_EQ(row(v.inputs, 1)[0], 300 + 5 * 8);
    EXPECT_EQ(row(v.targets, 1).back(), 300 + 5 * 8 + 8);
  }
}

// A directory with llm.c-named train shards (llm.c format) and a val shard
// (raw uint16): the val shard is the whole validation split, the train shards
// (concatenated, untouched by val_fraction) the training split; a glob picks
// the same files.
TEST(TrainData, ValShardsByNameRawAndLlmcFormatsAndGlobs) {
  const std::string dir = fresh_dir("shards");
  std::system(("mkdir -p '" + dir + "'").c_str());
  write_llmc_shard(dir + "/web_train_000000.bin", iota_tokens(50, 0, 1000));
  write_llmc_shard(dir + "/web_train_000001.bin", iota_tokens(50, 50, 1000));
  write_raw_shard(dir + "/web_val_000000.bin", iota_tokens(33, 500, 1000));
  std::ofstream(dir + "/README.txt") << "not a shard";
  for (const std::string& path : {dir, dir + "/web_*.bin"}) {
    SCOPED_TRACE(path);
    auto data = make_data_source(token_config(path), 0, 1);
    EXPECT_EQ(data->val_windows(), 4);
    EXPECT_EQ(row(data->val_batch({3}).targets, 0).back(), 500 + 32);
    // Training windows run on across the shard boundary.
    int64_t max_seen = 0, spanning = 0;
    for (int64_t step = 0; step < 20; ++step) {
      const Batch b = data->batch(step, 0, 8);
      for (int64_t i = 0; i < 8; ++i) {
        const auto tg = row(b.targets, i);
        EXPECT_EQ(tg.back(), row(b.inputs, i)[0] + 8);
        max_seen = std::max(max_seen, tg.back());
        spanning += row(b.inputs, i)[0] < 50 && tg.back() >= 50;
      }
    }
    EXPECT_GT(spanning, 0);
    EXPECT_GT(max_seen, 90);
    EXPECT_LE(max_seen, 99);
  }
  // nanoGPT's names: train.bin / val.bin, raw uint16.
  const std::string nano = fresh_dir("nanogpt");
  std::system(("mkdir -p '" + nano + "'").c_str());
  write_raw_shard(nano + "/train.bin", iota_tokens(64, 0, 1000));
  write_raw_shard(nano + "/val.bin", iota_tokens(17, 900, 1000));
  auto data = make_data_source(token_config(nano), 0, 1);
  EXPECT_EQ(data->val_windows(), 2);
  EXPECT_EQ(row(data->val_batch({0}).inputs, 0)[0], 900);
}

TEST(TrainData, BadTokenShardsAreDataErrorsNamingTheFile) {
  const std::string dir = fresh_dir("bad_shards");
  std::system(("mkdir -p '" + dir + "'").c_str());
  struct Case {
    std::string file, expect;
    std::function<void(const std::string&)> write;
    std::vector<std::string> extra;
  };
  const std::vector<Case> cases = {
      {"version.bin", "version 7",
       [](const std::string& p) { write_llmc_shard(p, iota_tokens(100, 0, 50), 7); }, {}},
      {"truncated.bin", "truncated",
       [](const std::string& p) { write_llmc_shard(p, iota_tokens(100, 0, 50), 1, 200); }, {}},
      {"short_header.bin", "header truncated",
       [](const std::string& p) {
         const int32_t head[3] = {kLlmcShardMagic, 1, 10};
         std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(head), 12);
       }, {}},
      {"odd.bin", "odd byte count",
       [](const std::string& p) { std::ofstream(p, std::ios::binary) << "abcdefg"; }, {}},
      {"empty.bin", "empty", [](const std::string& p) { std::ofstream{p}; }, {}},
      {"model.bin", "model checkpoint",
       [](const std::string& p) {
         std::vector<int32_t> h(256, 0);
         h[0] = 20240326;
         std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(h.data()), 1024);
       }, {}},
      {"vocab.bin", "but model.vocab = 512",
       [](const std::string& p) { write_raw_shard(p, iota_tokens(100, 900, 1000)); },
       {"model.vocab=512"}},
      {"tiny.bin", "shorter than one sequence",
       [](const std::string& p) { write_raw_shard(p, iota_tokens(6, 0, 10)); }, {}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file);
    const std::string path = dir + "/" + c.file;
    c.write(path);
    try {
      make_data_source(token_config(path, c.extra), 0, 1);
      ADD_FAILURE() << "no DataError";
    } catch (const DataError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
    }
  }
  for (const std::string& path : {dir + "/none_*.bin", fresh_dir("no_such_dir")}) {
    try {
      make_data_source(token_config(path), 0, 1);
      ADD_FAILURE() << "no DataError for " << path;
    } catch (const DataError& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  // Only *_val_* shards: nothing to train on.
  const std::string only_val = fresh_dir("only_val");
  std::system(("mkdir -p '" + only_val + "'").c_str());
  write_raw_shard(only_val + "/x_val_000.bin", iota_tokens(100, 0, 10));
  EXPECT_THROW(make_data_source(token_config(only_val), 0, 1), DataError);
}

// Text: the last val_fraction of each file is held out; validation windows
// read the tails in file order.
TEST(TrainData, TextValidationIsTheTailOfEachFile) {
  const std::string dir = fresh_dir("text_split");
  std::system(("mkdir -p '" + dir + "'").c_str());
  std::ofstream(dir + "/a.txt") << std::string(60, 'a') << std::string(20, 'A');
  std::ofstream(dir + "/b.txt") << std::string(60, 'b') << std::string(20, 'B');
  const Config cfg = default_config({"data.kind=text", "data.path=" + dir, "model.seq_len=8",
                                     "data.val_fraction=0.25"});
  auto data = make_data_source(cfg, 0, 1);
  EXPECT_TRUE(data->byte_level());
  EXPECT_EQ(data->val_windows(), (40 - 1) / 8);
  std::string val;
  for (int64_t w = 0; w < data->val_windows(); ++w)
    for (int64_t t : row(data->val_batch({w}).inputs, 0)) val += char(t);
  EXPECT_EQ(val, std::string(20, 'A') + std::string(12, 'B'));
  for (int64_t step = 0; step < 10; ++step)
    for (int64_t t : row(data->batch(step, 0, 4).targets, 0)) EXPECT_TRUE(t == 'a' || t == 'b');
  // Without a validation split, evaluation is refused up front with what to change.
  const Config none = default_config({"data.kind=text", "data.path=" + dir, "model.seq_len=8",
                                      "data.val_fraction=0", "train.eval_every=5"});
  try {
    run(1, none, TrainOptions{});
    FAIL();
  } catch (const DataError& e) {
    EXPECT_NE(std::string(e.what()).find("data.val_fraction"), std::string::npos) << e.what();
  }
}

namespace {
// The validation loss of run_dir's checkpoint evaluated on `world` thread ranks at EP `ep`.
EvalResult eval_checkpoint(const std::string& run_dir, const Config& cfg, int world, int ep) {
  EvalResult res;
  comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
    comm::ProcessMesh mesh(c, ep, world / ep);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    load_checkpoint(run_dir, model, nullptr, mesh, cfg);
    auto data = make_data_source(cfg, c.rank(), world);
    EvalResult r = evaluate(model, *data, mesh, cfg);
    if (c.rank() == 0) res = r;
  });
  return res;
}
}  // namespace

// The same checkpoint evaluated at EP 1, 2, 4 and EP 2 x DP 2 gives the loss a
// direct one-rank computation over windows 0..N-1 gives; 10 x 2 windows leave
// a padding round at 4 ranks. The trainer's val_loss in metrics.jsonl at
// the last step is the same number.
TEST(TrainEval, EqualAtEp1Ep2Ep4ForTheSameCheckpoint) {
  const Config cfg = small_config(1, 1, 4, {"train.batch=2", "train.eval_batches=10",
                                            "train.eval_every=2", "moe.bias_update_rate=0.01"});
  const std::string dir = run_to_dir("eval_parity", 2, small_config(2, 2, 4, {
      "train.eval_batches=5", "train.eval_every=2", "moe.bias_update_rate=0.01"}));
  double direct = 0;
  comm::run_ranks(1, 60.0, [&](comm::Communicator& c) {
    comm::ProcessMesh mesh(c, 1, 1);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    load_checkpoint(dir, model, nullptr, mesh, cfg);
    auto data = make_data_source(cfg, 0, 1);
    std::vector<int64_t> all(20);
    for (int64_t i = 0; i < 20; ++i) all[i] = i;
    const Batch b = data->val_batch(all);
    torch::NoGradGuard ng;
    LMOutput out = model.forward(b.inputs, false);
    direct = torch::nn::functional::cross_entropy(out.logits.view({-1, cfg.model.vocab}),
                                                  b.targets.view({-1}))
                 .item<double>();
  });
  ASSERT_TRUE(std::isfinite(direct) && direct > 0.1) << direct;
  for (Layout l : {Layout{1, 1}, Layout{2, 2}, Layout{4, 4}, Layout{4, 2}}) {
    SCOPED_TRACE("world " + std::to_string(l.world) + " ep " + std::to_string(l.ep));
    const EvalResult r = eval_checkpoint(dir, cfg, l.world, l.ep);
    EXPECT_EQ(r.windows, 20);
    EXPECT_EQ(r.tokens, 20 * cfg.model.seq_len);
    EXPECT_NEAR(r.loss, direct, 1e-5 * direct);
    ASSERT_EQ(r.expert_load.size(), 2u);
    int64_t slots = 0;
    for (int64_t c : r.expert_load[0]) slots += c;
    // Every forwarded token (padding included) routes top_k slots.
    const int64_t rounds = (20 + l.world * 2 - 1) / (l.world * 2);
    EXPECT_EQ(slots, rounds * l.world * 2 * cfg.model.seq_len * cfg.moe.top_k);
  }
  const auto rows = read_metrics(dir);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_FALSE(rows[0].contains("val_loss"));
  EXPECT_TRUE(rows[1].contains("val_loss"));
  EXPECT_NEAR(rows[3]["val_loss"].get<double>(), direct, 1e-5 * direct);
  EXPECT_NE(rows[1]["val_loss"].get<double>(), rows[3]["val_loss"].get<double>());
}

// A preemption request seen by rank 1 only, during step 3 of 6: every rank
// stops after step 3 with a checkpoint of step 3, and resuming from it gives
// bit for bit the losses of the uninterrupted run.
TEST(TrainPreempt, OneRanksSignalStopsEveryRankAtTheSameStep) {
  const Config cfg = small_config(2, 2, 6);
  const std::string full_dir = fresh_dir("preempt_full"), dir = fresh_dir("preempt");
  TrainOptions o;
  o.quiet = true;
  o.out_dir = full_dir;
  const TrainResult full = run(2, cfg, o);
  o.out_dir = dir;
  o.stop_requested = [](int rank, int64_t step) { return rank == 1 && step >= 2 ? SIGTERM : 0; };
  const TrainResult cut = run(2, cfg, o);
  EXPECT_EQ(cut.preempted_step, 3);
  ASSERT_EQ(cut.losses.size(), 3u);
  EXPECT_EQ(find_checkpoint(dir), dir + "/checkpoints/step_00000003");
  for (const char* f : {"shared.safetensors", "experts.ep0.safetensors", "experts.ep1.safetensors"}) {
    struct stat st;
    EXPECT_EQ(::stat((dir + "/checkpoints/step_00000003/" + f).c_str(), &st), 0) << f;
  }
  o.stop_requested = nullptr;
  o.resume_dir = dir;
  const TrainResult resumed = run(2, cfg, o);
  EXPECT_EQ(resumed.first_step, 3);
  EXPECT_EQ(resumed.preempted_step, 0);
  ASSERT_EQ(resumed.losses.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(cut.losses[i], full.losses[i]);
    EXPECT_EQ(resumed.losses[i], full.losses[3 + i]) << "step " << 4 + i;
  }
}

// The handlers: the first SIGTERM/SIGINT/SIGUSR1 only raises the flag; the
// second terminates the process with that signal (checked in a forked child).
TEST(TrainPreempt, FirstSignalRaisesTheFlagSecondTerminates) {
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) {
    SCOPED_TRACE(signal_name(sig));
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      install_preemption_handlers();
      if (preemption_signal() != 0) ::_exit(10);
      ::raise(sig);
      if (preemption_signal() != sig) ::_exit(11);
      ::raise(sig);
      ::_exit(12);  // not reached: the second signal ends the process
    }
    int status = 0;
    ::waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited with " << WEXITSTATUS(status);
    EXPECT_EQ(WTERMSIG(status), sig);
  }
}

// `moe eval` on a byte-level text run: nats per token and bits per byte
// (= nats / ln 2), at 2 thread ranks; a directory that is no run, and a run
// without a checkpoint, exit 2 saying so.
TEST(TrainCli, EvalPrintsBitsPerByteForTextAndRefusesNonRuns) {
  const std::string text = fresh_dir("eval_text") + ".txt";
  {
    std::ofstream out(text);
    for (int i = 0; i < 300; ++i) out << "line " << i << ": the quick brown fox " << i * 7 << "\n";
  }
  const std::string dir = run_to_dir(
      "eval_cli", 2,
      small_config(2, 2, 3, {"data.kind=text", "data.path=" + text, "model.vocab=256"}));
  std::string out;
  ASSERT_EQ(run_moe("eval " + dir + " --ranks 2 train.eval_batches=4", &out), 0) << out;
  double nats = 0, bits = 0;
  const size_t at = out.find("val_loss ");
  ASSERT_NE(at, std::string::npos) << out;
  ASSERT_EQ(std::sscanf(out.c_str() + at, "val_loss %lf nats/token (perplexity %*f), %lf bits/byte",
                        &nats, &bits),
            2)
      << out;
  EXPECT_GT(nats, 1.0);
  EXPECT_NEAR(bits, nats / std::log(2.0), 1e-5);
  EXPECT_NE(out.find("16 windows"), std::string::npos) << out;  // eval_batches 4 x train.batch 4
  EXPECT_NE(out.find("moe layer 1:"), std::string::npos) << out;

  ASSERT_EQ(run_moe("eval " + fresh_dir("not_a_run"), &out), 2) << out;
  EXPECT_NE(out.find("is not a run directory"), std::string::npos) << out;
  std::system(("rm -rf '" + dir + "/checkpoints'").c_str());
  ASSERT_EQ(run_moe("eval " + dir, &out), 2) << out;
  EXPECT_NE(out.find("no valid checkpoint"), std::string::npos) << out;
}
