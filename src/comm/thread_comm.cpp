#include "moe/comm/thread_comm.h"

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "moe/core/error.h"
#include "moe/core/log.h"
#include "moe/core/threads.h"

namespace moe::comm {

// What a rank publishes for one collective.
struct ThreadComm::Post {
  const char* op = "";
  torch::Tensor tensor;
  std::vector<int64_t> send_rows, recv_rows;
  int root = 0, color = 0, key = 0;
  ReduceOp reduce = ReduceOp::Sum;
};

struct ThreadGroup {
  struct Slot {
    uint64_t posted = 0;    // sequence number last posted
    uint64_t departed = 0;  // sequence number last finished
    ThreadComm::Post* post = nullptr;
  };
  std::vector<int> world_ranks;  // group rank -> world rank
  std::vector<Slot> slots;
  std::map<std::pair<uint64_t, int>, std::shared_ptr<ThreadGroup>> children;  // (split seq, color)
  ~ThreadGroup() {
    for (auto& s : slots) delete s.post;
  }
};

struct ThreadWorld {
  std::mutex mu;
  std::condition_variable cv;
  bool aborted = false;
  std::string abort_reason;
  std::vector<bool> exited;
};

namespace {
using Clock = std::chrono::steady_clock;

Clock::time_point deadline_after(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// all_reduce and reduce_scatter: why the peers' posts disagree with ours in
// shape, dtype or reduce op ("" when they agree).
std::string reduce_disagreement(const ThreadGroup& g, int me, const torch::Tensor& mine,
                                ReduceOp reduce, const char* op, uint64_t seq) {
  for (size_t src = 0; src < g.slots.size(); ++src) {
    const ThreadComm::Post* p = g.slots[src].post;
    if (p->tensor.sizes().equals(mine.sizes()) && p->tensor.scalar_type() == mine.scalar_type() &&
        p->reduce == reduce)
      continue;
    std::ostringstream why;
    why << "rank " << g.world_ranks[src] << " sent shape " << shape_str(p->tensor) << " "
        << p->tensor.scalar_type() << " (" << reduce_op_name(p->reduce) << "), rank "
        << g.world_ranks[me] << " expected " << shape_str(mine) << " " << mine.scalar_type()
        << " (" << reduce_op_name(reduce) << ") (" << op << " #" << seq << ")";
    return why.str();
  }
  return "";
}

// Rows [first, first + rows) of every posted tensor, reduced in rank order
// with the same arithmetic on every rank: identical bits everywhere
// (bf16/fp16 accumulate in float32).
torch::Tensor reduce_in_rank_order(const ThreadGroup& g, ReduceOp reduce, int64_t first,
                                   int64_t rows) {
  const int n = static_cast<int>(g.slots.size());
  auto part = [&](int src) {
    torch::Tensor t = g.slots[src].post->tensor.narrow(0, first, rows);
    const bool low_precision =
        t.scalar_type() == torch::kBFloat16 || t.scalar_type() == torch::kFloat16;
    return low_precision ? t.to(torch::kFloat32) : t;
  };
  torch::Tensor acc = part(0).clone();
  for (int src = 1; src < n; ++src) {
    if (reduce == ReduceOp::Max)
      acc = torch::maximum(acc, part(src));
    else
      acc.add_(part(src));
  }
  if (reduce == ReduceOp::Avg) {
    if (acc.is_floating_point())
      acc.div_(n);
    else
      acc = acc.div(n, "floor");
  }
  return acc;
}
}  // namespace

std::vector<std::unique_ptr<ThreadComm>> ThreadComm::create_world(int n, double timeout_s) {
  MOE_CHECK_T(ConfigError, n >= 1 && n <= 4096,
              "thread world size " << n << " must be in [1, 4096]");
  auto world = std::make_shared<ThreadWorld>();
  world->exited.assign(n, false);
  auto group = std::make_shared<ThreadGroup>();
  group->slots.resize(n);
  for (int i = 0; i < n; ++i) group->world_ranks.push_back(i);
  std::vector<std::unique_ptr<ThreadComm>> comms;
  for (int i = 0; i < n; ++i)
    comms.push_back(std::make_unique<ThreadComm>(world, group, i, timeout_s));
  return comms;
}

ThreadComm::ThreadComm(std::shared_ptr<ThreadWorld> world, std::shared_ptr<ThreadGroup> group,
                       int rank, double timeout_s)
    : world_(std::move(world)), group_(std::move(group)), rank_(rank) {
  set_timeout_s(timeout_s);
}

ThreadComm::~ThreadComm() = default;

int ThreadComm::size() const {
  return static_cast<int>(group_->world_ranks.size());
}

void ThreadComm::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(world_->mu);
  if (!world_->aborted) {
    world_->aborted = true;
    world_->abort_reason = reason;
  }
  world_->cv.notify_all();
}

void ThreadComm::mark_exited() {
  std::lock_guard<std::mutex> lock(world_->mu);
  world_->exited[group_->world_ranks[rank_]] = true;
  world_->cv.notify_all();
}

void ThreadComm::fail(const std::string& reason) {
  abort(reason);
  MOE_THROW(CommError, reason);
}

uint64_t ThreadComm::arrive(Post post) {
  const uint64_t seq = ++seq_;
  const char* op = post.op;
  std::unique_lock<std::mutex> lock(world_->mu);
  if (world_->aborted)
    MOE_THROW(CommError,
              op << " #" << seq << " refused: the world was aborted: " << world_->abort_reason);
  auto* owned = new Post(std::move(post));
  auto& me = group_->slots[rank_];
  delete me.post;  // the previous collective's post: every peer departed from it
  me.post = owned;
  me.posted = seq;
  world_->cv.notify_all();

  int missing = -1;
  // Scans every slot: a peer that exited fails us at once even when a lower
  // slot is merely slow (missing = the exited one, else the first missing).
  auto all_posted = [&] {
    if (world_->aborted) return true;
    missing = -1;
    for (size_t i = 0; i < group_->slots.size(); ++i)
      if (group_->slots[i].posted < seq) {
        if (world_->exited[group_->world_ranks[i]]) {
          missing = static_cast<int>(i);
          return true;
        }
        if (missing < 0) missing = static_cast<int>(i);
      }
    return missing < 0;
  };
  bool ok = world_->cv.wait_until(lock, deadline_after(timeout_s_), all_posted);
  if (world_->aborted)
    MOE_THROW(CommError, op << " #" << seq << " aborted: " << world_->abort_reason);
  std::ostringstream why;
  if (!ok || missing >= 0) {
    int peer = group_->world_ranks[missing];
    if (world_->exited[peer])
      why << "rank " << peer << " returned without reaching " << op << " #" << seq
          << " (detected by rank " << group_->world_ranks[rank_] << ")";
    else
      why << "rank " << peer << " did not reach " << op << " #" << seq << " within " << timeout_s_
          << " s (detected by rank " << group_->world_ranks[rank_] << ")";
    lock.unlock();
    fail(why.str());
  }
  for (size_t i = 0; i < group_->slots.size(); ++i) {
    const Post* p = group_->slots[i].post;
    if (std::strcmp(p->op, op) != 0) {
      why << "rank " << group_->world_ranks[i] << " called " << p->op << " while rank "
          << group_->world_ranks[rank_] << " called " << op << " (collective #" << seq << ")";
      lock.unlock();
      fail(why.str());
    }
  }
  return seq;
}

void ThreadComm::depart(uint64_t seq, const char* op) {
  std::unique_lock<std::mutex> lock(world_->mu);
  group_->slots[rank_].departed = seq;
  world_->cv.notify_all();
  int missing = -1;
  auto all_departed = [&] {
    if (world_->aborted) return true;
    for (size_t i = 0; i < group_->slots.size(); ++i)
      if (group_->slots[i].departed < seq) {
        missing = static_cast<int>(i);
        return false;
      }
    return true;
  };
  bool ok = world_->cv.wait_until(lock, deadline_after(timeout_s_), all_departed);
  if (world_->aborted)
    MOE_THROW(CommError, op << " #" << seq << " aborted: " << world_->abort_reason);
  if (!ok) {
    std::ostringstream why;
    why << "rank " << group_->world_ranks[missing] << " did not finish " << op << " #" << seq
        << " within " << timeout_s_ << " s (detected by rank " << group_->world_ranks[rank_] << ")";
    lock.unlock();
    fail(why.str());
  }
}

void ThreadComm::do_all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                                 const std::vector<int64_t>& recv_rows, torch::Tensor& out,
                                 const char* op) {
  Post post;
  post.op = op;
  post.tensor = input;
  post.send_rows = send_rows;
  post.recv_rows = recv_rows;
  uint64_t seq = arrive(std::move(post));

  const int n = size();
  const int64_t rb = row_bytes(input);
  auto* dst = static_cast<char*>(out.data_ptr());
  for (int src = 0; src < n; ++src) {
    const Post* p = group_->slots[src].post;
    const int64_t sent = p->send_rows[rank_];
    if (sent != recv_rows[src] || row_bytes(p->tensor) != rb ||
        p->tensor.scalar_type() != input.scalar_type()) {
      std::ostringstream why;
      why << "rank " << group_->world_ranks[src] << " sent " << sent << " rows of shape "
          << shape_str(p->tensor.slice(0, 0, 1)) << " " << p->tensor.scalar_type() << " to rank "
          << group_->world_ranks[rank_] << ", which expected " << recv_rows[src]
          << " rows of shape " << shape_str(input.slice(0, 0, 1)) << " " << input.scalar_type()
          << " (" << op << " #" << seq << ")";
      fail(why.str());
    }
    int64_t offset = 0;
    for (int j = 0; j < rank_; ++j) offset += p->send_rows[j];
    if (sent > 0)
      std::memcpy(dst, static_cast<const char*>(p->tensor.data_ptr()) + offset * rb, sent * rb);
    dst += sent * rb;
  }
  depart(seq, op);
}

void ThreadComm::do_all_reduce(torch::Tensor& tensor, ReduceOp reduce) {
  Post post;
  post.op = "all_reduce";
  post.tensor = tensor;
  post.reduce = reduce;
  uint64_t seq = arrive(std::move(post));
  const std::string why = reduce_disagreement(*group_, rank_, tensor, reduce, "all_reduce", seq);
  if (!why.empty()) fail(why);
  torch::Tensor acc = reduce_in_rank_order(*group_, reduce, 0, tensor.size(0));
  depart(seq, "all_reduce");  // peers have read our input: safe to overwrite it now
  tensor.copy_(acc);
}

void ThreadComm::do_reduce_scatter(const torch::Tensor& input, torch::Tensor& out,
                                   ReduceOp reduce) {
  Post post;
  post.op = "reduce_scatter";
  post.tensor = input;
  post.reduce = reduce;
  uint64_t seq = arrive(std::move(post));
  const std::string why =
      reduce_disagreement(*group_, rank_, input, reduce, "reduce_scatter", seq);
  if (!why.empty()) fail(why);
  // This rank's block, reduced exactly as do_all_reduce reduces it.
  const int64_t rows = out.size(0);
  torch::Tensor acc = reduce_in_rank_order(*group_, reduce, rank_ * rows, rows);
  depart(seq, "reduce_scatter");
  out.copy_(acc);
}

torch::Tensor ThreadComm::do_all_gather(const torch::Tensor& tensor) {
  Post post;
  post.op = "all_gather";
  post.tensor = tensor;
  uint64_t seq = arrive(std::move(post));
  std::vector<torch::Tensor> parts;
  for (int src = 0; src < size(); ++src) {
    const Post* p = group_->slots[src].post;
    if (!p->tensor.sizes().equals(tensor.sizes()) ||
        p->tensor.scalar_type() != tensor.scalar_type()) {
      std::ostringstream why;
      why << "rank " << group_->world_ranks[src] << " sent shape " << shape_str(p->tensor) << " "
          << p->tensor.scalar_type() << ", rank " << group_->world_ranks[rank_] << " expected "
          << shape_str(tensor) << " " << tensor.scalar_type() << " (all_gather #" << seq << ")";
      fail(why.str());
    }
    parts.push_back(p->tensor);
  }
  torch::Tensor out = torch::cat(parts, 0);
  depart(seq, "all_gather");
  return out;
}

void ThreadComm::do_broadcast(torch::Tensor& tensor, int root) {
  Post post;
  post.op = "broadcast";
  post.tensor = tensor;
  post.root = root;
  uint64_t seq = arrive(std::move(post));
  const Post* r = group_->slots[root].post;
  for (int src = 0; src < size(); ++src) {
    const Post* p = group_->slots[src].post;
    if (p->root != root) {
      std::ostringstream why;
      why << "rank " << group_->world_ranks[src] << " broadcast from root " << p->root << ", rank "
          << group_->world_ranks[rank_] << " from root " << root << " (broadcast #" << seq << ")";
      fail(why.str());
    }
  }
  if (!r->tensor.sizes().equals(tensor.sizes()) ||
      r->tensor.scalar_type() != tensor.scalar_type()) {
    std::ostringstream why;
    why << "root rank " << group_->world_ranks[root] << " sent shape " << shape_str(r->tensor)
        << " " << r->tensor.scalar_type() << ", rank " << group_->world_ranks[rank_] << " expected "
        << shape_str(tensor) << " " << tensor.scalar_type() << " (broadcast #" << seq << ")";
    fail(why.str());
  }
  if (rank_ != root) tensor.copy_(r->tensor);
  depart(seq, "broadcast");
}

void ThreadComm::do_barrier() {
  Post post;
  post.op = "barrier";
  uint64_t seq = arrive(std::move(post));
  depart(seq, "barrier");
}

std::unique_ptr<Communicator> ThreadComm::do_split(int color, int key) {
  Post post;
  post.op = "split";
  post.color = color;
  post.key = key;
  uint64_t seq = arrive(std::move(post));
  std::vector<std::pair<int, int>> members;  // (key, group rank)
  for (int i = 0; i < size(); ++i) {
    const Post* p = group_->slots[i].post;
    if (p->color == color) members.emplace_back(p->key, i);
  }
  std::sort(members.begin(), members.end());
  int new_rank = 0;
  for (size_t i = 0; i < members.size(); ++i)
    if (members[i].second == rank_) new_rank = static_cast<int>(i);
  std::shared_ptr<ThreadGroup> child;
  {
    std::lock_guard<std::mutex> lock(world_->mu);
    auto& slot = group_->children[{seq, color}];
    if (!slot) {
      slot = std::make_shared<ThreadGroup>();
      slot->slots.resize(members.size());
      for (auto& m : members) slot->world_ranks.push_back(group_->world_ranks[m.second]);
    }
    child = slot;
  }
  depart(seq, "split");
  return std::make_unique<ThreadComm>(world_, child, new_rank, timeout_s_);
}

void run_ranks(int n, double timeout_s, const std::function<void(Communicator&)>& fn) {
  auto comms = ThreadComm::create_world(n, timeout_s);
  std::mutex err_mu;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      set_current_rank(r);
      configure_cpu_threads(n);
      ThreadComm& comm = *comms[r];
      try {
        fn(comm);
        comm.mark_exited();
      } catch (const std::exception& e) {
        {
          std::lock_guard<std::mutex> lock(err_mu);
          if (!first_error) first_error = std::current_exception();
        }
        comm.abort("rank " + std::to_string(r) + " failed: " + e.what());
      } catch (...) {
        {
          std::lock_guard<std::mutex> lock(err_mu);
          if (!first_error) first_error = std::current_exception();
        }
        comm.abort("rank " + std::to_string(r) + " failed with a non-standard exception");
      }
      set_current_rank(-1);
    });
  }
  for (auto& t : threads) t.join();
  if (first_error) std::rethrow_exception(first_error);
}

}  // namespace moe::comm
