#include "moe/parallel/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <type_traits>
#include <utility>
#include <nlohmann/json.hpp>

#include "moe/core/error.h"
#include "moe/core/filesystem.h"
#include "moe/core/hash.h"
#include "moe/core/log.h"
#include "moe/model/transformer.h"
#include "moe/parallel/safetensors.h"

namespace moe {

namespace {

std::atomic<int> g_crash_countdown{0};

void mkdir_p(const std::string& path) {
  std::string error = make_directories(path);
  if (!error.empty()) MOE_THROW(CheckpointError, error);
}

void remove_tree(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (!d) return;
  while (dirent* e = ::readdir(d)) {
    if (!std::strcmp(e->d_name, ".") || !std::strcmp(e->d_name, "..")) continue;
    std::string p = path + "/" + e->d_name;
    struct stat st;
    if (::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
      remove_tree(p);
    else
      ::unlink(p.c_str());
  }
  ::closedir(d);
  ::rmdir(path.c_str());
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

// The optimizer's state key of a parameter: LibTorch 1.x keys by the string
// of the TensorImpl address (what c10::guts::to_string printed), 2.x by the
// address itself (and has no c10::guts::to_string).
template <class Key>
Key state_key(const torch::Tensor& p) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}
using OptimStateKey = std::decay_t<decltype(std::declval<torch::optim::AdamW&>().state())>::key_type;

torch::optim::AdamWParamState* adam_state(torch::optim::AdamW& opt, const torch::Tensor& p) {
  auto& states = opt.state();
  auto it = states.find(state_key<OptimStateKey>(p));
  return it == states.end() ? nullptr
                            : static_cast<torch::optim::AdamWParamState*>(it->second.get());
}

void set_adam_state(torch::optim::AdamW& opt, const torch::Tensor& p, int64_t step,
                    const torch::Tensor& m, const torch::Tensor& v) {
  auto st = std::make_unique<torch::optim::AdamWParamState>();
  st->step(step);
  // On the parameter's device (checkpoints are read on the CPU).
  st->exp_avg(m.to(p.device(), p.scalar_type()).clone());
  st->exp_avg_sq(v.to(p.device(), p.scalar_type()).clone());
  opt.state()[state_key<OptimStateKey>(p)] = std::move(st);
}

// "layers.1.moe.w1" -> ("layers.1.moe", "w1")
std::pair<std::string, std::string> split_expert_name(const std::string& name) {
  auto dot = name.rfind('.');
  return {name.substr(0, dot), name.substr(dot + 1)};
}

std::string expert_key(const std::string& name, int64_t e) {
  auto [prefix, suffix] = split_expert_name(name);
  return prefix + ".experts." + std::to_string(e) + "." + suffix;
}

}  // namespace

void set_checkpoint_crash_for_test(int nth_save) {
  g_crash_countdown = nth_save;
}

uint64_t file_checksum(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) MOE_THROW(CheckpointError, "cannot read '" << path << "': " << std::strerror(errno));
  uint64_t h = kFnv1aOffset;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h = fnv1a64(buf.data(), static_cast<size_t>(in.gcount()), h);
  }
  return h;
}

void save_checkpoint(const std::string& run_dir, int64_t step, TransformerLM& model,
                     torch::optim::AdamW& optimizer, comm::ProcessMesh& mesh, const Config& cfg) {
  comm::Communicator& world = mesh.world();
  const std::string root = run_dir + "/checkpoints";
  const std::string final_dir = root + "/" + step_name(step), tmp_dir = final_dir + ".tmp";
  if (world.rank() == 0) {
    mkdir_p(root);
    remove_tree(tmp_dir);
    mkdir_p(tmp_dir);
  }
  world.barrier();
  int64_t adam_step = 0;
  if (world.rank() == 0) {
    std::map<std::string, torch::Tensor> t;
    for (auto& [name, p] : model.shared_parameters()) {
      t["param." + name] = p.detach();
      if (auto* s = adam_state(optimizer, p)) {
        t["adam.m." + name] = s->exp_avg();
        t["adam.v." + name] = s->exp_avg_sq();
        adam_step = s->step();
      }
    }
    for (const auto& b : model.named_buffers()) t["buffer." + b.key()] = b.value();
    write_safetensors(tmp_dir + "/shared.safetensors", t,
                      {{"step", std::to_string(step)}, {"adam_step", std::to_string(adam_step)}});
  }
  if (mesh.dp_rank() == 0) {
    std::map<std::string, torch::Tensor> t;
    const auto& layers = model.moe_layers();
    const int64_t first = layers.empty() ? 0 : layers[0]->first_expert();
    for (auto& [name, p] : model.expert_parameters()) {
      auto* s = adam_state(optimizer, p);
      for (int64_t le = 0; le < p.size(0); ++le) {
        const std::string key = expert_key(name, first + le);
        t["param." + key] = p[le].detach();
        if (s) {
          t["adam.m." + key] = s->exp_avg()[le];
          t["adam.v." + key] = s->exp_avg_sq()[le];
        }
      }
    }
    if (!t.empty())
      write_safetensors(tmp_dir + "/experts.ep" + std::to_string(mesh.ep_rank()) + ".safetensors",
                        t, {{"step", std::to_string(step)}});
  }
  world.barrier();
  // Every rank decides alike: rank 0 counts down, the barrier orders it before the others read.
  int crash = 0;
  if (world.rank() == 0 && g_crash_countdown > 0) crash = --g_crash_countdown == 0 ? 1 : 0;
  torch::Tensor flag = torch::tensor({int64_t(crash)}, torch::kInt64);
  world.broadcast(flag, 0);
  if (flag.item<int64_t>())
    MOE_THROW(CheckpointError, "simulated crash after writing '" << tmp_dir << "'");
  if (world.rank() == 0) {
    nlohmann::json files = nlohmann::json::object();
    DIR* d = ::opendir(tmp_dir.c_str());
    while (dirent* e = d ? ::readdir(d) : nullptr) {
      std::string n = e->d_name;
      if (n.size() < 12 || n.compare(n.size() - 12, 12, ".safetensors") != 0) continue;
      struct stat st;
      ::stat((tmp_dir + "/" + n).c_str(), &st);
      files[n] = {{"bytes", static_cast<int64_t>(st.st_size)},
                  {"fnv1a64", file_checksum(tmp_dir + "/" + n)}};
    }
    if (d) ::closedir(d);
    nlohmann::json manifest = {{"step", step},
                               {"experts", cfg.moe.experts},
                               {"moe_layers", model.moe_layers().size()},
                               {"ep", mesh.ep()},
                               {"dp", mesh.dp()},
                               {"config_hash", config_hash(cfg)},
                               {"files", files}};
    {
      std::ofstream out(tmp_dir + "/manifest.json");
      out << manifest.dump(2) << "\n";
      if (!out) MOE_THROW(CheckpointError, "cannot write '" << tmp_dir << "/manifest.json'");
    }
    fsync_path(tmp_dir + "/manifest.json");
    fsync_path(tmp_dir);
    remove_tree(final_dir);
    if (std::rename(tmp_dir.c_str(), final_dir.c_str()) != 0) {
      MOE_THROW(CheckpointError, "cannot rename '" << tmp_dir << "' to '" << final_dir
                                                   << "': " << std::strerror(errno));
    }
    fsync_path(root);
  }
  world.barrier();
}

std::string find_checkpoint(const std::string& run_dir, std::string* problems) {
  const std::string root = run_dir + "/checkpoints";
  DIR* d = ::opendir(root.c_str());
  if (!d) {
    if (problems) *problems = "no directory '" + root + "'";
    return "";
  }
  std::vector<std::string> names;
  while (dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.rfind("step_", 0) == 0 && n.find(".tmp") == std::string::npos) names.push_back(n);
  }
  ::closedir(d);
  std::sort(names.rbegin(), names.rend());
  std::string why;
  for (const auto& n : names) {
    const std::string dir = root + "/" + n;
    std::ifstream in(dir + "/manifest.json");
    nlohmann::json m;
    try {
      in >> m;
    } catch (const std::exception&) {
      why += dir + "/manifest.json is missing or unreadable; ";
      continue;
    }
    bool ok = m.contains("files") && m["files"].is_object();
    for (auto it = ok ? m["files"].begin() : m.end(); ok && it != m["files"].end(); ++it) {
      const std::string f = dir + "/" + it.key();
      struct stat st;
      if (::stat(f.c_str(), &st) != 0) {
        why += f + " is missing; ";
        ok = false;
      } else if (st.st_size != it.value()["bytes"].get<int64_t>()) {
        why += f + " has " + std::to_string(st.st_size) + " bytes, manifest says " +
               std::to_string(it.value()["bytes"].get<int64_t>()) + "; ";
        ok = false;
      } else if (file_checksum(f) != it.value()["fnv1a64"].get<uint64_t>()) {
        why += f + " fails its checksum; ";
        ok = false;
      }
    }
    if (ok) {
      if (problems) *problems = why;
      return dir;
    }
  }
  if (problems) *problems = names.empty() ? "no step_* checkpoints in '" + root + "'" : why;
  return "";
}

int64_t load_checkpoint(const std::string& run_dir, TransformerLM& model,
                        torch::optim::AdamW& optimizer, comm::ProcessMesh& mesh,
                        const Config& cfg) {
  std::string problems;
  const std::string dir = find_checkpoint(run_dir, &problems);
  if (dir.empty())
    MOE_THROW(CheckpointError,
              "no valid checkpoint to resume from in '" << run_dir << "': " << problems);
  if (!problems.empty() && mesh.world().rank() == 0)
    MOE_LOG(Warn) << "skipped invalid checkpoints: " << problems;
  nlohmann::json m;
  std::ifstream(dir + "/manifest.json") >> m;
  if (m["experts"].get<int64_t>() != cfg.moe.experts)
    MOE_THROW(CheckpointError,
              dir << "/manifest.json: checkpoint has " << m["experts"].get<int64_t>()
                  << " experts per MoE layer, the config has moe.experts = " << cfg.moe.experts);
  if (m["moe_layers"].get<size_t>() != model.moe_layers().size())
    MOE_THROW(CheckpointError, dir << "/manifest.json: checkpoint has "
                                   << m["moe_layers"].get<size_t>() << " MoE layers, the model has "
                                   << model.moe_layers().size());
  torch::NoGradGuard ng;
  std::map<std::string, std::string> meta;
  const std::string shared_file = dir + "/shared.safetensors";
  auto shared = read_safetensors(shared_file, &meta);
  const int64_t adam_step = meta.count("adam_step") ? std::stoll(meta["adam_step"]) : 0;
  auto take = [&](std::map<std::string, torch::Tensor>& from, const std::string& file,
                  const std::string& key, const torch::Tensor& like) -> torch::Tensor {
    auto it = from.find(key);
    if (it == from.end()) MOE_THROW(CheckpointError, file << " has no tensor '" << key << "'");
    if (it->second.sizes() != like.sizes())
      MOE_THROW(CheckpointError, file << ": '" << key << "' has shape "
                                      << comm::shape_str(it->second) << ", the model expects "
                                      << comm::shape_str(like));
    return it->second;
  };
  for (auto& [name, p] : model.shared_parameters()) {
    p.copy_(take(shared, shared_file, "param." + name, p));
    if (adam_step > 0 && shared.count("adam.m." + name))
      set_adam_state(optimizer, p, adam_step, take(shared, shared_file, "adam.m." + name, p),
                     take(shared, shared_file, "adam.v." + name, p));
  }
  for (auto b : model.named_buffers())
    b.value().copy_(take(shared, shared_file, "buffer." + b.key(), b.value()));

  std::map<std::string, torch::Tensor> experts;
  std::map<std::string, std::string> origin;
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it)
    if (it.key().rfind("experts.", 0) == 0)
      for (auto& [k, v] : read_safetensors(dir + "/" + it.key())) {
        experts[k] = v;
        origin[k] = dir + "/" + it.key();
      }
  const std::string experts_desc = dir + "/experts.ep*.safetensors";
  const int64_t first = model.moe_layers().empty() ? 0 : model.moe_layers()[0]->first_expert();
  for (auto& [name, p] : model.expert_parameters()) {
    std::vector<torch::Tensor> ms, vs;
    for (int64_t le = 0; le < p.size(0); ++le) {
      const std::string key = expert_key(name, first + le);
      p[le].copy_(take(experts, experts_desc, "param." + key, p[le]));
      if (adam_step > 0 && experts.count("adam.m." + key)) {
        ms.push_back(take(experts, experts_desc, "adam.m." + key, p[le]));
        vs.push_back(take(experts, experts_desc, "adam.v." + key, p[le]));
      }
    }
    if (static_cast<int64_t>(ms.size()) == p.size(0))
      set_adam_state(optimizer, p, adam_step, torch::stack(ms), torch::stack(vs));
  }
  if (mesh.world().rank() == 0) {
    MOE_LOG(Info) << "loaded checkpoint " << dir << " (step " << m["step"].get<int64_t>() << ")";
  }
  return m["step"].get<int64_t>();
}

}  // namespace moe
