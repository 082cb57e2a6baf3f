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
    configure_cpu_threads(1);  // one rank: BLAS on every core
    const double all = gemm_gflops(256);
    hw.multicore_gemm_speedup = all / hw.gemm_rate(256);
    std::cout << "gemm 256^3, " << cores << " cores: " << all << " GFLOP/s (x"
              << hw.multicore_gemm_speedup << ")" << std::endl;
    configure_cpu_threads(cores);
  }

  // Element-wise: c = a * b at two sizes; the slope is the bandwidth, the
  // intercept part of the op overhead.
  auto mul_time = [](int64_t n) {
    torch::Tensor a = torch::rand({n}), b = torch::rand({n}), c = torch::empty({n});
    return time_median([&] { at::mul_out(c, a, b); });
  };
  const int64_t n1 = 1 << 14, n2 = 1 << 18;
  const double t1 = mul_time(n1), t2 = mul_time(n2);
  hw.memory_gbps = 3.0 * 4.0 * double(n2 - n1) / std::max(1e-9, t2 - t1) / 1e9;
  std::cout << "element-wise streaming: " << hw.memory_gbps << " GB/s" << std::endl;

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
    hw.inter_node = hw.intra_node;
    std::cout << "thread all_to_all (" << ranks << " ranks): latency " << hw.intra_node.latency_us
              << " us, " << hw.intra_node.gbps << " GB/s per rank" << std::endl;
  }

  // Element-wise work in a real step is far from streaming speed (softmax,
  // strided rotary halves, small tensors): memory_gbps is fitted so that the
  // model reproduces a short training run of a calibration shape, on one core
  // per rank (world = cores, EP = world) with everything else measured above.
  {
    const int world = std::max(2, cores);
    Config cal = default_config(
        {"model.vocab=128", "model.d_model=96", "model.heads=4", "model.layers=2",
         "model.d_ff=384", "model.seq_len=48", "moe.experts=4", "moe.top_k=2",
         "moe.d_expert=192", "moe.capacity_factor=1.25", "train.batch=8", "train.steps=10",
         "train.warmup=2", "data.kind=synthetic"});
    char dir_template[] = "/tmp/moe-calibrate-XXXXXX";
    const char* dir = ::mkdtemp(dir_template);
    MOE_CHECK(dir != nullptr, "calibrate: cannot create a temporary directory");
    TrainResult run;
    comm::run_ranks(world, 60.0, [&](comm::Communicator& c) {
      TrainOptions opts;
      opts.quiet = true;
      TrainResult r = train(c, cal, opts);
      if (c.rank() == 0) run = r;
    });
    std::system(("rm -rf '" + std::string(dir) + "'").c_str());
    HardwareProfile no_memory = hw;
    no_memory.memory_gbps = 1e9;
    const StepCost cost = step_cost(cal, world);
    const double rest_ms = predict_step(cost, no_memory).step_ms;
    double bytes = 0;
    for (const auto& p : cost.phases) bytes += double(p.memory_bytes);
    const double residual_ms = run.mean_step_ms - rest_ms;
    if (residual_ms > 0.05 * run.mean_step_ms) {
      hw.memory_gbps = bytes / (residual_ms * 1e-3) / 1e9;
    } else {
      std::cout << "warning: the calibration step (" << run.mean_step_ms
                << " ms) is not above its GEMM, op and exchange time (" << rest_ms
                << " ms): keeping the streaming bandwidth" << std::endl;
    }
    std::cout << "calibration step (" << world << " thread ranks): " << run.mean_step_ms
              << " ms measured, " << rest_ms << " ms in GEMMs, ops and exchanges: effective "
              << "element-wise " << hw.memory_gbps << " GB/s" << std::endl;
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
