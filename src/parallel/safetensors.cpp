#include "moe/parallel/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/core/error.h"

namespace moe {

namespace {
const std::map<c10::ScalarType, std::string>& dtype_names() {
  static const std::map<c10::ScalarType, std::string> m = {
      {torch::kFloat32, "F32"}, {torch::kFloat64, "F64"}, {torch::kBFloat16, "BF16"},
      {torch::kFloat16, "F16"}, {torch::kInt64, "I64"},   {torch::kInt32, "I32"},
      {torch::kUInt8, "U8"},    {torch::kBool, "BOOL"}};
  return m;
}

void write_all(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      MOE_THROW(CheckpointError, "cannot write '" << path << "': " << std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}
}  // namespace

void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t0] : tensors) {  // std::map: sorted names
    auto it = dtype_names().find(t0.scalar_type());
    MOE_CHECK_T(CheckpointError, it != dtype_names().end(),
                "safetensors: tensor '" << name << "' has unsupported dtype " << t0.scalar_type());
    torch::Tensor t = t0.detach().to(torch::kCPU).contiguous();
    uint64_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", it->second},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(t);
  }
  std::string h = header.dump();
  while (h.size() % 8) h.push_back(' ');
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) MOE_THROW(CheckpointError, "cannot create '" << tmp << "': " << std::strerror(errno));
  uint64_t n = h.size();
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
  try {
    write_all(fd, reinterpret_cast<const char*>(len), 8, tmp);
    write_all(fd, h.data(), h.size(), tmp);
    for (const auto& t : data)
      write_all(fd, static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size(), tmp);
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0)
    MOE_THROW(CheckpointError, "cannot flush '" << tmp << "': " << std::strerror(errno));
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    MOE_THROW(CheckpointError,
              "cannot rename '" << tmp << "' to '" << path << "': " << std::strerror(errno));
}

std::map<std::string, torch::Tensor> read_safetensors(
    const std::string& path, std::map<std::string, std::string>* metadata) {
  std::ifstream in(path, std::ios::binary);
  if (!in)
    MOE_THROW(CheckpointError,
              "cannot open safetensors file '" << path << "': " << std::strerror(errno));
  in.seekg(0, std::ios::end);
  const int64_t size = in.tellg();
  in.seekg(0);
  MOE_CHECK_T(CheckpointError, size >= 8,
              "'" << path << "' is " << size << " bytes: too short for a safetensors file");
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t(len[i]) << (8 * i);
  MOE_CHECK_T(CheckpointError, n <= uint64_t(size - 8) && n < (uint64_t(1) << 30),
              "'" << path << "': header length " << n << " exceeds the file size " << size);
  std::string h(n, '\0');
  in.read(h.data(), static_cast<std::streamsize>(n));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(h);
  } catch (const std::exception& e) {
    MOE_THROW(CheckpointError, "'" << path << "': header is not valid JSON: " << e.what());
  }
  MOE_CHECK_T(CheckpointError, header.is_object(), "'" << path << "': header is not a JSON object");
  const int64_t data_size = size - 8 - static_cast<int64_t>(n);
  std::map<std::string, torch::Tensor> out;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (metadata && it.value().is_object())
        for (auto m = it.value().begin(); m != it.value().end(); ++m)
          (*metadata)[m.key()] =
              m.value().is_string() ? m.value().get<std::string>() : m.value().dump();
      continue;
    }
    const auto& v = it.value();
    MOE_CHECK_T(
        CheckpointError,
        v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
        "'" << path << "': entry '" << it.key() << "' lacks dtype, shape or data_offsets");
    c10::ScalarType dt = torch::kFloat32;
    bool found = false;
    for (const auto& [t, name] : dtype_names())
      if (v["dtype"] == name) dt = t, found = true;
    MOE_CHECK_T(
        CheckpointError, found,
        "'" << path << "': entry '" << it.key() << "' has unsupported dtype " << v["dtype"]);
    std::vector<int64_t> shape = v["shape"].get<std::vector<int64_t>>();
    auto off = v["data_offsets"].get<std::vector<int64_t>>();
    int64_t numel = 1;
    for (auto d : shape) {
      MOE_CHECK_T(CheckpointError, d >= 0,
                  "'" << path << "': entry '" << it.key() << "' has a negative dimension");
      numel *= d;
    }
    MOE_CHECK_T(CheckpointError,
                off.size() == 2 && off[0] >= 0 && off[1] >= off[0] && off[1] <= data_size &&
                    off[1] - off[0] == numel * static_cast<int64_t>(c10::elementSize(dt)),
                "'" << path << "': entry '" << it.key()
                    << "' has data_offsets inconsistent with its shape or the file size " << size);
    torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(dt));
    in.seekg(8 + static_cast<int64_t>(n) + off[0]);
    in.read(static_cast<char*>(t.data_ptr()), off[1] - off[0]);
    MOE_CHECK_T(CheckpointError, in.good(),
                "'" << path << "': truncated while reading '" << it.key() << "'");
    out[it.key()] = t;
  }
  return out;
}

}  // namespace moe
