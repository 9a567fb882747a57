/*
sparse_transformer.cu: the factorized sparse attention of the Sparse Transformer (Child et al. 2019).

One file, read top to bottom:
  1. Setup        includes, error checks, kernel launches.
  2. Patterns     the attention patterns as the paper states them (dense, strided, fixed) and how a
                  layer combines their two steps (interleaved, merged, multihead).
  3. Steps        each step rewritten so that it becomes a band in some order of the sequence; this is
                  what makes the kernels' work proportional to the allowed pairs.
  4. Tile layout  per step, for every tile of queries the range of key tiles it touches (and back).
  5. Kernels      forward (online softmax, stores the log-sum-exp) and backward (dQ, dK, dV with the
                  probabilities recomputed), written as plain loops over 32 x 32 tiles.
  6. API          the C functions of sparse_transformer.h that run the attention.
  7. Data         the data file format, mu-law audio, the synthetic data set.

The same file builds for an NVIDIA GPU with nvcc and for the CPU with g++, through cuda_on_cpu.h,
which runs these very kernels with the threads of a block as fibers. There is no separate CPU code.

Shapes: q, k, v, out are (B, H, T, D): batch, heads, positions, head size. lse is (B, H, T).
All arithmetic is float32.
*/

#ifdef __CUDACC__
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
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

// Launches a kernel that may use more than the default 48 KB of dynamic shared memory, and checks it.
#define LAUNCH(kernel, grid, block, shared_bytes, ...)                                              \
    do {                                                                                           \
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,        \
                                       (int)(shared_bytes)));                                      \
        KERNEL_LAUNCH(kernel, grid, block, shared_bytes, __VA_ARGS__);                             \
        cudaCheck(cudaGetLastError());                                                             \
    } while (0)

const char *st_device_init(void) {
    static cudaDeviceProp prop;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        fprintf(stderr, "no usable CUDA GPU (%s): this binary was built for the GPU; build for the CPU "
                        "with: make cpu\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "no device found");
        exit(1);
    }
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    return prop.name;
}

int st_device_is_gpu(void) { return BUILT_FOR_GPU; }

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
void st_to_device(void *dst, const void *src, size_t bytes) {
    cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
void st_to_host(void *dst, const void *src, size_t bytes) {
    cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
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

static const char *PATTERN_NAMES[] = {"dense", "strided", "fixed"};
static const char *COMBINE_NAMES[] = {"interleaved", "merged", "multihead"};

static int name_index(const char *name, const char *const *names, int count) {
    for (int i = 0; i < count; i++)
        if (strcmp(name, names[i]) == 0) return i;
    return -1;
}
int st_pattern_kind_from_name(const char *name) { return name_index(name, PATTERN_NAMES, 3); }
int st_combine_from_name(const char *name) { return name_index(name, COMBINE_NAMES, 3); }
const char *st_pattern_kind_name(StPatternKind kind) { return PATTERN_NAMES[kind]; }
const char *st_combine_name(StCombine combine) { return COMBINE_NAMES[combine]; }

int st_pattern_allows(const StPattern *p, int layer, int head, int i, int j) {
    if (j < 0 || j > i) return 0; // causal
    if (p->kind == ST_DENSE) return 1;
    const int l = p->stride;
    int step0, step1;
    if (p->kind == ST_STRIDED) {
        step0 = i - j < l;
        step1 = (i - j) % l == 0;
    } else {
        const int c = p->summary, g = head % p->groups;
        step0 = j / l == i / l;
        step1 = j % l >= l - (g + 1) * c && j % l <= l - g * c - 1;
    }
    switch (p->combine) {
    case ST_INTERLEAVED: return layer % 2 ? step1 : step0;
    case ST_MULTIHEAD: return head % 2 ? step1 : step0;
    default: return step0 || step1;
    }
}

// The largest context the int positions and tile counts are safe for.
#define MAX_CTX (1 << 24)

const char *st_pattern_check(const StPattern *p, int n_ctx, int n_head, int d_head) {
    static char msg[256];
    if (n_ctx < 1 || n_ctx > MAX_CTX)
        snprintf(msg, sizeof msg, "context %d is out of range: use 1 <= ctx <= %d", n_ctx, MAX_CTX);
    else if (n_head < 1)
        snprintf(msg, sizeof msg, "heads %d: need at least one head", n_head);
    else if (d_head != 32 && d_head != 64 && d_head != 128)
        snprintf(msg, sizeof msg, "head size %d is not supported: the kernels take 32, 64 or 128 "
                 "(choose dim = heads * head size)", d_head);
    else if (p->kind < ST_DENSE || p->kind > ST_FIXED)
        snprintf(msg, sizeof msg, "unknown pattern %d: use dense, strided or fixed", (int)p->kind);
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
    else if (p->combine == ST_MULTIHEAD && n_head < 2)
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
//   summary         natural              gathered summary cells      every summary cell <= i
//
// "Transposed" is OpenAI's trick: lay the sequence out as rows of width l and read it column by column.
// Residue class r = i mod l (a column) becomes a contiguous, causal sequence of its own, so the stride
// step is plain causal attention inside each column. Each column is padded to a whole number of tiles
// (or, when shorter than a tile, to a power of two, so whole columns pack into one tile).
// "Gathered" keeps only the summary cells of the head's group, in order: c cells per block of l.
// Keys that a merged head's other step already covers are dropped (exclusive), so that no key is
// counted twice in the shared softmax: j = i for the stride step, the query's own block for summary.

#define TILE 32       // queries and keys per tile
#define WARPS 4       // a block of threads is 4 warps...
#define THREADS 128   // ...of 32 threads

enum StepKind { STEP_CAUSAL, STEP_LOCAL, STEP_BLOCK, STEP_STRIDE, STEP_SUMMARY };

struct Step {
    int kind;       // StepKind
    int n;          // sequence length
    int l, c, g;    // stride or block length; summary width and group (summary)
    int exclusive;  // 1: drop the keys the merged head's first step already has
    int column;     // stride: slots per column in the transposed order
    int nq, nk;     // length of the query and the key order (slots)
};

// Natural position of slot p of the query order, or -1 for a padding slot.
static __host__ __device__ inline int step_query_position(const Step &st, int p) {
    if (p >= st.nq) return -1;
    if (st.kind != STEP_STRIDE) return p;
    const int r = p / st.column, t = p % st.column; // column r, row t
    const int i = t * st.l + r;
    return i < st.n ? i : -1;
}

// Natural position of slot s of the key order, or -1 for a padding slot.
static __host__ __device__ inline int step_key_position(const Step &st, int s) {
    if (s >= st.nk) return -1;
    if (st.kind == STEP_STRIDE) return step_query_position(st, s);
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
    default: { // STEP_SUMMARY: the c cells of every earlier block, then those of its own block <= i
        const int first = st.l - (st.g + 1) * st.c; // first summary cell of a block
        int own = i % st.l - first + 1;              // summary cells <= i in its own block
        own = st.exclusive ? 0 : own < 0 ? 0 : own > st.c ? st.c : own;
        *lo = 0;
        *hi = i / st.l * st.c + own - 1;
    }
    }
}

static __host__ __device__ inline bool step_allows_slots(const Step &st, int p, int s) {
    const int i = step_query_position(st, p);
    if (i < 0 || step_key_position(st, s) < 0) return false;
    int lo, hi;
    step_key_range(st, p, i, &lo, &hi);
    return lo <= s && s <= hi;
}

static Step make_step(int kind, int n, const StPattern *p, int head, int exclusive) {
    // Only the fields a step reads are set, so that heads with the same step compare equal.
    Step st = {kind, n, kind == STEP_CAUSAL ? 0 : p->stride, 0, 0, exclusive, 1, n, n};
    if (kind == STEP_SUMMARY) st.c = p->summary, st.g = head % p->groups;
    if (kind == STEP_STRIDE) {
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
    if (p->kind == ST_DENSE) {
        steps[0] = make_step(STEP_CAUSAL, n, p, head, 0);
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
// also form one range. So each tile is described by four numbers (an int4):
//   x = first tile touched, y = first full tile, z = last full tile, w = last tile touched.
// Memory is O(n / TILE) per step: never an n x n mask.

static int ceil_div(int a, int b) { return (a + b - 1) / b; }

struct TileRange {
    int first, first_full, last_full, last;
};

// Query-tile view (forward, dQ): the range of key tiles of query tile qt. Counts the allowed pairs.
static TileRange query_tile_range(const Step &st, int qt, double *allowed) {
    int lo_min = INT_MAX, hi_max = -1, lo_max = -1, hi_min = INT_MAX;
    bool every_row_real = true; // a real query with a non-empty range in every row of the tile
    for (int p = qt * TILE; p < (qt + 1) * TILE; p++) {
        const int i = step_query_position(st, p);
        int lo = 0, hi = -1;
        if (i >= 0) step_key_range(st, p, i, &lo, &hi);
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

// Key-tile view (dK, dV): the transpose of the query-tile view. It must again be one range per tile;
// the check below guards that property for any step added later.
static void key_tile_ranges(const TileRange *q_tiles, int n_qtiles, TileRange *k_tiles, int n_ktiles) {
    int *touched = (int *)calloc(n_ktiles, sizeof(int)), *full = (int *)calloc(n_ktiles, sizeof(int));
    for (int kt = 0; kt < n_ktiles; kt++) k_tiles[kt] = TileRange{INT_MAX, INT_MAX, -1, -1};
    for (int qt = 0; qt < n_qtiles; qt++) {
        const TileRange r = q_tiles[qt];
        for (int kt = r.first; kt <= r.last; kt++) {
            TileRange *k = &k_tiles[kt];
            touched[kt]++;
            if (qt < k->first) k->first = qt;
            if (qt > k->last) k->last = qt;
            if (kt < r.first_full || kt > r.last_full) continue;
            full[kt]++;
            if (qt < k->first_full) k->first_full = qt;
            if (qt > k->last_full) k->last_full = qt;
        }
    }
    for (int kt = 0; kt < n_ktiles; kt++) {
        TileRange *k = &k_tiles[kt];
        if (!touched[kt]) *k = TileRange{0, 0, -1, -1};
        if (!full[kt]) k->first_full = 0, k->last_full = -1;
        if ((touched[kt] && touched[kt] != k->last - k->first + 1) ||
            (full[kt] && full[kt] != k->last_full - k->first_full + 1)) {
            fprintf(stderr, "internal error: key tile %d's query tiles are not one range\n", kt);
            exit(1);
        }
    }
    free(touched);
    free(full);
}

// ----------------------------------------------------------------------------
// 5. Kernels

// Every kernel below works on one tile of TILE rows at a time, with THREADS = 128 threads:
//   - a score tile S (TILE x TILE): thread t owns row t % TILE, columns (t / TILE) + WARPS m;
//   - an output tile (TILE x D): warp w owns rows w + WARPS m, lane owns columns lane + 32 u.
// Rows in shared memory are padded to D + 1 floats, so that 32 threads reading 32 different rows
// at the same column hit 32 different memory banks.

// The dynamic shared memory of a block (its size is given at launch); each kernel carves its tiles from it.
extern __shared__ float smem[];

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

template <int D> struct TileShape {
    static const int ROW = D + 1;               // floats per row of a (TILE, D) tile in shared memory
    static const int MATRIX = TILE * ROW;       // floats of a (TILE, D) tile
    static const int SCORES = TILE * (TILE + 1); // floats of a (TILE, TILE) tile, padded
    static const int OWN_ROWS = TILE / WARPS;   // output rows per thread
    static const int OWN_COLS = D / 32;         // output columns per thread
};

// Loads rows first .. first + TILE - 1 of a step's query or key order into a (TILE, D) shared tile,
// scaled by `scale`; padding slots and slots past the end load as zeros.
template <int D>
__device__ static void load_tile(float *tile, const float *x, const Step &st, int first, bool keys,
                                 float scale) {
    for (int e = threadIdx.x; e < TILE * D; e += THREADS) {
        const int row = e / D, col = e % D;
        const int pos = keys ? step_key_position(st, first + row) : step_query_position(st, first + row);
        tile[row * TileShape<D>::ROW + col] = pos >= 0 ? x[(size_t)pos * D + col] * scale : 0.0f;
    }
}

// Loads one float per row of the query tile (lse or D), `missing` for padding slots.
__device__ static void load_row_values(float *dst, const float *x, const Step &st, int first,
                                       float scale, float missing) {
    for (int row = threadIdx.x; row < TILE; row += THREADS) {
        const int pos = step_query_position(st, first + row);
        dst[row] = pos >= 0 ? x[pos] * scale : missing;
    }
}

// dot(a_row, b_row) of two rows of (TILE, D) shared tiles.
template <int D> __device__ static inline float row_dot(const float *a, const float *b) {
    float sum = 0.0f;
    for (int x = 0; x < D; x++) sum += a[x] * b[x];
    return sum;
}

// acc += A B for the rows of a (TILE, D) output tile this thread owns, where A is a (TILE, TILE) score
// tile and B a (TILE, D) tile in shared memory. A is read as A[row][c] = A_s[row * a_row + c * a_col],
// so a_row = 1, a_col = TILE + 1 multiplies by the transpose (dV += P^T dO).
template <int D>
__device__ static __forceinline__ void accumulate_product(float (&acc)[TileShape<D>::OWN_ROWS][TileShape<D>::OWN_COLS],
                                                          const float *A_s, int a_row, int a_col, const float *B_s) {
    typedef TileShape<D> S;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    #pragma unroll
    for (int mi = 0; mi < S::OWN_ROWS; mi++) {
        const int row = warp + WARPS * mi;
        #pragma unroll
        for (int u = 0; u < S::OWN_COLS; u++) {
            const int col = lane + 32 * u;
            float sum = 0.0f;
            #pragma unroll 8
            for (int c = 0; c < TILE; c++) sum += A_s[row * a_row + c * a_col] * B_s[c * S::ROW + col];
            acc[mi][u] += sum;
        }
    }
}

// The backward's elementwise pass on one tile pair, shared by the dK/dV and the dQ kernels:
//   P_ij  = exp(s_ij - lse_i)                  the forward's probabilities, recomputed
//   dP_ij = dO_i . v_j                         from out_i = sum_j P_ij v_j
//   dS_ij = P_ij (dP_ij - D_i), D_i = dO_i . O_i   through the softmax
// Q_s holds q / sqrt(D) * log2(e) and lse2_s holds lse * log2(e), so P = exp2(Q_s . k - lse2).
template <int D>
__device__ static void probability_gradients(float *P_s, float *dS_s, const float *Q_s, const float *dO_s,
                                             const float *K_s, const float *V_s, const float *lse2_s,
                                             const float *D_s, const Step &st, int p0, int s0, bool full) {
    typedef TileShape<D> S;
    const int r = threadIdx.x % TILE;
    for (int c = threadIdx.x / TILE; c < TILE; c += WARPS) {
        const bool allowed = full || step_allows_slots(st, p0 + r, s0 + c);
        const float p = allowed ? exp2f(row_dot<D>(Q_s + r * S::ROW, K_s + c * S::ROW) - lse2_s[r]) : 0.0f;
        const float dp = row_dot<D>(dO_s + r * S::ROW, V_s + c * S::ROW);
        P_s[r * (TILE + 1) + c] = p;
        dS_s[r * (TILE + 1) + c] = p * (dp - D_s[r]);
    }
}

// Forward: out_i = sum_j softmax_j(s_ij) v_j over the keys of this step, s_ij = q_i . k_j / sqrt(D),
// with FlashAttention's online softmax: a running max m_i and sum l_i per row, so the scores of a row
// are never all in memory. The second step of a merged head (accumulate = 1) merges its result into
// the first's by the log-sum-exp rule:
//   lse = log(e^lse1 + e^lse2),  out = e^(lse1 - lse) out1 + e^(lse2 - lse) out2.
// Grid: (query tiles, B * heads of this step); block: THREADS.
template <int D>
__global__ void __launch_bounds__(THREADS, 4)
attention_forward_kernel(float *out, float *lse, const float *q, const float *k, const float *v, Step st,
                         const int4 *tiles, const int *heads, int n_heads, int H, int accumulate) {
    typedef TileShape<D> S;
    float *Q_s = smem;                    // (TILE, D) queries * log2(e) / sqrt(D)
    float *K_s = Q_s + S::MATRIX;         // (TILE, D)
    float *V_s = K_s + S::MATRIX;         // (TILE, D)
    float *P_s = V_s + S::MATRIX;         // (TILE, TILE) scores, then probabilities
    float *alpha_s = P_s + S::SCORES;     // (TILE) how much each row's running output shrinks
    float *lse_s = alpha_s + TILE;        // (TILE) this step's log-sum-exp per row
    float *w_old_s = lse_s + TILE;        // (TILE) merge weights (accumulate)
    float *w_new_s = w_old_s + TILE;      // (TILE)

    const int qt = blockIdx.x, b = blockIdx.y / n_heads, h = heads[blockIdx.y % n_heads];
    const size_t bh = (size_t)b * H + h;
    q += bh * st.n * D; k += bh * st.n * D; v += bh * st.n * D; out += bh * st.n * D; lse += bh * st.n;
    const int4 range = tiles[qt];
    const int p0 = qt * TILE, lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    load_tile<D>(Q_s, q, st, p0, false, LOG2E / sqrtf((float)D));
    float o[S::OWN_ROWS][S::OWN_COLS] = {}; // this thread's share of the unnormalised output
    float m = -INFINITY, l = 0.0f;          // running max and sum of row threadIdx.x (threads < TILE)

    for (int kt = range.x; kt <= range.w; kt++) {
        const bool full = range.y <= kt && kt <= range.z;
        __syncthreads(); // the previous tile is no longer read
        load_tile<D>(K_s, k, st, kt * TILE, true, 1.0f);
        load_tile<D>(V_s, v, st, kt * TILE, true, 1.0f);
        __syncthreads();

        // Pass 1: scores in base 2, S = Q K^T; pairs the step does not allow get -inf
        const int r = threadIdx.x % TILE;
        for (int c = threadIdx.x / TILE; c < TILE; c += WARPS) {
            const bool allowed = full || step_allows_slots(st, p0 + r, kt * TILE + c);
            P_s[r * (TILE + 1) + c] = allowed ? row_dot<D>(Q_s + r * S::ROW, K_s + c * S::ROW) : -INFINITY;
        }
        __syncthreads();

        // Pass 2: online softmax, one thread per row: new max, rescale factor, probabilities, sum
        if (threadIdx.x < TILE) {
            float *row = P_s + threadIdx.x * (TILE + 1);
            float m_new = m;
            for (int c = 0; c < TILE; c++) m_new = fmaxf(m_new, row[c]);
            const float alpha = m_new == -INFINITY ? 1.0f : exp2f(m - m_new);
            float sum = 0.0f;
            for (int c = 0; c < TILE; c++) {
                row[c] = m_new == -INFINITY ? 0.0f : exp2f(row[c] - m_new);
                sum += row[c];
            }
            l = l * alpha + sum;
            m = m_new;
            alpha_s[threadIdx.x] = alpha;
        }
        __syncthreads();

        // Pass 3: O = diag(alpha) O + P V
        #pragma unroll
        for (int mi = 0; mi < S::OWN_ROWS; mi++)
            #pragma unroll
            for (int u = 0; u < S::OWN_COLS; u++) o[mi][u] *= alpha_s[warp + WARPS * mi];
        accumulate_product<D>(o, P_s, TILE + 1, 1, V_s);
    }

    // Finish each row: its log-sum-exp (natural log), and the weights of the merge with the first step
    if (threadIdx.x < TILE) {
        const int row = threadIdx.x, i = step_query_position(st, p0 + row);
        const float lse_new = l > 0.0f ? (m + log2f(l)) * LN2 : -INFINITY;
        float lse_old = -INFINITY;
        if (accumulate && i >= 0) lse_old = lse[i];
        const float top = fmaxf(lse_old, lse_new);
        const float merged = top == -INFINITY ? -INFINITY : top + logf(expf(lse_old - top) + expf(lse_new - top));
        w_old_s[row] = merged == -INFINITY ? 0.0f : expf(lse_old - merged);
        w_new_s[row] = merged == -INFINITY || l == 0.0f ? 0.0f : expf(lse_new - merged) / l;
        if (i >= 0) lse[i] = merged;
    }
    __syncthreads();
    #pragma unroll
    for (int mi = 0; mi < S::OWN_ROWS; mi++) {
        const int row = warp + WARPS * mi, i = step_query_position(st, p0 + row);
        if (i < 0) continue;
        #pragma unroll
        for (int u = 0; u < S::OWN_COLS; u++) {
            const size_t at = (size_t)i * D + lane + 32 * u;
            const float before = accumulate ? out[at] * w_old_s[row] : 0.0f;
            out[at] = before + o[mi][u] * w_new_s[row];
        }
    }
}

// Backward, preparation: D_i = dO_i . O_i for every row (B, H, T). One thread per row, no barrier.
template <int D> __global__ void attention_delta_kernel(float *delta, const float *dout, const float *out, size_t rows) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float sum = 0.0f;
    for (int x = 0; x < D; x++) sum += dout[row * D + x] * out[row * D + x];
    delta[row] = sum;
}

// Loads the query side of a tile pair for the backward: Q (scaled as in the forward), dO, lse and D.
template <int D>
__device__ static void load_query_side(float *Q_s, float *dO_s, float *lse2_s, float *D_s, const float *q,
                                       const float *dout, const float *lse, const float *delta,
                                       const Step &st, int p0) {
    load_tile<D>(Q_s, q, st, p0, false, LOG2E / sqrtf((float)D));
    load_tile<D>(dO_s, dout, st, p0, false, 1.0f);
    load_row_values(lse2_s, lse, st, p0, LOG2E, INFINITY);
    load_row_values(D_s, delta, st, p0, 1.0f, 0.0f);
}

// Backward for keys and values, one key tile per block, looping over the query tiles that meet it:
//   dV_j = sum_i P_ij dO_i                  from out_i = sum_j P_ij v_j
//   dK_j = sum_i dS_ij q_i / sqrt(D)         from s_ij = q_i . k_j / sqrt(D)
// Each key tile is owned by one block: no atomics, and a deterministic sum. Adds into dk, dv, since
// a merged head's two steps touch the same keys.
// Grid: (key tiles, B * heads of this step); block: THREADS.
template <int D>
__global__ void __launch_bounds__(THREADS, 4)
attention_backward_kv_kernel(float *dk, float *dv, const float *dout, const float *lse, const float *delta,
                             const float *q, const float *k, const float *v, Step st, const int4 *tiles,
                             const int *heads, int n_heads, int H) {
    typedef TileShape<D> S;
    float *K_s = smem;                  // (TILE, D)
    float *V_s = K_s + S::MATRIX;       // (TILE, D)
    float *Q_s = V_s + S::MATRIX;       // (TILE, D) queries * log2(e) / sqrt(D)
    float *dO_s = Q_s + S::MATRIX;      // (TILE, D)
    float *P_s = dO_s + S::MATRIX;      // (TILE, TILE)
    float *dS_s = P_s + S::SCORES;      // (TILE, TILE)
    float *lse2_s = dS_s + S::SCORES;   // (TILE) lse * log2(e)
    float *D_s = lse2_s + TILE;         // (TILE)

    const int kt = blockIdx.x, b = blockIdx.y / n_heads, h = heads[blockIdx.y % n_heads];
    const size_t bh = (size_t)b * H + h;
    q += bh * st.n * D; k += bh * st.n * D; v += bh * st.n * D; dout += bh * st.n * D;
    dk += bh * st.n * D; dv += bh * st.n * D; lse += bh * st.n; delta += bh * st.n;
    const int4 range = tiles[kt];
    const int s0 = kt * TILE, lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    load_tile<D>(K_s, k, st, s0, true, 1.0f);
    load_tile<D>(V_s, v, st, s0, true, 1.0f);
    float dk_acc[S::OWN_ROWS][S::OWN_COLS] = {}, dv_acc[S::OWN_ROWS][S::OWN_COLS] = {};

    for (int qt = range.x; qt <= range.w; qt++) {
        const bool full = range.y <= qt && qt <= range.z;
        __syncthreads();
        load_query_side<D>(Q_s, dO_s, lse2_s, D_s, q, dout, lse, delta, st, qt * TILE);
        __syncthreads();
        probability_gradients<D>(P_s, dS_s, Q_s, dO_s, K_s, V_s, lse2_s, D_s, st, qt * TILE, s0, full);
        __syncthreads();
        // dV += P^T dO and dK += dS^T Q, for the rows of the key tile this thread owns
        accumulate_product<D>(dv_acc, P_s, 1, TILE + 1, dO_s);
        accumulate_product<D>(dk_acc, dS_s, 1, TILE + 1, Q_s);
    }
    // Q_s carries log2(e) / sqrt(D); ln 2 takes the log2(e) back out
    #pragma unroll
    for (int mi = 0; mi < S::OWN_ROWS; mi++) {
        const int j = step_key_position(st, s0 + warp + WARPS * mi);
        if (j < 0) continue;
        #pragma unroll
        for (int u = 0; u < S::OWN_COLS; u++) {
            const size_t at = (size_t)j * D + lane + 32 * u;
            dk[at] += dk_acc[mi][u] * LN2;
            dv[at] += dv_acc[mi][u];
        }
    }
}

// Backward for queries, one query tile per block, looping over its key tiles:
//   dQ_i = sum_j dS_ij k_j / sqrt(D)         from s_ij = q_i . k_j / sqrt(D)
// Grid: (query tiles, B * heads of this step); block: THREADS.
template <int D>
__global__ void __launch_bounds__(THREADS, 4)
attention_backward_q_kernel(float *dq, const float *dout, const float *lse, const float *delta,
                            const float *q, const float *k, const float *v, Step st, const int4 *tiles,
                            const int *heads, int n_heads, int H) {
    typedef TileShape<D> S;
    float *Q_s = smem;                  // (TILE, D) queries * log2(e) / sqrt(D)
    float *dO_s = Q_s + S::MATRIX;      // (TILE, D)
    float *K_s = dO_s + S::MATRIX;      // (TILE, D)
    float *V_s = K_s + S::MATRIX;       // (TILE, D)
    float *P_s = V_s + S::MATRIX;       // (TILE, TILE)
    float *dS_s = P_s + S::SCORES;      // (TILE, TILE)
    float *lse2_s = dS_s + S::SCORES;   // (TILE)
    float *D_s = lse2_s + TILE;         // (TILE)

    const int qt = blockIdx.x, b = blockIdx.y / n_heads, h = heads[blockIdx.y % n_heads];
    const size_t bh = (size_t)b * H + h;
    q += bh * st.n * D; k += bh * st.n * D; v += bh * st.n * D; dout += bh * st.n * D;
    dq += bh * st.n * D; lse += bh * st.n; delta += bh * st.n;
    const int4 range = tiles[qt];
    const int p0 = qt * TILE, lane = threadIdx.x % 32, warp = threadIdx.x / 32;

    load_query_side<D>(Q_s, dO_s, lse2_s, D_s, q, dout, lse, delta, st, p0);
    float dq_acc[S::OWN_ROWS][S::OWN_COLS] = {};

    for (int kt = range.x; kt <= range.w; kt++) {
        const bool full = range.y <= kt && kt <= range.z;
        __syncthreads();
        load_tile<D>(K_s, k, st, kt * TILE, true, 1.0f);
        load_tile<D>(V_s, v, st, kt * TILE, true, 1.0f);
        __syncthreads();
        probability_gradients<D>(P_s, dS_s, Q_s, dO_s, K_s, V_s, lse2_s, D_s, st, p0, kt * TILE, full);
        __syncthreads();
        // dQ += dS K, for the rows of the query tile this thread owns
        accumulate_product<D>(dq_acc, dS_s, TILE + 1, 1, K_s);
    }
    const float scale = 1.0f / sqrtf((float)D);
    #pragma unroll
    for (int mi = 0; mi < S::OWN_ROWS; mi++) {
        const int i = step_query_position(st, p0 + warp + WARPS * mi);
        if (i < 0) continue;
        #pragma unroll
        for (int u = 0; u < S::OWN_COLS; u++) dq[(size_t)i * D + lane + 32 * u] += dq_acc[mi][u] * scale;
    }
}

// ----------------------------------------------------------------------------
// 6. API: build the layout once, then run the kernels step by step

// One step of the layer, with the heads that use it and its tile layout on the device.
struct StepPlan {
    Step st;
    int slot;          // 0: first step of its heads; 1: the second step of merged heads (accumulates)
    int n_heads;
    int *heads;        // (n_heads) on the device
    int4 *q_tiles;     // (query tiles) TileRange of key tiles, on the device
    int4 *k_tiles;     // (key tiles) TileRange of query tiles, on the device
    int n_qtiles, n_ktiles;
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
};

static bool same_step(const Step &a, const Step &b) { return memcmp(&a, &b, sizeof(Step)) == 0; }

static int4 to_int4(TileRange r) { return int4{r.first, r.first_full, r.last_full, r.last}; }

static void *upload(const void *src, size_t bytes, size_t *counter) {
    void *dst = st_malloc(bytes);
    st_to_device(dst, src, bytes);
    *counter += bytes;
    return dst;
}

// Builds the plan for one distinct step used by `n_heads` heads (heads listed on the host).
static StepPlan make_plan(StAttention *a, const Step &st, int slot, const int *heads, int n_heads) {
    StepPlan plan = {st, slot, n_heads, NULL, NULL, NULL, ceil_div(st.nq, TILE), ceil_div(st.nk, TILE)};
    TileRange *q_tiles = (TileRange *)malloc(plan.n_qtiles * sizeof(TileRange));
    TileRange *k_tiles = (TileRange *)malloc(plan.n_ktiles * sizeof(TileRange));
    int4 *packed = (int4 *)malloc((plan.n_qtiles > plan.n_ktiles ? plan.n_qtiles : plan.n_ktiles) * sizeof(int4));
    double allowed = 0.0, computed = 0.0;
    for (int qt = 0; qt < plan.n_qtiles; qt++) {
        q_tiles[qt] = query_tile_range(st, qt, &allowed);
        computed += (double)(q_tiles[qt].last - q_tiles[qt].first + 1) * TILE * TILE;
    }
    key_tile_ranges(q_tiles, plan.n_qtiles, k_tiles, plan.n_ktiles);
    a->pairs_allowed += allowed * n_heads;
    a->pairs_computed += computed * n_heads;
    for (int t = 0; t < plan.n_qtiles; t++) packed[t] = to_int4(q_tiles[t]);
    plan.q_tiles = (int4 *)upload(packed, plan.n_qtiles * sizeof(int4), &a->layout_bytes);
    for (int t = 0; t < plan.n_ktiles; t++) packed[t] = to_int4(k_tiles[t]);
    plan.k_tiles = (int4 *)upload(packed, plan.n_ktiles * sizeof(int4), &a->layout_bytes);
    plan.heads = (int *)upload(heads, n_heads * sizeof(int), &a->layout_bytes);
    free(q_tiles);
    free(k_tiles);
    free(packed);
    return plan;
}

StAttention *st_attention_create(const StPattern *p, int layer, int n_ctx, int n_head, int d_head) {
    const char *err = st_pattern_check(p, n_ctx, n_head, d_head);
    if (err) {
        fprintf(stderr, "%s\n", err);
        exit(1);
    }
    StAttention *a = (StAttention *)calloc(1, sizeof(StAttention));
    a->pattern = *p;
    a->layer = layer, a->n = n_ctx, a->H = n_head, a->D = d_head;
    a->plans = (StepPlan *)calloc(2 * (size_t)n_head, sizeof(StepPlan));
    Step *steps = (Step *)malloc(2 * (size_t)n_head * sizeof(Step));
    int *n_steps = (int *)malloc(n_head * sizeof(int)), *heads = (int *)malloc(n_head * sizeof(int));
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
    }
    if (a->delta) st_free(a->delta);
    free(a->plans);
    free(a);
}

StAttentionStats st_attention_stats(const StAttention *a) {
    StAttentionStats s = {a->pairs_allowed, a->pairs_computed, a->layout_bytes + a->delta_rows * sizeof(float)};
    return s;
}

// Dispatches on the head size, the kernels' template parameter.
#define DISPATCH_HEAD_SIZE(D, CALL)                                  \
    switch (D) {                                                     \
    case 32: { const int HS = 32; CALL; } break;                     \
    case 64: { const int HS = 64; CALL; } break;                     \
    default: { const int HS = 128; CALL; } break;                    \
    }

static size_t forward_shared_bytes(int D) {
    return (3 * (size_t)TILE * (D + 1) + TILE * (TILE + 1) + 4 * TILE) * sizeof(float);
}
static size_t backward_shared_bytes(int D) {
    return (4 * (size_t)TILE * (D + 1) + 2 * TILE * (TILE + 1) + 2 * TILE) * sizeof(float);
}

void st_attention_forward(StAttention *a, float *out, float *lse, const float *q, const float *k,
                          const float *v, int B) {
    for (int i = 0; i < a->n_plans; i++) {
        const StepPlan &pl = a->plans[i];
        const dim3 grid(pl.n_qtiles, B * pl.n_heads);
        DISPATCH_HEAD_SIZE(a->D, LAUNCH(attention_forward_kernel<HS>, grid, THREADS, forward_shared_bytes(HS),
                                        out, lse, q, k, v, pl.st, pl.q_tiles, pl.heads, pl.n_heads, a->H, pl.slot));
    }
}

void st_attention_backward(StAttention *a, float *dq, float *dk, float *dv, const float *dout,
                           const float *out, const float *lse, const float *q, const float *k,
                           const float *v, int B) {
    const size_t rows = (size_t)B * a->H * a->n, bytes = rows * a->D * sizeof(float);
    if (rows > a->delta_rows) {
        if (a->delta) st_free(a->delta);
        a->delta = (float *)st_malloc(rows * sizeof(float));
        a->delta_rows = rows;
    }
    DISPATCH_HEAD_SIZE(a->D, LAUNCH(attention_delta_kernel<HS>, dim3((unsigned)((rows + 255) / 256)), 256, 0,
                                    a->delta, dout, out, rows));
    cudaCheck(cudaMemset(dq, 0, bytes));
    cudaCheck(cudaMemset(dk, 0, bytes));
    cudaCheck(cudaMemset(dv, 0, bytes));
    for (int i = 0; i < a->n_plans; i++) {
        const StepPlan &pl = a->plans[i];
        DISPATCH_HEAD_SIZE(a->D, {
            LAUNCH(attention_backward_kv_kernel<HS>, dim3(pl.n_ktiles, B * pl.n_heads), THREADS,
                   backward_shared_bytes(HS), dk, dv, dout, lse, a->delta, q, k, v, pl.st, pl.k_tiles,
                   pl.heads, pl.n_heads, a->H);
            LAUNCH(attention_backward_q_kernel<HS>, dim3(pl.n_qtiles, B * pl.n_heads), THREADS,
                   backward_shared_bytes(HS), dq, dout, lse, a->delta, q, k, v, pl.st, pl.q_tiles,
                   pl.heads, pl.n_heads, a->H);
        });
    }
}

// ----------------------------------------------------------------------------
// 7. Data files, mu-law audio, the synthetic data set (host code)

static const char DATA_MAGIC[8] = {'S', 'T', 'B', 'Y', 'T', 'E', 'S', '1'};
#define DATA_VERSION 1
static const char *KIND_NAMES[] = {"text", "image", "audio"};

const char *st_data_check(const StDataInfo *info) {
    static char msg[256];
    if (info->kind < ST_TEXT || info->kind > ST_AUDIO)
        snprintf(msg, sizeof msg, "unknown data kind %d (0 text, 1 image, 2 audio)", (int)info->kind);
    else if (info->kind == ST_IMAGE && (info->height < 1 || info->width < 1 || info->channels < 1))
        snprintf(msg, sizeof msg, "an image data set needs height, width and channels >= 1, got %d x %d x %d",
                 info->height, info->width, info->channels);
    else if (info->kind == ST_IMAGE && info->n_bytes % ((size_t)info->height * info->width * info->channels))
        snprintf(msg, sizeof msg, "%zu bytes are not a whole number of %d x %d x %d images", info->n_bytes,
                 info->height, info->width, info->channels);
    else if (info->kind == ST_AUDIO && info->sample_rate < 1)
        snprintf(msg, sizeof msg, "an audio data set needs a sample rate >= 1, got %d", info->sample_rate);
    else
        return NULL;
    return msg;
}

static void put_u32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put_u64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static uint32_t get_u32(const unsigned char *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = v << 8 | p[i]; return v; }
static uint64_t get_u64(const unsigned char *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = v << 8 | p[i]; return v; }

const char *st_data_write(const char *path, const StDataInfo *info, const unsigned char *bytes) {
    static char msg[8192];
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
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        snprintf(msg, sizeof msg, "cannot write %s: %s", tmp, strerror(errno));
        return msg;
    }
    const int ok = fwrite(header, 1, sizeof header, f) == sizeof header &&
                   fwrite(bytes, 1, info->n_bytes, f) == info->n_bytes;
    if (fclose(f) != 0 || !ok || rename(tmp, path) != 0) {
        snprintf(msg, sizeof msg, "cannot write %s: %s (is the disk full?)", path, strerror(errno));
        remove(tmp);
        return msg;
    }
    return NULL;
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
    } else if (get_u32(h + 12) > ST_AUDIO) {
        snprintf(msg, sizeof msg, "%s has a corrupt header: unknown data kind %u (0 text, 1 image, 2 audio); "
                 "remake it with data/prepare.sh NAME", path, get_u32(h + 12));
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
    unsigned char *bytes = (unsigned char *)malloc(info->n_bytes ? info->n_bytes : 1);
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

static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

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
