// Validation loss. An evaluation scores windows 0 .. N-1 of the validation
// split, N = min(train.eval_batches x train.batch, the split's windows): in
// round j rank r of W takes windows j*W*B + r*B .. + B-1 (B = train.batch),
// so every rank forwards B windows per round and all ranks run the MoE
// layers' exchanges together. Past N a rank forwards repeats of real
// windows with weight 0 (their tokens do count in the expert loads). The
// loss is the sum of per-token cross-entropies over the N windows, summed
// over ranks in float64, divided by N x seq_len: the same number at every
// EP x DP layout up to float rounding, given routing that drops no token
// (moe.capacity_factor 0: which tokens a capacity drops depends on how
// tokens are grouped per rank).
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "moe/comm/mesh.h"
#include "moe/config/config.h"

namespace moe {

class DataSource;
class TransformerLM;

struct EvalResult {
  double loss = 0;       // mean cross-entropy, nats per token
  int64_t windows = 0;   // N
  int64_t tokens = 0;    // N x seq_len
  bool byte_level = false;
  // [MoE layer][expert]: slots routed to each expert over the whole world.
  std::vector<std::vector<int64_t>> expert_load;
  double bits_per_byte() const { return loss / std::log(2.0); }  // one token per byte
};

// Collective over mesh.world(). Throws DataError when the data has no validation split.
EvalResult evaluate(TransformerLM& model, const DataSource& data, comm::ProcessMesh& mesh,
                    const Config& cfg);

// Throws DataError (naming the data and what to change) when `data` has no
// validation windows; the trainer calls it at start-up when train.eval_every > 0.
void require_validation_data(const DataSource& data, const Config& cfg);

}  // namespace moe
