#include "moe/train/data.h"

#include <ATen/CPUGeneratorImpl.h>
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "moe/core/error.h"

namespace moe {

uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9E3779B97F4A7C15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

namespace {

uint64_t batch_seed(uint64_t seed, int64_t step, int64_t micro, int rank) {
  return mix_seed(
      mix_seed(mix_seed(seed, static_cast<uint64_t>(step)), static_cast<uint64_t>(micro)),
      static_cast<uint64_t>(rank));
}

class SyntheticData : public DataSource {
 public:
  SyntheticData(const Config& cfg, int rank) : cfg_(cfg), rank_(rank) {}
  // Sequence i of rank r's micro-batch is global sequence r * B + i, seeded by
  // (seed, step, micro, global index): the global batch is the same at every
  // layout with the same world x batch, which parity tests rely on.
  Batch batch(int64_t step, int64_t micro, int64_t B) const override {
    const int64_t S = cfg_.model.seq_len, V = cfg_.model.vocab;
    const int64_t deltas[] = {1, 2, 3, 5};
    torch::Tensor seq = torch::empty({B, S + 1}, torch::kInt64);
    for (int64_t i = 0; i < B; ++i) {
      uint64_t g = mix_seed(mix_seed(mix_seed(cfg_.train.seed, step), micro), rank_ * B + i);
      const int64_t start = static_cast<int64_t>(g % static_cast<uint64_t>(V));
      const int64_t delta = deltas[(g >> 32) % 4];
      seq[i] = (start + torch::arange(S + 1, torch::kInt64) * delta).remainder(V);
    }
    return {seq.narrow(1, 0, S).contiguous(), seq.narrow(1, 1, S).contiguous()};
  }
  std::string describe() const override { return "synthetic arithmetic sequences"; }

 private:
  Config cfg_;
  int rank_;
};

void collect_files(const std::string& path, std::vector<std::string>* out) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0)
    MOE_THROW(DataError, "data.path '" << path << "': " << std::strerror(errno));
  if (S_ISLNK(st.st_mode)) return;  // fortune ships *.u8 links to the same text
  if (S_ISREG(st.st_mode)) {
    if (path.size() > 4 && path.compare(path.size() - 4, 4, ".dat") == 0)
      return;  // binary strfile index
    out->push_back(path);
    return;
  }
  if (!S_ISDIR(st.st_mode)) return;
  DIR* dir = ::opendir(path.c_str());
  if (!dir)
    MOE_THROW(DataError, "cannot read directory '" << path << "': " << std::strerror(errno));
  std::vector<std::string> names;
  while (dirent* e = ::readdir(dir))
    if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) names.push_back(e->d_name);
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  for (const auto& n : names) collect_files(path + "/" + n, out);
}

class TextData : public DataSource {
 public:
  TextData(const Config& cfg, int rank, int world) : cfg_(cfg), rank_(rank) {
    const std::string& path = cfg.data.path;
    struct stat st;
    if (::stat(path.c_str(), &st) != 0)
      MOE_THROW(DataError, "data.path '" << path << "' does not exist (" << std::strerror(errno)
                                         << "); point it at a text file or directory");
    std::vector<std::string> files;
    collect_files(path, &files);
    if (files.empty())
      MOE_THROW(DataError, "data.path '" << path << "' holds no readable text files");
    std::string all;
    for (const auto& f : files) {
      std::ifstream in(f, std::ios::binary);
      if (!in) MOE_THROW(DataError, "cannot read '" << f << "': " << std::strerror(errno));
      std::ostringstream buf;
      buf << in.rdbuf();
      all += buf.str();
    }
    if (all.empty())
      MOE_THROW(DataError,
                "data.path '" << path << "' is empty (" << files.size() << " files, 0 bytes)");
    const int64_t N = static_cast<int64_t>(all.size()), S = cfg.model.seq_len;
    const int64_t lo = N * rank / world, hi = N * (rank + 1) / world;
    if (hi - lo < S + 1)
      MOE_THROW(DataError, "data.path '"
                               << path << "' has " << N << " bytes: rank " << rank << "'s shard of "
                               << hi - lo
                               << " bytes is shorter than one sequence of model.seq_len + 1 = "
                               << S + 1 << " (use more text, fewer ranks or a shorter seq_len)");
    shard_ = torch::empty({hi - lo}, torch::kUInt8);
    std::memcpy(shard_.data_ptr(), all.data() + lo, hi - lo);
    shard_ = shard_.to(torch::kInt64);
    total_bytes_ = N;
    files_ = files.size();
  }
  Batch batch(int64_t step, int64_t micro, int64_t B) const override {
    const int64_t S = cfg_.model.seq_len;
    auto gen =
        at::make_generator<at::CPUGeneratorImpl>(batch_seed(cfg_.train.seed, step, micro, rank_));
    torch::Tensor off = torch::randint(shard_.size(0) - S, {B, 1}, gen, torch::kInt64);
    torch::Tensor idx = off + torch::arange(S + 1, torch::kInt64).unsqueeze(0);
    torch::Tensor seq = shard_.index({idx});
    return {seq.narrow(1, 0, S).contiguous(), seq.narrow(1, 1, S).contiguous()};
  }
  std::string describe() const override {
    std::ostringstream os;
    os << "bytes of " << cfg_.data.path << " (" << files_ << " files, " << total_bytes_
       << " bytes; " << shard_.size(0) << " in this rank's shard)";
    return os.str();
  }

 private:
  Config cfg_;
  int rank_;
  torch::Tensor shard_;
  int64_t total_bytes_ = 0;
  size_t files_ = 0;
};

}  // namespace

std::unique_ptr<DataSource> make_data_source(const Config& cfg, int rank, int world) {
  if (cfg.data.kind == DataKind::Synthetic) return std::make_unique<SyntheticData>(cfg, rank);
  return std::make_unique<TextData>(cfg, rank, world);
}

}  // namespace moe
