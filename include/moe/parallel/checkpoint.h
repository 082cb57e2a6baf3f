// Checkpoints: RUN_DIR/checkpoints/step_NNNNNNNN/
//   shared.safetensors        replicated parameters, router balance biases and
//                             (train.zero 0) their AdamW moments (written by rank 0)
//   experts.epK.safetensors   the experts of EP rank K, keyed by GLOBAL expert
//                             id ("layers.1.moe.experts.5.w1"), with moments at
//                             train.zero 0 (written by the dp_rank 0 replica)
//   optim.rankR.safetensors   train.zero 1: the moments of rank R's optimizer
//                             shard, as pieces "adam.m.KEY@OFFSET" of the same
//                             units (see parallel/optimizer.h)
//   manifest.json             step, shapes of the run, size + FNV-1a 64 of each file
// Written into step_N.tmp, flushed with fsync, then renamed: a crash
// mid-write leaves the previous checkpoint intact. Because experts are keyed
// globally, a checkpoint saved at EP=4 loads at EP=2 or EP=1. All randomness
// of training derives from (seed, step, rank), so the step is the whole
// data-position and RNG state. Moments reshard too: any (EP, DP, zero)
// layout loads any other's.
#pragma once

#include <string>

#include "moe/comm/mesh.h"
#include "moe/config/config.h"

namespace moe {

class TransformerLM;
class Optimizer;

// Collective over mesh.world().
void save_checkpoint(const std::string& run_dir, int64_t step, TransformerLM& model,
                     const Optimizer& optimizer, comm::ProcessMesh& mesh, const Config& cfg);

// Loads the newest valid checkpoint under run_dir/checkpoints (corrupt ones
// are skipped with a warning); returns its step. Throws CheckpointError
// naming the file and the mismatch when none is valid or shapes/expert
// counts disagree with the model. `optimizer` (may be null: parameters only)
// receives the moments whatever layout saved them.
int64_t load_checkpoint(const std::string& run_dir, TransformerLM& model, Optimizer* optimizer,
                        comm::ProcessMesh& mesh, const Config& cfg);

// The newest valid checkpoint directory ("" if none); `problems` collects
// why others were rejected.
std::string find_checkpoint(const std::string& run_dir, std::string* problems = nullptr);

// FNV-1a 64 of a file's bytes.
uint64_t file_checksum(const std::string& path);

// Test hook: the n-th save_checkpoint from now (1 = the next) throws after
// writing its temporary files, simulating a crash before the rename; 0 = never.
void set_checkpoint_crash_for_test(int nth_save);

}  // namespace moe
