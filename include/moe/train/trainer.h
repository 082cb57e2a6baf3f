// The training loop: world = ep x dp ranks on a ProcessMesh; each rank runs
// its own micro-batches; after backward, replicated parameters are averaged
// over the world and expert parameters over their expert-DP group, both
// scaled so every gradient is that of the mean loss over the global batch
// (world x batch x grad_accum sequences). Then global gradient-norm clipping,
// AdamW with warmup + decay, and the aux-loss-free bias update from global
// loads; every train.eval_every steps the validation loss (train/evaluate.h).
// Rank 0 logs progress and writes metrics.jsonl. A preemption request on any
// rank (SIGTERM, SIGINT, SIGUSR1) ends the run after the current step with a
// checkpoint of that step.
#pragma once
#include <torch/types.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "moe/comm/communicator.h"
#include "moe/config/config.h"

namespace moe {

struct TrainOptions {
  std::string out_dir;     // config.yaml, metrics.jsonl, checkpoints/ ("" = nothing written)
  std::string resume_dir;  // run directory to continue from ("" = fresh start)
  bool quiet = false;      // no progress lines (tests)
  // Asked on every rank at the end of every step: nonzero = stop after this
  // step (a signal number, or any nonzero code). Empty = this process's
  // preemption signal (core/signals.h). Ranks agree through the step's
  // all-reduce, so all stop after, and checkpoint, the same step.
  std::function<int(int rank, int64_t step)> stop_requested;
};

struct TrainResult {
  std::vector<double> losses;  // global mean loss per step run here
  int64_t first_step = 0;      // 0, or the step resumed from
  double tokens_per_s = 0;     // over the steps run here
  // Medians over the steps run here after the first (warm-up; the first if
  // only one ran): step wall time and each phase's slowest-rank time
  // (step_phase_names() order), in ms. Medians: one slow step (a noisy
  // neighbour, a page-fault burst) does not move them.
  double median_step_ms = 0;
  std::vector<double> median_phase_ms;
  std::vector<std::pair<int64_t, double>> val_losses;  // (step, validation loss) when evaluated
  int64_t preempted_step = 0;  // > 0: stopped early by a preemption request after this step
};

// Collective over `world`. Throws ConfigError for layouts that do not fit.
TrainResult train(comm::Communicator& world, const Config& cfg, const TrainOptions& opts);

// Learning rate at `step` (0-based): linear warmup, then cosine / linear /
// constant decay to lr * min_lr_ratio at the last step.
double learning_rate(const TrainConfig& t, int64_t step);

}  // namespace moe
