#include "moe/core/recompute.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

namespace moe {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Carries `fn` from forward to backward inside the autograd context.
struct RecomputeClosure : torch::CustomClassHolder {
  RecomputeFn fn;
};

struct RecomputeFunction : torch::autograd::Function<RecomputeFunction> {
  static variable_list forward(AutogradContext* ctx, c10::intrusive_ptr<RecomputeClosure> closure,
                               at::TensorList inputs) {
    ctx->saved_data["fn"] = c10::IValue::make_capsule(closure);
    ctx->save_for_backward(inputs.vec());
    // Autograd is off here (Function::apply): nothing inside fn is recorded.
    std::vector<torch::Tensor> detached;
    for (const auto& x : inputs) detached.push_back(x.detach());
    return closure->fn(detached);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto closure =
        c10::static_intrusive_pointer_cast<RecomputeClosure>(ctx->saved_data["fn"].toCapsule());
    std::vector<torch::Tensor> inputs;
    for (const auto& saved : ctx->get_saved_variables())
      inputs.push_back(saved.detach().requires_grad_(saved.requires_grad()));
    std::vector<torch::Tensor> outputs;
    {
      torch::AutoGradMode enable(true);
      outputs = closure->fn(inputs);
    }
    variable_list roots, grads;
    for (size_t i = 0; i < outputs.size() && i < grad_outputs.size(); ++i)
      if (outputs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outputs[i]);
        grads.push_back(grad_outputs[i]);
      }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    variable_list result;
    result.emplace_back();  // the closure argument
    for (const auto& x : inputs) result.push_back(x.requires_grad() ? x.grad() : torch::Tensor());
    return result;
  }
};

}  // namespace

std::vector<torch::Tensor> recompute(RecomputeFn fn, const std::vector<torch::Tensor>& inputs) {
  if (!torch::GradMode::is_enabled()) return fn(inputs);
  auto closure = c10::make_intrusive<RecomputeClosure>();
  closure->fn = std::move(fn);
  return RecomputeFunction::apply(closure, at::TensorList(inputs));
}

}  // namespace moe
