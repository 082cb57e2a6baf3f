// The `moe` program's subcommands. Each returns a process exit code and may
// throw moe::Error (mapped to exit codes by main).
#pragma once
#include <string>
#include <vector>

namespace moe::apps {

struct ConfigArgs {
  std::string action;  // show | check | keys
  std::string config_path;
  std::vector<std::string> overrides;
  bool markdown = false;  // keys: print a Markdown table
};
int run_config(const ConfigArgs& args);

struct TrainArgs {
  std::string config_path;
  std::vector<std::string> overrides;
  int ranks = 0;
  std::string out_dir;
  std::string resume_dir;
};
int run_train(const TrainArgs& args);

struct BenchArgs {
  std::string what;  // comm | layer | calibrate
  std::string config_path;
  std::vector<std::string> overrides;
  int ranks = 0;
  bool json = false;
  std::string dump_dir;
  std::string out_path;  // calibrate: hardware profile to write ("" = print)
};
int run_bench(const BenchArgs& args);
int run_calibrate(const BenchArgs& args);

struct SweepArgs {
  std::string sweep_path;
  std::string out_dir;
  bool predict = false;
};
int run_sweep(const SweepArgs& args);

struct CkptArgs {
  std::string action;  // info | export | import | upcycle | prune
  std::vector<std::string> paths;
  std::string safetensors;
  std::string hf;           // export/import: a Hugging Face Mixtral directory
  int64_t experts = 0;      // upcycle: experts per MoE layer
  int64_t seed = 1234;      // upcycle: router initialisation
  std::string config_path;  // prune: the run's config
  double threshold = 0.5;   // prune: relative importance below which experts go
  int64_t batches = 8;      // prune: data sample size in micro-batches
};
int run_ckpt(const CkptArgs& args);

struct EvalArgs {
  std::string run_dir;
  std::vector<std::string> overrides;
  int ranks = 0;
  bool json = false;
};
int run_eval(const EvalArgs& args);
struct GenerateArgs {
  std::string run_dir;
  std::string prompt;
  int64_t tokens = 64;
  double temperature = 1.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = all tokens
  uint64_t seed = 0;
};
int run_generate(const GenerateArgs& args);

// For subcommands whose work lands later: says so and returns exit code 1.
int not_implemented(const std::string& what);

}  // namespace moe::apps
