// moe::distributed::or_abort under mpirun -np 2: rank 1 throws after the ranks have agreed, while
// rank 0 already waits in the next collective. The job must end (MPI_Abort), not hang, and say
// why: ctest passes on the message "moe: rank 1 of 2 aborts the job: moe: injected failure"
// within the test's TIMEOUT.
#include <cstdio>

#include "moe/distributed/agree.hpp"

#include <mpi.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  moe::distributed::or_abort(MPI_COMM_WORLD, [&] {
    if (rank == 1) throw moe::value_error("moe: injected failure");
  });
  MPI_Barrier(MPI_COMM_WORLD);  // rank 0 waits here for a rank that is gone
  std::printf("mpi_abort_test: the job was not aborted\n");
  MPI_Finalize();
  return 0;
}
