// `moe eval RUN_DIR [key=value ...] [--json] [--ranks N]`: the validation
// loss and per-expert load of a run's newest checkpoint, at any layout (the
// run's parallel.ranks/ep/dp are reset to auto; checkpoints reshard on load).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>

#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/comm/device.h"
#include "moe/comm/launch.h"
#include "moe/comm/mesh.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/model/transformer.h"
#include "moe/parallel/checkpoint.h"
#include "moe/train/data.h"
#include "moe/train/evaluate.h"

namespace moe::apps {

namespace {

void print_text(const EvalResult& r, const std::string& checkpoint, int64_t step, int world,
                const comm::ProcessMesh& mesh, const std::string& data) {
  std::printf("checkpoint %s (step %lld), evaluated on %d ranks (ep %d x dp %d)\n",
              checkpoint.c_str(), static_cast<long long>(step), world, mesh.ep(), mesh.dp());
  std::printf("validation: %lld windows = %lld tokens of %s\n",
              static_cast<long long>(r.windows), static_cast<long long>(r.tokens), data.c_str());
  std::printf("val_loss %.6f nats/token (perplexity %.3f)", r.loss, std::exp(r.loss));
  if (r.byte_level) std::printf(", %.6f bits/byte", r.bits_per_byte());
  std::printf("\n");
  if (!r.expert_load.empty()) std::printf("expert load (share of routed slots):\n");
  for (size_t l = 0; l < r.expert_load.size(); ++l) {
    double total = 0;
    for (int64_t c : r.expert_load[l]) total += double(c);
    std::printf("  moe layer %zu:", l);
    for (int64_t c : r.expert_load[l]) std::printf(" %5.1f%%", total > 0 ? 100.0 * c / total : 0.0);
    std::printf("\n");
  }
  std::fflush(stdout);
}

}  // namespace

int run_eval(const EvalArgs& args) {
  if (args.run_dir.empty()) MOE_THROW(UsageError, "moe eval: RUN_DIR is required");
  const std::string config_path = args.run_dir + "/config.yaml";
  if (::access(config_path.c_str(), R_OK) != 0)
    MOE_THROW(UsageError, "moe eval: '" << args.run_dir
                                        << "' is not a run directory (no readable config.yaml): "
                                           "give the --out directory of a `moe train` run");
  std::vector<std::string> overrides = {"parallel.ranks=0", "parallel.ep=0", "parallel.dp=0"};
  overrides.insert(overrides.end(), args.overrides.begin(), args.overrides.end());
  Config cfg = load_config(config_path, overrides);
  std::string problems;
  const std::string checkpoint = find_checkpoint(args.run_dir, &problems);
  if (checkpoint.empty())
    MOE_THROW(CheckpointError, "moe eval: no valid checkpoint in '" << args.run_dir
                                                                  << "': " << problems);
  const std::string backend = comm::resolve_backend(enum_name(cfg.parallel.backend));
  const int nthreads = thread_ranks(args.ranks, cfg);
  if (backend == "thread" || (backend == "nccl" && !comm::launched_by_mpirun()))
    resolve_layout(cfg, nthreads);
  comm::run_on_world(backend, nthreads, cfg.parallel.timeout_s, [&](comm::Communicator& world) {
    const ParallelLayout layout = resolve_layout(cfg, world.size());
    comm::check_world_consistency(world, config_hash(cfg));
    comm::ProcessMesh mesh(world, layout.ep, layout.dp);
    const torch::Device device =
        comm::select_device(cfg.parallel.device, comm::node_local_rank(world));
    comm::bind_device(device);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    model.to_device(device);
    model.set_compute_dtype(cfg.train.dtype == DType::BFloat16 ? torch::kBFloat16
                                                                : torch::kFloat32);
    const int64_t step = load_checkpoint(args.run_dir, model, nullptr, mesh, cfg);
    auto data = make_data_source(cfg, world.rank(), world.size());
    const EvalResult r = evaluate(model, *data, mesh, cfg);
    if (world.rank() != 0) return;
    if (!args.json) {
      print_text(r, checkpoint, step, world.size(), mesh, data->describe());
      return;
    }
    nlohmann::json j = {{"checkpoint", checkpoint},  {"step", step},
                        {"ranks", world.size()},     {"ep", mesh.ep()},
                        {"dp", mesh.dp()},           {"windows", r.windows},
                        {"tokens", r.tokens},        {"val_loss", r.loss},
                        {"perplexity", std::exp(r.loss)}, {"expert_load", r.expert_load}};
    if (r.byte_level) j["bits_per_byte"] = r.bits_per_byte();
    std::cout << j.dump() << std::endl;
  }, cfg.parallel.device);
  return kExitOk;
}

}  // namespace moe::apps
