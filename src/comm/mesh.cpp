#include "moe/comm/mesh.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>

#include "moe/core/error.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

namespace moe::comm {

HostMap gather_hosts(Communicator& world) {
  constexpr int64_t kLen = 256;
  std::string mine;
#if MOE_HAVE_MPI
  if (auto* mpi = dynamic_cast<MpiComm*>(&world)) mine = mpi->processor_name();
#endif
  if (mine.empty()) {
    char buf[kLen] = {};
    if (gethostname(buf, kLen - 1) != 0) std::snprintf(buf, kLen, "localhost");
    mine = buf;
  }
  mine.resize(std::min<size_t>(mine.size(), kLen - 1));
  torch::Tensor t = torch::zeros({1, kLen}, torch::kUInt8);
  std::memcpy(t.data_ptr(), mine.data(), mine.size());
  torch::Tensor all = world.all_gather(t).contiguous();
  HostMap map;
  std::map<std::string, int> index;
  for (int r = 0; r < world.size(); ++r) {
    const char* row = reinterpret_cast<const char*>(all.data_ptr<uint8_t>()) + r * kLen;
    std::string name(row, strnlen(row, kLen));
    auto it = index.emplace(name, static_cast<int>(map.names.size())).first;
    if (it->second == static_cast<int>(map.names.size())) map.names.push_back(name);
    map.host_of_rank.push_back(it->second);
  }
  return map;
}

ProcessMesh::ProcessMesh(Communicator& world, int ep, int dp, bool ep_span_hosts)
    : ProcessMesh(world, ep, dp, ep_span_hosts, gather_hosts(world)) {}

ProcessMesh::ProcessMesh(Communicator& world, int ep, int dp, bool ep_span_hosts, HostMap hosts)
    : world_(&world), ep_(ep), dp_(dp), hosts_(std::move(hosts)) {
  const int W = world.size();
  MOE_CHECK_T(ConfigError, ep >= 1 && dp >= 1 && ep * dp == W,
              "process mesh ep " << ep << " x dp " << dp << " = " << ep * dp
                                 << " does not match the world size " << W);
  MOE_CHECK(static_cast<int>(hosts_.host_of_rank.size()) == W,
            "host map covers " << hosts_.host_of_rank.size() << " ranks, world has " << W);
  // Each rank's index on its host, then the placement order (see mesh.h).
  std::vector<int> on_host(W), seen(hosts_.names.size(), 0);
  for (int r = 0; r < W; ++r) on_host[r] = seen[hosts_.host_of_rank[r]]++;
  order_.resize(W);
  for (int r = 0; r < W; ++r) order_[r] = r;
  std::stable_sort(order_.begin(), order_.end(), [&](int a, int b) {
    const int ha = hosts_.host_of_rank[a], hb = hosts_.host_of_rank[b];
    if (ep_span_hosts) return on_host[a] != on_host[b] ? on_host[a] < on_host[b] : ha < hb;
    return ha < hb;
  });
  const int r = world.rank();
  position_ = static_cast<int>(std::find(order_.begin(), order_.end(), r) - order_.begin());
  ep_group_ = world.split(/*color=*/dp_rank(), /*key=*/ep_rank());
  expert_dp_group_ = world.split(/*color=*/ep_rank(), /*key=*/dp_rank());
  MOE_CHECK(
      ep_group_->size() == ep && expert_dp_group_->size() == dp,
      "split produced groups of " << ep_group_->size() << " and " << expert_dp_group_->size());
}

bool ProcessMesh::ep_spans_hosts() const {
  for (int d = 0; d < dp_; ++d)
    for (int e = 1; e < ep_; ++e)
      if (hosts_.host_of_rank[world_rank_at(e, d)] != hosts_.host_of_rank[world_rank_at(0, d)])
        return true;
  return false;
}

std::string ProcessMesh::describe() const {
  std::vector<int> count(hosts_.names.size(), 0);
  for (int h : hosts_.host_of_rank) ++count[h];
  std::ostringstream os;
  os << hosts_.names.size() << (hosts_.names.size() == 1 ? " host" : " hosts");
  if (std::all_of(count.begin(), count.end(), [&](int c) { return c == count[0]; }))
    os << " x " << count[0] << " ranks per host";
  else
    os << " with unequal rank counts";
  for (int d = 0; d < dp_; ++d) {
    os << "; EP group " << d << ": ranks ";
    std::vector<int> hosts_of_group;
    for (int e = 0; e < ep_; ++e) {
      const int r = world_rank_at(e, d);
      os << (e ? "," : "") << r;
      const int h = hosts_.host_of_rank[r];
      if (std::find(hosts_of_group.begin(), hosts_of_group.end(), h) == hosts_of_group.end())
        hosts_of_group.push_back(h);
    }
    os << " on ";
    for (size_t i = 0; i < hosts_of_group.size(); ++i)
      os << (i ? "+" : "") << hosts_.names[hosts_of_group[i]];
  }
  return os.str();
}

namespace {
int64_t backend_code(const std::string& name) {
  int64_t h = 0;
  for (char c : name) h = h * 131 + c;
  return h;
}
}  // namespace

void check_world_consistency(Communicator& world, uint64_t config_hash) {
  int64_t mine[3] = {world.size(), backend_code(world.backend_name()),
                     static_cast<int64_t>(config_hash)};
  torch::Tensor t = torch::tensor({mine[0], mine[1], mine[2]}, torch::kInt64);
  torch::Tensor all = world.all_gather(t);
  auto* a = all.data_ptr<int64_t>();
  for (int r = 0; r < world.size(); ++r) {
    const int64_t* theirs = a + 3 * r;
    if (theirs[0] != mine[0])
      MOE_THROW(CommError, "setup: rank " << r << " sees a world of " << theirs[0]
                                          << " ranks, rank " << world.rank() << " sees "
                                          << mine[0]);
    if (theirs[1] != mine[1])
      MOE_THROW(CommError, "setup: rank " << r << " uses a different backend than rank "
                                          << world.rank() << " (" << world.backend_name() << ")");
    if (theirs[2] != mine[2]) {
      std::ostringstream os;
      os << std::hex << "setup: rank " << std::dec << r << std::hex << " has config hash "
         << static_cast<uint64_t>(theirs[2]) << " but rank " << std::dec << world.rank() << std::hex
         << " has " << config_hash << ": every rank must run the same resolved config";
      MOE_THROW(CommError, os.str());
    }
  }
}

}  // namespace moe::comm
