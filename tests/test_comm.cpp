// Communication layer tests. One conformance body per operation, run under
// ThreadComm at world 1-4 and under `mpirun -np 1/2/4` (ctest runs this binary
// with --gtest_filter=Mpi* under mpirun); mesh tests; fault tests.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "moe/comm/communicator.h"
#include "moe/comm/mesh.h"
#include "moe/comm/thread_comm.h"
#include "moe/core/error.h"
#include "moe/core/log.h"
#include "test_support.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

using namespace moe;
using namespace moe::comm;

namespace {

const std::vector<c10::ScalarType> kDtypes = {torch::kFloat32, torch::kBFloat16, torch::kInt64};

// Small integers, exact in every dtype tested (bfloat16 is exact to 256).
double code(int src, int dst, int64_t row, int64_t col) {
  return src * 16 + dst * 4 + (row % 4) + col % 2;
}

torch::Tensor block(int src, int dst, int64_t rows, std::vector<int64_t> trailing,
                    c10::ScalarType dt) {
  std::vector<int64_t> shape = {rows};
  shape.insert(shape.end(), trailing.begin(), trailing.end());
  torch::Tensor t = torch::empty(shape, torch::kFloat64);
  int64_t cols = 1;
  for (auto d : trailing) cols *= d;
  auto flat = t.view({rows, cols});
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < flat.size(1); ++c) flat[r][c] = code(src, dst, r, c);
  return t.to(dt);
}

// ---- conformance bodies ------------------------------------------------------

void body_all_to_all(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    std::vector<torch::Tensor> parts;
    for (int dst = 0; dst < n; ++dst) parts.push_back(block(me, dst, 3, {5}, dt));
    torch::Tensor out = c.all_to_all(torch::cat(parts, 0));
    ASSERT_EQ(out.sizes(), torch::IntArrayRef({3 * n, 5}));
    ASSERT_EQ(out.scalar_type(), dt);
    for (int src = 0; src < n; ++src)
      EXPECT_TRUE(torch::equal(out.slice(0, 3 * src, 3 * src + 3), block(src, me, 3, {5}, dt)))
          << "dtype " << dt << " block from rank " << src;
  }
}

int64_t uneven_rows(int src, int dst) {
  return (src + 2 * dst) % 3;
}  // includes zeros

// Rank `me`'s uneven all_to_all_v: uneven_rows(me, dst) rows of block(me, dst) to each peer.
struct UnevenExchange {
  std::vector<int64_t> send, recv;
  torch::Tensor input;  // [sum(send), 2, 3]
};
UnevenExchange uneven_exchange(int me, int n, c10::ScalarType dt) {
  UnevenExchange x{std::vector<int64_t>(n), std::vector<int64_t>(n), {}};
  std::vector<torch::Tensor> parts;
  for (int dst = 0; dst < n; ++dst) {
    x.send[dst] = uneven_rows(me, dst);
    parts.push_back(block(me, dst, x.send[dst], {2, 3}, dt));
  }
  for (int src = 0; src < n; ++src) x.recv[src] = uneven_rows(src, me);
  x.input = torch::cat(parts, 0);
  return x;
}
// The received rows (on the CPU) are each source's block for `me`, in rank order.
void expect_uneven_blocks(const torch::Tensor& out, const std::vector<int64_t>& recv, int me,
                          c10::ScalarType dt) {
  int64_t off = 0;
  for (size_t src = 0; src < recv.size(); ++src) {
    EXPECT_TRUE(torch::equal(out.slice(0, off, off + recv[src]),
                             block(static_cast<int>(src), me, recv[src], {2, 3}, dt)))
        << "dtype " << dt << " from rank " << src;
    off += recv[src];
  }
}

void body_all_to_all_v(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    UnevenExchange x = uneven_exchange(me, n, dt);
    EXPECT_EQ(c.exchange_counts(x.send), x.recv);
    torch::Tensor out = c.all_to_all_v(x.input, x.send, x.recv);
    int64_t total = 0;
    for (auto r : x.recv) total += r;
    ASSERT_EQ(out.sizes(), torch::IntArrayRef({total, 2, 3}));
    expect_uneven_blocks(out, x.recv, me, dt);
  }
  // Everyone sends nothing at all.
  std::vector<int64_t> zeros(n, 0);
  torch::Tensor out = c.all_to_all_v(torch::empty({0, 4}), zeros, zeros);
  EXPECT_EQ(out.size(0), 0);
  EXPECT_EQ(out.size(1), 4);
}

void body_all_reduce(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    torch::Tensor t = torch::full({4, 3}, me + 1, torch::kFloat64).to(dt);
    c.all_reduce(t, ReduceOp::Sum);
    EXPECT_TRUE(torch::equal(t, torch::full({4, 3}, n * (n + 1) / 2, torch::kFloat64).to(dt)))
        << dt;
    t = torch::arange(12, torch::kFloat64).view({4, 3}).add(me).to(dt);
    c.all_reduce(t, ReduceOp::Max);
    EXPECT_TRUE(torch::equal(t, torch::arange(12, torch::kFloat64).view({4, 3}).add(n - 1).to(dt)))
        << dt;
    t = torch::full({5}, 2 * me, torch::kFloat64).to(dt);
    c.all_reduce(t, ReduceOp::Avg);
    EXPECT_TRUE(torch::equal(t, torch::full({5}, n - 1, torch::kFloat64).to(dt))) << dt;
  }
  // Same bits on every rank, even for sums that round.
  torch::Tensor r =
      torch::rand({64}, torch::TensorOptions().dtype(torch::kFloat32)).mul(1e3 * (me + 1));
  c.all_reduce(r, ReduceOp::Sum);
  torch::Tensor all = c.all_gather(r.view({1, 64}));
  for (int i = 1; i < n; ++i)
    EXPECT_TRUE(torch::equal(all[i], all[0])) << "rank " << i << " differs from rank 0";
}

void body_all_gather(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    torch::Tensor t = block(me, 0, 2, {3}, dt);
    torch::Tensor out = c.all_gather(t);
    ASSERT_EQ(out.sizes(), torch::IntArrayRef({2 * n, 3}));
    for (int src = 0; src < n; ++src)
      EXPECT_TRUE(torch::equal(out.slice(0, 2 * src, 2 * src + 2), block(src, 0, 2, {3}, dt)));
  }
}

void body_reduce_scatter(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    // Row i of rank s holds s + i: block me sums to n*(me*3 + j) + n(n-1)/2 at row j.
    torch::Tensor in = torch::arange(3 * n, torch::kFloat64).add(me).view({3 * n, 1}).expand({3 * n, 2});
    torch::Tensor input = in.contiguous().to(dt);
    torch::Tensor out = torch::empty({3, 2}, input.options());
    c.reduce_scatter(input, out, ReduceOp::Sum);
    torch::Tensor want = torch::arange(3, torch::kFloat64).add(3 * me).mul(n).add(n * (n - 1) / 2);
    EXPECT_TRUE(torch::equal(out, want.view({3, 1}).expand({3, 2}).to(dt))) << dt;
    c.reduce_scatter(input, out, ReduceOp::Max);
    EXPECT_TRUE(torch::equal(out, torch::arange(3, torch::kFloat64).add(3 * me + n - 1)
                                      .view({3, 1}).expand({3, 2}).to(dt)))
        << dt;
  }
  // Bitwise the block all_reduce gives, even for sums that round; in place
  // (out a view of input's own block) as the distributed optimizer calls it.
  torch::Tensor r = torch::rand({8 * n}, torch::kFloat32).mul(1e3 * (me + 1));
  torch::Tensor reduced = r.clone();
  c.all_reduce(reduced, ReduceOp::Sum);
  torch::Tensor mine = r.narrow(0, 8 * me, 8);
  c.reduce_scatter(r, mine, ReduceOp::Sum);
  EXPECT_TRUE(torch::equal(r.narrow(0, 8 * me, 8), reduced.narrow(0, 8 * me, 8)));
  // ... and gathering each rank's block back into the flat buffer rebuilds the all_reduce.
  c.all_gather(r.narrow(0, 8 * me, 8), r);
  EXPECT_TRUE(torch::equal(r, reduced));
  // Arguments are checked before anything is sent.
  torch::Tensor odd = torch::zeros({3 * n + 1}, torch::kFloat32), o = torch::zeros({3});
  if (n > 1) {
    EXPECT_THROW_MSG(c.reduce_scatter(odd, o), ShapeError, "not divisible by the group size");
  }
  torch::Tensor wrong = torch::zeros({4});
  EXPECT_THROW_MSG(c.reduce_scatter(torch::zeros({3 * n}), wrong), ShapeError, "needs [3, ...]");
  EXPECT_THROW_MSG(c.all_gather(torch::zeros({3}), wrong), ShapeError, "all_gather: out is [4]");
}

void body_broadcast(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    for (int root : {0, n - 1}) {
      torch::Tensor t = block(me, me, 3, {2}, dt);
      c.broadcast(t, root);
      EXPECT_TRUE(torch::equal(t, block(root, root, 3, {2}, dt))) << "root " << root;
    }
  }
}

void body_barrier_and_split(Communicator& c) {
  const int n = c.size(), me = c.rank();
  for (int i = 0; i < 3; ++i) c.barrier();
  // Two colors, members ordered by descending rank (key = -rank).
  auto sub = c.split(me % 2, -me);
  int members = (n + 1 - me % 2) / 2;
  ASSERT_EQ(sub->size(), members);
  int above = 0;
  for (int r = me + 2; r < n; r += 2) ++above;
  EXPECT_EQ(sub->rank(), above);
  torch::Tensor t = torch::full({1}, me, torch::kInt64);
  sub->all_reduce(t, ReduceOp::Sum);
  int64_t expect = 0;
  for (int r = me % 2; r < n; r += 2) expect += r;
  EXPECT_EQ(t.item<int64_t>(), expect);
  // Nested split and a collective on the parent afterwards still line up.
  auto solo = sub->split(sub->rank(), 0);
  EXPECT_EQ(solo->size(), 1);
  c.barrier();
}

void body_argument_checks(Communicator& c) {
  const int n = c.size();
  std::vector<int64_t> ones(n, 1);
  torch::Tensor x = torch::zeros({n, 4});
  EXPECT_THROW(c.all_to_all_v(torch::zeros({n, 8}).slice(1, 0, 8, 2), ones, ones),
               ShapeError);  // strided
  EXPECT_THROW(c.all_to_all_v(x, std::vector<int64_t>(n + 1, 0), ones), ShapeError);
  std::vector<int64_t> too_many(n, 2);
  try {
    c.all_to_all_v(x, too_many, ones);
    ADD_FAILURE() << "no ShapeError";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("send_rows"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(n) + " rows"), std::string::npos)
        << e.what();
  }
  std::vector<int64_t> negative(n, 1);
  negative[0] = -1;
  EXPECT_THROW(c.all_to_all_v(x, ones, negative), ShapeError);
  if (n > 1) {
    EXPECT_THROW(c.all_to_all(torch::zeros({n * 2 + 1, 3})), ShapeError);
  }
  EXPECT_THROW(c.all_to_all(torch::zeros({n}, torch::kBool)), ShapeError);
  torch::Tensor y = torch::zeros({2});
  EXPECT_THROW(c.broadcast(y, n), ShapeError);
  torch::Tensor expanded = y.expand({3, 2});
  EXPECT_THROW(c.all_reduce(expanded, ReduceOp::Sum), ShapeError);
  torch::Tensor undefined;
  EXPECT_THROW(c.all_gather(undefined), ShapeError);
  c.barrier();  // nothing above was sent: the ranks are still in step
}

void body_consistency(Communicator& c) {
  EXPECT_NO_THROW(check_world_consistency(c, 0x1234));
  if (c.size() < 2) return;
  try {
    check_world_consistency(c, c.rank() == 1 ? 0x9999 : 0x1234);
    ADD_FAILURE() << "no CommError";
  } catch (const CommError& e) {
    std::string what = e.what();
    std::string named = c.rank() == 1 ? "rank 0 has config hash" : "rank 1 has config hash";
    EXPECT_NE(what.find(named), std::string::npos) << what;
  }
}

using Body = void (*)(Communicator&);
const std::vector<std::pair<const char*, Body>> kBodies = {
    {"AllToAll", body_all_to_all},
    {"AllToAllV", body_all_to_all_v},
    {"AllReduce", body_all_reduce},
    {"AllGather", body_all_gather},
    {"Broadcast", body_broadcast},
    {"BarrierSplit", body_barrier_and_split},
    {"ArgumentChecks", body_argument_checks},
    {"Consistency", body_consistency},
};

}  // namespace

// ---- ThreadComm: world 1..4 -------------------------------------------------------

class ThreadConformance : public testing::TestWithParam<int> {};

#define MOE_THREAD_CONFORMANCE(Name, body) \
  TEST_P(ThreadConformance, Name) {        \
    run_ranks(GetParam(), 20.0, body);     \
  }
MOE_THREAD_CONFORMANCE(AllToAll, body_all_to_all)
MOE_THREAD_CONFORMANCE(AllToAllV, body_all_to_all_v)
MOE_THREAD_CONFORMANCE(AllReduce, body_all_reduce)
MOE_THREAD_CONFORMANCE(AllGather, body_all_gather)
MOE_THREAD_CONFORMANCE(ReduceScatter, body_reduce_scatter)
MOE_THREAD_CONFORMANCE(Broadcast, body_broadcast)
MOE_THREAD_CONFORMANCE(BarrierSplit, body_barrier_and_split)
MOE_THREAD_CONFORMANCE(ArgumentChecks, body_argument_checks)
MOE_THREAD_CONFORMANCE(Consistency, body_consistency)
INSTANTIATE_TEST_SUITE_P(World, ThreadConformance, testing::Values(1, 2, 3, 4),
                         [](const testing::TestParamInfo<int>& i) {
                           return "w" + std::to_string(i.param);
                         });

// ---- ProcessMesh ----------------------------------------------------------------

struct MeshCase {
  int world, ep, dp;
};
class MeshLayout : public testing::TestWithParam<MeshCase> {};

TEST_P(MeshLayout, GroupsFollowTheDocumentedRankOrder) {
  const MeshCase mc = GetParam();
  run_ranks(mc.world, 20.0, [&](Communicator& world) {
    ProcessMesh mesh(world, mc.ep, mc.dp);
    const int r = world.rank();
    EXPECT_EQ(mesh.ep_rank(), r % mc.ep);
    EXPECT_EQ(mesh.dp_rank(), r / mc.ep);
    EXPECT_EQ(mesh.world_rank_at(mesh.ep_rank(), mesh.dp_rank()), r);
    EXPECT_FALSE(mesh.ep_spans_hosts());  // thread ranks: one host
    EXPECT_EQ(mesh.ep_group().size(), mc.ep);
    EXPECT_EQ(mesh.ep_group().rank(), mesh.ep_rank());
    EXPECT_EQ(mesh.expert_dp_group().size(), mc.dp);
    EXPECT_EQ(mesh.expert_dp_group().rank(), mesh.dp_rank());
    // Who is in my groups: gather world ranks.
    torch::Tensor me = torch::full({1}, r, torch::kInt64);
    torch::Tensor ep_members = mesh.ep_group().all_gather(me);
    for (int e = 0; e < mc.ep; ++e)
      EXPECT_EQ(ep_members[e].item<int64_t>(), mesh.dp_rank() * mc.ep + e);
    torch::Tensor dp_members = mesh.expert_dp_group().all_gather(me);
    for (int d = 0; d < mc.dp; ++d)
      EXPECT_EQ(dp_members[d].item<int64_t>(), d * mc.ep + mesh.ep_rank());
  });
}
INSTANTIATE_TEST_SUITE_P(Layouts, MeshLayout,
                         testing::Values(MeshCase{4, 4, 1}, MeshCase{4, 2, 2}, MeshCase{4, 1, 4},
                                         MeshCase{8, 8, 1}, MeshCase{8, 4, 2}, MeshCase{8, 2, 4}),
                         [](const testing::TestParamInfo<MeshCase>& i) {
                           return "w" + std::to_string(i.param.world) + "_ep" +
                                  std::to_string(i.param.ep) + "_dp" + std::to_string(i.param.dp);
                         });

// Hosts simulated on thread ranks: which world ranks end up in each group.
struct Placement {
  std::vector<std::vector<int64_t>> ep_groups, expert_dp_groups;
  bool spans = false;
  std::string described;
};
Placement place(const std::vector<int>& host_of_rank, int ep, bool span) {
  const int W = static_cast<int>(host_of_rank.size());
  Placement p;
  p.ep_groups.resize(W / ep);
  p.expert_dp_groups.resize(ep);
  std::mutex m;
  run_ranks(W, 20.0, [&](Communicator& world) {
    HostMap hosts{host_of_rank, {}};
    for (int h = 0; h <= *std::max_element(host_of_rank.begin(), host_of_rank.end()); ++h)
      hosts.names.push_back("node" + std::to_string(h));
    ProcessMesh mesh(world, ep, W / ep, span, hosts);
    torch::Tensor me = torch::full({1}, world.rank(), torch::kInt64);
    torch::Tensor ep_members = mesh.ep_group().all_gather(me);
    torch::Tensor dp_members = mesh.expert_dp_group().all_gather(me);
    std::lock_guard<std::mutex> lock(m);
    p.ep_groups[mesh.dp_rank()] = std::vector<int64_t>(ep_members.data_ptr<int64_t>(),
                                                       ep_members.data_ptr<int64_t>() + ep);
    p.expert_dp_groups[mesh.ep_rank()] = std::vector<int64_t>(
        dp_members.data_ptr<int64_t>(), dp_members.data_ptr<int64_t>() + W / ep);
    p.spans = mesh.ep_spans_hosts();
    if (world.rank() == 0) p.described = mesh.describe();
  });
  return p;
}
using Groups = std::vector<std::vector<int64_t>>;

TEST(MeshPlacement, EpGroupsStayInsideHostsWhenRanksAlternate) {
  // mpirun --map-by node: ranks 0,2 on node0, ranks 1,3 on node1.
  Placement p = place({0, 1, 0, 1}, 2, false);
  EXPECT_EQ(p.ep_groups, (Groups{{0, 2}, {1, 3}}));
  EXPECT_EQ(p.expert_dp_groups, (Groups{{0, 1}, {2, 3}}));
  EXPECT_FALSE(p.spans);
  EXPECT_EQ(p.described,
            "2 hosts x 2 ranks per host; EP group 0: ranks 0,2 on node0; EP group 1: ranks 1,3 on "
            "node1");
}

TEST(MeshPlacement, PackedRanksKeepTheRankOrder) {
  Placement p = place({0, 0, 1, 1}, 2, false);
  EXPECT_EQ(p.ep_groups, (Groups{{0, 1}, {2, 3}}));
  EXPECT_FALSE(p.spans);
}

TEST(MeshPlacement, SpanHostsPutsEachEpGroupAcrossHosts) {
  Placement p = place({0, 0, 1, 1}, 2, true);
  EXPECT_EQ(p.ep_groups, (Groups{{0, 2}, {1, 3}}));
  EXPECT_TRUE(p.spans);
  EXPECT_EQ(p.described,
            "2 hosts x 2 ranks per host; EP group 0: ranks 0,2 on node0+node1; EP group 1: ranks "
            "1,3 on node0+node1");
}

TEST(MeshPlacement, EpLargerThanAHostSpans) {
  Placement p = place({0, 0, 1, 1}, 4, false);
  EXPECT_EQ(p.ep_groups, (Groups{{0, 1, 2, 3}}));
  EXPECT_TRUE(p.spans);
}

TEST(MeshLayoutErrors, WrongProductIsConfigError) {
  run_ranks(2, 10.0,
            [](Communicator& world) { EXPECT_THROW(ProcessMesh(world, 4, 1), ConfigError); });
}

// Send counts adding up to fewer rows than the input are refused too (the
// conformance body checks too many): they would silently leave rows unsent.
TEST(ThreadArgumentChecks, SendCountsShortOfTheInputAreRefused) {
  run_ranks(2, 10.0, [](Communicator& c) {
    torch::Tensor x = torch::zeros({4, 3});
    std::vector<int64_t> short_by_one = {2, 1}, all = {2, 2};
    try {
      c.all_to_all_v(x, short_by_one, all);
      ADD_FAILURE() << "no ShapeError";
    } catch (const ShapeError& e) {
      EXPECT_NE(std::string(e.what()).find("add up to 3 but input has 4 rows"), std::string::npos)
          << e.what();
    }
    c.barrier();  // nothing was sent: the ranks are still in step
  });
}

// ---- faults under ThreadComm ---------------------------------------------------------

namespace {
// Runs `body` on n ranks; returns each rank's CommError message ("" if none).
std::vector<std::string> comm_errors(int n, double timeout,
                                     const std::function<void(Communicator&)>& body) {
  std::vector<std::string> errors(n);
  try {
    run_ranks(n, timeout, [&](Communicator& c) {
      try {
        body(c);
      } catch (const CommError& e) {
        errors[c.rank()] = e.what();
        throw;
      }
    });
  } catch (const std::exception&) {
  }
  return errors;
}
void expect_contains(const std::string& s, const std::string& needle) {
  EXPECT_NE(s.find(needle), std::string::npos) << "'" << needle << "' not in: '" << s << "'";
}
}  // namespace

TEST(ThreadFaults, RankThatThrowsIsNamedOnEveryOtherRank) {
  std::vector<std::string> errors(3);
  try {
    run_ranks(3, 10.0, [&](Communicator& c) {
      if (c.rank() == 1) throw DataError("corrupt shard");
      try {
        torch::Tensor t = torch::ones({4});
        c.all_reduce(t);
      } catch (const CommError& e) {
        errors[c.rank()] = e.what();
        throw;
      }
    });
    FAIL() << "run_ranks did not rethrow";
  } catch (const DataError& e) {
    expect_contains(e.what(), "corrupt shard");  // the root cause is what propagates
  }
  for (int r : {0, 2}) {
    expect_contains(errors[r], "rank 1 failed");
    expect_contains(errors[r], "corrupt shard");
  }
}

TEST(ThreadFaults, StalledRankTimesOutNamingIt) {
  auto errors = comm_errors(3, 0.5, [](Communicator& c) {
    if (c.rank() == 2) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
    std::vector<int64_t> ones(3, 1);
    c.all_to_all_v(torch::zeros({3, 2}), ones, ones);
  });
  for (int r : {0, 1}) {
    expect_contains(errors[r], "rank 2 did not reach all_to_all_v");
    expect_contains(errors[r], "within 0.5 s");
  }
  expect_contains(errors[2], "aborted");  // the late rank learns of it when it arrives
}

TEST(ThreadFaults, WrongSizeIsNamedWithBothCounts) {
  auto errors = comm_errors(2, 5.0, [](Communicator& c) {
    // rank 0 sends 5 rows to rank 1; rank 1 expects 4.
    std::vector<int64_t> send =
        c.rank() == 0 ? std::vector<int64_t>{1, 5} : std::vector<int64_t>{1, 1};
    std::vector<int64_t> recv =
        c.rank() == 0 ? std::vector<int64_t>{1, 1} : std::vector<int64_t>{4, 1};
    int64_t rows = send[0] + send[1];
    c.all_to_all_v(torch::zeros({rows, 3}), send, recv);
  });
  expect_contains(errors[1], "rank 0 sent 5 rows");
  expect_contains(errors[1], "which expected 4");
  expect_contains(errors[0], "rank 0 sent 5 rows");  // the other side learns the same cause
}

TEST(ThreadFaults, WrongShapeInAllReduce) {
  auto errors = comm_errors(2, 5.0, [](Communicator& c) {
    torch::Tensor t = torch::zeros({4, c.rank() == 0 ? 8 : 16});
    c.all_reduce(t);
  });
  for (const auto& e : errors) expect_contains(e, "sent shape [4, ");
}

TEST(ThreadFaults, DifferentCollectivesAreNamed) {
  auto errors = comm_errors(2, 5.0, [](Communicator& c) {
    if (c.rank() == 0) {
      torch::Tensor t = torch::zeros({2});
      c.all_reduce(t);
    } else {
      c.barrier();
    }
  });
  for (const auto& e : errors) {
    expect_contains(e, "called all_reduce");
    expect_contains(e, "called barrier");
  }
}

TEST(ThreadFaults, RankThatReturnsEarlyFailsPeersAtOnce) {
  auto errors = comm_errors(2, 30.0, [](Communicator& c) {
    if (c.rank() == 1) return;  // leaves without the collective
    c.barrier();
  });
  expect_contains(errors[0], "rank 1 returned without reaching barrier");
}

TEST(ThreadFaults, RankThatReturnsEarlyIsSeenPastASlowerPeer) {
  // Rank 2 leaves while rank 1 (a lower slot) is still busy: rank 0 must fail
  // at once naming rank 2, not wait out the timeout and blame rank 1.
  std::atomic<bool> rank0_failed{false};
  auto errors = comm_errors(3, 5.0, [&](Communicator& c) {
    if (c.rank() == 2) return;
    if (c.rank() == 1) {
      auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!rank0_failed && std::chrono::steady_clock::now() < until)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    try {
      c.barrier();
    } catch (const CommError&) {
      if (c.rank() == 0) rank0_failed = true;
      throw;
    }
  });
  expect_contains(errors[0], "rank 2 returned without reaching barrier");
  expect_contains(errors[1], "aborted");
}

// ---- MPI: the same bodies under mpirun --------------------------------------------------

#if MOE_HAVE_MPI
namespace {
MpiComm& mpi_world() {
  static std::unique_ptr<MpiComm> world = [] {
    auto w = MpiComm::world(30.0);
    set_current_rank(w->rank());
    return w;
  }();
  return *world;
}
// Skips outside mpirun; with --mpi-world=N (ctest) fails unless the world has N ranks.
#define MOE_REQUIRE_MPIRUN() \
  MOE_REQUIRE_MPI_WORLD(MpiComm::launched_by_mpirun(), mpi_world().size())
}  // namespace

#define MOE_MPI_CONFORMANCE(Name, body) \
  TEST(MpiConformance, Name) {          \
    MOE_REQUIRE_MPIRUN();               \
    body(mpi_world());                  \
    mpi_world().barrier();              \
  }
MOE_MPI_CONFORMANCE(AllToAll, body_all_to_all)
MOE_MPI_CONFORMANCE(AllToAllV, body_all_to_all_v)
MOE_MPI_CONFORMANCE(AllReduce, body_all_reduce)
MOE_MPI_CONFORMANCE(AllGather, body_all_gather)
MOE_MPI_CONFORMANCE(ReduceScatter, body_reduce_scatter)
MOE_MPI_CONFORMANCE(Broadcast, body_broadcast)
MOE_MPI_CONFORMANCE(BarrierSplit, body_barrier_and_split)
MOE_MPI_CONFORMANCE(ArgumentChecks, body_argument_checks)
MOE_MPI_CONFORMANCE(Consistency, body_consistency)

TEST(MpiConformance, Mesh) {
  MOE_REQUIRE_MPIRUN();
  MpiComm& world = mpi_world();
  for (int ep = 1; ep <= world.size(); ++ep) {
    if (world.size() % ep) continue;
    ProcessMesh mesh(world, ep, world.size() / ep);
    torch::Tensor me = torch::full({1}, world.rank(), torch::kInt64);
    torch::Tensor members = mesh.ep_group().all_gather(me);
    for (int e = 0; e < ep; ++e)
      EXPECT_EQ(members[e].item<int64_t>(), mesh.world_rank_at(e, mesh.dp_rank()));
  }
}

// Fault scenarios: run by ctest as `mpirun -np 2 ... comm_tests
// --gtest_filter=MpiFault.X` with MOE_FAULT_SCENARIO=1, through
// tests/expect_failure.sh, which checks the output and the exit code. The
// detecting rank prints FAULT-DETECTED and the CommError, then aborts the job
// with kExitComm (3), as `moe train` does; a job that ends any other way (no
// detection, mpirun killing it first, a hang) fails the test.
namespace {
[[noreturn]] void report_and_abort(const std::string& what) {
  std::fprintf(stderr, "FAULT-DETECTED on rank %d: %s\n", mpi_world().rank(), what.c_str());
  std::fflush(stderr);
  MpiComm::abort_job(kExitComm);
}
#define MOE_REQUIRE_FAULT_SCENARIO()      \
  MOE_REQUIRE_MPIRUN();                   \
  if (!std::getenv("MOE_FAULT_SCENARIO")) \
  GTEST_SKIP() << "fault scenario: run by ctest with MOE_FAULT_SCENARIO=1"
}  // namespace

TEST(MpiFault, StalledRankIsNamed) {
  MOE_REQUIRE_FAULT_SCENARIO();
  MpiComm& c = mpi_world();
  c.set_timeout_s(1.0);
  c.barrier();
  if (c.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(20));
  std::vector<int64_t> ones(c.size(), 1);
  try {
    c.all_to_all_v(torch::zeros({c.size(), 2}), ones, ones);
  } catch (const CommError& e) {
    report_and_abort(e.what());
  }
}

TEST(MpiFault, WrongSizeIsNamed) {
  MOE_REQUIRE_FAULT_SCENARIO();
  MpiComm& c = mpi_world();
  c.set_timeout_s(5.0);
  std::vector<int64_t> send(c.size(), 1), recv(c.size(), 1);
  if (c.rank() == 0) send[1] = 3;  // rank 1 expects 1 row from rank 0
  int64_t rows = 0;
  for (auto s : send) rows += s;
  try {
    c.all_to_all_v(torch::zeros({rows, 2}), send, recv);
  } catch (const CommError& e) {
    report_and_abort(e.what());
  }
}

// Rank 1 dies without MPI_Finalize. ctest runs this with mpirun told not to
// end the job on a rank's non-zero exit (--mca orte_abort_on_non_zero_status
// 0), so the surviving rank 0 must notice by itself, name rank 1 and the
// operation, and end the job. Were the all_to_all_v to return normally on
// rank 0, the test body fails (and the job exits 1, not 3).
TEST(MpiFault, RankThatExitsIsNamedBySurvivor) {
  MOE_REQUIRE_FAULT_SCENARIO();
  MpiComm& c = mpi_world();
  ASSERT_EQ(c.size(), 2) << "the scenario is written for 2 ranks";
  c.set_timeout_s(3.0);
  c.barrier();
  if (c.rank() == 1) std::_Exit(7);  // dies mid-run without MPI_Finalize
  std::vector<int64_t> ones(c.size(), 1);
  try {
    c.all_to_all_v(torch::zeros({c.size(), 2}), ones, ones);
    ADD_FAILURE() << "all_to_all_v with a dead peer returned normally";
  } catch (const CommError& e) {
    report_and_abort(e.what());
  }
}
#endif

// =====================================================================================
// Devices (issue 11): device selection, CUDA tensors on every backend, NCCL.
// GPU cases are named *Cuda* / *Gpu* (launch/gpu-check.sh runs them with a
// gtest filter); without a GPU they skip, and the CPU-side behaviour
// (local-rank parsing, `cuda` refused cleanly) is tested here.
// =====================================================================================
#include "moe/comm/device.h"
#include "moe/comm/launch.h"
#if MOE_HAVE_NCCL
#include "moe/comm/nccl_comm.h"
#endif

namespace {
// Sets environment variables for one test and restores them afterwards.
class ScopedEnv {
 public:
  void set(const char* name, const char* value) {
    save(name);
    if (value)
      ::setenv(name, value, 1);
    else
      ::unsetenv(name);
  }
  ~ScopedEnv() {
    for (auto& [name, old] : saved_) {
      if (old.first)
        ::setenv(name.c_str(), old.second.c_str(), 1);
      else
        ::unsetenv(name.c_str());
    }
  }

 private:
  void save(const char* name) {
    if (saved_.count(name)) return;
    const char* v = std::getenv(name);
    saved_[name] = {v != nullptr, v ? v : ""};
  }
  std::map<std::string, std::pair<bool, std::string>> saved_;
};

const char* const kLocalRankVars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID",
                                      "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "LOCAL_RANK"};

#define MOE_REQUIRE_GPU() \
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA GPU (or a CPU LibTorch)"

// Every collective on CUDA tensors: results on the caller's GPU, equal to the CPU oracle.
void body_cuda_tensors(Communicator& c, const torch::Device& dev) {
  const int n = c.size(), me = c.rank();
  for (auto dt : kDtypes) {
    UnevenExchange x = uneven_exchange(me, n, dt);
    torch::Tensor in = x.input.to(dev);
    torch::Tensor out = c.all_to_all_v(in, x.send, x.recv);
    ASSERT_EQ(out.device(), dev);
    // Into a caller-provided buffer too.
    torch::Tensor into = torch::full_like(out, 7);
    c.all_to_all_v(in, x.send, x.recv, into);
    EXPECT_TRUE(torch::equal(into, out));
    expect_uneven_blocks(out.cpu(), x.recv, me, dt);
    torch::Tensor t = torch::full({4, 3}, me + 1, torch::kFloat64).to(dt).to(dev);
    c.all_reduce(t, ReduceOp::Sum);
    ASSERT_EQ(t.device(), dev);
    EXPECT_TRUE(torch::equal(t.cpu(), torch::full({4, 3}, n * (n + 1) / 2, torch::kFloat64).to(dt)));
    torch::Tensor g = c.all_gather(block(me, 0, 2, {3}, dt).to(dev));
    ASSERT_EQ(g.device(), dev);
    for (int src = 0; src < n; ++src)
      EXPECT_TRUE(torch::equal(g.cpu().slice(0, 2 * src, 2 * src + 2), block(src, 0, 2, {3}, dt)));
    torch::Tensor b = block(me, me, 3, {2}, dt).to(dev);
    c.broadcast(b, n - 1);
    ASSERT_EQ(b.device(), dev);
    EXPECT_TRUE(torch::equal(b.cpu(), block(n - 1, n - 1, 3, {2}, dt)));
  }
  c.barrier();
}
}  // namespace

TEST(DeviceSelection, LocalRankFromTheLaunchersEnvironment) {
  ScopedEnv env;
  for (const char* v : kLocalRankVars) env.set(v, nullptr);
  EXPECT_EQ(local_rank_from_env(), -1);
  env.set("LOCAL_RANK", "5");
  EXPECT_EQ(local_rank_from_env(), 5);
  env.set("SLURM_LOCALID", "3");
  EXPECT_EQ(local_rank_from_env(), 3);  // SLURM before the generic LOCAL_RANK
  env.set("OMPI_COMM_WORLD_LOCAL_RANK", "1");
  EXPECT_EQ(local_rank_from_env(), 1);  // Open MPI first
  env.set("OMPI_COMM_WORLD_LOCAL_RANK", "one");
  try {
    local_rank_from_env();
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    expect_contains(e.what(), "OMPI_COMM_WORLD_LOCAL_RANK = 'one'");
  }
  env.set("OMPI_COMM_WORLD_LOCAL_RANK", "-2");
  EXPECT_THROW(local_rank_from_env(), ConfigError);
}

TEST(DeviceSelection, ParsesDeviceKinds) {
  EXPECT_EQ(default_config({"parallel.device=cpu"}).parallel.device, DeviceKind::Cpu);
  EXPECT_EQ(default_config().parallel.device, DeviceKind::Auto);
  EXPECT_STREQ(enum_name(DeviceKind::Cuda), "cuda");
  if (MOE_TORCH_CUDA)
    EXPECT_EQ(default_config({"parallel.device=cuda"}).parallel.device, DeviceKind::Cuda);
  else  // refused when the config is validated, before any rank starts
    EXPECT_THROW(default_config({"parallel.device=cuda"}), ConfigError);
  try {
    default_config({"parallel.device=gpu"});
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    expect_contains(e.what(), "parallel.device = 'gpu' is not allowed: choose one of auto | cpu | cuda");
  }
}

TEST(DeviceSelection, CpuAndAuto) {
  EXPECT_EQ(select_device(DeviceKind::Cpu, 3), torch::Device(torch::kCPU));
  const int n = cuda_device_count();
  if (!torch_has_cuda()) {
    EXPECT_EQ(n, 0);
  }
  if (n == 0)
    EXPECT_EQ(select_device(DeviceKind::Auto, 3), torch::Device(torch::kCPU));
  else
    EXPECT_EQ(select_device(DeviceKind::Auto, 3), torch::Device(torch::kCUDA, 3 % n));
  EXPECT_THROW(select_device(DeviceKind::Cpu, -1), ConfigError);
  EXPECT_EQ(describe_device(torch::Device(torch::kCPU)), "cpu");
  bind_device(torch::Device(torch::kCPU));  // nothing to do, never throws
}

TEST(DeviceSelection, CudaRefusedCleanlyWithoutAGpu) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is visible: see CudaDevice.*";
  try {
    select_device(DeviceKind::Cuda, 0);
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.exit_code(), kExitBadInput);
    // Says which is missing: the CUDA LibTorch, or a visible GPU.
    expect_contains(e.what(), torch_has_cuda() ? "no CUDA GPU is visible" : "has no CUDA");
    expect_contains(e.what(), "parallel.device = 'cuda'");
  }
}

TEST(DeviceSelection, ThreadRanksAreTheirOwnLocalRanks) {
  run_ranks(3, 10.0, [](Communicator& c) { EXPECT_EQ(node_local_rank(c), c.rank()); });
}

TEST(DeviceSelection, NcclBackendSaysWhatIsMissing) {
#if MOE_HAVE_NCCL
  GTEST_SKIP() << "this build has the NCCL backend";
#else
  try {
    resolve_backend("nccl");
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    expect_contains(e.what(), "parallel.backend = 'nccl' but this build has no NCCL backend");
    expect_contains(e.what(), MOE_TORCH_CUDA ? "NCCL was not found" : "is CPU-only");
  }
#endif
}

TEST(DeviceSelection, OtherDevicesAreRefusedByName) {
  run_ranks(1, 10.0, [](Communicator& c) {
    torch::Tensor meta = torch::empty({2, 2}, torch::TensorOptions().device(torch::kMeta));
    try {
      c.all_reduce(meta, ReduceOp::Sum);
      ADD_FAILURE() << "no ShapeError";
    } catch (const ShapeError& e) {
      expect_contains(e.what(), "carries CPU and CUDA tensors only");
    }
  });
}

TEST(CudaDevice, SelectsLocalRankModuloVisibleGpus) {
  MOE_REQUIRE_GPU();
  const int n = cuda_device_count();
  for (int local = 0; local < 2 * n + 1; ++local)
    EXPECT_EQ(select_device(DeviceKind::Cuda, local), torch::Device(torch::kCUDA, local % n));
  expect_contains(describe_device(torch::Device(torch::kCUDA, 0)), "cuda:0 (");
}

class CudaThreadComm : public testing::TestWithParam<int> {};
TEST_P(CudaThreadComm, StagesCudaTensorsThroughHost) {
  MOE_REQUIRE_GPU();
  // All thread ranks share GPU 0 when there is one GPU.
  run_ranks(GetParam(), 60.0, [](Communicator& c) {
    torch::Device dev = select_device(DeviceKind::Cuda, c.rank());
    bind_device(dev);
    body_cuda_tensors(c, dev);
  });
}
INSTANTIATE_TEST_SUITE_P(World, CudaThreadComm, testing::Values(1, 2, 3),
                         [](const testing::TestParamInfo<int>& i) {
                           return "w" + std::to_string(i.param);
                         });

#if MOE_HAVE_MPI
// Under mpirun (launch/gpu-check.sh: mpirun -np 2 comm_tests --gtest_filter=MpiCuda*).
TEST(MpiCudaConformance, StagesCudaTensorsThroughHost) {
  MOE_REQUIRE_MPIRUN();
  MOE_REQUIRE_GPU();
  torch::Device dev = select_device(DeviceKind::Cuda, node_local_rank(mpi_world()));
  bind_device(dev);
  body_cuda_tensors(mpi_world(), dev);
  mpi_world().barrier();
}
#endif

#if MOE_HAVE_NCCL
// NCCL conformance: the CPU bodies (control plane staged through the GPU)
// and the CUDA body, on an NCCL world bootstrapped over thread ranks.
class NcclGpuConformance : public testing::TestWithParam<int> {};
TEST_P(NcclGpuConformance, AllBodies) {
  MOE_REQUIRE_GPU();
  const int world = GetParam();
  if (world > cuda_device_count() && !NcclComm::multi_rank_gpu_allowed())
    GTEST_SKIP() << world << " ranks on " << cuda_device_count() << " GPU(s) need NCCL >= 2.30 "
                 << "with NCCL_MULTI_RANK_GPU_ENABLE=1; this NCCL is " << NcclComm::runtime_version();
  run_ranks(world, 120.0, [](Communicator& boot) {
    torch::Device dev = select_device(DeviceKind::Cuda, boot.rank());
    bind_device(dev);
    auto nccl = NcclComm::create(boot, dev.index(), 60.0);
    ASSERT_EQ(nccl->rank(), boot.rank());
    ASSERT_EQ(nccl->size(), boot.size());
    body_cuda_tensors(*nccl, dev);
    for (const auto& [name, body] : kBodies) {
      SCOPED_TRACE(name);
      body(*nccl);
    }
  });
}
INSTANTIATE_TEST_SUITE_P(World, NcclGpuConformance, testing::Values(1, 2),
                         [](const testing::TestParamInfo<int>& i) {
                           return "w" + std::to_string(i.param);
                         });

TEST(NcclGpuLaunch, BackendNcclRunsOnThreadRanks) {
  MOE_REQUIRE_GPU();
  if (cuda_device_count() < 2 && !NcclComm::multi_rank_gpu_allowed())
    GTEST_SKIP() << "2 ranks on 1 GPU need NCCL >= 2.30 with NCCL_MULTI_RANK_GPU_ENABLE=1";
  std::atomic<int> ran{0};
  run_on_world(resolve_backend("nccl"), 2, 60.0, [&](Communicator& c) {
    EXPECT_EQ(c.backend_name(), "nccl");
    torch::Tensor t = torch::ones({3}, torch::TensorOptions().device(c.data_device()));
    c.all_reduce(t, ReduceOp::Sum);
    EXPECT_TRUE(torch::equal(t.cpu(), torch::full({3}, 2.0)));
    ++ran;
  });
  EXPECT_EQ(ran.load(), 2);
}

TEST(NcclGpuLaunch, DeviceCpuIsRefused) {
  try {
    run_on_world("nccl", 1, 10.0, [](Communicator&) {}, DeviceKind::Cpu);
    ADD_FAILURE() << "no ConfigError";
  } catch (const ConfigError& e) {
    expect_contains(e.what(), "parallel.device = 'cpu'");
  }
}
#endif
