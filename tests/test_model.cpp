// The model after training: grouped-query attention, KV-cached decoding,
// sampling (`moe generate`), and Hugging Face Mixtral export / import checked
// against an independent Python reference (tests/hf_mixtral_reference.py).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/model/generate.h"
#include "moe/model/transformer.h"
#include "moe/parallel/checkpoint.h"
#include "moe/parallel/hf_mixtral.h"
#include "moe/parallel/safetensors.h"
#include "test_support.h"

using namespace moe;
using moe::testing_support::run_moe;

namespace {

std::string fresh_dir(const std::string& name) {
  std::string d = testing::TempDir() + "moe_model_" + name + "_" + std::to_string(::getpid());
  std::system(("rm -rf '" + d + "'").c_str());
  return d;
}

// 4 query heads of width 8 over 2 key/value heads; dropless.
Config model_config(std::vector<std::string> extra = {}) {
  std::vector<std::string> ov = {"model.vocab=32", "model.d_model=32", "model.layers=2",
                                 "model.heads=4",  "model.kv_heads=2", "model.seq_len=12",
                                 "moe.experts=4",  "moe.top_k=2",      "moe.d_expert=24",
                                 "moe.capacity_factor=0"};
  ov.insert(ov.end(), extra.begin(), extra.end());
  return default_config(ov);
}

torch::Tensor random_tokens(int64_t B, int64_t S, int64_t vocab, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randint(vocab, {B, S}, torch::kInt64);
}

// Every "param." / "buffer." tensor of the newest checkpoint of a run, experts keyed globally.
std::map<std::string, torch::Tensor> checkpoint_tensors(const std::string& run_dir) {
  const std::string dir = find_checkpoint(run_dir);
  EXPECT_FALSE(dir.empty()) << run_dir;
  nlohmann::json manifest;
  std::ifstream(dir + "/manifest.json") >> manifest;
  std::map<std::string, torch::Tensor> all;
  for (auto it = manifest["files"].begin(); it != manifest["files"].end(); ++it)
    for (auto& [k, v] : read_safetensors(dir + "/" + it.key()))
      if (k.rfind("param.", 0) == 0 || k.rfind("buffer.", 0) == 0) all[k] = v;
  return all;
}

// Our logits for `tokens` from the newest checkpoint of a run, loaded at EP 1.
torch::Tensor run_logits(const std::string& run_dir, const torch::Tensor& tokens) {
  const Config cfg = load_config(run_dir + "/config.yaml",
                                 {"parallel.ranks=0", "parallel.ep=0", "parallel.dp=0"});
  torch::Tensor logits;
  comm::run_ranks(1, 60.0, [&](comm::Communicator& world) {
    comm::ProcessMesh mesh(world, 1, 1);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    load_checkpoint(run_dir, model, nullptr, mesh, cfg);
    torch::NoGradGuard ng;
    logits = model.forward(tokens, /*training=*/false).logits;
  });
  return logits;
}

std::string source(const std::string& relative) {
  return std::string(MOE_SOURCE_DIR) + "/" + relative;
}

}  // namespace

// kv_heads 2 of 4 heads computes what full multi-head attention computes
// when each query head's key/value columns are copies of its group's
// (query head h reads key/value head h / 2, Hugging Face's repeat_kv order).
TEST(ModelAttention, GroupedQueryHeadsReadTheirGroupsKeysAndValues) {
  auto solo = comm::ThreadComm::create_world(1, 30.0);
  const int64_t D = 32, hd = 8;
  for (const char* impl : {"auto", "explicit"}) {
    SCOPED_TRACE(impl);
    const std::string att = std::string("model.attention=") + impl;
    TransformerLM gqa(model_config({att}), *solo[0], 5);
    TransformerLM full(model_config({att, "model.kv_heads=0"}), *solo[0], 5);
    {
      torch::NoGradGuard ng;
      auto src = gqa.named_parameters();
      for (auto& p : full.named_parameters()) {
        const torch::Tensor from = src[p.key()];
        if (p.key().find("wqkv") == std::string::npos) {
          p.value().copy_(from);
          continue;
        }
        ASSERT_EQ(from.sizes().vec(), (std::vector<int64_t>{D, D + 2 * 2 * hd}));
        std::vector<torch::Tensor> cols = {from.narrow(1, 0, D)};
        for (int64_t part : {0, 1})  // k, v
          for (int64_t h = 0; h < 4; ++h)
            cols.push_back(from.narrow(1, D + part * 2 * hd + (h / 2) * hd, hd));
        p.value().copy_(torch::cat(cols, 1));
      }
    }
    torch::NoGradGuard ng;
    const torch::Tensor tokens = random_tokens(2, 12, 32, 1);
    const torch::Tensor a = gqa.forward(tokens, false).logits, b = full.forward(tokens, false).logits;
    EXPECT_TRUE(torch::allclose(a, b, 1e-5, 1e-5)) << (a - b).abs().max().item<double>();
  }
  // 2 key/value heads make k and v half as wide as q.
  EXPECT_EQ(TransformerLM(model_config(), *solo[0], 5).named_parameters()["layers.0.wqkv"].size(1),
            D + 2 * 16);
}

// Decoding with the KV cache, piece by piece (a prompt, single tokens, and a
// chunk of several tokens after the cache), gives the logits of one full
// forward, with SDPA and the explicit product, grouped and not.
TEST(ModelAttention, CachedDecodingEqualsTheFullForward) {
  auto solo = comm::ThreadComm::create_world(1, 30.0);
  for (const char* kv : {"model.kv_heads=2", "model.kv_heads=0"})
    for (const char* impl : {"model.attention=auto", "model.attention=explicit"}) {
      SCOPED_TRACE(std::string(kv) + " " + impl);
      TransformerLM model(model_config({kv, impl}), *solo[0], 9);
      torch::NoGradGuard ng;
      const torch::Tensor tokens = random_tokens(2, 12, 32, 2);
      const torch::Tensor full = model.forward(tokens, false).logits;
      KVCache cache;
      std::vector<torch::Tensor> pieces;
      for (auto [from, to] : std::vector<std::pair<int64_t, int64_t>>{
               {0, 5}, {5, 6}, {6, 7}, {7, 10}, {10, 12}}) {
        pieces.push_back(model.forward(tokens.narrow(1, from, to - from), false, 0, &cache).logits);
        EXPECT_EQ(cache.length, to);
      }
      const torch::Tensor cached = torch::cat(pieces, 1);
      EXPECT_TRUE(torch::allclose(cached, full, 1e-5, 1e-5))
          << "max |diff| " << (cached - full).abs().max().item<double>();
      // The cache is full at model.seq_len = 12.
      EXPECT_THROW(model.forward(tokens.narrow(1, 0, 1), false, 0, &cache), ShapeError);
    }
}

TEST(ModelGenerate, GreedyIsTheArgmaxOfTheFullForwardAndSeedsRepeat) {
  auto solo = comm::ThreadComm::create_world(1, 30.0);
  TransformerLM model(model_config(), *solo[0], 3);
  const std::vector<int64_t> prompt = {4, 9, 1};
  SamplingOptions greedy;
  greedy.tokens = 9;  // prompt + 9 = seq_len: no window shift
  greedy.temperature = 0;
  const std::vector<int64_t> got = generate(model, prompt, greedy);
  std::vector<int64_t> want = prompt;
  {
    torch::NoGradGuard ng;
    for (int i = 0; i < 9; ++i) {
      torch::Tensor logits = model.forward(torch::tensor(want).view({1, -1}), false).logits;
      want.push_back(logits[0][-1].argmax().item<int64_t>());
    }
  }
  EXPECT_EQ(got, std::vector<int64_t>(want.begin() + 3, want.end()));
  // top-k 1 at temperature 1 can only draw the argmax.
  SamplingOptions top1;
  top1.tokens = 9;
  top1.top_k = 1;
  EXPECT_EQ(generate(model, prompt, top1), got);
  // Sampling: the same seed draws the same tokens, another seed others;
  // beyond seq_len the window shifts and generation goes on.
  SamplingOptions s;
  s.tokens = 30;
  s.seed = 11;
  std::vector<int64_t> streamed;
  const auto a = generate(model, prompt, s, [&](int64_t t) { streamed.push_back(t); });
  ASSERT_EQ(a.size(), 30u);
  EXPECT_EQ(streamed, a);
  EXPECT_EQ(generate(model, prompt, s), a);
  s.seed = 12;
  EXPECT_NE(generate(model, prompt, s), a);
  for (int64_t t : a) EXPECT_TRUE(t >= 0 && t < 32) << t;
  // Bad input is a UsageError naming the problem.
  EXPECT_THROW(generate(model, {}, s), UsageError);
  try {
    generate(model, {3, 32}, s);
    ADD_FAILURE() << "an out-of-range prompt token was accepted";
  } catch (const UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("prompt token 1 = 32 is outside [0, 32)"),
              std::string::npos)
        << e.what();
  }
}

// `moe generate` on a byte-level run trained at EP 2, loaded at EP 1.
TEST(ModelGenerate, CliSamplesTextFromACheckpointSavedAtEp2) {
  const std::string dir = fresh_dir("generate");
  std::string out;
  ASSERT_EQ(run_moe("train " + source("configs/tiny.yaml") +
                        " data.kind=text model.vocab=256 train.steps=3 --ranks 2 --out " + dir,
                    &out),
            0)
      << out;
  const std::string cmd = "generate " + dir + " --prompt 'Fortune: ' --tokens 24 --top-k 40";
  std::string a, b, c;
  ASSERT_EQ(run_moe(cmd + " --seed 3", &a, "MOE_LOG_LEVEL=warn"), 0) << a;
  ASSERT_EQ(run_moe(cmd + " --seed 3", &b, "MOE_LOG_LEVEL=warn"), 0) << b;
  ASSERT_EQ(run_moe(cmd + " --seed 4", &c, "MOE_LOG_LEVEL=warn"), 0) << c;
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  const auto at = a.find("Fortune: ");
  ASSERT_NE(at, std::string::npos) << a;
  EXPECT_GE(a.size(), at + 9 + 24) << a;  // the prompt, then 24 bytes
  // A byte-level model reads any text; a token id out of range, a missing run are exit 2.
  EXPECT_EQ(run_moe("generate " + dir + " --prompt x --temperature -1"), 2);
  EXPECT_EQ(run_moe("generate /nonexistent/run --prompt x", &out), 2);
  EXPECT_NE(out.find("has no config.yaml"), std::string::npos) << out;
}

TEST(HfMixtral, ExportRefusesEachPropertyMixtralLacks) {
  EXPECT_NO_THROW(check_mixtral_expressible(model_config({"moe.temperature=0.5"})));
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"model.dense=true", "model.dense = true"},
      {"model.moe_every=2", "model.moe_every = 2"},
      {"moe.shared_experts=1", "moe.shared_experts = 1"},
      {"moe.score_fn=sigmoid", "moe.score_fn = sigmoid"},
      {"moe.n_groups=2", "group-limited routing"},
      {"moe.renormalize=false", "moe.renormalize = false"},
      {"moe.top_k=1", "moe.top_k = 1"},
      {"moe.activation=gelu", "moe.activation = gelu"},
      {"moe.bias_update_rate=0.01", "moe.bias_update_rate"},
  };
  for (const auto& [override_, property] : cases) {
    SCOPED_TRACE(override_);
    try {
      check_mixtral_expressible(model_config({override_}));
      ADD_FAILURE() << "accepted";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(property), std::string::npos) << e.what();
    }
  }
}

// `moe ckpt export --hf` of runs trained at EP 2; an independent Python
// Mixtral (Hugging Face's conventions) computes the same logits to 1e-4.
// Then the export, split into shards as Hugging Face writes large models,
// imports back bit-exactly with a matching config.yaml, and generates.
TEST(HfMixtral, ExportMatchesTheIndependentReferenceAndShardedImportRoundTrips) {
  struct Case {
    std::string name, overrides;
  };
  const std::string shapes =
      " model.vocab=72 model.d_model=64 model.heads=4 moe.capacity_factor=0 train.steps=3";
  for (const Case& c :
       {Case{"untied_gqa_temp", " model.kv_heads=2 model.tie_embeddings=false moe.temperature=0.5"},
        Case{"tied_mqa", " model.kv_heads=1 model.rope_theta=500"}}) {
    SCOPED_TRACE(c.name);
    const std::string run = fresh_dir("hf_" + c.name), hf = run + "_hf";
    std::string out;
    ASSERT_EQ(run_moe("train " + source("configs/tiny.yaml") + shapes + c.overrides +
                          " --ranks 2 --out " + run,
                      &out),
              0)
        << out;
    ASSERT_EQ(run_moe("ckpt export " + run + " --hf " + hf, &out), 0) << out;
    nlohmann::json cfg;
    std::ifstream(hf + "/config.json") >> cfg;
    EXPECT_EQ(cfg["model_type"].get<std::string>(), "mixtral");
    EXPECT_EQ(cfg["architectures"][0].get<std::string>(), "MixtralForCausalLM");
    EXPECT_EQ(cfg["intermediate_size"].get<int64_t>(), 64);
    EXPECT_EQ(cfg["num_local_experts"].get<int64_t>(), 4);
    EXPECT_EQ(cfg["num_experts_per_tok"].get<int64_t>(), 2);
    EXPECT_EQ(cfg["hidden_act"].get<std::string>(), "silu");
    EXPECT_FALSE(cfg["output_router_logits"].get<bool>());
    // Our logits (loaded at EP 1) against the reference's.
    const torch::Tensor tokens = random_tokens(2, 32, 72, 4);
    const std::string dump = run + "_logits.safetensors";
    write_safetensors(dump, {{"tokens", tokens}, {"logits", run_logits(run, tokens)}});
    std::string ref;
    const int rc = testing_support::run_command(
        "/usr/bin/python3 " + source("tests/hf_mixtral_reference.py") + " " + hf + " " + dump +
            " --tol 1e-4",
        &ref);
    EXPECT_EQ(rc, 0) << ref << "(needs Debian's python3-torch: launch/install-deps.sh)";
    std::printf("[ reference ] %s: %s", c.name.c_str(), ref.c_str());
    if (c.name != "tied_mqa") continue;  // temperature 1: the router round-trips bit-exactly

    // Shard model.safetensors into 3 files + index, as save_pretrained does.
    const std::string sharded = run + "_sharded", back = run + "_imported";
    std::system(("mkdir -p '" + sharded + "' && cp '" + hf + "/config.json' '" + sharded + "/'")
                    .c_str());
    std::vector<std::map<std::string, torch::Tensor>> shards(3);
    nlohmann::json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", nlohmann::json::object()}};
    int i = 0;
    for (auto& [k, v] : read_safetensors(hf + "/model.safetensors")) {
      const std::string file = "model-0000" + std::to_string(i % 3 + 1) + "-of-00003.safetensors";
      shards[i % 3][k] = v;
      index["weight_map"][k] = file;
      ++i;
    }
    for (int s = 0; s < 3; ++s)
      write_safetensors(sharded + "/model-0000" + std::to_string(s + 1) + "-of-00003.safetensors",
                        shards[s]);
    std::ofstream(sharded + "/model.safetensors.index.json") << index.dump(2);
    ASSERT_EQ(run_moe("ckpt import " + back + " --hf " + sharded, &out), 0) << out;
    auto a = checkpoint_tensors(run), b = checkpoint_tensors(back);
    ASSERT_EQ(a.size(), b.size());
    for (auto& [k, v] : a) {
      ASSERT_TRUE(b.count(k)) << k;
      EXPECT_TRUE(torch::equal(v, b[k])) << k;
    }
    const Config orig = load_config(run + "/config.yaml"), imported = load_config(back + "/config.yaml");
    EXPECT_EQ(imported.model.kv_heads, 1);
    EXPECT_EQ(imported.model.rope_theta, 500.0);
    EXPECT_EQ(imported.model.tie_embeddings, true);
    EXPECT_EQ(imported.model.seq_len, orig.model.seq_len);
    EXPECT_EQ(imported.model.norm_eps, orig.model.norm_eps);
    EXPECT_EQ(imported.moe.d_expert, orig.moe.d_expert);
    EXPECT_EQ(imported.moe.aux_loss_coef, orig.moe.aux_loss_coef);
    // The imported model computes the original's logits, and generates token ids (synthetic data).
    EXPECT_TRUE(torch::equal(run_logits(back, tokens), run_logits(run, tokens)));
    ASSERT_EQ(run_moe("generate " + back + " --prompt '1, 2 3' --tokens 4", &out,
                      "MOE_LOG_LEVEL=warn"),
              0)
        << out;
    EXPECT_TRUE(std::regex_search(out, std::regex(R"(^1 2 3 \d+ \d+ \d+ \d+ *\n)"))) << out;
    EXPECT_EQ(run_moe("generate " + back + " --prompt 'one two'", &out), 2);
    EXPECT_NE(out.find("'one' is not a token id"), std::string::npos) << out;
    // Bad directories are exit 2 naming the problem: a shard missing, a
    // tensor missing from its shard, a run directory holding another model.
    EXPECT_EQ(run_moe("ckpt import " + back + " --hf " + sharded, &out), 0) << out;  // same model
    std::string bad_index = index.dump();
    std::ofstream(sharded + "/model.safetensors.index.json")
        << std::regex_replace(bad_index, std::regex("model-00003-of"), "model-00009-of");
    EXPECT_EQ(run_moe("ckpt import " + back + "_2 --hf " + sharded, &out), 2);
    EXPECT_NE(out.find("names shard 'model-00009-of-00003.safetensors', which is missing"),
              std::string::npos)
        << out;
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00003.safetensors";
    std::ofstream(sharded + "/model.safetensors.index.json") << index.dump();
    EXPECT_EQ(run_moe("ckpt import " + back + "_3 --hf " + sharded, &out), 2);
    EXPECT_NE(out.find("lacks tensor 'model.layers.0.extra.weight'"), std::string::npos) << out;
    // The same checkpoint under a config Mixtral cannot express: exit 2 naming the property.
    const std::string sigmoid = run + "_sigmoid";
    std::system(("mkdir -p '" + sigmoid + "' && cp -r '" + run + "/checkpoints' '" + sigmoid + "/'")
                    .c_str());
    std::ofstream(sigmoid + "/config.yaml")
        << dump_config(load_config(run + "/config.yaml", {"moe.score_fn=sigmoid"}));
    EXPECT_EQ(run_moe("ckpt export " + sigmoid + " --hf " + sigmoid + "_hf", &out), 2);
    EXPECT_NE(out.find("ConfigError: cannot export to Hugging Face Mixtral: moe.score_fn = sigmoid"),
              std::string::npos)
        << out;
    EXPECT_EQ(run_moe("ckpt import " + run + " --hf " + hf, &out), 2);  // the trained run's config
    EXPECT_NE(out.find("already has a config.yaml"), std::string::npos) << out;
  }
}
