// `moe`: one program, subcommands train | eval | generate | bench | sweep | config | ckpt.
// Thin: parse arguments, call the subcommand, map errors to exit codes.
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <iostream>

#include "moe/apps/commands.h"
#include "moe/comm/launch.h"
#include "moe/core/allocator.h"
#include "moe/core/error.h"

namespace {

// The first positional of `config show`/`bench` etc. is the config; the rest
// are section.key=value overrides.
void split_config_and_overrides(std::vector<std::string>& positionals, std::string* config,
                                std::vector<std::string>* overrides) {
  for (auto& p : positionals) {
    if (config->empty() && p.find('=') == std::string::npos)
      *config = p;
    else
      overrides->push_back(p);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace moe;
  // Tensors of the same sizes are reallocated every step: reuse large blocks
  // instead of paying page faults on fresh memory (see core/allocator.h).
  // MOE_CPU_CACHE_MB bounds the idle memory kept (0 turns the cache off).
  int64_t cache_mb = 4096;
  if (const char* v = std::getenv("MOE_CPU_CACHE_MB")) cache_mb = std::atoll(v);
  if (cache_mb > 0) install_caching_cpu_allocator(cache_mb << 20);
  CLI::App app{"moe: train Mixture-of-Experts models with expert parallelism", "moe"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moe 0.1.0");
  app.footer(
      "Exit codes: 0 ok, 2 bad input (usage, config, data, checkpoint), 3 communication failure, 1 "
      "other.");

  // train
  apps::TrainArgs train;
  std::vector<std::string> train_pos;
  auto* train_cmd = app.add_subcommand("train", "Train an MoE language model");
  train_cmd->add_option("config_and_overrides", train_pos, "CONFIG [section.key=value ...]")
      ->required();
  train_cmd->add_option("--ranks", train.ranks, "simulate N ranks as threads of this process")
      ->check(CLI::Range(1, 1024));
  train_cmd->add_option("--out", train.out_dir,
                        "run directory: config.yaml, metrics.jsonl, checkpoints/");
  train_cmd->add_option("--resume", train.resume_dir,
                        "continue from the newest valid checkpoint in DIR");

  // eval
  apps::EvalArgs eval;
  std::vector<std::string> eval_pos;
  auto* eval_cmd = app.add_subcommand(
      "eval", "Validation loss and expert load of a run's newest checkpoint (any EP size)");
  eval_cmd->add_option("run_dir_and_overrides", eval_pos, "RUN_DIR [section.key=value ...]")
      ->required();
  eval_cmd->add_option("--ranks", eval.ranks, "simulate N ranks as threads of this process")
      ->check(CLI::Range(1, 1024));
  eval_cmd->add_flag("--json", eval.json, "print the result as one JSON object");

  // bench
  apps::BenchArgs bench;
  std::vector<std::string> bench_pos;
  auto* bench_cmd =
      app.add_subcommand("bench", "Benchmarks: comm (all-to-all), layer (MoE layer), calibrate");
  bench_cmd->add_option("what", bench.what, "comm | layer | calibrate")
      ->required()
      ->check(CLI::IsMember({"comm", "layer", "calibrate"}));
  bench_cmd->add_option("config_and_overrides", bench_pos, "[CONFIG] [section.key=value ...]");
  bench_cmd->add_option("--ranks", bench.ranks, "simulate N ranks as threads")
      ->check(CLI::Range(1, 1024));
  bench_cmd->add_flag("--json", bench.json, "print results as JSON");
  bench_cmd->add_option("--dump", bench.dump_dir, "write raw timings to DIR");
  bench_cmd->add_option("--out", bench.out_path,
                        "calibrate: write the hardware profile YAML to FILE (default: print it)");

  // sweep
  apps::SweepArgs sweep;
  auto* sweep_cmd =
      app.add_subcommand("sweep", "Run a scaling experiment described by a sweep YAML");
  sweep_cmd->add_option("sweep", sweep.sweep_path, "SWEEP.yaml")->required();
  sweep_cmd->add_option("--out", sweep.out_dir, "results directory (results.csv, results.jsonl)");
  sweep_cmd->add_flag("--predict", sweep.predict, "add cost-model predictions");

  // config
  apps::ConfigArgs config;
  std::vector<std::string> config_pos;
  auto* config_cmd = app.add_subcommand("config", "Show, check or list configuration");
  config_cmd->require_subcommand(1);
  auto* show = config_cmd->add_subcommand("show", "Print the resolved config as YAML");
  show->add_option("config_and_overrides", config_pos, "CONFIG [section.key=value ...]")
      ->required();
  auto* check = config_cmd->add_subcommand("check", "Validate a config: exit 0 if valid, 2 if not");
  check->add_option("config_and_overrides", config_pos, "CONFIG [section.key=value ...]")
      ->required();
  auto* keys =
      config_cmd->add_subcommand("keys", "List every config key with type, default and meaning");
  keys->add_flag("--markdown", config.markdown, "print a Markdown table");

  // ckpt
  apps::CkptArgs ckpt;
  auto* ckpt_cmd = app.add_subcommand("ckpt", "Inspect and convert checkpoints");
  ckpt_cmd->add_option("action", ckpt.action, "info | export | import | upcycle | prune")
      ->required()
      ->check(CLI::IsMember({"info", "export", "import", "upcycle", "prune"}));
  ckpt_cmd->add_option("paths", ckpt.paths, "checkpoint directories / files");
  ckpt_cmd->add_option("--safetensors", ckpt.safetensors,
                       "safetensors file to export to / import from (our tensor layout)");
  ckpt_cmd->add_option("--hf", ckpt.hf,
                       "Hugging Face Mixtral directory to export to / import from (config.json + "
                       "model.safetensors, or sharded with model.safetensors.index.json)");
  ckpt_cmd->add_option("--experts", ckpt.experts, "upcycle: experts per MoE layer")
      ->check(CLI::Range(1, 65536));
  ckpt_cmd->add_option("--seed", ckpt.seed, "upcycle: seed of the fresh routers");
  ckpt_cmd->add_option("--config", ckpt.config_path,
                       "prune: the config the checkpoint was trained with");
  ckpt_cmd
      ->add_option(
          "--threshold", ckpt.threshold,
          "prune: drop experts whose importance is below this fraction of the layer's mean")
      ->check(CLI::Range(0.0, 1e6));
  ckpt_cmd
      ->add_option("--batches", ckpt.batches,
                   "prune: micro-batches of data to measure importance on")
      ->check(CLI::Range(1, 100000));

  // generate
  apps::GenerateArgs gen;
  auto* gen_cmd =
      app.add_subcommand("generate", "Sample text (or token ids) from a run's newest checkpoint");
  gen_cmd->add_option("run_dir", gen.run_dir, "RUN_DIR (config.yaml + checkpoints/)")->required();
  gen_cmd
      ->add_option("--prompt", gen.prompt,
                   "text for byte-level models; token ids ('17 4 250') otherwise")
      ->required();
  gen_cmd->add_option("--tokens", gen.tokens, "tokens to generate")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  gen_cmd->add_option("--temperature", gen.temperature, "sampling temperature; 0 = greedy")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  gen_cmd->add_option("--top-k", gen.top_k, "sample among the K most likely tokens; 0 = all")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 40));
  gen_cmd->add_option("--seed", gen.seed, "sampling seed: the same seed draws the same tokens")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::cerr << "UsageError: " << e.what() << " (run with --help for usage)\n";
    return kExitBadInput;
  }

  auto dispatch = [&]() -> int {
    if (*train_cmd) {
      split_config_and_overrides(train_pos, &train.config_path, &train.overrides);
      return apps::run_train(train);
    }
    if (*eval_cmd) {
      split_config_and_overrides(eval_pos, &eval.run_dir, &eval.overrides);
      return apps::run_eval(eval);
    }
    if (*bench_cmd) {
      split_config_and_overrides(bench_pos, &bench.config_path, &bench.overrides);
      return apps::run_bench(bench);
    }
    if (*sweep_cmd) return apps::run_sweep(sweep);
    if (*config_cmd) {
      config.action = *show ? "show" : *check ? "check" : "keys";
      split_config_and_overrides(config_pos, &config.config_path, &config.overrides);
      return apps::run_config(config);
    }
    if (*ckpt_cmd) return apps::run_ckpt(ckpt);
    if (*gen_cmd) return apps::run_generate(gen);
    return kExitOther;
  };

  int code = kExitOther;
  try {
    code = dispatch();
  } catch (const std::exception& e) {
    std::string line;
    code = describe_exception(e, &line);
    std::cerr << line << std::endl;
    // In a multi-process job, take the other ranks down instead of leaving them to time out.
    comm::abort_backends(code);
    return code;
  }
  comm::finalize_backends();
  return code;
}
