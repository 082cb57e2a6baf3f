// `moe bench comm|layer|calibrate`.
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/comm/launch.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/core/timer.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

namespace moe::apps {

namespace {

struct CommRow {
  int64_t bytes_per_peer = 0;
  double moe_ms = 0, raw_ms = -1;
  std::vector<double> moe_reps, raw_reps;
};

// all_to_all throughput at each size: this layer's all_to_all_v against raw
// MPI_Alltoallv on the same buffers, repetitions interleaved. A repetition's
// time is the slowest rank's; GB/s = bytes each rank sends (world x
// bytes_per_peer, its own block included) / median time.
std::vector<CommRow> bench_comm(comm::Communicator& c, const Config& cfg) {
  const int n = c.size();
  const auto dtype = cfg.bench.dtype == "bfloat16" ? torch::kBFloat16 : torch::kFloat32;
  const int64_t row_elems = 1024 / torch::elementSize(dtype);  // 1 KiB rows
  std::vector<CommRow> rows;
#if MOE_HAVE_MPI
  auto* mpi = dynamic_cast<comm::MpiComm*>(&c);
#endif
  for (int64_t kib : cfg.bench.sizes_kib) {
    CommRow row;
    row.bytes_per_peer = kib * 1024;
    std::vector<int64_t> counts(n, kib);
    torch::Tensor in = torch::rand({n * kib, row_elems}).to(dtype);
    torch::Tensor out = torch::empty_like(in);
    torch::Tensor raw_out = torch::empty_like(in);
    const int64_t total = cfg.bench.warmup + cfg.bench.reps;
    std::vector<double> moe_t, raw_t;
    for (int64_t rep = 0; rep < total; ++rep) {
      c.barrier();
      Stopwatch sw;
      c.all_to_all_v(in, counts, counts, out);
      double t_moe = sw.seconds();
      double t_raw = -1;
#if MOE_HAVE_MPI
      if (mpi) {
        c.barrier();
        sw.reset();
        mpi->raw_alltoallv(in, raw_out, counts, counts);
        t_raw = sw.seconds();
      }
#endif
      if (rep >= cfg.bench.warmup) {
        moe_t.push_back(t_moe);
        raw_t.push_back(t_raw);
      }
    }
#if MOE_HAVE_MPI
    if (mpi)
      MOE_CHECK(torch::equal(out, raw_out),
                "all_to_all_v and MPI_Alltoallv disagree at " << kib << " KiB");
#endif
    // Slowest rank per repetition.
    torch::Tensor t = torch::tensor(moe_t, torch::kFloat64);
    torch::Tensor r = torch::tensor(raw_t, torch::kFloat64);
    c.all_reduce(t, comm::ReduceOp::Max);
    c.all_reduce(r, comm::ReduceOp::Max);
    row.moe_reps.assign(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
    row.raw_reps.assign(r.data_ptr<double>(), r.data_ptr<double>() + r.numel());
    row.moe_ms = median(row.moe_reps) * 1e3;
    if (row.raw_reps[0] >= 0) row.raw_ms = median(row.raw_reps) * 1e3;
    rows.push_back(row);
  }
  return rows;
}

double gbps(int64_t bytes_per_peer, int world, double ms) {
  return bytes_per_peer * world / (ms * 1e-3) / 1e9;
}

void report_comm(const std::vector<CommRow>& rows, int world, const std::string& backend, bool json,
                 const std::string& dump_dir) {
  nlohmann::json results = nlohmann::json::array();
  for (const auto& r : rows) {
    nlohmann::json j = {{"bytes_per_peer", r.bytes_per_peer},
                        {"moe_gbps", gbps(r.bytes_per_peer, world, r.moe_ms)},
                        {"moe_ms", r.moe_ms}};
    j["raw_mpi_gbps"] =
        r.raw_ms > 0 ? nlohmann::json(gbps(r.bytes_per_peer, world, r.raw_ms)) : nlohmann::json();
    if (r.raw_ms > 0) j["raw_mpi_ms"] = r.raw_ms;
    results.push_back(j);
  }
  nlohmann::json doc = {
      {"benchmark", "comm"}, {"backend", backend}, {"world", world}, {"results", results}};
  if (!dump_dir.empty()) {
    ::mkdir(dump_dir.c_str(), 0755);
    nlohmann::json raw = doc;
    for (size_t i = 0; i < rows.size(); ++i) {
      raw["results"][i]["moe_rep_s"] = rows[i].moe_reps;
      if (rows[i].raw_ms > 0) raw["results"][i]["raw_mpi_rep_s"] = rows[i].raw_reps;
    }
    std::ofstream(dump_dir + "/bench_comm.json") << raw.dump(2) << "\n";
  }
  if (json) {
    std::cout << doc.dump() << std::endl;
    return;
  }
  std::printf(
      "all_to_all_v throughput, backend %s, world %d (GB/s per rank, median of slowest rank)\n",
      backend.c_str(), world);
  std::printf("%14s %12s %12s %12s %12s %8s\n", "bytes/peer", "moe ms", "moe GB/s", "raw MPI ms",
              "raw GB/s", "ratio");
  for (const auto& r : rows) {
    double m = gbps(r.bytes_per_peer, world, r.moe_ms);
    if (r.raw_ms > 0) {
      double w = gbps(r.bytes_per_peer, world, r.raw_ms);
      std::printf("%14lld %12.4f %12.3f %12.4f %12.3f %8.3f\n",
                  static_cast<long long>(r.bytes_per_peer), r.moe_ms, m, r.raw_ms, w, m / w);
    } else {
      std::printf("%14lld %12.4f %12.3f %12s %12s %8s\n", static_cast<long long>(r.bytes_per_peer),
                  r.moe_ms, m, "-", "-", "-");
    }
  }
  std::fflush(stdout);
}

}  // namespace

int run_bench(const BenchArgs& args) {
  Config cfg = load_config_or_defaults(args.config_path, args.overrides);
  if (args.what != "comm") return not_implemented("bench " + args.what);
  std::string backend = comm::resolve_backend(cfg.parallel.backend);
  int nthreads = thread_ranks(args.ranks, cfg);
  comm::run_on_world(backend, nthreads, cfg.parallel.timeout_s, [&](comm::Communicator& c) {
    auto rows = bench_comm(c, cfg);
    if (c.rank() == 0) report_comm(rows, c.size(), c.backend_name(), args.json, args.dump_dir);
  });
  return kExitOk;
}

}  // namespace moe::apps
