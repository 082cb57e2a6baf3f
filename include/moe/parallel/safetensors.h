// safetensors (the Hugging Face tensor file format): an 8-byte little-endian
// header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
// raw little-endian data. Enough of it to exchange tensors with outside tools.
#pragma once
#include <torch/types.h>

#include <map>
#include <string>

namespace moe {

// Writes `tensors` (CPU; any of F32, F64, BF16, F16, I64, I32, U8, BOOL) to
// `path` atomically (temporary file, fsync, rename). `metadata` goes to
// "__metadata__".
void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Reads every tensor of `path`. Throws CheckpointError naming the file and
// what is wrong (truncated, bad header, unknown dtype, overlapping data ...).
std::map<std::string, torch::Tensor> read_safetensors(
    const std::string& path, std::map<std::string, std::string>* metadata = nullptr);

}  // namespace moe
