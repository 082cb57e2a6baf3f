// Training data. Batches are a deterministic function of (seed, step,
// micro-batch, rank), so a resumed run sees exactly the batches it would have.
//   synthetic: arithmetic sequences x_t = (start + t * delta) mod vocab with a
//              per-sequence start and delta in {1, 2, 3, 5}: learnable (a model
//              that infers delta from context predicts the rest).
//   text     : the bytes of a file, or of every regular file under a directory
//              (sorted; symlinks and fortune's binary *.dat indexes skipped);
//              rank r of W reads only bytes [r*N/W, (r+1)*N/W).
#pragma once
#include <torch/types.h>

#include <memory>
#include <string>

#include "moe/config/config.h"

namespace moe {

struct Batch {
  torch::Tensor inputs;   // [B, S] int64
  torch::Tensor targets;  // [B, S] int64 (inputs shifted by one)
};

class DataSource {
 public:
  virtual ~DataSource() = default;
  virtual Batch batch(int64_t step, int64_t micro, int64_t batch_size) const = 0;
  virtual std::string describe() const = 0;
};

// Throws DataError naming the path when text input is missing, unreadable,
// empty or too short for one sequence per rank's shard.
std::unique_ptr<DataSource> make_data_source(const Config& cfg, int rank, int world);

// Seeds derived from several values (splitmix-style mixing).
uint64_t mix_seed(uint64_t a, uint64_t b);

}  // namespace moe
