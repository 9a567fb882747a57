// cuda_on_cpu.h: runs the CUDA subset that sparse_transformer.cu uses on a CPU.
//
// The same sparse_transformer.cu is compiled by nvcc for the GPU and, through this header, by g++
// as plain C++ for the CPU, so the real kernels (not a hand-kept CPU copy) run in CI and on laptops.
//
// How it works:
//   - A launch runs the grid's blocks in parallel over OpenMP threads, one block per OS thread at a time.
//   - The threads of a block run as fibers (stacks of their own, switched with _setjmp/_longjmp; see
//     switch_context): each runs until it reaches __syncthreads(),
//     then the next one runs; when every thread waits at the same barrier they are all released.
//     A barrier that some thread of the block does not reach (it waits elsewhere, or has returned)
//     is a bug on the GPU (undefined behaviour): it aborts here with the file and line.
//   - Kernels without barriers are run as plain function calls, thread after thread (much cheaper).
//     The choice is made per block: the first thread runs as a fiber; if it finishes without meeting a
//     barrier, the others run as plain calls, and a barrier met by one of them aborts with a clear message.
//   - __shared__ variables become thread_local: per OS thread, so per running block, and shared by
//     the block's fibers. Dynamic shared memory must be declared once at file scope as
//     `extern __shared__ float smem[];` (this header defines that one name; g++ mishandles a
//     block-scope extern thread_local inside a template).
//   - CUDA_EMU_REVERSE=1 in the environment runs threads (and blocks) in reverse order: a kernel that
//     forgot a barrier between writing and reading shared memory gives different results then.
//   - cudaMalloc is an aligned malloc; copies are memcpy. Memory is host memory.
//   - cublasSgemm, the one cuBLAS call the model makes, is a blocked matrix product on the host.
#pragma once
#ifdef __CUDACC__
#error "cuda_on_cpu.h is for the CPU build only: nvcc uses the real CUDA runtime"
#endif

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>
#include <omp.h>
#include <setjmp.h>
#include <ucontext.h>

// ----------------------------------------------------------------------------
// Keywords, built-in types and variables

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct int4 { int x, y, z, w; };

static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;

// Dynamic shared memory of the running block (the largest an H100/H200 block may opt in to).
#define CUDA_EMU_MAX_SHARED_BYTES (227 * 1024)
alignas(16) thread_local float smem[CUDA_EMU_MAX_SHARED_BYTES / sizeof(float)];

// ----------------------------------------------------------------------------
// Runtime API: errors, memory, synchronisation

enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2, cudaErrorInvalidValue = 1 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
struct cudaDeviceProp { char name[256]; size_t totalGlobalMem; int multiProcessorCount; };

inline const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorMemoryAllocation: return "out of memory";
    default: return "invalid value";
    }
}
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *count) { *count = 1; return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    snprintf(p->name, sizeof p->name, "CPU (CUDA emulated by cuda_on_cpu.h, %d OpenMP threads)",
             omp_get_max_threads());
    p->totalGlobalMem = 0;
    p->multiProcessorCount = omp_get_max_threads();
    return cudaSuccess;
}
inline cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    *ptr = aligned_alloc(64, (bytes + 63) / 64 * 64);
    return *ptr || bytes == 0 ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T> inline cudaError_t cudaMalloc(T **ptr, size_t bytes) {
    return cudaMalloc(reinterpret_cast<void **>(ptr), bytes);
}
inline cudaError_t cudaFree(void *ptr) { free(ptr); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind) {
    memcpy(dst, src, bytes);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *dst, int value, size_t bytes) {
    memset(dst, value, bytes);
    return cudaSuccess;
}
template <typename K> inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int bytes) {
    return bytes <= CUDA_EMU_MAX_SHARED_BYTES ? cudaSuccess : cudaErrorInvalidValue;
}

// ----------------------------------------------------------------------------
// cuBLAS: the one call the model uses, cublasSgemm, column-major as cuBLAS defines it:
//   C (m x n) = alpha op(A) op(B) + beta C,  op(A) m x k, op(B) k x n, X(i, j) = X[i + j * ldX]
// How: op(A) and op(B) are first copied into contiguous panels (zero-padded to whole tiles), then
// C is computed in tiles of 16 x 4 held in registers while p runs over k: each step loads 16 values
// of A and 4 of B for 64 multiply-adds. Each element of C is summed by one OpenMP thread in a fixed
// order, so results do not depend on the number of threads: a CPU run is repeatable bit for bit.

enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
struct cublasContext {};
typedef cublasContext *cublasHandle_t;

inline cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    static cublasContext context;
    *handle = &context;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t) { return CUBLAS_STATUS_SUCCESS; }

inline cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t opA, cublasOperation_t opB, int m, int n,
                                  int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                                  const float *beta, float *C, int ldc) {
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int TM = 16, TN = 4, M = (m + TM - 1) / TM * TM, N = (n + TN - 1) / TN * TN;
    // panels: a (k, M): column p of op(A), padded to M rows; b (N, k): column j of op(B), contiguous
    std::vector<float> a((size_t)k * M, 0.0f), b((size_t)N * k, 0.0f);
#pragma omp parallel for schedule(static)
    for (int p = 0; p < k; p++)
        for (int i = 0; i < m; i++) a[(size_t)p * M + i] = opA == CUBLAS_OP_N ? A[i + (size_t)p * lda] : A[p + (size_t)i * lda];
#pragma omp parallel for schedule(static)
    for (int j = 0; j < n; j++)
        for (int p = 0; p < k; p++) b[(size_t)j * k + p] = opB == CUBLAS_OP_N ? B[p + (size_t)j * ldb] : B[j + (size_t)p * ldb];
#pragma omp parallel for collapse(2) schedule(static)
    for (int j0 = 0; j0 < N; j0 += TN) {
        for (int i0 = 0; i0 < M; i0 += TM) {
            float acc[TN][TM] = {};
            for (int p = 0; p < k; p++) {
                const float *ap = &a[(size_t)p * M + i0];
                for (int jj = 0; jj < TN; jj++) {
                    const float bp = b[(size_t)(j0 + jj) * k + p];
#pragma omp simd
                    for (int ii = 0; ii < TM; ii++) acc[jj][ii] += ap[ii] * bp;
                }
            }
            for (int jj = 0; jj < TN && j0 + jj < n; jj++) {
                float *c = C + (size_t)(j0 + jj) * ldc;
                for (int ii = 0; ii < TM && i0 + ii < m; ii++)
                    c[i0 + ii] = *alpha * acc[jj][ii] + (*beta == 0.0f ? 0.0f : *beta * c[i0 + ii]);
            }
        }
    }
    return CUBLAS_STATUS_SUCCESS;
}

// ----------------------------------------------------------------------------
// The block scheduler: threads as fibers, barriers as cooperative switches

#define __syncthreads() cuda_emu::syncthreads(__FILE__, __LINE__)

namespace cuda_emu {

const size_t FIBER_STACK_BYTES = 256 * 1024;
const unsigned MAX_THREADS = 1024;

// Switching between fibers. swapcontext also saves the signal mask, a system call each time;
// _setjmp/_longjmp do not, and are about 20x cheaper, so they do the switching. A fresh stack can only
// be entered with makecontext/swapcontext, which is used once per fiber. AddressSanitizer follows
// swapcontext but not jumps between stacks, so the sanitizer build switches with swapcontext only.
#if defined(__SANITIZE_ADDRESS__) // g++ says so; clang answers __has_feature
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#if defined(CUDA_EMU_ASAN)
typedef ucontext_t Context;
inline void switch_context(Context *from, Context *to) { swapcontext(from, to); }
inline void enter_new_stack(Context *from, ucontext_t *start) { swapcontext(from, start); }
#else
struct Context { jmp_buf jump; };
inline void switch_context(Context *from, Context *to) {
    if (_setjmp(from->jump) == 0) _longjmp(to->jump, 1);
}
inline void enter_new_stack(Context *from, ucontext_t *start) {
    ucontext_t abandoned; // the fiber comes back with _longjmp to `from`, never to this
    if (_setjmp(from->jump) == 0) swapcontext(&abandoned, start);
}
#endif

// A fiber lives as long as its OS thread and runs one GPU thread after another.
struct Fiber {
    Context context;
    std::vector<char> stack;
    uint3 thread;
    bool finished;
    const char *barrier_file; // where it waits, or NULL while it runs
    int barrier_line;
};

// Scheduler state of the block running on this OS thread.
struct BlockState {
    Context scheduler;
    Fiber *fibers[MAX_THREADS]; // created on first use
    Fiber *current;             // the fiber running now, NULL in plain mode
    const char *kernel;         // for error messages
    void (*body)(void *);       // runs the kernel for the current threadIdx
    void *body_arg;
};
static thread_local BlockState block_state;

inline bool reverse_order(void) {
    static const bool reverse = getenv("CUDA_EMU_REVERSE") && atoi(getenv("CUDA_EMU_REVERSE")) != 0;
    return reverse;
}

[[noreturn]] inline void fail(const char *what) {
    fprintf(stderr, "cuda_on_cpu: kernel %s, block (%u,%u,%u): %s\n", block_state.kernel, blockIdx.x,
            blockIdx.y, blockIdx.z, what);
    exit(1);
}

inline void syncthreads(const char *file, int line) {
    BlockState &bs = block_state;
    if (!bs.current) {
        char msg[512];
        snprintf(msg, sizeof msg,
                 "thread (%u,%u,%u) reached __syncthreads() at %s:%d, but thread %u, run first, finished "
                 "without reaching any barrier: a barrier must be reached by every live thread of the block",
                 threadIdx.x, threadIdx.y, threadIdx.z, file, line, bs.fibers[0]->thread.x);
        fail(msg);
    }
    bs.current->barrier_file = file;
    bs.current->barrier_line = line;
    switch_context(&bs.current->context, &bs.scheduler);
}

// The life of a fiber: wait to be given a thread, run the kernel for it, say so, wait again.
inline void fiber_main(void) {
    BlockState &bs = block_state;
    Fiber *self = bs.current;
    for (;;) {
        switch_context(&self->context, &bs.scheduler);
        bs.body(bs.body_arg);
        self->finished = true;
    }
}

inline Fiber *fiber(unsigned k) {
    BlockState &bs = block_state;
    if (!bs.fibers[k]) {
        Fiber *f = bs.fibers[k] = new Fiber();
        f->stack.resize(FIBER_STACK_BYTES);
        ucontext_t start;
        getcontext(&start);
        start.uc_stack.ss_sp = f->stack.data();
        start.uc_stack.ss_size = f->stack.size();
        start.uc_link = NULL;
        makecontext(&start, fiber_main, 0);
        bs.current = f;
        enter_new_stack(&bs.scheduler, &start); // returns when fiber_main first waits
    }
    return bs.fibers[k];
}

// Resumes `f` until it waits at a barrier or finishes.
inline void resume(Fiber *f) {
    BlockState &bs = block_state;
    bs.current = f;
    threadIdx = f->thread;
    f->barrier_file = NULL;
    switch_context(&bs.scheduler, &f->context);
}

inline void start_thread(Fiber *f, uint3 thread) {
    f->thread = thread;
    f->finished = false;
    resume(f);
}

inline uint3 thread_of(unsigned t, dim3 block) {
    return uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
}

// Runs every thread of the current block (blockIdx, blockDim already set).
inline void run_block(void) {
    BlockState &bs = block_state;
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    const bool reverse = reverse_order();
    auto nth = [&](unsigned k) { return reverse ? n - 1 - k : k; };

    // The first thread as a fiber: it tells whether this kernel uses barriers.
    start_thread(fiber(0), thread_of(nth(0), blockDim));
    if (fiber(0)->finished) {
        bs.current = NULL;
        for (unsigned k = 1; k < n; k++) {
            threadIdx = thread_of(nth(k), blockDim);
            bs.body(bs.body_arg);
        }
        return;
    }
    for (unsigned k = 1; k < n; k++) start_thread(fiber(k), thread_of(nth(k), blockDim));
    for (;;) {
        // Every thread now waits at a barrier or has finished: all must be at the same barrier.
        const Fiber *waiting = NULL, *exited = NULL;
        for (unsigned k = 0; k < n; k++) {
            const Fiber *f = bs.fibers[k];
            if (f->finished) {
                exited = f;
                continue;
            }
            if (waiting && (f->barrier_line != waiting->barrier_line ||
                            strcmp(f->barrier_file, waiting->barrier_file) != 0)) {
                char msg[512];
                snprintf(msg, sizeof msg,
                         "threads wait at different barriers: thread %u at %s:%d, thread %u at %s:%d",
                         waiting->thread.x, waiting->barrier_file, waiting->barrier_line, f->thread.x,
                         f->barrier_file, f->barrier_line);
                fail(msg);
            }
            waiting = f;
        }
        if (!waiting) return;
        if (exited) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "thread %u finished while thread %u waits at __syncthreads() at %s:%d: a barrier "
                     "must be reached by every live thread of the block",
                     exited->thread.x, waiting->thread.x, waiting->barrier_file, waiting->barrier_line);
            fail(msg);
        }
        for (unsigned k = 0; k < n; k++)
            if (!bs.fibers[k]->finished) resume(bs.fibers[k]);
    }
}

template <typename... Params, typename... Args>
void launch(const char *name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args... args) {
    if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr, "cuda_on_cpu: kernel %s launched with grid (%u, %u, %u): each must be >= 1, and y and z "
                        "at most 65535, as on a GPU\n", name, grid.x, grid.y, grid.z);
        exit(1);
    }
    if (block.x * block.y * block.z > MAX_THREADS) {
        fprintf(stderr, "cuda_on_cpu: kernel %s launched with more than %u threads per block\n", name, MAX_THREADS);
        exit(1);
    }
    if (shared_bytes > CUDA_EMU_MAX_SHARED_BYTES) {
        fprintf(stderr, "cuda_on_cpu: kernel %s asks for %zu bytes of shared memory, more than %d\n",
                name, shared_bytes, CUDA_EMU_MAX_SHARED_BYTES);
        exit(1);
    }
    std::tuple<Params...> params(args...);
    struct Call {
        void (*kernel)(Params...);
        std::tuple<Params...> *params;
    } call = {kernel, &params};
    auto body = [](void *p) {
        Call *c = static_cast<Call *>(p);
        std::apply(c->kernel, *c->params);
    };
    const long blocks = (long)grid.x * grid.y * grid.z;
    const bool reverse = reverse_order();
#pragma omp parallel for schedule(dynamic, 1)
    for (long b = 0; b < blocks; b++) {
        const long id = reverse ? blocks - 1 - b : b;
        BlockState &bs = block_state;
        bs.kernel = name;
        bs.body = body;
        bs.body_arg = &call;
        gridDim = grid;
        blockDim = block;
        blockIdx = uint3{unsigned(id % grid.x), unsigned(id / grid.x % grid.y),
                         unsigned(id / ((long)grid.x * grid.y))};
        run_block();
    }
}

} // namespace cuda_emu

// kernel<<<grid, block, shared_bytes>>>(args...) spelled as a macro both builds understand.
#define KERNEL_LAUNCH(kernel, grid, block, shared_bytes, ...) \
    cuda_emu::launch(#kernel, kernel, grid, block, shared_bytes, __VA_ARGS__)
