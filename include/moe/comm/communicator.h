// The communication layer: one Communicator interface over LibTorch tensors,
// implemented by ThreadComm (ranks as threads), MpiComm and NcclComm.
//
// Public methods check their arguments (ShapeError naming the argument and
// its values) before anything is sent, then call the backend's do_* method.
// Every collective is bounded by the timeout: a peer that died, threw,
// stalled or sent a different size gives CommError on every live rank, naming
// the rank and the operation, never a hang.
//
// Devices: each backend moves data on one device, data_device() (CPU for
// ThreadComm and MpiComm, the rank's GPU for NcclComm). Tensors on another
// device (CUDA tensors on ThreadComm/MpiComm, the CPU control-plane tensors
// on NcclComm) are staged here, in the public methods: copied to
// data_device(), exchanged, and the result copied back to the caller's
// device. So `--ranks N` and `mpirun -np N` carry CUDA tensors (several ranks
// may share one GPU), at the price of one device<->host copy each way.
#pragma once
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

namespace moe::comm {

enum class ReduceOp { Sum, Avg, Max };
const char* reduce_op_name(ReduceOp op);

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend_name() const = 0;
  // The device the backend's data plane works on; tensors elsewhere are staged.
  virtual torch::Device data_device() const { return torch::Device(torch::kCPU); }
  // Seconds a collective may wait for its peers before raising CommError.
  double timeout_s() const { return timeout_s_; }
  void set_timeout_s(double seconds);

  // Equal splits: input [size*n, ...]; row block i goes to peer i; the result
  // has the same shape, block j coming from peer j.
  torch::Tensor all_to_all(const torch::Tensor& input);
  // Per-peer row counts: send_rows[i] rows (in order) go to peer i;
  // recv_rows[j] rows are expected from peer j. Zero rows are allowed.
  // `out`, when given, receives the rows (contiguous, [sum(recv_rows), ...]
  // with input's trailing shape and dtype) and is returned; otherwise a new
  // tensor is allocated.
  torch::Tensor all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                             const std::vector<int64_t>& recv_rows, torch::Tensor out = {});
  // Control plane: every rank's send counts -> this rank's receive counts.
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_rows);
  // In place over all ranks. Results are bitwise identical on every rank.
  void all_reduce(torch::Tensor& tensor, ReduceOp op = ReduceOp::Sum);
  // Concatenation along dim 0 of every rank's tensor (same shape on all ranks).
  // `out`, when given ([size*n, ...], contiguous, tensor's dtype and device),
  // receives it and is returned; `tensor` may be a view into `out` (the
  // distributed optimizer gathers each rank's shard into the flat buffer).
  torch::Tensor all_gather(const torch::Tensor& tensor, torch::Tensor out = {});
  // input [size*n, ...] on every rank: block r (rows r*n .. r*n+n) reduced
  // over all ranks lands in rank r's `out` [n, ...]. Each block is reduced
  // with the arithmetic all_reduce uses for it. `out` may be a view into
  // `input` (its own block).
  void reduce_scatter(const torch::Tensor& input, torch::Tensor& out,
                      ReduceOp op = ReduceOp::Sum);
  // In place: root's tensor is copied to every rank.
  void broadcast(torch::Tensor& tensor, int root);
  void barrier();
  // Ranks with the same color form a new communicator, ordered by (key, rank).
  // Collective over this communicator.
  std::unique_ptr<Communicator> split(int color, int key);
  // Makes every pending and future collective on every rank fail with
  // CommError carrying `reason`.
  virtual void abort(const std::string& reason) = 0;

 protected:
  // `out` is allocated and checked by the caller.
  virtual void do_all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                               const std::vector<int64_t>& recv_rows, torch::Tensor& out,
                               const char* op) = 0;
  // A new output tensor for all_to_all_v.
  static torch::Tensor make_output(const torch::Tensor& input,
                                   const std::vector<int64_t>& recv_rows);
  virtual void do_all_reduce(torch::Tensor& tensor, ReduceOp op) = 0;
  virtual torch::Tensor do_all_gather(const torch::Tensor& tensor) = 0;
  // `out` is [n, ...] with input's dtype on data_device(), checked by the caller.
  virtual void do_reduce_scatter(const torch::Tensor& input, torch::Tensor& out, ReduceOp op) = 0;
  virtual void do_broadcast(torch::Tensor& tensor, int root) = 0;
  virtual void do_barrier() = 0;
  virtual std::unique_ptr<Communicator> do_split(int color, int key) = 0;
  // Which devices a caller may pass (default: CPU and CUDA, staged as needed;
  // NCCL refuses a GPU other than its own). ShapeError naming the argument.
  virtual void check_device(const torch::Tensor& t, const char* op, const char* arg) const;

  double timeout_s_ = 60.0;
};

// dtypes the data plane carries: float32, float64, bfloat16, float16, int64, int32, uint8.
bool supported_dtype(c10::ScalarType t);
// Bytes per row (product of trailing dims times element size).
int64_t row_bytes(const torch::Tensor& t);
std::string shape_str(const torch::Tensor& t);
std::string counts_str(const std::vector<int64_t>& v);

}  // namespace moe::comm
