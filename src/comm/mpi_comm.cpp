#include "moe/comm/mpi_comm.h"

#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <sstream>
#include <thread>

#include <unistd.h>

#include "moe/comm/launch.h"
#include "moe/comm/mesh.h"
#include "moe/core/error.h"
#include "moe/core/log.h"

namespace moe::comm {

namespace {
using Clock = std::chrono::steady_clock;

bool g_initialised_here = false;
bool g_broken = false;  // a collective failed: MPI_Finalize could hang

// Liveness probes: a duplicate of MPI_COMM_WORLD on which every rank answers
// "are you there?" while it waits in a collective, so a rank whose collective
// timed out can name the peers that are gone (dead host, cut link) instead of
// "a peer in this group". Pings and answers never mix with collective traffic.
MPI_Comm g_probe_comm = MPI_COMM_NULL;
constexpr int kPingTag = 1, kPongTag = 2;
// How long a timed-out rank waits for its peers' answers.
constexpr double kProbeWindowS = 2.0;
// How long a rank whose collective failed waits before MPI_Abort (see abort_job).
constexpr double kReportWindowS = 2.0;
// The host name of every world rank (gathered once at start-up).
std::vector<std::string> g_hosts;

MPI_Comm& as_comm(void*& p) {
  return *reinterpret_cast<MPI_Comm*>(&p);
}
MPI_Comm as_comm_c(void* p) {
  MPI_Comm c;
  std::memcpy(&c, &p, sizeof c);
  return c;
}

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, len);
}

MPI_Datatype mpi_type(c10::ScalarType t) {
  switch (t) {
    case torch::kFloat32:
      return MPI_FLOAT;
    case torch::kFloat64:
      return MPI_DOUBLE;
    case torch::kInt64:
      return MPI_INT64_T;
    case torch::kInt32:
      return MPI_INT32_T;
    case torch::kUInt8:
      return MPI_UINT8_T;
    default:
      return MPI_DATATYPE_NULL;
  }
}

// A contiguous datatype of one row, so counts are rows (no 2 GiB byte limit).
// Cached per row size: the MoE layer exchanges the same row size every step.
// Freed by MpiComm::finalize (LeakSanitizer reported them otherwise).
std::map<int64_t, MPI_Datatype>& row_type_cache() {
  static std::map<int64_t, MPI_Datatype> cache;  // calls are serialised per process (MPI_THREAD_SERIALIZED)
  return cache;
}
struct RowType {
  MPI_Datatype type = MPI_DATATYPE_NULL;
  explicit RowType(int64_t bytes) {
    auto& cache = row_type_cache();
    auto it = cache.find(bytes);
    if (it == cache.end()) {
      MPI_Datatype t;
      MPI_Type_contiguous(static_cast<int>(bytes), MPI_BYTE, &t);
      MPI_Type_commit(&t);
      it = cache.emplace(bytes, t).first;
    }
    type = it->second;
  }
};

constexpr int kTagSpace = 1 << 20;  // tags cycle through this many collectives

// Answers every pending liveness ping (called from every wait loop).
void answer_pings() {
  if (g_probe_comm == MPI_COMM_NULL) return;
  static char byte = 1;
  for (;;) {
    int flag = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kPingTag, g_probe_comm, &flag, &st) != MPI_SUCCESS || !flag) return;
    char in = 0;
    MPI_Recv(&in, 1, MPI_CHAR, st.MPI_SOURCE, kPingTag, g_probe_comm, MPI_STATUS_IGNORE);
    MPI_Request r;
    if (MPI_Isend(&byte, 1, MPI_CHAR, st.MPI_SOURCE, kPongTag, g_probe_comm, &r) == MPI_SUCCESS)
      MPI_Request_free(&r);
  }
}

std::string rank_and_host(int world_rank) {
  std::string s = "rank " + std::to_string(world_rank);
  if (world_rank >= 0 && world_rank < static_cast<int>(g_hosts.size()))
    s += " (" + g_hosts[world_rank] + ")";
  return s;
}

// Pings the given world ranks and waits up to kProbeWindowS for their
// answers (answering others' pings meanwhile). Returns those that did not answer.
std::vector<int> unanswered_pings(const std::vector<int>& world_ranks) {
  if (g_probe_comm == MPI_COMM_NULL) return {};
  static char ping = 1;
  std::vector<char> pong(world_ranks.size(), 0);
  std::vector<MPI_Request> recvs(world_ranks.size(), MPI_REQUEST_NULL);
  for (size_t i = 0; i < world_ranks.size(); ++i) {
    MPI_Request r;
    if (MPI_Isend(&ping, 1, MPI_CHAR, world_ranks[i], kPingTag, g_probe_comm, &r) == MPI_SUCCESS)
      MPI_Request_free(&r);
    MPI_Irecv(&pong[i], 1, MPI_CHAR, world_ranks[i], kPongTag, g_probe_comm, &recvs[i]);
  }
  std::vector<bool> answered(world_ranks.size(), false);
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(kProbeWindowS));
  size_t left = world_ranks.size();
  while (left > 0 && Clock::now() < deadline) {
    for (size_t i = 0; i < recvs.size(); ++i) {
      if (answered[i]) continue;
      int done = 0;
      if (MPI_Test(&recvs[i], &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && done) {
        answered[i] = true;
        --left;
      }
    }
    answer_pings();
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::vector<int> missing;
  for (size_t i = 0; i < world_ranks.size(); ++i)
    if (!answered[i]) missing.push_back(world_ranks[i]);
  return missing;  // the pending receives are left behind: the job is being aborted
}

// Ends this process with `code` if MPI_Abort has not done so within
// kAbortWatchdogS: MPI_Abort goes through this host's daemon to mpirun, and
// when mpirun is unreachable (this host was cut off) it never returns.
constexpr int kAbortWatchdogS = 5;
void start_abort_watchdog(int code) {
  std::thread([code] {
    std::this_thread::sleep_for(std::chrono::seconds(kAbortWatchdogS));
    static const char msg[] =
        "MPI_Abort did not end this rank within 5 s (mpirun unreachable from this host): "
        "exiting\n";
    ssize_t ignored = ::write(2, msg, sizeof msg - 1);
    (void)ignored;
    std::_Exit(code);
  }).detach();
}
}  // namespace

static_assert(sizeof(MPI_Comm) <= sizeof(void*), "MPI_Comm must fit in a pointer");

bool MpiComm::launched_by_mpirun() {
  return comm::launched_by_mpirun();
}

std::unique_ptr<MpiComm> MpiComm::world(double timeout_s) {
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS)
      MOE_THROW(CommError, "MPI_Init_thread failed");
    g_initialised_here = true;
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  void* p = nullptr;
  MPI_Comm c = MPI_COMM_WORLD;
  std::memcpy(&p, &c, sizeof c);
  std::unique_ptr<MpiComm> w(new MpiComm(p, timeout_s, false));
  if (g_probe_comm == MPI_COMM_NULL) {
    w->do_barrier();  // MPI_Comm_dup blocks without a timeout: a barrier with one first
    if (MPI_Comm_dup(MPI_COMM_WORLD, &g_probe_comm) != MPI_SUCCESS)
      MOE_THROW(CommError, "MPI_Comm_dup of the world (liveness probes) failed");
    MPI_Comm_set_errhandler(g_probe_comm, MPI_ERRORS_RETURN);
    g_hosts = w->host_names();
  }
  return w;
}

std::string MpiComm::processor_name() {
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int len = 0;
  MPI_Get_processor_name(name, &len);
  return std::string(name, static_cast<size_t>(len));
}

std::vector<std::string> MpiComm::host_names() {
  const HostMap map = gather_hosts(*this);
  std::vector<std::string> hosts;
  for (int h : map.host_of_rank) hosts.push_back(map.names[h]);
  return hosts;
}

void MpiComm::finalize() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (initialised && !finalised && g_initialised_here && !g_broken) {
    for (auto& [bytes, type] : row_type_cache()) MPI_Type_free(&type);
    row_type_cache().clear();
    if (g_probe_comm != MPI_COMM_NULL) MPI_Comm_free(&g_probe_comm);  // every rank finalizes
    MPI_Finalize();
  }
}

void MpiComm::abort_job(int code) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (initialised && !finalised) {
    // After a collective failed, peers that hit the same timeout a moment
    // later are still probing: let them report theirs before MPI_Abort ends them.
    if (g_broken) std::this_thread::sleep_for(std::chrono::duration<double>(kReportWindowS));
    start_abort_watchdog(code);
    MPI_Abort(MPI_COMM_WORLD, code);
  }
  std::_Exit(code);
}

MpiComm::MpiComm(void* comm, double timeout_s, bool owned) : comm_(comm), owned_(owned) {
  set_timeout_s(timeout_s);
  MPI_Comm_rank(as_comm_c(comm_), &rank_);
  MPI_Comm_size(as_comm_c(comm_), &size_);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
  MPI_Comm_set_errhandler(as_comm_c(comm_), MPI_ERRORS_RETURN);
}

MpiComm::~MpiComm() {
  int finalised = 0;
  MPI_Finalized(&finalised);
  if (owned_ && !finalised && !g_broken) MPI_Comm_free(&as_comm(comm_));
}

void MpiComm::abort(const std::string& reason) {
  MOE_LOG(Error) << "aborting the MPI job: " << reason;
  abort_job(kExitComm);
}

void MpiComm::fail(const std::string& reason) {
  g_broken = true;
  MOE_THROW(CommError, reason);
}

void MpiComm::wait_collective(void* request_ptr, const char* op, uint64_t seq) {
  MPI_Request* req = static_cast<MPI_Request*>(request_ptr);
  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s_));
  int done = 0;
  MPI_Status status;
  for (uint64_t spins = 0;; ++spins) {
    int rc = MPI_Test(req, &done, &status);
    if (rc != MPI_SUCCESS) {
      std::ostringstream why;
      why << op << " #" << seq << " failed: " << mpi_error_string(rc);
      fail(why.str());
    }
    if (done) return;
    if ((spins & 255) == 255) {
      answer_pings();
      if (Clock::now() > deadline) {
        std::ostringstream why;
        why << op << " #" << seq << " did not complete within " << timeout_s_ << " s on rank "
            << world_rank_ << ": " << silent_peers() << " (group of " << size_ << " ranks)";
        fail(why.str());
      }
      std::this_thread::yield();
    }
  }
}

std::string MpiComm::silent_peers() {
  // This group's ranks as world ranks, to ping them on the world's duplicate.
  MPI_Group group, world_group;
  MPI_Comm_group(as_comm_c(comm_), &group);
  MPI_Comm_group(MPI_COMM_WORLD, &world_group);
  std::vector<int> local, world(size_);
  for (int r = 0; r < size_; ++r)
    if (r != rank_) local.push_back(r);
  MPI_Group_translate_ranks(group, static_cast<int>(local.size()), local.data(), world_group,
                            world.data());
  MPI_Group_free(&group);
  MPI_Group_free(&world_group);
  world.resize(local.size());
  std::vector<int> missing = unanswered_pings(world);
  std::ostringstream os;
  if (missing.empty())
    return "every peer answers a liveness probe, so one is stalled in computation or called a "
           "different collective";
  for (size_t i = 0; i < missing.size(); ++i) os << (i ? ", " : "") << rank_and_host(missing[i]);
  os << (missing.size() == 1 ? " does" : " do") << " not answer a liveness probe within "
     << kProbeWindowS << " s: dead, stopped, or its host is cut off";
  return os.str();
}

void MpiComm::do_all_to_all_v(const torch::Tensor& input, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows, torch::Tensor& out,
                              const char* op) {
  if (g_broken) MOE_THROW(CommError, op << " refused: an earlier collective failed on this rank");
  const uint64_t seq = ++seq_;
  const int tag = static_cast<int>(seq % kTagSpace);
  const int64_t rb = row_bytes(input);
  if (rb == 0) return;
  MPI_Comm comm = as_comm_c(comm_);
  RowType row(rb);
  std::vector<int64_t> send_off(size_ + 1, 0), recv_off(size_ + 1, 0);
  for (int i = 0; i < size_; ++i) {
    send_off[i + 1] = send_off[i] + send_rows[i];
    recv_off[i + 1] = recv_off[i] + recv_rows[i];
  }
  const char* src = static_cast<const char*>(input.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  if (send_rows[rank_] != recv_rows[rank_]) {
    std::ostringstream why;
    why << "rank " << world_rank_ << " sends itself " << send_rows[rank_] << " rows but expects "
        << recv_rows[rank_] << " (" << op << " #" << seq << ")";
    fail(why.str());
  }
  // One message per peer, received in place. A peer that sends more rows
  // than expected shows as MPI_ERR_TRUNCATE, fewer as a short count.
  std::vector<MPI_Request> reqs;
  std::vector<int> req_peer;  // >= 0: receive from peer; < 0: send to -(peer+1)
  reqs.reserve(2 * size_);
  for (int k = 1; k < size_; ++k) {
    int peer = (rank_ - k + size_) % size_;
    MPI_Request r;
    MPI_Irecv(dst + recv_off[peer] * rb, static_cast<int>(recv_rows[peer]), row.type, peer, tag,
              comm, &r);
    reqs.push_back(r);
    req_peer.push_back(peer);
  }
  for (int k = 1; k < size_; ++k) {
    int peer = (rank_ + k) % size_;
    MPI_Request r;
    MPI_Isend(src + send_off[peer] * rb, static_cast<int>(send_rows[peer]), row.type, peer, tag,
              comm, &r);
    reqs.push_back(r);
    req_peer.push_back(-(peer + 1));
  }
  if (send_rows[rank_] > 0)
    std::memcpy(dst + recv_off[rank_] * rb, src + send_off[rank_] * rb, send_rows[rank_] * rb);

  auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_s_));
  std::vector<bool> done(reqs.size(), false);
  size_t remaining = reqs.size();
  std::vector<int> indices(reqs.size());
  std::vector<MPI_Status> statuses(reqs.size());
  for (uint64_t spins = 0; remaining > 0; ++spins) {
    int outcount = 0;
    int rc = MPI_Testsome(static_cast<int>(reqs.size()), reqs.data(), &outcount, indices.data(),
                          statuses.data());
    if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) {
      std::ostringstream why;
      why << op << " #" << seq << " failed on rank " << world_rank_ << ": " << mpi_error_string(rc);
      fail(why.str());
    }
    if (outcount == MPI_UNDEFINED) break;
    for (int i = 0; i < outcount; ++i) {
      int idx = indices[i];
      done[idx] = true;
      --remaining;
      int peer = req_peer[idx];
      int err = rc == MPI_ERR_IN_STATUS ? statuses[i].MPI_ERROR : MPI_SUCCESS;
      int err_class = MPI_SUCCESS;
      if (err != MPI_SUCCESS) MPI_Error_class(err, &err_class);
      if (peer < 0) {
        if (err != MPI_SUCCESS) {
          std::ostringstream why;
          why << "sending " << op << " #" << seq << " data from rank " << world_rank_ << " to rank "
              << (-peer - 1) << " failed: " << mpi_error_string(err);
          fail(why.str());
        }
        continue;
      }
      int got = 0;
      if (err == MPI_SUCCESS) MPI_Get_count(&statuses[i], row.type, &got);
      if (err_class == MPI_ERR_TRUNCATE || (err == MPI_SUCCESS && got != recv_rows[peer])) {
        std::ostringstream why;
        why << "rank " << peer << " sent "
            << (err_class == MPI_ERR_TRUNCATE ? "more than " + std::to_string(recv_rows[peer])
                                              : std::to_string(got))
            << " rows to rank " << world_rank_ << ", which expected " << recv_rows[peer] << " ("
            << op << " #" << seq << ")";
        fail(why.str());
      }
      if (err != MPI_SUCCESS) {
        std::ostringstream why;
        why << "receiving " << op << " #" << seq << " data from rank " << peer
            << " failed: " << mpi_error_string(err);
        fail(why.str());
      }
    }
    if (remaining > 0 && (spins & 255) == 255) {
      answer_pings();
      if (Clock::now() > deadline) {
        std::ostringstream why;
        bool first = true;
        for (size_t i = 0; i < reqs.size(); ++i) {
          if (done[i] || req_peer[i] < 0) continue;
          why << (first ? "rank " : ", rank ") << req_peer[i];
          first = false;
        }
        if (first) why << "peers";
        why << " did not " << (first ? "take " : "send ") << op << " #" << seq << " data "
            << (first ? "from" : "to") << " rank " << world_rank_ << " within " << timeout_s_
            << " s (stalled, dead, or in a different collective)";
        fail(why.str());
      }
      std::this_thread::yield();
    }
  }
}

void MpiComm::raw_alltoallv(const torch::Tensor& input, torch::Tensor& output,
                            const std::vector<int64_t>& send_rows,
                            const std::vector<int64_t>& recv_rows) {
  const int64_t rb = row_bytes(input);
  std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
  int s = 0, r = 0;
  for (int i = 0; i < size_; ++i) {
    sc[i] = static_cast<int>(send_rows[i] * rb);
    rc[i] = static_cast<int>(recv_rows[i] * rb);
    sd[i] = s;
    rd[i] = r;
    s += sc[i];
    r += rc[i];
  }
  int rc_ = MPI_Alltoallv(input.data_ptr(), sc.data(), sd.data(), MPI_BYTE, output.data_ptr(),
                          rc.data(), rd.data(), MPI_BYTE, as_comm_c(comm_));
  if (rc_ != MPI_SUCCESS) MOE_THROW(CommError, "MPI_Alltoallv failed: " << mpi_error_string(rc_));
}

namespace {
// ReduceOp::Avg after an MPI sum (MPI has no average): floor division for integers.
void divide_in_place(torch::Tensor& t, int n) {
  if (t.is_floating_point())
    t.div_(n);
  else
    t.copy_(t.div(n, "floor"));
}
}  // namespace

void MpiComm::do_all_reduce(torch::Tensor& tensor, ReduceOp op) {
  if (g_broken)
    MOE_THROW(CommError, "all_reduce refused: an earlier collective failed on this rank");
  const uint64_t seq = ++seq_;
  const bool low_precision =
      tensor.scalar_type() == torch::kBFloat16 || tensor.scalar_type() == torch::kFloat16;
  torch::Tensor work = low_precision ? tensor.to(torch::kFloat32) : tensor;
  MPI_Request req;
  MPI_Op mop = op == ReduceOp::Max ? MPI_MAX : MPI_SUM;
  int rc = MPI_Iallreduce(MPI_IN_PLACE, work.data_ptr(), static_cast<int>(work.numel()),
                          mpi_type(work.scalar_type()), mop, as_comm_c(comm_), &req);
  if (rc != MPI_SUCCESS) fail(std::string("all_reduce failed: ") + mpi_error_string(rc));
  wait_collective(&req, "all_reduce", seq);
  if (op == ReduceOp::Avg) divide_in_place(work, size_);
  if (low_precision) tensor.copy_(work);
}

void MpiComm::do_reduce_scatter(const torch::Tensor& input, torch::Tensor& out, ReduceOp op) {
  if (g_broken)
    MOE_THROW(CommError, "reduce_scatter refused: an earlier collective failed on this rank");
  const uint64_t seq = ++seq_;
  const bool low_precision =
      input.scalar_type() == torch::kBFloat16 || input.scalar_type() == torch::kFloat16;
  torch::Tensor send = low_precision ? input.to(torch::kFloat32) : input;
  torch::Tensor recv = low_precision ? torch::empty(out.sizes(), send.options()) : out;
  MOE_CHECK_T(ShapeError, recv.numel() < (int64_t{1} << 31),
              "reduce_scatter: " << recv.numel() << " elements per rank exceed MPI's int count");
  MPI_Request req;
  MPI_Op mop = op == ReduceOp::Max ? MPI_MAX : MPI_SUM;
  int rc = MPI_Ireduce_scatter_block(send.data_ptr(), recv.data_ptr(),
                                     static_cast<int>(recv.numel()), mpi_type(send.scalar_type()),
                                     mop, as_comm_c(comm_), &req);
  if (rc != MPI_SUCCESS) fail(std::string("reduce_scatter failed: ") + mpi_error_string(rc));
  wait_collective(&req, "reduce_scatter", seq);
  if (op == ReduceOp::Avg) divide_in_place(recv, size_);
  if (low_precision) out.copy_(recv);
}

torch::Tensor MpiComm::do_all_gather(const torch::Tensor& tensor) {
  if (g_broken)
    MOE_THROW(CommError, "all_gather refused: an earlier collective failed on this rank");
  const uint64_t seq = ++seq_;
  std::vector<int64_t> shape = tensor.sizes().vec();
  shape[0] *= size_;
  torch::Tensor out = torch::empty(shape, tensor.options());
  int64_t bytes = tensor.numel() * tensor.element_size();
  MOE_CHECK_T(ShapeError, bytes < (int64_t{1} << 31),
              "all_gather: tensor of " << bytes << " bytes exceeds 2 GiB");
  MPI_Request req;
  int rc = MPI_Iallgather(tensor.data_ptr(), static_cast<int>(bytes), MPI_BYTE, out.data_ptr(),
                          static_cast<int>(bytes), MPI_BYTE, as_comm_c(comm_), &req);
  if (rc != MPI_SUCCESS) fail(std::string("all_gather failed: ") + mpi_error_string(rc));
  wait_collective(&req, "all_gather", seq);
  return out;
}

void MpiComm::do_broadcast(torch::Tensor& tensor, int root) {
  if (g_broken)
    MOE_THROW(CommError, "broadcast refused: an earlier collective failed on this rank");
  const uint64_t seq = ++seq_;
  int64_t bytes = tensor.numel() * tensor.element_size();
  MOE_CHECK_T(ShapeError, bytes < (int64_t{1} << 31),
              "broadcast: tensor of " << bytes << " bytes exceeds 2 GiB");
  MPI_Request req;
  int rc = MPI_Ibcast(tensor.data_ptr(), static_cast<int>(bytes), MPI_BYTE, root, as_comm_c(comm_),
                      &req);
  if (rc != MPI_SUCCESS) fail(std::string("broadcast failed: ") + mpi_error_string(rc));
  wait_collective(&req, "broadcast", seq);
}

void MpiComm::do_barrier() {
  if (g_broken) MOE_THROW(CommError, "barrier refused: an earlier collective failed on this rank");
  const uint64_t seq = ++seq_;
  MPI_Request req;
  int rc = MPI_Ibarrier(as_comm_c(comm_), &req);
  if (rc != MPI_SUCCESS) fail(std::string("barrier failed: ") + mpi_error_string(rc));
  wait_collective(&req, "barrier", seq);
}

std::unique_ptr<Communicator> MpiComm::do_split(int color, int key) {
  if (g_broken) MOE_THROW(CommError, "split refused: an earlier collective failed on this rank");
  // MPI_Comm_split blocks without a timeout: a barrier with one first.
  do_barrier();
  MPI_Comm child;
  int rc = MPI_Comm_split(as_comm_c(comm_), color, key, &child);
  if (rc != MPI_SUCCESS) fail(std::string("split failed: ") + mpi_error_string(rc));
  void* p = nullptr;
  std::memcpy(&p, &child, sizeof child);
  return std::unique_ptr<MpiComm>(new MpiComm(p, timeout_s_, true));
}

int MpiComm::shared_memory_rank() {
  if (g_broken) MOE_THROW(CommError, "shared_memory_rank refused: an earlier collective failed on this rank");
  do_barrier();  // MPI_Comm_split_type blocks without a timeout: a barrier with one first
  MPI_Comm node;
  int rc = MPI_Comm_split_type(as_comm_c(comm_), MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
  if (rc != MPI_SUCCESS) fail(std::string("MPI_Comm_split_type(shared) failed: ") + mpi_error_string(rc));
  int local = 0;
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  return local;
}

}  // namespace moe::comm
