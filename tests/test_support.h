// Helpers shared by the test suites.
#pragma once
#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace moe::testing_support {

// Runs a shell command (stderr merged into stdout); returns its exit code.
inline int run_command(const std::string& cmd, std::string* output = nullptr) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int status = pclose(p);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

#ifdef MOE_BINARY
// Runs `ENV build/bin/moe ARGS`; returns the exit code. `env` is a shell
// prefix such as "MOE_CPU_CACHE_MB=0".
inline int run_moe(const std::string& args, std::string* output = nullptr,
                   const std::string& env = "") {
  return run_command(env + (env.empty() ? "" : " ") + std::string(MOE_BINARY) + " " + args,
                     output);
}
#endif

// The world size the Mpi* tests must see: `--mpi-world=N` on the test
// binary's command line (ctest passes mpirun's -np; test_main.cpp parses it).
// 0 = not given (a manual run): Mpi* tests then skip outside mpirun.
inline int& expected_mpi_world() {
  static int n = 0;
  return n;
}

}  // namespace moe::testing_support

// First statement of every Mpi* test. With --mpi-world=N the test fails
// unless mpirun launched it into a world of exactly N ranks (a wrong or
// missing mpirun starts N one-rank "worlds", which would otherwise pass);
// without it, the test skips outside mpirun. `world_size` is evaluated only
// under mpirun.
#define MOE_REQUIRE_MPI_WORLD(launched, world_size)                                          \
  do {                                                                                      \
    const int expect_ = ::moe::testing_support::expected_mpi_world();                      \
    if (!(launched)) {                                                                      \
      if (expect_ > 0) {                                                                    \
        FAIL() << "--mpi-world=" << expect_                                                 \
               << " was given but this process was not started by mpirun: run it as "      \
                  "`mpirun -np "                                                            \
               << expect_ << " <binary> --mpi-world=" << expect_ << "` (ctest does)";      \
      }                                                                                     \
      GTEST_SKIP() << "run under mpirun (ctest does)";                                      \
    }                                                                                       \
    if (expect_ > 0) {                                                                      \
      ASSERT_EQ((world_size), expect_)                                                      \
          << "the MPI world does not have the ranks mpirun was asked for (-np " << expect_ \
          << "): is `mpirun` the launcher of the MPI this binary links?";                   \
    }                                                                                       \
  } while (0)

// The statement throws `type` and its message contains `needle`.
#define EXPECT_THROW_MSG(statement, type, needle)                                    \
  do {                                                                               \
    try {                                                                            \
      statement;                                                                     \
      ADD_FAILURE() << #statement " did not throw " #type;                           \
    } catch (const type& e) {                                                        \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what(); \
    }                                                                                \
  } while (0)
