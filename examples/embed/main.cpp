// One MoELayer inside a user's own LibTorch training loop, expert parallel
// over two ranks (threads of this process).
//
// The model is the user's: Linear -> MoELayer (4 experts, top-2, 2 per rank)
// -> Linear, fitted by MSE to a fixed random nonlinear map. Each rank draws
// its own batch. The user's loop does what moe's trainer does for its own
// models: the replicated parameters' gradients (the two Linears, the router)
// are averaged over the ranks; the local experts' gradients already hold
// every rank's tokens (the all-to-all backward brings them), so they are
// only divided by the world size. Then every rank's update is that of the
// mean loss over both ranks' batches, and the replicated parameters stay
// bitwise equal on the two ranks.
//
// Exit 0 when the loss fell to below half its first value and the replicated
// parameters agree across ranks; 1 otherwise.
#include <moe/comm/thread_comm.h>
#include <moe/config/config.h>
#include <moe/moe/moe_layer.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cstdio>
#include <mutex>
#include <vector>

namespace {

constexpr int kRanks = 2;
constexpr int64_t kD = 16, kTokens = 64, kSteps = 60;

struct Result {
  float first_loss = 0, last_loss = 0;
  torch::Tensor replicated;  // the rank's replicated parameters, flattened
};

void run_rank(moe::comm::Communicator& world, Result& result) {
  const int rank = world.rank();
  moe::MoeConfig cfg;
  cfg.experts = 4;  // 2 per rank: expert parallel over the world
  cfg.top_k = 2;
  cfg.d_expert = 32;
  cfg.capacity_factor = 0;  // dropless

  // The same replicated weights on every rank: the rank threads share
  // LibTorch's global generator, so they seed and draw from it one at a time.
  static std::mutex init_mutex;
  std::unique_lock<std::mutex> init_lock(init_mutex);
  torch::manual_seed(1);
  torch::nn::Linear in(kD, kD), out(kD, kD);
  init_lock.unlock();
  moe::MoELayer layer(cfg, kD, world, /*seed=*/7);

  std::vector<torch::Tensor> replicated, experts = {layer.w1, layer.w3, layer.w2};
  for (auto& p : in->parameters()) replicated.push_back(p);
  for (auto& p : out->parameters()) replicated.push_back(p);
  for (auto& p : layer.router->parameters()) replicated.push_back(p);
  std::vector<torch::Tensor> all = replicated;
  all.insert(all.end(), experts.begin(), experts.end());
  torch::optim::Adam opt(all, torch::optim::AdamOptions(3e-3));

  // The target: a fixed map the ranks agree on; each rank its own inputs.
  // (Generators of their own: draws from the shared global one would interleave.)
  at::Generator target_gen = at::detail::createCPUGenerator(2);
  torch::Tensor a = torch::randn({kD, kD}, target_gen) / 4;
  at::Generator data_gen = at::detail::createCPUGenerator(100 + rank);
  for (int64_t step = 0; step < kSteps; ++step) {
    torch::Tensor x = torch::randn({kTokens, kD}, data_gen);
    torch::Tensor target = torch::tanh(x.mm(a)) + x;
    moe::MoEOutput m = layer.forward(in(x), /*training=*/true);
    torch::Tensor loss = torch::mse_loss(out(m.y) + x, target) + m.aux_loss + m.z_loss;
    opt.zero_grad();
    loss.backward();
    for (auto& p : replicated) world.all_reduce(p.mutable_grad(), moe::comm::ReduceOp::Avg);
    for (auto& p : experts) p.mutable_grad().div_(world.size());
    opt.step();

    torch::Tensor mean_loss = loss.detach().reshape({1});  // collectives take tensors of rank >= 1
    world.all_reduce(mean_loss, moe::comm::ReduceOp::Avg);
    if (step == 0) result.first_loss = mean_loss.item<float>();
    result.last_loss = mean_loss.item<float>();
    if (rank == 0 && step % 20 == 0) std::printf("step %3lld  loss %.4f\n", (long long)step, result.last_loss);
  }
  std::vector<torch::Tensor> flat;
  for (auto& p : replicated) flat.push_back(p.detach().flatten());
  result.replicated = torch::cat(flat);
}

}  // namespace

int main() {
  std::vector<Result> results(kRanks);
  try {
    moe::comm::run_ranks(kRanks, /*timeout_s=*/60,
                         [&](moe::comm::Communicator& world) { run_rank(world, results[world.rank()]); });
  } catch (const std::exception& e) {  // moe's errors name the rank, the operation and file:line
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  const Result& r0 = results[0];
  bool learned = r0.last_loss < 0.5f * r0.first_loss;
  bool same = torch::equal(results[0].replicated, results[1].replicated);
  std::printf("loss %.4f -> %.4f (%s); replicated parameters %s on the %d ranks\n", r0.first_loss,
              r0.last_loss, learned ? "learned" : "did NOT fall below half", same ? "equal" : "DIFFER",
              kRanks);
  return learned && same ? 0 : 1;
}
