// The training optimizer: gradient synchronisation, global-norm clipping and
// AdamW, in one of two layouts (train.zero):
//   0  ReplicatedAdamW: GradSync all-reduces the gradients, every rank keeps
//      the moments of everything it holds (LibTorch's torch::optim::AdamW);
//   1  ShardedAdamW, the distributed optimizer (ZeRO-1, as Megatron-Core's
//      DistributedOptimizer): each parameter group lives in one flat fp32
//      buffer (parameters and their .grad are views into it), padded to a
//      multiple of the group size G and split into G contiguous shards;
//      gradients are reduce-scattered, each rank keeps moments for and updates
//      only its shard, and the parameters are all-gathered back. Groups:
//      replicated parameters over the world, expert parameters over their
//      expert-DP group. Moments per rank: 1/G of ReplicatedAdamW's.
// ShardedAdamW applies LibTorch's AdamW arithmetic element by element, so the
// two layouts agree to rounding (tests compare them).
//
// Checkpoint units: the moments are saved per unit, a replicated parameter
// ("layers.0.wqkv") or one expert's slice of an expert parameter keyed by its
// global id ("layers.1.moe.experts.5.w1"), flattened. A sharded rank saves
// the pieces of units its shard covers (offset = first element); any layout
// loads them back, whatever layout wrote them.
#pragma once
#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "moe/comm/mesh.h"
#include "moe/config/config.h"

namespace moe {

class TransformerLM;

// "layers.1.moe.w1", expert 5 -> "layers.1.moe.experts.5.w1"
std::string expert_unit_key(const std::string& param_name, int64_t global_expert);

// Moments of (a piece of) one checkpoint unit, flattened.
struct MomentPiece {
  std::string key;
  int64_t offset = 0;  // first element of the unit this piece holds
  torch::Tensor m, v;  // [n] float32
};

// Fills m and v ([numel] float32, CPU) with the full moments of unit `key`;
// false when the checkpoint holds none for it.
using MomentLookup =
    std::function<bool(const std::string& key, int64_t numel, torch::Tensor& m, torch::Tensor& v)>;

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual void zero_grad() = 0;
  // Reduces gradients (every gradient then equals that of the mean loss over
  // the global batch); returns the global norm before clipping and scales
  // the gradients so it is at most `clip` (0 = no clip). Collective.
  virtual double synchronize_and_clip(double clip) = 0;
  // One AdamW step at learning rate `lr`. Collective for ShardedAdamW.
  virtual void step(double lr) = 0;
  virtual int64_t adam_step() const = 0;
  // Bytes of AdamW moments this rank holds.
  virtual int64_t state_bytes() const = 0;
  // Whether the moments are sharded: each rank saves its own pieces.
  virtual bool sharded() const = 0;
  // The pieces this rank writes: ReplicatedAdamW: whole units (replicated
  // ones on world rank 0, experts on dp_rank 0); ShardedAdamW: its shard's.
  virtual std::vector<MomentPiece> moments_to_save() const = 0;
  virtual void load_moments(int64_t adam_step, const MomentLookup& lookup) = 0;
};

// After model.to_device: ShardedAdamW re-homes the parameters into its flat buffers.
std::unique_ptr<Optimizer> make_optimizer(TransformerLM& model, comm::ProcessMesh& mesh,
                                          const TrainConfig& t, double grad_bucket_mb);

}  // namespace moe
