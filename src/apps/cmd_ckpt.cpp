// `moe ckpt info|export|import|upcycle|prune`.
#include <ATen/CPUGeneratorImpl.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

#include "moe/apps/commands.h"
#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/filesystem.h"
#include "moe/model/transformer.h"
#include "moe/parallel/checkpoint.h"
#include "moe/parallel/hf_mixtral.h"
#include "moe/parallel/safetensors.h"
#include "moe/train/data.h"

namespace moe::apps {

namespace {

// DIR may be a run directory (newest valid checkpoint) or a checkpoint directory.
std::string resolve_checkpoint_dir(const std::string& dir) {
  struct stat st;
  if (::stat((dir + "/manifest.json").c_str(), &st) == 0) return dir;
  std::string problems;
  std::string found = find_checkpoint(dir, &problems);
  if (found.empty())
    MOE_THROW(CheckpointError, "no valid checkpoint in '" << dir << "': " << problems);
  return found;
}

nlohmann::json read_manifest(const std::string& ckpt) {
  std::ifstream in(ckpt + "/manifest.json");
  nlohmann::json m;
  try {
    in >> m;
  } catch (const std::exception& e) {
    MOE_THROW(CheckpointError, ckpt << "/manifest.json is unreadable: " << e.what());
  }
  return m;
}

// All "param."/"buffer." tensors of a checkpoint, keys without the prefix kind kept.
std::map<std::string, torch::Tensor> read_checkpoint(const std::string& ckpt,
                                                     const nlohmann::json& m) {
  std::map<std::string, torch::Tensor> all;
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it) {
    const std::string path = ckpt + "/" + it.key();
    if (file_checksum(path) != it.value()["fnv1a64"].get<uint64_t>())
      MOE_THROW(CheckpointError,
                path << " fails its checksum (the manifest records another content)");
    for (auto& [k, v] : read_safetensors(path))
      if (k.rfind("param.", 0) == 0 || k.rfind("buffer.", 0) == 0) all[k] = v;
  }
  return all;
}

int ckpt_info(const std::string& dir) {
  const std::string ckpt = resolve_checkpoint_dir(dir);
  nlohmann::json m = read_manifest(ckpt);
  auto tensors = read_checkpoint(ckpt, m);
  int64_t params = 0, expert_params = 0;
  for (auto& [k, v] : tensors) {
    if (k.rfind("param.", 0) != 0) continue;
    params += v.numel();
    if (k.find(".experts.") != std::string::npos) expert_params += v.numel();
  }
  std::cout << "checkpoint " << ckpt << "\n"
            << "  step          " << m["step"] << "\n"
            << "  saved at      ep " << m["ep"] << " x dp " << m["dp"]
            << " (loads at any EP that divides " << m["experts"] << " experts)\n"
            << "  moe layers    " << m["moe_layers"] << ", " << m["experts"] << " experts each\n"
            << "  parameters    " << params << " (experts " << expert_params << ")\n"
            << "  files         (all checksums verified)\n";
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it)
    std::cout << "    " << it.key() << "  " << it.value()["bytes"] << " bytes\n";
  return kExitOk;
}

int ckpt_export(const std::string& dir, const std::string& out) {
  if (out.empty()) MOE_THROW(UsageError, "moe ckpt export DIR --safetensors OUT: OUT is required");
  const std::string ckpt = resolve_checkpoint_dir(dir);
  nlohmann::json m = read_manifest(ckpt);
  auto named = to_mixtral(read_checkpoint(ckpt, m), /*rope_head_dim=*/0);
  write_safetensors(
      out, named,
      {{"format", "pt"},
       {"source", ckpt},
       {"step", std::to_string(m["step"].get<int64_t>())},
       {"rope", "pairs (2i, 2i+1) rotated together; Hugging Face's rotate_half pairs (i, i+d/2)"}});
  std::cout << "wrote " << named.size() << " tensors to " << out << "\n";
  return kExitOk;
}

// The config a checkpoint was trained with: RUN_DIR/config.yaml, where DIR
// is the run directory or one of its checkpoints/step_N.
Config run_config_of(const std::string& dir, const std::string& ckpt) {
  struct stat st;
  for (const std::string& path : {dir + "/config.yaml", ckpt + "/../../config.yaml"})
    if (::stat(path.c_str(), &st) == 0) return load_config(path);
  MOE_THROW(CheckpointError, "no config.yaml in '" << dir << "' or '" << ckpt
                                                   << "/../..': a Hugging Face export needs the "
                                                      "run's config (pass the run directory)");
}

void write_text_file(const std::string& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) MOE_THROW(CheckpointError, "cannot write '" << path << "'");
}

// `moe ckpt export DIR --hf OUT_DIR`: config.json + model.safetensors that
// MixtralForCausalLM loads and computes our logits with.
int ckpt_export_hf(const std::string& dir, const std::string& out_dir) {
  const std::string ckpt = resolve_checkpoint_dir(dir);
  const Config cfg = run_config_of(dir, ckpt);
  const nlohmann::json config_json = mixtral_config_json(cfg);  // refuses what Mixtral lacks
  nlohmann::json m = read_manifest(ckpt);
  auto ours = read_checkpoint(ckpt, m);
  // The config must describe these tensors (a config.yaml edited after training would not).
  const int64_t D = cfg.model.d_model, kv = kv_heads_of(cfg.model) * (D / cfg.model.heads);
  auto expect_shape = [&](const std::string& key, std::vector<int64_t> want) {
    auto it = ours.find(key);
    if (it == ours.end() || it->second.sizes().vec() != want)
      MOE_THROW(CheckpointError,
                ckpt << ": '" << key << "' "
                     << (it == ours.end() ? std::string("is missing")
                                          : "has shape " + comm::shape_str(it->second))
                     << ", the run's config.yaml implies " << c10::IntArrayRef(want));
  };
  expect_shape("param.embedding", {cfg.model.vocab, D});
  expect_shape("param.layers.0.wqkv", {D, D + 2 * kv});
  expect_shape("param.layers." + std::to_string(cfg.model.layers - 1) + ".moe.experts." +
                   std::to_string(cfg.moe.experts - 1) + ".w1",
               {D, cfg.moe.d_expert});
  auto tensors = export_mixtral(ours, cfg);
  const std::string error = make_directories(out_dir);
  if (!error.empty()) MOE_THROW(CheckpointError, error);
  write_safetensors(out_dir + "/model.safetensors", tensors,
                    {{"format", "pt"}, {"source", ckpt},
                     {"step", std::to_string(m["step"].get<int64_t>())}});
  write_text_file(out_dir + "/config.json", config_json.dump(2) + "\n");
  std::cout << "wrote " << out_dir << "/config.json and " << out_dir << "/model.safetensors ("
            << tensors.size() << " tensors, MixtralForCausalLM, step " << m["step"] << ")\n";
  if (cfg.moe.capacity_factor > 0)
    std::cout << "note: Mixtral routes dropless; this run trained with moe.capacity_factor = "
              << cfg.moe.capacity_factor
              << ", so its own forward drops tokens over capacity where Mixtral's does not\n";
  return kExitOk;
}

// Writes `ours` (param./buffer. keys, experts keyed globally) as a one-rank
// checkpoint RUN_DIR/checkpoints/step_N that `moe train --resume` loads at any EP.
std::string write_plain_checkpoint(const std::map<std::string, torch::Tensor>& ours,
                                   const std::string& run_dir, int64_t step, int64_t* n_experts_out,
                                   size_t* moe_layers_out) {
  std::map<std::string, torch::Tensor> shared, experts;
  int64_t n_experts = 0;
  std::set<std::string> moe_layers;
  const std::regex expert(R"(param\.layers\.(\d+)\.moe\.experts\.(\d+)\.w[123])");
  for (auto& [k, v] : ours) {
    std::smatch m;
    if (std::regex_match(k, m, expert)) {
      experts[k] = v;
      n_experts = std::max<int64_t>(n_experts, std::stoll(m[2].str()) + 1);
      moe_layers.insert(m[1].str());
    } else {
      shared[k] = v;
    }
  }
  char name[32];
  std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(step));
  const std::string dir = run_dir + "/checkpoints/" + name;
  std::string error = make_directories(dir);
  if (!error.empty()) MOE_THROW(CheckpointError, error);
  write_safetensors(dir + "/shared.safetensors", shared,
                    {{"step", std::to_string(step)}, {"adam_step", "0"}});
  nlohmann::json files = nlohmann::json::object();
  std::vector<std::string> names = {"shared.safetensors"};
  if (!experts.empty()) {
    write_safetensors(dir + "/experts.ep0.safetensors", experts, {{"step", std::to_string(step)}});
    names.push_back("experts.ep0.safetensors");
  }
  for (const auto& n : names) {
    struct stat st;
    ::stat((dir + "/" + n).c_str(), &st);
    files[n] = {{"bytes", static_cast<int64_t>(st.st_size)},
                {"fnv1a64", file_checksum(dir + "/" + n)}};
  }
  nlohmann::json manifest = {{"step", step},
                             {"experts", n_experts},
                             {"moe_layers", moe_layers.size()},
                             {"ep", 1},
                             {"dp", 1},
                             {"config_hash", 0},
                             {"files", files}};
  std::ofstream(dir + "/manifest.json") << manifest.dump(2) << "\n";
  *n_experts_out = n_experts;
  *moe_layers_out = moe_layers.size();
  return dir;
}

int ckpt_import(const std::string& file, const std::string& run_dir) {
  if (file.empty() || run_dir.empty())
    MOE_THROW(UsageError, "moe ckpt import RUN_DIR --safetensors FILE: both are required");
  auto ours = from_mixtral(read_safetensors(file), /*rope_head_dim=*/0, file);
  int64_t experts = 0;
  size_t layers = 0;
  std::string dir = write_plain_checkpoint(ours, run_dir, 0, &experts, &layers);
  std::cout << "imported " << ours.size() << " tensors (" << layers << " MoE layers, " << experts
            << " experts) into " << dir << "; continue with: moe train CONFIG --resume " << run_dir
            << "\n";
  return kExitOk;
}

// `moe ckpt import RUN_DIR --hf HF_DIR`: a Hugging Face Mixtral directory
// (single file or sharded) -> RUN_DIR/checkpoints/step_00000000 + RUN_DIR/config.yaml.
int ckpt_import_hf(const std::string& hf_dir, const std::string& run_dir) {
  const std::string json_path = hf_dir + "/config.json";
  nlohmann::json j;
  {
    std::ifstream in(json_path);
    if (!in) MOE_THROW(CheckpointError, "cannot open '" << json_path << "'");
    try {
      in >> j;
    } catch (const std::exception& e) {
      MOE_THROW(CheckpointError, json_path << " is not valid JSON: " << e.what());
    }
  }
  const Config cfg = config_from_mixtral_json(j, json_path);
  auto theirs = read_hf_tensors(hf_dir);
  for (auto& [k, v] : theirs)  // bf16 / fp16 releases: our parameters are float32
    if (v.is_floating_point()) v = v.to(torch::kFloat32);
  if (cfg.model.tie_embeddings)
    theirs.erase("lm_head.weight");  // tied: the head is the embedding
  else if (!theirs.count("lm_head.weight"))
    MOE_THROW(CheckpointError, hf_dir << ": tie_word_embeddings is false but there is no "
                                         "lm_head.weight");
  auto ours = from_mixtral(theirs, cfg.model.d_model / cfg.model.heads, hf_dir);
  const std::string config_path = run_dir + "/config.yaml", text = dump_config(cfg);
  struct stat st;
  if (::stat(config_path.c_str(), &st) == 0) {
    // Only a rerun of the same import may write over a config (its
    // training and data settings are the user's, not ours to replace).
    std::ifstream in(config_path);
    std::stringstream old;
    old << in.rdbuf();
    if (old.str() != text)
      MOE_THROW(CheckpointError, run_dir << " already has a config.yaml (another model, or "
                                            "settings of its own): import into a new directory");
  }
  int64_t experts = 0;
  size_t layers = 0;
  std::string dir = write_plain_checkpoint(ours, run_dir, 0, &experts, &layers);
  write_text_file(config_path, text);
  std::cout << "imported " << theirs.size() << " tensors (" << layers << " MoE layers, " << experts
            << " experts) into " << dir << " and " << config_path
            << "; continue with: moe train " << config_path << " --resume " << run_dir
            << " (set data.* and train.* first), or moe generate " << run_dir << "\n";
  return kExitOk;
}

// Dense -> MoE (sparse upcycling): every dense MLP is copied into each of
// `experts` experts; routers start fresh (N(0, (0.1/sqrt(D))^2), seeded).
// With renormalised top-k gates the upcycled model computes what the dense one did.
int ckpt_upcycle(const std::string& dense_dir, const std::string& out_dir, int64_t experts,
                 int64_t seed) {
  if (experts < 1)
    MOE_THROW(UsageError, "moe ckpt upcycle DENSE_DIR OUT_DIR --experts E: E must be >= 1");
  const std::string ckpt = resolve_checkpoint_dir(dense_dir);
  nlohmann::json m = read_manifest(ckpt);
  auto dense = read_checkpoint(ckpt, m);
  std::map<std::string, torch::Tensor> out;
  const std::regex mlp(R"(param\.layers\.(\d+)\.mlp\.(w[123]))");
  int64_t width = -1, layers = 0;
  for (auto& [k, v] : dense) {
    std::smatch sm;
    if (!std::regex_match(k, sm, mlp)) {
      out[k] = v;
      continue;
    }
    const std::string l = sm[1].str(), w = sm[2].str();
    for (int64_t e = 0; e < experts; ++e)
      out["param.layers." + l + ".moe.experts." + std::to_string(e) + "." + w] = v;
    if (w == "w1") {
      ++layers;
      width = v.size(1);
      const int64_t D = v.size(0);
      auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed) * 7919 +
                                                          std::stoull(l));
      out["param.layers." + l + ".moe.router.weight"] =
          at::normal(0.0, 0.1 / std::sqrt(double(D)), {experts, D}, gen);
      out["buffer.layers." + l + ".moe.router.balance_bias"] = torch::zeros({experts});
    }
  }
  if (layers == 0)
    MOE_THROW(CheckpointError,
              ckpt << " has no dense MLP blocks (layers.N.mlp.w1): nothing to upcycle");
  int64_t n_experts = 0;
  size_t n_layers = 0;
  std::string dir =
      write_plain_checkpoint(out, out_dir, m["step"].get<int64_t>(), &n_experts, &n_layers);
  std::cout << "upcycled " << layers << " dense MLP blocks into " << experts << " experts each -> "
            << dir << "\n"
            << "train it with: moe train CONFIG model.dense=false model.moe_every=1 moe.experts="
            << experts << " moe.d_expert=" << width << " --resume " << out_dir << "\n";
  return kExitOk;
}

// Expert pruning: importance of expert e in a layer = its routed load times its
// mean gate weight over a data sample (= its share of the layer's gate mass),
// relative to the layer's mean (1.0 = average). Experts under `threshold` are
// dropped. The model needs the same expert count in every MoE layer, so each
// layer keeps its K most important experts, K = the most any layer keeps
// (at least top_k); experts kept only for that reason are reported.
int ckpt_prune(const std::string& run_dir, const std::string& out_dir,
               const std::string& config_path, double threshold, int64_t batches) {
  if (config_path.empty())
    MOE_THROW(UsageError, "moe ckpt prune RUN_DIR OUT_DIR --config CONFIG: CONFIG is required");
  Config cfg = load_config(config_path, {"parallel.backend=thread", "parallel.ranks=0",
                                         "parallel.ep=0", "parallel.dp=0"});
  const int64_t E = cfg.moe.experts;
  std::vector<std::vector<double>> mass;  // [moe layer][expert]
  int64_t step = 0;
  comm::run_ranks(1, cfg.parallel.timeout_s, [&](comm::Communicator& world) {
    comm::ProcessMesh mesh(world, 1, 1);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    step = load_checkpoint(run_dir, model, nullptr, mesh, cfg);
    auto data = make_data_source(cfg, 0, 1);
    torch::NoGradGuard ng;
    for (int64_t b = 0; b < batches; ++b) {
      LMOutput o =
          model.forward(data->batch(step + b, 0, cfg.train.batch).inputs, /*training=*/false);
      mass.resize(o.stats.size(), std::vector<double>(E, 0.0));
      for (size_t l = 0; l < o.stats.size(); ++l)
        for (int64_t e = 0; e < E; ++e) mass[l][e] += o.stats[l].gate_per_expert[e];
    }
  });
  if (mass.empty())
    MOE_THROW(CheckpointError,
              "the model of " << config_path << " has no MoE layers: nothing to prune");
  // Block index of each MoE layer.
  std::vector<int64_t> blocks;
  for (int64_t i = 0; i < cfg.model.layers; ++i)
    if (!cfg.model.dense && (i + 1) % cfg.model.moe_every == 0) blocks.push_back(i);
  std::vector<std::vector<double>> rel(mass.size(), std::vector<double>(E));
  int64_t keep = cfg.moe.top_k;
  for (size_t l = 0; l < mass.size(); ++l) {
    double total = 0;
    for (double v : mass[l]) total += v;
    int64_t above = 0;
    for (int64_t e = 0; e < E; ++e) {
      rel[l][e] = total > 0 ? mass[l][e] * E / total : 1.0;
      above += rel[l][e] >= threshold;
    }
    keep = std::max(keep, above);
  }
  const std::string ckpt = resolve_checkpoint_dir(run_dir);
  nlohmann::json m = read_manifest(ckpt);
  auto tensors = read_checkpoint(ckpt, m);
  std::map<std::string, torch::Tensor> out = tensors;
  std::cout << std::fixed << std::setprecision(3) << "expert importance (share of gate mass x " << E
            << "; 1.0 = average) over " << batches << " micro-batches, threshold " << threshold
            << ", keeping " << keep << " of " << E << " experts per layer\n";
  for (size_t l = 0; l < mass.size(); ++l) {
    std::vector<int64_t> order(E);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return rel[l][a] > rel[l][b]; });
    std::vector<int64_t> kept(order.begin(), order.begin() + keep);
    std::sort(kept.begin(), kept.end());
    const std::string pre = "layers." + std::to_string(blocks[l]) + ".moe.";
    std::cout << "  layer " << blocks[l] << ": removed";
    int64_t removed = 0;
    for (int64_t e : order)
      if (std::find(kept.begin(), kept.end(), e) == kept.end()) {
        std::cout << " " << e << " (" << rel[l][e] << ")";
        ++removed;
      }
    if (removed == 0) std::cout << " none";
    std::cout << "; kept below threshold:";
    int64_t under = 0;
    for (int64_t e : kept) {
      if (rel[l][e] >= threshold) continue;
      std::cout << " " << e << " (" << rel[l][e] << ")";
      ++under;
    }
    if (under == 0) std::cout << " none";
    std::cout << "\n";
    torch::Tensor index = torch::tensor(kept, torch::kInt64);
    out["param." + pre + "router.weight"] =
        tensors.at("param." + pre + "router.weight").index_select(0, index);
    out["buffer." + pre + "router.balance_bias"] =
        tensors.at("buffer." + pre + "router.balance_bias").index_select(0, index);
    for (int64_t e = 0; e < E; ++e)
      for (const char* w : {"w1", "w2", "w3"})
        out.erase("param." + pre + "experts." + std::to_string(e) + "." + w);
    for (size_t i = 0; i < kept.size(); ++i)
      for (const char* w : {"w1", "w2", "w3"}) {
        auto it = tensors.find("param." + pre + "experts." + std::to_string(kept[i]) + "." + w);
        if (it != tensors.end())
          out["param." + pre + "experts." + std::to_string(i) + "." + w] = it->second;
      }
  }
  int64_t n_experts = 0;
  size_t n_layers = 0;
  std::string dir = write_plain_checkpoint(out, out_dir, step, &n_experts, &n_layers);
  std::cout << "wrote " << dir << "; continue with: moe train " << config_path
            << " moe.experts=" << keep << " --resume " << out_dir << "\n";
  return kExitOk;
}

}  // namespace

int run_ckpt(const CkptArgs& args) {
  auto path = [&](size_t i) -> std::string {
    if (args.paths.size() <= i)
      MOE_THROW(UsageError, "moe ckpt " << args.action << ": missing DIR argument");
    return args.paths[i];
  };
  if (args.action == "info") return ckpt_info(path(0));
  if ((args.action == "export" || args.action == "import") && !args.hf.empty()) {
    if (!args.safetensors.empty())
      MOE_THROW(UsageError, "moe ckpt " << args.action << ": give --hf or --safetensors, not both");
    return args.action == "export" ? ckpt_export_hf(path(0), args.hf)
                                   : ckpt_import_hf(args.hf, path(0));
  }
  if (args.action == "export") return ckpt_export(path(0), args.safetensors);
  if (args.action == "import") return ckpt_import(args.safetensors, path(0));
  if (args.action == "upcycle") return ckpt_upcycle(path(0), path(1), args.experts, args.seed);
  if (args.action == "prune")
    return ckpt_prune(path(0), path(1), args.config_path, args.threshold, args.batches);
  return not_implemented("ckpt " + args.action);
}

}  // namespace moe::apps
