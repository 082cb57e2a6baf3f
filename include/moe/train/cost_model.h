// Analytic cost model of one training step, per rank: the matrix products
// (FLOPs), element-wise memory traffic, op launches and collectives of each
// phase of the step-time breakdown, the memory the rank holds, and a
// prediction of the step time on a machine described by a hardware profile.
//
// It mirrors what this framework executes (model/transformer, moe/moe_layer,
// parallel/grad_sync, AdamW), not an idealised MoE: fp32 everywhere on CPU,
// padded all-to-all buffers in capacity mode, no overlap of communication
// with compute. Counts are per rank and per optimizer step (all micro-batches).
//
// Time of a phase = sum of GEMM FLOPs / GEMM rate at that product's size
//                 + transcendental evaluations (exp, sigmoid, SiLU) / their rate
//                 + element-wise bytes / a bandwidth: plain passes (token copies,
//                   expert activations, optimizer) at the streaming rate for
//                   their working set (cache or DRAM); the attention block's
//                   strided and reshaping work at the (fitted) memory_gbps
//                 + op launches x op overhead
//                 + per collective: latency + bytes on the slowest link / its bandwidth
// When ranks share a CPU's cores (cpu profile, more ranks than cores) every
// term is stretched by ranks/cores: they take turns on the same cores.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "moe/config/config.h"

namespace moe {

// Names of the step-time breakdown, in metrics.jsonl order.
const std::vector<std::string>& step_phase_names();

struct GemmCost {
  int64_t m = 0, n = 0, k = 0;  // one forward product: [m, k] x [k, n] (m summed over `groups`)
  int64_t groups = 1;           // m rows split into this many separate products (experts)
  int64_t repeat = 1;           // times per step (layers x micro-batches)
  // Products per repeat: forward + backward (input and weight gradients) = 3;
  // 4 when train.recompute runs the forward again in backward.
  int64_t passes = 3;
  int64_t flops() const { return 2 * m * n * k * repeat * passes; }
};

struct CollectiveCost {
  std::string kind;            // "all_to_all" | "all_reduce" | "reduce_scatter" | "all_gather"
  int group = 1;               // ranks taking part
  int64_t bytes = 0;           // each rank's buffer (all_to_all: what it sends, own block included)
  int64_t off_rank_bytes = 0;  // all_to_all: the part sent to other ranks
  int64_t repeat = 1;          // times per step
};

struct PhaseCost {
  std::string name;
  std::vector<GemmCost> gemms;
  int64_t memory_bytes = 0;          // element-wise reads + writes, forward + backward
  int64_t transcendentals = 0;       // exp / sigmoid / SiLU evaluations, forward + backward
  bool streaming = false;            // plain contiguous passes rather than strided reshaping
  int64_t working_set_bytes = 0;     // what the passes sweep over (0 = fits in cache)
  int64_t ops = 0;           // op launches, forward + backward
  std::vector<CollectiveCost> collectives;
  int64_t flops() const;
  int64_t all_to_all_bytes() const;           // sum of all_to_all bytes x repeat
  int64_t all_to_all_off_rank_bytes() const;  // the part that leaves the rank
  int64_t all_reduce_bytes() const;
};

// Routing statistics (measured, or assumed uniform): they set how many rows
// the busiest rank's experts process and, in dropless mode, the all-to-all sizes.
struct RoutingStats {
  double drop_frac = 0.0;       // dropped slots / (tokens x top_k)
  double load_imbalance = 1.0;  // max / mean tokens per expert (>= 1)
};

struct StepCost {
  int world = 1, ep = 1, dp = 1;
  int64_t tokens_per_rank = 0;        // per step: batch x seq_len x grad_accum
  int64_t expert_rows_per_rank = 0;   // rows the busiest rank's experts process per layer/micro
  int64_t capacity = 0;               // C per expert (0 = dropless)
  double train_flops_per_token = 0;   // 3 x forward FLOPs/token (active params + attention): MFU
  std::vector<PhaseCost> phases;      // step_phase_names() order
  const PhaseCost& phase(const std::string& name) const;
  PhaseCost& phase(const std::string& name);
  int64_t flops() const;
};

// Throws ConfigError when the layout does not fit the world (resolve_layout).
StepCost step_cost(const Config& cfg, int world, const RoutingStats& routing = {});

// Bytes each rank holds: parameters (its experts + replicated ones), their
// gradients, AdamW state (2 tensors per parameter) and the activations kept
// for backward of one micro-batch (the peak: the next one starts after).
struct MemoryEstimate {
  int64_t params = 0, grads = 0, optimizer = 0, activations = 0;
  int64_t total() const { return params + grads + optimizer + activations; }
};
MemoryEstimate estimate_memory(const Config& cfg, int world);
// "params 1.2 MiB, grads ..., total ..." for logs.
std::string describe_memory(const MemoryEstimate& m);

struct LinkProfile {
  double gbps = 1.0;        // per rank, one direction, GB/s
  double latency_us = 0.0;  // per collective call
};

struct HardwareProfile {
  std::string name, path;
  std::string kind = "cpu";  // cpu: ranks on a node share its cores | gpu: one rank per device
  int cores_per_node = 1;    // cpu: cores the ranks of a node share
  int ranks_per_node = 0;    // ranks (devices) per node; 0 = every rank on one node
  double peak_gflops = 1.0;  // per core (cpu) or device (gpu): MFU denominator
  // Sustained GEMM GFLOP/s of one core (cpu) or device (gpu) by product
  // size (cube root of m n k), interpolated in log(size); at least one point.
  std::vector<std::pair<double, double>> gemm_gflops;
  double multicore_gemm_speedup = 1.0;  // cpu: one rank's GEMMs on every core vs one core
  // The experts' many small segment products (and their transposed backward
  // products) against the square-GEMM table: a fraction, fitted by calibrate.
  double expert_gemm_efficiency = 1.0;
  double memory_gbps = 1.0;   // attention-block element-wise work (strided, reshaping)
  double stream_gbps = 0.0;   // plain passes over data larger than the cache; 0 = memory_gbps
  double cache_gbps = 0.0;    // plain passes over data that fits in cache; 0 = stream_gbps
  double cache_mib = 0.0;     // cache a rank's passes can use (0 = none)
  double transcendental_gelems = 0.0;  // exp / sigmoid / SiLU, G elements/s (0 = free)
  double op_overhead_us = 0.0;          // per op launch (dispatch, autograd, kernel launch)
  int activation_bytes = 4;             // element size of activations and messages
  double device_memory_gib = 0.0;       // per rank (0 = unknown): projections flag what does not fit
  LinkProfile intra_node, inter_node;
  bool has_inter_node = false;  // the profile describes a link between nodes

  double gemm_rate(double size) const;  // GFLOP/s at this size
};

// Loads and validates a profile (ConfigError naming the file and key).
HardwareProfile load_hardware_profile(const std::string& path);
// As YAML that load_hardware_profile reads back; `header` lines become comments.
std::string dump_hardware_profile(const HardwareProfile& hw, const std::string& header);

struct StepPrediction {
  std::vector<std::pair<std::string, double>> phase_ms;  // step_phase_names() order
  double step_ms = 0;
  double all_to_all_ms = 0;  // time in dispatch and combine exchanges
  double tokens_per_s = 0;   // global
  double mfu = 0;            // model FLOPs / (ranks x peak)
};
StepPrediction predict_step(const StepCost& cost, const HardwareProfile& hw);

}  // namespace moe
