#include "moe/train/data.h"

#include <ATen/CPUGeneratorImpl.h>
#include <dirent.h>
#include <fcntl.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
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

// Rows [seq[:S], seq[1:]] of a [B, S + 1] tensor.
Batch shifted(const torch::Tensor& seq) {
  const int64_t S = seq.size(1) - 1;
  return {seq.narrow(1, 0, S).contiguous(), seq.narrow(1, 1, S).contiguous()};
}

class SyntheticData : public DataSource {
 public:
  SyntheticData(const Config& cfg, int rank) : cfg_(cfg), rank_(rank) {}
  // Sequence i of rank r's micro-batch is global sequence r * B + i, seeded by
  // (seed, step, micro, global index): the global batch is the same at every
  // layout with the same world x batch, which parity tests rely on.
  Batch batch(int64_t step, int64_t micro, int64_t B) const override {
    std::vector<uint64_t> seeds;
    for (int64_t i = 0; i < B; ++i)
      seeds.push_back(mix_seed(mix_seed(mix_seed(cfg_.train.seed, step), micro), rank_ * B + i));
    return sequences(seeds);
  }
  int64_t val_windows() const override { return -1; }
  // Its own stream: no (step, micro, index) of training reaches this seed.
  Batch val_batch(const std::vector<int64_t>& windows) const override {
    std::vector<uint64_t> seeds;
    for (int64_t w : windows)
      seeds.push_back(mix_seed(mix_seed(cfg_.train.seed ^ 0x56414C4944415445ull, 0), w));
    return sequences(seeds);
  }
  std::string describe() const override { return "synthetic arithmetic sequences"; }

 private:
  Batch sequences(const std::vector<uint64_t>& seeds) const {
    const int64_t S = cfg_.model.seq_len, V = cfg_.model.vocab, B = seeds.size();
    const int64_t deltas[] = {1, 2, 3, 5};
    torch::Tensor seq = torch::empty({B, S + 1}, torch::kInt64);
    for (int64_t i = 0; i < B; ++i) {
      const uint64_t g = seeds[i];
      const int64_t start = static_cast<int64_t>(g % static_cast<uint64_t>(V));
      const int64_t delta = deltas[(g >> 32) % 4];
      seq[i] = (start + torch::arange(S + 1, torch::kInt64) * delta).remainder(V);
    }
    return shifted(seq);
  }
  Config cfg_;
  int rank_;
};

// ---- sources: memory-mapped files of 1-byte (text) or 2-byte (token) units ----

// A read-only mapping of a whole file, unmapped with the last reference.
class Mapping {
 public:
  explicit Mapping(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) MOE_THROW(DataError, "cannot open '" << path << "': " << std::strerror(errno));
    struct stat st;
    ::fstat(fd, &st);
    bytes_ = static_cast<size_t>(st.st_size);
    if (bytes_ > 0) {
      addr_ = ::mmap(nullptr, bytes_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (addr_ == MAP_FAILED) {
        const int err = errno;
        ::close(fd);
        MOE_THROW(DataError, "cannot memory-map '" << path << "': " << std::strerror(err));
      }
    }
    ::close(fd);
  }
  ~Mapping() {
    if (addr_ && addr_ != MAP_FAILED) ::munmap(addr_, bytes_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* addr_ = nullptr;
  size_t bytes_ = 0;
};

struct Segment {
  std::shared_ptr<Mapping> file;
  std::string path;
  const uint8_t* data;  // first unit
  int64_t units;
  int width;  // bytes per unit: 1 (text) or 2 (uint16 tokens, little-endian as llm.c writes)
  int64_t at(int64_t i) const {
    if (width == 1) return data[i];
    uint16_t v;
    std::memcpy(&v, data + 2 * i, 2);
    return v;
  }
  Segment part(int64_t lo, int64_t hi) const {
    return {file, path, data + lo * width, hi - lo, width};
  }
};

// Segments read as one sequence.
class Stream {
 public:
  void add(const Segment& s) {
    if (s.units == 0) return;
    starts_.push_back(size_);
    segs_.push_back(s);
    size_ += s.units;
  }
  int64_t size() const { return size_; }
  const std::vector<Segment>& segments() const { return segs_; }
  // Units [pos, pos + n) into out (they may span segments).
  void copy(int64_t pos, int64_t n, int64_t* out) const {
    size_t k = std::upper_bound(starts_.begin(), starts_.end(), pos) - starts_.begin() - 1;
    for (int64_t i = 0; i < n; ++i, ++pos) {
      while (pos >= starts_[k] + segs_[k].units) ++k;
      out[i] = segs_[k].at(pos - starts_[k]);
    }
  }
  Stream slice(int64_t lo, int64_t hi) const {
    Stream s;
    for (size_t k = 0; k < segs_.size(); ++k) {
      const int64_t a = std::max(lo, starts_[k]), b = std::min(hi, starts_[k] + segs_[k].units);
      if (a < b) s.add(segs_[k].part(a - starts_[k], b - starts_[k]));
    }
    return s;
  }

 private:
  std::vector<Segment> segs_;
  std::vector<int64_t> starts_;
  int64_t size_ = 0;
};

void collect_text_files(const std::string& path, std::vector<std::string>* out) {
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
  for (const auto& n : names) collect_text_files(path + "/" + n, out);
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// data.path of kind tokens: a file, a directory (its *.bin files) or a glob; sorted.
std::vector<std::string> token_shard_paths(const std::string& path) {
  struct stat st;
  std::vector<std::string> out;
  if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) return {path};
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    DIR* dir = ::opendir(path.c_str());
    if (!dir)
      MOE_THROW(DataError, "cannot read directory '" << path << "': " << std::strerror(errno));
    while (dirent* e = ::readdir(dir))
      if (ends_with(e->d_name, ".bin")) out.push_back(path + "/" + e->d_name);
    ::closedir(dir);
    if (out.empty())
      MOE_THROW(DataError, "data.path '" << path << "' is a directory without *.bin token shards");
  } else {
    glob_t g = {};
    const int rc = ::glob(path.c_str(), 0, nullptr, &g);
    for (size_t i = 0; rc == 0 && i < g.gl_pathc; ++i) out.push_back(g.gl_pathv[i]);
    ::globfree(&g);
    if (out.empty())
      MOE_THROW(DataError, "data.path '" << path
                                         << "' matches no file (a token shard .bin, a directory "
                                            "of them, or a glob such as 'data/*_train_*.bin')");
  }
  std::sort(out.begin(), out.end());
  return out;
}

// One token shard: llm.c format when it starts with the magic, else raw uint16.
Segment open_token_shard(const std::string& path) {
  auto m = std::make_shared<Mapping>(path);
  const int64_t bytes = static_cast<int64_t>(m->bytes());
  int32_t head[3] = {0, 0, 0};
  if (bytes >= 12) std::memcpy(head, m->data(), sizeof head);
  if (bytes >= 4 && head[0] == kLlmcShardMagic) {
    if (bytes < kLlmcHeaderBytes)
      MOE_THROW(DataError, "token shard '" << path << "': llm.c header truncated (" << bytes
                                           << " bytes, the header is " << kLlmcHeaderBytes << ")");
    if (head[1] != kLlmcShardVersion)
      MOE_THROW(DataError, "token shard '" << path << "': llm.c header version " << head[1]
                                           << " is not supported (allowed: "
                                           << kLlmcShardVersion << ", uint16 tokens)");
    const int64_t count = head[2], expect = kLlmcHeaderBytes + 2 * count;
    if (count <= 0 || bytes != expect)
      MOE_THROW(DataError, "token shard '" << path << "': header says " << count << " tokens ("
                                           << expect << " bytes with the header) but the file has "
                                           << bytes << " bytes"
                                           << (bytes < expect ? " (truncated?)" : ""));
    return {m, path, m->data() + kLlmcHeaderBytes, count, 2};
  }
  if (bytes >= 4 && head[0] == 20240326)
    MOE_THROW(DataError, "'" << path << "' is an llm.c model checkpoint (magic 20240326), not a "
                                        "token shard (magic " << kLlmcShardMagic << ")");
  if (bytes == 0) MOE_THROW(DataError, "token shard '" << path << "' is empty");
  if (bytes % 2 != 0)
    MOE_THROW(DataError, "token shard '" << path << "' has an odd byte count (" << bytes
                                         << "): raw shards are uint16 tokens, and it does not "
                                            "start with the llm.c magic " << kLlmcShardMagic);
  return {m, path, m->data(), bytes / 2, 2};
}

// llm.c names shards *_train_* / *_val_* (fineweb_val_000000.bin,
// tiny_shakespeare_val.bin); nanoGPT writes train.bin and val.bin.
bool is_val_shard(const std::string& path) {
  const std::string name = path.substr(path.find_last_of('/') + 1);
  return name.rfind("val.", 0) == 0 || name.rfind("val_", 0) == 0 ||
         name.find("_val_") != std::string::npos || name.find("_val.") != std::string::npos;
}

class CorpusData : public DataSource {
 public:
  CorpusData(const Config& cfg, int rank, int world) : cfg_(cfg), rank_(rank) {
    const std::string& path = cfg.data.path;
    const bool text = cfg.data.kind == DataKind::Text;
    Stream train_all;
    if (text) {
      struct stat st;
      if (::stat(path.c_str(), &st) != 0)
        MOE_THROW(DataError, "data.path '" << path << "' does not exist (" << std::strerror(errno)
                                           << "); point it at a text file or directory");
      std::vector<std::string> files;
      collect_text_files(path, &files);
      if (files.empty())
        MOE_THROW(DataError, "data.path '" << path << "' holds no readable text files");
      for (const auto& f : files) {
        auto m = std::make_shared<Mapping>(f);
        split_tail({m, f, m->data(), static_cast<int64_t>(m->bytes()), 1}, &train_all);
      }
      files_ = files.size();
      if (train_all.size() + val_.size() == 0)
        MOE_THROW(DataError,
                  "data.path '" << path << "' is empty (" << files.size() << " files, 0 bytes)");
    } else {
      const auto shards = token_shard_paths(path);
      std::vector<Segment> train_shards, val_shards;
      for (const auto& f : shards)
        (is_val_shard(f) ? val_shards : train_shards).push_back(open_token_shard(f));
      if (train_shards.empty())
        MOE_THROW(DataError, "data.path '" << path << "' holds only validation shards ("
                                           << shards.size()
                                           << " named like *_val_*): add training shards");
      val_from_shards_ = !val_shards.empty();
      for (const auto& s : val_shards) val_.add(s);
      for (const auto& s : train_shards) {
        if (val_from_shards_)
          train_all.add(s);
        else
          split_tail(s, &train_all);
      }
      files_ = shards.size();
    }
    const int64_t N = train_all.size(), S = cfg.model.seq_len;
    const int64_t lo = N * rank / world, hi = N * (rank + 1) / world;
    if (hi - lo < S + 1)
      MOE_THROW(DataError, "data.path '"
                               << path << "' has " << N << (text ? " bytes" : " tokens")
                               << " for training: rank " << rank << "'s share of " << hi - lo
                               << " is shorter than one sequence of model.seq_len + 1 = " << S + 1
                               << " (use more data, fewer ranks or a shorter seq_len)");
    share_ = train_all.slice(lo, hi);
    train_total_ = N;
    if (!text) {
      check_vocab(share_);
      check_vocab(val_);
    }
  }

  Batch batch(int64_t step, int64_t micro, int64_t B) const override {
    const int64_t S = cfg_.model.seq_len;
    auto gen =
        at::make_generator<at::CPUGeneratorImpl>(batch_seed(cfg_.train.seed, step, micro, rank_));
    torch::Tensor off = torch::randint(share_.size() - S, {B}, gen, torch::kInt64);
    torch::Tensor seq = torch::empty({B, S + 1}, torch::kInt64);
    for (int64_t i = 0; i < B; ++i)
      share_.copy(off[i].item<int64_t>(), S + 1, seq.data_ptr<int64_t>() + i * (S + 1));
    return shifted(seq);
  }
  int64_t val_windows() const override {
    const int64_t S = cfg_.model.seq_len;
    return val_.size() < S + 1 ? 0 : (val_.size() - 1) / S;
  }
  Batch val_batch(const std::vector<int64_t>& windows) const override {
    const int64_t S = cfg_.model.seq_len, B = windows.size();
    torch::Tensor seq = torch::empty({B, S + 1}, torch::kInt64);
    for (int64_t i = 0; i < B; ++i) {
      MOE_CHECK(windows[i] >= 0 && windows[i] < val_windows(),
                "validation window " << windows[i] << " of " << val_windows());
      val_.copy(windows[i] * S, S + 1, seq.data_ptr<int64_t>() + i * (S + 1));
    }
    return shifted(seq);
  }
  bool byte_level() const override { return cfg_.data.kind == DataKind::Text; }
  std::string describe() const override {
    const char* unit = byte_level() ? "bytes" : "tokens";
    std::ostringstream os;
    os << unit << " of " << cfg_.data.path << " (" << files_
       << (byte_level() ? " files" : " shards") << "; training " << train_total_ << " " << unit
       << ", " << share_.size() << " in this rank's share; validation " << val_.size() << " "
       << unit << (val_from_shards_ ? " from *_val_* shards" : "") << " = " << val_windows()
       << " windows)";
    return os.str();
  }

 private:
  // The last data.val_fraction of a source is validation, the rest training.
  void split_tail(const Segment& s, Stream* train) {
    const int64_t v = static_cast<int64_t>(static_cast<double>(s.units) * cfg_.data.val_fraction);
    train->add(s.part(0, s.units - v));
    val_.add(s.part(s.units - v, s.units));
  }
  void check_vocab(const Stream& stream) const {
    for (const auto& seg : stream.segments()) {
      int64_t max_id = 0, where = 0;
      for (int64_t i = 0; i < seg.units; ++i)
        if (seg.at(i) > max_id) max_id = seg.at(i), where = i;
      if (max_id >= cfg_.model.vocab)
        MOE_THROW(DataError, "token shard '" << seg.path << "' holds token id " << max_id
                                             << " (its token " << where << " in the part rank "
                                             << rank_ << " reads) but model.vocab = " << cfg_.model.vocab
                                             << ": set model.vocab > " << max_id
                                             << " (GPT-2 tokens: 50257)");
    }
  }

  Config cfg_;
  int rank_;
  Stream share_, val_;
  int64_t train_total_ = 0;
  size_t files_ = 0;
  bool val_from_shards_ = false;
};

}  // namespace

std::unique_ptr<DataSource> make_data_source(const Config& cfg, int rank, int world) {
  if (cfg.data.kind == DataKind::Synthetic) return std::make_unique<SyntheticData>(cfg, rank);
  return std::make_unique<CorpusData>(cfg, rank, world);
}

}  // namespace moe
