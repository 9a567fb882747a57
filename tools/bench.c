/*
bench.c: times forward + backward of the attention, dense against strided/merged with l = sqrt(n).

Run with `make bench` (it builds for the CPU or the GPU like `make`). For each precision and n it
prints the pairs the pattern allows, the time of one forward + backward, the effective TFLOP/s
counted on the allowed pairs only (FlashAttention's convention: 4 D flops per pair forward, 2.5 times
that backward, so 14 D per pair in all), the bytes the attention itself allocated (tile layout
and backward workspace: linear in n, never n x n), and us/tile: the time divided by the tile pairs
the kernels computed (each 32 x 32 (query, key) pairs; all heads and batch elements counted).
Each precision's table ends with a summary line:
  bench: precision=<p> n=<largest n with both> speedup=<dense ms / sparse ms>
         pairs_ratio=<dense pairs / sparse pairs> tiles_ratio=<dense tiles / sparse tiles>
         sparse_exponent=<e> dense_exponent=<e> crossover=<n>
with the exponents of time ~ n^e fitted by least squares on log-log over all sizes ("n/a" with a
single size: a slope needs two points), and the smallest
n from which the sparse pattern is faster at every size ("none" if dense is faster at the largest).
Then, at that largest n, where one forward + backward's time goes, kernel by kernel, for each pattern
(the profiler's table, as ./train -profile prints it).
The kernels' work per allowed pair scales with pairs_ratio, their work per tile pair (loads, the
softmax's loops, barriers) with tiles_ratio: the more per-tile work there is, the closer the speedup
comes to tiles_ratio instead of pairs_ratio. us/tile shows which: where dense's and the sparse pattern's
are alike, a sparse tile pair costs a full one, however few of its pairs are allowed.

Flags: -min_ctx N (smallest n, then doubled; default 1024), -max_ctx N (largest n; default 8192 on
the CPU, 262144 on a GPU), -max_dense N (largest n for dense, whose time grows as n^2; default 65536),
-batch B, -heads H (default 1 x 1 on the CPU, 4 x 4 on a GPU), -head_size D (64), -reps R (timed
runs per size and pattern after one warm-up run each, the best one counts; the patterns' runs
alternate, so that a slow phase of a busy machine reaches both; default 3 on the CPU, 5 on a GPU),
-precision fp32|tf32|both (default: both on a GPU; the CPU build's fp32 on the CPU, where TF32 is only
emulated and its speed means nothing), -keep_ds 0|1|2 (whether the backward keeps dS for its dQ kernel:
never, where it takes no more memory than q, k and v (the default), always; st_set_keep_ds).
`make bench BENCH_FLAGS="..."` passes flags.
*/
#define _POSIX_C_SOURCE 199309L // clock_gettime
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../sparse_transformer.h"

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

typedef struct {
    int n;
    double pairs, tiles, ms; // allowed pairs and the pairs of the tiles computed (st_attention_stats)
    size_t bytes;
} Result;

// The tensors of one size, shared by the patterns timed there: q, k, v and dout random, (B, H, T, D).
typedef struct {
    float *q, *k, *v, *dout, *out, *lse, *dq, *dk, *dv;
} Tensors;

static Tensors tensors_create(int n, int B, int H, int D) {
    const size_t count = (size_t)B * H * n * D, rows = (size_t)B * H * n;
    float *host = malloc(count * sizeof(float));
    srand(1);
    for (size_t e = 0; e < count; e++) host[e] = (float)rand() / RAND_MAX - 0.5f;
    Tensors t;
    float **all[] = {&t.q, &t.k, &t.v, &t.dout, &t.out, &t.lse, &t.dq, &t.dk, &t.dv};
    for (int i = 0; i < 9; i++) *all[i] = st_malloc((all[i] == &t.lse ? rows : count) * sizeof(float));
    for (int i = 0; i < 4; i++) st_to_device(*all[i], host, count * sizeof(float));
    free(host);
    return t;
}

static void tensors_free(Tensors *t) {
    float *all[] = {t->q, t->k, t->v, t->dout, t->out, t->lse, t->dq, t->dk, t->dv};
    for (int i = 0; i < 9; i++) st_free(all[i]);
}

// One forward + backward, in ms.
static double time_once(StAttention *att, const Tensors *t, int B) {
    st_synchronize();
    const double start = now_ms();
    st_attention_forward(att, t->out, t->lse, t->q, t->k, t->v, B, NULL);
    st_attention_backward(att, t->dq, t->dk, t->dv, t->dout, t->out, t->lse, t->q, t->k, t->v, B, NULL);
    st_synchronize();
    return now_ms() - start;
}

// Times `count` patterns (1 or 2) at context n: best of `reps` after one warm-up run each, the patterns'
// runs alternating, so that a slow phase of a busy machine reaches all of them, not just one.
#define MAX_PATTERNS 2
static void time_patterns(const StPattern *patterns, Result *results, int count, int n, int B, int H, int D,
                          int reps) {
    if (count < 1 || count > MAX_PATTERNS) { fprintf(stderr, "bench: %d patterns at once\n", count); exit(1); }
    Tensors t = tensors_create(n, B, H, D);
    StAttention *att[MAX_PATTERNS];
    for (int p = 0; p < count; p++) {
        att[p] = st_attention_create(&patterns[p], 0, n, H, D);
        results[p].ms = INFINITY;
    }
    for (int rep = 0; rep <= reps; rep++)
        for (int p = 0; p < count; p++) {
            const double ms = time_once(att[p], &t, B);
            if (rep > 0 && ms < results[p].ms) results[p].ms = ms; // rep 0 is the warm-up
        }
    for (int p = 0; p < count; p++) {
        const StAttentionStats stats = st_attention_stats(att[p]); // after a backward: with its workspace
        results[p].n = n, results[p].pairs = stats.pairs_allowed * B, results[p].bytes = stats.bytes;
        results[p].tiles = stats.pairs_computed * B;
        st_attention_free(att[p]);
    }
    tensors_free(&t);
}

// Where one forward + backward's time goes at context n, kernel by kernel (st_profile), per pattern:
// one run after a warm-up, each kernel timed by CUDA events on a GPU, by the wall clock on the CPU.
static void profile_patterns(const StPattern *patterns, const char *const *names, int count, int n, int B, int H,
                             int D) {
    Tensors t = tensors_create(n, B, H, D);
    for (int p = 0; p < count; p++) {
        StAttention *att = st_attention_create(&patterns[p], 0, n, H, D);
        time_once(att, &t, B);
        st_profile_reset();
        st_profile(1);
        const double ms = time_once(att, &t, B);
        st_profile(0);
        printf("%s, n = %d, %s, one forward + backward:\n", names[p], n, st_precision_name(st_get_precision()));
        st_profile_print(stdout, 1, ms);
        st_attention_free(att);
    }
    tensors_free(&t);
}

// Exercise 9 starts here: the cost exponent and the crossover.
// The exponent e of time ~ n^e: the least-squares slope of log(ms) against log(n).
static double fitted_exponent(const Result *r, int count) {
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (int i = 0; i < count; i++) {
        const double x = log(r[i].n), y = log(r[i].ms);
        sx += x, sy += y, sxx += x * x, sxy += x * y;
    }
    return (count * sxy - sx * sy) / (count * sxx - sx * sx);
}

// Where sparse starts to beat dense: the smallest n from which the sparse pattern is faster at every
// n measured with both (dense[i] and sparse[i] have the same n), or 0 if dense is faster at the largest.
static int crossover(const Result *dense, const Result *sparse, int both) {
    int n = 0;
    for (int i = both - 1; i >= 0 && sparse[i].ms < dense[i].ms; i--) n = dense[i].n;
    return n;
}
// Exercise 9 ends here.

#define TILE_PAIRS (32 * 32) // (query, key) pairs in a tile pair: TILE x TILE in sparse_transformer.cu
static void print_row(const char *name, const Result *r, int D) {
    printf("%7d  %-16s %-5s %14.0f %11.3f %9.3g %12zu %9.3g\n", r->n, name, st_precision_name(st_get_precision()),
           r->pairs, r->ms, r->pairs * 14.0 * D / (r->ms * 1e-3) / 1e12, r->bytes, r->ms * 1e3 / (r->tiles / TILE_PAIRS));
}

// An exponent for the summary line: a fit needs two sizes at least.
static const char *exponent_text(char *text, size_t size, const Result *r, int count) {
    if (count < 2) snprintf(text, size, "n/a");
    else snprintf(text, size, "%.2f", fitted_exponent(r, count));
    return text;
}

#define FLAGS "(flags: -min_ctx -max_ctx -max_dense -batch -heads -head_size -reps -precision fp32|tf32|both -keep_ds 0|1|2)"
static int flag_value(int argc, char **argv, int i) {
    char *end;
    long value = i + 1 < argc ? strtol(argv[i + 1], &end, 10) : 0;
    if (i + 1 >= argc || *end != '\0' || value < 1 || value > ST_MAX_CTX) {
        fprintf(stderr, "%s expects a positive whole number " FLAGS "\n", argv[i]);
        exit(1);
    }
    return (int)value;
}

// The patterns timed at context n: strided/merged with l = sqrt(n), and dense.
#define PATTERNS_AT(n) {ST_STRIDED, ST_MERGED, (int)lround(sqrt(n)), 0, 0}, {ST_DENSE, ST_INTERLEAVED, 0, 0, 0}

// One precision: from min_ctx, dense up to max_dense and strided/merged up to max_ctx, then the summary line.
static void bench(int min_ctx, int max_ctx, int max_dense, int B, int H, int D, int reps) {
    Result dense[32], sparse[32];
    int sizes = 0, both = 0;
    char name[32];
    for (int n = min_ctx; n <= max_ctx && sizes < 32; n *= 2, sizes++) {
        const StPattern patterns[2] = {PATTERNS_AT(n)};
        Result results[2];
        const int with_dense = n <= max_dense;
        time_patterns(patterns, results, 1 + with_dense, n, B, H, D, reps);
        sparse[sizes] = results[0];
        if (with_dense) {
            dense[both++] = results[1];
            print_row("dense", &dense[both - 1], D);
        }
        snprintf(name, sizeof name, "strided l=%d", patterns[0].stride);
        print_row(name, &sparse[sizes], D);
        fflush(stdout);
    }
    if (both == 0) { fprintf(stderr, "-max_ctx and -max_dense must be at least -min_ctx (%d)\n", min_ctx); exit(1); }
    const Result *d = &dense[both - 1], *s = &sparse[both - 1];
    char where[32] = "none", sparse_e[16], dense_e[16];
    if (crossover(dense, sparse, both)) snprintf(where, sizeof where, "%d", crossover(dense, sparse, both));
    printf("bench: precision=%s n=%d speedup=%.2f pairs_ratio=%.2f tiles_ratio=%.2f sparse_exponent=%s "
           "dense_exponent=%s crossover=%s\n", st_precision_name(st_get_precision()), d->n, d->ms / s->ms,
           d->pairs / s->pairs, d->tiles / s->tiles,
           exponent_text(sparse_e, sizeof sparse_e, sparse, sizes), exponent_text(dense_e, sizeof dense_e, dense, both),
           where);
    const StPattern patterns[2] = {PATTERNS_AT(d->n)};
    snprintf(name, sizeof name, "strided l=%d", patterns[0].stride);
    const char *names[2] = {name, "dense"};
    profile_patterns(patterns, names, 2, d->n, B, H, D);
}

int main(int argc, char **argv) {
    const char *device = st_device_init();
    const int on_gpu = st_device_is_gpu();
    int min_ctx = 1024, max_ctx = on_gpu ? 262144 : 8192, max_dense = 65536, B = on_gpu ? 4 : 1, H = on_gpu ? 4 : 1, D = 64;
    int reps = on_gpu ? 5 : 3, first = st_get_precision(), last = on_gpu ? ST_TF32 : first, keep_ds = 1;
    if (on_gpu) first = ST_FP32;
    for (int i = 1; i < argc; i += 2) {
        if (strcmp(argv[i], "-precision") == 0 && i + 1 < argc) {
            const int p = st_precision_from_name(argv[i + 1]);
            if (p < 0 && strcmp(argv[i + 1], "both") != 0) { fprintf(stderr, "-precision takes fp32, tf32 or both\n"); return 1; }
            first = p < 0 ? ST_FP32 : p, last = p < 0 ? ST_TF32 : p;
            continue;
        }
        if (strcmp(argv[i], "-keep_ds") == 0 && i + 1 < argc) {
            const char *k = argv[i + 1];
            if (strlen(k) != 1 || k[0] < '0' || k[0] > '2') {
                fprintf(stderr, "-keep_ds takes 0 (never), 1 (where it is small, the default) or 2 (always)\n");
                return 1;
            }
            keep_ds = k[0] - '0';
            st_set_keep_ds(keep_ds);
            continue;
        }
        int value = flag_value(argc, argv, i);
        if (strcmp(argv[i], "-min_ctx") == 0) min_ctx = value;
        else if (strcmp(argv[i], "-max_ctx") == 0) max_ctx = value;
        else if (strcmp(argv[i], "-max_dense") == 0) max_dense = value;
        else if (strcmp(argv[i], "-batch") == 0) B = value;
        else if (strcmp(argv[i], "-heads") == 0) H = value;
        else if (strcmp(argv[i], "-head_size") == 0) D = value;
        else if (strcmp(argv[i], "-reps") == 0) reps = value;
        else { fprintf(stderr, "unknown flag %s " FLAGS "\n", argv[i]); return 1; }
    }
    printf("device: %s\nbatch %d, heads %d, head size %d, forward + backward, best of %d; TFLOP/s on the allowed "
           "pairs (14 D flops each); dS kept for the dQ kernel: %s\n", device, B, H, D, reps,
           keep_ds == 0 ? "never" : keep_ds == 1 ? "where small" : "always");
    printf("%7s  %-16s %-5s %14s %11s %9s %12s %9s\n", "n", "pattern", "prec", "allowed pairs", "ms", "TFLOP/s", "bytes",
           "us/tile");
    for (int p = first; p <= last; p++) {
        st_set_precision((StPrecision)p);
        bench(min_ctx, max_ctx, max_dense, B, H, D, reps);
    }
    return 0;
}
