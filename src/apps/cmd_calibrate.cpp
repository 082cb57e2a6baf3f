// `moe bench calibrate [--out FILE]`: measures this machine for the cost
// model and writes a hardware profile (kind cpu). Micro-benchmarks give
// single-core GEMM GFLOP/s by size, plain-pass bandwidth in cache and from
// memory, exp/sigmoid/SiLU throughput, the per-op launch overhead (ATen
// dispatch + autograd) and the thread all-to-all's latency and bandwidth;
// short training runs then fit what micro-benchmarks cannot see (the
// experts' GEMM efficiency, the attention block's element-wise rate, rank
// skew per collective). Takes about
// 30 s on 2 cores.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <ctime>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/stats.h"
#include "moe/core/threads.h"
#include "moe/core/timer.h"
#include "moe/train/cost_model.h"

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

// Median seconds of a collective over a fixed number of repetitions: every
// rank must call it equally often, so no rank may stop on its own clock.
template <typename Fn>
double time_median_reps(const Fn& fn, int reps) {
  fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
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

// L2 plus this core's share of the last-level cache, from sysfs (0 if unknown).
double cache_mib_per_core(int cores) {
  double l2 = 0, last = 0;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_in(dir + "/level"), size_in(dir + "/size");
    int level = 0;
    std::string size;
    if (!(level_in >> level) || !(size_in >> size) || size.empty()) continue;
    double kib = std::atof(size.c_str());
    if (size.back() == 'M') kib *= 1024;
    if (level == 2) l2 = kib / 1024;
    if (level >= 3) last = kib / 1024;
  }
  return l2 + last / std::max(1, cores);
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
    if (hw.multicore_gemm_speedup < 0.1) {
      // Only a machine busy with other work measures this; the profile loader
      // accepts [0.1, 4096], so keep the profile loadable and say so.
      std::cout << "warning: gemm on " << cores << " cores measured x" << hw.multicore_gemm_speedup
                << " of one core (is the machine busy?); recorded as x0.1" << std::endl;
      hw.multicore_gemm_speedup = 0.1;
    }
    std::cout << "gemm on " << cores << " cores vs 1: x" << hw.multicore_gemm_speedup
              << " (median of " << ratios.size() << ")" << std::endl;
  }

  // Plain passes: c = a * b, the slope between two sizes, inside the cache
  // and well past it; the cache a rank can count on (its L2 and its share of
  // the last level). Transcendentals: SiLU, sigmoid and exp per element.
  auto mul_time = [](int64_t n) {
    torch::Tensor a = torch::rand({n}), b = torch::rand({n}), c = torch::empty({n});
    return time_median([&] { at::mul_out(c, a, b); });
  };
  auto slope_gbps = [&](int64_t n1, int64_t n2) {
    return 3.0 * 4.0 * double(n2 - n1) / std::max(1e-9, mul_time(n2) - mul_time(n1)) / 1e9;
  };
  hw.cache_gbps = slope_gbps(1 << 12, 1 << 16);
  hw.stream_gbps = slope_gbps(1 << 22, 1 << 24);
  hw.memory_gbps = hw.stream_gbps;  // refitted below
  hw.cache_mib = cache_mib_per_core(cores);
  {
    torch::Tensor a = torch::rand({1 << 18});
    std::vector<double> rates;
    for (int rep = 0; rep < 3; ++rep) {
      rates.push_back(double(a.numel()) / time_median([&] { auto y = torch::silu(a); }) / 1e9);
      rates.push_back(double(a.numel()) / time_median([&] { auto y = torch::sigmoid(a); }) / 1e9);
      rates.push_back(double(a.numel()) / time_median([&] { auto y = torch::exp(a); }) / 1e9);
    }
    hw.transcendental_gelems = median(rates);
  }
  std::cout << "plain passes: " << hw.cache_gbps << " GB/s in cache (" << hw.cache_mib
            << " MiB per core), " << hw.stream_gbps << " GB/s from memory; exp/sigmoid/SiLU "
            << hw.transcendental_gelems << " G elements/s" << std::endl;

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
        return time_median_reps([&] { c.all_to_all_v(in, counts, counts, out); },
                                rows == 1 ? 400 : 30);
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
  // tiny one timed above: the experts' GEMM efficiency, the attention block's
  // element-wise rate and the per-collective latency are fitted to short training runs of four
  // calibration shapes (d_model 64 to 256) at world = cores, everything else
  // as measured above.
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
           "train.steps=12", "train.warmup=2", "train.log_every=1000", "data.kind=synthetic",
           "model.d_model=" + std::to_string(d), "model.d_ff=" + std::to_string(4 * d),
           "model.seq_len=" + std::to_string(seq), "train.batch=" + std::to_string(batch),
           "moe.experts=" + std::to_string(experts), "moe.d_expert=" + std::to_string(hidden),
           "model.vocab=" + std::to_string(vocab)}));
    // Three interleaved runs of each shape at `world` ranks, each a fresh
    // `moe train` process as a sweep point is
    // (in this process, BLAS worker threads left spinning by one run would
    // slow the next); the median run's median step.
    char dir_template[] = "/tmp/moe-calibrate-XXXXXX";
    const char* tmp = ::mkdtemp(dir_template);
    MOE_CHECK(tmp != nullptr, "calibrate: cannot create a temporary directory under /tmp");
    const std::string dir = tmp, self = self_executable();
    // A run's medians: the step, then each phase's slowest rank (step_phase_names() order).
    using Medians = std::vector<double>;
    std::vector<std::vector<Medians>> multi(shapes.size());
    auto run = [&](size_t shape, int ranks, std::vector<Medians>& into) {
      const std::string config = dir + "/shape" + std::to_string(shape) + ".yaml";
      std::ofstream(config) << dump_config(shapes[shape]);
      const std::string out = dir + "/run";
      std::system(("rm -rf " + shell_quote(out)).c_str());
      const std::string cmd = shell_quote(self) + " train " + shell_quote(config) + " --ranks " +
                              std::to_string(ranks) + " --out " + shell_quote(out) + " > " +
                              shell_quote(dir + "/log") + " 2>&1";
      MOE_CHECK(std::system(cmd.c_str()) == 0,
                "calibrate: the training run " << cmd << " failed (see " << dir << "/log)");
      std::ifstream metrics(out + "/metrics.jsonl");
      const auto& names = step_phase_names();
      std::vector<std::vector<double>> columns(1 + names.size());
      bool first = true;
      for (std::string line; std::getline(metrics, line);) {
        if (line.empty()) continue;
        if (first) {  // warm-up
          first = false;
          continue;
        }
        const auto j = nlohmann::json::parse(line);
        columns[0].push_back(j["step_ms"].get<double>());
        for (size_t p = 0; p < names.size(); ++p)
          columns[1 + p].push_back(j["phase_ms_max"][names[p]].get<double>());
      }
      MOE_CHECK(!columns[0].empty(), "calibrate: " << out << "/metrics.jsonl has no timed steps");
      Medians m;
      for (const auto& c : columns) m.push_back(median(c));
      into.push_back(m);
    };
    for (int rep = 0; rep < 3; ++rep)
      for (size_t i = 0; i < shapes.size(); ++i) run(i, world, multi[i]);
    std::system(("rm -rf " + shell_quote(dir)).c_str());
    // Each parameter is fitted on the measured phases it governs (least
    // squares on relative error; the model is linear in each):
    //   memory_gbps  <- attention_dense of the multi-rank runs,
    //   expert_gemm_efficiency <- experts of the same runs (segment products
    //                   are smaller and more oblong than the square table's),
    //   latency      <- dispatch + combine + grad_sync + router (the phases
    //                   with collectives, rank skew included) of the same runs.
    // One rank's GEMM speedup on every core stays as micro-benchmarked: its
    // alternated samples carry the spread a shared host puts on a rank whose
    // BLAS needs every core at once (single-rank steps measured 33 to 60 ms
    // for one config here), where short training runs catch one mode or the
    // other.
    // Medians over the repetitions, per shape.
    const auto& names = step_phase_names();
    auto median_of = [&](const std::vector<Medians>& reps, size_t column) {
      std::vector<double> v;
      for (const auto& r : reps) v.push_back(r[column]);
      return median(v);
    };
    auto phase_index = [&](const std::string& name) {
      return size_t(std::find(names.begin(), names.end(), name) - names.begin());
    };
    // Predicted ms of a set of phases under a profile.
    auto predicted = [&](const StepCost& cost, const HardwareProfile& h,
                         const std::vector<std::string>& phases) {
      const StepPrediction pr = predict_step(cost, h);
      double ms = 0;
      for (const auto& [name, v] : pr.phase_ms)
        if (std::find(phases.begin(), phases.end(), name) != phases.end()) ms += v;
      return ms;
    };
    // One-parameter least squares: measured_i ~ rest_i + x f_i, relative errors.
    auto fit_linear = [&](const std::vector<std::string>& phases, auto set, double fallback) {
      double num = 0, den = 0;
      for (size_t i = 0; i < shapes.size(); ++i) {
        const StepCost cost = step_cost(shapes[i], world);
        double measured = 0;
        for (const auto& ph : phases) measured += median_of(multi[i], 1 + phase_index(ph));
        const double rest = predicted(cost, set(hw, 0.0), phases);
        const double f = predicted(cost, set(hw, 1.0), phases) - rest;
        num += f / measured * (1.0 - rest / measured);
        den += f * f / (measured * measured);
      }
      const double x = den > 0 ? num / den : fallback;
      return x > 0 ? x : fallback;
    };
    const double measured_latency_us = hw.intra_node.latency_us;
    const double expert_s = fit_linear(
        {"experts"},
        [](HardwareProfile h, double x) {
          h.expert_gemm_efficiency = x > 0 ? 1.0 / x : 1e15;
          return h;
        },
        1.0);
    hw.expert_gemm_efficiency = std::min(1.0, 1.0 / expert_s);
    const double s_per_gb = fit_linear(
        {"attention_dense"},
        [](HardwareProfile h, double x) {
          h.memory_gbps = x > 0 ? 1.0 / x : 1e15;
          return h;
        },
        1.0 / hw.stream_gbps);
    hw.memory_gbps = 1.0 / s_per_gb;
    const double latency_us = fit_linear(
        {"dispatch", "combine", "grad_sync", "router"},
        [](HardwareProfile h, double x) {
          h.intra_node.latency_us = h.inter_node.latency_us = x;
          return h;
        },
        measured_latency_us);
    hw.intra_node.latency_us = std::max(measured_latency_us, latency_us);
    std::cout << "fitted: expert GEMMs at " << hw.expert_gemm_efficiency
              << " of the square-GEMM rate, attention element-wise " << hw.memory_gbps
              << " GB/s, collective latency (rank skew included) " << hw.intra_node.latency_us
              << " us (micro-benchmark " << measured_latency_us << ")" << std::endl;
    std::cout << "the fit, predicted vs measured step:";
    for (size_t i = 0; i < shapes.size(); ++i) {
      const double measured = median_of(multi[i], 0);
      const double pred = predict_step(step_cost(shapes[i], world), hw).step_ms;
      std::cout << " d" << shapes[i].model.d_model << " " << std::showpos
                << std::lround(100.0 * (pred - measured) / measured) << std::noshowpos << "%";
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
