// `moe train CONFIG [overrides] [--ranks N] [--out DIR] [--resume DIR]`.
#include "moe/apps/commands.h"
#include "moe/apps/common.h"
#include "moe/comm/launch.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/core/memory.h"
#include "moe/core/signals.h"
#include "moe/train/trainer.h"

namespace moe::apps {

int run_train(const TrainArgs& args) {
  if (args.config_path.empty()) MOE_THROW(UsageError, "moe train: CONFIG file is required");
  Config cfg = load_config(args.config_path, args.overrides);
  const std::string backend = comm::resolve_backend(enum_name(cfg.parallel.backend));
  const int nthreads = thread_ranks(args.ranks, cfg);
  // Thread ranks (also NCCL bootstrapped over threads): fail before starting them.
  if (backend == "thread" || (backend == "nccl" && !comm::launched_by_mpirun()))
    resolve_layout(cfg, nthreads);
  TrainOptions opts;
  opts.out_dir = args.out_dir;
  opts.resume_dir = args.resume_dir;
  if (!opts.resume_dir.empty() && opts.out_dir.empty()) opts.out_dir = opts.resume_dir;
  comm::run_on_world(backend, nthreads, cfg.parallel.timeout_s, [&](comm::Communicator& world) {
    install_preemption_handlers();  // here: after MPI_Init, which may install its own
    TrainResult r = train(world, cfg, opts);
    if (world.rank() == 0 && !r.losses.empty())
      MOE_LOG(Info) << "done: loss " << r.losses.front() << " -> " << r.losses.back() << " over "
                    << r.losses.size() << " steps, " << static_cast<int64_t>(r.tokens_per_s)
                    << " tokens/s, peak RSS " << peak_rss_bytes() / (1 << 20) << " MiB"
                    << (opts.out_dir.empty() ? "" : "; outputs in " + opts.out_dir);
  }, cfg.parallel.device);
  return kExitOk;
}

}  // namespace moe::apps
