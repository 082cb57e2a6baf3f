// `moe bench calibrate [--out FILE]`: measures this machine for the cost
// model and writes a hardware profile (kind cpu): single-core GEMM GFLOP/s by
// size, the speedup of one rank's GEMMs on every core, element-wise memory
// bandwidth, the per-op launch overhead (ATen dispatch + autograd), the
// latency and bandwidth of the in-process (thread) all-to-all, and the
// effective element-wise rate of a real training step. Takes ~10 s.
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <fstream>
#include <iostream>
#include <thread>

#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/threads.h"
#include "moe/core/timer.h"
#include "moe/train/cost_model.h"
#include "moe/train/trainer.h"

namespace moe::apps {

namespace {

// Median seconds of fn over repetitions, after one warm-up, running for at
// least `budget_s` (and at least 5 repetitions).
template <typename Fn>
double time_median(const Fn& fn, double budget_s = 0.3) {
  fn();
  std::vector<double> t;
  Stopwatch total;
  while (t.size() < 5 || (total.seconds() < budget_s && t.size() < 2000)) {
    Stopwatch sw;
    fn();
    t.push_back(sw.seconds());
  }
  return median(t);
}

double gemm_gflops(int64_t n) {
  torch::Tensor a = torch::randn({n, n}), b = torch::randn({n, n}), c = torch::empty({n, n});
  const double s = time_median([&] { at::mm_out(c, a, b); });
  return 2.0 * double(n * n * n) / s / 1e9;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  return "unknown CPU";
}

}  // namespace

int run_calibrate(const BenchArgs& args) {
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  HardwareProfile hw;
  hw.name = "cpu-local";
  hw.kind = "cpu";
  hw.cores_per_node = cores;
  hw.ranks_per_node = 0;
  hw.activation_bytes = 4;
  torch::NoGradGuard no_grad;

  // GEMMs on one core (as each rank runs them when ranks >= cores).
  configure_cpu_threads(cores);
  double best = 0;
  for (int64_t n : {16, 32, 64, 128, 256, 512, 1024}) {
    const double r = gemm_gflops(n);
    hw.gemm_gflops.push_back({double(n), r});
    best = std::max(best, r);
    std::cout << "gemm " << n << "^3, 1 core: " << r << " GFLOP/s" << std::endl;
  }
  // No datasheet peak for a (virtual) core: the best measured GEMM rate stands in for it.
  hw.peak_gflops = best;
  if (cores > 1) {
    // One rank's GEMMs on every core against one core, alternated five times
    // at two sizes (a neighbour on a shared host moves single readings a lot).
    std::vector<double> ratios;
    for (int rep = 0; rep < 5; ++rep)
      for (int64_t n : {128, 256}) {
        configure_cpu_threads(cores);
        const double one = gemm_gflops(n);
        configure_cpu_threads(1);  // one rank: BLAS on every core
        ratios.push_back(gemm_gflops(n) / one);
      }
    configure_cpu_threads(cores);
    hw.multicore_gemm_speedup = median(ratios);
    std::cout << "gemm on " << cores << " cores vs 1: x" << hw.multicore_gemm_speedup
              << " (median of " << ratios.size() << ")" << std::endl;
  }

  // Element-wise: c = a * b at two sizes; the slope is the bandwidth, the
  // intercept part of the op overhead.
  auto mul_time = [](int64_t n) {
    torch::Tensor a = torch::rand({n}), b = torch::rand({n}), c = torch::empty({n});
    return time_median([&] { at::mul_out(c, a, b); });
  };
  const int64_t n1 = 1 << 14, n2 = 1 << 18;
  const double t1 = mul_time(n1), t2 = mul_time(n2);
  hw.stream_gbps = 3.0 * 4.0 * double(n2 - n1) / std::max(1e-9, t2 - t1) / 1e9;
  hw.memory_gbps = hw.stream_gbps;
  std::cout << "element-wise streaming: " << hw.stream_gbps << " GB/s" << std::endl;

  // Op overhead: a chain of tiny differentiable ops, forward and backward.
  {
    torch::AutoGradMode grad(true);
    torch::Tensor x = torch::rand({16}, torch::requires_grad());
    const int chain = 100;
    const double s = time_median([&] {
      torch::Tensor y = x;
      for (int i = 0; i < chain; ++i) y = y * 1.0001;
      y.sum().backward();
    });
    hw.op_overhead_us = s / (2.0 * chain) * 1e6;
    std::cout << "op overhead: " << hw.op_overhead_us << " us per op (forward or backward)"
              << std::endl;
  }

  // Thread-rank all-to-all between min(cores, 2)+ ranks: latency from a tiny
  // exchange, bandwidth from the slope to a large one.
  {
    const int ranks = std::max(2, cores);
    double small_s = 0, large_s = 0;
    const int64_t row = 256, large_rows = 4096;  // 1 KiB rows; 4 MiB per peer
    comm::run_ranks(ranks, 60.0, [&](comm::Communicator& c) {
      configure_cpu_threads(ranks);
      auto exchange = [&](int64_t rows) {
        std::vector<int64_t> counts(c.size(), rows);
        torch::Tensor in = torch::rand({rows * c.size(), row}), out = torch::empty_like(in);
        return time_median([&] { c.all_to_all_v(in, counts, counts, out); }, 0.5);
      };
      const double s1 = exchange(1), s2 = exchange(large_rows);
      if (c.rank() == 0) small_s = s1, large_s = s2;
    });
    const double off_rank = double(large_rows) * row * 4 * (ranks - 1);
    hw.intra_node.latency_us = small_s * 1e6;
    hw.intra_node.gbps = off_rank / std::max(1e-9, large_s - small_s) / 1e9;
    std::cout << "thread all_to_all (" << ranks << " ranks): latency " << hw.intra_node.latency_us
              << " us, " << hw.intra_node.gbps << " GB/s per rank" << std::endl;
  }

  // Element-wise work in a real step is far from streaming speed (softmax,
  // strided rotary halves, small tensors), and a real op costs more than the
  // tiny one timed above. Both are fitted (least squares on relative error)
  // so that the model reproduces short training runs of four calibration
  // shapes (d_model 64 to 192; one core per rank: world = cores, EP = world),
  // everything else as measured above:
  //   measured_i = rest_i + ops_i x op_overhead + bytes_i / memory_gbps.
  {
    const int world = std::max(2, cores);
    std::vector<Config> shapes;
    for (int64_t d : {64, 96, 160, 192}) {
      const bool small = d < 128;
      shapes.push_back(default_config(
          {"model.layers=2", "model.heads=4", "moe.top_k=2", "moe.capacity_factor=1.25",
           "train.batch=8", "train.steps=16", "train.warmup=2", "data.kind=synthetic",
           "model.d_model=" + std::to_string(d), "model.d_ff=" + std::to_string(4 * d),
           "moe.d_expert=" + std::to_string(2 * d), small ? "model.vocab=128" : "model.vocab=256",
           small ? "model.seq_len=32" : "model.seq_len=64",
           small ? "moe.experts=4" : "moe.experts=8"}));
    }
    // Three interleaved runs of each shape; the median run's median step.
    std::vector<std::vector<double>> step_ms(shapes.size());
    for (int rep = 0; rep < 3; ++rep)
      for (size_t i = 0; i < shapes.size(); ++i)
        comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
          TrainOptions opts;
          opts.quiet = true;
          TrainResult r = train(c, shapes[i], opts);
          if (c.rank() == 0) step_ms[i].push_back(r.median_step_ms);
        });
    HardwareProfile rest_hw = hw;  // GEMMs, copies and exchanges only
    rest_hw.memory_gbps = 1e12;
    rest_hw.op_overhead_us = 0;
    // Normal equations of min sum_i ((rest_i + ops_i x + bytes_i y) / measured_i - 1)^2.
    double n00 = 0, n01 = 0, n11 = 0, r0 = 0, r1 = 0;
    for (size_t i = 0; i < shapes.size(); ++i) {
      const StepCost cost = step_cost(shapes[i], world);
      double ops = 0, bytes = 0;
      for (const auto& p : cost.phases) {
        ops += double(p.ops);
        if (!p.streaming) bytes += double(p.memory_bytes);
      }
      const double measured = median(step_ms[i]) * 1e-3;
      const double rest = predict_step(cost, rest_hw).step_ms * 1e-3;
      const double a0 = ops / measured, a1 = bytes / measured, b = 1.0 - rest / measured;
      n00 += a0 * a0, n01 += a0 * a1, n11 += a1 * a1, r0 += a0 * b, r1 += a1 * b;
      std::cout << "calibration shape d_model " << shapes[i].model.d_model << " (" << world
                << " thread ranks): step " << measured * 1e3
                << " ms, of which GEMMs, copies and exchanges " << rest * 1e3 << " ms"
                << std::endl;
    }
    const double det = n00 * n11 - n01 * n01;
    double op_s = hw.op_overhead_us * 1e-6, per_byte = 0;
    if (std::abs(det) > 0) {
      op_s = (r0 * n11 - n01 * r1) / det;
      per_byte = (n00 * r1 - n01 * r0) / det;
    }
    // The micro-benchmark's overhead is a floor: noise must not make it vanish.
    if (op_s < hw.op_overhead_us * 1e-6 || per_byte <= 0) {
      op_s = hw.op_overhead_us * 1e-6;
      per_byte = std::max(1e-15, (r1 - n01 * op_s) / n11);
    }
    hw.op_overhead_us = op_s * 1e6;
    hw.memory_gbps = 1.0 / per_byte / 1e9;
    std::cout << "fitted: op overhead " << hw.op_overhead_us << " us, element-wise math "
              << hw.memory_gbps << " GB/s" << std::endl;
  }

  char host[256] = "unknown";
  ::gethostname(host, sizeof host - 1);
  char date[64];
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  const std::string header =
      "This machine, measured by `moe bench calibrate` on " + std::string(date) + " (host " +
      host + ", " + cpu_model() + ", " + std::to_string(cores) +
      " cores).\n"
      "Rates are single-core unless named otherwise; ranks of a node share its cores.\n"
      "peak_gflops is the best measured single-core GEMM rate (no datasheet figure for a\n"
      "virtual core); the links are the in-process thread all-to-all.";
  const std::string yaml = dump_hardware_profile(hw, header);
  if (args.out_path.empty()) {
    std::cout << yaml;
  } else {
    {
      std::ofstream out(args.out_path);
      MOE_CHECK_T(UsageError, out.good(), "--out: cannot write '" << args.out_path << "'");
      out << yaml;
    }
    load_hardware_profile(args.out_path);  // what the sweep will read back
    std::cout << "wrote " << args.out_path << std::endl;
  }
  return kExitOk;
}

}  // namespace moe::apps
