// `moe generate RUN_DIR --prompt TEXT [--tokens N] [--temperature T] [--top-k K] [--seed S]`:
// samples from the newest checkpoint of a run, on one rank (a checkpoint
// saved at any EP size loads at EP 1: experts are keyed globally).

#include <cstdio>
#include <iostream>
#include <sstream>
#include <sys/stat.h>

#include "moe/apps/commands.h"
#include "moe/comm/device.h"
#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/model/generate.h"
#include "moe/model/transformer.h"
#include "moe/parallel/checkpoint.h"

namespace moe::apps {

namespace {

// Byte-level models read the prompt's bytes; others (token ids) a list of
// ids separated by spaces or commas.
std::vector<int64_t> prompt_tokens(const std::string& prompt, bool bytes) {
  std::vector<int64_t> ids;
  if (bytes) {
    for (unsigned char c : prompt) ids.push_back(c);
    return ids;
  }
  std::string text = prompt;
  for (char& c : text)
    if (c == ',') c = ' ';
  std::istringstream in(text);
  for (std::string word; in >> word;) {
    size_t used = 0;
    long long id = -1;
    try {
      id = std::stoll(word, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MOE_CHECK_T(UsageError, used == word.size(),
                "--prompt: '" << word
                              << "' is not a token id: this model reads token ids (its data is "
                                 "not byte-level text), e.g. --prompt '17 4 250'");
    ids.push_back(id);
  }
  return ids;
}

}  // namespace

int run_generate(const GenerateArgs& args) {
  struct stat st;
  const std::string config_path = args.run_dir + "/config.yaml";
  MOE_CHECK_T(UsageError, ::stat(config_path.c_str(), &st) == 0,
              "'" << args.run_dir
                  << "' has no config.yaml: pass a run directory (the --out of moe train)");
  // One thread rank, every expert local; dropless (see model/generate.h).
  const Config cfg = load_config(config_path, {"parallel.backend=thread", "parallel.ranks=0",
                                               "parallel.ep=0", "parallel.dp=0",
                                               "moe.capacity_factor=0"});
  const bool bytes = cfg.data.kind == DataKind::Text;
  const std::vector<int64_t> prompt = prompt_tokens(args.prompt, bytes);
  SamplingOptions opts;
  opts.tokens = args.tokens;
  opts.temperature = args.temperature;
  opts.top_k = args.top_k;
  opts.seed = args.seed;
  comm::run_ranks(1, cfg.parallel.timeout_s, [&](comm::Communicator& world) {
    comm::ProcessMesh mesh(world, 1, 1);
    const torch::Device device = comm::select_device(cfg.parallel.device, 0);
    comm::bind_device(device);
    TransformerLM model(cfg, mesh.ep_group(), static_cast<uint64_t>(cfg.train.seed));
    model.to_device(device);
    load_checkpoint(args.run_dir, model, nullptr, mesh, cfg);
    // Echo the prompt, then stream each token as it is drawn.
    if (bytes) {
      std::cout << args.prompt << std::flush;
      generate(model, prompt, opts, [](int64_t t) { std::cout << char(t) << std::flush; });
    } else {
      for (int64_t t : prompt) std::cout << t << ' ';
      generate(model, prompt, opts, [](int64_t t) { std::cout << t << ' ' << std::flush; });
    }
    std::cout << std::endl;
  });
  return kExitOk;
}

}  // namespace moe::apps
