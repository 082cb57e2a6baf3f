#include "moe/parallel/grad_sync.h"

#include <cmath>

#include "moe/core/error.h"
#include "moe/model/transformer.h"

namespace moe {

GradSync::GradSync(TransformerLM& model, comm::ProcessMesh& mesh, double bucket_mb)
    : mesh_(mesh),
      bucket_bytes_(std::max<int64_t>(1 << 16, static_cast<int64_t>(bucket_mb * (1 << 20)))) {
  for (auto& p : model.shared_parameters()) shared_.push_back(p.second);
  for (auto& p : model.expert_parameters()) expert_.push_back(p.second);
}

void GradSync::reduce(std::vector<torch::Tensor>& params, comm::Communicator& group) {
  const double scale = 1.0 / double(mesh_.world().size());
  size_t i = 0;
  while (i < params.size()) {
    // One bucket: consecutive float32 gradients up to bucket_bytes_.
    std::vector<torch::Tensor> grads;
    int64_t bytes = 0;
    while (i < params.size() && (grads.empty() || bytes + params[i].numel() * 4 <= bucket_bytes_)) {
      torch::Tensor& p = params[i];
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      grads.push_back(p.grad());
      bytes += p.numel() * 4;
      ++i;
    }
    std::vector<torch::Tensor> flat_parts;
    for (auto& g : grads) flat_parts.push_back(g.reshape({-1}));
    torch::Tensor flat = torch::cat(flat_parts);
    if (group.size() > 1) group.all_reduce(flat, comm::ReduceOp::Sum);
    flat.mul_(scale);
    int64_t off = 0;
    for (auto& g : grads) {
      g.copy_(flat.narrow(0, off, g.numel()).view(g.sizes()));
      off += g.numel();
    }
  }
}

double GradSync::synchronize_and_clip(double clip) {
  torch::NoGradGuard ng;
  reduce(shared_, mesh_.world());
  reduce(expert_, mesh_.expert_dp_group());
  // Replicated gradients are now identical on every rank; expert gradients
  // are split over the EP group (and identical across its DP replicas).
  // Squared norms summed on the gradients' device in float64; one host read.
  auto sum_sq = [](const std::vector<torch::Tensor>& ps) {
    std::vector<torch::Tensor> parts;
    for (const auto& p : ps) parts.push_back(p.grad().pow(2).sum().to(torch::kFloat64).view({1}));
    return parts.empty() ? torch::zeros({1}, torch::kFloat64) : torch::cat(parts).sum().view({1});
  };
  torch::Tensor shared_sq = sum_sq(shared_), expert_sq = sum_sq(expert_);
  if (mesh_.ep_group().size() > 1) mesh_.ep_group().all_reduce(expert_sq, comm::ReduceOp::Sum);
  const double norm = std::sqrt((shared_sq.to(expert_sq.device()) + expert_sq).item<double>());
  if (!std::isfinite(norm))
    MOE_THROW(NumericError, "gradient norm is " << norm << ": lower train.lr or enable train.clip");
  if (clip > 0 && norm > clip) {
    const double s = clip / (norm + 1e-6);
    for (auto& p : shared_) p.grad().mul_(s);
    for (auto& p : expert_) p.grad().mul_(s);
  }
  return norm;
}

}  // namespace moe
