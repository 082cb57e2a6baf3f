// Typed configuration: YAML files (yaml-cpp) plus `section.key=value`
// command-line overrides, strictly validated. Every key is declared once in
// the schema (config.cpp) with its type, default, allowed range and meaning;
// loading, overrides, validation, dumping and `moe config keys` all use it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace moe {

struct ModelConfig {
  int64_t vocab = 256;
  int64_t d_model = 128;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t d_ff = 512;
  int64_t seq_len = 64;
  int64_t moe_every = 1;
  bool dense = false;
  bool tie_embeddings = true;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
};

struct MoeConfig {
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t d_expert = 256;
  std::string activation = "swiglu";
  std::string score_fn = "softmax";
  double temperature = 1.0;
  double capacity_factor = 1.25;
  int64_t min_capacity = 4;
  std::string drop_policy = "position";
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  std::string aux_loss_scope = "global";
  int64_t shared_experts = 0;
  bool renormalize = true;
  double router_noise_std = 0.0;
  double router_jitter = 0.0;
  int64_t n_groups = 1;
  int64_t topk_groups = 1;
  double bias_update_rate = 0.0;
};

struct ParallelConfig {
  std::string backend = "auto";
  int64_t ranks = 0;
  int64_t ep = 0;
  int64_t dp = 0;
  double timeout_s = 60.0;
  double grad_bucket_mb = 25.0;
};

struct TrainConfig {
  int64_t steps = 100;
  int64_t batch = 8;
  int64_t grad_accum = 1;
  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup = 10;
  std::string schedule = "cosine";
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double clip = 1.0;
  int64_t seed = 1234;
  int64_t log_every = 10;
  int64_t ckpt_every = 0;
};

struct DataConfig {
  std::string kind = "synthetic";
  std::string path = "/usr/share/games/fortunes";
};

struct BenchConfig {
  int64_t warmup = 3;
  int64_t reps = 20;
  int64_t tokens = 4096;
  std::vector<int64_t> sizes_kib = {1, 4, 16, 64, 256, 1024, 4096, 16384};
  std::string dtype = "float32";
};

struct SweepConfig {
  std::string launcher = "thread";
  int64_t steps = 0;
  double point_timeout_s = 600.0;
};

struct Config {
  ModelConfig model;
  MoeConfig moe;
  ParallelConfig parallel;
  TrainConfig train;
  DataConfig data;
  BenchConfig bench;
  SweepConfig sweep;
};

// One declared key, for documentation (`moe config keys`, README table).
struct ConfigKeyInfo {
  std::string section;
  std::string key;
  std::string type;           // int, float, bool, string, list[int]
  std::string default_value;  // as YAML
  std::string allowed;        // human-readable range or choices
  std::string doc;
};
const std::vector<ConfigKeyInfo>& config_keys();

// Loads FILE, applies overrides ("section.key=value", value parsed as YAML so
// "[1,2]" is a list), converts to typed structs and validates. Throws
// ConfigError naming the file, key, value and what is allowed.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same from YAML text; `source` names it in error messages.
Config load_config_text(const std::string& yaml, const std::string& source,
                        const std::vector<std::string>& overrides = {});
// Defaults plus overrides only.
Config default_config(const std::vector<std::string>& overrides = {});

// Range and cross-field rules (top_k <= experts, experts % ep == 0, ...).
void validate_config(const Config& cfg);

// The resolved config as YAML; load_config_text(dump_config(c)) == c.
std::string dump_config(const Config& cfg);
// FNV-1a 64 of dump_config: ranks compare it at setup.
uint64_t config_hash(const Config& cfg);
bool operator==(const Config& a, const Config& b);
inline bool operator!=(const Config& a, const Config& b) {
  return !(a == b);
}

// The expert/data parallel layout for a world of `world` ranks: ep and dp
// resolved from parallel.ep/dp (0 = auto) and checked: ep * dp == world,
// experts % ep == 0.
struct ParallelLayout {
  int ep = 1;
  int dp = 1;
};
ParallelLayout resolve_layout(const Config& cfg, int world);

// "did you mean" helper: the candidate closest to `word` by edit distance, or
// "" when none is close.
std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace moe
