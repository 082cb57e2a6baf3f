#include "moe/moe/functions.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <atomic>
#include <cstring>

#include "moe/core/error.h"
#include "moe/core/torch_version.h"
#include "moe/core/threads.h"
#include "moe/core/timer.h"

namespace moe {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const char* PhaseTimes::name(int phase) {
  static const char* names[] = {"router", "permute", "dispatch", "experts", "combine", "unpermute"};
  return phase >= 0 && phase < Count ? names[phase] : "?";
}

namespace {

std::atomic<int> g_row_kernel{static_cast<int>(RowKernel::Auto)};

// The CPU loops serve float32 CPU tensors (bf16 and other devices use gathers).
bool use_cpu_loops(const torch::Tensor& t) {
  return row_kernel() == RowKernel::Auto && t.device().is_cpu() &&
         t.scalar_type() == torch::kFloat32;
}

// Row indices with -1 (dropped / padding) mapped to `zero_row`, the index of
// an appended zero row: gathers then need no masking.
torch::Tensor or_zero_row(const torch::Tensor& idx, int64_t zero_row) {
  return torch::where(idx >= 0, idx, torch::full({}, zero_row, idx.options()));
}
torch::Tensor with_zero_row(const torch::Tensor& t) {
  return torch::cat({t, torch::zeros({1, t.size(1)}, t.options())});
}

// ---- generic (gather) kernels, any device ------------------------------------------

torch::Tensor permute_gather(const torch::Tensor& x, const torch::Tensor& row_token) {
  return with_zero_row(x).index_select(0, or_zero_row(row_token, x.size(0)));
}

// grad_x[t] = sum_j grad_send[row(t, j)], j in order.
torch::Tensor permute_backward_gather(const torch::Tensor& g, const torch::Tensor& slot_row,
                                      int64_t k) {
  const int64_t T = slot_row.size(0) / k;
  torch::Tensor rows = or_zero_row(slot_row, g.size(0)).view({T, k});
  torch::Tensor ge = with_zero_row(g);
  torch::Tensor gx = ge.index_select(0, rows.select(1, 0));
  for (int64_t j = 1; j < k; ++j) gx.add_(ge.index_select(0, rows.select(1, j)));
  return gx;
}

// y[t] = sum_j gate[t, j] * back[row(t, j)], in gate's dtype, j in order.
torch::Tensor unpermute_gather(const torch::Tensor& back, const torch::Tensor& gate,
                               const torch::Tensor& slot_row) {
  const int64_t T = gate.size(0), k = gate.size(1);
  torch::Tensor rows = or_zero_row(slot_row, back.size(0)).view({T, k});
  torch::Tensor be = with_zero_row(back);
  torch::Tensor y;
  for (int64_t j = 0; j < k; ++j) {
    torch::Tensor term =
        be.index_select(0, rows.select(1, j)).to(gate.scalar_type()) * gate.select(1, j).unsqueeze(1);
    y = j == 0 ? term : y.add_(term);
  }
  return y.to(back.scalar_type());
}

// grad_back[r] = gate[slot(r)] * gy[token(r)] (zero for padding rows);
// grad_gate[t, j] = <gy[t], back[row(t, j)]> (zero for dropped slots).
std::pair<torch::Tensor, torch::Tensor> unpermute_backward_gather(
    const torch::Tensor& gy, const torch::Tensor& back, const torch::Tensor& gate,
    const torch::Tensor& slot_row, const torch::Tensor& row_token, const torch::Tensor& row_slot) {
  const int64_t T = gate.size(0), k = gate.size(1);
  const auto wdt = gate.scalar_type();
  torch::Tensor gye = with_zero_row(gy.to(wdt));
  torch::Tensor gate_e = torch::cat({gate.reshape({T * k}), torch::zeros({1}, gate.options())});
  torch::Tensor gb = (gye.index_select(0, or_zero_row(row_token, T)) *
                      gate_e.index_select(0, or_zero_row(row_slot, T * k)).unsqueeze(1))
                         .to(back.scalar_type());
  torch::Tensor rows = or_zero_row(slot_row, back.size(0)).view({T, k});
  torch::Tensor be = with_zero_row(back);
  torch::Tensor gyw = gy.to(wdt);
  std::vector<torch::Tensor> cols;
  for (int64_t j = 0; j < k; ++j)
    cols.push_back((be.index_select(0, rows.select(1, j)).to(wdt) * gyw).sum(1));
  return {gb, torch::stack(cols, 1)};
}

PhaseTimes* times_of(AutogradContext* ctx) {
  return reinterpret_cast<PhaseTimes*>(ctx->saved_data["times"].toInt());
}
int64_t ptr_int(const void* p) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(p));
}

// ---- permute ---------------------------------------------------------------------

struct PermuteFn : public torch::autograd::Function<PermuteFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& row_token, const torch::Tensor& slot_row,
                               int64_t top_k, int64_t times) {
    Stopwatch sw;
    ctx->save_for_backward({slot_row});
    ctx->saved_data["k"] = top_k;
    ctx->saved_data["times"] = times;
    if (!use_cpu_loops(x)) {
      torch::Tensor out = permute_gather(x, row_token);
      if (auto* t = reinterpret_cast<PhaseTimes*>(times))
        t->forward[PhaseTimes::Permute] += sw.seconds();
      return out;
    }
    const int64_t rows = row_token.size(0), D = x.size(1);
    torch::Tensor out = torch::empty({rows, D}, x.options());
    const int64_t* tok = row_token.data_ptr<int64_t>();
    const size_t bytes = D * x.element_size();
    const char* src = static_cast<const char*>(x.data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    parallel_ranges(rows, 4096, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        if (tok[r] >= 0)
          std::memcpy(dst + r * bytes, src + tok[r] * bytes, bytes);
        else
          std::memset(dst + r * bytes, 0, bytes);
      }
    });
    if (auto* t = reinterpret_cast<PhaseTimes*>(times))
      t->forward[PhaseTimes::Permute] += sw.seconds();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Stopwatch sw;
    torch::Tensor slot_row = ctx->get_saved_variables()[0];
    const int64_t k = ctx->saved_data["k"].toInt();
    torch::Tensor g = grads[0].contiguous();
    if (!use_cpu_loops(g)) {
      torch::Tensor gx = permute_backward_gather(g, slot_row, k);
      if (auto* t = times_of(ctx)) t->backward[PhaseTimes::Permute] += sw.seconds();
      return {gx, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
    const int64_t S = slot_row.size(0), T = S / k, D = g.size(1);
    torch::Tensor gx = torch::empty({T, D}, g.options());
    const int64_t* row = slot_row.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "permute_backward", [&] {
          const scalar_t* gp = g.data_ptr<scalar_t>();
          scalar_t* out = gx.data_ptr<scalar_t>();
          parallel_ranges(T, 1024, [&](int64_t lo, int64_t hi) {
            for (int64_t t = lo; t < hi; ++t) {
              scalar_t* dst = out + t * D;
              bool first = true;
              for (int64_t j = 0; j < k; ++j) {
                int64_t r = row[t * k + j];
                if (r < 0) continue;
                const scalar_t* src = gp + r * D;
                if (first) {
                  std::memcpy(dst, src, D * sizeof(scalar_t));
                  first = false;
                } else {
                  for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
                }
              }
              if (first) std::memset(dst, 0, D * sizeof(scalar_t));  // every slot dropped
            }
          });
        });
    if (auto* t = times_of(ctx)) t->backward[PhaseTimes::Permute] += sw.seconds();
    return {gx, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// ---- unpermute ---------------------------------------------------------------------

struct UnpermuteFn : public torch::autograd::Function<UnpermuteFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& back,
                               const torch::Tensor& gate, const torch::Tensor& slot_row,
                               const torch::Tensor& row_token, const torch::Tensor& row_slot,
                               int64_t times) {
    Stopwatch sw;
    torch::Tensor b = back.contiguous(), w = gate.contiguous();
    ctx->save_for_backward({b, w, slot_row, row_token, row_slot});
    ctx->saved_data["times"] = times;
    if (!use_cpu_loops(b) || w.scalar_type() != b.scalar_type()) {
      torch::Tensor y = unpermute_gather(b, w, slot_row);
      if (auto* t = reinterpret_cast<PhaseTimes*>(times))
        t->forward[PhaseTimes::Unpermute] += sw.seconds();
      return y;
    }
    const int64_t T = w.size(0), k = w.size(1), D = b.size(1);
    torch::Tensor y = torch::empty({T, D}, b.options());
    const int64_t* row = slot_row.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "unpermute_forward", [&] {
          const scalar_t* bp = b.data_ptr<scalar_t>();
          torch::Tensor wc = w.to(b.scalar_type());
          const scalar_t* wp = wc.data_ptr<scalar_t>();
          scalar_t* yp = y.data_ptr<scalar_t>();
          parallel_ranges(T, 1024, [&](int64_t lo, int64_t hi) {
            for (int64_t t = lo; t < hi; ++t) {
              scalar_t* dst = yp + t * D;
              bool first = true;
              for (int64_t j = 0; j < k; ++j) {
                int64_t r = row[t * k + j];
                if (r < 0) continue;
                const scalar_t wt = wp[t * k + j];
                const scalar_t* src = bp + r * D;
                if (first) {
                  for (int64_t d = 0; d < D; ++d) dst[d] = wt * src[d];
                  first = false;
                } else {
                  for (int64_t d = 0; d < D; ++d) dst[d] += wt * src[d];
                }
              }
              if (first)
                std::memset(dst, 0,
                            D * sizeof(scalar_t));  // every slot dropped: the residual carries it
            }
          });
        });
    if (auto* t = reinterpret_cast<PhaseTimes*>(times))
      t->forward[PhaseTimes::Unpermute] += sw.seconds();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Stopwatch sw;
    auto saved = ctx->get_saved_variables();
    torch::Tensor b = saved[0], w = saved[1], slot_row = saved[2], row_token = saved[3],
                  row_slot = saved[4];
    torch::Tensor gy = grads[0].contiguous();
    if (!use_cpu_loops(b) || w.scalar_type() != b.scalar_type()) {
      auto [gb, gw] = unpermute_backward_gather(gy, b, w, slot_row, row_token, row_slot);
      if (auto* t = times_of(ctx)) t->backward[PhaseTimes::Unpermute] += sw.seconds();
      return {gb, gw, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    }
    const int64_t T = w.size(0), k = w.size(1), D = b.size(1), R = b.size(0);
    // Every row belongs to one kept slot, except padding rows: they get zero gradient.
    torch::Tensor gb = torch::empty({R, D}, b.options());
    torch::Tensor gw = torch::zeros({T, k}, b.options());
    const int64_t* row = slot_row.data_ptr<int64_t>();
    const int64_t* tok = row_token.data_ptr<int64_t>();
    char* gbytes = static_cast<char*>(gb.data_ptr());
    const size_t row_size = D * gb.element_size();
    for (int64_t r = 0; r < R; ++r)
      if (tok[r] < 0) std::memset(gbytes + r * row_size, 0, row_size);
    AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "unpermute_backward", [&] {
          const scalar_t* bp = b.data_ptr<scalar_t>();
          const scalar_t* gyp = gy.data_ptr<scalar_t>();
          torch::Tensor wc = w.to(b.scalar_type());
          const scalar_t* wp = wc.data_ptr<scalar_t>();
          scalar_t* gbp = gb.data_ptr<scalar_t>();
          scalar_t* gwp = gw.data_ptr<scalar_t>();
          parallel_ranges(T, 1024, [&](int64_t lo, int64_t hi) {
            for (int64_t t = lo; t < hi; ++t)
              for (int64_t j = 0; j < k; ++j) {
                int64_t r = row[t * k + j];
                if (r < 0) continue;
                const scalar_t wt = wp[t * k + j];
                const scalar_t* g = gyp + t * D;
                const scalar_t* src = bp + r * D;
                scalar_t* dst = gbp + r * D;
                float dot = 0;
                _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < D; ++d) {
                  dst[d] = wt * g[d];
                  dot += static_cast<float>(g[d]) * static_cast<float>(src[d]);
                }
                gwp[t * k + j] = dot;
              }
          });
        });
    if (auto* t = times_of(ctx)) t->backward[PhaseTimes::Unpermute] += sw.seconds();
    return {gb, gw.to(w.scalar_type()), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

// ---- all-to-all ----------------------------------------------------------------------

struct AllToAllFn : public torch::autograd::Function<AllToAllFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               std::vector<int64_t> send, std::vector<int64_t> recv, int64_t comm,
                               int64_t times, int64_t phase) {
    Stopwatch sw;
    ctx->saved_data["send"] = send;
    ctx->saved_data["recv"] = recv;
    ctx->saved_data["comm"] = comm;
    ctx->saved_data["times"] = times;
    ctx->saved_data["phase"] = phase;
    auto* c = reinterpret_cast<comm::Communicator*>(comm);
    torch::Tensor out = c->all_to_all_v(x.contiguous(), send, recv);
    if (auto* t = reinterpret_cast<PhaseTimes*>(times)) t->forward[phase] += sw.seconds();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Stopwatch sw;
    auto send = ctx->saved_data["send"].toIntVector();
    auto recv = ctx->saved_data["recv"].toIntVector();
    auto* c = reinterpret_cast<comm::Communicator*>(ctx->saved_data["comm"].toInt());
    torch::Tensor g = c->all_to_all_v(grads[0].contiguous(), recv, send);
    if (auto* t = times_of(ctx)) t->backward[ctx->saved_data["phase"].toInt()] += sw.seconds();
    return {g, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

// ---- expert MLPs -----------------------------------------------------------------------

// Zeroes the rows of t that no segment covers.
void zero_gaps(torch::Tensor& t, const torch::Tensor& seg) {
  const int64_t n = seg.size(0), R = t.size(0);
  std::vector<std::pair<int64_t, int64_t>> spans;
  const int64_t* s = seg.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (s[3 * i + 2] > 0) spans.emplace_back(s[3 * i + 1], s[3 * i + 1] + s[3 * i + 2]);
  std::sort(spans.begin(), spans.end());
  int64_t at_row = 0;
  for (auto& sp : spans) {
    if (sp.first > at_row) t.narrow(0, at_row, sp.first - at_row).zero_();
    at_row = std::max(at_row, sp.second);
  }
  if (at_row < R) t.narrow(0, at_row, R - at_row).zero_();
}

torch::Tensor dsilu(const torch::Tensor& a) {
  torch::Tensor s = torch::sigmoid(a);
  return s * (1 + a * (1 - s));
}

struct ExpertMlpFn : public torch::autograd::Function<ExpertMlpFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w1, const torch::Tensor& w3,
                               const torch::Tensor& w2, const torch::Tensor& seg, bool swiglu,
                               int64_t times) {
    Stopwatch sw;
    const int64_t R = x.size(0), H = w1.size(2), D = w2.size(2);
    torch::Tensor A = torch::empty({R, H}, x.options());
    torch::Tensor B = swiglu ? torch::empty({R, H}, x.options()) : torch::Tensor();
    torch::Tensor Y = torch::empty({R, D}, x.options());
    const int64_t* s = seg.data_ptr<int64_t>();
    for (int64_t i = 0; i < seg.size(0); ++i) {
      const int64_t e = s[3 * i], start = s[3 * i + 1], n = s[3 * i + 2];
      if (n == 0) continue;
      torch::Tensor xs = x.narrow(0, start, n);
      torch::Tensor a = A.narrow(0, start, n);
      torch::Tensor y = Y.narrow(0, start, n);
      at::mm_out(a, xs, w1[e]);
      if (swiglu) {
        torch::Tensor b = B.narrow(0, start, n);
        at::mm_out(b, xs, w3[e]);
        at::mm_out(y, torch::silu(a).mul_(b), w2[e]);
      } else {
        at::mm_out(y, torch::gelu(a), w2[e]);
      }
    }
    zero_gaps(Y, seg);
    ctx->save_for_backward({x, w1, w3, w2, seg, A, swiglu ? B : A});
    ctx->saved_data["swiglu"] = swiglu;
    ctx->saved_data["times"] = times;
    if (auto* t = reinterpret_cast<PhaseTimes*>(times))
      t->forward[PhaseTimes::Experts] += sw.seconds();
    return Y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Stopwatch sw;
    auto saved = ctx->get_saved_variables();
    torch::Tensor x = saved[0], w1 = saved[1], w3 = saved[2], w2 = saved[3], seg = saved[4],
                  A = saved[5], B = saved[6];
    const bool swiglu = ctx->saved_data["swiglu"].toBool();
    torch::Tensor gy_all = grads[0].contiguous();
    torch::Tensor gx = torch::empty_like(x);
    torch::Tensor gw1 = torch::zeros_like(w1), gw2 = torch::zeros_like(w2);
    torch::Tensor gw3 = swiglu ? torch::zeros_like(w3) : torch::Tensor();
    const int64_t* s = seg.data_ptr<int64_t>();
    for (int64_t i = 0; i < seg.size(0); ++i) {
      const int64_t e = s[3 * i], start = s[3 * i + 1], n = s[3 * i + 2];
      if (n == 0) continue;
      torch::Tensor xs = x.narrow(0, start, n), gy = gy_all.narrow(0, start, n),
                    a = A.narrow(0, start, n);
      torch::Tensor gxs = gx.narrow(0, start, n);
      if (swiglu) {
        torch::Tensor b = B.narrow(0, start, n);
        torch::Tensor sa = torch::silu(a);
        torch::Tensor h = sa * b;
        gw2[e].addmm_(h.t(), gy);
        torch::Tensor gh = torch::mm(gy, w2[e].t());
        torch::Tensor gb = gh * sa;
        torch::Tensor ga = gh.mul_(b).mul_(dsilu(a));
        at::mm_out(gxs, ga, w1[e].t());
        gxs.addmm_(gb, w3[e].t());
        gw1[e].addmm_(xs.t(), ga);
        gw3[e].addmm_(xs.t(), gb);
      } else {
        torch::Tensor h = torch::gelu(a);
        gw2[e].addmm_(h.t(), gy);
        torch::Tensor gh = torch::mm(gy, w2[e].t());
        torch::Tensor ga = torch::gelu_backward(gh, a);
        at::mm_out(gxs, ga, w1[e].t());
        gw1[e].addmm_(xs.t(), ga);
      }
    }
    zero_gaps(gx, seg);
    if (auto* t = times_of(ctx)) t->backward[PhaseTimes::Experts] += sw.seconds();
    return {gx, gw1, gw3, gw2, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor permute_tokens(const torch::Tensor& x, const DispatchPlan& plan, PhaseTimes* times) {
  MOE_CHECK_T(ShapeError, x.dim() == 2 && x.size(0) == plan.tokens,
              "permute: x has " << (x.dim() ? x.size(0) : 0) << " rows but the plan has "
                                << plan.tokens << " tokens");
  return PermuteFn::apply(x.contiguous(), plan.row_token, plan.slot_row, plan.top_k,
                          ptr_int(times));
}

torch::Tensor unpermute_tokens(const torch::Tensor& back, const torch::Tensor& gate,
                               const DispatchPlan& plan, PhaseTimes* times) {
  MOE_CHECK_T(ShapeError, back.dim() == 2 && back.size(0) == plan.send_rows,
              "unpermute: expert output has " << (back.dim() ? back.size(0) : 0)
                                              << " rows, the plan sent " << plan.send_rows);
  MOE_CHECK_T(ShapeError,
              gate.dim() == 2 && gate.size(0) == plan.tokens && gate.size(1) == plan.top_k,
              "unpermute: gate must be [" << plan.tokens << ", " << plan.top_k << "]");
  return UnpermuteFn::apply(back, gate, plan.slot_row, plan.row_token, plan.row_slot,
                            ptr_int(times));
}

torch::Tensor all_to_all_autograd(const torch::Tensor& x, const std::vector<int64_t>& send_rows,
                                  const std::vector<int64_t>& recv_rows, comm::Communicator& comm,
                                  PhaseTimes* times, int phase) {
  return AllToAllFn::apply(x, send_rows, recv_rows, ptr_int(&comm), ptr_int(times),
                           static_cast<int64_t>(phase));
}

void set_row_kernel(RowKernel kernel) {
  g_row_kernel = static_cast<int>(kernel);
}
RowKernel row_kernel() {
  return static_cast<RowKernel>(g_row_kernel.load());
}

bool grouped_mm_available(const torch::Tensor& x) {
#if MOE_HAVE_GROUPED_MM
  return x.is_cuda() && x.scalar_type() == torch::kBFloat16;
#else
  (void)x;
  return false;
#endif
}

namespace {

#if MOE_HAVE_GROUPED_MM
// Rows grouped by local expert (each group padded to a multiple of 16 rows,
// which the bf16 grouped GEMM wants), one at::_grouped_mm per weight over
// int32 group ends, then scattered back; autograd differentiates
// _grouped_mm. Rows outside every segment map to the zero row.
torch::Tensor expert_mlp_grouped(const torch::Tensor& x, const torch::Tensor& w1,
                                 const torch::Tensor& w3, const torch::Tensor& w2,
                                 const std::vector<ExpertSegment>& segments, bool swiglu) {
  const int64_t R = x.size(0), EL = w1.size(0);
  constexpr int64_t kAlign = 16;
  std::vector<std::vector<const ExpertSegment*>> by_expert(EL);
  for (const auto& g : segments) by_expert[g.expert].push_back(&g);
  std::vector<int64_t> gather;  // sorted position -> row of x (R = the zero row)
  std::vector<int64_t> place(R, -1);  // row of x -> sorted position
  std::vector<int32_t> ends;
  for (int64_t e = 0; e < EL; ++e) {
    for (const auto* g : by_expert[e])
      for (int64_t r = g->start; r < g->start + g->rows; ++r) {
        place[r] = static_cast<int64_t>(gather.size());
        gather.push_back(r);
      }
    while (gather.size() % kAlign) gather.push_back(R);
    ends.push_back(static_cast<int32_t>(gather.size()));
  }
  const int64_t M = static_cast<int64_t>(gather.size());
  for (auto& p : place) p = p < 0 ? M : p;  // uncovered rows read the zero row
  auto on = [&](auto& v, auto dtype) {
    return torch::tensor(v, torch::TensorOptions().dtype(dtype)).to(x.device(), /*non_blocking=*/true);
  };
  torch::Tensor gather_t = on(gather, torch::kInt64), place_t = on(place, torch::kInt64);
  torch::Tensor offs = on(ends, torch::kInt32);
  torch::Tensor xs = with_zero_row(x).index_select(0, gather_t);  // [M, D]
  torch::Tensor a = at::_grouped_mm(xs, w1, offs);
  torch::Tensor h = swiglu ? torch::silu(a) * at::_grouped_mm(xs, w3, offs) : torch::gelu(a);
  torch::Tensor ys = at::_grouped_mm(h, w2, offs);  // [M, D]
  return with_zero_row(ys).index_select(0, place_t);
}
#endif

}  // namespace

torch::Tensor expert_mlp(const torch::Tensor& x, const torch::Tensor& w1, const torch::Tensor& w3,
                         const torch::Tensor& w2, const std::vector<ExpertSegment>& segments,
                         bool swiglu, PhaseTimes* times, ExpertKernel kernel) {
  MOE_CHECK_T(ShapeError, x.dim() == 2 && w1.dim() == 3 && x.size(1) == w1.size(1),
              "expert_mlp: input hidden size " << (x.dim() == 2 ? x.size(1) : -1)
                                               << " does not match the experts' d_model "
                                               << (w1.dim() == 3 ? w1.size(1) : -1));
  MOE_CHECK_T(ShapeError, w1.device() == x.device() && w2.device() == x.device(),
              "expert_mlp: input on " << x.device() << " but weights on " << w1.device());
  torch::Tensor seg = torch::empty({static_cast<int64_t>(segments.size()), 3}, torch::kInt64);
  int64_t* s = seg.data_ptr<int64_t>();
  for (size_t i = 0; i < segments.size(); ++i) {
    const auto& g = segments[i];
    MOE_CHECK_T(ShapeError,
                g.expert >= 0 && g.expert < w1.size(0) && g.start >= 0 && g.rows >= 0 &&
                    g.start + g.rows <= x.size(0),
                "expert_mlp: segment " << i << " (expert " << g.expert << ", rows " << g.start
                                       << ".." << g.start + g.rows << ") is outside " << w1.size(0)
                                       << " experts / " << x.size(0) << " rows");
    s[3 * i] = g.expert;
    s[3 * i + 1] = g.start;
    s[3 * i + 2] = g.rows;
  }
  if (kernel == ExpertKernel::GroupedMm)
    MOE_CHECK_T(ConfigError, grouped_mm_available(x),
                "expert_mlp: the grouped GEMM needs bf16 CUDA tensors and LibTorch >= 2.9 built "
                "with CUDA; got " << x.scalar_type() << " on " << x.device());
#if MOE_HAVE_GROUPED_MM
  if (kernel != ExpertKernel::SegmentMm && grouped_mm_available(x)) {
    Stopwatch sw;
    torch::Tensor y = expert_mlp_grouped(x, w1, w3, w2, segments, swiglu);
    if (times) times->forward[PhaseTimes::Experts] += sw.seconds();
    return y;
  }
#endif
  return ExpertMlpFn::apply(x.contiguous(), w1, w3.defined() ? w3 : w1, w2, seg, swiglu,
                            ptr_int(times));
}

}  // namespace moe
