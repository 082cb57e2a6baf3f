#include "moe/config/config.h"

#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "moe/core/error.h"
#include "moe/core/hash.h"

namespace moe {

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int64_t>::max();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Where a value came from, for error messages: "in FILE line N" or
// "from command-line override".
struct Origin {
  std::string source;
  std::set<std::string> overridden;  // "section.key" set on the command line

  std::string where(const std::string& dotted, const YAML::Node& node) const {
    if (overridden.count(dotted)) return "from command-line override";
    std::ostringstream os;
    os << "in " << source;
    if (node.IsDefined() && node.Mark().line >= 0) os << " line " << node.Mark().line + 1;
    return os.str();
  }
};

std::string shortest_double(double v) {
  if (std::isinf(v)) return v > 0 ? ".inf" : "-.inf";
  for (int prec = 1; prec <= 17; ++prec) {
    std::ostringstream os;
    os.precision(prec);
    os << v;
    if (std::strtod(os.str().c_str(), nullptr) == v) {
      std::string s = os.str();
      // Keep floats visibly floats in YAML ("1.0", not "1").
      if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
      return s;
    }
  }
  return std::to_string(v);
}

std::string scalar_text(const YAML::Node& node) {
  if (node.IsScalar()) return "'" + node.Scalar() + "'";
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  return "nothing (null)";
}

// ---- the schema --------------------------------------------------------------

struct Field {
  ConfigKeyInfo info;
  // Parse `node` into cfg; throws ConfigError using origin for the location.
  std::function<void(Config&, const YAML::Node&, const Origin&)> parse;
  std::function<void(const Config&, YAML::Emitter&)> emit;
  std::function<bool(const Config&, const Config&)> equal;
  std::function<void(const Config&)> check;  // range / choices
};

template <typename S>
using SectionOf = S Config::*;

template <typename S>
Field int_field(const char* section, const char* key, SectionOf<S> sec, int64_t S::*m, int64_t lo,
                int64_t hi, const char* doc) {
  Field f;
  Config defaults;
  std::ostringstream allowed;
  allowed << "integer in [" << lo << ", "
          << (hi == kIntMax ? std::string("inf") : std::to_string(hi)) << "]";
  f.info = {section, key, "int", std::to_string(defaults.*sec.*m), allowed.str(), doc};
  std::string name = std::string(section) + "." + key;
  f.parse = [=](Config& c, const YAML::Node& n, const Origin& o) {
    errno = 0;
    char* end = nullptr;
    std::string s = n.IsScalar() ? n.Scalar() : "";
    long long v = n.IsScalar() && !s.empty() ? std::strtoll(s.c_str(), &end, 10) : 0;
    if (!n.IsScalar() || s.empty() || *end != '\0' || errno == ERANGE)
      MOE_THROW(ConfigError, name << ": expected an integer, got " << scalar_text(n) << " ("
                                  << o.where(name, n) << ")");
    c.*sec.*m = v;
  };
  f.emit = [=](const Config& c, YAML::Emitter& e) {
    e << YAML::Key << key << YAML::Value << (c.*sec.*m);
  };
  f.equal = [=](const Config& a, const Config& b) { return a.*sec.*m == b.*sec.*m; };
  std::string allowed_s = allowed.str();
  f.check = [=](const Config& c) {
    int64_t v = c.*sec.*m;
    if (v < lo || v > hi)
      MOE_THROW(ConfigError, name << " = " << v << " is out of range: allowed " << allowed_s);
  };
  return f;
}

template <typename S>
Field float_field(const char* section, const char* key, SectionOf<S> sec, double S::*m, double lo,
                  double hi, bool lo_open, const char* doc) {
  Field f;
  Config defaults;
  std::ostringstream allowed;
  allowed << "number in " << (lo_open ? "(" : "[") << shortest_double(lo) << ", "
          << (std::isinf(hi) ? std::string("inf)") : shortest_double(hi) + "]");
  f.info = {section, key, "float", shortest_double(defaults.*sec.*m), allowed.str(), doc};
  std::string name = std::string(section) + "." + key;
  f.parse = [=](Config& c, const YAML::Node& n, const Origin& o) {
    std::string s = n.IsScalar() ? n.Scalar() : "";
    char* end = nullptr;
    double v = std::nan("");
    if (s == ".inf" || s == ".Inf" || s == "inf") {
      v = kInf;
      end = const_cast<char*>(s.c_str() + s.size());
    } else if (!s.empty()) {
      v = std::strtod(s.c_str(), &end);
    }
    if (!n.IsScalar() || s.empty() || *end != '\0' || std::isnan(v))
      MOE_THROW(ConfigError, name << ": expected a number, got " << scalar_text(n) << " ("
                                  << o.where(name, n) << ")");
    c.*sec.*m = v;
  };
  f.emit = [=](const Config& c, YAML::Emitter& e) {
    e << YAML::Key << key << YAML::Value << shortest_double(c.*sec.*m);
  };
  f.equal = [=](const Config& a, const Config& b) { return a.*sec.*m == b.*sec.*m; };
  std::string allowed_s = allowed.str();
  f.check = [=](const Config& c) {
    double v = c.*sec.*m;
    bool bad = std::isnan(v) || v < lo || v > hi || (lo_open && v == lo) || std::isinf(v);
    if (bad)
      MOE_THROW(ConfigError,
                name << " = " << shortest_double(v) << " is out of range: allowed " << allowed_s);
  };
  return f;
}

template <typename S>
Field bool_field(const char* section, const char* key, SectionOf<S> sec, bool S::*m,
                 const char* doc) {
  Field f;
  Config defaults;
  f.info = {section, key, "bool", (defaults.*sec.*m) ? "true" : "false", "true or false", doc};
  std::string name = std::string(section) + "." + key;
  f.parse = [=](Config& c, const YAML::Node& n, const Origin& o) {
    std::string s = n.IsScalar() ? n.Scalar() : "";
    if (s == "true" || s == "True" || s == "yes" || s == "on") {
      c.*sec.*m = true;
    } else if (s == "false" || s == "False" || s == "no" || s == "off") {
      c.*sec.*m = false;
    } else {
      MOE_THROW(ConfigError, name << ": expected true or false, got " << scalar_text(n) << " ("
                                  << o.where(name, n) << ")");
    }
  };
  f.emit = [=](const Config& c, YAML::Emitter& e) {
    e << YAML::Key << key << YAML::Value << ((c.*sec.*m) ? "true" : "false");
  };
  f.equal = [=](const Config& a, const Config& b) { return a.*sec.*m == b.*sec.*m; };
  f.check = [](const Config&) {};
  return f;
}

// choices empty = any non-empty string.
template <typename S>
Field string_field(const char* section, const char* key, SectionOf<S> sec, std::string S::*m,
                   std::vector<std::string> choices, const char* doc) {
  Field f;
  Config defaults;
  std::string allowed;
  for (size_t i = 0; i < choices.size(); ++i) allowed += (i ? " | " : "") + choices[i];
  if (choices.empty()) allowed = "any string";
  f.info = {section, key, "string", defaults.*sec.*m, allowed, doc};
  std::string name = std::string(section) + "." + key;
  f.parse = [=](Config& c, const YAML::Node& n, const Origin& o) {
    if (!n.IsScalar())
      MOE_THROW(ConfigError, name << ": expected a string, got " << scalar_text(n) << " ("
                                  << o.where(name, n) << ")");
    c.*sec.*m = n.Scalar();
  };
  f.emit = [=](const Config& c, YAML::Emitter& e) {
    e << YAML::Key << key << YAML::Value << YAML::DoubleQuoted << (c.*sec.*m);
  };
  f.equal = [=](const Config& a, const Config& b) { return a.*sec.*m == b.*sec.*m; };
  f.check = [=](const Config& c) {
    const std::string& v = c.*sec.*m;
    if (choices.empty()) return;
    for (const auto& ch : choices)
      if (v == ch) return;
    std::string hint = closest_match(v, choices);
    MOE_THROW(ConfigError, name << " = '" << v << "' is not allowed: choose one of " << allowed
                                << (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
  };
  return f;
}

// A choice among an enum's YAML names (EnumNames<E>); an unknown word is
// refused at parse time with the choices and the closest one.
template <typename S, typename E>
Field enum_field(const char* section, const char* key, SectionOf<S> sec, E S::*m,
                 const char* doc) {
  Field f;
  Config defaults;
  std::vector<std::string> choices(std::begin(EnumNames<E>::names), std::end(EnumNames<E>::names));
  std::string allowed;
  for (size_t i = 0; i < choices.size(); ++i) allowed += (i ? " | " : "") + choices[i];
  f.info = {section, key, "string", enum_name(defaults.*sec.*m), allowed, doc};
  std::string name = std::string(section) + "." + key;
  f.parse = [=](Config& c, const YAML::Node& n, const Origin& o) {
    if (!n.IsScalar())
      MOE_THROW(ConfigError, name << ": expected a string, got " << scalar_text(n) << " ("
                                  << o.where(name, n) << ")");
    const std::string v = n.Scalar();
    for (size_t i = 0; i < choices.size(); ++i)
      if (v == choices[i]) {
        c.*sec.*m = static_cast<E>(i);
        return;
      }
    std::string hint = closest_match(v, choices);
    MOE_THROW(ConfigError, name << " = '" << v << "' is not allowed: choose one of " << allowed
                                << (hint.empty() ? "" : " (did you mean '" + hint + "'?)") << " ("
                                << o.where(name, n) << ")");
  };
  f.emit = [=](const Config& c, YAML::Emitter& e) {
    e << YAML::Key << key << YAML::Value << YAML::DoubleQuoted << enum_name(c.*sec.*m);
  };
  f.equal = [=](const Config& a, const Config& b) { return a.*sec.*m == b.*sec.*m; };
  f.check = [](const Config&) {};
  return f;
}

template <typename S>
Field int_list_field(const char* section, const char* key, SectionOf<S> sec,
                     std::vector<int64_t> S::*m, int64_t lo, const char* doc) {
  Field f;
  Config defaults;
  std::ostringstream def;
  def << "[";
  for (size_t i = 0; i < (defaults.*sec.*m).size(); ++i)
    def << (i ? ", " : "") << (defaults.*sec.*m)[i];
  def << "]";
  std::string allowed = "non-empty list of integers >= " + std::to_string(lo);
  f.info = {section, key, "list[int]", def.str(), allowed, doc};
  std::string name = std::string(section) + "." + key;
  f.parse = [=](Config& c, const YAML::Node& n, const Origin& o) {
    if (!n.IsSequence())
      MOE_THROW(ConfigError, name << ": expected a list of integers like [1, 2], got "
                                  << scalar_text(n) << " (" << o.where(name, n) << ")");
    std::vector<int64_t> out;
    for (size_t i = 0; i < n.size(); ++i) {
      const YAML::Node item = n[i];
      std::string s = item.IsScalar() ? item.Scalar() : "";
      char* end = nullptr;
      errno = 0;
      long long v = s.empty() ? 0 : std::strtoll(s.c_str(), &end, 10);
      if (!item.IsScalar() || s.empty() || *end != '\0' || errno == ERANGE)
        MOE_THROW(ConfigError, name << "[" << i << "]: expected an integer, got "
                                    << scalar_text(item) << " (" << o.where(name, item) << ")");
      out.push_back(v);
    }
    c.*sec.*m = out;
  };
  f.emit = [=](const Config& c, YAML::Emitter& e) {
    e << YAML::Key << key << YAML::Value << YAML::Flow << (c.*sec.*m);
  };
  f.equal = [=](const Config& a, const Config& b) { return a.*sec.*m == b.*sec.*m; };
  f.check = [=](const Config& c) {
    const auto& v = c.*sec.*m;
    if (v.empty()) MOE_THROW(ConfigError, name << " is empty: allowed " << allowed);
    for (size_t i = 0; i < v.size(); ++i)
      if (v[i] < lo)
        MOE_THROW(ConfigError,
                  name << "[" << i << "] = " << v[i] << " is out of range: allowed " << allowed);
  };
  return f;
}

const std::vector<std::string>& section_names() {
  static const std::vector<std::string> names = {"model", "moe",   "parallel", "train",
                                                 "data",  "bench", "sweep"};
  return names;
}

const std::vector<Field>& schema() {
  static const std::vector<Field> fields = [] {
    using C = Config;
    std::vector<Field> v;
    // model
    v.push_back(int_field("model", "vocab", &C::model, &ModelConfig::vocab, 2, 1 << 24,
                          "vocabulary size (256 for byte-level text)"));
    v.push_back(
        int_field("model", "d_model", &C::model, &ModelConfig::d_model, 1, 1 << 20, "hidden size"));
    v.push_back(int_field("model", "layers", &C::model, &ModelConfig::layers, 1, 1024,
                          "transformer blocks"));
    v.push_back(int_field("model", "heads", &C::model, &ModelConfig::heads, 1, 1024,
                          "attention heads (d_model must divide by heads)"));
    v.push_back(int_field("model", "kv_heads", &C::model, &ModelConfig::kv_heads, 0, 1024,
                          "key/value heads, grouped-query attention (must divide heads; 0 = "
                          "heads)"));
    v.push_back(int_field("model", "d_ff", &C::model, &ModelConfig::d_ff, 1, 1 << 22,
                          "hidden size of dense (non-MoE) FFN blocks"));
    v.push_back(int_field("model", "seq_len", &C::model, &ModelConfig::seq_len, 1, 1 << 20,
                          "tokens per training sequence"));
    v.push_back(int_field("model", "moe_every", &C::model, &ModelConfig::moe_every, 1, 1024,
                          "every N-th block's FFN is an MoE layer (1 = all)"));
    v.push_back(
        bool_field("model", "dense", &C::model, &ModelConfig::dense,
                   "dense twin: every block dense with the same active parameters per token"));
    v.push_back(bool_field("model", "tie_embeddings", &C::model, &ModelConfig::tie_embeddings,
                           "share input embedding and output head"));
    v.push_back(float_field("model", "norm_eps", &C::model, &ModelConfig::norm_eps, 0.0, 1.0, true,
                            "RMSNorm epsilon"));
    v.push_back(float_field("model", "rope_theta", &C::model, &ModelConfig::rope_theta, 1.0, 1e9,
                            false, "rotary position base"));
    v.push_back(enum_field("model", "attention", &C::model, &ModelConfig::attention,
                           "causal attention kernel: auto = LibTorch's scaled_dot_product_attention "
                           "(flash / memory-efficient on GPU), explicit = softmax(QK^T)V"));
    // moe
    v.push_back(int_field("moe", "experts", &C::moe, &MoeConfig::experts, 1, 65536,
                          "routed experts per MoE layer (global)"));
    v.push_back(int_field("moe", "top_k", &C::moe, &MoeConfig::top_k, 1, 65536,
                          "experts chosen per token (<= experts)"));
    v.push_back(int_field("moe", "d_expert", &C::moe, &MoeConfig::d_expert, 1, 1 << 22,
                          "hidden size of each expert MLP"));
    v.push_back(enum_field("moe", "activation", &C::moe, &MoeConfig::activation,
                             "expert MLP: SwiGLU (gate/up/down) or GELU (up/down)"));
    v.push_back(enum_field("moe", "score_fn", &C::moe, &MoeConfig::score_fn,
                             "router score function"));
    v.push_back(float_field("moe", "temperature", &C::moe, &MoeConfig::temperature, 0.0, 1e6, true,
                            "router logits are divided by this before scoring"));
    v.push_back(float_field("moe", "capacity_factor", &C::moe, &MoeConfig::capacity_factor, 0.0,
                            1024.0, false,
                            "capacity C = max(min_capacity, ceil(cf*T*k/E)); 0 = dropless"));
    v.push_back(int_field("moe", "min_capacity", &C::moe, &MoeConfig::min_capacity, 0, kIntMax,
                          "lower bound of the per-expert capacity"));
    v.push_back(enum_field(
        "moe", "drop_policy", &C::moe, &MoeConfig::drop_policy,
        "which over-capacity tokens are dropped: later positions, or lower gate probability"));
    v.push_back(float_field("moe", "aux_loss_coef", &C::moe, &MoeConfig::aux_loss_coef, 0.0, 1e3,
                            false, "Switch load-balance loss weight (alpha)"));
    v.push_back(float_field("moe", "z_loss_coef", &C::moe, &MoeConfig::z_loss_coef, 0.0, 1e3, false,
                            "router z-loss weight (beta)"));
    v.push_back(enum_field("moe", "aux_loss_scope", &C::moe, &MoeConfig::aux_loss_scope,
                             "load-balance statistics over the EP group's tokens or this rank's"));
    v.push_back(int_field("moe", "shared_experts", &C::moe, &MoeConfig::shared_experts, 0, 64,
                          "always-on shared experts (each of size d_expert)"));
    v.push_back(bool_field("moe", "renormalize", &C::moe, &MoeConfig::renormalize,
                           "renormalise the kept top-k gate weights to sum to 1"));
    v.push_back(float_field("moe", "router_noise_std", &C::moe, &MoeConfig::router_noise_std, 0.0,
                            1e3, false,
                            "noisy top-k: std of Gaussian noise on logits (training only)"));
    v.push_back(float_field("moe", "router_jitter", &C::moe, &MoeConfig::router_jitter, 0.0, 0.99,
                            false,
                            "input jitter: multiply router input by U(1-j, 1+j) (training only)"));
    v.push_back(int_field("moe", "n_groups", &C::moe, &MoeConfig::n_groups, 1, 65536,
                          "group-limited routing: experts split into this many groups"));
    v.push_back(
        int_field("moe", "topk_groups", &C::moe, &MoeConfig::topk_groups, 1, 65536,
                  "group-limited routing: tokens choose experts from this many best groups"));
    v.push_back(float_field("moe", "bias_update_rate", &C::moe, &MoeConfig::bias_update_rate, 0.0,
                            1.0, false, "aux-loss-free balancing bias step (0 = off)"));
    // parallel
    v.push_back(enum_field("parallel", "backend", &C::parallel, &ParallelConfig::backend,
                           "communication backend; auto = mpi under mpirun, else thread"));
    v.push_back(enum_field("parallel", "device", &C::parallel, &ParallelConfig::device,
                           "where tensors live; auto = CUDA when LibTorch has it and a GPU is "
                           "visible (one per rank by node-local rank), else CPU"));
    v.push_back(int_field("parallel", "ranks", &C::parallel, &ParallelConfig::ranks, 0, 1 << 20,
                          "world size; 0 = from the launcher (--ranks N or mpirun -np N)"));
    v.push_back(int_field("parallel", "ep", &C::parallel, &ParallelConfig::ep, 0, 1 << 20,
                          "expert-parallel size; 0 = world / dp"));
    v.push_back(int_field("parallel", "dp", &C::parallel, &ParallelConfig::dp, 0, 1 << 20,
                          "data-parallel replicas of each expert; 0 = world / ep"));
    v.push_back(float_field("parallel", "timeout_s", &C::parallel, &ParallelConfig::timeout_s, 0.0,
                            86400.0, true,
                            "every collective fails with CommError after this many seconds"));
    v.push_back(float_field("parallel", "grad_bucket_mb", &C::parallel,
                            &ParallelConfig::grad_bucket_mb, 0.0, 4096.0, true,
                            "gradient all-reduce bucket size (MiB)"));
    v.push_back(bool_field("parallel", "ep_span_hosts", &C::parallel, &ParallelConfig::ep_span_hosts,
                           "EP groups across hosts (default: inside a host when ep divides the "
                           "ranks per host)"));
    // train
    v.push_back(
        int_field("train", "steps", &C::train, &TrainConfig::steps, 1, kIntMax, "optimizer steps"));
    v.push_back(int_field("train", "batch", &C::train, &TrainConfig::batch, 1, 1 << 20,
                          "sequences per rank per micro-batch"));
    v.push_back(int_field("train", "grad_accum", &C::train, &TrainConfig::grad_accum, 1, 1 << 16,
                          "micro-batches accumulated per optimizer step"));
    v.push_back(float_field("train", "lr", &C::train, &TrainConfig::lr, 0.0, 10.0, true,
                            "peak learning rate (AdamW)"));
    v.push_back(float_field("train", "min_lr_ratio", &C::train, &TrainConfig::min_lr_ratio, 0.0,
                            1.0, false, "final lr = lr * min_lr_ratio"));
    v.push_back(int_field("train", "warmup", &C::train, &TrainConfig::warmup, 0, kIntMax,
                          "linear warmup steps"));
    v.push_back(enum_field("train", "schedule", &C::train, &TrainConfig::schedule,
                           "lr decay after warmup"));
    v.push_back(float_field("train", "weight_decay", &C::train, &TrainConfig::weight_decay, 0.0,
                            10.0, false, "AdamW weight decay"));
    v.push_back(float_field("train", "beta1", &C::train, &TrainConfig::beta1, 0.0, 0.999999, false,
                            "AdamW beta1"));
    v.push_back(float_field("train", "beta2", &C::train, &TrainConfig::beta2, 0.0, 0.999999, false,
                            "AdamW beta2"));
    v.push_back(float_field("train", "clip", &C::train, &TrainConfig::clip, 0.0, 1e6, false,
                            "global gradient-norm clip (0 = off)"));
    v.push_back(int_field("train", "seed", &C::train, &TrainConfig::seed, 0, kIntMax,
                          "seed for initialisation and data"));
    v.push_back(int_field("train", "log_every", &C::train, &TrainConfig::log_every, 1, kIntMax,
                          "progress line every N steps"));
    v.push_back(int_field("train", "ckpt_every", &C::train, &TrainConfig::ckpt_every, 0, kIntMax,
                          "checkpoint every N steps (0 = only at the end)"));
    v.push_back(int_field("train", "eval_every", &C::train, &TrainConfig::eval_every, 0, kIntMax,
                          "validation loss every N steps and at the last step (0 = never)"));
    v.push_back(int_field("train", "eval_batches", &C::train, &TrainConfig::eval_batches, 1,
                          kIntMax,
                          "an evaluation scores the first eval_batches x batch windows of the "
                          "validation split (fewer if the split is shorter), spread over the ranks"));
    v.push_back(enum_field("train", "dtype", &C::train, &TrainConfig::dtype,
                           "compute precision: bfloat16 keeps fp32 master weights, AdamW state, "
                           "gradient reduction and router math"));
    v.push_back(int_field("train", "zero", &C::train, &TrainConfig::zero, 0, 1,
                          "1 = distributed optimizer (ZeRO-1): AdamW moments sharded over the "
                          "data-parallel ranks (experts: over their expert-DP group)"));
    v.push_back(enum_field("train", "recompute", &C::train, &TrainConfig::recompute,
                           "activation recomputation: moe re-runs each MoE layer (router, "
                           "all-to-alls, experts) in backward, block whole transformer blocks"));
    v.push_back(bool_field("train", "memory_guard", &C::train, &TrainConfig::memory_guard,
                           "refuse to start when the per-rank memory estimate exceeds the "
                           "memory the rank can use (false = skip the check)"));
    // data
    v.push_back(enum_field("data", "kind", &C::data, &DataConfig::kind,
                           "synthetic (learnable patterns), byte-level text, or pre-tokenised "
                           "uint16 shards (llm.c .bin with header, or raw)"));
    v.push_back(string_field("data", "path", &C::data, &DataConfig::path, {},
                             "text: file or directory; tokens: .bin file, directory or glob"));
    v.push_back(float_field("data", "val_fraction", &C::data, &DataConfig::val_fraction, 0.0, 0.5,
                            false,
                            "held-out tail of each text/token source for validation (tokens: "
                            "unused when *_val_* shards exist; synthetic: a separate stream)"));
    // bench
    v.push_back(int_field("bench", "warmup", &C::bench, &BenchConfig::warmup, 0, 1 << 20,
                          "untimed repetitions before timing"));
    v.push_back(int_field("bench", "reps", &C::bench, &BenchConfig::reps, 1, 1 << 20,
                          "timed repetitions (medians reported)"));
    v.push_back(int_field("bench", "tokens", &C::bench, &BenchConfig::tokens, 1, 1 << 28,
                          "tokens per rank for `bench layer`"));
    v.push_back(int_list_field("bench", "sizes_kib", &C::bench, &BenchConfig::sizes_kib, 1,
                               "message sizes per peer for `bench comm` (KiB)"));
    v.push_back(enum_field("bench", "dtype", &C::bench, &BenchConfig::dtype,
                           "element type of benchmark tensors"));
    // sweep
    v.push_back(enum_field("sweep", "launcher", &C::sweep, &SweepConfig::launcher,
                           "how each sweep point is launched"));
    v.push_back(int_field("sweep", "steps", &C::sweep, &SweepConfig::steps, 0, kIntMax,
                          "steps per sweep point (0 = train.steps)"));
    v.push_back(float_field("sweep", "point_timeout_s", &C::sweep, &SweepConfig::point_timeout_s,
                            0.0, 86400.0, true,
                            "a sweep point running longer is killed and recorded as failed"));
    return v;
  }();
  return fields;
}

// ---- loading ---------------------------------------------------------------------

std::vector<std::string> keys_of(const std::string& section) {
  std::vector<std::string> out;
  for (const auto& f : schema())
    if (f.info.section == section) out.push_back(f.info.key);
  return out;
}

std::string unknown_key_hint(const std::string& section, const std::string& key) {
  std::string near = closest_match(key, keys_of(section));
  if (!near.empty()) return " (did you mean '" + section + "." + near + "'?)";
  for (const auto& f : schema())
    if (f.info.key == key) return " (did you mean '" + f.info.section + "." + key + "'?)";
  return " (keys of '" + section + "' are listed by `moe config keys`)";
}

void apply_override(YAML::Node& root, const std::string& assignment, Origin& origin) {
  auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    MOE_THROW(ConfigError, "override '" << assignment << "' is not of the form section.key=value");
  std::string path = assignment.substr(0, eq);
  std::string value = assignment.substr(eq + 1);
  auto dot = path.find('.');
  if (dot == std::string::npos || dot == 0 || dot + 1 == path.size() ||
      path.find('.', dot + 1) != std::string::npos)
    MOE_THROW(ConfigError, "override '" << assignment << "': key '" << path
                                        << "' must be section.key, e.g. moe.top_k=2");
  std::string section = path.substr(0, dot), key = path.substr(dot + 1);
  YAML::Node parsed;
  try {
    parsed = value.empty() ? YAML::Node(std::string()) : YAML::Load(value);
  } catch (const YAML::Exception& e) {
    MOE_THROW(ConfigError, "override '" << assignment << "': value is not valid YAML: " << e.msg);
  }
  if (!root[section]) root[section] = YAML::Node(YAML::NodeType::Map);
  if (!root[section].IsMap())
    MOE_THROW(ConfigError, "section '" << section << "' is not a mapping; cannot apply override '"
                                       << assignment << "'");
  root[section][key] = parsed;
  origin.overridden.insert(path);
}

Config from_node(const YAML::Node& root, const Origin& origin) {
  Config cfg;
  if (!root || root.IsNull()) return cfg;  // empty input handled by the caller
  if (!root.IsMap())
    MOE_THROW(ConfigError, origin.source << ": top level must be a mapping of sections ("
                                         << "model, moe, parallel, train, data, bench, sweep), got "
                                         << scalar_text(root));
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (!it->first.IsScalar())
      MOE_THROW(ConfigError, origin.source << ": section names must be plain words");
    std::string section = it->first.Scalar();
    const auto& names = section_names();
    if (std::find(names.begin(), names.end(), section) == names.end()) {
      std::string near = closest_match(section, names);
      MOE_THROW(ConfigError,
                "unknown section '"
                    << section << "' (" << origin.where(section, it->first) << ")"
                    << (near.empty()
                            ? std::string(
                                  " (allowed: model, moe, parallel, train, data, bench, sweep)")
                            : " (did you mean '" + near + "'?)"));
    }
    const YAML::Node body = it->second;  // a copy: yaml-cpp iterators yield temporaries
    if (body.IsNull()) continue;
    if (!body.IsMap())
      MOE_THROW(ConfigError, "section '" << section << "' must be a mapping of key: value, got "
                                         << scalar_text(body) << " (" << origin.where(section, body)
                                         << ")");
    for (auto kv = body.begin(); kv != body.end(); ++kv) {
      std::string key = kv->first.IsScalar() ? kv->first.Scalar() : "?";
      const Field* field = nullptr;
      for (const auto& f : schema())
        if (f.info.section == section && f.info.key == key) field = &f;
      if (!field)
        MOE_THROW(ConfigError, "unknown key '" << section << "." << key << "' ("
                                               << origin.where(section + "." + key, kv->first)
                                               << ")" << unknown_key_hint(section, key));
      field->parse(cfg, kv->second, origin);
    }
  }
  return cfg;
}

Config load_impl(YAML::Node root, Origin origin, const std::vector<std::string>& overrides) {
  for (const auto& o : overrides) apply_override(root, o, origin);
  Config cfg = from_node(root, origin);
  validate_config(cfg);
  return cfg;
}

YAML::Node parse_yaml(const std::string& text, const std::string& source) {
  for (unsigned char ch : text) {
    if (ch == 0 || (ch < 0x20 && ch != '\n' && ch != '\r' && ch != '\t'))
      MOE_THROW(ConfigError, source << ": not a YAML text file (contains binary byte 0x" << std::hex
                                    << static_cast<int>(ch) << ")");
  }
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& e) {
    MOE_THROW(ConfigError, source << " line " << e.mark.line + 1 << " column " << e.mark.column + 1
                                  << ": YAML syntax error: " << e.msg);
  } catch (const YAML::Exception& e) {
    MOE_THROW(ConfigError, source << ": cannot parse YAML: " << e.msg);
  }
}

}  // namespace

const std::vector<ConfigKeyInfo>& config_keys() {
  static const std::vector<ConfigKeyInfo> keys = [] {
    std::vector<ConfigKeyInfo> out;
    for (const auto& f : schema()) out.push_back(f.info);
    return out;
  }();
  return keys;
}

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const auto& c : candidates) {
    // Levenshtein distance
    std::vector<size_t> prev(c.size() + 1), cur(c.size() + 1);
    for (size_t j = 0; j <= c.size(); ++j) prev[j] = j;
    for (size_t i = 1; i <= word.size(); ++i) {
      cur[0] = i;
      for (size_t j = 1; j <= c.size(); ++j)
        cur[j] = std::min(
            {prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (word[i - 1] == c[j - 1] ? 0 : 1)});
      std::swap(prev, cur);
    }
    size_t d = prev[c.size()];
    if (d < best_d) best_d = d, best = c;
  }
  size_t limit = std::max<size_t>(2, word.size() / 3);
  return best_d <= limit ? best : std::string();
}

Config load_config_text(const std::string& yaml, const std::string& source,
                        const std::vector<std::string>& overrides) {
  YAML::Node root = parse_yaml(yaml, source);
  if (!root || root.IsNull())
    MOE_THROW(ConfigError, source << ": config is empty; it needs at least one section "
                                  << "(model, moe, parallel, train, data, bench, sweep)");
  return load_impl(root, Origin{source, {}}, overrides);
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    MOE_THROW(ConfigError, "cannot open config file '" << path << "': " << std::strerror(errno));
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) MOE_THROW(ConfigError, "cannot read config file '" << path << "'");
  return load_config_text(buf.str(), path, overrides);
}

Config default_config(const std::vector<std::string>& overrides) {
  return load_impl(YAML::Node(YAML::NodeType::Map), Origin{"defaults", {}}, overrides);
}

void validate_config(const Config& c) {
  for (const auto& f : schema()) f.check(c);
  const auto& m = c.moe;
  const auto& p = c.parallel;
  if (m.top_k > m.experts)
    MOE_THROW(ConfigError, "moe.top_k = " << m.top_k << " exceeds moe.experts = " << m.experts
                                          << ": allowed 1 <= top_k <= experts");
  if (m.experts % m.n_groups != 0)
    MOE_THROW(ConfigError,
              "moe.n_groups = " << m.n_groups << " does not divide moe.experts = " << m.experts);
  if (m.topk_groups > m.n_groups)
    MOE_THROW(ConfigError,
              "moe.topk_groups = " << m.topk_groups << " exceeds moe.n_groups = " << m.n_groups);
  if (m.top_k > m.topk_groups * (m.experts / m.n_groups))
    MOE_THROW(ConfigError,
              "moe.top_k = " << m.top_k << " exceeds the experts reachable in moe.topk_groups = "
                             << m.topk_groups << " groups of " << m.experts / m.n_groups);
  if (p.ep > 0 && m.experts % p.ep != 0)
    MOE_THROW(ConfigError,
              "moe.experts = " << m.experts << " is not divisible by parallel.ep = " << p.ep
                               << ": every EP rank must hold the same number of experts");
  if (p.ranks > 0) {
    if (p.ep > 0 && p.ranks % p.ep != 0)
      MOE_THROW(ConfigError,
                "parallel.ep = " << p.ep << " does not divide parallel.ranks = " << p.ranks);
    if (p.dp > 0 && p.ranks % p.dp != 0)
      MOE_THROW(ConfigError,
                "parallel.dp = " << p.dp << " does not divide parallel.ranks = " << p.ranks);
    if (p.ep > 0 && p.dp > 0 && p.ep * p.dp != p.ranks)
      MOE_THROW(ConfigError,
                "parallel.ep * parallel.dp = " << p.ep << " * " << p.dp << " = " << p.ep * p.dp
                                               << " but parallel.ranks = " << p.ranks
                                               << ": ep * dp must equal the world size");
  }
  if (p.backend == Backend::Nccl && !MOE_HAVE_NCCL)
    MOE_THROW(ConfigError,
              "parallel.backend = 'nccl' but this build has no NCCL backend: "
                  << (MOE_TORCH_CUDA ? "the CUDA toolkit or NCCL was not found at configure time "
                                       "(see the NCCL line of the configure summary)"
                                     : "it needs a CUDA LibTorch and this build's is CPU-only; "
                                       "rebuild against a CUDA torch wheel (README, GPUs)")
                  << ", or use parallel.backend=auto, thread or mpi");
  if (p.backend == Backend::Mpi && !MOE_HAVE_MPI)
    MOE_THROW(ConfigError,
              "parallel.backend = 'mpi' but this build has no MPI backend "
              "(apt-get install libopenmpi-dev and rebuild)");
  if (p.device == DeviceKind::Cuda && !MOE_TORCH_CUDA)
    MOE_THROW(ConfigError,
              "parallel.device = 'cuda' but this build's LibTorch has no CUDA (Debian's libtorch "
              "is CPU-only): build against a CUDA LibTorch (README, \"GPUs\") or use "
              "parallel.device=cpu|auto");
  if (p.backend == Backend::Nccl && p.device == DeviceKind::Cpu)
    MOE_THROW(ConfigError, "parallel.backend = 'nccl' needs CUDA tensors but parallel.device = "
                           "'cpu': use parallel.device=cuda|auto or another backend");
  const auto& md = c.model;
  if (md.d_model % md.heads != 0)
    MOE_THROW(ConfigError, "model.d_model = " << md.d_model
                                              << " is not divisible by model.heads = " << md.heads);
  if (md.kv_heads > 0 && md.heads % md.kv_heads != 0)
    MOE_THROW(ConfigError, "model.kv_heads = " << md.kv_heads << " does not divide model.heads = "
                                               << md.heads
                                               << ": each key/value head serves heads / kv_heads "
                                                  "query heads (0 = one per query head)");
  if ((md.d_model / md.heads) % 2 != 0)
    MOE_THROW(ConfigError,
              "model.d_model / model.heads = " << md.d_model / md.heads
                                               << " must be even (rotary embeddings rotate pairs)");
  if (!md.dense && md.moe_every > md.layers)
    MOE_THROW(
        ConfigError,
        "model.moe_every = "
            << md.moe_every << " exceeds model.layers = " << md.layers
            << ": the model would have no MoE layer (set model.dense: true for a dense model)");
  if (c.data.kind != DataKind::Synthetic && c.data.path.empty())
    MOE_THROW(ConfigError, "data.path is empty but data.kind = '"
                               << c.data.kind << "' needs a file or directory");
  if (c.data.kind == DataKind::Synthetic && md.vocab < 4)
    MOE_THROW(ConfigError,
              "model.vocab = " << md.vocab << " is too small for synthetic data: allowed >= 4");
  if (c.data.kind == DataKind::Text && md.vocab < 256)
    MOE_THROW(ConfigError,
              "model.vocab = " << md.vocab
                               << " but byte-level text (data.kind = 'text') needs vocab >= 256");
  for (size_t i = 1; i < c.bench.sizes_kib.size(); ++i)
    if (c.bench.sizes_kib[i] <= c.bench.sizes_kib[i - 1])
      MOE_THROW(ConfigError, "bench.sizes_kib must be strictly increasing: element "
                                 << i << " = " << c.bench.sizes_kib[i] << " follows "
                                 << c.bench.sizes_kib[i - 1]);
}

std::string dump_config(const Config& cfg) {
  YAML::Emitter e;
  e << YAML::BeginMap;
  for (const auto& section : section_names()) {
    e << YAML::Key << section << YAML::Value << YAML::BeginMap;
    for (const auto& f : schema())
      if (f.info.section == section) f.emit(cfg, e);
    e << YAML::EndMap;
  }
  e << YAML::EndMap;
  return std::string(e.c_str()) + "\n";
}

uint64_t config_hash(const Config& cfg) {
  const std::string text = dump_config(cfg);
  return fnv1a64(text.data(), text.size());
}

bool operator==(const Config& a, const Config& b) {
  for (const auto& f : schema())
    if (!f.equal(a, b)) return false;
  return true;
}

ParallelLayout resolve_layout(const Config& cfg, int world) {
  const auto& p = cfg.parallel;
  if (world < 1) MOE_THROW(ConfigError, "world size " << world << " must be >= 1");
  if (p.ranks > 0 && p.ranks != world)
    MOE_THROW(ConfigError, "parallel.ranks = " << p.ranks << " but the launcher started " << world
                                               << " ranks: set parallel.ranks=0 (auto) or launch "
                                               << p.ranks);
  int64_t ep = p.ep, dp = p.dp;
  if (ep == 0 && dp == 0) {
    ep = world;
    dp = 1;
  } else if (ep == 0) {
    if (world % dp != 0)
      MOE_THROW(ConfigError, "parallel.dp = " << dp << " does not divide the world size " << world);
    ep = world / dp;
  } else if (dp == 0) {
    if (world % ep != 0)
      MOE_THROW(ConfigError, "parallel.ep = " << ep << " does not divide the world size " << world);
    dp = world / ep;
  }
  if (ep * dp != world)
    MOE_THROW(ConfigError, "parallel.ep * parallel.dp = " << ep << " * " << dp << " = " << ep * dp
                                                          << " but the world size is " << world);
  if (cfg.moe.experts % ep != 0)
    MOE_THROW(ConfigError, "moe.experts = " << cfg.moe.experts
                                            << " is not divisible by the expert-parallel size "
                                            << ep << " (world " << world << ", dp " << dp << ")");
  return ParallelLayout{static_cast<int>(ep), static_cast<int>(dp)};
}

}  // namespace moe
