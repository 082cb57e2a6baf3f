// Typed configuration: YAML files (yaml-cpp) plus `section.key=value`
// command-line overrides, strictly validated. Every key is declared once in
// the schema (config.cpp) with its type, default, allowed range and meaning;
// loading, overrides, validation, dumping and `moe config keys` all use it.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

namespace YAML {
class Node;
}

namespace moe {

// Choice options are enums from the moment the config is parsed, so the hot
// path compares no strings. EnumNames<E>::names[i] is value i as written in YAML.
enum class Activation { SwiGLU, GELU };
enum class ScoreFn { Softmax, Sigmoid };
enum class DropPolicy { Position, Probability };
enum class AuxLossScope { Global, Local };
enum class LrSchedule { Cosine, Linear, Constant };
enum class Backend { Auto, Thread, Mpi, Nccl };
enum class DeviceKind { Auto, Cpu, Cuda };
enum class DType { Float32, BFloat16 };
enum class DataKind { Synthetic, Text, Tokens };
enum class Launcher { Thread, Mpirun };
enum class AttentionImpl { Auto, Sdpa, Explicit };
enum class Recompute { None, Moe, Block };

template <typename E>
struct EnumNames;
#define MOE_ENUM_NAMES(E, ...)                             \
  template <>                                              \
  struct EnumNames<E> {                                    \
    static constexpr const char* names[] = {__VA_ARGS__}; \
  };
MOE_ENUM_NAMES(Activation, "swiglu", "gelu")
MOE_ENUM_NAMES(ScoreFn, "softmax", "sigmoid")
MOE_ENUM_NAMES(DropPolicy, "position", "probability")
MOE_ENUM_NAMES(AuxLossScope, "global", "local")
MOE_ENUM_NAMES(LrSchedule, "cosine", "linear", "constant")
MOE_ENUM_NAMES(Backend, "auto", "thread", "mpi", "nccl")
MOE_ENUM_NAMES(DeviceKind, "auto", "cpu", "cuda")
MOE_ENUM_NAMES(DType, "float32", "bfloat16")
MOE_ENUM_NAMES(DataKind, "synthetic", "text", "tokens")
MOE_ENUM_NAMES(Launcher, "thread", "mpirun")
MOE_ENUM_NAMES(AttentionImpl, "auto", "sdpa", "explicit")
MOE_ENUM_NAMES(Recompute, "none", "moe", "block")
#undef MOE_ENUM_NAMES

template <typename E>
const char* enum_name(E e) {
  return EnumNames<E>::names[static_cast<int>(e)];
}
// The value whose YAML name is `name`; false when there is none.
template <typename E>
bool enum_from_name(const std::string& name, E& out) {
  int i = 0;
  for (const char* n : EnumNames<E>::names) {
    if (name == n) {
      out = static_cast<E>(i);
      return true;
    }
    ++i;
  }
  return false;
}
// Prints the YAML name (gtest messages, logs).
template <typename E, typename = decltype(EnumNames<E>::names)>
std::ostream& operator<<(std::ostream& os, E e) {
  return os << enum_name(e);
}

struct ModelConfig {
  int64_t vocab = 256;
  int64_t d_model = 128;
  int64_t layers = 2;
  int64_t heads = 4;
  int64_t kv_heads = 0;  // key/value heads (grouped-query attention); 0 = heads
  int64_t d_ff = 512;
  int64_t seq_len = 64;
  int64_t moe_every = 1;
  bool dense = false;
  bool tie_embeddings = true;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  AttentionImpl attention = AttentionImpl::Auto;
};

// Key/value heads actually used: model.kv_heads, or model.heads when 0.
inline int64_t kv_heads_of(const ModelConfig& m) {
  return m.kv_heads > 0 ? m.kv_heads : m.heads;
}

struct MoeConfig {
  int64_t experts = 8;
  int64_t top_k = 2;
  int64_t d_expert = 256;
  Activation activation = Activation::SwiGLU;
  ScoreFn score_fn = ScoreFn::Softmax;
  double temperature = 1.0;
  double capacity_factor = 1.25;
  int64_t min_capacity = 4;
  DropPolicy drop_policy = DropPolicy::Position;
  double aux_loss_coef = 0.01;
  double z_loss_coef = 0.001;
  AuxLossScope aux_loss_scope = AuxLossScope::Global;
  int64_t shared_experts = 0;
  bool renormalize = true;
  double router_noise_std = 0.0;
  double router_jitter = 0.0;
  int64_t n_groups = 1;
  int64_t topk_groups = 1;
  double bias_update_rate = 0.0;
};

struct ParallelConfig {
  Backend backend = Backend::Auto;
  DeviceKind device = DeviceKind::Auto;
  int64_t ranks = 0;
  int64_t ep = 0;
  int64_t dp = 0;
  double timeout_s = 60.0;
  double grad_bucket_mb = 25.0;
  bool ep_span_hosts = false;
};

struct TrainConfig {
  int64_t steps = 100;
  int64_t batch = 8;
  int64_t grad_accum = 1;
  double lr = 3e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup = 10;
  LrSchedule schedule = LrSchedule::Cosine;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double clip = 1.0;
  int64_t seed = 1234;
  int64_t log_every = 10;
  int64_t ckpt_every = 0;
  int64_t eval_every = 0;
  int64_t eval_batches = 16;
  DType dtype = DType::Float32;
  int64_t zero = 0;                        // 1: AdamW state sharded over DP / expert-DP
  Recompute recompute = Recompute::None;  // activations re-computed in backward
  bool memory_guard = true;                // refuse configs whose estimate exceeds the rank's memory
};

struct DataConfig {
  DataKind kind = DataKind::Synthetic;
  std::string path = "/usr/share/games/fortunes";
  double val_fraction = 0.05;
};

struct BenchConfig {
  int64_t warmup = 3;
  int64_t reps = 20;
  int64_t tokens = 4096;
  std::vector<int64_t> sizes_kib = {1, 4, 16, 64, 256, 1024, 4096, 16384};
  DType dtype = DType::Float32;
};

struct SweepConfig {
  Launcher launcher = Launcher::Thread;
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
