// main() of the suites that also run under mpirun: MPI is finalised after the
// tests (it is initialised lazily by the first Mpi* test). `--mpi-world=N`
// (after the gtest flags) sets the world size the Mpi* tests must see.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <iostream>

#include "test_support.h"
#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--mpi-world=", 12) == 0) {
      char* end = nullptr;
      long n = std::strtol(argv[i] + 12, &end, 10);
      if (*end != '\0' || n < 1) {
        std::cerr << "bad argument '" << argv[i] << "': expected --mpi-world=N with N >= 1\n";
        return 2;
      }
      moe::testing_support::expected_mpi_world() = static_cast<int>(n);
    } else {
      std::cerr << "unknown argument '" << argv[i] << "' (gtest flags, or --mpi-world=N)\n";
      return 2;
    }
  }
  int rc = RUN_ALL_TESTS();
#if MOE_HAVE_MPI
  moe::comm::MpiComm::finalize();
#endif
  return rc;
}
