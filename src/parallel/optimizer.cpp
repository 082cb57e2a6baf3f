#include "moe/parallel/optimizer.h"

#include <torch/optim/adamw.h>

#include <cmath>
#include <sstream>

#include "moe/core/error.h"
#include "moe/model/transformer.h"
#include "moe/parallel/grad_sync.h"

namespace moe {

std::string expert_unit_key(const std::string& param_name, int64_t global_expert) {
  const auto dot = param_name.rfind('.');
  return param_name.substr(0, dot) + ".experts." + std::to_string(global_expert) +
         param_name.substr(dot);
}

namespace {

// AdamW's decay rule (as the trainer always had it): matrices decay, vectors
// (norm gains) do not.
bool decays(const torch::Tensor& p) {
  return p.dim() >= 2;
}

int64_t first_local_expert(TransformerLM& model) {
  return model.moe_layers().empty() ? 0 : model.moe_layers()[0]->first_expert();
}

// ---- train.zero = 0 -----------------------------------------------------------

// The optimizer's state key of a parameter: LibTorch 1.x keys by the string
// of the TensorImpl address (what c10::guts::to_string printed), 2.x by the
// address itself (and has no c10::guts::to_string).
template <class Key>
Key state_key(const torch::Tensor& p) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return static_cast<Key>(p.unsafeGetTensorImpl());
  }
}
using OptimStateKey = std::decay_t<decltype(std::declval<torch::optim::AdamW&>().state())>::key_type;

class ReplicatedAdamW : public Optimizer {
 public:
  ReplicatedAdamW(TransformerLM& model, comm::ProcessMesh& mesh, const TrainConfig& t,
                  double grad_bucket_mb)
      : model_(model), mesh_(mesh), sync_(model, mesh, grad_bucket_mb) {
    std::vector<torch::Tensor> decay, no_decay;
    for (const auto& p : model.parameters()) (decays(p) ? decay : no_decay).push_back(p);
    std::vector<torch::optim::OptimizerParamGroup> groups;
    auto options = [&](double wd) {
      return std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(t.lr).betas({t.beta1, t.beta2}).weight_decay(wd));
    };
    groups.emplace_back(decay, options(t.weight_decay));
    groups.emplace_back(no_decay, options(0.0));
    adam_ = std::make_unique<torch::optim::AdamW>(std::move(groups));
  }

  void zero_grad() override { adam_->zero_grad(); }
  double synchronize_and_clip(double clip) override { return sync_.synchronize_and_clip(clip); }
  void step(double lr) override {
    for (auto& g : adam_->param_groups())
      static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    adam_->step();
  }
  int64_t adam_step() const override {
    for (const auto& p : model_.parameters())
      if (auto* s = state(p)) return s->step();
    return 0;
  }
  int64_t state_bytes() const override {
    int64_t b = 0;
    for (const auto& p : model_.parameters())
      if (auto* s = state(p)) b += (s->exp_avg().numel() + s->exp_avg_sq().numel()) * 4;
    return b;
  }
  bool sharded() const override { return false; }

  std::vector<MomentPiece> moments_to_save() const override {
    std::vector<MomentPiece> out;
    if (mesh_.world().rank() == 0)
      for (auto& [name, p] : model_.shared_parameters())
        if (auto* s = state(p))
          out.push_back({name, 0, s->exp_avg().reshape({-1}), s->exp_avg_sq().reshape({-1})});
    if (mesh_.dp_rank() == 0) {
      const int64_t first = first_local_expert(model_);
      for (auto& [name, p] : model_.expert_parameters())
        if (auto* s = state(p))
          for (int64_t le = 0; le < p.size(0); ++le)
            out.push_back({expert_unit_key(name, first + le), 0, s->exp_avg()[le].reshape({-1}),
                           s->exp_avg_sq()[le].reshape({-1})});
    }
    return out;
  }

  void load_moments(int64_t step, const MomentLookup& lookup) override {
    torch::Tensor m, v;
    for (auto& [name, p] : model_.shared_parameters())
      if (lookup(name, p.numel(), m, v)) set_state(p, step, m.view(p.sizes()), v.view(p.sizes()));
    const int64_t first = first_local_expert(model_);
    for (auto& [name, p] : model_.expert_parameters()) {
      std::vector<torch::Tensor> ms, vs;
      for (int64_t le = 0; le < p.size(0); ++le) {
        if (!lookup(expert_unit_key(name, first + le), p[le].numel(), m, v)) break;
        ms.push_back(m.view(p[le].sizes()));
        vs.push_back(v.view(p[le].sizes()));
      }
      if (static_cast<int64_t>(ms.size()) == p.size(0))
        set_state(p, step, torch::stack(ms), torch::stack(vs));
    }
  }

 private:
  torch::optim::AdamWParamState* state(const torch::Tensor& p) const {
    auto& states = adam_->state();
    auto it = states.find(state_key<OptimStateKey>(p));
    return it == states.end() ? nullptr
                              : static_cast<torch::optim::AdamWParamState*>(it->second.get());
  }
  void set_state(const torch::Tensor& p, int64_t step, const torch::Tensor& m,
                 const torch::Tensor& v) {
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(step);
    // On the parameter's device (checkpoints are read on the CPU).
    st->exp_avg(m.to(p.device(), p.scalar_type()).clone());
    st->exp_avg_sq(v.to(p.device(), p.scalar_type()).clone());
    adam_->state()[state_key<OptimStateKey>(p)] = std::move(st);
  }

  TransformerLM& model_;
  comm::ProcessMesh& mesh_;
  GradSync sync_;
  std::unique_ptr<torch::optim::AdamW> adam_;
};

// ---- train.zero = 1 -----------------------------------------------------------

class ShardedAdamW : public Optimizer {
 public:
  ShardedAdamW(TransformerLM& model, comm::ProcessMesh& mesh, const TrainConfig& t)
      : mesh_(mesh), t_(t) {
    torch::NoGradGuard ng;
    std::vector<Member> shared, experts;
    for (auto& [name, p] : model.shared_parameters()) shared.push_back({name, p, 0, 1});
    const int64_t first = first_local_expert(model);
    for (auto& [name, p] : model.expert_parameters()) experts.push_back({name, p, first, p.size(0)});
    build(groups_[0], shared, mesh.world(), /*expert=*/false);
    build(groups_[1], experts, mesh.expert_dp_group(), /*expert=*/true);
  }

  void zero_grad() override {
    for (auto& g : groups_)
      if (g.grads.defined()) g.grads.zero_();
  }

  double synchronize_and_clip(double clip) override {
    torch::NoGradGuard ng;
    const double scale = 1.0 / double(mesh_.world().size());
    torch::Tensor sq;
    for (auto& g : groups_) {
      if (!g.grads.defined()) continue;
      torch::Tensor mine = shard(g, g.grads);
      if (g.comm->size() > 1) g.comm->reduce_scatter(g.grads, mine, comm::ReduceOp::Sum);
      mine.mul_(scale);
      torch::Tensor part = mine.pow(2).sum(torch::kFloat64).view({1});
      sq = sq.defined() ? sq + part : part;
    }
    if (!sq.defined()) return 0.0;
    // Shards partition every gradient exactly once over the world: one sum.
    if (mesh_.world().size() > 1) mesh_.world().all_reduce(sq, comm::ReduceOp::Sum);
    const double norm = std::sqrt(sq.item<double>());
    if (!std::isfinite(norm))
      MOE_THROW(NumericError, "gradient norm is " << norm << ": lower train.lr or enable train.clip");
    if (clip > 0 && norm > clip) {
      const double s = clip / (norm + 1e-6);
      for (auto& g : groups_)
        if (g.grads.defined()) shard(g, g.grads).mul_(s);
    }
    return norm;
  }

  // LibTorch's AdamW (torch/csrc/api/src/optim/adamw.cpp), on the shard.
  void step(double lr) override {
    torch::NoGradGuard ng;
    ++step_;
    const double bias1 = 1 - std::pow(t_.beta1, double(step_));
    const double bias2 = 1 - std::pow(t_.beta2, double(step_));
    for (auto& g : groups_) {
      if (!g.params.defined()) continue;
      torch::Tensor p = shard(g, g.params), grad = shard(g, g.grads);
      if (t_.weight_decay != 0)
        for (const auto& [lo, n] : g.decay_ranges) p.narrow(0, lo, n).mul_(1 - lr * t_.weight_decay);
      g.m.mul_(t_.beta1).add_(grad, 1 - t_.beta1);
      g.v.mul_(t_.beta2).addcmul_(grad, grad, 1 - t_.beta2);
      torch::Tensor denom = (g.v.sqrt() / std::sqrt(bias2)).add_(kEps);
      p.addcdiv_(g.m, denom, -(lr / bias1));
      if (g.comm->size() > 1) g.comm->all_gather(p, g.params);
    }
  }

  int64_t adam_step() const override { return step_; }
  int64_t state_bytes() const override {
    int64_t b = 0;
    for (const auto& g : groups_)
      if (g.m.defined()) b += (g.m.numel() + g.v.numel()) * 4;
    return b;
  }
  bool sharded() const override { return true; }

  std::vector<MomentPiece> moments_to_save() const override {
    std::vector<MomentPiece> out;
    if (step_ == 0) return out;
    for (const auto& g : groups_)
      for_each_overlap(g, [&](const Unit& u, int64_t unit_from, int64_t shard_from, int64_t n) {
        out.push_back({u.key, unit_from, g.m.narrow(0, shard_from, n), g.v.narrow(0, shard_from, n)});
      });
    return out;
  }

  void load_moments(int64_t step, const MomentLookup& lookup) override {
    torch::NoGradGuard ng;
    step_ = step;
    for (auto& g : groups_)
      for_each_overlap(g, [&](const Unit& u, int64_t unit_from, int64_t shard_from, int64_t n) {
        torch::Tensor m, v;
        if (!lookup(u.key, u.numel, m, v)) return;  // none saved: starts from zero
        g.m.narrow(0, shard_from, n).copy_(m.narrow(0, unit_from, n));
        g.v.narrow(0, shard_from, n).copy_(v.narrow(0, unit_from, n));
      });
  }

 private:
  static constexpr double kEps = 1e-8;  // AdamWOptions' default, as ReplicatedAdamW uses
  struct Member {
    std::string name;
    torch::Tensor param;
    int64_t first_expert, slices;  // expert params: one unit per leading-dim slice
  };
  struct Unit {
    std::string key;
    int64_t offset, numel;  // in the flat buffer
  };
  struct FlatGroup {
    comm::Communicator* comm = nullptr;
    torch::Tensor params, grads;  // [G * shard] flat, padded with zeros
    torch::Tensor m, v;           // [shard]
    int64_t shard_begin = 0, shard_size = 0;
    std::vector<Unit> units;
    std::vector<std::pair<int64_t, int64_t>> decay_ranges;  // (start in shard, length)
  };

  static torch::Tensor shard(const FlatGroup& g, const torch::Tensor& flat) {
    return flat.narrow(0, g.shard_begin, g.shard_size);
  }

  // fn(unit, first element of the unit, first element of the shard, count) for
  // every unit overlapping this rank's shard.
  template <class Fn>
  static void for_each_overlap(const FlatGroup& g, const Fn& fn) {
    const int64_t lo = g.shard_begin, hi = g.shard_begin + g.shard_size;
    for (const auto& u : g.units) {
      const int64_t a = std::max(lo, u.offset), b = std::min(hi, u.offset + u.numel);
      if (a < b) fn(u, a - u.offset, a - lo, b - a);
    }
  }

  void build(FlatGroup& g, const std::vector<Member>& members, comm::Communicator& comm,
             bool expert) {
    g.comm = &comm;
    int64_t total = 0;
    for (const auto& mb : members) total += mb.param.numel();
    if (total == 0) return;
    const int64_t G = comm.size();
    g.shard_size = (total + G - 1) / G;
    g.shard_begin = comm.rank() * g.shard_size;
    const auto opts = members[0].param.options().dtype(torch::kFloat32);
    g.params = torch::zeros({g.shard_size * G}, opts);
    g.grads = torch::zeros({g.shard_size * G}, opts);
    g.m = torch::zeros({g.shard_size}, opts);
    g.v = torch::zeros({g.shard_size}, opts);
    int64_t off = 0;
    for (const auto& mb : members) {
      torch::Tensor p = mb.param;
      MOE_CHECK_T(ConfigError, p.scalar_type() == torch::kFloat32 && p.is_contiguous(),
                  "train.zero=1 needs float32 contiguous parameters; '" << mb.name << "' is "
                                                                      << p.scalar_type());
      const int64_t n = p.numel();
      torch::Tensor pv = g.params.narrow(0, off, n).view(p.sizes());
      pv.copy_(p);
      p.set_data(pv);  // the parameter now lives in the flat buffer
      p.mutable_grad() = g.grads.narrow(0, off, n).view(p.sizes());
      if (expert) {
        const int64_t per = n / mb.slices;
        for (int64_t le = 0; le < mb.slices; ++le)
          g.units.push_back({expert_unit_key(mb.name, mb.first_expert + le), off + le * per, per});
      } else {
        g.units.push_back({mb.name, off, n});
      }
      if (decays(p)) {
        const int64_t a = std::max(off, g.shard_begin);
        const int64_t b = std::min(off + n, g.shard_begin + g.shard_size);
        if (a < b) g.decay_ranges.emplace_back(a - g.shard_begin, b - a);
      }
      off += n;
    }
  }

  comm::ProcessMesh& mesh_;
  TrainConfig t_;
  FlatGroup groups_[2];  // replicated over the world, experts over the expert-DP group
  int64_t step_ = 0;
};

}  // namespace

std::unique_ptr<Optimizer> make_optimizer(TransformerLM& model, comm::ProcessMesh& mesh,
                                          const TrainConfig& t, double grad_bucket_mb) {
  if (t.zero == 1) return std::make_unique<ShardedAdamW>(model, mesh, t);
  return std::make_unique<ReplicatedAdamW>(model, mesh, t, grad_bucket_mb);
}

}  // namespace moe
