#include "moe/parallel/hf_mixtral.h"

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include "moe/core/error.h"
#include "moe/parallel/safetensors.h"

namespace moe {

namespace {

// perm[j] = our dimension that becomes Hugging Face dimension j of a head (see the header).
torch::Tensor rotate_half_order(int64_t hd) {
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < hd / 2; ++i) perm.push_back(2 * i);
  for (int64_t i = 0; i < hd / 2; ++i) perm.push_back(2 * i + 1);
  return torch::tensor(perm, torch::kInt64);
}
// rows [heads * hd, D] reordered within each head: HF row j = row perm[j]
// (to_hf) or its inverse.
torch::Tensor permute_heads(const torch::Tensor& rows, int64_t hd, bool to_hf) {
  if (hd == 0) return rows;
  MOE_CHECK_T(CheckpointError, hd % 2 == 0 && rows.size(0) % hd == 0,
              "q/k projection with " << rows.size(0) << " rows is not whole heads of " << hd);
  torch::Tensor perm = rotate_half_order(hd);
  if (!to_hf) perm = perm.argsort();
  return rows.view({rows.size(0) / hd, hd, -1}).index_select(1, perm).reshape(rows.sizes());
}

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

}  // namespace

std::map<std::string, torch::Tensor> to_mixtral(const std::map<std::string, torch::Tensor>& ours,
                                                int64_t rope_head_dim) {
  std::map<std::string, torch::Tensor> out;
  const std::regex expert(R"(param\.layers\.(\d+)\.moe\.experts\.(\d+)\.(w[123]))");
  const std::regex layer(R"((param|buffer)\.layers\.(\d+)\.(.+))");
  for (const auto& [k, v] : ours) {
    std::smatch m;
    if (k == "param.embedding") {
      out["model.embed_tokens.weight"] = v;
    } else if (k == "param.head") {
      out["lm_head.weight"] = v;
    } else if (k == "param.final_norm") {
      out["model.norm.weight"] = v;
    } else if (std::regex_match(k, m, expert)) {
      out["model.layers." + m[1].str() + ".block_sparse_moe.experts." + m[2].str() + "." +
          m[3].str() + ".weight"] = v.t().contiguous();
    } else if (std::regex_match(k, m, layer)) {
      const std::string pre = "model.layers." + m[2].str() + ".", rest = m[3].str();
      if (rest == "norm1") {
        out[pre + "input_layernorm.weight"] = v;
      } else if (rest == "norm2") {
        out[pre + "post_attention_layernorm.weight"] = v;
      } else if (rest == "wqkv") {
        // [D, D + 2 kv]: q is D wide, k and v kv wide each (grouped-query attention).
        const int64_t D = v.size(0), kv = (v.size(1) - D) / 2;
        MOE_CHECK_T(CheckpointError, kv > 0 && D + 2 * kv == v.size(1),
                    "export: '" << k << "' has shape " << v.sizes()
                                << ", not [D, D + 2 * kv_width]");
        out[pre + "self_attn.q_proj.weight"] =
            permute_heads(v.narrow(1, 0, D).t().contiguous(), rope_head_dim, true);
        out[pre + "self_attn.k_proj.weight"] =
            permute_heads(v.narrow(1, D, kv).t().contiguous(), rope_head_dim, true);
        out[pre + "self_attn.v_proj.weight"] = v.narrow(1, D + kv, kv).t().contiguous();
      } else if (rest == "wo") {
        out[pre + "self_attn.o_proj.weight"] = v.t().contiguous();
      } else if (rest == "moe.router.weight") {
        out[pre + "block_sparse_moe.gate.weight"] = v;
      } else if (rest == "moe.router.balance_bias") {
        out[pre + "block_sparse_moe.gate.balance_bias"] = v;
      } else if (rest == "mlp.w1" || rest == "mlp.w3" || rest == "mlp.w2") {
        const char* n = rest == "mlp.w1" ? "gate_proj" : rest == "mlp.w3" ? "up_proj" : "down_proj";
        out[pre + "mlp." + n + ".weight"] = v.t().contiguous();
      } else if (rest.rfind("moe.shared_", 0) == 0) {
        const std::string w = rest.substr(11);  // w1 | w2 | w3, stored [1, in, out]
        const char* n = w == "w1" ? "gate_proj" : w == "w3" ? "up_proj" : "down_proj";
        out[pre + "block_sparse_moe.shared_expert." + n + ".weight"] = v[0].t().contiguous();
      } else {
        MOE_THROW(CheckpointError, "export: no Mixtral name for tensor '" << k << "'");
      }
    } else {
      MOE_THROW(CheckpointError, "export: no Mixtral name for tensor '" << k << "'");
    }
  }
  return out;
}

std::map<std::string, torch::Tensor> from_mixtral(
    const std::map<std::string, torch::Tensor>& theirs, int64_t rope_head_dim,
    const std::string& source) {
  std::map<std::string, torch::Tensor> out;
  const std::regex expert(
      R"(model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight)");
  const std::regex layer(R"(model\.layers\.(\d+)\.(.+))");
  std::map<std::string, std::map<std::string, torch::Tensor>> qkv;  // layer -> q/k/v
  for (const auto& [k, v] : theirs) {
    std::smatch m;
    if (k == "model.embed_tokens.weight") {
      out["param.embedding"] = v;
    } else if (k == "lm_head.weight") {
      out["param.head"] = v;
    } else if (k == "model.norm.weight") {
      out["param.final_norm"] = v;
    } else if (std::regex_match(k, m, expert)) {
      out["param.layers." + m[1].str() + ".moe.experts." + m[2].str() + "." + m[3].str()] =
          v.t().contiguous();
    } else if (std::regex_match(k, m, layer)) {
      const std::string pre = "param.layers." + m[1].str() + ".", rest = m[2].str();
      if (rest == "input_layernorm.weight")
        out[pre + "norm1"] = v;
      else if (rest == "post_attention_layernorm.weight")
        out[pre + "norm2"] = v;
      else if (rest == "self_attn.q_proj.weight" || rest == "self_attn.k_proj.weight" ||
               rest == "self_attn.v_proj.weight")
        qkv[m[1].str()][rest.substr(10, 1)] = v;
      else if (rest == "self_attn.o_proj.weight")
        out[pre + "wo"] = v.t().contiguous();
      else if (rest == "block_sparse_moe.gate.weight")
        out[pre + "moe.router.weight"] = v;
      else if (rest == "block_sparse_moe.gate.balance_bias")
        out["buffer.layers." + m[1].str() + ".moe.router.balance_bias"] = v;
      else if (rest == "mlp.gate_proj.weight")
        out[pre + "mlp.w1"] = v.t().contiguous();
      else if (rest == "mlp.up_proj.weight")
        out[pre + "mlp.w3"] = v.t().contiguous();
      else if (rest == "mlp.down_proj.weight")
        out[pre + "mlp.w2"] = v.t().contiguous();
      else if (rest.rfind("block_sparse_moe.shared_expert.", 0) == 0) {
        const std::string n = rest.substr(31);
        const char* w = n == "gate_proj.weight" ? "w1" : n == "up_proj.weight" ? "w3" : "w2";
        out[pre + "moe.shared_" + w] = v.t().contiguous().unsqueeze(0);
      } else {
        MOE_THROW(CheckpointError,
                  source << ": tensor '" << k << "' has no counterpart in this framework's model");
      }
    } else {
      MOE_THROW(CheckpointError,
                source << ": tensor '" << k << "' has no counterpart in this framework's model");
    }
  }
  for (auto& [l, parts] : qkv) {
    if (parts.size() != 3)
      MOE_THROW(CheckpointError,
                source << ": layer " << l << " lacks one of q_proj, k_proj, v_proj");
    out["param.layers." + l + ".wqkv"] =
        torch::cat({permute_heads(parts["q"], rope_head_dim, false).t(),
                    permute_heads(parts["k"], rope_head_dim, false).t(), parts["v"].t()},
                   1)
            .contiguous();
  }
  // A router without a balance bias gets a zero one.
  for (const auto& [k, v] : std::map<std::string, torch::Tensor>(out)) {
    auto pos = k.find(".moe.router.weight");
    if (pos == std::string::npos) continue;
    std::string bias = "buffer" + k.substr(5, pos - 5) + ".moe.router.balance_bias";
    if (!out.count(bias)) out[bias] = torch::zeros({v.size(0)});
  }
  return out;
}

void check_mixtral_expressible(const Config& cfg) {
  const auto& m = cfg.model;
  const auto& e = cfg.moe;
  auto refuse = [](const std::string& property, const std::string& why) {
    MOE_THROW(ConfigError, "cannot export to Hugging Face Mixtral: " << property << ": " << why);
  };
  if (m.dense) refuse("model.dense = true", "Mixtral has no dense FFN blocks");
  if (m.moe_every != 1)
    refuse("model.moe_every = " + std::to_string(m.moe_every),
           "Mixtral has an MoE block in every layer, no dense FFN blocks between them");
  if (e.shared_experts > 0)
    refuse("moe.shared_experts = " + std::to_string(e.shared_experts),
           "Mixtral has no shared (always-on) experts");
  if (e.score_fn != ScoreFn::Softmax)
    refuse(std::string("moe.score_fn = ") + enum_name(e.score_fn),
           "Mixtral scores experts with a softmax");
  if (e.n_groups > 1 && e.topk_groups < e.n_groups)
    refuse("group-limited routing (moe.n_groups = " + std::to_string(e.n_groups) +
               ", moe.topk_groups = " + std::to_string(e.topk_groups) + ")",
           "Mixtral chooses among all experts");
  if (!e.renormalize)
    refuse("moe.renormalize = false", "Mixtral renormalises the top-k gate weights to sum to 1");
  if (e.top_k == 1)
    refuse("moe.top_k = 1",
           "Mixtral renormalises the single gate weight to 1, this model scales the expert's "
           "output by its router probability");
  if (e.activation != Activation::SwiGLU)
    refuse(std::string("moe.activation = ") + enum_name(e.activation),
           "Mixtral's experts are SwiGLU (w2(silu(w1 x) * w3 x))");
  if (e.bias_update_rate > 0)
    refuse("moe.bias_update_rate > 0",
           "the aux-loss-free balancing bias steers expert selection; Mixtral's router has none");
}

nlohmann::json mixtral_config_json(const Config& cfg) {
  check_mixtral_expressible(cfg);
  const auto& m = cfg.model;
  const auto& e = cfg.moe;
  return {{"architectures", {"MixtralForCausalLM"}},
          {"model_type", "mixtral"},
          {"vocab_size", m.vocab},
          {"hidden_size", m.d_model},
          {"intermediate_size", e.d_expert},
          {"num_hidden_layers", m.layers},
          {"num_attention_heads", m.heads},
          {"num_key_value_heads", kv_heads_of(m)},
          {"head_dim", m.d_model / m.heads},
          {"hidden_act", "silu"},
          {"max_position_embeddings", m.seq_len},
          {"rms_norm_eps", m.norm_eps},
          {"rope_theta", m.rope_theta},
          {"rope_scaling", nullptr},
          {"sliding_window", nullptr},
          {"attention_dropout", 0.0},
          {"num_local_experts", e.experts},
          {"num_experts_per_tok", e.top_k},
          {"router_aux_loss_coef", e.aux_loss_coef},
          {"router_jitter_noise", 0.0},
          {"output_router_logits", false},
          {"tie_word_embeddings", m.tie_embeddings},
          {"initializer_range", 0.02},
          {"use_cache", true},
          {"torch_dtype", "float32"}};
}

Config config_from_mixtral_json(const nlohmann::json& j, const std::string& source) {
  auto bad = [&](const std::string& key, const std::string& why) {
    MOE_THROW(ConfigError, source << ": '" << key << "' " << why);
  };
  auto has = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
  auto integer = [&](const char* key) -> int64_t {
    if (!has(key)) bad(key, "is missing (a Mixtral config.json has it)");
    if (!j[key].is_number_integer()) bad(key, "= " + j[key].dump() + " is not an integer");
    return j[key].get<int64_t>();
  };
  auto number = [&](const char* key, double fallback) -> double {
    if (!has(key)) return fallback;
    if (!j[key].is_number()) bad(key, "= " + j[key].dump() + " is not a number");
    return j[key].get<double>();
  };
  if (!j.is_object()) bad("config.json", "is not a JSON object");
  if (!has("model_type") || j["model_type"] != "mixtral")
    bad("model_type", "= " + (has("model_type") ? j["model_type"].dump() : std::string("(none)")) +
                          ": only \"mixtral\" is read");
  if (has("hidden_act") && j["hidden_act"] != "silu")
    bad("hidden_act", "= " + j["hidden_act"].dump() + ": the experts here are SwiGLU (silu)");
  if (has("rope_scaling")) bad("rope_scaling", "is set: only plain rotary positions are computed here");
  const int64_t D = integer("hidden_size"), heads = integer("num_attention_heads");
  const int64_t kv = has("num_key_value_heads") ? integer("num_key_value_heads") : heads;
  if (has("head_dim") && heads > 0 && integer("head_dim") * heads != D)
    bad("head_dim", "= " + j["head_dim"].dump() + " is not hidden_size / num_attention_heads");
  int64_t seq = has("max_position_embeddings") ? integer("max_position_embeddings") : 4096 * 32;
  // A sliding window changes nothing while the context fits in it.
  if (has("sliding_window")) seq = std::min(seq, integer("sliding_window"));
  const bool tied = has("tie_word_embeddings") && j["tie_word_embeddings"].get<bool>();
  std::ostringstream y;
  y.precision(17);
  y << "model:\n  vocab: " << integer("vocab_size") << "\n  d_model: " << D
    << "\n  layers: " << integer("num_hidden_layers") << "\n  heads: " << heads
    << "\n  kv_heads: " << kv << "\n  d_ff: " << integer("intermediate_size")
    << "\n  seq_len: " << seq << "\n  moe_every: 1\n  dense: false\n  tie_embeddings: "
    << (tied ? "true" : "false") << "\n  norm_eps: " << number("rms_norm_eps", 1e-5)
    << "\n  rope_theta: " << number("rope_theta", 1e6) << "\nmoe:\n  experts: "
    << integer("num_local_experts") << "\n  top_k: " << integer("num_experts_per_tok")
    << "\n  d_expert: " << integer("intermediate_size")
    << "\n  activation: swiglu\n  score_fn: softmax\n  temperature: 1.0\n"
       "  capacity_factor: 0\n  shared_experts: 0\n  renormalize: true\n  n_groups: 1\n"
       "  topk_groups: 1\n  bias_update_rate: 0\n  aux_loss_coef: "
    << number("router_aux_loss_coef", 0.001) << "\n";
  Config cfg = load_config_text(y.str(), source + " (read as model/moe keys)");
  check_mixtral_expressible(cfg);
  return cfg;
}

std::map<std::string, torch::Tensor> export_mixtral(
    const std::map<std::string, torch::Tensor>& ours, const Config& cfg) {
  check_mixtral_expressible(cfg);
  std::map<std::string, torch::Tensor> params;
  for (const auto& [k, v] : ours)
    if (k.rfind("param.", 0) == 0) params[k] = v;  // the balance bias is unused (no bias updates)
  auto out = to_mixtral(params, cfg.model.d_model / cfg.model.heads);
  // Mixtral's router has no temperature: logits / t = x (W / t)^T.
  if (cfg.moe.temperature != 1.0) {
    const std::string gate = ".block_sparse_moe.gate.weight";
    for (auto& [k, v] : out)
      if (k.size() > gate.size() && k.compare(k.size() - gate.size(), gate.size(), gate) == 0)
        v = v / cfg.moe.temperature;
  }
  return out;
}

std::map<std::string, torch::Tensor> read_hf_tensors(const std::string& dir) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (!file_exists(index_path)) {
    const std::string single = dir + "/model.safetensors";
    if (!file_exists(single))
      MOE_THROW(CheckpointError, "'" << dir
                                     << "' has neither model.safetensors nor "
                                        "model.safetensors.index.json: not a Hugging Face model "
                                        "directory");
    return read_safetensors(single);
  }
  nlohmann::json index;
  try {
    std::ifstream(index_path) >> index;
  } catch (const std::exception& e) {
    MOE_THROW(CheckpointError, index_path << " is not valid JSON: " << e.what());
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    MOE_THROW(CheckpointError, index_path << " has no \"weight_map\" object");
  std::map<std::string, std::vector<std::string>> by_shard;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string())
      MOE_THROW(CheckpointError, index_path << ": weight_map[\"" << it.key()
                                            << "\"] is not a file name");
    by_shard[it.value().get<std::string>()].push_back(it.key());
  }
  std::map<std::string, torch::Tensor> out;
  for (const auto& [shard, names] : by_shard) {
    const std::string path = dir + "/" + shard;
    if (!file_exists(path))
      MOE_THROW(CheckpointError, index_path << " names shard '" << shard << "', which is missing");
    auto tensors = read_safetensors(path);
    for (const auto& n : names) {
      auto it = tensors.find(n);
      if (it == tensors.end())
        MOE_THROW(CheckpointError, path << " lacks tensor '" << n << "' that " << index_path
                                        << " assigns to it");
      out[n] = it->second;
    }
  }
  return out;
}

}  // namespace moe
