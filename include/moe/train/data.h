// Training data. Batches are a deterministic function of (seed, step,
// micro-batch, rank), so a resumed run sees exactly the batches it would have.
//   synthetic: arithmetic sequences x_t = (start + t * delta) mod vocab with a
//              per-sequence start and delta in {1, 2, 3, 5}: learnable (a model
//              that infers delta from context predicts the rest).
//   text     : the bytes of a file, or of every regular file under a directory
//              (sorted; symlinks and fortune's binary *.dat indexes skipped).
//   tokens   : pre-tokenised uint16 shards, memory-mapped: llm.c's .bin (a
//              256 x int32 header: magic 20240520, version 1, token count;
//              then the tokens) or raw uint16 (nanoGPT's train.bin/val.bin).
//              data.path is a file, a directory (its *.bin) or a glob.
// Validation split: text and tokens hold out the last data.val_fraction of
// every source (file or shard); token shards named like llm.c's *_val_* (or
// nanoGPT's val.bin) are the validation split instead, when there are any.
// Synthetic validation sequences come from their own seed stream.
// Training: the training split is concatenated and rank r of W reads only
// tokens [r*N/W, (r+1)*N/W) of it. Validation window i is tokens
// [i*S, i*S + S] of the validation split (stride S = model.seq_len), the same
// on every rank and at every layout.
#pragma once
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

#include "moe/config/config.h"

namespace moe {

struct Batch {
  torch::Tensor inputs;   // [B, S] int64
  torch::Tensor targets;  // [B, S] int64 (inputs shifted by one)
};

class DataSource {
 public:
  virtual ~DataSource() = default;
  // Training micro-batch `micro` of optimizer step `step`: B windows of this rank's share.
  virtual Batch batch(int64_t step, int64_t micro, int64_t batch_size) const = 0;
  // Validation windows available: -1 = unbounded (synthetic), 0 = no validation split.
  virtual int64_t val_windows() const = 0;
  // The given validation windows (each < val_windows() when bounded), one row each.
  virtual Batch val_batch(const std::vector<int64_t>& windows) const = 0;
  // One token per byte of the source text (so bits per byte = nats per token / ln 2).
  virtual bool byte_level() const { return false; }
  virtual std::string describe() const = 0;
};

// Throws DataError naming the path when input is missing, unreadable, empty,
// malformed (token shards: bad header, truncated, odd byte count), holds a
// token id >= model.vocab, or is too short for one sequence per rank's share.
std::unique_ptr<DataSource> make_data_source(const Config& cfg, int rank, int world);

// Seeds derived from several values (splitmix-style mixing).
uint64_t mix_seed(uint64_t a, uint64_t b);

// llm.c token shard header: 256 int32, [0] magic, [1] version, [2] token count.
constexpr int32_t kLlmcShardMagic = 20240520;
constexpr int32_t kLlmcShardVersion = 1;
constexpr int64_t kLlmcHeaderBytes = 256 * 4;

}  // namespace moe
