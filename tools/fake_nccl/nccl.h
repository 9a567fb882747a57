// tools/fake_nccl/nccl.h: a stand-in for NCCL, and for the CUDA runtime calls that train.c's NCCL path
// makes, done with MPI on host memory. tools/test_mpi.sh builds train.c's GPU data-parallel path against
// it, with the CPU build (whose device memory is host memory): build/fakenccl/train. So CI runs that
// path without a GPU: the communicator made from rank 0's id, which buffer is reduced and when, the
// mean. It is not NCCL and checks nothing of NCCL's own behaviour: tools/gpu_check.sh runs the real one.
#ifndef FAKE_NCCL_H
#define FAKE_NCCL_H
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <string.h>

typedef enum { cudaSuccess = 0, cudaErrorNotReady = 600 } cudaError_t;
typedef void *cudaStream_t;
static inline cudaError_t cudaStreamQuery(cudaStream_t stream) { (void)stream; return cudaSuccess; } // all done
static inline const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "not ready"; }

typedef enum { ncclSuccess = 0, ncclInvalidArgument = 4 } ncclResult_t;
typedef enum { ncclFloat = 7 } ncclDataType_t;
typedef enum { ncclAvg = 4 } ncclRedOp_t;
typedef struct { char internal[128]; } ncclUniqueId;
typedef struct { int rank, ranks; } FakeComm;
typedef FakeComm *ncclComm_t;

static inline const char *ncclGetErrorString(ncclResult_t r) { return r == ncclSuccess ? "no error" : "invalid argument"; }
static inline ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "fake NCCL id of rank 0");
    return ncclSuccess;
}
// Every rank must bring rank 0's id, as NCCL needs (train.c sends it with MPI_Bcast).
static inline ncclResult_t ncclCommInitRank(ncclComm_t *comm, int ranks, ncclUniqueId id, int rank) {
    static FakeComm the_comm;
    if (strcmp(id.internal, "fake NCCL id of rank 0") != 0 || rank < 0 || rank >= ranks) return ncclInvalidArgument;
    the_comm.rank = rank, the_comm.ranks = ranks;
    *comm = &the_comm;
    fprintf(stderr, "fake NCCL: communicator of rank %d of %d\n", rank, ranks);
    return ncclSuccess;
}
static inline ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t type,
                                         ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    (void)stream;
    if (type != ncclFloat || op != ncclAvg || count > INT_MAX) return ncclInvalidArgument;
    if (send != recv) memcpy(recv, send, count * sizeof(float));
    MPI_Allreduce(MPI_IN_PLACE, recv, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (size_t i = 0; i < count; i++) ((float *)recv)[i] /= comm->ranks;
    return ncclSuccess;
}
static inline ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *error) {
    (void)comm;
    *error = ncclSuccess;
    return ncclSuccess;
}
static inline ncclResult_t ncclCommDestroy(ncclComm_t comm) { (void)comm; return ncclSuccess; }
#endif
