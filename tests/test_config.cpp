#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include "moe/config/config.h"
#include "moe/core/error.h"
#include "test_support.h"

using namespace moe;

namespace {

std::string src(const std::string& rel) {
  return std::string(MOE_SOURCE_DIR) + "/" + rel;
}

// Expects load_config_text(yaml) to throw ConfigError whose message contains
// every one of `needles`.
void expect_config_error(const std::string& yaml, const std::vector<std::string>& needles,
                         const std::vector<std::string>& overrides = {}) {
  try {
    load_config_text(yaml, "test.yaml", overrides);
    ADD_FAILURE() << "no ConfigError for:\n" << yaml;
  } catch (const ConfigError& e) {
    std::string what = e.what();
    for (const auto& n : needles)
      EXPECT_NE(what.find(n), std::string::npos) << "'" << n << "' not in: " << what;
  }
}

struct Malformed {
  const char* name;
  const char* yaml;
  std::vector<std::string> needles;
};

}  // namespace

TEST(ConfigLoad, DefaultsAreValid) {
  Config c = default_config();
  EXPECT_EQ(c.moe.top_k, 2);
  EXPECT_EQ(c.parallel.backend, Backend::Auto);
  EXPECT_NO_THROW(validate_config(c));
}

TEST(ConfigLoad, ShippedConfigsValidate) {
  for (const char* f :
       {"configs/tiny.yaml", "configs/quickstart.yaml", "configs/mixtral-8x7b.yaml",
        "configs/deepseek-fine.yaml", "configs/bench/coarse.yaml", "configs/bench/fine.yaml"}) {
    SCOPED_TRACE(f);
    EXPECT_NO_THROW(load_config(src(f)));
  }
  Config mixtral = load_config(src("configs/mixtral-8x7b.yaml"));
  EXPECT_EQ(mixtral.model.d_model, 4096);
  EXPECT_EQ(mixtral.moe.experts, 8);
  EXPECT_EQ(mixtral.moe.d_expert, 14336);
  Config ds = load_config(src("configs/deepseek-fine.yaml"));
  EXPECT_EQ(ds.moe.experts, 256);
  EXPECT_EQ(ds.moe.top_k, 8);
  EXPECT_EQ(ds.moe.score_fn, ScoreFn::Sigmoid);
  Config q = load_config(src("configs/quickstart.yaml"));
  EXPECT_EQ(q.parallel.ranks, 4);
  EXPECT_EQ(resolve_layout(q, 4).ep, 4);
}

TEST(ConfigLoad, ValuesOfEveryType) {
  Config c = load_config_text(
      "model: {dense: true, norm_eps: 1e-6}\nmoe: {activation: gelu, temperature: 0.5}\n"
      "bench: {sizes_kib: [2, 8]}\ntrain: {steps: 7}\n",
      "t");
  EXPECT_TRUE(c.model.dense);
  EXPECT_DOUBLE_EQ(c.model.norm_eps, 1e-6);
  EXPECT_EQ(c.moe.activation, Activation::GELU);
  EXPECT_DOUBLE_EQ(c.moe.temperature, 0.5);
  EXPECT_EQ(c.bench.sizes_kib, (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(c.train.steps, 7);
  EXPECT_EQ(c.model.d_model, ModelConfig{}.d_model);  // untouched keys keep defaults
}

TEST(ConfigLoad, MalformedInputsGiveConfigErrorsNamingTheKey) {
  const std::vector<Malformed> cases = {
      {"yaml syntax: unclosed flow", "moe: {experts: 8\n", {"test.yaml", "YAML syntax error"}},
      {"yaml syntax: bad indent", "moe:\n  experts: 8\n top_k: 2\n", {"test.yaml", "line"}},
      {"yaml syntax: tab mixing", "moe:\n\t- experts: [\n", {"test.yaml"}},
      {"empty file", "", {"test.yaml", "empty"}},
      {"only comments", "# nothing here\n", {"empty"}},
      {"null document", "~\n", {"empty"}},
      {"binary garbage",
       std::string("\x7f"
                   "ELF\x02\x01\x01\x00\x00",
                   9)
           .c_str(),
       {"test.yaml"}},
      {"top level is a list", "- model\n- moe\n", {"top level must be a mapping"}},
      {"top level is a scalar", "hello\n", {"top level must be a mapping"}},
      {"unknown section",
       "modle:\n  vocab: 3\n",
       {"unknown section 'modle'", "did you mean 'model'"}},
      {"unknown key with suggestion",
       "moe:\n  expertz: 8\n",
       {"moe.expertz", "did you mean 'moe.experts'"}},
      {"key in wrong section", "model:\n  top_k: 2\n", {"model.top_k", "moe.top_k"}},
      {"section is a scalar", "moe: 5\n", {"section 'moe'", "mapping"}},
      {"section is a list", "train: [1, 2]\n", {"section 'train'"}},
      {"int given a word",
       "moe:\n  experts: eight\n",
       {"moe.experts", "expected an integer", "'eight'", "line 2"}},
      {"int given a float", "moe:\n  top_k: 1.5\n", {"moe.top_k", "expected an integer"}},
      {"int given a list", "model:\n  layers: [1]\n", {"model.layers", "a list"}},
      {"int given a map", "model:\n  heads: {a: 1}\n", {"model.heads", "a mapping"}},
      {"int overflow",
       "train:\n  steps: 99999999999999999999999\n",
       {"train.steps", "expected an integer"}},
      {"float given a word", "train:\n  lr: fast\n", {"train.lr", "expected a number"}},
      {"bool given a number", "model:\n  dense: 2\n", {"model.dense", "true or false"}},
      {"string given a list",
       "moe:\n  activation: [relu]\n",
       {"moe.activation", "expected a string"}},
      {"list given a scalar", "bench:\n  sizes_kib: 4\n", {"bench.sizes_kib", "list of integers"}},
      {"list with a word",
       "bench:\n  sizes_kib: [1, two]\n",
       {"bench.sizes_kib[1]", "expected an integer"}},
      {"negative size", "model:\n  d_model: -4\n", {"model.d_model = -4", "out of range"}},
      {"zero experts", "moe:\n  experts: 0\n", {"moe.experts = 0", "out of range"}},
      {"zero steps", "train:\n  steps: 0\n", {"train.steps = 0"}},
      {"negative lr", "train:\n  lr: -0.1\n", {"train.lr = -0.1"}},
      {"zero lr", "train:\n  lr: 0\n", {"train.lr = 0"}},
      {"zero temperature", "moe:\n  temperature: 0\n", {"moe.temperature = 0"}},
      {"zero timeout", "parallel:\n  timeout_s: 0\n", {"parallel.timeout_s"}},
      {"negative capacity factor", "moe:\n  capacity_factor: -1\n", {"moe.capacity_factor = -1"}},
      {"beta2 of one", "train:\n  beta2: 1.0\n", {"train.beta2"}},
      {"bad choice with suggestion",
       "moe:\n  activation: swigl\n",
       {"moe.activation = 'swigl'", "did you mean 'swiglu'"}},
      {"bad backend",
       "parallel:\n  backend: gloo\n",
       {"parallel.backend = 'gloo'", "auto | thread | mpi | nccl"}},
      {"bad drop policy", "moe:\n  drop_policy: random\n", {"moe.drop_policy"}},
      {"top_k > experts", "moe:\n  experts: 4\n  top_k: 5\n", {"moe.top_k = 5", "moe.experts = 4"}},
      {"experts not divisible by ep",
       "moe:\n  experts: 6\nparallel:\n  ep: 4\n",
       {"moe.experts = 6", "parallel.ep = 4"}},
      {"ep*dp != ranks",
       "parallel:\n  ranks: 4\n  ep: 2\n  dp: 1\n",
       {"parallel.ep * parallel.dp", "parallel.ranks = 4"}},
      {"ep does not divide ranks",
       "parallel:\n  ranks: 6\n  ep: 4\nmoe:\n  experts: 8\n",
       {"parallel.ep = 4", "parallel.ranks = 6"}},
      {"d_model not divisible by heads",
       "model:\n  d_model: 100\n  heads: 3\n",
       {"model.d_model = 100", "model.heads = 3"}},
      {"odd head dim", "model:\n  d_model: 12\n  heads: 4\n", {"must be even"}},
      {"kv_heads not dividing heads",
       "model:\n  heads: 4\n  kv_heads: 3\n",
       {"model.kv_heads = 3", "model.heads = 4"}},
      {"negative kv_heads", "model:\n  kv_heads: -1\n", {"model.kv_heads"}},
      {"moe_every beyond layers", "model:\n  layers: 2\n  moe_every: 3\n", {"model.moe_every = 3"}},
      {"groups do not divide experts", "moe:\n  experts: 8\n  n_groups: 3\n", {"moe.n_groups = 3"}},
      {"topk_groups > n_groups",
       "moe:\n  n_groups: 2\n  topk_groups: 3\n",
       {"moe.topk_groups = 3"}},
      {"top_k beyond reachable groups",
       "moe:\n  experts: 8\n  n_groups: 4\n  topk_groups: 1\n  top_k: 3\n",
       {"moe.top_k = 3", "moe.topk_groups"}},
      {"text data with empty path", "data:\n  kind: text\n  path: ''\n", {"data.path"}},
      {"text data with small vocab",
       "data:\n  kind: text\nmodel:\n  vocab: 64\n",
       {"model.vocab = 64", "256"}},
      {"sizes not increasing",
       "bench:\n  sizes_kib: [4, 4]\n",
       {"bench.sizes_kib", "strictly increasing"}},
      {"empty size list", "bench:\n  sizes_kib: []\n", {"bench.sizes_kib is empty"}},
      {"zero in size list", "bench:\n  sizes_kib: [0, 4]\n", {"bench.sizes_kib[0] = 0"}},
      {"bad sweep launcher", "sweep:\n  launcher: slurm\n", {"sweep.launcher = 'slurm'"}},
  };
  ASSERT_GE(cases.size(), 30u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    expect_config_error(c.yaml, c.needles);
  }
}

TEST(ConfigLoad, MissingFileNamesThePath) {
  try {
    load_config("/nonexistent/dir/cfg.yaml");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dir/cfg.yaml"), std::string::npos);
    EXPECT_EQ(e.exit_code(), kExitBadInput);
  }
}

TEST(ConfigLoad, DirectoryInsteadOfFile) {
  EXPECT_THROW(load_config(src("configs")), ConfigError);
}

TEST(ConfigLoad, BinaryFileOnDisk) {
  std::string path = testing::TempDir() + "/garbage.yaml";
  {
    std::ofstream out(path, std::ios::binary);
    for (int i = 0; i < 256; ++i) out.put(static_cast<char>(i));
  }
  try {
    load_config(path);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("binary"), std::string::npos);
  }
}

TEST(ConfigOverrides, SetValuesAndLists) {
  Config c = load_config(src("configs/tiny.yaml"),
                         {"moe.top_k=3", "bench.sizes_kib=[1,2,3]", "model.dense=true",
                          "train.lr=1e-3", "data.path=/tmp/x y"});
  EXPECT_EQ(c.moe.top_k, 3);
  EXPECT_EQ(c.bench.sizes_kib, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_TRUE(c.model.dense);
  EXPECT_DOUBLE_EQ(c.train.lr, 1e-3);
  EXPECT_EQ(c.data.path, "/tmp/x y");
}

TEST(ConfigOverrides, LaterOverrideWins) {
  Config c = default_config({"train.steps=5", "train.steps=9"});
  EXPECT_EQ(c.train.steps, 9);
}

TEST(ConfigOverrides, CreatesMissingSection) {
  Config c = load_config_text("model:\n  vocab: 300\n", "t", {"sweep.steps=4"});
  EXPECT_EQ(c.sweep.steps, 4);
  EXPECT_EQ(c.model.vocab, 300);
}

TEST(ConfigOverrides, ErrorsNameTheKeyAndTheCommandLine) {
  expect_config_error("model: {}\n", {"moe.nosuchkey"}, {"moe.nosuchkey=1"});
  expect_config_error("model: {}\n", {"moe.top_k = 99", "moe.experts"}, {"moe.top_k=99"});
  expect_config_error("model: {}\n", {"moe.top_k", "command-line override"}, {"moe.top_k=abc"});
  expect_config_error("model: {}\n", {"not of the form section.key=value"}, {"justaword"});
  expect_config_error("model: {}\n", {"must be section.key"}, {"top_k=2"});
  expect_config_error("model: {}\n", {"must be section.key"}, {"a.b.c=2"});
  expect_config_error("model: {}\n", {"not valid YAML"}, {"bench.sizes_kib=[1,"});
  expect_config_error("model: {}\n", {"unknown section 'mo'"}, {"mo.top_k=1"});
}

TEST(ConfigDump, RoundTripsExactly) {
  for (const char* f :
       {"configs/tiny.yaml", "configs/quickstart.yaml", "configs/deepseek-fine.yaml"}) {
    SCOPED_TRACE(f);
    Config a = load_config(src(f), {"train.lr=0.000123456789", "moe.temperature=0.3"});
    std::string dumped = dump_config(a);
    Config b = load_config_text(dumped, "dump");
    EXPECT_TRUE(a == b) << dumped;
    EXPECT_EQ(dumped, dump_config(b));
    EXPECT_EQ(config_hash(a), config_hash(b));
  }
}

TEST(ConfigDump, HashChangesWithAnyValue) {
  Config a = default_config();
  Config b = default_config({"moe.capacity_factor=1.5"});
  EXPECT_NE(config_hash(a), config_hash(b));
  EXPECT_FALSE(a == b);
}

TEST(ConfigKeys, EveryKeyDocumentedAndInReadme) {
  std::ifstream in(src("README.md"));
  std::stringstream readme;
  readme << in.rdbuf();
  ASSERT_FALSE(readme.str().empty());
  for (const auto& k : config_keys()) {
    EXPECT_FALSE(k.doc.empty()) << k.key;
    std::string name = "`" + k.section + "." + k.key + "`";
    EXPECT_NE(readme.str().find(name), std::string::npos)
        << name << " missing from README config table";
  }
}

TEST(ConfigLayout, ResolvesAutoAndChecksWorld) {
  Config c = default_config();
  auto l = resolve_layout(c, 4);
  EXPECT_EQ(l.ep, 4);
  EXPECT_EQ(l.dp, 1);
  l = resolve_layout(default_config({"parallel.ep=2"}), 4);
  EXPECT_EQ(l.dp, 2);
  l = resolve_layout(default_config({"parallel.dp=4"}), 4);
  EXPECT_EQ(l.ep, 1);
  EXPECT_THROW(resolve_layout(default_config({"parallel.ep=3", "moe.experts=9"}), 4), ConfigError);
  EXPECT_THROW(resolve_layout(default_config({"parallel.ranks=2"}), 4), ConfigError);
  EXPECT_THROW(resolve_layout(default_config({"moe.experts=6"}), 4), ConfigError);
}

TEST(ConfigLayout, ClosestMatch) {
  EXPECT_EQ(closest_match("expertz", {"experts", "top_k"}), "experts");
  EXPECT_EQ(closest_match("zzzzzzzz", {"experts", "top_k"}), "");
}

// The program itself: exit codes and one-line stderr.
namespace {
struct RunResult {
  int code;
  std::string out;
};
RunResult run_moe(const std::string& args) {
  RunResult r;
  r.code = moe::testing_support::run_moe(args, &r.out);
  return r;
}
}  // namespace

TEST(ProgramCli, ConfigShowAppliesOverride) {
  auto r = run_moe("config show " + src("configs/tiny.yaml") + " moe.top_k=3");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("top_k: 3"), std::string::npos) << r.out;
}

TEST(ProgramCli, BadOverridesExitTwoWithOneLine) {
  for (const char* ov : {"moe.top_k=99", "moe.nosuchkey=1"}) {
    auto r = run_moe("config show " + src("configs/tiny.yaml") + " " + ov);
    EXPECT_EQ(r.code, 2) << r.out;
    std::string key = std::string(ov).substr(0, std::string(ov).find('='));
    EXPECT_NE(r.out.find(key), std::string::npos) << r.out;
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  }
}

TEST(ProgramCli, ConfigCheckExitCodes) {
  EXPECT_EQ(run_moe("config check " + src("configs/quickstart.yaml")).code, 0);
  EXPECT_EQ(run_moe("config check /nonexistent.yaml").code, 2);
  EXPECT_EQ(run_moe("frobnicate").code, 2);
  EXPECT_EQ(run_moe("--help").code, 0);
  auto help = run_moe("--help");
  for (const char* sub : {"train", "bench", "sweep", "config", "ckpt", "generate"})
    EXPECT_NE(help.out.find(sub), std::string::npos) << sub;
}

TEST(ProgramCli, ShowOutputIsAValidConfig) {
  auto r = run_moe("config show " + src("configs/quickstart.yaml") + " train.steps=17");
  ASSERT_EQ(r.code, 0);
  Config c = load_config_text(r.out, "show-output");
  EXPECT_EQ(c.train.steps, 17);
  EXPECT_TRUE(c == load_config(src("configs/quickstart.yaml"), {"train.steps=17"}));
}
