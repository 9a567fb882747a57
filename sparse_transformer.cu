/*
sparse_transformer.cu: the Sparse Transformer (Child et al. 2019): factorized sparse attention kernels
and the byte-level model around them.

One file, read top to bottom:
  1. Setup        includes, error checks, kernel launches.
  2. Patterns     the attention patterns as the paper states them (dense, strided, fixed) and how a
                  layer combines their two steps (interleaved, merged, multihead).
  3. Steps        each step rewritten so that it becomes a band in some order of the sequence; this is
                  what makes the kernels' work proportional to the allowed pairs.
  4. Tile layout  per step, for every tile of queries the range of key tiles it touches (and back).
                  4b: a tile kernel's block: which thread owns what, the shared-memory tiles.
  5. Kernels      forward (online softmax, stores the log-sum-exp) and backward (dQ, dK, dV with the
                  probabilities recomputed), written as plain loops over 32 x 32 tiles. Then their
                  helpers (5b): tile loads, and the tile products in float32 loops or on the tensor
                  cores (TF32), one helper, two bodies.
  6. API          the C functions of sparse_transformer.h that run the attention.
  7. Model kernels embeddings, layer norm, GELU, dropout, cross-entropy, AdamW.
  8. Model        the byte-level Sparse Transformer: parameters, forward, backward, update.
  9. Decoding     one byte at a time with cached keys and values; sampling.
 10. Data         the data file format, PNG pictures, mu-law audio, the synthetic data set.
 11. Checkpoints  save and load the model with its training state.

The same file builds for an NVIDIA GPU with nvcc and for the CPU with g++, through cuda_on_cpu.h,
which runs these very kernels with the threads of a block as fibers. There is no separate CPU code.

Shapes: q, k, v, out are (B, H, T, D): batch, heads, positions, head size, wherever their rows are
kept (StLayout: the model keeps them in the rows of its products, (B, T, 3C) and (B, T, C)). lse is (B, H, T).
Data are float32; the matrix products run in float32 or, on the tensor cores, with TF32 operands
(st_set_precision).

The signposts "Exercise N starts here" and "Exercise N ends here" mark the code of the classroom
exercises: tools/exercise.sh N start blanks it, for you to write again (README: Teaching with it).
*/

#ifdef __CUDACC__
#include <cublas_v2.h>
#include <cuda_runtime.h>
#define KERNEL_LAUNCH(kernel, grid, block, shared_bytes, ...) \
    kernel<<<grid, block, shared_bytes>>>(__VA_ARGS__)
#define BUILT_FOR_GPU 1
#else
#include "cuda_on_cpu.h"
#define BUILT_FOR_GPU 0
#endif
#include <errno.h>
#include <float.h>
#include <png.h> // st_png_write
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h> // fsync

#include "sparse_transformer.h"

// ----------------------------------------------------------------------------
// 1. Setup: error checks and kernel launches

static void cuda_check(cudaError_t err, const char *file, int line) {
    if (err == cudaSuccess) return;
    fprintf(stderr, "[CUDA error] %s:%d: %s (a kernel or copy failed; rerun the tests: make test)\n",
            file, line, cudaGetErrorString(err));
    exit(1);
}
#define cudaCheck(call) cuda_check((call), __FILE__, __LINE__)

static void cublas_check(cublasStatus_t status, const char *file, int line) {
    if (status == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "[cuBLAS error] %s:%d: status %d (a matrix product failed; rerun the tests: make test)\n",
            file, line, (int)status);
    exit(1);
}
#define cublasCheck(call) cublas_check((call), __FILE__, __LINE__)

// The precision of the matrix products (sparse_transformer.h): a template parameter of the attention
// kernels (section 5) and cuBLAS's math mode (section 8), chosen at run time.
static StPrecision precision = BUILT_FOR_GPU ? ST_TF32 : ST_FP32;
static const char *PRECISION_NAMES[] = {"fp32", "tf32"};
void st_set_precision(StPrecision p) { precision = p; }
StPrecision st_get_precision(void) { return precision; }
const char *st_precision_name(StPrecision p) { return PRECISION_NAMES[p]; }
int st_precision_from_name(const char *name) {
    for (int p = 0; p < 2; p++)
        if (strcmp(name, PRECISION_NAMES[p]) == 0) return p;
    return -1;
}

// Random numbers for initialisation and data: splitmix64 (Steele, Lea, Flood 2014), one 64-bit state.
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The profiler (st_profile_*, ./train -profile N): where a step's time goes. While it is on, each kernel
// launch, matrix product and copy is bracketed by two CUDA events and booked under its name. Events are
// recorded in the GPU's queue, so the host keeps launching ahead and the GPU runs as it would without
// them; the times are read back only when the table is made, or when all the pairs are in use. On the
// CPU, cuda_on_cpu.h's events read the wall clock, and a launch returns when its kernel has finished:
// the same code times the same things.
#define PROFILE_PAIRS 4096 // events in flight (a training step of the GPU default makes about 600 pairs)
#define PROFILE_ROWS 128   // distinct names
static struct {
    int on, pending;                        // pairs recorded and not yet read back
    cudaEvent_t start[PROFILE_PAIRS], stop[PROFILE_PAIRS];
    int row_of[PROFILE_PAIRS];              // which row each pending pair books into
    int n_rows;
    struct { char name[64]; long calls; double ms; } rows[PROFILE_ROWS];
} profile;

// Reads back the pending pairs (waiting for the last) and adds their times to their rows.
static void profile_collect(void) {
    if (profile.pending == 0) return;
    cudaCheck(cudaEventSynchronize(profile.stop[profile.pending - 1]));
    for (int i = 0; i < profile.pending; i++) {
        float ms = 0.0f;
        cudaCheck(cudaEventElapsedTime(&ms, profile.start[i], profile.stop[i]));
        profile.rows[profile.row_of[i]].ms += ms;
    }
    profile.pending = 0;
}
// Before a timed call: its pair's index, or -1 while the profiler is off.
static int profile_begin(void) {
    if (!profile.on) return -1;
    if (profile.pending == PROFILE_PAIRS) profile_collect();
    cudaCheck(cudaEventRecord(profile.start[profile.pending]));
    return profile.pending++;
}
// After it: books the pair under the name (printf-style; "(kernel<HS, TF>)" loses its brackets).
__attribute__((format(printf, 2, 3))) static void profile_end(int pair, const char *fmt, ...) {
    if (pair < 0) return;
    cudaCheck(cudaEventRecord(profile.stop[pair]));
    char name[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt[0] == '(' ? fmt + 1 : fmt, ap);
    va_end(ap);
    if (fmt[0] == '(') name[strcspn(name, ")")] = 0;
    int r = 0;
    while (r < profile.n_rows && strcmp(profile.rows[r].name, name) != 0) r++;
    if (r == profile.n_rows) {
        if (r == PROFILE_ROWS) r = PROFILE_ROWS - 1, snprintf(name, sizeof name, "(others)");
        else profile.n_rows++;
        snprintf(profile.rows[r].name, sizeof profile.rows[r].name, "%s", name);
        profile.rows[r].calls = 0, profile.rows[r].ms = 0.0;
    }
    profile.rows[r].calls++;
    profile.row_of[pair] = r;
}
// Runs `call` (a statement) timed under the name, e.g. PROFILED(("copy to device"), cudaMemcpy(...)).
#define PROFILED(name_and_args, call)            \
    do {                                         \
        const int pair_ = profile_begin();       \
        call;                                    \
        profile_end(pair_, PROFILE_NAME name_and_args); \
    } while (0)
#define PROFILE_NAME(...) __VA_ARGS__

void st_profile(int on) {
    static int created = 0;
    if (on && !created) {
        for (int i = 0; i < PROFILE_PAIRS; i++)
            cudaCheck(cudaEventCreate(&profile.start[i])), cudaCheck(cudaEventCreate(&profile.stop[i]));
        created = 1;
    }
    if (!on) profile_collect();
    profile.on = on;
}
void st_profile_reset(void) {
    profile_collect();
    profile.n_rows = 0;
}
// The table, most time first: per step (of `steps`, which took `step_ms` each on the host's clock), the
// calls, the milliseconds and the share of the step; then what no row holds (the host's own work,
// launch gaps, waits).
void st_profile_print(FILE *f, int steps, double step_ms) {
    profile_collect();
    int order[PROFILE_ROWS];
    double total = 0.0;
    for (int r = 0; r < profile.n_rows; r++) {
        int at = r; // insertion sort by time, most first
        while (at > 0 && profile.rows[order[at - 1]].ms < profile.rows[r].ms) order[at] = order[at - 1], at--;
        order[at] = r;
        total += profile.rows[r].ms;
    }
    fprintf(f, "profile: a step of %.3f ms (the mean of %d timed), per step:\n%10s %7s %8s  %s\n", step_ms, steps,
            "ms", "share", "calls", "kernel, matrix product or copy");
    for (int i = 0; i < profile.n_rows; i++) {
        const double ms = profile.rows[order[i]].ms / steps;
        fprintf(f, "%10.3f %6.1f%% %8.1f  %s\n", ms, 100.0 * ms / step_ms, (double)profile.rows[order[i]].calls / steps,
                profile.rows[order[i]].name);
    }
    const double rest = step_ms - total / steps;
    fprintf(f, "%10.3f %6.1f%% %8s  (outside them: the host's work, launch gaps, waits)\n", rest, 100.0 * rest / step_ms, "");
    fprintf(f, "profile: timed %.3f ms of %.3f per step (%.1f%%)\n", total / steps, step_ms, 100.0 * total / steps / step_ms);
}

// Launches a kernel, and checks it. One that uses more than the default 48 KB of dynamic shared memory
// must opt in first (the attention kernels; the attribute is a host call, so the small kernels skip it).
#define LAUNCH(kernel, grid, block, shared_bytes, ...)                                              \
    do {                                                                                           \
        if ((shared_bytes) > 48 * 1024)                                                            \
            cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,    \
                                           (int)(shared_bytes)));                                  \
        PROFILED((#kernel), KERNEL_LAUNCH(kernel, grid, block, shared_bytes, __VA_ARGS__));        \
        cudaCheck(cudaGetLastError());                                                             \
    } while (0)
// The element-wise kernels' blocks: BLOCK threads, one per element, blocks_for(n) of them for n elements.
#define BLOCK 256
static unsigned blocks_for(size_t n) { return (unsigned)((n + BLOCK - 1) / BLOCK); }

// The kernels that reduce each row (layer norm, cross-entropy, the attention's delta) give a row
// ROW_THREADS threads, its lanes: lane k takes the columns k, k + ROW_THREADS, ... On a GPU a row is a
// warp's: its 32 loads of a row are 32 neighbours (one memory transaction, where a thread per row would
// touch 32 rows' cache lines), and shuffles between its lanes finish the row's sums (row_sum). On the CPU
// a row is one thread's, which walks it in its vector unit, and row_sum has nothing to do. `make test`
// also runs the GPU's 32 lanes on the CPU (a build with -DROW_THREADS=32).
#ifndef ROW_THREADS
#define ROW_THREADS (BUILT_FOR_GPU ? 32 : 1)
#endif
static_assert(ROW_THREADS == 1 || ROW_THREADS == 32, "a row is one thread's or a whole warp's (shuffles need every lane)");
__device__ static inline size_t thread_row(void) { return ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / ROW_THREADS; }
__device__ static inline int row_lane(void) { return threadIdx.x % ROW_THREADS; }
// Their blocks: BLOCK rows of one thread on the CPU; on a GPU one row, a warp, per block, so that no
// block holds a row past the end, whose warp would leave while the block's others shuffle (legal on a
// GPU; but the emulator decides from the block's first thread whether it needs fibers, and with its
// threads in reverse order, CUDA_EMU_REVERSE, that thread is a leaving one).
#define ROW_BLOCK (ROW_THREADS == 1 ? BLOCK : ROW_THREADS)
static unsigned row_kernel_blocks(size_t rows) { return (unsigned)((rows * ROW_THREADS + ROW_BLOCK - 1) / ROW_BLOCK); }
// The sum, or the max, of v over a row's lanes, in every lane: a butterfly, each lane combining its value
// with lane ^ offset's, so every lane ends with the same bits.
__device__ static inline float row_sum(float v) {
    for (int offset = ROW_THREADS / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ static inline float row_max(float v) {
    for (int offset = ROW_THREADS / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The number of GPUs; none usable: one line saying how to build for the CPU, and exit 1.
static int device_count(void) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        fprintf(stderr, "no usable CUDA GPU (%s): this binary was built for the GPU; build for the CPU "
                        "with: make cpu\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "no device found");
        exit(1);
    }
    return count;
}
const char *st_device_init(void) {
    static cudaDeviceProp prop;
    int device = 0;
    device_count();
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaGetDeviceProperties(&prop, device));
    return prop.name;
}
// Processes sharing a machine's GPUs (./train under mpirun) each take one, by their rank on the machine;
// a process that sees a single GPU takes it (launchers such as srun --gpus-per-task=1 show each its own).
void st_device_select(int index) {
    const int count = device_count();
    if (count == 1) index = 0;
    if (index >= count)
        st_fail("process %d on this machine has no GPU of its own (%d found): start at most %d processes per machine",
                index, count, count);
    cudaCheck(cudaSetDevice(index));
}

int st_device_is_gpu(void) { return BUILT_FOR_GPU; }

void st_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(1);
}

void *st_malloc(size_t bytes) {
    void *ptr = NULL;
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) {
        fprintf(stderr, "out of device memory: asked for %zu bytes (%.1f MiB); use a smaller batch, "
                        "context or model\n", bytes, bytes / 1048576.0);
        exit(1);
    }
    return ptr;
}
void st_free(void *ptr) { cudaCheck(cudaFree(ptr)); }
void *st_host_alloc(size_t bytes) {
    void *ptr = malloc(bytes ? bytes : 1);
    if (!ptr) {
        fprintf(stderr, "out of memory: asked for %zu bytes (%.1f MiB) of host memory; use a smaller batch, context "
                        "or sample\n", bytes, bytes / 1048576.0);
        exit(1);
    }
    return ptr;
}
static void *host_zeroed(size_t bytes) { return memset(st_host_alloc(bytes), 0, bytes); }
void st_to_device(void *dst, const void *src, size_t bytes) {
    PROFILED(("copy to device"), cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice)));
}
void st_to_host(void *dst, const void *src, size_t bytes) {
    PROFILED(("copy to host"), cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost)));
}
void st_synchronize(void) { cudaCheck(cudaDeviceSynchronize()); }

// ----------------------------------------------------------------------------
// 2. Patterns: which keys j each query i may attend to

// A pattern has two steps; a layer of H heads combines them (paper section 5.1):
//
//   strided, stride l   step 0 (local):  i - l < j <= i          the previous l positions
//                       step 1 (stride): (i - j) mod l == 0      every l-th earlier position
//   fixed, block l      step 0 (block):  floor(j/l) == floor(i/l)   the query's own block
//                       step 1 (summary): j mod l in [l-(g+1)c, l-gc-1], g = head mod G
//                                         the last c cells of every block ("summary" cells)
//   interleaved  layer r uses step (r mod 2) for every head
//   merged       every head attends to the union of both steps, in one softmax
//   multihead    head h uses step (h mod 2)
//
// With l ~ sqrt(n) each query sees about l + n/l keys: O(n sqrt n) pairs instead of n^2 / 2.
// Two baselines have a single step: dense (every j <= i) and local (strided's local step alone:
// i - l < j <= i, a sliding window). One local layer sees l - 1 bytes back; R layers stacked see at
// most R (l - 1): what is further back is out of reach, which the strided and fixed patterns reach.
// One more single step, added as the list below says (exercise 10): dilated, the l keys i, i - l, ...,
// i - (l - 1) l, a window of l taps l apart, like a dilated convolution's: (i - j) mod l == 0 and
// i - j < l^2. With l ~ sqrt(n) it reaches about n back with sqrt(n) keys, but sees no neighbour.
//
// How to add a pattern (a dilated window, say). Every place it touches:
//   1. sparse_transformer.h: its value in StPatternKind, just before ST_PATTERN_KINDS (checkpoints
//      store the number), and its name in the comment above st_pattern_kind_from_name;
//   2. this section: its name in PATTERN_NAMES, its rule in st_pattern_allows (the definition every
//      test checks against), its settings in st_pattern_check;
//   3. section 3: each of its steps as a band, every query's keys one range in some order of the
//      sequence (a StepKind; its case in step_key_range, whose default is the summary step's;
//      step_query_position, step_query_slot and step_key_position if the order is new; the lengths in
//      make_step), and head_steps, which gives each head its steps. The layout (section 4), the kernels
//      and decoding need nothing more: the layout checks that the ranges move forward;
//   4. train.c: -pattern's help text (and the settings its first line prints);
//   5. test_kernels.c: its steps in mark_step (an independent mask, written from the paper's rule), its
//      pairs per query in count_step (a closed form), and configurations in the lists of the pattern,
//      kernel, layout, model and decoding tests; -show_pattern then draws it (st_pattern_allows).
// Its l (-stride) sets two things beyond the pattern, whatever the pattern: the width of the text and
// audio position grid (position_sizes, section 8) and the unit by which sampling moves its window
// (window_start, section 9). A new pattern whose l means something else (a window of 3 keys, say) still
// sets them: choose the pattern's parameter so that l stays a sensible row width (about sqrt(n)).

static const char *PATTERN_NAMES[] = {"dense", "strided", "fixed", "local", "dilated"};
static_assert(sizeof PATTERN_NAMES / sizeof PATTERN_NAMES[0] == ST_PATTERN_KINDS, "a name for every pattern");
static const char *COMBINE_NAMES[] = {"interleaved", "merged", "multihead"};

static int name_index(const char *name, const char *const *names, int count) {
    for (int i = 0; i < count; i++)
        if (strcmp(name, names[i]) == 0) return i;
    return -1;
}
int st_pattern_kind_from_name(const char *name) { return name_index(name, PATTERN_NAMES, ST_PATTERN_KINDS); }
int st_combine_from_name(const char *name) { return name_index(name, COMBINE_NAMES, 3); }
const char *st_pattern_kind_name(StPatternKind kind) { return PATTERN_NAMES[kind]; }
const char *st_combine_name(StCombine combine) { return COMBINE_NAMES[combine]; }

int st_pattern_allows(const StPattern *p, int layer, int head, int i, int j) {
    if (j < 0 || j > i) return 0; // causal
    if (p->kind == ST_DENSE) return 1;
    const int l = p->stride;
    if (p->kind == ST_LOCAL) return i - j < l;
    if (p->kind == ST_DILATED) return (i - j) % l == 0 && (i - j) / l < l;
    int step0, step1;
    // Exercise 1 starts here: the two steps of the strided and fixed patterns.
    if (p->kind == ST_STRIDED) {
        step0 = i - j < l;
        step1 = (i - j) % l == 0;
    } else {
        const int c = p->summary, g = head % p->groups;
        step0 = j / l == i / l;
        step1 = j % l >= l - (g + 1) * c && j % l <= l - g * c - 1;
    }
    // Exercise 1 ends here.
    switch (p->combine) {
    case ST_INTERLEAVED: return layer % 2 ? step1 : step0;
    case ST_MULTIHEAD: return head % 2 ? step1 : step0;
    default: return step0 || step1;
    }
}

const char *st_pattern_check(const StPattern *p, int n_ctx, int n_head, int d_head) {
    static char msg[256];
    if (n_ctx < 1 || n_ctx > ST_MAX_CTX)
        snprintf(msg, sizeof msg, "context %d is out of range: use 1 <= ctx <= %d", n_ctx, ST_MAX_CTX);
    else if (n_head < 1)
        snprintf(msg, sizeof msg, "heads %d: need at least one head", n_head);
    else if (d_head != 32 && d_head != 64 && d_head != 128)
        snprintf(msg, sizeof msg, "head size %d is not supported: the kernels take 32, 64 or 128 "
                 "(choose dim = heads * head size)", d_head);
    else if (p->kind < ST_DENSE || p->kind >= ST_PATTERN_KINDS)
        snprintf(msg, sizeof msg, "unknown pattern %d: use dense, strided, fixed, local or dilated", (int)p->kind);
    else if (p->kind == ST_DENSE)
        return NULL;
    else if (p->combine < ST_INTERLEAVED || p->combine > ST_MULTIHEAD)
        snprintf(msg, sizeof msg, "unknown combination %d: use interleaved, merged or multihead",
                 (int)p->combine);
    else if (p->stride < 1 || p->stride > n_ctx)
        snprintf(msg, sizeof msg, "%s needs 1 <= stride <= ctx, got stride %d with ctx %d "
                 "(sqrt(ctx) is typical)", PATTERN_NAMES[p->kind], p->stride, n_ctx);
    else if (p->kind == ST_FIXED && (p->summary < 1 || p->groups < 1))
        snprintf(msg, sizeof msg, "fixed needs summary >= 1 and summary_groups >= 1, got %d and %d",
                 p->summary, p->groups);
    else if (p->kind == ST_FIXED && (long)p->groups * p->summary > p->stride)
        snprintf(msg, sizeof msg, "fixed needs summary_groups * summary <= stride (the summary cells "
                 "must fit in a block), got %d * %d > %d", p->groups, p->summary, p->stride);
    else if (p->combine == ST_MULTIHEAD && n_head < 2 && (p->kind == ST_STRIDED || p->kind == ST_FIXED))
        snprintf(msg, sizeof msg, "multihead splits the heads between the two steps: it needs at "
                 "least 2 heads, got %d", n_head);
    else
        return NULL;
    return msg;
}

// ----------------------------------------------------------------------------
// 3. Steps: each step is a band in the right order of the sequence

// A kernel works on tiles of TILE queries x TILE keys. For its work to be proportional to the allowed
// pairs, the allowed keys of consecutive queries must be close together. Each step is therefore read
// in an order of the sequence where every query's keys form ONE contiguous range [lo, hi]:
//
//   step            query order          key order                   keys of query i (in key order)
//   dense (causal)  natural              natural                     [0, i]
//   local           natural              natural                     [i - l + 1, i]
//   block           natural              natural                     [floor(i/l) l, i]
//   stride          transposed           transposed                  its residue class, up to itself
//   dilated         transposed           transposed                  its residue class, its last l
//   summary         natural              gathered summary cells      every summary cell <= i
//
// "Transposed" is OpenAI's trick: lay the sequence out as rows of width l and read it column by column.
// Residue class r = i mod l (a column) becomes a contiguous, causal sequence of its own, so the stride
// step is plain causal attention inside each column. Each column is padded to a whole number of tiles
// (or, when shorter than a tile, to a power of two, so whole columns pack into one tile).
// "Gathered" keeps only the summary cells of the head's group, in order: c cells per block of l.
// Keys that a merged head's other step already covers are dropped (exclusive), so that no key is
// counted twice in the shared softmax: j = i for the stride step, the query's own block for summary.
//
// A worked example, from section 2's rule to the band: strided, l = 3, n = 8, the stride step (the
// README's `-show_pattern` printout, head 1). The rule, (i - j) mod 3 = 0, gives query 7 the keys 7, 4,
// 1. Transposed, the columns are the residue classes {0, 3, 6}, {1, 4, 7}, {2, 5}, each padded to
// column = 4 slots (3 rows, rounded up to a power of two): slot p = (i mod l) column + floor(i / l), so
// positions 1, 4, 7 are slots 4, 5, 6, and query 7 (slot 6) sees the band from its column's first slot,
// p - p mod column = 4, to itself, 6 (step_key_range; 5 in a merged head, whose local step has j = i).

#define TILE 32       // queries and keys per tile

enum StepKind { STEP_CAUSAL, STEP_LOCAL, STEP_BLOCK, STEP_STRIDE, STEP_SUMMARY, STEP_DILATED };
// The steps read in the transposed order: a residue class mod l is a column, read down
static __host__ __device__ inline bool transposed(int kind) { return kind == STEP_STRIDE || kind == STEP_DILATED; }

struct Step {
    int kind;       // StepKind
    int n;          // sequence length
    int l, c, g;    // stride or block length; summary width and group (summary)
    int exclusive;  // 1: drop the keys the merged head's first step already has
    int column;     // stride, dilated: slots per column in the transposed order
    int nq, nk;     // length of the query and the key order (slots)
};

// Exercise 2 starts here: the transposed order of the stride step.
// Natural position of slot p of the query order, or -1 for a padding slot.
static __host__ __device__ inline int step_query_position(const Step &st, int p) {
    if (p >= st.nq) return -1;
    if (!transposed(st.kind)) return p;
    const int r = p / st.column, t = p % st.column; // column r, row t
    const int i = t * st.l + r;
    return i < st.n ? i : -1;
}

// The query slot of natural position i: the inverse of step_query_position.
static __host__ __device__ inline int step_query_slot(const Step &st, int i) {
    return transposed(st.kind) ? i % st.l * st.column + i / st.l : i;
}
// Exercise 2 ends here.

// Natural position of slot s of the key order, or -1 for a padding slot.
static __host__ __device__ inline int step_key_position(const Step &st, int s) {
    if (s >= st.nk) return -1;
    if (transposed(st.kind)) return step_query_position(st, s);
    if (st.kind == STEP_SUMMARY) return s / st.c * st.l + (st.l - (st.g + 1) * st.c) + s % st.c;
    return s;
}

// The keys of the query in slot p (natural position i) are the key slots lo..hi (empty if hi < lo).
static __host__ __device__ inline void step_key_range(const Step &st, int p, int i, int *lo, int *hi) {
    switch (st.kind) {
    case STEP_CAUSAL: *lo = 0; *hi = i; break;
    case STEP_LOCAL: *lo = i - st.l + 1 > 0 ? i - st.l + 1 : 0; *hi = i; break;
    case STEP_BLOCK: *lo = i / st.l * st.l; *hi = i; break;
    case STEP_STRIDE: *lo = p - p % st.column; *hi = p - st.exclusive; break;
    // Exercise 10 starts here: the dilated window as a band in the transposed order.
    case STEP_DILATED: *lo = p - p % st.column > p - st.l + 1 ? p - p % st.column : p - st.l + 1; *hi = p; break;
    // Exercise 10 ends here.
    default: { // STEP_SUMMARY: the c cells of every earlier block, then those of its own block <= i
        const int first = st.l - (st.g + 1) * st.c; // first summary cell of a block
        int own = i % st.l - first + 1;              // summary cells <= i in its own block
        own = st.exclusive ? 0 : own < 0 ? 0 : own > st.c ? st.c : own;
        *lo = 0;
        *hi = i / st.l * st.c + own - 1;
    }
    }
}

// The keys of the query in slot p are the key slots lo..hi; none (hi < lo) for a padding slot. Every
// slot of a range is a real key (padding only ends a column), so the pair (p, s) is allowed exactly
// when lo <= s <= hi: a kernel's mask is two comparisons per pair, its row's range computed once.
static __host__ __device__ inline void step_slot_range(const Step &st, int p, int *lo, int *hi) {
    const int i = step_query_position(st, p);
    *lo = 0, *hi = -1;
    if (i >= 0) step_key_range(st, p, i, lo, hi);
}

static Step make_step(int kind, int n, const StPattern *p, int head, int exclusive) {
    // Only the fields a step reads are set, so that heads with the same step compare equal.
    Step st = {kind, n, kind == STEP_CAUSAL ? 0 : p->stride, 0, 0, exclusive, 1, n, n};
    if (kind == STEP_SUMMARY) st.c = p->summary, st.g = head % p->groups;
    if (transposed(kind)) {
        const int rows = (n + st.l - 1) / st.l; // longest column
        int column = 1;
        while (column < rows && column < TILE) column *= 2;
        if (rows > TILE) column = (rows + TILE - 1) / TILE * TILE;
        st.column = column;
        st.nq = st.nk = (st.l < n ? st.l : n) * column;
    } else if (kind == STEP_SUMMARY) {
        const int first = st.l - (st.g + 1) * st.c, tail = n % st.l - first;
        st.nk = n / st.l * st.c + (tail < 0 ? 0 : tail > st.c ? st.c : tail);
    }
    return st;
}

// The steps of head `head` in layer `layer` (1 or 2), in the order they must run.
static int head_steps(const StPattern *p, int layer, int head, int n, Step steps[2]) {
    if (p->kind == ST_DENSE || p->kind == ST_LOCAL || p->kind == ST_DILATED) {
        steps[0] = make_step(p->kind == ST_DENSE ? STEP_CAUSAL : p->kind == ST_LOCAL ? STEP_LOCAL : STEP_DILATED, n, p,
                             head, 0);
        return 1;
    }
    const int first = p->kind == ST_STRIDED ? STEP_LOCAL : STEP_BLOCK;
    const int second = p->kind == ST_STRIDED ? STEP_STRIDE : STEP_SUMMARY;
    if (p->combine == ST_MERGED) {
        steps[0] = make_step(first, n, p, head, 0);
        steps[1] = make_step(second, n, p, head, 1);
        return 2;
    }
    const int which = p->combine == ST_INTERLEAVED ? layer % 2 : head % 2;
    steps[0] = make_step(which ? second : first, n, p, head, 0);
    return 1;
}

// ----------------------------------------------------------------------------
// 4. Tile layout: which key tiles each query tile touches, and which query tiles each key tile meets

// Because every query's keys are one range, and the ranges move forward with the query, the key tiles
// of a query tile are one range too, and so are the query tiles of a key tile. A tile pair is "full"
// when every (query, key) in it is a real, allowed pair: the kernel then skips the mask. The full tiles
// also form one range. So each tile is described by four numbers, a TileRange (the kernels read it).
// Memory is O(n / TILE) per step: never an n x n mask.

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

struct TileRange {
    int first;      // the first tile touched
    int first_full; // the first full tile (first_full > last_full: none is full)
    int last_full;  // the last full tile
    int last;       // the last tile touched (last < first: none)
};

// Query-tile view (forward, dQ): the range of key tiles of query tile qt. Counts the allowed pairs.
static TileRange query_tile_range(const Step &st, int qt, double *allowed) {
    int lo_min = INT_MAX, hi_max = -1, lo_max = -1, hi_min = INT_MAX;
    bool every_row_real = true; // a real query with a non-empty range in every row of the tile
    for (int p = qt * TILE; p < (qt + 1) * TILE; p++) {
        int lo, hi;
        step_slot_range(st, p, &lo, &hi);
        if (hi < lo) { every_row_real = false; continue; }
        *allowed += hi - lo + 1;
        lo_min = lo < lo_min ? lo : lo_min;
        lo_max = lo > lo_max ? lo : lo_max;
        hi_min = hi < hi_min ? hi : hi_min;
        hi_max = hi > hi_max ? hi : hi_max;
    }
    TileRange r = {0, 0, -1, -1};
    if (hi_max < 0) return r; // no query of this tile has a key in this step
    r.first = lo_min / TILE;
    r.last = hi_max / TILE;
    if (every_row_real) {
        // key tile kt is full when [kt TILE, kt TILE + TILE - 1] lies in every row's range
        // and all its slots are real keys (every slot of a range is real by construction)
        r.first_full = ceil_div(lo_max, TILE);
        r.last_full = (hi_min + 1) / TILE - 1;
    }
    return r;
}

// Key-tile view (dK, dV): the transpose of the query-tile view. Every step's key range moves forward
// with the query (section 3), so, over the query tiles that have any, neither end of a query tile's
// range ever moves back, nor does either end of its full tiles. Then the query tiles that meet key tile
// kt are one range: from the first whose last tile reaches kt to the last whose first tile has not passed
// it. Two indices sweeping forward with kt find it in O(query tiles + key tiles); visiting every tile
// pair instead would cost O(n^2 / TILE^2) for dense, a second at n = 2^20. The checks guard both
// properties for any step added later.
[[noreturn]] static void layout_error(const char *what, int tile) {
    fprintf(stderr, "internal error: the key-tile view: %s %d\n", what, tile);
    exit(1);
}

// One view: the query tiles qt with lo[qt] <= kt <= hi[qt] (none where hi[qt] < lo[qt]) become
// first[kt] .. last[kt] (0 .. -1 where there are none).
static void transpose_view(const int *lo, const int *hi, int n_qtiles, int *first, int *last, int n_ktiles) {
    // Pass 1: check that the ranges move forward, and count the query tiles meeting each key tile:
    // +1 where a range starts, -1 just after it ends, summed in pass 2 (a difference array)
    int *starts = (int *)host_zeroed((n_ktiles + 1) * sizeof(int));
    for (int qt = 0, prev = -1; qt < n_qtiles; qt++) {
        if (hi[qt] < lo[qt]) continue;
        if (prev >= 0 && (lo[qt] < lo[prev] || hi[qt] < hi[prev])) layout_error("the ranges move back at query tile", qt);
        starts[lo[qt]]++, starts[hi[qt] + 1]--;
        prev = qt;
    }
    // Pass 2: for each key tile, `a` = the first query tile whose range ends at kt or later, `b` = past
    // every query tile whose range starts at kt or earlier, `met` = how many of them hold kt
    for (int kt = 0, a = 0, b = 0, last_started = -1, met = 0; kt < n_ktiles; kt++) {
        met += starts[kt];
        while (a < n_qtiles && (hi[a] < lo[a] || hi[a] < kt)) a++;
        for (; b < n_qtiles && (hi[b] < lo[b] || lo[b] <= kt); b++)
            if (hi[b] >= lo[b]) last_started = b;
        first[kt] = met ? a : 0;
        last[kt] = met ? last_started : -1;
        if (met && last[kt] - first[kt] + 1 != met) layout_error("not one range of query tiles at key tile", kt);
    }
    free(starts);
}

static void key_tile_ranges(const TileRange *q_tiles, int n_qtiles, TileRange *k_tiles, int n_ktiles) {
    int *lo = (int *)st_host_alloc(n_qtiles * sizeof(int)), *hi = (int *)st_host_alloc(n_qtiles * sizeof(int));
    int *first = (int *)st_host_alloc(n_ktiles * sizeof(int)), *last = (int *)st_host_alloc(n_ktiles * sizeof(int));
    for (int full = 0; full < 2; full++) { // the tiles touched, then the full ones
        for (int qt = 0; qt < n_qtiles; qt++) {
            lo[qt] = full ? q_tiles[qt].first_full : q_tiles[qt].first;
            hi[qt] = full ? q_tiles[qt].last_full : q_tiles[qt].last;
        }
        transpose_view(lo, hi, n_qtiles, first, last, n_ktiles);
        for (int kt = 0; kt < n_ktiles; kt++) {
            if (full) k_tiles[kt].first_full = first[kt], k_tiles[kt].last_full = last[kt];
            else k_tiles[kt].first = first[kt], k_tiles[kt].last = last[kt];
        }
    }
    free(lo);
    free(hi);
    free(first);
    free(last);
}

// ----------------------------------------------------------------------------
// 4b. A tile kernel's block: its threads, its tiles in shared memory, the contracts of its helpers

// Section 5's kernels give each block one tile of output, TILE rows, and its threads split each tile
// alike: thread t owns row t % TILE and the (t / TILE)-th of WARPS equal parts of the row's columns
// (except, on the tensor cores, the output tile's running sums: OwnedTile below).
// This part is what they share; a first reading can skip to section 5 and come back.
// A GPU block has 4 warps: a thread keeps few values in registers, and four warps hide each other's
// waits on memory. The CPU build has 1 warp, a thread per row: it runs a block's threads one after
// another with a fiber switch at each barrier (cuda_on_cpu.h), so fewer threads doing more is faster
// there. Every entry is the same sum in the same order either way; `make test` also runs the kernel
// tests on the CPU with the GPU's 4 warps (a build with -DWARPS=4).
#ifndef WARPS
#define WARPS (BUILT_FOR_GPU ? 4 : 1)
#endif
#define TILE_THREADS (TILE * WARPS) // a tile kernel's block
// Blocks per multiprocessor that the register budget must allow (__launch_bounds__): 4 for float32, 2
// on the tensor cores, whose fragments take more registers.
#define MIN_BLOCKS(TF32) ((TF32) ? 2 : 4)
// The formulas are written with exp and the natural log; the kernels compute in base 2, as a GPU's
// exponential unit does (exp2f): queries are scaled by log2(e) / sqrt(D) as they load, so a kernel's
// score is s'_ij = s_ij log2(e) and exp(s_ij - m_i) = exp2(s'_ij - m'_i) with m' = m log2(e); the lse
// is stored in natural log again (times LN2).
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// The block's dynamic shared memory (sized at launch); each kernel carves its tiles from it. Rows are
// padded: by one float for the float32 loops, so that 32 threads reading 32 rows at one column hit 32
// different banks; by four for the tensor cores, whose operand reads (section 5b: lanes 4g + t, g of 8
// rows and t of 4 columns, or the other way round) then meet at most two to a bank.
extern __shared__ __align__(32) float smem[];
template <int D, bool TF32> struct TileShape {
    static const int PAD = TF32 ? 4 : 1;
    static const int ROW = D + PAD;         // floats per row of a (TILE, D) tile
    static const int MATRIX = TILE * ROW;   // floats of a (TILE, D) tile
    static const int SROW = TILE + PAD;     // floats per row of a (TILE, TILE) score tile
    static const int SCORES = TILE * SROW;  // floats of a (TILE, TILE) tile
    static const int TMATRIX = D * SROW;    // floats of a (D, TILE) tile: a (TILE, D) one transposed
    static const int OWN = D / WARPS;       // the entries of a (TILE, D) tile that a thread owns
    static const int RUN = TF32 ? 2 : OWN;  // how many of them in a row lie on one row of the tile
    static_assert(TILE == 32 && D % WARPS == 0, "a tile's rows are a warp's lanes; the warps' parts cover its columns");
    static_assert(!TF32 || OWN % 4 == 0, "the tensor cores' threads own whole 16 x 8 accumulators, 4 entries each");
};
// The part of a (TILE, COLS) tile this thread owns: row own_row(), columns own_col<COLS>() + 0 .. COLS / WARPS - 1.
__device__ static inline int own_row(void) { return threadIdx.x % TILE; }
template <int COLS> __device__ static inline int own_col(void) { return threadIdx.x / TILE * (COLS / WARPS); }
// A thread's part of a (TILE, D) output tile (out, dK, dV, dQ), kept in registers across a kernel's loop:
// in the float32 body the row and columns above; on the tensor cores the accumulators of 16 x 8 blocks,
// in their lane map (section 5b). Entry u of it is element (out_row(u), out_col(u)) of the tile.
template <int D, bool TF32> using OwnedTile = float[TileShape<D, TF32>::OWN];
// Element e (0..3) of a 16 x 8 accumulator of the tensor cores is, in this lane, at row acc_row(e) and
// column acc_col(e) of its block (PTX's lane map, section 5b).
__device__ static inline int acc_row(int e) { return threadIdx.x % 32 / 4 + 8 * (e / 2); }
__device__ static inline int acc_col(int e) { return 2 * (threadIdx.x % 4) + e % 2; }
// Block number `warp + WARPS j` of the tile's (TILE / 16) x (D / 8) blocks of 16 x 8 holds a thread's
// entries 4 j .. 4 j + 3: blocks alternate between the top and the bottom half, then move 8 columns on.
__device__ static inline int mma_block(int u) { return threadIdx.x / 32 + WARPS * (u / 4); }
template <bool TF32> __device__ static inline int out_row(int u) {
    return TF32 ? mma_block(u) % 2 * 16 + acc_row(u % 4) : own_row();
}
template <int D, bool TF32> __device__ static inline int out_col(int u) {
    return TF32 ? mma_block(u) / 2 * 8 + acc_col(u % 4) : own_col<D>() + u;
}

// Where the dK/dV kernel keeps each tile pair's dS for the dQ kernel: (TILE, TILE) tiles stored column
// by column, so that a GPU warp, whose 32 lanes own the tile's 32 rows, writes and reads 32 neighbours.
// The tile pair (query tile qt, key tile kt) of the launch's head y and batch element b is tile number
// (b * heads + y) * pairs + pair0[qt] + kt: a query tile's tile pairs are consecutive (section 6).
struct SavedDS {
    float *ds;        // NULL: none kept, the dQ kernel computes dS again
    const int *pair0; // (query tiles) the number of tile pair (qt, 0), were key tile 0 in qt's range
    int pairs;        // tile pairs of one head
};
__device__ static inline float *saved_tile(const SavedDS &saved, int qt, int kt) {
    const size_t head = (size_t)blockIdx.z * gridDim.y + blockIdx.y;
    return saved.ds + (head * saved.pairs + saved.pair0[qt] + kt) * TILE * TILE;
}

// Where head h of batch element b starts in a tensor of layout `at` (StHeadLayout, sparse_transformer.h):
// the kernels read and write a head's rows there, wherever the caller keeps them.
__device__ static inline size_t head_start(const StHeadLayout &at, int b, int h) { return b * at.batch + h * at.head; }

// The helpers, defined after the kernels:
// Rows first .. first + TILE - 1 of a step's query order (or key order) into a (TILE, D) tile, or into a
// (D, TILE) one if TRANSPOSED, times `scale`; padding slots load as zeros. x's rows are ld floats apart.
template <int D, bool TF32, bool TRANSPOSED = false>
__device__ static void load_tile(float *tile, const float *x, size_t ld, const Step &st, int first, bool keys,
                                 float scale);
// This thread's part of a (TILE, TILE) score tile, to or from a tile of global memory (column by column).
template <int D, bool TF32> __device__ static void save_scores(float *dst, const float *S_s);
template <int D, bool TF32> __device__ static void load_scores(float *S_s, const float *src);
// One float per row of a query tile (lse or delta), times `scale`; `missing` for padding slots.
__device__ static void load_row_values(float *dst, const float *x, const Step &st, int first, float scale,
                                       float missing);
// S = A B^T on the tile pair (query slots from p0, key slots from s0), A a (TILE, D) tile and B given
// transposed, Bt (D, TILE); the pairs the step does not allow get `masked`.
template <int D, bool TF32>
__device__ static __forceinline__ void tile_scores(float *S_s, const float *A_s, const float *Bt_s, float masked, const Step &st,
                                   int p0, int s0, bool full);
// acc += A B (A^T B if TRANSPOSED) for this thread's part of a (TILE, D) tile; A is a (TILE, TILE) score
// tile, B a (TILE, D) tile.
template <int D, bool TF32, bool TRANSPOSED>
__device__ static __forceinline__ void accumulate_product(OwnedTile<D, TF32> &acc, const float *A_s, const float *B_s);

// ----------------------------------------------------------------------------
// 5. Kernels

// Three kernels run the attention of one step (section 3) over its tile layout (section 4) (and one
// small one, attention_delta_kernel, prepares the backward):
//   attention_forward_kernel      a query tile per block, looping over its key tiles: out and lse
//   attention_backward_kv_kernel  a key tile per block, looping over its query tiles: dK and dV
//   attention_backward_q_kernel   a query tile per block, looping over its key tiles: dQ
// Both backward kernels need each tile pair's dS (the softmax's gradient). The dK/dV kernel computes it
// and, where a step's dS takes no more memory than its q, k and v (short contexts, sparse patterns),
// keeps it in global memory (SavedDS); the dQ kernel then reads it back instead of computing it again.
// Elsewhere the dQ kernel computes it again: memory stays linear in n.
// A block owns its output tile: no two blocks write the same row, so there are no atomics, and every
// sum is taken in the same order on every run. Its TILE_THREADS threads split every tile the same way:
// thread t owns row t % TILE (a warp's 32 lanes are a tile's 32 rows) and the (t / TILE)-th of WARPS
// equal parts of its columns (on the tensor cores the output's running sums are split as the
// instruction holds them: OwnedTile, out_row, out_col). The tiles sit in shared memory (TileShape);
// the products of tiles are two helpers, tile_scores (S = Q K^T, masked) and accumulate_product
// (O += P V), each with two bodies: float32 loops, or the tensor cores with TF32 operands (the template
// parameter TF32). Section 4b set out the block, its shared-memory tiles and the helpers' contracts;
// the helpers follow the kernels (5b).

// Forward: out_i = sum_j softmax_j(s_ij) v_j over the keys of this step, s_ij = q_i . k_j / sqrt(D),
// with FlashAttention's online softmax: a running max m and a running sum per row, so the scores of a
// row are never all in memory. The second step of a merged head (accumulate = 1) merges its result
// into the first's by the log-sum-exp rule:
//   lse = log(e^lse1 + e^lse2),  out = e^(lse1 - lse) out1 + e^(lse2 - lse) out2.
// Grid: (query tiles, heads of this step, B); block: TILE_THREADS.
template <int D, bool TF32>
__global__ void __launch_bounds__(TILE_THREADS, MIN_BLOCKS(TF32))
attention_forward_kernel(float *out, float *lse, const float *q, const float *k, const float *v, StLayout at,
                         Step st, const TileRange *tiles, const int *heads, int H, int accumulate) {
    typedef TileShape<D, TF32> S;
    float *Q_s = smem;                    // (TILE, D) queries * log2(e) / sqrt(D)
    float *Kt_s = Q_s + S::MATRIX;        // (D, TILE) keys, transposed
    float *V_s = Kt_s + S::TMATRIX;       // (TILE, D)
    float *P_s = V_s + S::MATRIX;         // (TILE, TILE) scores, then probabilities
    float *alpha_s = P_s + S::SCORES;     // (TILE) how much each row's running output shrinks
    float *w_old_s = alpha_s + TILE;      // (TILE) merge weights (accumulate)
    float *w_new_s = w_old_s + TILE;      // (TILE)

    const int qt = blockIdx.x, b = blockIdx.z, h = heads[blockIdx.y];
    const size_t in = head_start(at.qkv, b, h);
    q += in; k += in; v += in; out += head_start(at.out, b, h); lse += ((size_t)b * H + h) * st.n;
    const size_t ld = at.qkv.row;         // the rows of q, k and v
    const TileRange keys = tiles[qt];     // the key tiles of this query tile
    const int p0 = qt * TILE;

    load_tile<D, TF32>(Q_s, q, ld, st, p0, false, LOG2E / sqrtf((float)D));
    OwnedTile<D, TF32> o = {};              // this thread's part of the unnormalised output
    float m = -INFINITY, row_sum = 0.0f;    // running max and sum of row threadIdx.x (threads < TILE)

    for (int kt = keys.first; kt <= keys.last; kt++) {
        const bool full = keys.first_full <= kt && kt <= keys.last_full;
        __syncthreads(); // the previous tile is no longer read
        load_tile<D, TF32, true>(Kt_s, k, ld, st, kt * TILE, true, 1.0f);
        load_tile<D, TF32>(V_s, v, ld, st, kt * TILE, true, 1.0f);
        __syncthreads();

        // Pass 1: scores in base 2, S = Q K^T; pairs the step does not allow get -inf
        tile_scores<D, TF32>(P_s, Q_s, Kt_s, -INFINITY, st, p0, kt * TILE, full);
        __syncthreads();

        // Pass 2: online softmax, one thread per row: new max, rescale factor, probabilities, sum
        if (threadIdx.x < TILE) {
            // Exercise 3 starts here: the online softmax's rescale.
            float *row = P_s + threadIdx.x * S::SROW;
            float m_new = m;
            for (int c = 0; c < TILE; c++) m_new = fmaxf(m_new, row[c]);
            const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
            float tile_sum = 0.0f;
            // A pair not allowed (-inf) gets 0, and so does every pair of a row with no key yet.
            for (int c = 0; c < TILE; c++) {
                row[c] = row[c] == -INFINITY ? 0.0f : exp2f(row[c] - m_new);
                tile_sum += row[c];
            }
            row_sum = row_sum * alpha + tile_sum;
            m = m_new;
            alpha_s[threadIdx.x] = alpha;
            // Exercise 3 ends here.
        }
        __syncthreads();

        // Pass 3: O = diag(alpha) O + P V
        #pragma unroll
        for (int u = 0; u < S::OWN; u++) o[u] *= alpha_s[out_row<TF32>(u)];
        accumulate_product<D, TF32, false>(o, P_s, V_s);
    }

    // Finish each row: its log-sum-exp (natural log), and the weights of the merge with the first step
    if (threadIdx.x < TILE) {
        const int row = threadIdx.x, i = step_query_position(st, p0 + row);
        // Exercise 4 starts here: the log-sum-exp merge of a merged head's two steps.
        const float lse_new = row_sum > 0.0f ? (m + log2f(row_sum)) * LN2 : -INFINITY;
        float lse_old = -INFINITY;
        if (accumulate && i >= 0) lse_old = lse[i];
        const float top = fmaxf(lse_old, lse_new);
        const float merged = top == -INFINITY ? -INFINITY : top + logf(expf(lse_old - top) + expf(lse_new - top));
        w_old_s[row] = merged == -INFINITY ? 0.0f : expf(lse_old - merged);
        w_new_s[row] = merged == -INFINITY || row_sum == 0.0f ? 0.0f : expf(lse_new - merged) / row_sum;
        if (i >= 0) lse[i] = merged;
        // Exercise 4 ends here.
    }
    __syncthreads();
    #pragma unroll
    for (int u0 = 0; u0 < S::OWN; u0 += S::RUN) { // S::RUN entries at a time, on one row
        const int row = out_row<TF32>(u0), i = step_query_position(st, p0 + row);
        if (i < 0) continue;
        #pragma unroll
        for (int u = u0; u < u0 + S::RUN; u++) {
            const size_t e = (size_t)i * at.out.row + out_col<D, TF32>(u);
            const float before = accumulate ? out[e] * w_old_s[row] : 0.0f;
            out[e] = before + o[u] * w_new_s[row];
        }
    }
}

// The backward recomputes the probabilities from the forward's lse instead of storing them (FlashAttention 2):
//   P_ij     = exp(s_ij - lse_i)                   the forward's probabilities
//   dP_ij    = dO_i . v_j                          from out_i = sum_j P_ij v_j
//   delta_i  = sum_j P_ij dP_ij = dO_i . O_i       the same sum, from the output: one dot product per row
//                                                  (FlashAttention 2's D_i; here D is the head size)
//   dS_ij    = P_ij (dP_ij - delta_i)              through the softmax
//   dV_j = sum_i P_ij dO_i,  dK_j = sum_i dS_ij q_i / sqrt(D),  dQ_i = sum_j dS_ij k_j / sqrt(D)
// A head's first step writes dq, dk, dv; its second adds its keys' terms.
//
// Why a merged head's backward is right though it runs its two steps one at a time: the forward left one
// lse and one out per row, the merged ones. Each step recomputes P_ij = exp(s_ij - lse_i) with that
// merged lse, which is the probability of the pair in the joint softmax over both steps' keys, not in the
// step's own softmax; and delta_i = dO_i . O_i with the merged output is the sum of P_ij dP_ij over the
// keys of BOTH steps, which is what the joint softmax's dS needs. So every pair gets the joint softmax's
// P and dS, whichever step computes it; the steps' key sets are disjoint (section 3, exclusive), so adding
// the two steps' contributions counts each pair once.

// Backward, preparation: delta_i = dO_i . O_i for every row r = (b, h, t) of (B, H, T) (out and dout in
// the layout `at`). A row kernel (ROW_THREADS lanes per row, section 1), no barrier.
template <int D>
__global__ void attention_delta_kernel(float *delta, const float *dout, const float *out, StHeadLayout at, int H, int T,
                                       size_t rows) {
    const size_t r = thread_row();
    if (r >= rows) return;
    const size_t row = head_start(at, (int)(r / T / H), (int)(r / T % H)) + r % T * at.row;
    float sum = 0.0f;
    for (int x = row_lane(); x < D; x += ROW_THREADS) sum += dout[row + x] * out[row + x];
    sum = row_sum(sum);
    if (row_lane() == 0) delta[r] = sum;
}

// The rows of every head in layout `at`, zeroed (for dk, dv where a summary step comes first): entry e of
// head (blockIdx.z, blockIdx.y)'s (T, D) rows. Grid: (blocks of a head's T D entries, H, B).
template <int D> __global__ void zero_heads_kernel(float *x, StHeadLayout at, int T) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < (size_t)T * D) x[head_start(at, blockIdx.z, blockIdx.y) + e / D * at.row + e % D] = 0.0f;
}

// The backward's elementwise pass on one tile pair, shared by the dK/dV and the dQ kernels: P and dS.
// Q_s holds q / sqrt(D) * log2(e) and lse2_s holds lse * log2(e), so P = exp2(Q_s . k - lse2); Kt_s and
// Vt_s hold the key tile's k and v transposed, (D, TILE), as tile_scores takes them.
template <int D, bool TF32>
__device__ static void probability_gradients(float *P_s, float *dS_s, const float *Q_s, const float *dO_s,
                                             const float *Kt_s, const float *Vt_s, const float *lse2_s,
                                             const float *delta_s, const Step &st, int p0, int s0, bool full) {
    typedef TileShape<D, TF32> S;
    tile_scores<D, TF32>(P_s, Q_s, Kt_s, -INFINITY, st, p0, s0, full); // s (base 2), -inf where not allowed
    tile_scores<D, TF32>(dS_s, dO_s, Vt_s, 0.0f, st, p0, s0, full);    // dP, 0 where not allowed
    const int r = own_row(), c0 = own_col<TILE>();
    for (int c = c0; c < c0 + TILE / WARPS; c++) { // the entries this thread's scores wrote
        // Exercise 5 starts here: the softmax's backward.
        const float s = P_s[r * S::SROW + c];
        const float p = s == -INFINITY ? 0.0f : exp2f(s - lse2_s[r]); // a row with no key has lse -inf
        P_s[r * S::SROW + c] = p;
        dS_s[r * S::SROW + c] = p * (dS_s[r * S::SROW + c] - delta_s[r]);
        // Exercise 5 ends here.
    }
}

// Loads the query side of a tile pair for the backward: Q (scaled as in the forward), dO, lse and delta.
template <int D, bool TF32>
__device__ static void load_query_side(float *Q_s, float *dO_s, float *lse2_s, float *delta_s, const float *q,
                                       const float *dout, const float *lse, const float *delta, const StLayout &at,
                                       const Step &st, int p0) {
    load_tile<D, TF32>(Q_s, q, at.qkv.row, st, p0, false, LOG2E / sqrtf((float)D));
    load_tile<D, TF32>(dO_s, dout, at.out.row, st, p0, false, 1.0f);
    load_row_values(lse2_s, lse, st, p0, LOG2E, INFINITY);
    load_row_values(delta_s, delta, st, p0, 1.0f, 0.0f);
}

// Backward for keys and values, one key tile per block, looping over the query tiles that meet it:
//   dV_j = sum_i P_ij dO_i                  from out_i = sum_j P_ij v_j
//   dK_j = sum_i dS_ij q_i / sqrt(D)         from s_ij = q_i . k_j / sqrt(D)
// Each key tile is owned by one block: no atomics, and a deterministic sum. A head's first step writes
// dk, dv, its second (accumulate = 1) adds into them: a merged head's two steps touch the same keys.
// Grid: (key tiles, heads of this step, B); block: TILE_THREADS.
template <int D, bool TF32>
__global__ void __launch_bounds__(TILE_THREADS, MIN_BLOCKS(TF32))
attention_backward_kv_kernel(float *dk, float *dv, const float *dout, const float *lse, const float *delta,
                             const float *q, const float *k, const float *v, StLayout at, Step st,
                             const TileRange *tiles, const int *heads, int H, SavedDS saved, int accumulate) {
    typedef TileShape<D, TF32> S;
    float *Kt_s = smem;                 // (D, TILE) keys, transposed
    float *Vt_s = Kt_s + S::TMATRIX;    // (D, TILE) values, transposed
    float *Q_s = Vt_s + S::TMATRIX;     // (TILE, D) queries * log2(e) / sqrt(D)
    float *dO_s = Q_s + S::MATRIX;      // (TILE, D)
    float *P_s = dO_s + S::MATRIX;      // (TILE, TILE)
    float *dS_s = P_s + S::SCORES;      // (TILE, TILE)
    float *lse2_s = dS_s + S::SCORES;   // (TILE) lse * log2(e)
    float *delta_s = lse2_s + TILE;     // (TILE)

    const int kt = blockIdx.x, b = blockIdx.z, h = heads[blockIdx.y];
    const size_t in = head_start(at.qkv, b, h), bh = (size_t)b * H + h;
    q += in; k += in; v += in; dk += in; dv += in; dout += head_start(at.out, b, h);
    lse += bh * st.n; delta += bh * st.n;
    const TileRange queries = tiles[kt]; // the query tiles that meet this key tile
    const int s0 = kt * TILE;

    load_tile<D, TF32, true>(Kt_s, k, at.qkv.row, st, s0, true, 1.0f);
    load_tile<D, TF32, true>(Vt_s, v, at.qkv.row, st, s0, true, 1.0f);
    OwnedTile<D, TF32> dk_acc = {}, dv_acc = {};

    for (int qt = queries.first; qt <= queries.last; qt++) {
        const bool full = queries.first_full <= qt && qt <= queries.last_full;
        __syncthreads();
        load_query_side<D, TF32>(Q_s, dO_s, lse2_s, delta_s, q, dout, lse, delta, at, st, qt * TILE);
        __syncthreads();
        probability_gradients<D, TF32>(P_s, dS_s, Q_s, dO_s, Kt_s, Vt_s, lse2_s, delta_s, st, qt * TILE, s0, full);
        if (saved.ds) save_scores<D, TF32>(saved_tile(saved, qt, kt), dS_s); // for the dQ kernel
        __syncthreads();
        // dV += P^T dO and dK += dS^T Q, for the part of the key tile this thread owns
        accumulate_product<D, TF32, true>(dv_acc, P_s, dO_s);
        accumulate_product<D, TF32, true>(dk_acc, dS_s, Q_s);
    }
    // Q_s carries log2(e) / sqrt(D); ln 2 takes the log2(e) back out
    #pragma unroll
    for (int u0 = 0; u0 < S::OWN; u0 += S::RUN) { // S::RUN entries at a time, on one row
        const int j = step_key_position(st, s0 + out_row<TF32>(u0));
        if (j < 0) continue;
        #pragma unroll
        for (int u = u0; u < u0 + S::RUN; u++) {
            const size_t e = (size_t)j * at.qkv.row + out_col<D, TF32>(u);
            dk[e] = accumulate ? dk[e] + dk_acc[u] * LN2 : dk_acc[u] * LN2;
            dv[e] = accumulate ? dv[e] + dv_acc[u] : dv_acc[u];
        }
    }
}

// Backward for queries, one query tile per block, looping over its key tiles:
//   dQ_i = sum_j dS_ij k_j / sqrt(D)         from s_ij = q_i . k_j / sqrt(D)
// dS is the dK/dV kernel's, read back, or (none kept) computed again as that kernel computed it: the
// same bits either way. Writes dq (a head's first step) or adds into it (accumulate = 1, its second).
// Grid: (query tiles, heads of this step, B); block: TILE_THREADS.
template <int D, bool TF32>
__global__ void __launch_bounds__(TILE_THREADS, MIN_BLOCKS(TF32))
attention_backward_q_kernel(float *dq, const float *dout, const float *lse, const float *delta,
                            const float *q, const float *k, const float *v, StLayout at, Step st,
                            const TileRange *tiles, const int *heads, int H, SavedDS saved, int accumulate) {
    typedef TileShape<D, TF32> S;
    float *Q_s = smem;                  // (TILE, D) queries * log2(e) / sqrt(D)
    float *dO_s = Q_s + S::MATRIX;      // (TILE, D)
    float *K_s = dO_s + S::MATRIX;      // (TILE, D) keys, for dQ += dS K...
    float *Kt_s = K_s + S::MATRIX;      // (D, TILE) ...and transposed, for the scores
    float *Vt_s = Kt_s + S::TMATRIX;    // (D, TILE) values, transposed
    float *P_s = Vt_s + S::TMATRIX;     // (TILE, TILE)
    float *dS_s = P_s + S::SCORES;      // (TILE, TILE)
    float *lse2_s = dS_s + S::SCORES;   // (TILE)
    float *delta_s = lse2_s + TILE;     // (TILE)

    const int qt = blockIdx.x, b = blockIdx.z, h = heads[blockIdx.y];
    const size_t in = head_start(at.qkv, b, h), bh = (size_t)b * H + h, ld = at.qkv.row;
    q += in; k += in; v += in; dq += in; dout += head_start(at.out, b, h);
    lse += bh * st.n; delta += bh * st.n;
    const TileRange keys = tiles[qt];   // the key tiles of this query tile
    const int p0 = qt * TILE;

    if (!saved.ds) load_query_side<D, TF32>(Q_s, dO_s, lse2_s, delta_s, q, dout, lse, delta, at, st, p0);
    OwnedTile<D, TF32> dq_acc = {};

    for (int kt = keys.first; kt <= keys.last; kt++) {
        __syncthreads();
        load_tile<D, TF32>(K_s, k, ld, st, kt * TILE, true, 1.0f);
        if (saved.ds) { // dS as the dK/dV kernel kept it
            load_scores<D, TF32>(dS_s, saved_tile(saved, qt, kt));
        } else {        // or computed again, as that kernel computed it
            const bool full = keys.first_full <= kt && kt <= keys.last_full;
            load_tile<D, TF32, true>(Kt_s, k, ld, st, kt * TILE, true, 1.0f);
            load_tile<D, TF32, true>(Vt_s, v, ld, st, kt * TILE, true, 1.0f);
            __syncthreads();
            probability_gradients<D, TF32>(P_s, dS_s, Q_s, dO_s, Kt_s, Vt_s, lse2_s, delta_s, st, p0, kt * TILE, full);
        }
        __syncthreads();
        // dQ += dS K, for the part of the query tile this thread owns
        accumulate_product<D, TF32, false>(dq_acc, dS_s, K_s);
    }
    const float scale = 1.0f / sqrtf((float)D);
    #pragma unroll
    for (int u0 = 0; u0 < S::OWN; u0 += S::RUN) { // S::RUN entries at a time, on one row
        const int i = step_query_position(st, p0 + out_row<TF32>(u0));
        if (i < 0) continue;
        #pragma unroll
        for (int u = u0; u < u0 + S::RUN; u++) {
            const size_t e = (size_t)i * ld + out_col<D, TF32>(u);
            dq[e] = accumulate ? dq[e] + dq_acc[u] * scale : dq_acc[u] * scale;
        }
    }
}

// ----------------------------------------------------------------------------
// 5b. The kernels' helpers: tile loads and tile products (float32 loops or TF32 tensor cores)

// LOAD_LANES neighbouring threads share a row of x, each reading 4 neighbouring floats at a time (one
// 16-byte load on a GPU): a warp's request then covers LOAD_LANES * 16 contiguous bytes of each of its
// rows, whole 128-byte lines, where a thread per row would touch 32 rows' lines. On the CPU a thread
// reads whole rows (LOAD_LANES 1), which its vector unit loads several floats at a time. Each thread
// finds a row's position once. The rows must start on 16-byte boundaries (the model's do; carve).
#ifndef LOAD_LANES
#define LOAD_LANES (BUILT_FOR_GPU ? 8 : 1)
#endif
template <int D, bool TF32, bool TRANSPOSED>
__device__ static void load_tile(float *tile, const float *x, size_t ld, const Step &st, int first, bool keys,
                                 float scale) {
    typedef TileShape<D, TF32> S;
    static_assert(D % (4 * LOAD_LANES) == 0 && TILE_THREADS % LOAD_LANES == 0, "a row's lanes read 4 floats each");
    for (int row = threadIdx.x / LOAD_LANES; row < TILE; row += TILE_THREADS / LOAD_LANES) {
        const int pos = keys ? step_key_position(st, first + row) : step_query_position(st, first + row);
        for (int c = 4 * (threadIdx.x % LOAD_LANES); c < D; c += 4 * LOAD_LANES) {
            const float4 v = pos >= 0 ? *reinterpret_cast<const float4 *>(x + (size_t)pos * ld + c)
                                      : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const float part[4] = {v.x * scale, v.y * scale, v.z * scale, v.w * scale};
            // Transposed, 8 lanes of a row write columns 4 apart, which with the tensor cores' padding of 4
            // fall in 2 banks; each lane starting at its own one of the 4 keeps them apart.
            #pragma unroll
            for (int k = 0; k < 4; k++) {
                const int u = (k + threadIdx.x % LOAD_LANES / 2) % 4;
                tile[TRANSPOSED ? (c + u) * S::SROW + row : row * S::ROW + c + u] = part[u];
            }
        }
    }
}

template <int D, bool TF32> __device__ static void save_scores(float *dst, const float *S_s) {
    const int r = own_row(), c0 = own_col<TILE>();
    for (int c = c0; c < c0 + TILE / WARPS; c++) dst[c * TILE + r] = S_s[r * TileShape<D, TF32>::SROW + c];
}
template <int D, bool TF32> __device__ static void load_scores(float *S_s, const float *src) {
    const int r = own_row(), c0 = own_col<TILE>();
    for (int c = c0; c < c0 + TILE / WARPS; c++) S_s[r * TileShape<D, TF32>::SROW + c] = src[c * TILE + r];
}

__device__ static void load_row_values(float *dst, const float *x, const Step &st, int first, float scale,
                                       float missing) {
    for (int row = threadIdx.x; row < TILE; row += TILE_THREADS) {
        const int pos = step_query_position(st, first + row);
        dst[row] = pos >= 0 ? x[pos] * scale : missing;
    }
}

// The tensor cores' instruction, mma.sync m16n8k8 with TF32 operands: a warp computes D = A B + D, A a
// 16 x 8 matrix, B an 8 x 8 one, D 16 x 8 in float32, each lane holding a few elements of each in its
// registers. Lane l is thread t = l % 4 of group g = l / 4 (PTX's lane map):
//   A (16 x 8)  a[e] = A(g + 8 (e % 2), t + 4 (e / 2))      e = 0..3      lane 0: A(0,0) A(8,0) A(0,4) A(8,4)
//   B (8 x 8)   b[e] = B(t + 4 e, g)                         e = 0..1      lane 0: B(0,0) B(4,0)
//   D (16 x 8)  d[e] = D(g + 8 (e / 2), 2 t + e % 2)         e = 0..3      lane 5: D(1,2) D(1,3) D(9,2) D(9,3)
// Operands are first rounded to TF32 (to nearest, 10 mantissa bits; the instruction would drop the low
// 13 bits). cuda_on_cpu.h runs both as the hardware does: the product as a warp collective over this map.
#if BUILT_FOR_GPU
__device__ static inline float to_tf32(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
}
__device__ static inline void mma_tf32(float *d, const float *a, const float *b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
                   "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
}
#endif
// d += A B for the 16 x 8 block at (row0, col0) of a product, k from k0 to k0 + 7: A(r, k) at
// a[r * ar + k * ac], B(k, c) at b[k * br + c * bc] (strides in floats: either matrix may be read transposed).
__device__ static __forceinline__ void mma_block_product(float *d, const float *a, int ar, int ac, const float *b,
                                                         int br, int bc, int row0, int col0, int k0) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    float fa[4], fb[2];
    #pragma unroll
    for (int e = 0; e < 4; e++) fa[e] = to_tf32(a[(row0 + g + 8 * (e % 2)) * ar + (k0 + t + 4 * (e / 2)) * ac]);
    #pragma unroll
    for (int e = 0; e < 2; e++) fb[e] = to_tf32(b[(k0 + t + 4 * e) * br + (col0 + g) * bc]);
    mma_tf32(d, fa, fb);
}

// In a full tile pair every pair is allowed. In another, the keys of this thread's row are one range of
// columns [first, last] (section 3); the others get `masked`. The float32 body computes the thread's
// whole row part, one sum per column, all advancing together: independent sums over contiguous
// columns, which a CPU does several at once in its vector unit and a GPU warp reads at one address per
// column. On the CPU each sum is taken in four parts (every fourth x), added at the end: a CPU thread
// advances its 32 sums 16 at a time in vector registers, two chains of multiply-adds, each waiting for
// the one before (4 cycles), which would leave the vector unit idle three cycles in four; four parts
// keep it busy (a training step 7-8% faster). A GPU thread's 8 sums are 8 chains already and other
// warps hide the wait; registers are what it lacks (four parts made the dK/dV kernel spill at D = 128).
// The tensor cores compute the whole tile (each warp some of its 16 x 8 blocks, into S_s, then a
// barrier). Each thread then masks the entries it owns, which later passes rely on.
template <int D, bool TF32>
__device__ static __forceinline__ void tile_scores(float *S_s, const float *A_s, const float *Bt_s, float masked, const Step &st,
                                   int p0, int s0, bool full) {
    typedef TileShape<D, TF32> S;
    const int r = own_row(), c0 = own_col<TILE>(), OWN = TILE / WARPS, PARTS = BUILT_FOR_GPU ? 1 : 4;
    static_assert(D % 4 == 0 && (PARTS == 1 || PARTS == 4), "a sum's parts take every PARTS-th term");
    if constexpr (TF32) { // each warp some of the tile's 2 x 4 blocks of 16 x 8, stored into S_s
        for (int block = threadIdx.x / 32; block < TILE / 16 * TILE / 8; block += WARPS) {
            const int row0 = block % 2 * 16, col0 = block / 2 * 8;
            float d[4] = {};
            for (int k = 0; k < D; k += 8) mma_block_product(d, A_s, S::ROW, 1, Bt_s, S::SROW, 1, row0, col0, k);
            #pragma unroll
            for (int e = 0; e < 4; e++) S_s[(row0 + acc_row(e)) * S::SROW + col0 + acc_col(e)] = d[e];
        }
        __syncthreads();
    }
    int first = c0, last = c0 + OWN - 1; // this thread's columns that hold allowed pairs
    if (!full) {
        int lo, hi; // the keys of this thread's row r (section 3), as columns of this tile
        step_slot_range(st, p0 + r, &lo, &hi);
        first = lo - s0 > first ? lo - s0 : first;
        last = hi - s0 < last ? hi - s0 : last;
    }
    float *row = S_s + r * S::SROW;
    if (!TF32 && first <= last) {
        const float *a = A_s + r * S::ROW;
        float dot[PARTS][OWN] = {}; // dot[w][u]: the terms x = w, w + PARTS, ... of column c0 + u's sum
        for (int x = 0; x < D; x += PARTS) {
            #pragma unroll
            for (int w = 0; w < PARTS; w++) {
                #pragma unroll
                for (int u = 0; u < OWN; u++) dot[w][u] += a[x + w] * Bt_s[(x + w) * S::SROW + c0 + u];
            }
        }
        #pragma unroll
        for (int u = 0; u < OWN; u++) {
            if constexpr (PARTS == 1) row[c0 + u] = dot[0][u];
            else row[c0 + u] = (dot[0][u] + dot[1][u]) + (dot[2][u] + dot[3][u]);
        }
    }
    #pragma unroll
    for (int c = c0; c < c0 + OWN; c++)
        if (c < first || c > last) row[c] = masked;
}

// On the tensor cores each thread's acc holds accumulators of the product itself (out_row, out_col), which
// the instruction adds into: no tile in shared memory, no barrier.
template <int D, bool TF32, bool TRANSPOSED>
__device__ static __forceinline__ void accumulate_product(OwnedTile<D, TF32> &acc, const float *A_s, const float *B_s) {
    typedef TileShape<D, TF32> S;
    if constexpr (TF32) {
        #pragma unroll
        for (int u = 0; u < S::OWN; u += 4) {
            const int row0 = mma_block(u) % 2 * 16, col0 = mma_block(u) / 2 * 8;
            #pragma unroll
            for (int k = 0; k < TILE; k += 8)
                mma_block_product(acc + u, A_s, TRANSPOSED ? 1 : S::SROW, TRANSPOSED ? S::SROW : 1, B_s, S::ROW, 1,
                                  row0, col0, k);
        }
        return;
    }
    // The sums of this thread's row and columns c0 + u: each one a dot product summed in c order, all of
    // them advancing together, one c at a time, as in tile_scores.
    const int row = own_row(), c0 = own_col<D>();
    float sum[S::OWN] = {};
    #pragma unroll 4
    for (int c = 0; c < TILE; c++) {
        const float a = TRANSPOSED ? A_s[c * S::SROW + row] : A_s[row * S::SROW + c];
        // A 0 weight (a masked pair's probability or dS) adds +-0 (B is finite), which leaves a sum
        // that starts at +0 as it is: skipped, it changes no bit, and a CPU saves most of a partial
        // tile's work.
        if (a == 0.0f) continue;
        #pragma unroll
        for (int u = 0; u < S::OWN; u++) sum[u] += a * B_s[c * S::ROW + c0 + u];
    }
    #pragma unroll
    for (int u = 0; u < S::OWN; u++) acc[u] += sum[u];
}

// ----------------------------------------------------------------------------
// 6. API: build the layout once, then run the kernels step by step

// One step of the layer, with the heads that use it and its tile layout on the device.
struct StepPlan {
    Step st;
    int slot;          // 0: first step of its heads; 1: the second step of merged heads (accumulates)
    int n_heads;
    int *heads;        // (n_heads) on the device
    TileRange *q_tiles; // (query tiles) the key tiles of each query tile, on the device
    TileRange *k_tiles; // (key tiles) the query tiles of each key tile, on the device
    int n_qtiles, n_ktiles;
    int *pair0;         // (query tiles) where each query tile's tile pairs start (SavedDS), on the device
    int n_pairs;        // tile pairs of one head
};

struct StAttention {
    StPattern pattern;
    int layer, n, H, D;
    int n_plans;
    StepPlan *plans;
    double pairs_allowed, pairs_computed;
    size_t layout_bytes;
    float *delta;      // (B, H, T) workspace of the backward, grown on demand
    size_t delta_rows;
    float *ds;         // the tile pairs' dS kept by the backward (SavedDS), grown on demand
    size_t ds_floats;
};

// Whether the backward keeps dS between its kernels: 0 never, 1 where it may, 2 always (st_set_keep_ds).
static int keep_ds = 1;
void st_set_keep_ds(int keep) { keep_ds = keep; }

static bool same_step(const Step &a, const Step &b) { return memcmp(&a, &b, sizeof(Step)) == 0; }

static void *upload(const void *src, size_t bytes, size_t *counter) {
    void *dst = st_malloc(bytes);
    st_to_device(dst, src, bytes);
    *counter += bytes;
    return dst;
}

// Builds the plan for one distinct step used by `n_heads` heads (heads listed on the host).
static StepPlan make_plan(StAttention *a, const Step &st, int slot, const int *heads, int n_heads) {
    StepPlan plan = {st, slot, n_heads, NULL, NULL, NULL, ceil_div(st.nq, TILE), ceil_div(st.nk, TILE), NULL, 0};
    TileRange *q_tiles = (TileRange *)st_host_alloc(plan.n_qtiles * sizeof(TileRange));
    TileRange *k_tiles = (TileRange *)st_host_alloc(plan.n_ktiles * sizeof(TileRange));
    int *pair0 = (int *)st_host_alloc(plan.n_qtiles * sizeof(int));
    double allowed = 0.0, computed = 0.0;
    for (int qt = 0; qt < plan.n_qtiles; qt++) {
        q_tiles[qt] = query_tile_range(st, qt, &allowed);
        const int pairs = q_tiles[qt].last - q_tiles[qt].first + 1; // 0 for a tile with no key
        pair0[qt] = plan.n_pairs - q_tiles[qt].first;               // tile pair (qt, kt) is pair0[qt] + kt
        plan.n_pairs += pairs;
        computed += (double)pairs * TILE * TILE;
    }
    key_tile_ranges(q_tiles, plan.n_qtiles, k_tiles, plan.n_ktiles);
    a->pairs_allowed += allowed * n_heads;
    a->pairs_computed += computed * n_heads;
    plan.q_tiles = (TileRange *)upload(q_tiles, plan.n_qtiles * sizeof(TileRange), &a->layout_bytes);
    plan.k_tiles = (TileRange *)upload(k_tiles, plan.n_ktiles * sizeof(TileRange), &a->layout_bytes);
    plan.heads = (int *)upload(heads, n_heads * sizeof(int), &a->layout_bytes);
    plan.pair0 = (int *)upload(pair0, plan.n_qtiles * sizeof(int), &a->layout_bytes);
    free(q_tiles);
    free(k_tiles);
    free(pair0);
    return plan;
}

StAttention *st_attention_create(const StPattern *p, int layer, int n_ctx, int n_head, int d_head) {
    const char *err = st_pattern_check(p, n_ctx, n_head, d_head);
    if (err) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    StAttention *a = (StAttention *)host_zeroed(sizeof(StAttention));
    a->pattern = *p;
    a->layer = layer, a->n = n_ctx, a->H = n_head, a->D = d_head;
    a->plans = (StepPlan *)host_zeroed(2 * (size_t)n_head * sizeof(StepPlan));
    Step *steps = (Step *)st_host_alloc(2 * (size_t)n_head * sizeof(Step));
    int *n_steps = (int *)st_host_alloc(n_head * sizeof(int)), *heads = (int *)st_host_alloc(n_head * sizeof(int));
    for (int h = 0; h < n_head; h++) n_steps[h] = head_steps(p, layer, h, n_ctx, &steps[2 * h]);
    // Group the heads by identical step: one launch per distinct step. First steps run first.
    for (int slot = 0; slot < 2; slot++) {
        for (int h = 0; h < n_head; h++) {
            if (slot >= n_steps[h]) continue;
            const Step &st = steps[2 * h + slot];
            bool seen = false;
            for (int e = 0; e < h; e++) seen = seen || (slot < n_steps[e] && same_step(steps[2 * e + slot], st));
            if (seen) continue;
            int count = 0;
            for (int e = h; e < n_head; e++)
                if (slot < n_steps[e] && same_step(steps[2 * e + slot], st)) heads[count++] = e;
            a->plans[a->n_plans++] = make_plan(a, st, slot, heads, count);
        }
    }
    free(steps);
    free(n_steps);
    free(heads);
    return a;
}

void st_attention_free(StAttention *a) {
    if (!a) return;
    for (int i = 0; i < a->n_plans; i++) {
        st_free(a->plans[i].heads);
        st_free(a->plans[i].q_tiles);
        st_free(a->plans[i].k_tiles);
        st_free(a->plans[i].pair0);
    }
    if (a->delta) st_free(a->delta);
    if (a->ds) st_free(a->ds);
    free(a->plans);
    free(a);
}

StAttentionStats st_attention_stats(const StAttention *a) {
    StAttentionStats s = {a->pairs_allowed, a->pairs_computed,
                          a->layout_bytes + (a->delta_rows + a->ds_floats) * sizeof(float)};
    return s;
}

// Dispatches on the head size, the kernels' template parameter.
#define DISPATCH_HEAD_SIZE(D, ...)                                   \
    switch (D) {                                                     \
    case 32: { const int HS = 32; __VA_ARGS__; } break;              \
    case 64: { const int HS = 64; __VA_ARGS__; } break;              \
    default: { const int HS = 128; __VA_ARGS__; } break;             \
    }

// ... and on the precision of the tile products (st_set_precision), the other template parameter.
#define DISPATCH_KERNEL(D, ...)                                                         \
    if (precision == ST_TF32) { const bool TF = true; DISPATCH_HEAD_SIZE(D, __VA_ARGS__) } \
    else { const bool TF = false; DISPATCH_HEAD_SIZE(D, __VA_ARGS__) }

// The kernels' shared memory: (TILE, D) tiles, (D, TILE) ones, score tiles and rows of TILE values.
template <int D, bool TF32> static size_t forward_shared_bytes(void) {
    typedef TileShape<D, TF32> S;
    return (2 * (size_t)S::MATRIX + S::TMATRIX + S::SCORES + 3 * TILE) * sizeof(float);
}
template <int D, bool TF32> static size_t backward_kv_shared_bytes(void) {
    typedef TileShape<D, TF32> S;
    return (2 * (size_t)S::MATRIX + 2 * S::TMATRIX + 2 * S::SCORES + 2 * TILE) * sizeof(float);
}
template <int D, bool TF32> static size_t backward_q_shared_bytes(void) {
    typedef TileShape<D, TF32> S;
    return (3 * (size_t)S::MATRIX + 2 * S::TMATRIX + 2 * S::SCORES + 2 * TILE) * sizeof(float);
}

// The layout asked for, or (B, H, T, D) for every tensor. The kernels read rows 16 bytes at a time
// (load_tile): every tensor must start on a 16-byte boundary and every stride be a multiple of 4 floats.
static StLayout layout_or_packed(const StAttention *a, const StLayout *layout, std::initializer_list<const float *> tensors) {
    const size_t T = a->n, D = a->D;
    const StHeadLayout packed = {a->H * T * D, T * D, D};
    const StLayout at = layout ? *layout : StLayout{packed, packed};
    bool aligned = true;
    for (const float *x : tensors) aligned = aligned && (uintptr_t)x % 16 == 0;
    for (const StHeadLayout &h : {at.qkv, at.out}) aligned = aligned && h.batch % 4 == 0 && h.head % 4 == 0 && h.row % 4 == 0;
    if (!aligned) {
        fprintf(stderr, "st_attention: q, k, v, out and their gradients must start on 16-byte boundaries, and a layout's "
                        "strides be multiples of 4 floats (the kernels read rows 16 bytes at a time)\n");
        exit(1);
    }
    return at;
}

void st_attention_forward(StAttention *a, float *out, float *lse, const float *q, const float *k,
                          const float *v, int B, const StLayout *layout) {
    const StLayout at = layout_or_packed(a, layout, {out, q, k, v});
    for (int i = 0; i < a->n_plans; i++) {
        const StepPlan &pl = a->plans[i];
        const dim3 grid(pl.n_qtiles, pl.n_heads, B); // y and z are limited to 65535
        DISPATCH_KERNEL(a->D, LAUNCH((attention_forward_kernel<HS, TF>), grid, TILE_THREADS, (forward_shared_bytes<HS, TF>()),
                                     out, lse, q, k, v, at, pl.st, pl.q_tiles, pl.heads, a->H, pl.slot));
    }
}

// A workspace of at least `need` floats (its contents are not kept when it grows).
static void grow(float **buf, size_t *have, size_t need) {
    if (need <= *have) return;
    if (*buf) st_free(*buf);
    *buf = (float *)st_malloc(need * sizeof(float));
    *have = need;
}

void st_attention_backward(StAttention *a, float *dq, float *dk, float *dv, const float *dout,
                           const float *out, const float *lse, const float *q, const float *k,
                           const float *v, int B, const StLayout *layout) {
    const StLayout at = layout_or_packed(a, layout, {dq, dk, dv, dout, out, q, k, v});
    const size_t rows = (size_t)B * a->H * a->n;
    grow(&a->delta, &a->delta_rows, rows);
    DISPATCH_HEAD_SIZE(a->D, LAUNCH(attention_delta_kernel<HS>, row_kernel_blocks(rows), ROW_BLOCK, 0, a->delta, dout, out, at.out,
                                    a->H, a->n, rows));
    // A head's first step writes every row of dq, dk, dv, its second adds, except where a head's first
    // step is a summary step: its keys are the summary cells only, and dk, dv start at 0.
    bool summary_first = false;
    for (int i = 0; i < a->n_plans; i++) summary_first |= a->plans[i].slot == 0 && a->plans[i].st.kind == STEP_SUMMARY;
    if (summary_first)
        for (float *x : {dk, dv})
            DISPATCH_HEAD_SIZE(a->D, LAUNCH(zero_heads_kernel<HS>, dim3(blocks_for((size_t)a->n * HS), a->H, B), BLOCK, 0,
                                            x, at.qkv, a->n));
    for (int i = 0; i < a->n_plans; i++) {
        const StepPlan &pl = a->plans[i];
        SavedDS saved = {NULL, pl.pair0, pl.n_pairs};
        const size_t per_head = (size_t)pl.n_pairs * TILE * TILE; // dS kept: no more than q, k and v
        if (keep_ds == 2 || (keep_ds == 1 && per_head <= 3 * (size_t)a->n * a->D)) {
            grow(&a->ds, &a->ds_floats, (size_t)B * pl.n_heads * per_head);
            saved.ds = a->ds;
        }
        DISPATCH_KERNEL(a->D, {
            LAUNCH((attention_backward_kv_kernel<HS, TF>), dim3(pl.n_ktiles, pl.n_heads, B), TILE_THREADS,
                   (backward_kv_shared_bytes<HS, TF>()), dk, dv, dout, lse, a->delta, q, k, v, at, pl.st,
                   pl.k_tiles, pl.heads, a->H, saved, pl.slot);
            LAUNCH((attention_backward_q_kernel<HS, TF>), dim3(pl.n_qtiles, pl.n_heads, B), TILE_THREADS,
                   (backward_q_shared_bytes<HS, TF>()), dq, dout, lse, a->delta, q, k, v, at, pl.st,
                   pl.q_tiles, pl.heads, a->H, saved, pl.slot);
        });
    }
}

// ----------------------------------------------------------------------------
// 7. Model kernels: embeddings, layer norm, GELU, dropout, softmax cross-entropy, AdamW
//
// Elementwise kernels, one thread per element, and row kernels, a row's lanes per row (section 1: one
// thread on the CPU, a warp on a GPU). None has a barrier, so on the CPU they run as plain loops (built
// with a GPU's warp per row, ROW_THREADS = 32, the row kernels' lanes meet at shuffles instead). Sums over many rows (bias and weight gradients of layer norm and
// embeddings) are done by threads that each own outputs and loop over rows in a fixed order: no
// atomics, and the same result on every run, which the bit-identical resume of training relies on.
// Their columns go in blocks of one warp (columns_grid): 128 columns are then 4 blocks that 4
// multiprocessors (CPU cores) share, not one block on one (the column sums' pass 1, whose threads own
// RUN columns each, has RUN times fewer blocks).
//
// The column sums of biases and layer norms go in two passes, each in a fixed order:
//   1. the rows are cut into chunks of chunk_rows; one thread per (chunk, RUN neighbouring columns)
//      sums its chunk, each column in row order;
//   2. one thread per column adds the chunks' sums in chunk order (add_chunk_sums_kernel).
// On a GPU one thread per column walking thousands of rows would wait on each load in turn: about a
// millisecond per sum. The CPU build puts every row in one chunk (its cores need no more threads), so
// each sum is the plain row-order one; tests run smaller chunks there (st_model_set_chunk_rows).
#define CHUNK_ROWS (BUILT_FOR_GPU ? 128 : INT_MAX)
// The end of the chunk of rows that starts at `first` (the last chunk may be short).
__device__ static inline int chunk_end(int first, int chunk_rows, int rows) {
    return rows - first < chunk_rows ? rows : first + chunk_rows;
}

#define THREADS 128 // a block that reduces (block_reduce) or decodes a byte's attention
#define COLUMNS_BLOCK 32
static unsigned columns_grid(int cols) { return (unsigned)((cols + COLUMNS_BLOCK - 1) / COLUMNS_BLOCK); }
// A thread of a column sum's pass 1 owns RUN neighbouring columns and sums each in row order: a CPU
// thread then advances RUN independent sums together (one sum alone waits on its previous add at every
// row), and a GPU warp's RUN loads of a row cover 32 RUN contiguous floats. So the width must be a
// multiple of RUN: the model's are multiples of 32 (head sizes 32, 64, 128).
#define RUN 8
static unsigned run_columns_grid(int cols) {
    if (cols % RUN) {
        fprintf(stderr, "internal error: a column sum over %d columns, not a multiple of %d\n", cols, RUN);
        exit(1);
    }
    return columns_grid(cols / RUN);
}
// The element-wise passes over rows (bias_rows, GELU both ways, residual_kernel) cover each row with blocks that fit it exactly: the
// block's width divides the row's (whole warps, at most BLOCK; the model's widths are multiples of 32), so
// no thread falls past the end and the kernels have no bounds check. On a GPU that is a detail; on a CPU
// it lets the compiler write whole vectors where a check would make it mask every store (slow on AMD's
// processors: half the speed of these passes). Grid: (rows, blocks per row) of row_threads(cols).
static unsigned row_threads(int cols) {
    for (unsigned threads = BLOCK; threads >= 32; threads -= 32)
        if (cols % threads == 0) return threads;
    fprintf(stderr, "internal error: a row kernel over %d columns, not a multiple of 32\n", cols);
    exit(1);
}
static dim3 row_blocks(int rows, int cols) { return dim3(rows, cols / row_threads(cols)); }

// x[b, t, :] = wte[token] + wp0[pos0(t)] + wp1[pos1(t)] + wp2[pos2(t)]: the token's embedding plus the
// three factors of its position's embedding (text and audio: row and column of a grid of width l;
// images: row, column and channel). positions: (T, 3) indices into the three tables.
__global__ void embedding_forward_kernel(float *x, const int *tokens, const int *positions, const float *wte,
                                         const float *wp0, const float *wp1, const float *wp2, int BT, int T, int C) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (size_t)BT * C) return;
    const int bt = (int)(e / C), c = (int)(e % C), t = bt % T;
    const int *p = positions + 3 * t;
    x[e] = wte[tokens[bt] * C + c] + wp0[p[0] * C + c] + wp1[p[1] * C + c] + wp2[p[2] * C + c];
}

// Backward of one embedding table: dtable[row, c] += dx[r, c] for every row r of dx whose index is
// `row`, in r order. The r of each row are listed in ascending order: row's list is order[start[row] ..
// start[row + 1] - 1] (a counting sort, made on the host: index_lists). One thread per (row, c) walks its
// own list, so it owns its element (no atomics), every sum has a fixed order, and there are as many
// threads as table elements. For wte, dx is the gradient of the stream (B T rows) and the lists hold bt;
// for a position table, dx is that gradient summed over the batch (T rows, sequences_sum_kernel) and
// the lists hold positions t, the same in every sequence. Grid: (table rows, column blocks).
__global__ void embedding_backward_kernel(float *dtable, const float *dx, const int *start, const int *order, int C) {
    const int row = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum = dtable[(size_t)row * C + c];
    for (int e = start[row]; e < start[row + 1]; e++) sum += dx[(size_t)order[e] * C + c];
    dtable[(size_t)row * C + c] = sum;
}
// s[t, c] = sum_b dx[b, t, c], in b order: the position tables' gradients sum over the batch first, so
// that a table row's thread walks T rows at most, not B T (text's third table has one row, which every
// position uses: its gradient is the sum of all B T rows). Grid: (T, column blocks).
__global__ void sequences_sum_kernel(float *s, const float *dx, int B, int T, int C) {
    const int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float sum = 0.0f;
    for (int b = 0; b < B; b++) sum += dx[((size_t)b * T + t) * C + c];
    s[(size_t)t * C + c] = sum;
}

// y = (x - mean) / sqrt(var + 1e-5) * w + b over the C channels of each row; keeps mean and 1/std.
// A row kernel (section 1): lane k of the row takes the channels k, k + ROW_THREADS, ...
__global__ void layernorm_forward_kernel(float *y, float *mean, float *rstd, const float *x, const float *w,
                                         const float *b, int rows, int C) {
    const size_t row = thread_row();
    if (row >= (size_t)rows) return;
    const int lane = row_lane();
    const float *xr = x + row * C;
    float m = 0.0f, v = 0.0f;
    for (int c = lane; c < C; c += ROW_THREADS) m += xr[c];
    m = row_sum(m) / C;
    for (int c = lane; c < C; c += ROW_THREADS) v += (xr[c] - m) * (xr[c] - m);
    const float s = 1.0f / sqrtf(row_sum(v) / C + 1e-5f);
    for (int c = lane; c < C; c += ROW_THREADS) y[row * C + c] = (xr[c] - m) * s * w[c] + b[c];
    if (lane == 0) mean[row] = m, rstd[row] = s;
}

// Exercise 6 starts here: the layer norm's backward.
// Backward of y = xhat * w + b, xhat = (x - mean) rstd, for the input (a row kernel, section 1):
//   dxhat = dy w;  dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))      (added to dx)
__global__ void layernorm_backward_input_kernel(float *dx, const float *dy, const float *x, const float *w,
                                                const float *mean, const float *rstd, int rows, int C) {
    const size_t row = thread_row();
    if (row >= (size_t)rows) return;
    const int lane = row_lane();
    const float *xr = x + row * C, *dyr = dy + row * C;
    float sum_d = 0.0f, sum_dx = 0.0f;
    for (int c = lane; c < C; c += ROW_THREADS) {
        const float xhat = (xr[c] - mean[row]) * rstd[row], d = dyr[c] * w[c];
        sum_d += d;
        sum_dx += d * xhat;
    }
    sum_d = row_sum(sum_d), sum_dx = row_sum(sum_dx);
    for (int c = lane; c < C; c += ROW_THREADS) {
        const float xhat = (xr[c] - mean[row]) * rstd[row];
        dx[row * C + c] += rstd[row] * (dyr[c] * w[c] - sum_d / C - xhat * sum_dx / C);
    }
}
// Exercise 6 ends here.

// ... and for the parameters: dw += sum_rows dy xhat, db += sum_rows dy. Pass 1 of the column sums:
// partial_w[k, c] and partial_b[k, c] sum chunk k's rows, for the RUN columns from c0.
// Grid: (chunks, column blocks of RUN columns per thread).
__global__ void layernorm_backward_params_kernel(float *partial_w, float *partial_b, const float *dy, const float *x,
                                                 const float *mean, const float *rstd, int rows, int C, int chunk_rows) {
    const int k = blockIdx.x, c0 = RUN * (blockIdx.y * blockDim.x + threadIdx.x);
    if (c0 >= C) return;
    const int first = k * chunk_rows, end = chunk_end(first, chunk_rows, rows);
    float sum_w[RUN] = {}, sum_b[RUN] = {};
    for (int row = first; row < end; row++) {
        for (int u = 0; u < RUN; u++) {
            const float d = dy[(size_t)row * C + c0 + u];
            sum_w[u] += d * (x[(size_t)row * C + c0 + u] - mean[row]) * rstd[row];
            sum_b[u] += d;
        }
    }
    for (int u = 0; u < RUN; u++) {
        partial_w[(size_t)k * C + c0 + u] = sum_w[u];
        partial_b[(size_t)k * C + c0 + u] = sum_b[u];
    }
}

// y[r, o] = b[o]: every row starts as the bias of a matrix product, which then adds itself to it
// (grid: row_blocks). And its backward db[o] += sum_r dy[r, o].
__global__ void bias_rows_kernel(float *y, const float *b, int cols) {
    const size_t o = (size_t)blockIdx.y * blockDim.x + threadIdx.x;
    y[(size_t)blockIdx.x * cols + o] = b[o];
}
// Pass 1 of its column sums: partial[k, o] sums chunk k's rows, for the RUN columns from o0.
// Grid: (chunks, column blocks of RUN columns per thread).
__global__ void bias_backward_kernel(float *partial, const float *dy, int rows, int cols, int chunk_rows) {
    const int k = blockIdx.x, o0 = RUN * (blockIdx.y * blockDim.x + threadIdx.x);
    if (o0 >= cols) return;
    const int first = k * chunk_rows, end = chunk_end(first, chunk_rows, rows);
    float sum[RUN] = {};
    for (int r = first; r < end; r++)
        for (int u = 0; u < RUN; u++) sum[u] += dy[(size_t)r * cols + o0 + u];
    for (int u = 0; u < RUN; u++) partial[(size_t)k * cols + o0 + u] = sum[u];
}

// Pass 2 of the column sums: dst[o] += partial[0, o] + partial[1, o] + ..., in chunk order.
__global__ void add_chunk_sums_kernel(float *dst, const float *partial, int chunks, int cols) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= cols) return;
    float sum = partial[o];
    for (int k = 1; k < chunks; k++) sum += partial[(size_t)k * cols + o];
    dst[o] += sum;
}

// The paper's GELU, gelu(z) = z sigmoid(1.702 z), of z = x + b: the product before it comes without its
// bias, which this pass adds as it reads x anyway, and keeps z in x for the backward (grid: rows x blocks
// of columns: row_blocks).
__global__ void gelu_forward_kernel(float *y, float *x, const float *b, int cols) {
    const size_t o = (size_t)blockIdx.y * blockDim.x + threadIdx.x;
    const size_t e = (size_t)blockIdx.x * cols + o;
    const float z = x[e] + b[o];
    x[e] = z;
    y[e] = z / (1.0f + expf(-1.702f * z));
}
// Exercise 7 starts here: the GELU's backward.
// Backward, with s = sigmoid(1.702 x): d gelu / dx = s + 1.702 x s (1 - s) (x here is the forward's z,
// which it kept; grid: row_blocks, as the forward's).
__global__ void gelu_backward_kernel(float *dx, const float *dy, const float *x, int cols) {
    const size_t e = (size_t)blockIdx.x * cols + (size_t)blockIdx.y * blockDim.x + threadIdx.x;
    const float s = 1.0f / (1.0f + expf(-1.702f * x[e]));
    dx[e] = dy[e] * (s + 1.702f * x[e] * s * (1.0f - s));
}
// Exercise 7 ends here.

// Dropout at the end of a residual branch: x *= keep / (1 - p), keep = (hash(seed, i) >= p). The mask is
// a hash of the element's index and a seed, never stored: the backward, and the recomputed forward,
// draw the same mask. Applied to the gradient it is its own backward (a diagonal scaling).
static __host__ __device__ inline uint32_t hash32(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return (uint32_t)x;
}
__device__ static inline float dropped(float x, size_t e, float p, uint64_t seed) {
    if (p == 0.0f) return x;
    const float u = hash32(seed * 0x9E3779B97F4A7C15ull + e) * (1.0f / 4294967296.0f);
    return u >= p ? x / (1.0f - p) : 0.0f;
}
__global__ void dropout_kernel(float *x, size_t n, float p, uint64_t seed) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) x[e] = dropped(x[e], e, p, seed);
}

// The end of a residual branch in one pass: out = x + dropout(y + b), y the branch's last product, which
// comes without its bias b (grid: row_blocks). Three passes otherwise: the
// bias, the dropout and the sum.
__global__ void residual_kernel(float *out, const float *x, const float *y, const float *b, int cols, float p,
                                uint64_t seed) {
    const size_t o = (size_t)blockIdx.y * blockDim.x + threadIdx.x;
    const size_t e = (size_t)blockIdx.x * cols + o;
    out[e] = x[e] + dropped(y[e] + b[o], e, p, seed);
}

// Softmax cross-entropy, forward and backward in one pass over each row of logits (BT, V), a row kernel
// (section 1):  loss_r = logsumexp(z_r) - z_r[target],  dz_r = (softmax(z_r) - onehot(target)) / BT
__global__ void crossentropy_kernel(float *losses, float *dlogits, const float *logits, const int *targets,
                                    int BT, int V) {
    const size_t r = thread_row();
    if (r >= (size_t)BT) return;
    const int lane = row_lane();
    const float *z = logits + r * V;
    float top = -INFINITY, sum = 0.0f;
    for (int i = lane; i < V; i += ROW_THREADS) top = fmaxf(top, z[i]);
    top = row_max(top);
    for (int i = lane; i < V; i += ROW_THREADS) sum += expf(z[i] - top);
    sum = row_sum(sum);
    if (lane == 0) losses[r] = top + logf(sum) - z[targets[r]];
    if (!dlogits) return;
    for (int i = lane; i < V; i += ROW_THREADS)
        dlogits[r * V + i] = (expf(z[i] - top) / sum - (i == targets[r] ? 1.0f : 0.0f)) / BT;
}

// Deterministic sums that stay on the device, so that a training step never waits to read them. Two
// passes, each in a fixed order whatever the hardware:
//   1. partial_sums_kernel: each of the SUM_GRID * BLOCK threads adds a strided slice of x (or of its
//      squares) in float;
//   2. one block of THREADS threads adds the partials in double (block_reduce).
// Used for the gradient's global norm (clip_scale_kernel) and for the mean loss (mean_kernel). The
// model's buffer of sums holds the partials, then the results (SUM_SLOTS floats in all).
#define SUM_GRID 64
enum { NORM_SLOT = SUM_GRID * BLOCK, CLIP_SLOT, LOSS_SLOT, SUM_SLOTS }; // the norm, its clip factor, the loss
__global__ void partial_sums_kernel(float *partial, const float *x, size_t n, int squares) {
    const size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x, threads = (size_t)gridDim.x * blockDim.x;
    float sum = 0.0f;
    for (size_t e = t; e < n; e += threads) sum += squares ? x[e] * x[e] : x[e];
    partial[t] = sum;
}

// Block-wide max or sum of one value per thread (THREADS threads), through shared memory: a tree whose
// shape, and so whose rounding, is fixed.
template <typename F>
__device__ static F block_reduce(F value, bool is_max) {
    __shared__ F tree[THREADS];
    __syncthreads(); // the previous reduction's reads are done
    tree[threadIdx.x] = value;
    for (int half = THREADS / 2; half > 0; half /= 2) {
        __syncthreads();
        if ((int)threadIdx.x < half) {
            const F other = tree[threadIdx.x + half];
            tree[threadIdx.x] = is_max ? (other > tree[threadIdx.x] ? other : tree[threadIdx.x]) : tree[threadIdx.x] + other;
        }
    }
    __syncthreads();
    return tree[0];
}

// Pass 2 of a sum (one block of THREADS threads): the SUM_GRID * BLOCK partials, in double.
__device__ static double sum_partials(const float *partial) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < SUM_GRID * BLOCK; i += THREADS) sum += partial[i];
    return block_reduce(sum, false);
}

// The gradient's global norm, and the factor that clips it to `clip`. norm_scale: (2) the norm, then the factor.
__global__ void clip_scale_kernel(float *norm_scale, const float *partial, float clip) {
    const float norm = (float)sqrt(sum_partials(partial));
    if (threadIdx.x != 0) return;
    norm_scale[0] = norm;
    norm_scale[1] = clip > 0.0f && norm > clip ? clip / norm : 1.0f;
}

// The mean of n values from their partial sums (the loss of a batch).
__global__ void mean_kernel(float *mean, const float *partial, size_t n) {
    const double sum = sum_partials(partial);
    if (threadIdx.x == 0) *mean = (float)(sum / n);
}

// AdamW (Loshchilov & Hutter): decoupled weight decay, bias-corrected moments, on every parameter in
// one launch. Weight decay applies to matrices only, so each block takes its entries from one tensor:
// block b updates entries blocks[b].first + threadIdx.x below blocks[b].end, decayed if blocks[b].decay
// (AdamBlock: one per BLOCK entries of each tensor, listed once when the model is made).
struct AdamBlock {
    size_t first, end; // entries of the parameter buffer
    int decay;         // 1: weight decay applies
};
__global__ void adamw_kernel(float *p, float *m, float *v, const float *g, const AdamBlock *blocks, float lr,
                             const float *grad_scale, float beta1, float beta2, float correction1, float correction2,
                             float eps, float weight_decay) {
    const AdamBlock block = blocks[blockIdx.x];
    const size_t e = block.first + threadIdx.x;
    if (e >= block.end) return;
    if (!block.decay) weight_decay = 0.0f;
    const float grad = g[e] * *grad_scale; // a factor below 1 clips the global norm
    m[e] = beta1 * m[e] + (1.0f - beta1) * grad;
    v[e] = beta2 * v[e] + (1.0f - beta2) * grad * grad;
    const float step = (m[e] / correction1) / (sqrtf(v[e] / correction2) + eps);
    p[e] -= lr * (step + weight_decay * p[e]);
}

// ----------------------------------------------------------------------------
// 8. The model: parameters, activations, forward, backward

// The parameter tensors, in the order they sit in the one parameter buffer.
// Per block: a = dropout(attn(LN1(x))); b = dropout(ff(LN2(x + a))); x <- x + a + b.
enum { WTE, WP0, WP1, WP2, N_EMBED };                                                  // embeddings
enum { LN1W, LN1B, QKVW, QKVB, PROJW, PROJB, LN2W, LN2B, FCW, FCB, FC2W, FC2B, N_LAYER }; // per block
enum { LNFW, LNFB, OUTW, N_FINAL };                                                     // after the blocks
static const char *EMBED_NAMES[N_EMBED] = {"wte", "wp0", "wp1", "wp2"};
static const char *LAYER_NAMES[N_LAYER] = {"ln1w", "ln1b", "qkvw", "qkvb", "projw", "projb",
                                           "ln2w", "ln2b", "fcw", "fcb", "fc2w", "fc2b"};
static const char *FINAL_NAMES[N_FINAL] = {"lnfw", "lnfb", "outw"};
#define VOCAB 256

struct Tensor {
    size_t offset, size;
    int rows, cols;   // a matrix (rows, cols); vectors have rows = 1
    float init_std;   // 0: zeros; < 0: ones (layer norm weights)
    int decay;        // weight decay applies (matrices only)
};

// Activations of one block, (B, T, ...). With recompute one set is shared by all blocks.
struct LayerActs {
    float *ln1, *ln1_mean, *ln1_rstd; // (B, T, C), (B, T), (B, T)
    float *qkv;                       // (B, T, 3C): q, k, v side by side, each its H heads side by side
    float *lse;                       // (B, H, T)
    float *att;                       // (B, T, C) attention output, heads side by side
    float *a;                         // (B, T, C) attention branch's last product (bias and dropout follow)
    float *xa;                        // (B, T, C) x + a
    float *ln2, *ln2_mean, *ln2_rstd; // (B, T, C), (B, T), (B, T)
    float *fc, *fc_gelu;              // (B, T, F) before and after GELU
    float *bb;                        // (B, T, C) MLP branch's last product (bias and dropout follow)
};

struct StModel {
    StModelConfig cfg;
    int C, H, D, F, L, T;
    Tensor *tensors;                 // N_EMBED + L N_LAYER + N_FINAL
    int n_tensors;
    AdamBlock *adam_blocks;          // (n_adam_blocks) on the device: AdamW's blocks, BLOCK entries of a tensor each
    unsigned n_adam_blocks;
    size_t n_params;
    float *params, *grads, *adam_m, *adam_v; // (n_params) each, on the device
    StAttention **attention;         // per layer
    int *positions;                  // (T, 3) on the device
    int *position_lists[3];          // (rows + 1 + T): the positions t that use each row of wp0, wp1, wp2
    cublasHandle_t cublas;
    // activations, sized for B_alloc sequences
    int B_alloc, B;
    int *tokens, *targets;           // (B, T)
    int *token_lists;                // (VOCAB + 1 + B T): the positions bt of each byte value (index_lists)
    float *residual;                 // (L + 1, B, T, C): the input of every block, then the final stream
    LayerActs *acts;                 // L sets, or 1 with recompute
    float *lnf, *lnf_mean, *lnf_rstd, *logits, *dlogits, *losses; // final layer norm and output
    float *dres, *dscratch, *dbig;   // gradient scratch: (B, T, C), (B, T, C), (B, T, max(3C, F))
    float *dqkv;                     // (B, T, 3C): the gradient of qkv
    int chunk_rows;                  // rows per chunk of the column sums (section 7)
    float *chunk_sums;               // (chunks, max(3C, F)): their pass 1
    float *act_base;                 // the one buffer all of the above are carved from
    float *partial;                  // (SUM_SLOTS): partial sums, then the norm, the clip factor, the loss
    // incremental decoding (B = 1): each head's steps per layer, and scratch for one byte
    Step *decode_steps;              // (L, H, 2) on the device
    int *decode_n_steps;             // (L, H) on the device
    float *decode;                   // one byte's activations and the scores (H, T)
    uint64_t dropout_seed;
    int training;
};

static float *param(const StModel *m, float *base, int layer, int which) {
    const int index = layer < 0 ? which : layer == m->L ? N_EMBED + m->L * N_LAYER + which
                                                      : N_EMBED + layer * N_LAYER + which;
    return base + m->tensors[index].offset;
}
#define P(m, layer, which) param(m, (m)->params, layer, which)
#define G(m, layer, which) param(m, (m)->grads, layer, which)

// Every field is range-checked before anything is computed from it (a corrupt checkpoint passes through
// here before a single size is derived from its header).
const char *st_model_check(const StModelConfig *c) {
    static char msg[256];
    const int fixed = c->pattern.kind == ST_FIXED;
    const struct { const char *flag; int value, lo, hi; } ranges[] = {
        {"-ctx", c->ctx, 1, ST_MAX_CTX}, {"-dim", c->dim, 1, ST_MAX_DIM}, {"-heads", c->heads, 1, ST_MAX_HEADS},
        {"-layers", c->layers, 1, ST_MAX_LAYERS}, {"-ff", c->ff, 1, ST_MAX_FF}, {"-recompute", c->recompute, 0, 1},
        {"-pattern", c->pattern.kind, ST_DENSE, ST_PATTERN_KINDS - 1}, {"-combine", c->pattern.combine, ST_INTERLEAVED, ST_MULTIHEAD},
        {"-stride", c->pattern.stride, 1, ST_MAX_CTX},
        // summary and groups only matter to fixed: other patterns may leave them 0
        {"-summary", c->pattern.summary, fixed, ST_MAX_CTX}, {"-summary_groups", c->pattern.groups, fixed, ST_MAX_CTX}};
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        if (ranges[i].value < ranges[i].lo || ranges[i].value > ranges[i].hi) {
            snprintf(msg, sizeof msg, "%s must be in [%d, %d], got %d", ranges[i].flag, ranges[i].lo, ranges[i].hi,
                     ranges[i].value);
            return msg;
        }
    }
    if (!(c->dropout >= 0.0f && c->dropout <= ST_MAX_DROPOUT)) {
        snprintf(msg, sizeof msg, "-dropout must be in [0, %g], got %g", ST_MAX_DROPOUT, c->dropout);
        return msg;
    }
    if (c->dim % c->heads) {
        snprintf(msg, sizeof msg, "-heads %d does not divide -dim %d: choose dim = heads * head size", c->heads, c->dim);
        return msg;
    }
    if (c->pattern.stride > c->ctx) {
        snprintf(msg, sizeof msg, "-stride must be in [1, ctx = %d] (it also sets the width of the position grid), "
                 "got %d", c->ctx, c->pattern.stride);
        return msg;
    }
    const StDataInfo shape = {c->kind, c->height, c->width, c->channels, c->sample_rate, 0};
    const char *err = st_data_check(&shape);
    if (err) return err;
    const size_t image = (size_t)c->height * c->width * c->channels; // each side <= 2^16: no overflow
    if (c->kind == ST_IMAGE && c->ctx % image) {
        snprintf(msg, sizeof msg, "for images of %d x %d x %d the context must hold whole images: -ctx %zu (or a "
                 "multiple), not %d", c->height, c->width, c->channels, image, c->ctx);
        return msg;
    }
    return st_pattern_check(&c->pattern, c->ctx, c->heads, c->dim / c->heads);
}

// The three factors of each position's embedding: the size of each table, and each position's row in
// them (positions (T, 3)). Text and audio: row and column of a grid of width l (the stride), as the
// paper does; the third table has one row. Images: row, column and channel of the byte in its image.
static void position_sizes(const StModelConfig *c, int sizes[3]) {
    const int l = c->pattern.stride;
    if (c->kind == ST_IMAGE) {
        sizes[0] = c->height, sizes[1] = c->width, sizes[2] = c->channels;
    } else {
        sizes[0] = (c->ctx + l - 1) / l, sizes[1] = l, sizes[2] = 1;
    }
}
static void position_factors(const StModelConfig *c, int *positions) {
    const int l = c->pattern.stride;
    for (int t = 0; t < c->ctx; t++) {
        int *p = positions + 3 * t;
        if (c->kind == ST_IMAGE) {
            const int s = t % (c->height * c->width * c->channels), pixel = s / c->channels;
            p[0] = pixel / c->width, p[1] = pixel % c->width, p[2] = s % c->channels;
        } else {
            p[0] = t / l, p[1] = t % l, p[2] = 0;
        }
    }
}

// Lays out every tensor in the one parameter buffer, with its initialisation (paper section 5):
// weights N(0, sqrt(0.125 / d_in)); the two projections back into the residual stream scaled by
// 1 / sqrt(2 layers); position embeddings by 1 / sqrt(3) more (three are summed); biases 0;
// layer norm weights 1; the output weights 0 (the first prediction is uniform).
// Returns the number of parameters; with tensors = NULL it only counts (st_model_check's ranges keep
// the count below 2^50: no overflow).
static size_t layout_tensors(const StModelConfig *c, Tensor *tensors) {
    const int C = c->dim, F = c->ff * c->dim, L = c->layers;
    const float base = sqrtf(0.125f / C), deep = 1.0f / sqrtf(2.0f * L);
    int pos_sizes[3];
    position_sizes(c, pos_sizes);
    size_t offset = 0;
    int i = 0;
    auto add = [&](int rows, int cols, float init_std, int decay) {
        if (tensors) tensors[i++] = Tensor{offset, (size_t)rows * cols, rows, cols, init_std, decay};
        offset += (size_t)rows * cols;
    };
    add(VOCAB, C, base, 1);
    for (int f = 0; f < 3; f++) add(pos_sizes[f], C, base / sqrtf(3.0f), 1);
    for (int l = 0; l < L; l++) {
        add(1, C, -1, 0), add(1, C, 0, 0);                  // ln1
        add(3 * C, C, base, 1), add(1, 3 * C, 0, 0);        // qkv
        add(C, C, base * deep, 1), add(1, C, 0, 0);         // proj
        add(1, C, -1, 0), add(1, C, 0, 0);                  // ln2
        add(F, C, base, 1), add(1, F, 0, 0);                // fc
        add(C, F, sqrtf(0.125f / F) * deep, 1), add(1, C, 0, 0); // fc2
    }
    add(1, C, -1, 0), add(1, C, 0, 0), add(VOCAB, C, 0, 1); // final layer norm, output
    return offset;
}

static void init_params(StModel *m, uint64_t seed) {
    float *host = (float *)st_host_alloc(m->n_params * sizeof(float));
    uint64_t state = seed;
    for (int i = 0; i < m->n_tensors; i++) {
        const Tensor &t = m->tensors[i];
        for (size_t e = 0; e < t.size; e++) {
            float value = t.init_std < 0 ? 1.0f : 0.0f;
            if (t.init_std > 0) { // Box-Muller
                const double u1 = ((splitmix64(&state) >> 11) + 1.0) / 9007199254740993.0;
                const double u2 = (splitmix64(&state) >> 11) / 9007199254740992.0;
                value = (float)(t.init_std * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
            }
            host[t.offset + e] = value;
        }
    }
    st_to_device(m->params, host, m->n_params * sizeof(float));
    free(host);
}

// The lists that embedding_backward_kernel walks: for each of `rows` table rows, the i < n with
// index[i stride] == row, in ascending order (a counting sort). lists: (rows + 1 + n), the starts
// of the rows' lists, then the lists one after the other.
static void index_lists(int *lists, const int *index, int stride, int n, int rows) {
    int *start = lists, *order = lists + rows + 1;
    memset(start, 0, (rows + 1) * sizeof(int));
    for (int i = 0; i < n; i++) start[index[(size_t)i * stride] + 1]++;
    for (int r = 0; r < rows; r++) start[r + 1] += start[r];
    for (int i = 0; i < n; i++) order[start[index[(size_t)i * stride]]++] = i; // each start moves to the next row's
    for (int r = rows; r > 0; r--) start[r] = start[r - 1];
    start[0] = 0;
}

// AdamW's launch, listed once: each tensor cut into blocks of BLOCK entries (the last one short), so
// that a block's entries share their tensor's weight decay.
static void list_adam_blocks(StModel *m) {
    m->n_adam_blocks = 0;
    for (int i = 0; i < m->n_tensors; i++) m->n_adam_blocks += blocks_for(m->tensors[i].size);
    AdamBlock *blocks = (AdamBlock *)st_host_alloc(m->n_adam_blocks * sizeof(AdamBlock));
    unsigned b = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const Tensor &t = m->tensors[i];
        for (size_t first = t.offset; first < t.offset + t.size; first += BLOCK)
            blocks[b++] = AdamBlock{first, first + BLOCK < t.offset + t.size ? first + BLOCK : t.offset + t.size, t.decay};
    }
    m->adam_blocks = (AdamBlock *)st_malloc(m->n_adam_blocks * sizeof(AdamBlock));
    st_to_device(m->adam_blocks, blocks, m->n_adam_blocks * sizeof(AdamBlock));
    free(blocks);
}

StModel *st_model_create(const StModelConfig *cfg, unsigned long long seed) {
    const char *err = st_model_check(cfg);
    if (err) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    StModel *m = (StModel *)host_zeroed(sizeof(StModel));
    m->cfg = *cfg;
    m->C = cfg->dim, m->H = cfg->heads, m->D = cfg->dim / cfg->heads, m->F = cfg->ff * cfg->dim;
    m->L = cfg->layers, m->T = cfg->ctx;
    int *positions = (int *)st_host_alloc(3 * sizeof(int) * m->T);
    position_factors(cfg, positions);
    m->positions = (int *)st_malloc(3 * sizeof(int) * m->T);
    st_to_device(m->positions, positions, 3 * sizeof(int) * m->T);
    m->n_tensors = N_EMBED + m->L * N_LAYER + N_FINAL;
    m->tensors = (Tensor *)st_host_alloc(m->n_tensors * sizeof(Tensor));
    m->n_params = layout_tensors(cfg, m->tensors);
    for (int f = 0; f < 3; f++) {
        const size_t n = m->tensors[WP0 + f].rows + 1 + (size_t)m->T;
        int *lists = (int *)st_host_alloc(n * sizeof(int));
        index_lists(lists, positions + f, 3, m->T, m->tensors[WP0 + f].rows);
        m->position_lists[f] = (int *)st_malloc(n * sizeof(int));
        st_to_device(m->position_lists[f], lists, n * sizeof(int));
        free(lists);
    }
    free(positions);
    const size_t bytes = m->n_params * sizeof(float);
    m->params = (float *)st_malloc(bytes);
    m->grads = (float *)st_malloc(bytes);
    m->adam_m = (float *)st_malloc(bytes);
    m->adam_v = (float *)st_malloc(bytes);
    cudaCheck(cudaMemset(m->grads, 0, bytes));
    cudaCheck(cudaMemset(m->adam_m, 0, bytes));
    cudaCheck(cudaMemset(m->adam_v, 0, bytes));
    init_params(m, seed);
    list_adam_blocks(m);
    m->attention = (StAttention **)st_host_alloc(m->L * sizeof(StAttention *));
    for (int l = 0; l < m->L; l++) m->attention[l] = st_attention_create(&cfg->pattern, l, m->T, m->H, m->D);
    cublasCheck(cublasCreate(&m->cublas));
    m->chunk_rows = CHUNK_ROWS;
    m->partial = (float *)st_malloc(SUM_SLOTS * sizeof(float));
    Step *steps = (Step *)host_zeroed((size_t)m->L * m->H * 2 * sizeof(Step));
    int *n_steps = (int *)st_host_alloc((size_t)m->L * m->H * sizeof(int));
    for (int l = 0; l < m->L; l++)
        for (int h = 0; h < m->H; h++) n_steps[l * m->H + h] = head_steps(&cfg->pattern, l, h, m->T, steps + 2 * (l * m->H + h));
    m->decode_steps = (Step *)st_malloc((size_t)m->L * m->H * 2 * sizeof(Step));
    m->decode_n_steps = (int *)st_malloc((size_t)m->L * m->H * sizeof(int));
    st_to_device(m->decode_steps, steps, (size_t)m->L * m->H * 2 * sizeof(Step));
    st_to_device(m->decode_n_steps, n_steps, (size_t)m->L * m->H * sizeof(int));
    free(steps);
    free(n_steps);
    m->decode = (float *)st_malloc((8 * (size_t)m->C + 2 * (size_t)m->F + VOCAB + 4 + (size_t)m->H * m->T) * sizeof(float));
    return m;
}

void st_model_free(StModel *m) {
    if (!m) return;
    for (int l = 0; l < m->L; l++) st_attention_free(m->attention[l]);
    free(m->attention);
    if (m->B_alloc) st_free(m->act_base);
    float *buffers[] = {m->params, m->grads, m->adam_m, m->adam_v, m->partial, m->decode};
    for (float *b : buffers) st_free(b);
    st_free(m->adam_blocks);
    st_free(m->decode_steps);
    st_free(m->decode_n_steps);
    st_free(m->positions);
    for (int f = 0; f < 3; f++) st_free(m->position_lists[f]);
    cublasCheck(cublasDestroy(m->cublas));
    free(m->acts);
    free(m->tensors);
    free(m);
}

// The chunks that the column sums of `rows` rows are cut into (section 7).
static size_t chunks_of(const StModel *m, int rows) { return ((size_t)rows + m->chunk_rows - 1) / m->chunk_rows; }

// All activations live in one buffer too. carve() lays them out for B sequences from `base` and
// returns the number of floats; called with base = NULL it only counts (the sizes table of llm.c).
static size_t carve(StModel *m, int B, float *base) {
    const size_t BT = (size_t)B * m->T, C = m->C, F = m->F, H = m->H, V = VOCAB;
    const size_t big = 3 * C > F ? 3 * C : F;
    size_t used = 0;
    // each array starts on a 32-byte boundary: the tile loads read rows 16 bytes at a time (load_tile)
    auto take = [&](size_t n) { float *r = base ? base + used : NULL; used += (n + 7) / 8 * 8; return r; };
    for (int s = 0; s < (m->cfg.recompute ? 1 : m->L); s++) {
        LayerActs *a = &m->acts[s];
        a->ln1 = take(BT * C), a->ln1_mean = take(BT), a->ln1_rstd = take(BT);
        a->qkv = take(3 * BT * C);
        a->lse = take(B * H * m->T);
        a->att = take(BT * C), a->a = take(BT * C), a->xa = take(BT * C);
        a->ln2 = take(BT * C), a->ln2_mean = take(BT), a->ln2_rstd = take(BT);
        a->fc = take(BT * F), a->fc_gelu = take(BT * F), a->bb = take(BT * C);
    }
    m->residual = take((m->L + 1) * BT * C);
    m->lnf = take(BT * C), m->lnf_mean = take(BT), m->lnf_rstd = take(BT);
    m->logits = take(BT * V), m->dlogits = take(BT * V), m->losses = take(BT);
    m->dres = take(BT * C), m->dscratch = take(BT * C), m->dbig = take(BT * big), m->dqkv = take(3 * BT * C);
    m->chunk_sums = take(chunks_of(m, (int)BT) * big);
    m->tokens = (int *)take(BT), m->targets = (int *)take(BT); // ints are as wide as floats
    m->token_lists = (int *)take(V + 1 + BT);
    return used;
}

static void ensure_activations(StModel *m, int B) {
    if (B <= m->B_alloc) return;
    if (m->B_alloc) st_free(m->act_base);
    free(m->acts);
    m->acts = (LayerActs *)host_zeroed((size_t)(m->cfg.recompute ? 1 : m->L) * sizeof(LayerActs));
    m->act_base = (float *)st_malloc(carve(m, B, NULL) * sizeof(float));
    carve(m, B, m->act_base);
    m->B_alloc = B;
}

// The model's cuBLAS handle, in the math mode of the precision: TF32 tensor cores or plain float32.
static cublasHandle_t blas(StModel *m) {
    cublasCheck(cublasSetMathMode(m->cublas, precision == ST_TF32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    return m->cublas;
}

// out (N, OC) = inp (N, IC) W^T + b, W (OC, IC) row-major. cuBLAS is column-major: there W is an (IC, OC)
// matrix, so this is out^T = op_T(W) inp^T. The bias goes in first, and the product adds itself to it
// (beta = 1). Only q, k, v take their bias here: the other products' biases are added by the pass that
// reads their output next (GELU, residual_kernel), and they are called with b = NULL.
static void matmul_forward(StModel *m, float *out, const float *inp, const float *w, const float *b, int N, int IC,
                           int OC) {
    const float one = 1.0f, zero = 0.0f;
    if (b) LAUNCH(bias_rows_kernel, row_blocks(N, OC), row_threads(OC), 0, out, b, OC);
    PROFILED(("cublasSgemm forward, W %d x %d", OC, IC),
             cublasCheck(cublasSgemm(blas(m), CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, w, IC, inp, IC, b ? &one : &zero, out, OC)));
}

// Backward of out = inp W^T + b:  dinp = dout W (overwritten);  dW += dout^T inp;  db += sum of dout's rows.
static void matmul_backward(StModel *m, float *dinp, float *dw, float *db, const float *dout, const float *inp,
                            const float *w, int N, int IC, int OC) {
    const float one = 1.0f, zero = 0.0f;
    PROFILED(("cublasSgemm backward dinp, W %d x %d", OC, IC),
             cublasCheck(cublasSgemm(blas(m), CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, w, IC, dout, OC, &zero, dinp, IC)));
    PROFILED(("cublasSgemm backward dW, W %d x %d", OC, IC),
             cublasCheck(cublasSgemm(blas(m), CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, IC, dout, OC, &one, dw, IC)));
    if (!db) return;
    const unsigned chunks = (unsigned)chunks_of(m, N);
    LAUNCH(bias_backward_kernel, dim3(chunks, run_columns_grid(OC)), COLUMNS_BLOCK, 0, m->chunk_sums, dout, N, OC, m->chunk_rows);
    LAUNCH(add_chunk_sums_kernel, columns_grid(OC), COLUMNS_BLOCK, 0, db, m->chunk_sums, (int)chunks, OC);
}

static void layernorm_forward(float *y, float *mean, float *rstd, const float *x, const float *w, const float *b,
                              int rows, int C) {
    LAUNCH(layernorm_forward_kernel, row_kernel_blocks(rows), ROW_BLOCK, 0, y, mean, rstd, x, w, b, rows, C);
}
// Backward of y = LN(x) w + b: dx += ..., dw += ..., db += ...
static void layernorm_backward(StModel *m, float *dx, float *dw, float *db, const float *dy, const float *x,
                               const float *w, const float *mean, const float *rstd, int rows, int C) {
    LAUNCH(layernorm_backward_input_kernel, row_kernel_blocks(rows), ROW_BLOCK, 0, dx, dy, x, w, mean, rstd, rows, C);
    const unsigned chunks = (unsigned)chunks_of(m, rows);
    float *partial_w = m->chunk_sums, *partial_b = m->chunk_sums + chunks * C;
    LAUNCH(layernorm_backward_params_kernel, dim3(chunks, run_columns_grid(C)), COLUMNS_BLOCK, 0, partial_w, partial_b,
           dy, x, mean, rstd, rows, C, m->chunk_rows);
    LAUNCH(add_chunk_sums_kernel, columns_grid(C), COLUMNS_BLOCK, 0, dw, partial_w, (int)chunks, C);
    LAUNCH(add_chunk_sums_kernel, columns_grid(C), COLUMNS_BLOCK, 0, db, partial_b, (int)chunks, C);
}

// Dropout of branch `branch` (0 attention, 1 MLP) of block `layer`: its probability (0 outside training)
// and its seed, which the forward (residual_kernel) and the backward (dropout_kernel) share.
static float dropout_p(const StModel *m) { return m->training ? m->cfg.dropout : 0.0f; }
static uint64_t dropout_seed(const StModel *m, int layer, int branch) { return m->dropout_seed + 2 * (uint64_t)layer + branch; }
// The end of a branch: out = x + dropout(y + b) (residual_kernel), for `rows` rows of the stream.
static void residual(StModel *m, float *out, const float *x, const float *y, const float *b, int rows, int layer,
                     int branch) {
    LAUNCH(residual_kernel, row_blocks(rows, m->C), row_threads(m->C), 0, out, x, y, b, m->C, dropout_p(m),
           dropout_seed(m, layer, branch));
}
// The gradient of a branch's output, from dres, that of the stream after it: dres itself without dropout;
// with it, dres masked, in `scratch` (dres stays whole: the stream's other path needs it too).
static const float *branch_gradient(StModel *m, float *scratch, const float *dres, size_t n, int layer, int branch) {
    if (m->cfg.dropout == 0.0f) return dres;
    PROFILED(("copy on the device"), cudaCheck(cudaMemcpy(scratch, dres, n * sizeof(float), cudaMemcpyDeviceToDevice)));
    LAUNCH(dropout_kernel, blocks_for(n), BLOCK, 0, scratch, n, m->cfg.dropout, dropout_seed(m, layer, branch));
    return scratch;
}

// Where the attention finds q, k, v and puts its output (StLayout): q, k, v where their product wrote
// them, side by side in the rows of qkv (B, T, 3C), and the output in the rows of att (B, T, C).
static StLayout model_layout(const StModel *m) {
    const size_t T = m->T, C = m->C, D = m->D;
    return StLayout{{T * 3 * C, D, 3 * C}, {T * C, D, C}};
}

// The second half of a block, for `rows` rows: b = dropout(ff(LN2(xa))), ff(y) = W2 gelu(W1 y + b1) + b2,
// then out = xa + b (the residual stream gets both branches: xa = x + a).
static void mlp_forward(StModel *m, int layer, int rows, const float *xa, float *ln2, float *mean, float *rstd,
                        float *fc, float *fc_gelu, float *bb, float *out) {
    const int C = m->C, F = m->F;
    layernorm_forward(ln2, mean, rstd, xa, P(m, layer, LN2W), P(m, layer, LN2B), rows, C);
    matmul_forward(m, fc, ln2, P(m, layer, FCW), NULL, rows, C, F);
    LAUNCH(gelu_forward_kernel, row_blocks(rows, F), row_threads(F), 0, fc_gelu, fc, P(m, layer, FCB), F);
    matmul_forward(m, bb, fc_gelu, P(m, layer, FC2W), NULL, rows, F, C);
    residual(m, out, xa, bb, P(m, layer, FC2B), rows, layer, 1);
}

// One residual block: residual[layer] -> residual[layer + 1], keeping its activations in `a`.
static void layer_forward(StModel *m, int layer, LayerActs *a, int B) {
    const int BT = B * m->T, C = m->C;
    const size_t n = (size_t)BT * C;
    const float *x = m->residual + layer * n;
    float *out = m->residual + (layer + 1) * n;
    // a = dropout(attn(LN1(x)))
    layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, x, P(m, layer, LN1W), P(m, layer, LN1B), BT, C);
    matmul_forward(m, a->qkv, a->ln1, P(m, layer, QKVW), P(m, layer, QKVB), BT, C, 3 * C);
    const StLayout at = model_layout(m);
    st_attention_forward(m->attention[layer], a->att, a->lse, a->qkv, a->qkv + C, a->qkv + 2 * C, B, &at);
    matmul_forward(m, a->a, a->att, P(m, layer, PROJW), NULL, BT, C, C);
    residual(m, a->xa, x, a->a, P(m, layer, PROJB), BT, layer, 0);
    mlp_forward(m, layer, BT, a->xa, a->ln2, a->ln2_mean, a->ln2_rstd, a->fc, a->fc_gelu, a->bb, out);
}

// Backward of one block. On entry m->dres holds dL/d residual[layer + 1]; on exit dL/d residual[layer].
static void layer_backward(StModel *m, int layer, LayerActs *a, int B) {
    const int BT = B * m->T, C = m->C, F = m->F;
    const size_t n = (size_t)BT * C;
    const float *x = m->residual + layer * n;
    float *dres = m->dres, *d = m->dscratch, *dbig = m->dbig, *dqkv = m->dqkv;
    // out = xa + bb: both get dres. bb = dropout(fc_gelu W2^T + b2)
    const float *dbb = branch_gradient(m, d, dres, n, layer, 1);
    matmul_backward(m, dbig, G(m, layer, FC2W), G(m, layer, FC2B), dbb, a->fc_gelu, P(m, layer, FC2W), BT, F, C);
    // fc_gelu = gelu(fc)
    LAUNCH(gelu_backward_kernel, row_blocks(BT, F), row_threads(F), 0, dbig, dbig, a->fc, F);
    // fc = ln2 W1^T + b1
    matmul_backward(m, d, G(m, layer, FCW), G(m, layer, FCB), dbig, a->ln2, P(m, layer, FCW), BT, C, F);
    // ln2 = LN2(xa): dres becomes dL/dxa
    layernorm_backward(m, dres, G(m, layer, LN2W), G(m, layer, LN2B), d, a->xa, P(m, layer, LN2W), a->ln2_mean,
                       a->ln2_rstd, BT, C);
    // xa = x + a: both get dL/dxa. a = dropout(att Wproj^T + bproj)
    const float *da = branch_gradient(m, d, dres, n, layer, 0);
    matmul_backward(m, dbig, G(m, layer, PROJW), G(m, layer, PROJB), da, a->att, P(m, layer, PROJW), BT, C, C);
    // att = attention(q, k, v), q, k, v the three parts of qkv
    const StLayout at = model_layout(m);
    st_attention_backward(m->attention[layer], dqkv, dqkv + C, dqkv + 2 * C, dbig, a->att, a->lse, a->qkv, a->qkv + C,
                          a->qkv + 2 * C, B, &at);
    // qkv = ln1 Wqkv^T + bqkv
    matmul_backward(m, d, G(m, layer, QKVW), G(m, layer, QKVB), dqkv, a->ln1, P(m, layer, QKVW), BT, C, 3 * C);
    // ln1 = LN1(x): dres becomes dL/dx
    layernorm_backward(m, dres, G(m, layer, LN1W), G(m, layer, LN1B), d, x, P(m, layer, LN1W), a->ln1_mean,
                       a->ln1_rstd, BT, C);
}

static void drop_activations(StModel *m) {
    if (m->B_alloc) st_free(m->act_base);
    m->B_alloc = 0; // the next forward lays the activations out anew
}
void st_model_set_chunk_rows(StModel *m, int rows) {
    m->chunk_rows = rows > 0 ? rows : CHUNK_ROWS;
    drop_activations(m); // the chunks' sums are carved with the activations
}
// Switches between keeping every block's activations and recomputing them (the results are the same).
// Generation needs every layer's keys and values kept, so it switches to 0 while it runs.
void st_model_set_recompute(StModel *m, int recompute) {
    if (m->cfg.recompute == recompute) return;
    m->cfg.recompute = recompute;
    drop_activations(m);
}

static LayerActs *acts_of(StModel *m, int layer) { return &m->acts[m->cfg.recompute ? 0 : layer]; }

void st_model_forward(StModel *m, const unsigned char *inputs, const unsigned char *targets, int B, int training,
                      unsigned long long seed) {
    ensure_activations(m, B);
    m->B = B, m->training = training, m->dropout_seed = seed;
    const size_t BT = (size_t)B * m->T, C = m->C;
    // tokens and targets are carved for B_alloc sequences: each is copied to its own start
    int *host = (int *)st_host_alloc(BT * sizeof(int));
    for (size_t i = 0; i < BT; i++) host[i] = inputs[i];
    st_to_device(m->tokens, host, BT * sizeof(int));
    if (targets) { // a forward that a backward can follow: the lists of wte's backward
        int *lists = (int *)st_host_alloc((VOCAB + 1 + BT) * sizeof(int));
        index_lists(lists, host, 1, (int)BT, VOCAB);
        st_to_device(m->token_lists, lists, (VOCAB + 1 + BT) * sizeof(int));
        free(lists);
    }
    for (size_t i = 0; i < BT; i++) host[i] = targets ? targets[i] : 0;
    st_to_device(m->targets, host, BT * sizeof(int));
    // x = token embedding + position embeddings
    LAUNCH(embedding_forward_kernel, blocks_for((size_t)BT * C), BLOCK, 0, m->residual, m->tokens, m->positions,
           P(m, -1, WTE), P(m, -1, WP0), P(m, -1, WP1), P(m, -1, WP2), BT, m->T, C);
    for (int l = 0; l < m->L; l++) layer_forward(m, l, acts_of(m, l), B);
    // logits = LN(x) Wout^T; loss = cross-entropy
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, m->residual + (size_t)m->L * BT * C, P(m, m->L, LNFW),
                      P(m, m->L, LNFB), BT, C);
    matmul_forward(m, m->logits, m->lnf, P(m, m->L, OUTW), NULL, BT, C, VOCAB);
    float *loss = m->partial + LOSS_SLOT;
    if (targets) {
        LAUNCH(crossentropy_kernel, row_kernel_blocks(BT), ROW_BLOCK, 0, m->losses, m->dlogits, m->logits, m->targets, BT, VOCAB);
        LAUNCH(partial_sums_kernel, SUM_GRID, BLOCK, 0, m->partial, m->losses, BT, 0);
        LAUNCH(mean_kernel, 1, THREADS, 0, loss, m->partial, BT);
    } else {
        cudaCheck(cudaMemset(loss, 0, sizeof(float)));
    }
    free(host);
}
float st_model_loss(const StModel *m) {
    float loss;
    st_to_host(&loss, m->partial + LOSS_SLOT, sizeof loss);
    return loss;
}

void st_model_backward(StModel *m) {
    const int B = m->B, BT = B * m->T, C = m->C;
    const size_t n = (size_t)BT * C;
    cudaCheck(cudaMemset(m->grads, 0, m->n_params * sizeof(float)));
    cudaCheck(cudaMemset(m->dres, 0, n * sizeof(float)));
    // logits = lnf Wout^T, lnf = LN(residual[L])
    matmul_backward(m, m->dscratch, G(m, m->L, OUTW), NULL, m->dlogits, m->lnf, P(m, m->L, OUTW), BT, C, VOCAB);
    layernorm_backward(m, m->dres, G(m, m->L, LNFW), G(m, m->L, LNFB), m->dscratch, m->residual + m->L * n,
                       P(m, m->L, LNFW), m->lnf_mean, m->lnf_rstd, BT, C);
    for (int l = m->L - 1; l >= 0; l--) {
        if (m->cfg.recompute) layer_forward(m, l, acts_of(m, l), B); // only residual[l] was kept
        layer_backward(m, l, acts_of(m, l), B);
    }
    // x = wte[token] + wp0[pos0] + wp1[pos1] + wp2[pos2]
    LAUNCH(embedding_backward_kernel, dim3(VOCAB, columns_grid(C)), COLUMNS_BLOCK, 0, G(m, -1, WTE), m->dres,
           m->token_lists, m->token_lists + VOCAB + 1, C);
    float *per_position = m->dscratch; // (T, C): dres summed over the batch
    LAUNCH(sequences_sum_kernel, dim3(m->T, columns_grid(C)), COLUMNS_BLOCK, 0, per_position, m->dres, B, m->T, C);
    for (int f = 0; f < 3; f++) {
        const int rows = m->tensors[WP0 + f].rows;
        LAUNCH(embedding_backward_kernel, dim3(rows, columns_grid(C)), COLUMNS_BLOCK, 0, G(m, -1, WP0 + f), per_position,
               m->position_lists[f], m->position_lists[f] + rows + 1, C);
    }
}

void st_model_update(StModel *m, float lr, float weight_decay, float clip, int step) {
    float *norm_scale = m->partial + NORM_SLOT; // the norm, then CLIP_SLOT
    LAUNCH(partial_sums_kernel, SUM_GRID, BLOCK, 0, m->partial, m->grads, m->n_params, 1);
    LAUNCH(clip_scale_kernel, 1, THREADS, 0, norm_scale, m->partial, clip);
    const float beta1 = 0.9f, beta2 = 0.95f;
    const float c1 = 1.0f - powf(beta1, (float)step), c2 = 1.0f - powf(beta2, (float)step);
    LAUNCH(adamw_kernel, m->n_adam_blocks, BLOCK, 0, m->params, m->adam_m, m->adam_v, m->grads, m->adam_blocks, lr,
           norm_scale + 1, beta1, beta2, c1, c2, 1e-8f, weight_decay);
}
float st_model_grad_norm(const StModel *m) {
    float norm;
    st_to_host(&norm, m->partial + NORM_SLOT, sizeof norm);
    return norm;
}

size_t st_model_num_params(const StModel *m) { return m->n_params; }
size_t st_model_activation_bytes(const StModel *m, int B, int recompute) {
    StModel plan = *m; // a copy whose pointers carve() may overwrite
    plan.cfg.recompute = recompute;
    plan.acts = (LayerActs *)host_zeroed((size_t)(recompute ? 1 : m->L) * sizeof(LayerActs));
    const size_t bytes = carve(&plan, B, NULL) * sizeof(float);
    free(plan.acts);
    return bytes;
}
int st_model_num_tensors(const StModel *m) { return m->n_tensors; }

const char *st_model_tensor(const StModel *m, int i, size_t *offset, size_t *size) {
    static char name[32];
    if (i < N_EMBED) snprintf(name, sizeof name, "%s", EMBED_NAMES[i]);
    else if (i >= N_EMBED + m->L * N_LAYER) snprintf(name, sizeof name, "%s", FINAL_NAMES[i - N_EMBED - m->L * N_LAYER]);
    else snprintf(name, sizeof name, "h%d.%s", (i - N_EMBED) / N_LAYER, LAYER_NAMES[(i - N_EMBED) % N_LAYER]);
    *offset = m->tensors[i].offset;
    *size = m->tensors[i].size;
    return name;
}

// The model's buffers (parameters, gradients, Adam moments), and copies between them and the host.
float *st_model_buffer(const StModel *m, StBuffer which) {
    return which == ST_PARAMS ? m->params : which == ST_GRADS ? m->grads : which == ST_ADAM_M ? m->adam_m : m->adam_v;
}
void st_model_get(const StModel *m, StBuffer which, float *host) {
    st_to_host(host, st_model_buffer(m, which), m->n_params * sizeof(float));
}
void st_model_set(StModel *m, StBuffer which, const float *host) {
    st_to_device(st_model_buffer(m, which), host, m->n_params * sizeof(float));
}
void st_model_logits(const StModel *m, float *host) {
    st_to_host(host, m->logits, (size_t)m->B * m->T * VOCAB * sizeof(float));
}
void st_model_losses(const StModel *m, float *host) {
    st_to_host(host, m->losses, (size_t)m->B * m->T * sizeof(float));
}

// ----------------------------------------------------------------------------
// 9. Decoding: keys and values cached, each new byte costs what its attention allows

// Decoding one new byte at position i, with the keys and values of the earlier bytes cached (B = 1). The
// cache is each layer's qkv (T, 3C) as the forward of the window left it (st_model_prefill); the new
// byte's product writes its q, k and v into row i.

// The new byte's attention, one block per head:  out_h = sum_j softmax_j(q_h . k_hj / sqrt(D)) v_hj
// over the keys its steps allow. Each step's keys are one range of slots (section 3), so the work is
// the number of allowed keys, not the position. steps: (H, 2) with n_steps (H) of them used. The keys
// and values of position j: kcache + j * row and vcache + j * row (row = 3C, the cache's rows).
// Passes: 1. scores of the allowed keys into `scores` (H, T), in slot order; 2. their max and the
// sum of exponentials; 3. the output, one thread per channel.
template <int D>
__global__ void __launch_bounds__(THREADS)
attention_decode_kernel(float *out, const float *qkv, const float *kcache, const float *vcache, float *scores,
                        const Step *steps, const int *n_steps, int i, int T, int row) {
    const int h = blockIdx.x;
    kcache += h * D, vcache += h * D, scores += (size_t)h * T; // this head's part of each row
    const Step *mine = steps + 2 * h;
    // 1.
    int count = 0;
    // Exercise 8 starts here: the keys a new byte sees.
    const float *q = qkv + h * D;
    for (int s = 0; s < n_steps[h]; s++) {
        const int p = step_query_slot(mine[s], i);
        int lo, hi;
        step_key_range(mine[s], p, i, &lo, &hi);
        for (int k = lo + threadIdx.x; k <= hi; k += THREADS) {
            const int j = step_key_position(mine[s], k);
            float dot = 0.0f;
            for (int x = 0; x < D && j >= 0; x++) dot += q[x] * kcache[(size_t)j * row + x];
            scores[count + k - lo] = j >= 0 ? dot / sqrtf((float)D) : -INFINITY;
        }
        count += hi >= lo ? hi - lo + 1 : 0;
    }
    // Exercise 8 ends here.
    __syncthreads();
    // 2.
    float top = -INFINITY, sum = 0.0f;
    for (int e = threadIdx.x; e < count; e += THREADS) top = fmaxf(top, scores[e]);
    top = block_reduce(top, true);
    for (int e = threadIdx.x; e < count; e += THREADS) {
        scores[e] = top == -INFINITY ? 0.0f : expf(scores[e] - top);
        sum += scores[e];
    }
    sum = block_reduce(sum, false);
    // 3.
    for (int d = threadIdx.x; d < D; d += THREADS) {
        float acc = 0.0f;
        int e = 0;
        for (int s = 0; s < n_steps[h]; s++) {
            int lo, hi;
            step_key_range(mine[s], step_query_slot(mine[s], i), i, &lo, &hi);
            for (int k = lo; k <= hi; k++, e++) {
                const int j = step_key_position(mine[s], k);
                if (j >= 0) acc += scores[e] * vcache[(size_t)j * row + d];
            }
        }
        out[h * D + d] = sum > 0.0f ? acc / sum : 0.0f;
    }
}

void st_model_prefill(StModel *m, const unsigned char *window, int len, float *logits) {
    st_model_set_recompute(m, 0);
    unsigned char *padded = (unsigned char *)host_zeroed(m->T);
    memcpy(padded, window, len);
    st_model_forward(m, padded, NULL, 1, 0, 0); // causal: the padding after len changes nothing before it
    st_to_host(logits, m->logits + (size_t)(len - 1) * VOCAB, VOCAB * sizeof(float));
    free(padded);
}

// The block, for one byte at position i: like layer_forward, but attention reads the cache.
void st_model_decode(StModel *m, unsigned char byte, int i, float *logits) {
    const int C = m->C, F = m->F, H = m->H, D = m->D, T = m->T;
    float *x = m->decode, *ln = x + C, *att = ln + C, *a = att + C, *xa = a + C;
    float *ln2 = xa + C, *fc = ln2 + C, *fc_gelu = fc + F, *bb = fc_gelu + F, *out = bb + C;
    float *stats = out + C, *scores = stats + 4, *row_logits = scores + (size_t)H * T; // stats: mean, rstd x 2
    const int token = byte;
    st_to_device(m->tokens, &token, sizeof(int));
    LAUNCH(embedding_forward_kernel, blocks_for(C), BLOCK, 0, x, m->tokens, m->positions + 3 * i, P(m, -1, WTE),
           P(m, -1, WP0), P(m, -1, WP1), P(m, -1, WP2), 1, 1, C);
    for (int l = 0; l < m->L; l++) {
        float *cache = m->acts[l].qkv, *qkv = cache + (size_t)i * 3 * C; // the new byte's row
        layernorm_forward(ln, stats, stats + 1, x, P(m, l, LN1W), P(m, l, LN1B), 1, C);
        matmul_forward(m, qkv, ln, P(m, l, QKVW), P(m, l, QKVB), 1, C, 3 * C);
        DISPATCH_HEAD_SIZE(D, LAUNCH(attention_decode_kernel<HS>, H, THREADS, 0, att, qkv, cache + C, cache + 2 * C, scores,
                                     m->decode_steps + 2 * l * H, m->decode_n_steps + l * H, i, T, 3 * C));
        matmul_forward(m, a, att, P(m, l, PROJW), NULL, 1, C, C);
        residual(m, xa, x, a, P(m, l, PROJB), 1, l, 0);
        mlp_forward(m, l, 1, xa, ln2, stats + 2, stats + 3, fc, fc_gelu, bb, out);
        cudaCheck(cudaMemcpy(x, out, C * sizeof(float), cudaMemcpyDeviceToDevice));
    }
    layernorm_forward(ln, stats, stats + 1, x, P(m, m->L, LNFW), P(m, m->L, LNFB), 1, C);
    matmul_forward(m, row_logits, ln, P(m, m->L, OUTW), NULL, 1, C, VOCAB);
    st_to_host(logits, row_logits, VOCAB * sizeof(float));
}

// Generation: one byte at a time from the model's next-byte distribution

// Draws from softmax(logits / temperature) restricted to the top_k most likely bytes (0: all).
static int sample_byte(const float *logits, float temperature, int top_k, uint64_t *rng) {
    float p[VOCAB], top = -INFINITY, threshold = -INFINITY;
    if (top_k > 0 && top_k < VOCAB) { // the k-th largest logit is the threshold
        float sorted[VOCAB];
        memcpy(sorted, logits, sizeof sorted);
        for (int i = 0; i < top_k; i++)
            for (int j = i + 1; j < VOCAB; j++)
                if (sorted[j] > sorted[i]) { const float t = sorted[i]; sorted[i] = sorted[j]; sorted[j] = t; }
        threshold = sorted[top_k - 1];
    }
    for (int i = 0; i < VOCAB; i++) top = fmaxf(top, logits[i]);
    double sum = 0.0;
    for (int i = 0; i < VOCAB; i++) sum += p[i] = logits[i] >= threshold ? expf((logits[i] - top) / temperature) : 0.0f;
    double u = (splitmix64(rng) >> 11) / 9007199254740992.0 * sum;
    for (int i = 0; i < VOCAB; i++)
        if ((u -= p[i]) < 0) return i;
    return VOCAB - 1;
}

// Where the model's window starts when `len` bytes are known. It jumps by about half a context (in
// whole rows of the position grid for text and audio, whole images for images), so that every byte
// keeps the position embedding and attention pattern it had in training, and the window is run
// through the model anew (prefill) only once every half context.
static long window_start(const StModel *m, long len) {
    const long unit = m->cfg.kind == ST_IMAGE ? (long)m->cfg.height * m->cfg.width * m->cfg.channels
                                              : m->cfg.pattern.stride;
    const long jump = m->T / 2 / unit * unit > unit ? m->T / 2 / unit * unit : unit;
    const long excess = len - m->T;
    return excess <= 0 ? 0 : (excess + jump - 1) / jump * jump;
}

void st_generate(StModel *m, unsigned char *text, long prompt_len, long total, float temperature, int top_k,
                 unsigned long long *rng) {
    float logits[VOCAB];
    uint64_t state = *rng;
    const int recompute = m->cfg.recompute;
    long start = -1;
    for (long len = prompt_len; len < total; len++) {
        if (len == 0) { // nothing to condition on: a uniform first byte
            text[0] = (unsigned char)(splitmix64(&state) % VOCAB);
            continue;
        }
        const long s = window_start(m, len);
        if (s != start) st_model_prefill(m, text + s, (int)(len - s), logits);
        else st_model_decode(m, text[len - 1], (int)(len - 1 - s), logits);
        start = s;
        text[len] = (unsigned char)sample_byte(logits, temperature, top_k, &state);
    }
    st_model_set_recompute(m, recompute);
    *rng = state;
}

// ----------------------------------------------------------------------------
// 10. Data files, PNG pictures, mu-law audio, the synthetic data set (host code)

// Nothing is lost: a file is written to path + ".tmp", flushed to the disk, and renamed over path only
// once it is whole, so a crash, a full disk or a file size limit leaves the previous file as it was.
// body(f) writes the contents, true if it could. The message gives the first failure's reason.
template <typename Body> static const char *write_safely(const char *path, const char *what, Body body) {
    static char msg[8192];
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    bool ok = f && body(f) && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int reason = errno;
    if (f && fclose(f) != 0 && ok) ok = false, reason = errno;
    if (ok && rename(tmp, path) != 0) ok = false, reason = errno;
    if (ok) return NULL;
    if (f) remove(tmp);
    snprintf(msg, sizeof msg, "cannot write %s %s: %s; any earlier %s is unchanged", what, path, strerror(reason), path);
    return msg;
}

static const char DATA_MAGIC[8] = {'S', 'T', 'B', 'Y', 'T', 'E', 'S', '1'};
#define DATA_VERSION 1
static const char *KIND_NAMES[] = {"text", "image", "audio"};

const char *st_data_check(const StDataInfo *info) {
    static char msg[256];
    const int image = info->kind == ST_IMAGE, audio = info->kind == ST_AUDIO;
    const int side_lo = image ? 1 : 0, side_hi = image ? ST_MAX_IMAGE_SIDE : 0;
    if (info->kind < ST_TEXT || info->kind > ST_AUDIO)
        snprintf(msg, sizeof msg, "unknown data kind %d (0 text, 1 image, 2 audio)", (int)info->kind);
    else if (info->height < side_lo || info->height > side_hi || info->width < side_lo || info->width > side_hi ||
             info->channels < side_lo || info->channels > side_hi)
        snprintf(msg, sizeof msg, "%s data needs height, width and channels in [%d, %d], got %d x %d x %d",
                 KIND_NAMES[info->kind], side_lo, side_hi, info->height, info->width, info->channels);
    else if (image && info->n_bytes % ((size_t)info->height * info->width * info->channels)) // <= 2^48
        snprintf(msg, sizeof msg, "%zu bytes are not a whole number of %d x %d x %d images", info->n_bytes,
                 info->height, info->width, info->channels);
    else if (info->sample_rate < audio || info->sample_rate > (audio ? ST_MAX_SAMPLE_RATE : 0))
        snprintf(msg, sizeof msg, "%s data needs a sample rate in [%d, %d], got %d", KIND_NAMES[info->kind], audio,
                 audio ? ST_MAX_SAMPLE_RATE : 0, info->sample_rate);
    else
        return NULL;
    return msg;
}

static void put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static uint32_t get_u32(const unsigned char *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get_u64(const unsigned char *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

const char *st_data_write(const char *path, const StDataInfo *info, const unsigned char *bytes) {
    const char *bad = st_data_check(info);
    if (bad) return bad;
    const int image = info->kind == ST_IMAGE;
    unsigned char header[ST_DATA_HEADER_BYTES] = {0};
    memcpy(header, DATA_MAGIC, 8);
    put_u32(header + 8, DATA_VERSION);
    put_u32(header + 12, (uint32_t)info->kind);
    put_u32(header + 16, image ? info->height : 0);
    put_u32(header + 20, image ? info->width : 0);
    put_u32(header + 24, image ? info->channels : 0);
    put_u32(header + 28, info->kind == ST_AUDIO ? info->sample_rate : 0);
    put_u64(header + 32, info->n_bytes);
    return write_safely(path, "the data file", [&](FILE *f) {
        return fwrite(header, 1, sizeof header, f) == sizeof header && fwrite(bytes, 1, info->n_bytes, f) == info->n_bytes;
    });
}

// Opens path and checks its header; on success the file is left positioned at the first data byte.
static FILE *open_data(const char *path, StDataInfo *info, const char **error) {
    static char msg[768];
    *error = msg;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(msg, sizeof msg, "cannot open %s: %s (make data files with data/prepare.sh NAME)", path,
                 strerror(errno));
        return NULL;
    }
    unsigned char h[ST_DATA_HEADER_BYTES];
    static const unsigned char zeros[ST_DATA_HEADER_BYTES - 40] = {0}; // the reserved end of the header
    const size_t got = fread(h, 1, sizeof h, f);
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    fseek(f, ST_DATA_HEADER_BYTES, SEEK_SET);
    if (got < sizeof h || memcmp(h, DATA_MAGIC, 8) != 0) {
        snprintf(msg, sizeof msg, "%s is not a data file of this project (no STBYTES1 header): make it with "
                 "data/prepare.sh NAME", path);
    } else if (get_u32(h + 8) != DATA_VERSION) {
        snprintf(msg, sizeof msg, "%s has format version %u, this program reads version %d: remake it with "
                 "data/prepare.sh NAME", path, get_u32(h + 8), DATA_VERSION);
    } else if (get_u32(h + 12) > ST_AUDIO || memcmp(h + 40, zeros, sizeof zeros) != 0) {
        snprintf(msg, sizeof msg, "%s has a corrupt header: %s; remake it with data/prepare.sh NAME", path,
                 get_u32(h + 12) > ST_AUDIO ? "unknown data kind (0 text, 1 image, 2 audio)" : "bytes 40-63 are not zero");
    } else {
        info->kind = (StDataKind)get_u32(h + 12);
        info->height = (int)get_u32(h + 16), info->width = (int)get_u32(h + 20);
        info->channels = (int)get_u32(h + 24), info->sample_rate = (int)get_u32(h + 28);
        info->n_bytes = (size_t)get_u64(h + 32);
        const char *bad = st_data_check(info);
        if (bad) {
            snprintf(msg, sizeof msg, "%s has a corrupt header: %s; remake it with data/prepare.sh NAME", path, bad);
        } else if ((unsigned long)size != ST_DATA_HEADER_BYTES + info->n_bytes) {
            snprintf(msg, sizeof msg, "%s is %s: its header says %zu bytes of data, the file holds %ld; remake it "
                     "with data/prepare.sh NAME", path, (unsigned long)size < ST_DATA_HEADER_BYTES + info->n_bytes
                     ? "truncated" : "too long", info->n_bytes, size - ST_DATA_HEADER_BYTES);
        } else {
            *error = NULL;
            return f;
        }
    }
    fclose(f);
    return NULL;
}

const char *st_data_read_info(const char *path, StDataInfo *info) {
    const char *error;
    FILE *f = open_data(path, info, &error);
    if (f) fclose(f);
    return error;
}

unsigned char *st_data_load(const char *path, StDataInfo *info, const char **error) {
    FILE *f = open_data(path, info, error);
    if (!f) return NULL;
    unsigned char *bytes = (unsigned char *)st_host_alloc(info->n_bytes ? info->n_bytes : 1);
    if (!bytes || fread(bytes, 1, info->n_bytes, f) != info->n_bytes) {
        static char msg[512];
        snprintf(msg, sizeof msg, "cannot read the %zu bytes of %s", info->n_bytes, path);
        *error = msg;
        free(bytes);
        bytes = NULL;
    }
    fclose(f);
    return bytes;
}

const char *st_data_kind_name(StDataKind kind) { return KIND_NAMES[kind]; }

void st_png_write(FILE *f, const char *path, const unsigned char *pixels, int width, int height, int channels) {
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!info || setjmp(png_jmpbuf(png))) st_fail("cannot write the PNG file %s", path);
    png_init_io(png, f);
    const int color = channels == 1 ? PNG_COLOR_TYPE_GRAY : channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_RGBA;
    png_set_IHDR(png, info, width, height, 8, color, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < height; y++) png_write_row(png, (png_bytep)pixels + (size_t)y * width * channels);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    if (fclose(f) != 0) st_fail("cannot write %s: %s", path, strerror(errno));
}

// mu-law companding (mu = 255): y = sign(x) ln(1 + mu |x|) / ln(1 + mu), then y in [-1, 1] is
// quantised to 256 levels. Quiet sounds get finer steps than loud ones, as the ear hears them.
#define MU 255.0f
unsigned char st_mulaw_encode(float sample) {
    const float x = fminf(1.0f, fmaxf(-1.0f, sample));
    const float y = copysignf(log1pf(MU * fabsf(x)) / log1pf(MU), x);
    return (unsigned char)lrintf((y + 1.0f) * 127.5f);
}
float st_mulaw_decode(unsigned char byte) {
    const float y = byte / 127.5f - 1.0f;
    return copysignf((powf(1.0f + MU, fabsf(y)) - 1.0f) / MU, y);
}

static const char SYNTHETIC_ALPHABET[] = "abcdefghijklmnopqrstuvwxyz ";
#define SYNTHETIC_LETTERS 27

void st_synthetic(unsigned char *out, size_t n, int period, double noise, unsigned long long seed) {
    uint64_t state = seed;
    for (size_t t = 0; t < n; t++) {
        const double u = (splitmix64(&state) >> 11) * (1.0 / 9007199254740992.0);
        const unsigned char fresh = SYNTHETIC_ALPHABET[splitmix64(&state) % SYNTHETIC_LETTERS];
        if (t % period == (size_t)period - 1) out[t] = '\n';
        else if (t < (size_t)period || u < noise) out[t] = fresh;
        else out[t] = out[t - period];
    }
}

double st_synthetic_entropy(int period, double noise) {
    const double fresh = noise / SYNTHETIC_LETTERS, copy = 1.0 - noise + fresh;
    double bits = -copy * log2(copy);
    if (fresh > 0) bits -= (SYNTHETIC_LETTERS - 1) * fresh * log2(fresh);
    return bits * (period - 1) / period; // the newline that ends each line is certain
}

// ----------------------------------------------------------------------------
// 11. Checkpoints: the model's configuration, the training state, parameters and Adam moments
//
//   offset  size  field (integers little-endian, floats IEEE 754 single)
//        0     8  magic "STCKPT01"
//        8     4  version (1)
//       12     4  header size (256)
//       16    64  model: ctx, dim, heads, layers, ff, pattern, combine, stride, summary, groups,
//                 recompute, data kind, image height, width, channels, audio sample rate (16 int32)
//       80     4  dropout (float)
//       84    12  training: steps, warmup, batch (int32)
//       96    12  lr, weight decay, clip (float)
//      108     4  zero
//      112    24  step, random state, seed (uint64)
//      136     8  number of parameters n
//      144   112  zero
//      256    4n  parameters, then 4n Adam first moments, then 4n second moments (float32)

static const char CKPT_MAGIC[8] = {'S', 'T', 'C', 'K', 'P', 'T', '0', '1'};
#define CKPT_VERSION 1
#define CKPT_HEADER 256

static void put_f32(unsigned char *p, float f) { uint32_t u; memcpy(&u, &f, 4); put_u32(p, u); }
static float get_f32(const unsigned char *p) { uint32_t u = get_u32(p); float f; memcpy(&f, &u, 4); return f; }

const char *st_checkpoint_save(const char *path, const StModel *m, const StTrainState *s) {
    const StModelConfig *c = &m->cfg;
    unsigned char h[CKPT_HEADER] = {0};
    memcpy(h, CKPT_MAGIC, 8);
    put_u32(h + 8, CKPT_VERSION);
    put_u32(h + 12, CKPT_HEADER);
    const int fields[16] = {c->ctx, c->dim, c->heads, c->layers, c->ff, c->pattern.kind, c->pattern.combine,
                            c->pattern.stride, c->pattern.summary, c->pattern.groups, c->recompute, c->kind,
                            c->height, c->width, c->channels, c->sample_rate};
    for (int i = 0; i < 16; i++) put_u32(h + 16 + 4 * i, (uint32_t)fields[i]);
    put_f32(h + 80, c->dropout);
    put_u32(h + 84, (uint32_t)s->steps), put_u32(h + 88, (uint32_t)s->warmup), put_u32(h + 92, (uint32_t)s->batch);
    put_f32(h + 96, s->lr), put_f32(h + 100, s->weight_decay), put_f32(h + 104, s->clip);
    put_u64(h + 112, (uint64_t)s->step), put_u64(h + 120, s->rng), put_u64(h + 128, s->seed);
    put_u64(h + 136, m->n_params);
    return write_safely(path, "the checkpoint", [&](FILE *f) {
        bool ok = fwrite(h, 1, CKPT_HEADER, f) == CKPT_HEADER;
        float *host = (float *)st_host_alloc(m->n_params * sizeof(float));
        const StBuffer saved[3] = {ST_PARAMS, ST_ADAM_M, ST_ADAM_V};
        for (int b = 0; b < 3 && ok; b++) {
            st_model_get(m, saved[b], host);
            ok = fwrite(host, sizeof(float), m->n_params, f) == m->n_params;
        }
        free(host);
        return ok;
    });
}

// Reads the header's fields and checks every one of them, in an order that never computes a size from
// an unchecked number: the configuration's ranges (st_model_check), the parameter count it implies,
// the file size that count implies, and the training state. NULL when all hold, else a message.
static const char *checkpoint_header(const char *path, const unsigned char *h, uint64_t file_size, StModelConfig *c,
                                     StTrainState *s) {
    static char msg[8192];
    int v[16];
    for (int i = 0; i < 16; i++) v[i] = (int)get_u32(h + 16 + 4 * i);
    const char *bad = "unknown pattern, combination or data kind";
    if ((unsigned)v[5] < ST_PATTERN_KINDS && (unsigned)v[6] <= ST_MULTIHEAD && (unsigned)v[11] <= ST_AUDIO) {
        *c = StModelConfig{v[0], v[1], v[2], v[3], v[4], {(StPatternKind)v[5], (StCombine)v[6], v[7], v[8], v[9]},
                           get_f32(h + 80), v[10], (StDataKind)v[11], v[12], v[13], v[14], v[15]};
        bad = st_model_check(c);
    }
    if (bad) {
        snprintf(msg, sizeof msg, "%s has a corrupt header: %s", path, bad);
        return msg;
    }
    const uint64_t n = get_u64(h + 136), needed = layout_tensors(c, NULL);
    if (n != needed) {
        snprintf(msg, sizeof msg, "%s has a corrupt header: it counts %llu parameters where its configuration has %llu",
                 path, (unsigned long long)n, (unsigned long long)needed);
        return msg;
    }
    const uint64_t expected = CKPT_HEADER + 3 * n * sizeof(float); // n < 2^50: no overflow
    if (file_size != expected) {
        snprintf(msg, sizeof msg, "%s is %s: %llu bytes where its header promises %llu", path,
                 file_size < expected ? "truncated" : "too long", (unsigned long long)file_size,
                 (unsigned long long)expected);
        return msg;
    }
    s->steps = (int)get_u32(h + 84), s->warmup = (int)get_u32(h + 88), s->batch = (int)get_u32(h + 92);
    s->lr = get_f32(h + 96), s->weight_decay = get_f32(h + 100), s->clip = get_f32(h + 104);
    s->step = (long long)get_u64(h + 112), s->rng = get_u64(h + 120), s->seed = get_u64(h + 128);
    if (s->steps < 1 || s->steps > ST_MAX_STEPS || s->warmup < 0 || s->warmup > ST_MAX_STEPS || s->batch < 1 ||
        s->batch > ST_MAX_BATCH || s->step < 0 || s->step > s->steps || !(s->lr >= 0 && s->lr <= 1) ||
        !(s->weight_decay >= 0 && s->weight_decay <= 1) || !(s->clip >= 0 && s->clip <= 1e6) || s->rng == 0) {
        snprintf(msg, sizeof msg, "%s has a corrupt header: impossible training state (step %lld of %d, warmup %d, "
                 "batch %d, lr %g, weight decay %g, clip %g)", path, s->step, s->steps, s->warmup, s->batch, s->lr,
                 s->weight_decay, s->clip);
        return msg;
    }
    return NULL;
}

StModel *st_checkpoint_load(const char *path, StTrainState *s, StModelConfig *config, const char **error) {
    static char msg[8192];
    *error = msg;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(msg, sizeof msg, "cannot open the checkpoint %s: %s (train one with ./train -o DIR)", path, strerror(errno));
        return NULL;
    }
    unsigned char h[CKPT_HEADER];
    const size_t got = fread(h, 1, CKPT_HEADER, f);
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    fseek(f, CKPT_HEADER, SEEK_SET);
    StModel *m = NULL;
    StModelConfig c;
    StTrainState state;
    int reserved = 0; // the zero fields (bytes 108-111 and 144-255) must be zero: anything else is damage
    for (int i = 108; i < (int)got; i++) reserved |= i < 112 || i >= 144 ? h[i] : 0;
    if (got < CKPT_HEADER || memcmp(h, CKPT_MAGIC, 8) != 0) {
        snprintf(msg, sizeof msg, "%s is not a checkpoint of this project (no STCKPT01 header)", path);
    } else if (get_u32(h + 8) != CKPT_VERSION || get_u32(h + 12) != CKPT_HEADER) {
        snprintf(msg, sizeof msg, "%s is a checkpoint of version %u; this program reads version %d", path,
                 get_u32(h + 8), CKPT_VERSION);
    } else if (reserved) {
        snprintf(msg, sizeof msg, "%s has a corrupt header: its reserved bytes (108-111, 144-255) are not zero", path);
    } else if (const char *bad = checkpoint_header(path, h, (uint64_t)size, &c, &state)) {
        *error = bad;
    } else {
        // Only now is memory allocated: the model the header describes fits in the file that holds it.
        m = st_model_create(&c, 0);
        const size_t n = m->n_params;
        float *host = (float *)st_host_alloc(n * sizeof(float));
        for (int b = ST_PARAMS; b <= ST_ADAM_V; b++) {
            if (b == ST_GRADS) continue;
            // The parameters must be finite numbers (Adam's moments are only used by training, which
            // stops with a message as soon as the loss is not finite).
            size_t finite = fread(host, sizeof(float), n, f) == n ? 0 : n + 1;
            for (size_t i = 0; finite <= n && i < n; i++) finite += b != ST_PARAMS || isfinite(host[i]);
            if (finite != n) {
                snprintf(msg, sizeof msg, "%s is corrupt: %s", path, finite > n ? "cannot read it" : "it holds NaN or "
                         "infinite numbers");
                st_model_free(m);
                m = NULL;
                break;
            }
            st_model_set(m, (StBuffer)b, host);
        }
        free(host);
    }
    fclose(f);
    if (m) *config = c, *s = state, *error = NULL;
    return m;
}
