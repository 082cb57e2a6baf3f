// `moe bench comm|layer|calibrate`.
#include <sys/stat.h>
#include <torch/cuda.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/comm/launch.h"
#include "moe/core/error.h"
#include "moe/core/stats.h"
#include "moe/core/filesystem.h"
#include "moe/core/log.h"
#include "moe/core/timer.h"
#include "moe/moe/moe_layer.h"
#include "moe/parallel/safetensors.h"
#include "moe/comm/device.h"
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
  const auto dtype = cfg.bench.dtype == DType::BFloat16 ? torch::kBFloat16 : torch::kFloat32;
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
    std::string error = make_directories(dump_dir);
    if (!error.empty()) MOE_THROW(UsageError, "--dump: " << error);
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

// ---- bench layer -------------------------------------------------------------------------

void clear_grads(torch::nn::Module& m) {
  for (auto& p : m.parameters()) p.mutable_grad().reset();
}

// The seeds' MoE: loop over slots and experts, boolean mask, index. Single rank.
torch::Tensor naive_moe(const torch::Tensor& x, MoELayer& layer, const MoeConfig& c) {
  torch::Tensor logits = torch::mm(x, layer.router->weight.t());
  torch::Tensor probs = torch::softmax(logits, -1);
  auto top = probs.topk(c.top_k, -1);
  torch::Tensor gate = std::get<0>(top), idx = std::get<1>(top);
  if (c.renormalize && c.top_k > 1) gate = gate / gate.sum(-1, true);
  torch::Tensor out = torch::zeros_like(x);
  for (int64_t j = 0; j < c.top_k; ++j) {
    torch::Tensor ej = idx.select(1, j);
    for (int64_t e = 0; e < c.experts; ++e) {
      torch::Tensor mask = ej == e;
      if (!mask.any().item<bool>()) continue;
      torch::Tensor xe = x.index({mask});
      torch::Tensor h = c.activation == Activation::SwiGLU
                            ? torch::silu(torch::mm(xe, layer.w1[e])) * torch::mm(xe, layer.w3[e])
                            : torch::gelu(torch::mm(xe, layer.w1[e]));
      torch::Tensor ye = torch::mm(h, layer.w2[e]) * gate.select(1, j).index({mask}).unsqueeze(1);
      out = out.index_put({mask}, out.index({mask}) + ye);
    }
  }
  return out;
}

struct LayerBench {
  std::vector<std::pair<std::string, double>> ms;           // name -> median ms (slowest rank)
  double phase_ms[PhaseTimes::Count] = {0, 0, 0, 0, 0, 0};  // rank 0 medians, forward + backward
  double gemm_flops = 0;  // forward+backward FLOPs of the expert products (this rank)
  std::string device;
  LayerStats stats;
};

// Waits for the device so host clocks measure kernels (a no-op on CPU).
void sync_device(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize(d.index());
}

LayerBench bench_layer(comm::Communicator& c, const Config& cfg, const std::string& dump_dir) {
  const MoeConfig& mc = cfg.moe;
  const int64_t T = cfg.bench.tokens, D = cfg.model.d_model, k = mc.top_k, H = mc.d_expert;
  const int ep = c.size();
  const torch::Device device = comm::select_device(cfg.parallel.device, comm::node_local_rank(c));
  comm::bind_device(device);
  const auto dtype = cfg.bench.dtype == DType::BFloat16 ? torch::kBFloat16 : torch::kFloat32;
  MoELayer layer(mc, D, c, static_cast<uint64_t>(cfg.train.seed));
  layer.to(device);
  if (dtype != torch::kFloat32) {
    // Expert weights held in the compute dtype (as a bf16 training step sees
    // them after its one cast); the router stays float32.
    torch::NoGradGuard ng;
    for (auto* w : {&layer.w1, &layer.w3, &layer.w2})
      if (w->defined()) w->set_data(w->to(dtype));
  }
  const int64_t EL = layer.experts_per_rank();
  const auto opt = torch::TensorOptions().device(device).dtype(dtype);
  torch::Tensor x = torch::randn({T, D}, opt).requires_grad_(true);
  torch::Tensor gy = torch::randn({T, D}, opt);
  // The floor: the same expert MLPs on T*k pre-sorted rows, balanced over the local experts.
  const int64_t rows = T * k;
  torch::Tensor xs = torch::randn({rows, D}, opt).requires_grad_(true);
  torch::Tensor gys = torch::randn({rows, D}, opt);
  std::vector<ExpertSegment> segs;
  for (int64_t le = 0; le < EL; ++le) {
    int64_t lo = rows * le / EL, hi = rows * (le + 1) / EL;
    segs.push_back({le, lo, hi - lo});
  }
  const bool swiglu = mc.activation == Activation::SwiGLU;
  // Reference: one dense GEMM chain of the same per-expert shape over all rows.
  torch::Tensor dw1 = torch::randn({1, D, H}, opt).requires_grad_(true);
  torch::Tensor dw3 = torch::randn({1, D, H}, opt).requires_grad_(true);
  torch::Tensor dw2 = torch::randn({1, H, D}, opt).requires_grad_(true);
  const std::vector<ExpertSegment> one{{0, 0, rows}};
  const bool with_naive = ep == 1 && device.is_cpu();
  const bool with_gather = device.is_cpu() && dtype == torch::kFloat32;  // CPU loops vs gathers
  std::vector<double> t_limit, t_dense, t_naive, t_layer, t_gather;
  std::vector<std::vector<double>> phases(PhaseTimes::Count);
  LayerBench out;
  out.device = device.str();
  out.gemm_flops = 2.0 * double(rows) * double(D) * double(H) * (swiglu ? 3 : 2) * 3;
  auto timed = [&](std::vector<double>& into, bool keep, const std::function<void()>& body) {
    c.barrier();
    sync_device(device);
    Stopwatch sw;
    body();
    sync_device(device);
    if (keep) into.push_back(sw.seconds());
  };
  const int64_t total = cfg.bench.warmup + cfg.bench.reps;
  for (int64_t rep = 0; rep < total; ++rep) {
    const bool keep = rep >= cfg.bench.warmup;
    timed(t_limit, keep, [&] {
      expert_mlp(xs, layer.w1, layer.w3, layer.w2, segs, swiglu).backward(gys);
    });
    clear_grads(layer);
    xs.mutable_grad().reset();
    timed(t_dense, keep, [&] {
      expert_mlp(xs, dw1, swiglu ? dw3 : torch::Tensor(), dw2, one, swiglu).backward(gys);
    });
    for (auto* w : {&dw1, &dw3, &dw2}) w->mutable_grad().reset();
    xs.mutable_grad().reset();
    if (with_naive) {
      timed(t_naive, keep, [&] { naive_moe(x, layer, mc).backward(gy); });
      clear_grads(layer);
      x.mutable_grad().reset();
    }
    if (with_gather) {
      set_row_kernel(RowKernel::Gather);
      timed(t_gather, keep, [&] {
        MoEOutput o = layer.forward(x, true);
        ((o.y * gy).sum() + o.aux_loss + o.z_loss).backward();
      });
      set_row_kernel(RowKernel::Auto);
      clear_grads(layer);
      x.mutable_grad().reset();
    }
    layer.times().reset();
    MoEOutput o;
    timed(t_layer, keep, [&] {
      o = layer.forward(x, true);
      ((o.y * gy.to(o.y.scalar_type())).sum() + o.aux_loss + o.z_loss).backward();
    });
    if (keep) {
      for (int p = 0; p < PhaseTimes::Count; ++p) phases[p].push_back(layer.times().total(p));
      out.stats = o.stats;
    }
    if (!dump_dir.empty() && rep + 1 == total) {
      // One forward+backward, with routing, under Mixtral's names.
      std::map<std::string, torch::Tensor> t;
      t["input"] = x.detach();
      t["output"] = o.y.detach();
      t["grad_output"] = gy;
      t["grad_input"] = x.grad();
      t["gate.weight"] = layer.router->weight.detach();
      t["gate.weight.grad"] = layer.router->weight.grad();
      for (int64_t le = 0; le < EL; ++le) {
        std::string pre = "experts." + std::to_string(layer.first_expert() + le) + ".";
        // Mixtral stores nn.Linear weights [out, in]: w1/w3 [H, D], w2 [D, H].
        t[pre + "w1.weight"] = layer.w1[le].detach().t();
        t[pre + "w2.weight"] = layer.w2[le].detach().t();
        t[pre + "w1.weight.grad"] = layer.w1.grad()[le].t();
        t[pre + "w2.weight.grad"] = layer.w2.grad()[le].t();
        if (swiglu) {
          t[pre + "w3.weight"] = layer.w3[le].detach().t();
          t[pre + "w3.weight.grad"] = layer.w3.grad()[le].t();
        }
      }
      RouterOutput ro = layer.router->forward(x.detach().to(torch::kFloat32), false);
      t["routing.expert_ids"] = ro.expert_idx;
      t["routing.gate_weights"] = ro.gate.detach();
      t["aux_loss"] = o.aux_loss.detach().view({1});
      t["z_loss"] = o.z_loss.detach().view({1});
      std::map<std::string, std::string> meta = {
          {"experts", std::to_string(mc.experts)},
          {"top_k", std::to_string(k)},
          {"score_fn", enum_name(mc.score_fn)},
          {"activation", enum_name(mc.activation)},
          {"capacity_factor", std::to_string(mc.capacity_factor)},
          {"rank", std::to_string(c.rank())},
          {"world", std::to_string(ep)},
          {"loss", "sum(output * grad_output) + aux_loss + z_loss"}};
      std::string error = make_directories(dump_dir);
      if (!error.empty()) MOE_THROW(UsageError, "--dump: " << error);
      write_safetensors(dump_dir + "/layer_rank" + std::to_string(c.rank()) + ".safetensors", t,
                        meta);
    }
    clear_grads(layer);
    x.mutable_grad().reset();
  }
  auto slowest_median = [&](const std::vector<double>& v) {
    torch::Tensor t = torch::tensor(v, torch::kFloat64);
    c.all_reduce(t, comm::ReduceOp::Max);
    return median(std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel())) *
           1e3;
  };
  out.ms.push_back({"expert_only_limit", slowest_median(t_limit)});
  out.ms.push_back({"dense_gemm", slowest_median(t_dense)});
  if (with_naive) out.ms.push_back({"naive_loop", slowest_median(t_naive)});
  if (with_gather) out.ms.push_back({"moe_layer_gathers", slowest_median(t_gather)});
  out.ms.push_back({"moe_layer", slowest_median(t_layer)});
  for (int p = 0; p < PhaseTimes::Count; ++p) out.phase_ms[p] = median(phases[p]) * 1e3;
  return out;
}

void report_layer(const LayerBench& b, const Config& cfg, int world, bool json) {
  const double limit = b.ms[0].second;
  nlohmann::json results = nlohmann::json::array();
  for (const auto& [name, ms] : b.ms) {
    nlohmann::json r = {{"name", name}, {"ms", ms}, {"ratio_to_limit", ms / limit}};
    if (name == "expert_only_limit" || name == "dense_gemm")
      r["gemm_tflops"] = b.gemm_flops / (ms * 1e-3) / 1e12;
    results.push_back(r);
  }
  nlohmann::json breakdown = nlohmann::json::object();
  double layer_ms = b.ms.back().second, accounted = 0;
  for (int p = 0; p < PhaseTimes::Count; ++p) {
    breakdown[PhaseTimes::name(p)] = b.phase_ms[p];
    accounted += b.phase_ms[p];
  }
  breakdown["other"] = std::max(0.0, layer_ms - accounted);
  const auto& m = cfg.moe;
  nlohmann::json doc = {{"benchmark", "layer"},
                        {"world", world},
                        {"device", b.device},
                        {"dtype", enum_name(cfg.bench.dtype)},
                        {"tokens_per_rank", cfg.bench.tokens},
                        {"d_model", cfg.model.d_model},
                        {"d_expert", m.d_expert},
                        {"experts", m.experts},
                        {"top_k", m.top_k},
                        {"capacity_factor", m.capacity_factor},
                        {"drop_fraction", b.stats.drop_fraction},
                        {"results", results},
                        {"breakdown_ms", breakdown}};
  if (json) {
    std::cout << doc.dump() << std::endl;
    return;
  }
  std::printf(
      "MoE layer forward+backward, %s on %s: T %lld/rank, D %lld, H %lld, E %lld, k %lld, "
      "cf %.2f, world %d\n",
      enum_name(cfg.bench.dtype), b.device.c_str(),
      static_cast<long long>(cfg.bench.tokens), static_cast<long long>(cfg.model.d_model),
      static_cast<long long>(m.d_expert), static_cast<long long>(m.experts),
      static_cast<long long>(m.top_k), m.capacity_factor, world);
  std::printf("%-20s %12s %10s %12s\n", "variant", "median ms", "x limit", "GEMM TFLOP/s");
  for (const auto& [name, ms] : b.ms) {
    if (name == "expert_only_limit" || name == "dense_gemm")
      std::printf("%-20s %12.2f %10.3f %12.3f\n", name.c_str(), ms, ms / limit,
                  b.gemm_flops / (ms * 1e-3) / 1e12);
    else
      std::printf("%-20s %12.2f %10.3f\n", name.c_str(), ms, ms / limit);
  }
  std::printf("moe_layer breakdown (rank 0 medians, forward+backward ms):");
  for (int p = 0; p < PhaseTimes::Count; ++p)
    std::printf(" %s %.2f", PhaseTimes::name(p), b.phase_ms[p]);
  std::printf(" other %.2f; dropped %.2f%%\n", std::max(0.0, layer_ms - accounted),
              100 * b.stats.drop_fraction);
  std::fflush(stdout);
}

}  // namespace

int run_bench(const BenchArgs& args) {
  Config cfg = load_config_or_defaults(args.config_path, args.overrides);
  if (args.what == "layer") {
    std::string backend = comm::resolve_backend(enum_name(cfg.parallel.backend));
    int nthreads = thread_ranks(args.ranks, cfg);
    comm::run_on_world(backend, nthreads, cfg.parallel.timeout_s, [&](comm::Communicator& c) {
      resolve_layout(cfg, c.size());  // experts divisible by the EP size, ranks consistent
      LayerBench b = bench_layer(c, cfg, args.dump_dir);
      if (c.rank() == 0) report_layer(b, cfg, c.size(), args.json);
    }, cfg.parallel.device);
    return kExitOk;
  }
  if (args.what == "calibrate") return run_calibrate(args);
  std::string backend = comm::resolve_backend(enum_name(cfg.parallel.backend));
  int nthreads = thread_ranks(args.ranks, cfg);
  comm::run_on_world(backend, nthreads, cfg.parallel.timeout_s, [&](comm::Communicator& c) {
    auto rows = bench_comm(c, cfg);
    if (c.rank() == 0) report_comm(rows, c.size(), c.backend_name(), args.json, args.dump_dir);
  }, cfg.parallel.device);
  return kExitOk;
}

}  // namespace moe::apps
