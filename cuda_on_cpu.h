// cuda_on_cpu.h: runs the CUDA subset that sparse_transformer.cu uses on a CPU.
//
// The same sparse_transformer.cu is compiled by nvcc for the GPU and, through this header, by g++
// as plain C++ for the CPU, so the real kernels (not a hand-kept CPU copy) run in CI and on laptops.
//
// How it works:
//   - A launch runs the grid's blocks in parallel over OpenMP threads, one block per OS thread at a time.
//   - The threads of a block run as fibers (stacks of their own, switched with the compiler's
//     __builtin_setjmp; see switch_context): each runs until it reaches __syncthreads(), then hands
//     control straight to the next one (pass_on); when every thread waits at the same barrier they
//     are all released.
//     A barrier that some thread of the block does not reach (it waits elsewhere, or has returned)
//     is a bug on the GPU (undefined behaviour): it aborts here with the file and line.
//   - Kernels without barriers are run as plain function calls, thread after thread, in a loop that
//     calls the kernel directly (a template argument of launch, inlined into that loop: run_plain).
//     The choice is made per block, at no cost: each OS thread's fiber 0 runs its blocks one after
//     another, the first thread of each as a plain call on that fiber's stack; if it finishes without
//     meeting a barrier, fiber 0 runs the others as plain calls too (no switch at all, which the many
//     small blocks of the element-wise kernels would feel), and a barrier met by one of them aborts
//     with a clear message. If it waits at a barrier, the block's other threads become fibers.
//     Built for the machine at hand (-march=native), the compiler runs that loop's element-wise
//     kernels several threads at a time in the vector lanes, which is why expf is defined here.
//   - __shared__ variables become thread_local: per OS thread, so per running block, and shared by
//     the block's fibers. Dynamic shared memory must be declared once at file scope as
//     `extern __shared__ float smem[];` (this header defines that one name; g++ mishandles a
//     block-scope extern thread_local inside a template). More than 48 KB of it needs the kernel's
//     cudaFuncSetAttribute first, as on a GPU (a launch without it aborts, naming the kernel).
//   - CUDA_EMU_REVERSE=1 in the environment runs threads (and blocks) in reverse order: a kernel that
//     forgot a barrier between writing and reading shared memory gives different results then.
//   - cudaMalloc is an aligned malloc; copies are memcpy. Memory is host memory.
//   - cublasSgemm, the one cuBLAS call the model makes, is OpenBLAS's cblas_sgemm.
#pragma once
#ifdef __CUDACC__
#error "cuda_on_cpu.h is for the CPU build only: nvcc uses the real CUDA runtime"
#endif

#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <ctime>
#include <atomic>
#include <map>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <cblas.h> // OpenBLAS: cublasSgemm
#include <omp.h>
#include <unistd.h> // sysconf
// (AddressSanitizer: the fibers switch with ucontext, see switch_context; g++ says so, clang answers __has_feature)
#if defined(__SANITIZE_ADDRESS__)
#define CUDA_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_EMU_ASAN 1
#endif
#endif
#if !defined(__aarch64__) || defined(CUDA_EMU_ASAN)
#include <ucontext.h>
#endif

// ----------------------------------------------------------------------------
// Keywords, built-in types and variables

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

static thread_local uint3 threadIdx, blockIdx;
static thread_local dim3 blockDim, gridDim;

// Dynamic shared memory of the running block (the largest an H100/H200 block may opt in to).
#define CUDA_EMU_MAX_SHARED_BYTES (227 * 1024)
alignas(128) thread_local float smem[CUDA_EMU_MAX_SHARED_BYTES / sizeof(float)];

// fmaxf is one instruction on a GPU, but a function call in glibc (which must handle NaN), and the
// softmax passes call it for every score. This one is inline and gives glibc's results (x86's maxss:
// x > y ? x : y; a NaN operand yields the other one; only a signalling NaN, which arithmetic never
// makes, differs). Being a macro, it leaves no std::fmaxf or ::fmaxf for the CPU build: write fmaxf.
inline float cuda_emu_fmaxf(float x, float y) { return y != y ? x : x > y ? x : y; }
#define fmaxf cuda_emu_fmaxf

// expf on a GPU is CUDA's own device function (at most 2 units in the last place off), not glibc's.
// This one is at most 1.01 units off (compared with exp in double over every float once; the emulator's
// test checks a sample every time), and it is plain arithmetic: the compiler runs the element-wise kernels
// that call it (GELU, its backward) in vector lanes, several threads at once (run_plain), which a call
// to glibc's expf forbids. It follows Cephes: x = n ln 2 + r, |r| <= ln(2) / 2 (ln 2 in two parts, so
// that n ln 2 is exact), exp(r) by a polynomial, times 2^n made from exponent bits.
inline float cuda_emu_expf(float x) {
    const float hi = 88.72283935546875f, lo = -103.97208404541015625f; // beyond them: inf and 0
    const float c = x > hi ? hi : x >= lo ? x : lo;                     // a NaN becomes lo here (and NaN below)
    const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f; // round(c / ln 2), by adding 1.5 2^23
    const float r = (c - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f; // exp(r)
    // 2^n as two factors 2^n1 2^n2, each a normal float for every n in [-150, 128]
    const int n1 = (int)n / 2, n2 = (int)n - n1;
    const uint32_t bits1 = (uint32_t)(n1 + 127) << 23, bits2 = (uint32_t)(n2 + 127) << 23;
    float two_n1, two_n2;
    memcpy(&two_n1, &bits1, 4), memcpy(&two_n2, &bits2, 4);
    const float y = p * two_n1 * two_n2;
    return x != x ? x : x > hi ? INFINITY : x < lo ? 0.0f : y;
}
#define expf cuda_emu_expf

// exp2f, the softmax's exponential (its scores are in base 2), for the same reason: CUDA's own is at
// most 2 units in the last place off; this one, plain arithmetic, is at most 1.5 off (the emulator's test).
// x = n + r, |r| <= 1/2 (exact in float), 2^r by Cephes' polynomial, times 2^n from exponent bits.
inline float cuda_emu_exp2f(float x) {
    const float hi = 128.0f, lo = -150.0f;       // beyond them: inf and 0
    const float c = x < hi ? (x >= lo ? x : lo) : hi; // a NaN becomes hi here (and NaN below)
    const float n = (c + 12582912.0f) - 12582912.0f; // round(c), by adding 1.5 2^23
    const float r = c - n;
    float p = 1.535336188319500e-4f;
    p = p * r + 1.339887440266574e-3f;
    p = p * r + 9.618437357674640e-3f;
    p = p * r + 5.550332471162809e-2f;
    p = p * r + 2.402264791363012e-1f;
    p = p * r + 6.931472028550421e-1f;
    p = p * r + 1.0f; // 2^r
    const int n1 = (int)n / 2, n2 = (int)n - n1;
    const uint32_t bits1 = (uint32_t)(n1 + 127) << 23, bits2 = (uint32_t)(n2 + 127) << 23;
    float two_n1, two_n2;
    memcpy(&two_n1, &bits1, 4), memcpy(&two_n2, &bits2, 4);
    const float y = p * two_n1 * two_n2;
    return x != x ? x : x >= hi ? INFINITY : x < lo ? 0.0f : y;
}
#define exp2f cuda_emu_exp2f

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
inline cudaError_t cudaGetDeviceCount(int *count) { *count = 1; return cudaSuccess; } // the host
inline cudaError_t cudaGetDevice(int *device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
namespace cuda_emu {
inline int cores(void) { // the threads OpenMP gives (OMP_NUM_THREADS, else the cores), read once
    static const int n = omp_get_max_threads();
    return n;
}
} // namespace cuda_emu
// Which OpenBLAS the loader gave (openblas_get_parallel: 0 serial, 1 pthreads, 2 OpenMP). The OpenMP
// variant runs its threads in the kernels' OpenMP pool. The pthreads one brings a pool of its own, whose
// threads and the OpenMP ones, spinning between launches, fight for the cores: a training step at half
// speed. The Makefile links the OpenMP variant by rpath; an older build, LD_LIBRARY_PATH or a system with
// only the pthreads variant can still bring it, and then its matrix products run on one thread, inside
// the OpenMP program (see blas_check), and the program says what to install.
inline const char *blas_variant(void) {
    const int parallel = openblas_get_parallel();
    return parallel == 2 ? "OpenMP" : parallel == 1 ? "pthreads" : "serial";
}
inline void blas_check(void) {
    static bool checked = false;
    if (checked || openblas_get_parallel() != 1) return;
    checked = true;
    openblas_set_num_threads(1);
    fprintf(stderr, "note: this program loaded OpenBLAS's pthreads variant, whose threads fight the OpenMP ones: its "
                    "matrix products run on one thread. For full speed: apt-get install libopenblas-openmp-dev, "
                    "then make clean && make\n");
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    blas_check();
    snprintf(p->name, sizeof p->name, "CPU (CUDA emulated by cuda_on_cpu.h, %d OpenMP threads, OpenBLAS %s %s)",
             cuda_emu::cores(), blas_variant(), openblas_get_corename()); // variant, kernels
    p->totalGlobalMem = 0;
    p->multiProcessorCount = cuda_emu::cores();
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
// Events (the profiler's clock, sparse_transformer.cu section 1): a launch here returns when its kernel has
// finished, so an event records the wall clock when it is recorded, and the time between two is the time
// of what ran between them, as on a GPU.
struct CUevent_st { double ms; };
typedef CUevent_st *cudaEvent_t;
typedef void *cudaStream_t;
inline cudaError_t cudaEventCreate(cudaEvent_t *event) {
    *event = new CUevent_st{0.0};
    return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t event) { delete event; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t = 0) {
    event->ms = omp_get_wtime() * 1e3;
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    *ms = (float)(end->ms - start->ms);
    return cudaSuccess;
}
// A launch may give a kernel more than 48 KB of dynamic shared memory only after the kernel opted in
// (cudaFuncSetAttribute), as on a GPU, which refuses the launch otherwise: the sizes allowed, by kernel.
inline std::map<const void *, size_t> &cuda_emu_shared_opt_ins() {
    static std::map<const void *, size_t> allowed;
    return allowed;
}
template <typename K> inline cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int bytes) {
    if (bytes < 0 || bytes > CUDA_EMU_MAX_SHARED_BYTES) return cudaErrorInvalidValue;
    cuda_emu_shared_opt_ins()[reinterpret_cast<const void *>(kernel)] = (size_t)bytes;
    return cudaSuccess;
}

// ----------------------------------------------------------------------------
// cuBLAS: the one call the model uses, cublasSgemm, column-major as cuBLAS defines it:
//   C (m x n) = alpha op(A) op(B) + beta C,  op(A) m x k, op(B) k x n, X(i, j) = X[i + j * ldX]
// It is OpenBLAS's cblas_sgemm (Debian's libopenblas-openmp-dev), a well-kept CPU matrix product. OpenBLAS
// splits C between its threads, each element summed by one thread in a fixed order, so at a given
// number of threads a run repeats bit for bit (a resumed run repeats the losses of an uninterrupted
// one; tools/test_train.sh checks it).
// With CUBLAS_TF32_TENSOR_OP_MATH (cublasSetMathMode) the operands are rounded to TF32 first, as the
// tensor cores take them (tf32_round below: to nearest, 10 mantissa bits); the sums stay float32.

enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3 };
struct cublasContext { cublasMath_t math; };
typedef cublasContext *cublasHandle_t;

inline cublasStatus_t cublasCreate(cublasHandle_t *handle) {
    *handle = new cublasContext{CUBLAS_DEFAULT_MATH};
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t handle) {
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t math) {
    handle->math = math;
    return CUBLAS_STATUS_SUCCESS;
}

// Round to nearest, ties away from zero, keeping 10 explicit mantissa bits (cvt.rna.tf32.f32).
inline float tf32_round(float f) {
    if (!std::isfinite(f)) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x1000u) & ~0x1fffu;
    memcpy(&f, &u, 4);
    return f;
}

// A TF32 copy of the (rows, cols) column-major matrix X, packed (leading dimension rows).
inline std::vector<float> tf32_copy(const float *X, int rows, int cols, int ld) {
    std::vector<float> copy((size_t)rows * cols);
    for (int j = 0; j < cols; j++)
        for (int i = 0; i < rows; i++) copy[i + (size_t)j * rows] = tf32_round(X[i + (size_t)j * ld]);
    return copy;
}

inline cublasStatus_t cublasSgemm(cublasHandle_t handle, cublasOperation_t opA, cublasOperation_t opB, int m, int n,
                                  int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                                  const float *beta, float *C, int ldc) {
    if (m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    std::vector<float> a, b;
    if (handle->math == CUBLAS_TF32_TENSOR_OP_MATH && k > 0) { // A is stored (m, k) or (k, m); B (k, n) or (n, k)
        const int a_rows = opA == CUBLAS_OP_N ? m : k, b_rows = opB == CUBLAS_OP_N ? k : n;
        a = tf32_copy(A, a_rows, opA == CUBLAS_OP_N ? k : m, lda), A = a.data(), lda = a_rows;
        b = tf32_copy(B, b_rows, opB == CUBLAS_OP_N ? n : k, ldb), B = b.data(), ldb = b_rows;
    }
    cblas_sgemm(CblasColMajor, opA == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                opB == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, *alpha, A, lda, B, ldb, *beta, C, ldc);
    return CUBLAS_STATUS_SUCCESS;
}

// ----------------------------------------------------------------------------
// The block scheduler: threads as fibers, barriers as cooperative switches

#define __syncthreads() cuda_emu::syncthreads(__FILE__, __LINE__)

namespace cuda_emu {

const size_t FIBER_STACK_BYTES = 256 * 1024;
const unsigned MAX_THREADS = 1024;

// Switching between fibers. swapcontext also saves the signal mask, a system call each time. The
// compiler's __builtin_setjmp/__builtin_longjmp (what GCC's setjmp-longjmp exceptions use) keep only
// the stack and frame pointers and the place to resume: the function that calls __builtin_setjmp saves
// every other register itself. That is several times cheaper again than libc's _setjmp/_longjmp, which
// also mangle the pointers and unwind cleanup handlers. A fresh stack is entered with
// makecontext/swapcontext, once per fiber. clang has no __builtin_setjmp on arm64 (Apple Silicon
// Macs, arm64 Linux), and macOS deprecates ucontext, so on arm64 both compilers switch with a few
// instructions of their own (below). AddressSanitizer follows swapcontext but not jumps between
// stacks, so the sanitizer build switches with swapcontext only, as does any other processor that
// clang compiles for.
#if defined(__aarch64__) && !defined(CUDA_EMU_ASAN)
// arm64: a switch saves the registers a called function must preserve (x19-x28, the frame pointer x29,
// the return address x30, the low halves d8-d15 of v8-v15) on the stack it leaves, keeps that stack's
// pointer in `from`, and restores the same from the stack it enters: 160 bytes, ten pairs.
struct Context { void *sp; };
// (assembly of its own, not naked functions: GCC accepts those on arm64 only from version 14; weak, in
// case two files of one program include this header)
#if defined(__APPLE__)
#define CUDA_EMU_FUNCTION(name) ".pushsection __TEXT,__text\n.globl _" #name "\n.weak_definition _" #name "\n.p2align 2\n_" #name ":\n"
#else
#define CUDA_EMU_FUNCTION(name) ".pushsection .text\n.weak " #name "\n.type " #name ", %function\n.p2align 2\n" #name ":\n"
#endif
extern "C" void cuda_emu_switch_stacks(void **save_sp, void *load_sp); // x0, x1
asm(CUDA_EMU_FUNCTION(cuda_emu_switch_stacks)
    "sub sp, sp, #160\n"
    "stp x19, x20, [sp, #0]\n"   "stp x21, x22, [sp, #16]\n"  "stp x23, x24, [sp, #32]\n"
    "stp x25, x26, [sp, #48]\n"  "stp x27, x28, [sp, #64]\n"  "stp x29, x30, [sp, #80]\n"
    "stp d8, d9, [sp, #96]\n"    "stp d10, d11, [sp, #112]\n" "stp d12, d13, [sp, #128]\n"
    "stp d14, d15, [sp, #144]\n"
    "mov x9, sp\n"
    "str x9, [x0]\n"
    "mov sp, x1\n"
    "ldp x19, x20, [sp, #0]\n"   "ldp x21, x22, [sp, #16]\n"  "ldp x23, x24, [sp, #32]\n"
    "ldp x25, x26, [sp, #48]\n"  "ldp x27, x28, [sp, #64]\n"  "ldp x29, x30, [sp, #80]\n"
    "ldp d8, d9, [sp, #96]\n"    "ldp d10, d11, [sp, #112]\n" "ldp d12, d13, [sp, #128]\n"
    "ldp d14, d15, [sp, #144]\n"
    "add sp, sp, #160\n"
    "ret\n"
    ".popsection\n");
// A fresh fiber's first switch "returns" here (its x30), with its function in x19, which never returns.
extern "C" void cuda_emu_fiber_entry(void);
asm(CUDA_EMU_FUNCTION(cuda_emu_fiber_entry) "blr x19\n" "brk #0\n" ".popsection\n");
inline void switch_context(Context *from, Context *to) { cuda_emu_switch_stacks(&from->sp, to->sp); }
inline void start_on_stack(Context *from, Context *to, char *stack, size_t bytes, void (*entry)(void)) {
    void **frame = (void **)((((uintptr_t)stack + bytes) & ~(uintptr_t)15) - 160); // sp stays 16-byte aligned
    memset(frame, 0, 160);
    frame[0] = (void *)entry;       // x19
    frame[11] = (void *)cuda_emu_fiber_entry; // x30
    to->sp = frame;
    switch_context(from, to);
}
#else
#if defined(CUDA_EMU_ASAN) || (defined(__clang__) && !defined(__x86_64__))
typedef ucontext_t Context;
inline void switch_context(Context *from, Context *to) { swapcontext(from, to); }
inline void enter_new_stack(Context *from, ucontext_t *start) { swapcontext(from, start); }
#else
struct Context { void *jump[5]; };
// (__builtin_longjmp may not be called from the function that called __builtin_setjmp)
__attribute__((noinline)) inline void jump_to(Context *to) { __builtin_longjmp(to->jump, 1); }
inline void switch_context(Context *from, Context *to) {
    if (__builtin_setjmp(from->jump) == 0) jump_to(to);
}
inline void enter_new_stack(Context *from, ucontext_t *start) {
    ucontext_t abandoned; // the fiber comes back with a jump to `from`, never to this
    if (__builtin_setjmp(from->jump) == 0) swapcontext(&abandoned, start);
}
#endif
// Runs entry() on a fresh stack; returns when the fiber first switches back to `from`.
inline void start_on_stack(Context *from, Context *, char *stack, size_t bytes, void (*entry)(void)) {
    ucontext_t start;
    getcontext(&start);
    start.uc_stack.ss_sp = stack;
    start.uc_stack.ss_size = bytes;
    start.uc_link = NULL;
    makecontext(&start, entry, 0);
    enter_new_stack(from, &start);
}
#endif

// A warp-collective operation (a tensor-core product, a shuffle): every lane of the warp registers its
// own arguments and waits; once all lanes wait at the same place, the scheduler runs `run` once for the
// whole warp, with the 32 lanes' arguments in lane order, as the hardware does the operation at once.
struct WarpOp {
    void (*run)(void *const *lane_args, int lanes);
    void *args;
};

// A fiber lives as long as its OS thread and runs one GPU thread after another.
struct Fiber {
    Context context;
    std::vector<char> stack;
    uint3 thread;
    bool finished;
    const char *barrier_file; // where it waits, or NULL while it runs
    int barrier_line;
    WarpOp warp_op;           // what it waits for, if it waits at a warp-collective operation (run != NULL)
};

// The blocks of a launch, claimed by the OS threads' fiber 0 in chunks (see run_blocks).
struct Grid {
    std::atomic<long> next; // the first block not yet claimed
    long blocks, chunk;
    bool reverse;           // CUDA_EMU_REVERSE: blocks and threads in reverse order
};

// Scheduler state of the block running on this OS thread.
struct BlockState {
    Context scheduler;
    Grid *grid;                 // the launch fiber 0 works on; NULL once its blocks are all claimed
    bool in_fibers;             // the current block's first thread waited: its threads run as fibers
    Fiber *fibers[MAX_THREADS]; // created on first use
    Fiber *current;             // the fiber running now, NULL in plain mode
    const char *kernel;         // for error messages
    void (*body)(void *);       // runs the kernel for the current threadIdx
    void (*body_plain)(void *, unsigned, unsigned, bool); // runs it for threads first.. in a plain loop
    void *body_arg;
    unsigned warp_waiters;      // fibers now waiting at a warp-collective operation
    unsigned at_barrier;        // fibers now waiting at __syncthreads()...
    const Fiber *first_waiter;  // ...the first of them to arrive...
    bool split;                 // ...and whether one of the others waits at another __syncthreads()
    unsigned finished;          // fibers whose thread has finished
    unsigned round_next, round_end; // the fibers of the current round still to run (see pass_on)
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

// Whether two fibers wait at the same place (the same file pointer, almost always, or an equal name).
inline bool same_place(const Fiber *a, const Fiber *b) {
    return a->barrier_line == b->barrier_line &&
           (a->barrier_file == b->barrier_file || strcmp(a->barrier_file, b->barrier_file) == 0);
}

// Makes `f` the running fiber (it resumes where it waited).
inline void prepare(Fiber *f) {
    BlockState &bs = block_state;
    bs.current = f;
    threadIdx = f->thread;
    f->barrier_file = NULL;
    f->warp_op = WarpOp{NULL, NULL};
}

// The scheduler runs fibers in rounds (run_round): a fiber that stops (waits or finishes) hands control
// straight to the next fiber of the round, and the last one back to the scheduler, so that a barrier
// costs one switch per thread.
inline void pass_on(Fiber *self) {
    BlockState &bs = block_state;
    if (bs.round_next < bs.round_end) {
        Fiber *next = bs.fibers[bs.round_next++];
        prepare(next);
        switch_context(&self->context, &next->context);
    } else {
        switch_context(&self->context, &bs.scheduler);
    }
}

// A thread waits at a barrier (op.run == NULL) or at a warp-collective operation: its fiber hands control
// on (pass_on); the scheduler (run_block) resumes it once every thread concerned is there.
inline void wait_at(const char *file, int line, const char *what, WarpOp op) {
    BlockState &bs = block_state;
    if (!bs.current) {
        char msg[512];
        snprintf(msg, sizeof msg,
                 "thread (%u,%u,%u) reached %s at %s:%d, but thread %u, run first, finished without reaching it: "
                 "a barrier must be reached by every live thread of the block (and a warp-collective "
                 "operation by every lane of the warp)",
                 threadIdx.x, threadIdx.y, threadIdx.z, what, file, line, bs.fibers[0]->thread.x);
        fail(msg);
    }
    Fiber *self = bs.current;
    self->barrier_file = file;
    self->barrier_line = line;
    self->warp_op = op;
    if (op.run) bs.warp_waiters++;
    else if (bs.at_barrier++ == 0) bs.first_waiter = self;
    else if (!same_place(self, bs.first_waiter)) bs.split = true;
    pass_on(self);
}
inline void syncthreads(const char *file, int line) { wait_at(file, line, "__syncthreads()", WarpOp{NULL, NULL}); }
inline void warp_collective(const char *file, int line, const char *what, WarpOp op) { wait_at(file, line, what, op); }

// The life of a fiber: wait to be given a thread, run the kernel for it, say so, wait again.
inline void fiber_main(void) {
    BlockState &bs = block_state;
    Fiber *self = bs.current;
    for (;;) {
        pass_on(self);
        bs.body(bs.body_arg);
        self->finished = true;
        bs.finished++;
    }
}

inline void run_blocks(void);
inline Fiber *fiber(unsigned k) {
    BlockState &bs = block_state;
    if (!bs.fibers[k]) {
        Fiber *f = bs.fibers[k] = new Fiber();
        f->stack.resize(FIBER_STACK_BYTES);
        bs.current = f;
        start_on_stack(&bs.scheduler, &f->context, f->stack.data(), f->stack.size(),
                       k == 0 ? run_blocks : fiber_main); // returns when the fiber first waits
    }
    return bs.fibers[k];
}

// Runs fibers first .. end - 1 (in the order of bs.fibers), each until it waits at a barrier or finishes.
inline void run_round(unsigned first, unsigned end) {
    BlockState &bs = block_state;
    bs.round_next = first + 1;
    bs.round_end = end;
    prepare(bs.fibers[first]);
    switch_context(&bs.scheduler, &bs.fibers[first]->context);
}

inline uint3 thread_of(unsigned t, dim3 block) {
    if (block.y == 1 && block.z == 1) return uint3{t, 0, 0};
    return uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
}

// Runs the warp-collective operations that whole warps wait at, and resumes those warps. Returns false
// when no warp waits at one (then every live thread waits at __syncthreads()). A warp whose lanes are
// not all at the same operation (one finished, or waits elsewhere) aborts with both places named.
inline bool run_warp_ops(unsigned n, bool reverse) {
    BlockState &bs = block_state;
    if (bs.warp_waiters == 0) return false;
    bs.warp_waiters = 0; // every waiting warp runs below, or the block aborts
    bool any = false;
    for (unsigned w = 0; w * 32 < n; w++) {
        const unsigned count = n - w * 32 < 32 ? n - w * 32 : 32;
        Fiber *warp[32] = {}; // the warp's lanes, in lane order: fiber k runs thread k (n - 1 - k in reverse)
        for (unsigned l = 0; l < count; l++) warp[l] = bs.fibers[reverse ? n - 1 - (w * 32 + l) : w * 32 + l];
        unsigned first = 0;
        while (first < count && (warp[first]->finished || !warp[first]->warp_op.run)) first++;
        if (first == count) continue;
        const Fiber *op = warp[first];
        void *args[32];
        for (unsigned l = 0; l < count; l++) {
            const Fiber *f = warp[l];
            if (f->finished || f->warp_op.run != op->warp_op.run || !same_place(f, op)) {
                char msg[512], where[256];
                if (f->finished) snprintf(where, sizeof where, "has finished");
                else snprintf(where, sizeof where, "waits at %s:%d", f->barrier_file, f->barrier_line);
                snprintf(msg, sizeof msg, "lane %u of warp %u waits at a warp-collective operation at %s:%d, but "
                         "lane %u %s: every lane of the warp must reach the same operation", first, w,
                         op->barrier_file, op->barrier_line, l, where);
                fail(msg);
            }
            args[l] = f->warp_op.args;
        }
        op->warp_op.run(args, (int)count);
        for (unsigned l = 0; l < count; l++) {
            const unsigned k = reverse ? n - 1 - (w * 32 + l) : w * 32 + l;
            run_round(k, k + 1);
        }
        any = true;
    }
    return any;
}

// Runs the current block's threads 1 .. n - 1 as fibers, once its first thread (fiber 0) waits at a
// barrier or a warp-collective operation, until every thread has finished. Runs on the OS thread's own
// stack (the scheduler); fiber k runs thread k (n - 1 - k in reverse).
inline void finish_block(void) {
    BlockState &bs = block_state;
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    const bool reverse = bs.grid->reverse;
    for (unsigned k = 1; k < n; k++) {
        Fiber *f = fiber(k);
        f->thread = thread_of(reverse ? n - 1 - k : k, blockDim);
        f->finished = false;
    }
    if (n > 1) run_round(1, n);
    for (;;) {
        // Every thread now waits at a barrier or has finished. Warps waiting at a collective go first;
        // when none is left, all live threads must be at the same __syncthreads().
        if (run_warp_ops(n, reverse)) continue;
        if (bs.at_barrier == 0) return; // all have finished
        if (bs.split || bs.finished > 0) {
            const Fiber *other = NULL;
            for (unsigned k = 0; k < n && !other; k++) {
                const Fiber *f = bs.fibers[k];
                if (f->finished || !same_place(f, bs.first_waiter)) other = f;
            }
            const Fiber *w = bs.first_waiter;
            char msg[512];
            if (other->finished)
                snprintf(msg, sizeof msg,
                         "thread %u finished while thread %u waits at __syncthreads() at %s:%d: a barrier "
                         "must be reached by every live thread of the block",
                         other->thread.x, w->thread.x, w->barrier_file, w->barrier_line);
            else
                snprintf(msg, sizeof msg, "threads wait at different barriers: thread %u at %s:%d, thread %u at %s:%d",
                         w->thread.x, w->barrier_file, w->barrier_line, other->thread.x, other->barrier_file,
                         other->barrier_line);
            fail(msg);
        }
        bs.at_barrier = 0;
        run_round(0, n);
    }
}

// The life of fiber 0: it runs the blocks of each launch its OS thread takes part in, claiming them in
// chunks of about 1/32 of a thread's share (one at a time would cost an atomic operation per block,
// which the many small blocks of the element-wise kernels would feel). It runs a block's first thread
// itself; if that thread finishes without meeting a barrier, so do the others, run as plain calls on this
// stack. If it waits, it hands control to the scheduler (pass_on), which runs the block to its end with
// fibers (finish_block) and then resumes fiber 0 for the next block.
inline void run_blocks(void) {
    BlockState &bs = block_state;
    Fiber *self = bs.current;
    for (;;) {
        bs.grid = NULL;
        switch_context(&self->context, &bs.scheduler); // wait for a launch (launch sets bs.grid)
        Grid &g = *bs.grid;
        const unsigned n = blockDim.x * blockDim.y * blockDim.z;
        const uint3 first = thread_of(g.reverse ? n - 1 : 0, blockDim); // the thread fiber 0 runs
        for (long start; (start = g.next.fetch_add(g.chunk)) < g.blocks;) {
            for (long b = start; b < start + g.chunk && b < g.blocks; b++) {
                const long id = g.reverse ? g.blocks - 1 - b : b;
                blockIdx = uint3{unsigned(id % gridDim.x), unsigned(id / gridDim.x % gridDim.y),
                                 unsigned(id / ((long)gridDim.x * gridDim.y))};
                bs.warp_waiters = bs.at_barrier = bs.finished = 0;
                bs.split = bs.in_fibers = false;
                bs.round_next = bs.round_end = 0;
                self->thread = first;
                self->finished = false;
                prepare(self);
                bs.body(bs.body_arg); // a wait in here goes to the scheduler: in_fibers
                self->finished = true;
                if (bs.in_fibers) {
                    bs.finished++;
                    pass_on(self); // resumed when the block has finished
                } else {
                    bs.current = NULL;
                    bs.body_plain(bs.body_arg, 1, n, g.reverse);
                }
            }
        }
    }
}

// The parameter types of a kernel, as a tuple.
template <typename K> struct KernelParams;
template <typename... Params> struct KernelParams<void (*)(Params...)> { typedef std::tuple<Params...> type; };

// Runs threads first .. n - 1 of the current block as plain calls (a barrier-free kernel). The kernel is
// a template argument, and flatten inlines it with everything it calls: a barrier-free kernel then
// costs about what the same loop written for the CPU costs.
template <auto kernel, typename Params>
__attribute__((flatten)) void run_plain(void *p, unsigned first, unsigned n, bool reverse) {
    const Params &params = *static_cast<Params *>(p);
    const bool flat = blockDim.y == 1 && blockDim.z == 1;
    if (flat && !reverse) { // the common case, as a loop simple enough for the compiler to vectorise:
        // an element-wise kernel then runs several threads at once in the CPU's vector lanes
        for (unsigned t = first; t < n; t++) {
            threadIdx = uint3{t, 0, 0};
            std::apply(kernel, params);
        }
        return;
    }
    for (unsigned k = first; k < n; k++) {
        const unsigned t = reverse ? n - 1 - k : k;
        threadIdx = flat ? uint3{t, 0, 0} : thread_of(t, blockDim);
        std::apply(kernel, params);
    }
}

// Sharing the cores with other programs. A launch's OS threads meet at its end, so a launch runs at the
// pace of its slowest thread: when another program (a browser, a compile) takes one of the cores, the
// thread that loses it makes the others wait at every launch for its time slices to come round, and a
// step can take ten times as long instead of two. So every fifth of a second the emulator looks at how
// much of the machine others used in that time (Linux's /proc/stat: the cores' busy time, less this
// process's own) and runs the next launches, and OpenBLAS's products (which follow
// omp_set_num_threads), on the cores left free: one thread fewer per core that others keep busy, never
// fewer than one, back to all of them once the others are quiet. Results do not change: blocks do not
// depend on which OS thread runs them, and OpenBLAS splits a product's rows and columns between its
// threads, never the sums. Elsewhere than Linux, and with one thread, the count stays as OpenMP set it.
inline int threads_for_launch(void) {
    static int threads = 0;
    static double last_wall = -1.0, last_cpu = 0.0, last_busy = 0.0;
    if (threads == 0) threads = cores();
#ifdef __linux__
    if (cores() == 1) return threads;
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    const double wall = t.tv_sec + t.tv_nsec * 1e-9;
    if (last_wall >= 0.0 && wall - last_wall < 0.2) return threads;
    FILE *f = fopen("/proc/stat", "r");
    unsigned long long user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
    const int got = f ? fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &user, &nice, &system, &idle, &iowait,
                               &irq, &softirq, &steal) : 0;
    if (f) fclose(f);
    if (got != 8) return threads;
    const double busy = (double)(user + nice + system + irq + softirq + steal) / sysconf(_SC_CLK_TCK);
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    const double cpu = t.tv_sec + t.tv_nsec * 1e-9;
    if (last_wall >= 0.0) {
        const double others = ((busy - last_busy) - (cpu - last_cpu)) / (wall - last_wall); // in cores
        const int free_cores = cores() - (int)(others + 0.5);
        if (others > 0.5) threads = free_cores > 1 ? free_cores : 1;
        else if (others < 0.25) threads = cores();
        omp_set_num_threads(threads);
    }
    last_wall = wall, last_cpu = cpu, last_busy = busy;
#endif
    return threads;
}

template <auto kernel, typename... Args>
void launch(const char *name, dim3 grid, dim3 block, size_t shared_bytes, Args... args) {
    typedef typename KernelParams<decltype(kernel)>::type Params;
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
    const auto opted = cuda_emu_shared_opt_ins().find(reinterpret_cast<const void *>(kernel));
    const size_t allowed = opted == cuda_emu_shared_opt_ins().end() || opted->second < 48 * 1024 ? 48 * 1024
                                                                                                  : opted->second;
    if (shared_bytes > allowed) {
        fprintf(stderr, "cuda_on_cpu: kernel %s asks for %zu bytes of dynamic shared memory, more than the %zu "
                        "it may use: above 48 KB, call cudaFuncSetAttribute(kernel, "
                        "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) first (a GPU refuses the launch)\n",
                name, shared_bytes, allowed);
        exit(1);
    }
    Params params(args...);
    auto body = [](void *p) { std::apply(kernel, *static_cast<Params *>(p)); };
    auto body_plain = run_plain<kernel, Params>;
    Grid g;
    g.next = 0;
    g.blocks = (long)grid.x * grid.y * grid.z;
    const int threads = threads_for_launch();
    g.chunk = g.blocks / (32L * threads) + 1;
    g.reverse = reverse_order();
#pragma omp parallel num_threads(threads)
    {
        BlockState &bs = block_state;
        bs.kernel = name;
        bs.body = body;
        bs.body_plain = body_plain;
        bs.body_arg = &params;
        gridDim = grid;
        blockDim = block;
        Fiber *blocks = fiber(0); // runs the blocks: run_blocks
        bs.grid = &g;
        for (;;) {
            prepare(blocks);
            switch_context(&bs.scheduler, &blocks->context); // back when a block's first thread waits...
            if (!bs.grid) break;                              // ...or when no block is left
            bs.in_fibers = true;
            finish_block();
        }
    }
}

} // namespace cuda_emu

// ----------------------------------------------------------------------------
// Warp shuffles: __shfl_xor_sync(mask, v, lane_mask) gives lane l the v of lane l ^ lane_mask. A warp
// collective, as on the GPU: it runs once all 32 lanes have reached it (the full mask, the only one the
// kernels use), and aborts with file:line if a lane does not, or passes another lane_mask.

namespace cuda_emu {
struct ShuffleOp {
    float value, result;
    unsigned mask;
    int lane_mask;
};
inline void shuffle_xor_lanes(void *const *lane_args, int lanes) {
    ShuffleOp *op[32];
    for (int l = 0; l < lanes; l++) op[l] = static_cast<ShuffleOp *>(lane_args[l]);
    if (lanes != 32 || op[0]->mask != 0xffffffffu) fail("__shfl_xor_sync needs all 32 lanes of a warp and the full mask");
    for (int l = 0; l < 32; l++)
        if (op[l]->lane_mask != op[0]->lane_mask || op[l]->mask != op[0]->mask)
            fail("the lanes of a warp passed different masks to one __shfl_xor_sync");
    for (int l = 0; l < 32; l++) op[l]->result = op[l ^ (op[0]->lane_mask & 31)]->value;
}
inline float shuffle_xor(const char *file, int line, unsigned mask, float value, int lane_mask) {
    ShuffleOp op = {value, 0.0f, mask, lane_mask};
    warp_collective(file, line, "__shfl_xor_sync", WarpOp{shuffle_xor_lanes, &op});
    return op.result;
}
} // namespace cuda_emu
#define __shfl_xor_sync(mask, value, lane_mask) cuda_emu::shuffle_xor(__FILE__, __LINE__, mask, value, lane_mask)

// ----------------------------------------------------------------------------
// Tensor cores: mma.sync m16n8k8 with TF32 operands and float accumulators
//
// sparse_transformer.cu issues the instruction through two small wrappers, written in PTX for the GPU
// (section 5b there, with the lane map): to_tf32(x) rounds an operand to TF32 (cvt.rna.tf32.f32), and
// mma_tf32(d, a, b) is d += a b for a 16 x 8 slice of A, an 8 x 8 slice of B and a 16 x 8 accumulator,
// each lane holding 4, 2 and 4 of their elements. Here mma_tf32 is a warp collective (see
// warp_collective): once all 32 lanes have reached it, the scheduler gathers the three matrices from the
// lanes by PTX's lane map, multiplies, and hands each lane its 4 elements of the result, so a kernel that
// puts an element in the wrong lane gets a wrong product, as on the GPU; a lane that misses it aborts
// the run with file:line. The product reads the top 19 bits of each operand (sign, exponent, 10 mantissa
// bits) as the hardware does, so an operand not rounded by to_tf32 first is truncated, as it would be on
// the GPU; each sum starts at the accumulator and adds the products in k order, in float32 (the GPU's
// order of accumulation is its own).

namespace cuda_emu {
inline float tf32_operand(float f) { // what a tensor core reads of a float: its top 19 bits
    uint32_t u;
    memcpy(&u, &f, 4);
    u &= ~0x1fffu;
    memcpy(&f, &u, 4);
    return f;
}

struct MmaOp {
    float *d;
    const float *a, *b;
};
inline void mma_lanes(void *const *lane_args, int lanes) {
    if (lanes != 32) fail("mma_tf32 needs all 32 lanes of a warp");
    float A[16][8], B[8][8], C[16][8];
    for (int l = 0; l < 32; l++) { // PTX's lane map: group g = l / 4 and t = l % 4 within it
        const MmaOp *op = static_cast<const MmaOp *>(lane_args[l]);
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 4; e++) A[g + 8 * (e % 2)][t + 4 * (e / 2)] = op->a[e];
        for (int e = 0; e < 2; e++) B[t + 4 * e][g] = op->b[e];
        for (int e = 0; e < 4; e++) C[g + 8 * (e / 2)][2 * t + e % 2] = op->d[e];
    }
    for (int l = 0; l < 32; l++) {
        const MmaOp *op = static_cast<const MmaOp *>(lane_args[l]);
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 4; e++) {
            const int r = g + 8 * (e / 2), c = 2 * t + e % 2;
            float sum = C[r][c];
            for (int k = 0; k < 8; k++) sum += tf32_operand(A[r][k]) * tf32_operand(B[k][c]);
            op->d[e] = sum;
        }
    }
}
inline void mma_tf32(const char *file, int line, float *d, const float *a, const float *b) {
    MmaOp op = {d, a, b};
    warp_collective(file, line, "mma_tf32", WarpOp{mma_lanes, &op});
}
} // namespace cuda_emu
inline float to_tf32(float x) { return tf32_round(x); }
#define mma_tf32(d, a, b) cuda_emu::mma_tf32(__FILE__, __LINE__, d, a, b)

// kernel<<<grid, block, shared_bytes>>>(args...) spelled as a macro both builds understand.
#define KERNEL_LAUNCH(kernel, grid, block, shared_bytes, ...) \
    cuda_emu::launch<kernel>(#kernel, grid, block, shared_bytes, __VA_ARGS__)
