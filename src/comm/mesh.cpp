#include "moe/comm/mesh.h"

#include <sstream>

#include "moe/core/error.h"

namespace moe::comm {

ProcessMesh::ProcessMesh(Communicator& world, int ep, int dp) : world_(&world), ep_(ep), dp_(dp) {
  MOE_CHECK_T(ConfigError, ep >= 1 && dp >= 1 && ep * dp == world.size(),
              "process mesh ep " << ep << " x dp " << dp << " = " << ep * dp
                                 << " does not match the world size " << world.size());
  int r = world.rank();
  ep_group_ = world.split(/*color=*/r / ep, /*key=*/r % ep);
  expert_dp_group_ = world.split(/*color=*/r % ep, /*key=*/r / ep);
  MOE_CHECK(
      ep_group_->size() == ep && expert_dp_group_->size() == dp,
      "split produced groups of " << ep_group_->size() << " and " << expert_dp_group_->size());
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
