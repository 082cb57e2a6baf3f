#include "moe/comm/communicator.h"

#include <numeric>
#include <sstream>

#include "moe/core/error.h"

namespace moe::comm {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum:
      return "sum";
    case ReduceOp::Avg:
      return "avg";
    case ReduceOp::Max:
      return "max";
  }
  return "?";
}

bool supported_dtype(c10::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
    case torch::kFloat64:
    case torch::kBFloat16:
    case torch::kFloat16:
    case torch::kInt64:
    case torch::kInt32:
    case torch::kUInt8:
      return true;
    default:
      return false;
  }
}

int64_t row_bytes(const torch::Tensor& t) {
  int64_t n = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

std::string shape_str(const torch::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

std::string counts_str(const std::vector<int64_t>& v) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < v.size(); ++i) os << (i ? ", " : "") << v[i];
  os << "]";
  return os.str();
}

void Communicator::set_timeout_s(double seconds) {
  MOE_CHECK_T(ConfigError, seconds > 0 && seconds <= 1e7,
              "communicator timeout " << seconds << " s is out of range: allowed (0, 1e7]");
  timeout_s_ = seconds;
}

void Communicator::check_device(const torch::Tensor& t, const char* op, const char* arg) const {
  MOE_CHECK_T(ShapeError, t.device().is_cpu() || t.device().is_cuda(),
              op << ": " << arg << " is on " << t.device() << " but backend " << backend_name()
                 << " carries CPU and CUDA tensors only");
}

namespace {
void check_tensor(const Communicator& c, const torch::Tensor& t, const char* op, const char* arg) {
  MOE_CHECK_T(ShapeError, t.defined(), op << ": " << arg << " is an undefined tensor");
  MOE_CHECK_T(ShapeError, supported_dtype(t.scalar_type()),
              op << ": " << arg << " has dtype " << t.scalar_type()
                 << "; allowed float32, float64, bfloat16, float16, int64, int32, uint8");
  MOE_CHECK_T(ShapeError, t.is_contiguous(),
              op << ": " << arg << " of shape " << shape_str(t)
                 << " is not contiguous (call .contiguous())");
  MOE_CHECK_T(ShapeError, t.dim() >= 1,
              op << ": " << arg << " must have at least 1 dimension, got a scalar");
  (void)c;
}

void check_counts(const Communicator& c, const std::vector<int64_t>& counts, const char* op,
                  const char* arg) {
  MOE_CHECK_T(ShapeError, static_cast<int>(counts.size()) == c.size(),
              op << ": " << arg << " has " << counts.size() << " entries " << counts_str(counts)
                 << " but the communicator has " << c.size() << " ranks");
  for (size_t i = 0; i < counts.size(); ++i)
    MOE_CHECK_T(ShapeError, counts[i] >= 0,
                op << ": " << arg << "[" << i << "] = " << counts[i] << " is negative");
}
// Runs an in-place collective on `tensor`, staged through `dev` when the
// tensor lives elsewhere (see the header).
template <typename Fn>
void in_place_on(const torch::Device& dev, torch::Tensor& tensor, const Fn& collective) {
  if (tensor.device() == dev) {
    collective(tensor);
    return;
  }
  torch::Tensor staged = tensor.to(dev);
  collective(staged);
  tensor.copy_(staged);
}

}  // namespace

torch::Tensor Communicator::all_to_all(const torch::Tensor& input) {
  check_tensor(*this, input, "all_to_all", "input");
  check_device(input, "all_to_all", "input");
  MOE_CHECK_T(ShapeError, input.size(0) % size() == 0,
              "all_to_all: input dim 0 = " << input.size(0) << " (shape " << shape_str(input)
                                           << ") is not divisible by the world size " << size());
  std::vector<int64_t> rows(size(), input.size(0) / size());
  const torch::Device dev = data_device();
  if (input.device() == dev) {
    torch::Tensor out = make_output(input, rows);
    do_all_to_all_v(input, rows, rows, out, "all_to_all");
    return out;
  }
  torch::Tensor staged = input.to(dev);  // staging (see the header)
  torch::Tensor out = make_output(staged, rows);
  do_all_to_all_v(staged, rows, rows, out, "all_to_all");
  return out.to(input.device());
}

torch::Tensor Communicator::make_output(const torch::Tensor& input,
                                        const std::vector<int64_t>& recv_rows) {
  std::vector<int64_t> shape = input.sizes().vec();
  shape[0] = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
  return torch::empty(shape, input.options());
}

torch::Tensor Communicator::all_to_all_v(const torch::Tensor& input,
                                         const std::vector<int64_t>& send_rows,
                                         const std::vector<int64_t>& recv_rows, torch::Tensor out) {
  check_tensor(*this, input, "all_to_all_v", "input");
  check_device(input, "all_to_all_v", "input");
  check_counts(*this, send_rows, "all_to_all_v", "send_rows");
  check_counts(*this, recv_rows, "all_to_all_v", "recv_rows");
  int64_t total = std::accumulate(send_rows.begin(), send_rows.end(), int64_t{0});
  MOE_CHECK_T(ShapeError, total == input.size(0),
              "all_to_all_v: send_rows " << counts_str(send_rows) << " add up to " << total
                                         << " but input has " << input.size(0) << " rows (shape "
                                         << shape_str(input) << ")");
  if (out.defined()) {
    check_tensor(*this, out, "all_to_all_v", "out");
    check_device(out, "all_to_all_v", "out");
    std::vector<int64_t> want = input.sizes().vec();
    want[0] = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
    MOE_CHECK_T(ShapeError, out.sizes().vec() == want && out.scalar_type() == input.scalar_type(),
                "all_to_all_v: out has shape "
                    << shape_str(out) << " " << out.scalar_type() << " but recv_rows "
                    << counts_str(recv_rows) << " and input " << shape_str(input) << " "
                    << input.scalar_type() << " need [" << want[0] << ", ...] of "
                    << input.scalar_type());
    MOE_CHECK_T(ShapeError, out.device() == input.device(),
                "all_to_all_v: out is on " << out.device() << " but input is on "
                                           << input.device() << "; both must be on one device");
  }
  const torch::Device dev = data_device();
  if (input.device() == dev) {
    if (!out.defined()) out = make_output(input, recv_rows);
    do_all_to_all_v(input, send_rows, recv_rows, out, "all_to_all_v");
    return out;
  }
  // Staging (see the header): exchange on data_device(), copy back.
  torch::Tensor staged_in = input.to(dev);
  torch::Tensor staged_out = make_output(staged_in, recv_rows);
  do_all_to_all_v(staged_in, send_rows, recv_rows, staged_out, "all_to_all_v");
  if (out.defined()) {
    out.copy_(staged_out);
    return out;
  }
  return staged_out.to(input.device());
}

std::vector<int64_t> Communicator::exchange_counts(const std::vector<int64_t>& send_rows) {
  check_counts(*this, send_rows, "exchange_counts", "send_rows");
  auto sent = torch::tensor(send_rows, torch::kInt64).to(data_device());
  std::vector<int64_t> ones(size(), 1);
  auto got = make_output(sent, ones);
  do_all_to_all_v(sent, ones, ones, got, "exchange_counts");
  got = got.cpu();
  return std::vector<int64_t>(got.data_ptr<int64_t>(), got.data_ptr<int64_t>() + size());
}

void Communicator::all_reduce(torch::Tensor& tensor, ReduceOp op) {
  check_tensor(*this, tensor, "all_reduce", "tensor");
  check_device(tensor, "all_reduce", "tensor");
  in_place_on(data_device(), tensor, [&](torch::Tensor& t) { do_all_reduce(t, op); });
}

torch::Tensor Communicator::all_gather(const torch::Tensor& tensor, torch::Tensor out) {
  check_tensor(*this, tensor, "all_gather", "tensor");
  check_device(tensor, "all_gather", "tensor");
  if (out.defined()) {
    check_tensor(*this, out, "all_gather", "out");
    std::vector<int64_t> want = tensor.sizes().vec();
    want[0] *= size();
    MOE_CHECK_T(ShapeError,
                out.sizes().vec() == want && out.scalar_type() == tensor.scalar_type() &&
                    out.device() == tensor.device(),
                "all_gather: out is " << shape_str(out) << " " << out.scalar_type() << " on "
                                      << out.device() << " but " << size() << " ranks' "
                                      << shape_str(tensor) << " " << tensor.scalar_type()
                                      << " on " << tensor.device() << " need [" << want[0]
                                      << ", ...] of that dtype on that device");
  }
  const torch::Device dev = data_device();
  torch::Tensor gathered =
      tensor.device() == dev ? do_all_gather(tensor) : do_all_gather(tensor.to(dev));
  if (!out.defined()) return gathered.to(tensor.device());
  out.copy_(gathered);
  return out;
}

void Communicator::reduce_scatter(const torch::Tensor& input, torch::Tensor& out, ReduceOp op) {
  check_tensor(*this, input, "reduce_scatter", "input");
  check_device(input, "reduce_scatter", "input");
  check_tensor(*this, out, "reduce_scatter", "out");
  check_device(out, "reduce_scatter", "out");
  MOE_CHECK_T(ShapeError, input.size(0) % size() == 0,
              "reduce_scatter: input dim 0 = " << input.size(0) << " (shape " << shape_str(input)
                                               << ") is not divisible by the group size "
                                               << size());
  std::vector<int64_t> want = input.sizes().vec();
  want[0] /= size();
  MOE_CHECK_T(ShapeError,
              out.sizes().vec() == want && out.scalar_type() == input.scalar_type() &&
                  out.device() == input.device(),
              "reduce_scatter: out is " << shape_str(out) << " " << out.scalar_type() << " on "
                                        << out.device() << " but input " << shape_str(input)
                                        << " " << input.scalar_type() << " on " << input.device()
                                        << " over " << size() << " ranks needs [" << want[0]
                                        << ", ...] of that dtype on that device");
  const torch::Device dev = data_device();
  // A separate result buffer: `out` may alias `input`, which peers may still read.
  torch::Tensor staged_in = input.device() == dev ? input : input.to(dev);
  torch::Tensor result = torch::empty(want, staged_in.options());
  do_reduce_scatter(staged_in, result, op);
  out.copy_(result);
}

void Communicator::broadcast(torch::Tensor& tensor, int root) {
  check_tensor(*this, tensor, "broadcast", "tensor");
  check_device(tensor, "broadcast", "tensor");
  MOE_CHECK_T(
      ShapeError, root >= 0 && root < size(),
      "broadcast: root " << root << " is not a rank of this communicator (size " << size() << ")");
  in_place_on(data_device(), tensor, [&](torch::Tensor& t) { do_broadcast(t, root); });
}

void Communicator::barrier() {
  do_barrier();
}

std::unique_ptr<Communicator> Communicator::split(int color, int key) {
  MOE_CHECK_T(ShapeError, color >= 0, "split: color " << color << " must be >= 0");
  return do_split(color, key);
}

}  // namespace moe::comm
