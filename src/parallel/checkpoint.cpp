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
#include "moe/parallel/optimizer.h"
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

// Moment tensors in a checkpoint: "adam.m.KEY" (a whole unit) or
// "adam.m.KEY@OFFSET" (a piece of it, from a sharded optimizer).
std::string piece_name(const char* which, const MomentPiece& p, bool sharded) {
  std::string n = std::string("adam.") + which + "." + p.key;
  return sharded ? n + "@" + std::to_string(p.offset) : n;
}

// Reassembles whole units from whole tensors or pieces (any layout wrote them).
class MomentStore {
 public:
  void add(const std::string& file, std::map<std::string, torch::Tensor>& tensors) {
    for (auto& [k, v] : tensors)
      if (k.rfind("adam.", 0) == 0) {
        tensors_[k] = v;
        origin_[k] = file;
      }
  }
  // Every unit has moments once AdamW has stepped: a missing one means a lost file.
  bool lookup(const std::string& key, int64_t numel, torch::Tensor& m, torch::Tensor& v) const {
    MOE_CHECK_T(CheckpointError, assemble("m", key, numel, m) && assemble("v", key, numel, v),
                "the checkpoint has no AdamW moments for '"
                    << key << "' (an optim.rank*.safetensors or experts.ep*.safetensors file "
                              "is missing, or the model differs)");
    return true;
  }

 private:
  bool assemble(const char* which, const std::string& key, int64_t numel, torch::Tensor& out) const {
    const std::string whole = std::string("adam.") + which + "." + key;
    if (auto it = tensors_.find(whole); it != tensors_.end()) {
      MOE_CHECK_T(CheckpointError, it->second.numel() == numel,
                  origin_.at(whole) << ": '" << whole << "' has " << it->second.numel()
                                    << " elements, the model's unit has " << numel);
      out = it->second.reshape({-1});
      return true;
    }
    std::vector<std::pair<int64_t, torch::Tensor>> pieces;
    const std::string prefix = whole + "@";
    for (auto it = tensors_.lower_bound(prefix);
         it != tensors_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
      pieces.emplace_back(std::stoll(it->first.substr(prefix.size())), it->second.reshape({-1}));
    if (pieces.empty()) return false;
    std::sort(pieces.begin(), pieces.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<torch::Tensor> parts;
    int64_t next = 0;
    for (auto& [off, t] : pieces) {
      MOE_CHECK_T(CheckpointError, off == next,
                  "the checkpoint's pieces of '" << whole << "' do not tile it: a piece starts at "
                                                 << off << ", expected " << next
                                                 << " (an optim.rank*.safetensors file is missing?)");
      parts.push_back(t);
      next += t.numel();
    }
    MOE_CHECK_T(CheckpointError, next == numel,
                "the checkpoint's pieces of '" << whole << "' cover " << next
                                               << " elements, the model's unit has " << numel
                                               << " (an optim.rank*.safetensors file is missing?)");
    out = torch::cat(parts);
    return true;
  }
  std::map<std::string, torch::Tensor> tensors_;
  std::map<std::string, std::string> origin_;
};

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
                     const Optimizer& optimizer, comm::ProcessMesh& mesh, const Config& cfg) {
  comm::Communicator& world = mesh.world();
  const std::string root = run_dir + "/checkpoints";
  const std::string final_dir = root + "/" + step_name(step), tmp_dir = final_dir + ".tmp";
  if (world.rank() == 0) {
    mkdir_p(root);
    remove_tree(tmp_dir);
    mkdir_p(tmp_dir);
  }
  world.barrier();
  const int64_t adam_step = optimizer.adam_step();
  const bool sharded = optimizer.sharded();
  std::map<std::string, torch::Tensor> shared_moments, expert_moments, my_moments;
  for (const MomentPiece& p : optimizer.moments_to_save()) {
    const bool expert = p.key.find(".experts.") != std::string::npos;
    auto& into = sharded ? my_moments : expert ? expert_moments : shared_moments;
    into[piece_name("m", p, sharded)] = p.m;
    into[piece_name("v", p, sharded)] = p.v;
  }
  if (world.rank() == 0) {
    std::map<std::string, torch::Tensor> t = shared_moments;
    for (auto& [name, p] : model.shared_parameters()) t["param." + name] = p.detach();
    for (const auto& b : model.named_buffers()) t["buffer." + b.key()] = b.value();
    write_safetensors(tmp_dir + "/shared.safetensors", t,
                      {{"step", std::to_string(step)}, {"adam_step", std::to_string(adam_step)}});
  }
  if (mesh.dp_rank() == 0) {
    std::map<std::string, torch::Tensor> t = expert_moments;
    const int64_t first = model.moe_layers().empty() ? 0 : model.moe_layers()[0]->first_expert();
    for (auto& [name, p] : model.expert_parameters())
      for (int64_t le = 0; le < p.size(0); ++le)
        t["param." + expert_unit_key(name, first + le)] = p[le].detach();
    if (!t.empty())
      write_safetensors(tmp_dir + "/experts.ep" + std::to_string(mesh.ep_rank()) + ".safetensors",
                        t, {{"step", std::to_string(step)}});
  }
  if (!my_moments.empty())
    write_safetensors(tmp_dir + "/optim.rank" + std::to_string(world.rank()) + ".safetensors",
                      my_moments, {{"step", std::to_string(step)}});
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

int64_t load_checkpoint(const std::string& run_dir, TransformerLM& model, Optimizer* optimizer,
                        comm::ProcessMesh& mesh, const Config& cfg) {
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
  MomentStore moments;
  moments.add(shared_file, shared);
  for (auto& [name, p] : model.shared_parameters())
    p.copy_(take(shared, shared_file, "param." + name, p));
  for (auto b : model.named_buffers())
    b.value().copy_(take(shared, shared_file, "buffer." + b.key(), b.value()));

  std::map<std::string, torch::Tensor> experts;
  for (auto it = m["files"].begin(); it != m["files"].end(); ++it) {
    const std::string file = dir + "/" + it.key();
    if (it.key().rfind("experts.", 0) == 0) {
      auto t = read_safetensors(file);
      moments.add(file, t);
      for (auto& [k, v] : t) experts[k] = v;
    } else if (it.key().rfind("optim.", 0) == 0 && optimizer && adam_step > 0) {
      auto t = read_safetensors(file);
      moments.add(file, t);
    }
  }
  const std::string experts_desc = dir + "/experts.ep*.safetensors";
  const int64_t first = model.moe_layers().empty() ? 0 : model.moe_layers()[0]->first_expert();
  for (auto& [name, p] : model.expert_parameters())
    for (int64_t le = 0; le < p.size(0); ++le)
      p[le].copy_(take(experts, experts_desc, "param." + expert_unit_key(name, first + le), p[le]));
  if (optimizer && adam_step > 0)
    optimizer->load_moments(adam_step, [&](const std::string& key, int64_t numel, torch::Tensor& mo,
                                           torch::Tensor& vo) {
      return moments.lookup(key, numel, mo, vo);
    });
  if (mesh.world().rank() == 0) {
    MOE_LOG(Info) << "loaded checkpoint " << dir << " (step " << m["step"].get<int64_t>() << ")";
  }
  return m["step"].get<int64_t>();
}

}  // namespace moe
