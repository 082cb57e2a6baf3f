// `moe bench calibrate [--out FILE]`: measures this machine for the cost
// model and writes a hardware profile (kind cpu): single-core GEMM GFLOP/s by
// size, the speedup of one rank's GEMMs on every core, element-wise memory
// bandwidth, the per-op launch overhead (ATen dispatch + autograd), the
// latency and bandwidth of the in-process (thread) all-to-all, and the
// effective element-wise rate of a real training step. Takes ~10 s.
#include <unistd.h>

#include <algorithm>
#include <array>
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

  // Streaming: c = a * b at two sizes past the caches (parameter-sized
  // tensors: optimizer, gradient buckets); the slope is the bandwidth.
  auto mul_time = [](int64_t n) {
    torch::Tensor a = torch::rand({n}), b = torch::rand({n}), c = torch::empty({n});
    return time_median([&] { at::mul_out(c, a, b); });
  };
  const int64_t n1 = 1 << 20, n2 = 1 << 22;
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
  // tiny one timed above: the element-wise rate, the per-collective latency
  // and the GEMM speedup of one rank on every core are fitted (least squares
  // on relative error) so that the model reproduces short training runs of
  // four calibration shapes (d_model 64 to 256) at world = cores and at one
  // rank, everything else as measured above.
  {
    const int world = std::max(2, cores);
    // d_model, seq_len, batch, experts, d_expert, vocab: common widths, mixed so
    // that no one proportion dominates the fit.
    const std::vector<std::array<int64_t, 6>> dims = {{64, 32, 8, 4, 128, 128},
                                                      {128, 32, 16, 4, 512, 512},
                                                      {192, 64, 8, 8, 384, 256},
                                                      {256, 64, 4, 16, 256, 256}};
    std::vector<Config> shapes;
    for (const auto& [d, seq, batch, experts, hidden, vocab] : dims)
      shapes.push_back(default_config(
          {"model.layers=2", "model.heads=4", "moe.top_k=2", "moe.capacity_factor=1.25",
           "train.steps=12", "train.warmup=2", "data.kind=synthetic",
           "model.d_model=" + std::to_string(d), "model.d_ff=" + std::to_string(4 * d),
           "model.seq_len=" + std::to_string(seq), "train.batch=" + std::to_string(batch),
           "moe.experts=" + std::to_string(experts), "moe.d_expert=" + std::to_string(hidden),
           "model.vocab=" + std::to_string(vocab)}));
    // Five interleaved runs of each shape, at `world` ranks and at one rank
    // on every core; the median run's median step.
    std::vector<std::vector<double>> step_ms(shapes.size()), single_ms(shapes.size());
    auto run = [&](const Config& cfg, int ranks, std::vector<double>& into) {
      comm::run_ranks(ranks, 60.0, [&](comm::Communicator& c) {
        TrainOptions opts;
        opts.quiet = true;
        TrainResult r = train(c, cfg, opts);
        if (c.rank() == 0) into.push_back(r.median_step_ms);
      });
    };
    for (int rep = 0; rep < 5; ++rep)
      for (size_t i = 0; i < shapes.size(); ++i) {
        run(shapes[i], world, step_ms[i]);
        if (cores > 1) run(shapes[i], 1, single_ms[i]);
      }
    // The step time the model predicts is linear in seconds per element-wise
    // byte and in collective latency, for a given GEMM speedup of a rank on
    // several cores (op overhead stays as micro-benchmarked: fitting it too
    // lets run-to-run noise trade it against the others): for each speedup
    // on a grid, solve the linear least squares (relative errors, all runs)
    // and keep the best.
    struct Run {
      StepCost cost;
      double measured_s;
    };
    std::vector<Run> runs;
    for (size_t i = 0; i < shapes.size(); ++i) {
      runs.push_back({step_cost(shapes[i], world), median(step_ms[i]) * 1e-3});
      if (cores > 1) runs.push_back({step_cost(shapes[i], 1), median(single_ms[i]) * 1e-3});
    }
    auto with = [](HardwareProfile h, double gbps, double latency_us, double speedup) {
      h.memory_gbps = gbps;
      h.intra_node.latency_us = h.inter_node.latency_us = latency_us;
      h.multicore_gemm_speedup = speedup;
      return h;
    };
    const double measured_latency_us = hw.intra_node.latency_us;
    double best_err = 1e300;
    HardwareProfile best = hw;
    for (double speedup = 1.0; speedup <= double(std::max(1, cores)) + 1e-9; speedup += 0.02) {
      double n00 = 0, n01 = 0, n11 = 0, r0 = 0, r1 = 0;
      for (const Run& run : runs) {
        auto t = [&](const HardwareProfile& h) { return predict_step(run.cost, h).step_ms * 1e-3; };
        const double rest = t(with(hw, 1e15, 0, speedup));
        const double a0 = (t(with(hw, 1, 0, speedup)) - rest) / run.measured_s;     // per s/GB
        const double a1 = (t(with(hw, 1e15, 1, speedup)) - rest) / run.measured_s;  // per us
        const double b = 1.0 - rest / run.measured_s;
        n00 += a0 * a0, n01 += a0 * a1, n11 += a1 * a1, r0 += a0 * b, r1 += a1 * b;
      }
      const double det = n00 * n11 - n01 * n01;
      if (std::abs(det) < 1e-300) continue;
      double per_gb = (r0 * n11 - n01 * r1) / det, latency_us = (n00 * r1 - n01 * r0) / det;
      if (latency_us < 0) latency_us = 0, per_gb = r0 / n00;  // latency is not negative
      if (per_gb <= 0) continue;
      const HardwareProfile trial = with(hw, 1.0 / per_gb, latency_us, speedup);
      double err = 0;
      for (const Run& run : runs) {
        const double rel = predict_step(run.cost, trial).step_ms * 1e-3 / run.measured_s - 1;
        err += rel * rel;
      }
      if (err < best_err) best_err = err, best = trial;
    }
    hw = best;
    std::cout << "fitted: element-wise math " << hw.memory_gbps
              << " GB/s, collective latency " << hw.intra_node.latency_us << " us (micro-benchmark "
              << measured_latency_us << "), GEMM speedup of one rank on " << cores << " cores x"
              << hw.multicore_gemm_speedup << std::endl;
    std::cout << "the fit (predicted vs measured step):";
    for (size_t i = 0; i < runs.size(); ++i) {
      const double predicted = predict_step(runs[i].cost, hw).step_ms * 1e-3;
      std::cout << " d" << shapes[i / (cores > 1 ? 2 : 1)].model.d_model << "/"
                << runs[i].cost.world << "r " << std::showpos
                << std::lround(100.0 * (predicted - runs[i].measured_s) / runs[i].measured_s)
                << std::noshowpos << "%";
    }
    std::cout << std::endl;
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
