#include "moe/core/random.h"

#include <ATen/CPUGeneratorImpl.h>

namespace moe {

namespace {
torch::Tensor to_target(torch::Tensor t, const torch::TensorOptions& options) {
  const auto dtype = options.has_dtype() ? options.dtype().toScalarType() : torch::kFloat32;
  const auto device = options.has_device() ? options.device() : torch::Device(torch::kCPU);
  if (t.scalar_type() == dtype && device.is_cpu()) return t;
  return t.to(device, dtype);
}
}  // namespace

torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed,
                            const torch::TensorOptions& options) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return to_target(at::normal(0.0, std, shape, gen), options);
}

torch::Tensor seeded_uniform(at::IntArrayRef shape, double lo, double hi, uint64_t seed,
                             const torch::TensorOptions& options) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return to_target(at::empty(shape, torch::kFloat32).uniform_(lo, hi, gen), options);
}

}  // namespace moe
