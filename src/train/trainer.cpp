#include "moe/train/trainer.h"

#include <sys/stat.h>
#include <torch/nn/functional/loss.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <fstream>
#include <nlohmann/json.hpp>

#include "moe/comm/device.h"
#include "moe/comm/mesh.h"
#include "moe/core/error.h"
#include "moe/core/filesystem.h"
#include "moe/core/log.h"
#include "moe/core/memory.h"
#include "moe/core/signals.h"
#include "moe/core/stats.h"
#include "moe/core/timer.h"
#include "moe/model/transformer.h"
#include "moe/parallel/checkpoint.h"
#include "moe/parallel/optimizer.h"
#include "moe/train/cost_model.h"
#include "moe/train/data.h"
#include "moe/train/evaluate.h"

namespace moe {

namespace {
// On resume, metrics.jsonl keeps only the steps up to the checkpoint: a run
// killed after writing a step's line but before its checkpoint (or in the
// middle of a line) would otherwise repeat steps or glue the next line onto
// a torn one. Then a resumed run's file equals an uninterrupted run's.
void truncate_metrics(const std::string& path, int64_t last_step) {
  std::ifstream in(path);
  if (!in) return;  // resuming into a new --out directory
  std::string kept, line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("step") || !j["step"].is_number_integer()) break;
    if (j["step"].get<int64_t>() > last_step) break;
    kept += line + "\n";
  }
  in.close();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept;
    if (!out) MOE_THROW(DataError, "cannot write '" << tmp << "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0)
    MOE_THROW(DataError, "cannot rename '" << tmp << "' to '" << path << "'");
}
}  // namespace

double learning_rate(const TrainConfig& t, int64_t step) {
  if (t.warmup > 0 && step < t.warmup) return t.lr * double(step + 1) / double(t.warmup);
  const double floor = t.lr * t.min_lr_ratio;
  const int64_t span = std::max<int64_t>(1, t.steps - t.warmup - 1);
  const double p = std::min(1.0, double(step - t.warmup) / double(span));
  if (t.schedule == LrSchedule::Constant) return t.lr;
  if (t.schedule == LrSchedule::Linear) return t.lr + (floor - t.lr) * p;
  return floor + 0.5 * (t.lr - floor) * (1.0 + std::cos(M_PI * p));
}

namespace {

std::string fmt_eta(double s) {
  char buf[32];
  int m = static_cast<int>(s) / 60, sec = static_cast<int>(s) % 60;
  std::snprintf(buf, sizeof buf, "%dm%02ds", m, sec);
  return buf;
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(1 << 30));
  return buf;
}

// The memory guard: refuses, on every rank alike, a config whose per-rank
// estimate exceeds what a rank can use (the host's MemAvailable shared by its
// ranks, or the GPU's free memory shared by the ranks on it), before the
// model is allocated, naming the knobs that would make it fit.
void check_memory_fits(comm::Communicator& world, const Config& cfg, const torch::Device& device,
                       const MemoryEstimate& need) {
  const int here = comm::ranks_on_this_host(world);  // collective: before any early return
  int64_t limit = 0;
  int sharing = here;
  if (device.is_cuda()) {
    sharing = std::max(1, (here + comm::cuda_device_count() - 1) / std::max(1, comm::cuda_device_count()));
    limit = comm::free_device_memory(device);
  } else {
    limit = available_memory_bytes();
  }
  // Every rank decides with the tightest rank's figures: -max(-x) = min(x).
  torch::Tensor per_rank = torch::tensor({limit > 0 ? -double(limit) / sharing : 0.0}, torch::kFloat64);
  world.all_reduce(per_rank, comm::ReduceOp::Max);
  const double can_use = -per_rank.item<double>();
  if (can_use <= 0 || double(need.total()) <= can_use) return;
  const int W = world.size();
  std::ostringstream options;
  auto option = [&](const std::string& what, const std::vector<std::string>& overrides) {
    double est = 0;
    try {
      est = double(estimate_memory(load_config_text(dump_config(cfg), "memory guard", overrides), W)
                       .total());
    } catch (const ConfigError&) {
      return;  // not a valid layout for this config
    }
    options << "\n  " << what << ": ~" << gib(est) << (est <= can_use ? " (fits)" : "");
  };
  const ParallelLayout layout = resolve_layout(cfg, W);
  if (cfg.train.zero == 0 && W > 1) option("train.zero=1", {"train.zero=1"});
  if (cfg.train.recompute != Recompute::Block) option("train.recompute=block", {"train.recompute=block"});
  if (cfg.train.zero == 0 && W > 1 && cfg.train.recompute != Recompute::Block)
    option("train.zero=1 train.recompute=block", {"train.zero=1", "train.recompute=block"});
  if (layout.ep < W && cfg.moe.experts % W == 0)
    option("parallel.ep=" + std::to_string(W) + " parallel.dp=1",
           {"parallel.ep=" + std::to_string(W), "parallel.dp=1"});
  if (cfg.train.batch > 1)
    option("train.batch=" + std::to_string(cfg.train.batch / 2),
           {"train.batch=" + std::to_string(cfg.train.batch / 2)});
  MOE_THROW(ConfigError,
            "memory guard: this config needs ~" << gib(double(need.total())) << " per rank ("
                << describe_memory(need) << ") but a rank can use " << gib(can_use) << " ("
                << (device.is_cuda() ? "free GPU memory" : "MemAvailable") << " shared by "
                << sharing << " rank(s)). Estimates with other settings:" << options.str()
                << "\nor set train.memory_guard=false to start anyway");
}

// The line a preempted run ends with (rank 0; it may not be the rank that got the signal).
void report_preemption(bool lead, int local_signal, int64_t step, int64_t steps,
                       const std::string& out_dir) {
  if (!lead) return;
  const std::string cause = local_signal > 0 ? std::string(signal_name(local_signal))
                                             : std::string("a signal to another rank");
  if (out_dir.empty())
    MOE_LOG(Warn) << "preempted by " << cause << " after step " << step << "/" << steps
                  << ": no --out directory, so no checkpoint was written";
  else
    MOE_LOG(Info) << "preempted by " << cause << ": stopped after step " << step << "/" << steps
                  << " on every rank and saved its checkpoint; continue with --resume "
                  << out_dir;
}

}  // namespace

TrainResult train(comm::Communicator& world, const Config& cfg, const TrainOptions& opts) {
  const int64_t rss_at_start = current_rss_bytes();
  const ParallelLayout layout = resolve_layout(cfg, world.size());
  comm::check_world_consistency(world, config_hash(cfg));
  comm::ProcessMesh mesh(world, layout.ep, layout.dp, cfg.parallel.ep_span_hosts);
  const bool lead = world.rank() == 0;
  const auto& t = cfg.train;
  const int W = world.size();

  const int local_rank = comm::node_local_rank(world);
  const torch::Device device = comm::select_device(cfg.parallel.device, local_rank);
  comm::bind_device(device);
  const MemoryEstimate memory = estimate_memory(cfg, W);
  if (t.memory_guard) check_memory_fits(world, cfg, device, memory);
  TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(t.seed));
  model.to_device(device);  // before the optimizer exists: it keeps parameter references
  model.set_compute_dtype(t.dtype == DType::BFloat16 ? torch::kBFloat16 : torch::kFloat32);
  model.set_recompute(t.recompute);
  auto data = make_data_source(cfg, world.rank(), W);
  if (t.eval_every > 0) require_validation_data(*data, cfg);
  // After to_device: with train.zero 1 the parameters move into the optimizer's flat buffers.
  std::unique_ptr<Optimizer> optimizer = make_optimizer(model, mesh, t, cfg.parallel.grad_bucket_mb);

  TrainResult result;
  int64_t start_step = 0;
  if (!opts.resume_dir.empty()) {
    start_step = load_checkpoint(opts.resume_dir, model, optimizer.get(), mesh, cfg);
    result.first_step = start_step;
  }

  std::ofstream metrics;
  if (lead && !opts.out_dir.empty()) {
    std::string error = make_directories(opts.out_dir);
    if (!error.empty()) MOE_THROW(DataError, error);
    std::ofstream(opts.out_dir + "/config.yaml") << dump_config(cfg);
    if (start_step > 0) truncate_metrics(opts.out_dir + "/metrics.jsonl", start_step);
    metrics.open(opts.out_dir + "/metrics.jsonl", start_step > 0 ? std::ios::app : std::ios::trunc);
    if (!metrics) MOE_THROW(DataError, "cannot write '" << opts.out_dir << "/metrics.jsonl'");
  }
  // Memory per rank from shapes; checked against this process's peak RSS at the end
  // (thread ranks share the process, so the check compares ranks x estimate).
  const ModelCounts counts = model.counts();
  const int64_t tokens_per_step = W * t.batch * t.grad_accum * cfg.model.seq_len;
  if (lead && !opts.quiet) {
    MOE_LOG(Info) << "model: " << cfg.model.layers << " layers (" << model.moe_layers().size()
                  << " MoE), d_model " << cfg.model.d_model << ", " << cfg.moe.experts
                  << " experts top-" << cfg.moe.top_k << (cfg.model.dense ? " (dense twin)" : "")
                  << "; params total " << counts.total_params << ", active/token "
                  << counts.active_params << ", forward FLOPs/token "
                  << static_cast<int64_t>(counts.flops_per_token);
    MOE_LOG(Info) << "parallel: " << W << " ranks (" << world.backend_name() << "), ep "
                  << layout.ep << " x dp " << layout.dp << "; global batch "
                  << W * t.batch * t.grad_accum << " sequences = " << tokens_per_step
                  << " tokens/step; data: " << data->describe();
    MOE_LOG(Info) << "hosts: " << mesh.describe();
    MOE_LOG(Info) << "memory per rank (estimate): " << describe_memory(memory);
  }
  {
    // Rank 0 names every rank's device (-1 = CPU) and node-local rank (which picks the GPU).
    torch::Tensor mine = torch::tensor({static_cast<int64_t>(device.is_cuda() ? device.index() : -1),
                                        static_cast<int64_t>(local_rank)})
                             .reshape({1, 2});
    torch::Tensor all = world.all_gather(mine);
    if (lead && !opts.quiet) {
      std::ostringstream os;
      for (int r = 0; r < W; ++r) {
        const int64_t d = all[r][0].item<int64_t>();
        os << (r ? ", " : "") << "rank " << r << " (local " << all[r][1].item<int64_t>() << ") "
           << (d < 0 ? "cpu" : "cuda:" + std::to_string(d));
      }
      MOE_LOG(Info) << "devices: " << os.str() << " (rank 0: " << comm::describe_device(device)
                    << "); compute dtype " << enum_name(t.dtype);
    }
  }

  const int64_t V = cfg.model.vocab;
  Stopwatch run_clock;
  double run_tokens = 0;
  std::vector<std::vector<double>> step_times;  // per step: phase ms (slowest rank), step ms
  for (int64_t step = start_step; step < t.steps; ++step) {
    Stopwatch step_clock;
    const double lr = learning_rate(t, step);
    optimizer->zero_grad();
    double lm_sum = 0, aux_sum = 0, z_sum = 0, drop_sum = 0;
    std::vector<std::vector<int64_t>> loads;
    for (auto& layer : model.moe_layers()) layer->times().reset();
    Stopwatch phase_clock;
    for (int64_t micro = 0; micro < t.grad_accum; ++micro) {
      Batch b = data->batch(step, micro, t.batch);
      uint64_t noise =
          mix_seed(mix_seed(static_cast<uint64_t>(t.seed), step), micro * 4096 + world.rank());
      LMOutput out = model.forward(b.inputs, /*training=*/true, noise);
      torch::Tensor lm = torch::nn::functional::cross_entropy(out.logits.view({-1, V}),
                                                              b.targets.to(device).view({-1}));
      torch::Tensor loss = (lm + out.aux_loss + out.z_loss) / double(t.grad_accum);
      loss.backward();
      lm_sum += lm.item<double>();
      aux_sum += out.aux_loss.item<double>();
      z_sum += out.z_loss.item<double>();
      for (size_t l = 0; l < out.stats.size(); ++l) {
        if (loads.size() <= l) loads.emplace_back(cfg.moe.experts, 0);
        for (int64_t e = 0; e < cfg.moe.experts; ++e)
          loads[l][e] += out.stats[l].tokens_per_expert[e];
        drop_sum += out.stats[l].drop_fraction / double(out.stats.size());
      }
    }
    const double forward_backward_s = phase_clock.seconds();
    phase_clock.reset();
    const double grad_norm = optimizer->synchronize_and_clip(t.clip);
    const double grad_sync_s = phase_clock.seconds();
    phase_clock.reset();
    optimizer->step(lr);
    const double optimizer_s = phase_clock.seconds();
    // Step-time breakdown (ms): the MoE phases summed over layers (forward +
    // backward), the rest of forward+backward (attention, dense blocks,
    // embeddings, loss), gradient sync and the optimizer; this rank's and the
    // slowest rank's.
    std::vector<double> phase_ms(step_phase_names().size(), 0.0);
    for (auto& layer : model.moe_layers())
      for (int p = 0; p < PhaseTimes::Count; ++p) phase_ms[p] += layer->times().total(p) * 1e3;
    double moe_ms = 0;
    for (int p = 0; p < PhaseTimes::Count; ++p) moe_ms += phase_ms[p];
    phase_ms[PhaseTimes::Count] = std::max(0.0, forward_backward_s * 1e3 - moe_ms);
    phase_ms[PhaseTimes::Count + 1] = grad_sync_s * 1e3;
    phase_ms[PhaseTimes::Count + 2] = optimizer_s * 1e3;
    torch::Tensor phase_max = torch::tensor(phase_ms, torch::kFloat64);
    world.all_reduce(phase_max, comm::ReduceOp::Max);

    // Loads are EP-group-global; summing over the expert-DP group makes them world-global,
    // identical on every rank (so every replica of the router bias moves the same way).
    std::vector<std::vector<int64_t>> world_loads;
    for (auto& l : loads) {
      torch::Tensor lt = torch::tensor(l, torch::kInt64);
      mesh.expert_dp_group().all_reduce(lt, comm::ReduceOp::Sum);
      world_loads.emplace_back(lt.data_ptr<int64_t>(), lt.data_ptr<int64_t>() + lt.numel());
    }
    for (size_t l = 0; l < world_loads.size(); ++l) {
      LayerStats s;
      s.tokens_per_expert = world_loads[l];
      model.moe_layers()[l]->update_balance_bias(s);
    }
    // The preemption request rides on the step's all-reduce: one rank's signal
    // stops every rank after this same step.
    const int stop_here = opts.stop_requested ? opts.stop_requested(world.rank(), step)
                                              : preemption_signal();
    const double ga = double(t.grad_accum);
    torch::Tensor scalars = torch::tensor(
        {lm_sum / ga, aux_sum / ga, z_sum / ga, drop_sum / ga, stop_here ? 1.0 : 0.0},
        torch::kFloat64);
    world.all_reduce(scalars, comm::ReduceOp::Avg);
    const double* sc = scalars.data_ptr<double>();
    const bool stopping = sc[4] > 0;
    const double loss = sc[0] + sc[1] + sc[2];
    if (!std::isfinite(loss))
      MOE_THROW(NumericError, "loss is " << loss << " at step " << step << " (lm " << sc[0]
                                         << ", aux " << sc[1] << ", z " << sc[2]
                                         << "): lower train.lr or raise train.warmup");
    result.losses.push_back(loss);
    const double secs = step_clock.seconds();
    // Timing medians skip the first step run here (allocation, cache warm-up) when there are more.
    if (step == start_step + 1) step_times.clear();
    step_times.emplace_back(phase_max.data_ptr<double>(),
                            phase_max.data_ptr<double>() + phase_max.numel());
    step_times.back().push_back(secs * 1e3);
    run_tokens += double(tokens_per_step);
    const double tps = double(tokens_per_step) / secs;
    const bool last = step + 1 == t.steps;
    // Not when stopping: a preemption grace period is for the checkpoint.
    const bool evaluated = t.eval_every > 0 && ((step + 1) % t.eval_every == 0 || last) && !stopping;
    double val_loss = 0;
    if (evaluated) {
      val_loss = evaluate(model, *data, mesh, cfg).loss;
      result.val_losses.emplace_back(step + 1, val_loss);
    }

    if (lead) {
      double max_load = 0, mean_load = 0;
      for (const auto& l : world_loads) {
        double mx = 0, sum = 0;
        for (auto c : l) mx = std::max(mx, double(c)), sum += double(c);
        max_load += mx / double(world_loads.size());
        mean_load += sum / double(l.size()) / double(world_loads.size());
      }
      if (metrics.is_open()) {
        nlohmann::json j = {{"step", step + 1},       {"loss", loss},
                            {"lm_loss", sc[0]},       {"aux_loss", sc[1]},
                            {"z_loss", sc[2]},        {"lr", lr},
                            {"grad_norm", grad_norm}, {"tokens_per_s", tps},
                            {"drop_frac", sc[3]},     {"expert_load", world_loads}};
        nlohmann::json mine = nlohmann::json::object(), slowest = nlohmann::json::object();
        for (size_t p = 0; p < step_phase_names().size(); ++p) {
          mine[step_phase_names()[p]] = phase_ms[p];
          slowest[step_phase_names()[p]] = phase_max.data_ptr<double>()[p];
        }
        if (evaluated) j["val_loss"] = val_loss;
        j["step_ms"] = secs * 1e3;
        j["phase_ms"] = mine;
        j["phase_ms_max"] = slowest;
        metrics << j.dump() << "\n";
        metrics.flush();
      }
      if (!opts.quiet && ((step + 1) % t.log_every == 0 || last || step == start_step ||
                          evaluated)) {
        const double done = run_clock.seconds();
        const double eta = done / double(step + 1 - start_step) * double(t.steps - step - 1);
        char line[256], val[32] = "";
        if (evaluated) std::snprintf(val, sizeof val, "  val %.4f", val_loss);
        std::snprintf(line, sizeof line,
                      "step %lld/%lld  loss %.4f%s  aux %.4f  tok/s %.0f  load max/mean %.2f  "
                      "dropped %.1f%%  lr %.2e  "
                      "ETA %s",
                      static_cast<long long>(step + 1), static_cast<long long>(t.steps), loss, val,
                      sc[1], tps, mean_load > 0 ? max_load / mean_load : 0.0, 100 * sc[3], lr,
                      fmt_eta(eta).c_str());
        MOE_LOG(Info) << line;
      }
    }
    if (!opts.out_dir.empty() &&
        ((t.ckpt_every > 0 && (step + 1) % t.ckpt_every == 0) || last || stopping))
      save_checkpoint(opts.out_dir, step + 1, model, *optimizer, mesh, cfg);
    if (stopping && !last) {
      result.preempted_step = step + 1;
      report_preemption(lead, stop_here, step + 1, t.steps, opts.out_dir);
      break;
    }
  }
  result.tokens_per_s = run_tokens / std::max(1e-9, run_clock.seconds());
  if (!step_times.empty()) {
    auto median_of = [&](size_t column) {
      std::vector<double> v;
      for (const auto& row : step_times) v.push_back(row[column]);
      return median(v);
    };
    const size_t phases = step_phase_names().size();
    for (size_t p = 0; p < phases; ++p) result.median_phase_ms.push_back(median_of(p));
    result.median_step_ms = median_of(phases);
  }
  const int ranks_here = world.backend_name() == "thread" ? W : 1;
  if (lead && !opts.quiet) {
    // Thread ranks share the process: its RSS holds every rank's memory (and
    // the caching allocator's idle blocks, MOE_CPU_CACHE_MB).
    MOE_LOG(Info) << "memory: estimate " << (memory.total() >> 20) << " MiB per rank x "
                  << ranks_here << " rank(s) in this process; its peak RSS grew "
                  << ((peak_rss_bytes() - rss_at_start) >> 20) << " MiB during the run";
  }
  if (lead && !opts.out_dir.empty()) {
    nlohmann::json mem = {{"params_bytes", memory.params},
                          {"grads_bytes", memory.grads},
                          {"optimizer_bytes", memory.optimizer},
                          {"optimizer_state_bytes_rank0", optimizer->state_bytes()},
                          {"zero", t.zero},
                          {"recompute", enum_name(t.recompute)},
                          {"activations_bytes", memory.activations},
                          {"total_bytes", memory.total()},
                          {"ranks_in_process", ranks_here},
                          {"process_rss_at_start_bytes", rss_at_start},
                          {"process_peak_rss_bytes", peak_rss_bytes()}};
    std::ofstream(opts.out_dir + "/memory.json") << mem.dump(2) << "\n";
  }
  return result;
}

}  // namespace moe
