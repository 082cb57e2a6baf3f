// main() of the suites that also run under mpirun: MPI is finalised after the
// tests (it is initialised lazily by the first Mpi* test).
#include <gtest/gtest.h>

#if MOE_HAVE_MPI
#include "moe/comm/mpi_comm.h"
#endif

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  int rc = RUN_ALL_TESTS();
#if MOE_HAVE_MPI
  moe::comm::MpiComm::finalize();
#endif
  return rc;
}
