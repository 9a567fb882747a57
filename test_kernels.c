/*
test_kernels.c: checks the sparse attention kernels of sparse_transformer.cu against a naive dense
attention in double precision.

Read it in this order:
  1. the reference: an explicit n x n mask built by enumerating each step's keys (its own reading of
     the pattern formulas), and a plain dense attention over it in double, forward and backward;
  2. the checks of the reference itself: finite differences of its gradients, the masks against the
     library's formulas, the number of allowed pairs against counting arguments;
  3. the kernels against the reference, on every pattern and combination, odd sizes, several heads,
     in both precisions (float32, and TF32 on the tensor cores);
  4. the data files (header round trip, rejection of bad files), mu-law audio, the synthetic data;
  5. the model: every parameter's gradient against finite differences, TF32 against float32,
     recompute, a smaller batch after a larger one, overfitting a string, cached decoding,
     checkpoints (round trip, resume, damaged files).

Run: ./test_kernels [-v] [-precision fp32|tf32] [-only NAME] (-h: the usage and the groups). -v prints
every check; -precision runs the kernels in one precision only; -only runs the groups of checks whose
name contains NAME (the list is GROUPS, at the end). When a check fails, a line "verdict: ..." names
the first thing found wrong (for the kernels: the forward's output, its log-sum-exp, or only the
backward; for the model: the tensors whose gradients are off and where they meet the right ones), then
the first failed checks follow. The last line is "N passed, M failed"; the exit code is 1 if any failed.
CUDA_EMU_REVERSE=1 runs the emulated GPU threads in reverse order (CPU build).
*/
#define _POSIX_C_SOURCE 200809L // mkdtemp
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sparse_transformer.h"

static int passed = 0, failed = 0, verbose = 0;
static int only_precision = -1; // -precision fp32|tf32: the kernels in that precision only (default both)
static const char *group = "";  // the group of checks running (GROUPS, at the end)

// The verdict: one line that names the first thing found wrong, in the terms of what it computes. A
// group with a diagnosis of its own (the kernels, the model's gradients) writes it before its check;
// otherwise the first failed check's own line is the verdict. Without -v the failed checks are kept
// and printed after it, at the end (a few of them: the first one is usually the cause of the others).
static char verdict[1024];
static void set_verdict(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void set_verdict(const char *fmt, ...) {
    if (verdict[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(verdict, sizeof verdict, fmt, ap);
    va_end(ap);
}
#define SHOWN_FAILURES 5
static char shown[SHOWN_FAILURES][512], first_failed_group[32];

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    if (ok) passed++; else failed++;
    if (ok && !verbose) return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (verbose) printf("%s %s\n", ok ? "ok  " : "FAIL", line);
    if (ok) return;
    set_verdict("%s", line);
    if (failed == 1) snprintf(first_failed_group, sizeof first_failed_group, "%s", group);
    if (failed <= SHOWN_FAILURES) snprintf(shown[failed - 1], sizeof shown[0], "%s", line);
}

// ----------------------------------------------------------------------------
// Random numbers: splitmix64, uniform in [-1, 1)

static uint64_t rng_state = 0x5eed;
static double uniform(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) / 4503599627370496.0 - 1.0;
}

// ----------------------------------------------------------------------------
// 1. Reference: explicit mask and dense attention in double

// Marks in mask (n x n, row = query i) the keys of one step, by enumerating them.
//   strided step 0: the l positions up to i;  step 1: i, i - l, i - 2l, ...
//   fixed step 0: i's block up to i;  step 1: in every block, cells l-(g+1)c .. l-gc-1, up to i
//   dilated: the l taps i, i - l, ..., i - (l - 1) l that are >= 0
static void mark_step(unsigned char *mask, int n, StPatternKind kind, int step, int l, int c, int g) {
    for (int i = 0; i < n; i++) {
        unsigned char *row = mask + (size_t)i * n;
        if (kind == ST_DENSE) {
            for (int j = 0; j <= i; j++) row[j] = 1;
        } else if ((kind == ST_STRIDED && step == 0) || kind == ST_LOCAL) {
            for (int j = i; j >= 0 && j > i - l; j--) row[j] = 1;
        } else if (kind == ST_STRIDED) {
            for (int j = i; j >= 0; j -= l) row[j] = 1;
        } else if (kind == ST_DILATED) {
            for (int tap = 0; tap < l && i - (long)tap * l >= 0; tap++) row[i - tap * l] = 1;
        } else if (step == 0) {
            for (int j = i - i % l; j <= i; j++) row[j] = 1;
        } else {
            for (int start = 0; start <= i; start += l)
                for (int j = start + l - (g + 1) * c; j < start + l - g * c && j <= i; j++) row[j] = 1;
        }
    }
}

// The mask of head h in layer r: which steps the combination gives it.
static void build_mask(unsigned char *mask, int n, const StPattern *p, int layer, int head) {
    memset(mask, 0, (size_t)n * n);
    const int g = p->kind == ST_FIXED ? head % p->groups : 0;
    if (p->kind == ST_DENSE || p->kind == ST_LOCAL || p->kind == ST_DILATED) {
        mark_step(mask, n, p->kind, 0, p->stride, 0, 0);
        return;
    }
    if (p->combine == ST_MERGED) {
        mark_step(mask, n, p->kind, 0, p->stride, p->summary, g);
        mark_step(mask, n, p->kind, 1, p->stride, p->summary, g);
    } else {
        const int step = p->combine == ST_INTERLEAVED ? layer % 2 : head % 2;
        mark_step(mask, n, p->kind, step, p->stride, p->summary, g);
    }
}

// Dense masked attention of one (batch, head) in double. x: (T, D) rows. A row with no allowed key
// has output 0 and lse -inf.
static void ref_forward(double *out, double *lse, const double *q, const double *k, const double *v,
                        const unsigned char *mask, int n, int D) {
    const double scale = 1.0 / sqrt((double)D);
    double *s = malloc(n * sizeof(double));
    for (int i = 0; i < n; i++) {
        double top = -INFINITY;
        for (int j = 0; j < n; j++) {
            s[j] = -INFINITY;
            if (!mask[(size_t)i * n + j]) continue;
            double dot = 0;
            for (int x = 0; x < D; x++) dot += q[i * D + x] * k[j * D + x];
            s[j] = dot * scale;
            if (s[j] > top) top = s[j];
        }
        double sum = 0;
        for (int j = 0; j < n; j++) sum += mask[(size_t)i * n + j] ? exp(s[j] - top) : 0.0;
        lse[i] = sum > 0 ? top + log(sum) : -INFINITY;
        for (int x = 0; x < D; x++) out[i * D + x] = 0;
        for (int j = 0; j < n; j++) {
            if (!mask[(size_t)i * n + j]) continue;
            const double p = exp(s[j] - lse[i]);
            for (int x = 0; x < D; x++) out[i * D + x] += p * v[j * D + x];
        }
    }
    free(s);
}

// Backward of ref_forward, straight from the chain rule:
//   P_ij = exp(s_ij - lse_i), dv_j += P_ij dout_i, dP_ij = dout_i . v_j,
//   dS_ij = P_ij (dP_ij - sum_j' P_ij' dP_ij'), dq_i += dS_ij k_j / sqrt(D), dk_j += dS_ij q_i / sqrt(D)
static void ref_backward(double *dq, double *dk, double *dv, const double *dout, const double *lse,
                         const double *q, const double *k, const double *v, const unsigned char *mask,
                         int n, int D) {
    const double scale = 1.0 / sqrt((double)D);
    memset(dq, 0, n * D * sizeof(double));
    memset(dk, 0, n * D * sizeof(double));
    memset(dv, 0, n * D * sizeof(double));
    double *P = malloc(n * sizeof(double)), *dP = malloc(n * sizeof(double));
    for (int i = 0; i < n; i++) {
        double weighted = 0;
        for (int j = 0; j < n; j++) {
            P[j] = dP[j] = 0;
            if (!mask[(size_t)i * n + j]) continue;
            double dot = 0, dpv = 0;
            for (int x = 0; x < D; x++) dot += q[i * D + x] * k[j * D + x], dpv += dout[i * D + x] * v[j * D + x];
            P[j] = exp(dot * scale - lse[i]);
            dP[j] = dpv;
            weighted += P[j] * dP[j];
        }
        for (int j = 0; j < n; j++) {
            if (!mask[(size_t)i * n + j]) continue;
            const double dS = P[j] * (dP[j] - weighted);
            for (int x = 0; x < D; x++) {
                dv[j * D + x] += P[j] * dout[i * D + x];
                dq[i * D + x] += dS * k[j * D + x] * scale;
                dk[j * D + x] += dS * q[i * D + x] * scale;
            }
        }
    }
    free(P);
    free(dP);
}

// ----------------------------------------------------------------------------
// 2. Checks of the reference itself

// The reference gradients against central differences of L = sum(out * dout), all in double.
// Tolerance 1e-6 relative: the truncation error of a central difference with step 1e-5 is O(1e-10)
// and the rounding error O(1e-16 / 1e-5) = O(1e-11); 1e-6 leaves room and still catches any wrong term.
static void test_reference_gradients(void) {
    const int n = 19, D = 4;
    StPattern p = {ST_FIXED, ST_MERGED, 6, 2, 2};
    unsigned char *mask = malloc(n * n);
    build_mask(mask, n, &p, 0, 1);
    double *t = malloc(10 * n * D * sizeof(double));
    double *q = t, *k = q + n * D, *v = k + n * D, *dout = v + n * D, *out = dout + n * D;
    double *dq = out + n * D, *dk = dq + n * D, *dv = dk + n * D, *lse = dv + n * D;
    for (int e = 0; e < 4 * n * D; e++) t[e] = uniform();
    ref_forward(out, lse, q, k, v, mask, n, D);
    ref_backward(dq, dk, dv, dout, lse, q, k, v, mask, n, D);
    double *inputs[3] = {q, k, v}, *grads[3] = {dq, dk, dv}, worst = 0;
    const double h = 1e-5;
    for (int which = 0; which < 3; which++) {
        for (int e = 0; e < n * D; e++) {
            double loss[2];
            const double saved = inputs[which][e];
            for (int side = 0; side < 2; side++) {
                inputs[which][e] = saved + (side ? -h : h);
                ref_forward(out, lse, q, k, v, mask, n, D);
                loss[side] = 0;
                for (int x = 0; x < n * D; x++) loss[side] += out[x] * dout[x];
            }
            inputs[which][e] = saved;
            const double fd = (loss[0] - loss[1]) / (2 * h), an = grads[which][e];
            const double err = fabs(fd - an) / (fabs(fd) + fabs(an) + 1e-3);
            if (err > worst) worst = err;
        }
    }
    check(worst < 1e-6, "reference gradients match central differences (worst relative error %.1e)", worst);
    free(t);
    free(mask);
}

// Allowed keys of query i in each step, by counting arguments (not by looking at a mask).
static long count_step(StPatternKind kind, int step, int l, int c, int g, int i) {
    if (kind == ST_DENSE) return i + 1;
    if (kind == ST_LOCAL) return i + 1 < l ? i + 1 : l;
    if (kind == ST_DILATED) return i / l + 1 < l ? i / l + 1 : l; // taps back to 0, at most l
    if (kind == ST_STRIDED) return step == 0 ? (i + 1 < l ? i + 1 : l) : i / l + 1;
    if (step == 0) return i % l + 1;
    const int own = i % l - (l - (g + 1) * c) + 1; // summary cells <= i in i's own block
    return (long)(i / l) * c + (own < 0 ? 0 : own > c ? c : own);
}

// The number of pairs the pattern allows in head h of layer r. For merged, the two steps share only
// j = i (strided) or the summary cells of the query's own block (fixed): subtract them once.
static long expected_pairs(const StPattern *p, int n, int layer, int head) {
    const int l = p->stride, c = p->summary, g = p->kind == ST_FIXED ? head % p->groups : 0;
    long total = 0;
    for (int i = 0; i < n; i++) {
        if (p->kind == ST_DENSE || p->kind == ST_LOCAL || p->kind == ST_DILATED) {
            total += count_step(p->kind, 0, l, c, g, i);
            continue;
        }
        if (p->combine != ST_MERGED) {
            const int step = p->combine == ST_INTERLEAVED ? layer % 2 : head % 2;
            total += count_step(p->kind, step, l, c, g, i);
            continue;
        }
        const long shared = p->kind == ST_STRIDED ? 1 : count_step(ST_FIXED, 1, l, c, g, i) - (long)(i / l) * c;
        total += count_step(p->kind, 0, l, c, g, i) + count_step(p->kind, 1, l, c, g, i) - shared;
    }
    return total;
}

// The library's formulas (st_pattern_allows) give exactly the reference mask, and the mask has the
// expected number of pairs, for many settings including odd ones (l = 1, l = n, c = l).
static void test_masks(void) {
    const StPattern patterns[] = {
        {ST_DENSE, ST_INTERLEAVED, 0, 0, 0}, {ST_STRIDED, ST_INTERLEAVED, 1, 0, 0},
        {ST_STRIDED, ST_MERGED, 5, 0, 0},    {ST_STRIDED, ST_MULTIHEAD, 7, 0, 0},
        {ST_STRIDED, ST_MERGED, 37, 0, 0},   {ST_FIXED, ST_INTERLEAVED, 6, 2, 3},
        {ST_FIXED, ST_MERGED, 10, 3, 2},     {ST_FIXED, ST_MULTIHEAD, 9, 1, 1},
        {ST_FIXED, ST_MERGED, 4, 4, 1},      {ST_FIXED, ST_MERGED, 37, 5, 7},
        {ST_LOCAL, ST_MULTIHEAD, 1, 0, 0},   {ST_LOCAL, ST_MERGED, 9, 0, 0},
        {ST_DILATED, ST_MERGED, 1, 0, 0},    {ST_DILATED, ST_INTERLEAVED, 4, 0, 0},
        {ST_DILATED, ST_MULTIHEAD, 7, 0, 0}, {ST_DILATED, ST_MERGED, 37, 0, 0},
    };
    const int n = 37, H = 4;
    unsigned char *mask = malloc(n * n);
    for (size_t t = 0; t < sizeof patterns / sizeof patterns[0]; t++) {
        const StPattern *p = &patterns[t];
        int mismatches = 0, count_errors = 0;
        for (int layer = 0; layer < 2; layer++) {
            for (int head = 0; head < H; head++) {
                build_mask(mask, n, p, layer, head);
                long pairs = 0;
                for (int i = 0; i < n; i++)
                    for (int j = 0; j < n; j++) {
                        pairs += mask[i * n + j];
                        mismatches += mask[i * n + j] != st_pattern_allows(p, layer, head, i, j);
                    }
                count_errors += pairs != expected_pairs(p, n, layer, head);
            }
        }
        check(mismatches == 0 && count_errors == 0,
              "mask of %s/%s l=%d c=%d G=%d equals the formulas (%d mismatches) and the pair counts (%d wrong)",
              st_pattern_kind_name(p->kind), st_combine_name(p->combine), p->stride, p->summary, p->groups,
              mismatches, count_errors);
    }
    free(mask);
}

// Impossible settings are rejected with a message.
static void test_rejections(void) {
    const struct { StPattern p; int n, H, D; } bad[] = {
        {{ST_STRIDED, ST_MERGED, 0, 0, 0}, 64, 2, 32},   // l < 1
        {{ST_STRIDED, ST_MERGED, 65, 0, 0}, 64, 2, 32},  // l > n
        {{ST_FIXED, ST_MERGED, 8, 0, 1}, 64, 2, 32},     // c < 1
        {{ST_FIXED, ST_MERGED, 8, 3, 3}, 64, 2, 32},     // G c > l
        {{ST_STRIDED, ST_MULTIHEAD, 8, 0, 0}, 64, 1, 32}, // multihead with one head
        {{ST_DENSE, ST_MERGED, 0, 0, 0}, 64, 2, 48},     // unsupported head size
        {{ST_DENSE, ST_MERGED, 0, 0, 0}, 0, 2, 32},      // empty context
    };
    for (size_t t = 0; t < sizeof bad / sizeof bad[0]; t++) {
        const char *msg = st_pattern_check(&bad[t].p, bad[t].n, bad[t].H, bad[t].D);
        check(msg != NULL, "bad setting %zu rejected: %s", t, msg ? msg : "(accepted)");
    }
    const StPattern good = {ST_FIXED, ST_MULTIHEAD, 8, 2, 4};
    check(st_pattern_check(&good, 64, 2, 64) == NULL, "a valid fixed/multihead setting is accepted");
}

// ----------------------------------------------------------------------------
// 3. Kernels against the reference

// Tolerances, relative error ||kernel - ref|| / ||ref|| over a whole tensor. float32 rounds each
// operation by 2^-24 = 6e-8; a dot product or a softmax sum over K <= 512 terms then errs by about
// sqrt(K) 6e-8 <= 1.4e-6 in the worst row, and the norm over all rows averages that down. The
// backward chains three such products (dP, dS, then dQ/dK/dV). Measured errors are 1e-7 to 1e-6;
// the tolerances leave a 10x margin and still catch any wrong pair, which moves the error to 1e-2.
#define TOL_FORWARD 1e-5
#define TOL_BACKWARD 3e-5
// TF32 (the tensor cores): every operand of every tile product is rounded to 10 mantissa bits, a
// relative error of at most u = 2^-11 = 4.9e-4 (half an ulp of TF32), and the products are summed in
// float32. A dot product of two rounded vectors errs by up to 2u of the sum of |terms|; for the random
// inputs here that sum is about as large as the dot product's spread, so scores and outputs err by
// about 2u relative. The backward chains two such products (dP or P, then dQ/dK/dV): about 4u.
// Measured on the CPU build: forward 1.8e-4 to 3.7e-4 (0.4u to 0.8u: rounding errors of independent
// terms partly cancel), backward 2.0e-4 to 5.3e-4 (up to 1.1u). Tolerances 2u forward and 4u backward
// leave a margin of 2.6x and 3.7x; a wrong pair or a missing scale still moves the error to 1e-2.
#define TF32_U 4.8828125e-4
#define TOL_FORWARD_TF32 (2 * TF32_U)
#define TOL_BACKWARD_TF32 (4 * TF32_U)

typedef struct { double sq_err, sq_ref; } RelErr;
static void rel_add(RelErr *e, double got, double ref) {
    e->sq_err += (got - ref) * (got - ref);
    e->sq_ref += ref * ref;
}
static double rel_value(RelErr e) { return sqrt(e.sq_err / (e.sq_ref > 0 ? e.sq_ref : 1)); }

static float *host_random(size_t count) {
    float *h = malloc(count * sizeof(float));
    for (size_t e = 0; e < count; e++) h[e] = (float)uniform();
    return h;
}
// The poison written into every output before a run: a quiet NaN with a payload of its own, so that an
// entry the kernels never wrote (still these bits) is told apart from a NaN they computed.
#define POISON_BITS 0x7fc0deadu
static int is_poison(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits == POISON_BITS;
}
static float *host_poisoned(size_t count) {
    const uint32_t bits = POISON_BITS;
    float *h = malloc(count * sizeof(float));
    for (size_t e = 0; e < count; e++) memcpy(&h[e], &bits, sizeof bits);
    return h;
}
static float *device_poisoned(size_t count) {
    float *h = host_poisoned(count);
    float *d = st_malloc(count * sizeof(float));
    st_to_device(d, h, count * sizeof(float));
    free(h);
    return d;
}
static float *to_host(const float *d, size_t count) {
    float *h = malloc(count * sizeof(float));
    st_to_host(h, d, count * sizeof(float));
    return h;
}

typedef struct { StPattern p; int layer, n, H, D, B; } Case;

// The tensors' layouts (StLayout): the kernels run on (B, H, T, D) tensors (the API's default, layout
// NULL), and on the model's rows: q, k, v side by side in rows of 3C, out in rows of C (C = H D). The
// three of q, k, v (and of dq, dk, dv) are one buffer, `part` floats apart: T-long heads one after the
// other in (B, H, T, D), neighbours in a row of the model's.
typedef struct { StLayout at; size_t part; } Layout;
static Layout case_layout(const Case *c, int rows) {
    const size_t C = (size_t)c->H * c->D, T = c->n, D = c->D;
    const StHeadLayout packed = {c->H * T * D, T * D, D};
    Layout L = {{packed, packed}, (size_t)c->B * C * T};
    if (rows) L = (Layout){{{T * 3 * C, D, 3 * C}, {T * C, D, C}}, C};
    return L;
}
// Where the layout keeps entry e of a (B, H, T, D) tensor.
static size_t laid_out(StHeadLayout at, size_t e, const Case *c) {
    const size_t row = e / c->D, t = row % c->n, h = row / c->n % c->H, b = row / c->n / c->H;
    return b * at.batch + h * at.head + t * at.row + e % c->D;
}
// (B, H, T, D) host tensors into a device buffer laid out as `at` (the i-th `part` floats further), and back.
static float *to_device_laid_out(float *const *x, int n_x, StHeadLayout at, size_t part, size_t floats, const Case *c) {
    const size_t count = (size_t)c->B * c->H * c->n * c->D;
    float *h = host_poisoned(floats), *d = st_malloc(floats * sizeof(float));
    for (int i = 0; i < n_x; i++)
        for (size_t e = 0; e < count; e++) h[i * part + laid_out(at, e, c)] = x[i][e];
    st_to_device(d, h, floats * sizeof(float));
    free(h);
    return d;
}
static float *from_device_laid_out(const float *d, size_t floats, StHeadLayout at, const Case *c) {
    const size_t count = (size_t)c->B * c->H * c->n * c->D;
    float *h = to_host(d, floats), *x = malloc(count * sizeof(float));
    for (size_t e = 0; e < count; e++) x[e] = h[laid_out(at, e, c)];
    free(h);
    return x;
}

// The work bound at small n: tiles are TILE = 32 wide, so beyond its allowed pairs a query tile pays
// for the partly used key tiles at both ends of its rows' ranges (at most 4 tiles of TILE x TILE per
// query tile and step; the stride step's column padding at most doubles the query tiles), and inside
// the range a causal triangle of tiles is computed whole (at most 2x the allowed pairs).
#define TILE 32
static double work_bound(const Case *c, double allowed) {
    const int steps = (c->p.kind == ST_STRIDED || c->p.kind == ST_FIXED) && c->p.combine == ST_MERGED ? 2 : 1;
    const double query_tiles = ceil(2.0 * c->n / TILE);
    return 2.0 * allowed + 4.0 * TILE * TILE * query_tiles * c->H * steps;
}

// One output tensor against its reference: the relative error, the worst entry, and the entries that
// are not numbers where the reference is one: never written (still the poison), NaN, or infinite.
// `at` is the entry's index in the (B, H, T, D) tensor, or (B, H, T) for lse.
typedef struct {
    RelErr rel;
    double worst, worst_ref;
    float worst_got;
    size_t worst_at;
    long count[3];    // not numbers: NAN_COMPUTED, INFINITE, UNWRITTEN
    size_t first[3];  // the first of each kind, in memory order
} Diff;
enum { NAN_COMPUTED, INFINITE, UNWRITTEN };
static void diff_add(Diff *d, float got, double ref, size_t at) {
    const int kind = is_poison(got) ? UNWRITTEN : isnan(got) ? NAN_COMPUTED : isinf(got) && got != ref ? INFINITE : -1;
    if (kind >= 0) {
        if (!d->count[kind]++) d->first[kind] = at;
        return;
    }
    rel_add(&d->rel, got, ref);
    const double e = fabs(got - ref);
    if (e > d->worst) d->worst = e, d->worst_at = at, d->worst_got = got, d->worst_ref = ref;
}
static long diff_not_numbers(const Diff *d) { return d->count[0] + d->count[1] + d->count[2]; }
static int diff_bad(const Diff *d, double tol) { return diff_not_numbers(d) || !(rel_value(d->rel) < tol); }

// "out[b=0 h=1 i=37 d=5]": an entry of a (B, H, T, D) tensor (of a (B, H, T) one if !has_d).
static void entry_name(char *buf, size_t size, const char *tensor, size_t at, const Case *c, int has_d) {
    const size_t row = has_d ? at / c->D : at;
    if (has_d) snprintf(buf, size, "%s[b=%zu h=%zu i=%zu d=%zu]", tensor, row / ((size_t)c->H * c->n), row / c->n % c->H, row % c->n, at % c->D);
    else snprintf(buf, size, "%s[b=%zu h=%zu i=%zu]", tensor, row / ((size_t)c->H * c->n), row / c->n % c->H, row % c->n);
}

// What is wrong with one tensor, in a phrase for the verdict.
static void diff_phrase(char *buf, size_t size, const Diff *d, const char *tensor, const Case *c, int has_d, double tol) {
    static const char *what[3] = {"NaN", "infinity", "entries never written"};
    char where[96];
    for (int kind = 0; kind < 3; kind++) {
        if (!d->count[kind]) continue;
        entry_name(where, sizeof where, tensor, d->first[kind], c, has_d);
        snprintf(buf, size, "%s has %s, first at %s (%ld in all)%s", tensor, what[kind], where, d->count[kind],
                 kind == NAN_COMPUTED ? ": a row with no allowed key (yet) must give 0 and -inf, never -inf - -inf or 0 / 0"
                 : kind == UNWRITTEN ? ": still the poison the test wrote before the run" : "");
        return;
    }
    entry_name(where, sizeof where, tensor, d->worst_at, c, has_d);
    snprintf(buf, size, "%s off by %.1e relative (tolerance %.0e); the worst entry %s = %.6g, the reference %.6g",
             tensor, rel_value(d->rel), tol, where, d->worst_got, d->worst_ref);
}

// Which kernel cases failed, for the hints the verdict gets after all of them ran (test_kernels).
static struct { int fwd_fail_one_tile, fwd_pass_one_tile, fwd_fail_beyond, fwd_fail_merged, fwd_fail_other, bwd_fail_too; } tally;

static void run_case(const Case *c, int in_rows) {
    const int n = c->n, H = c->H, D = c->D, B = c->B;
    const size_t rows = (size_t)B * H * n, count = rows * D;
    const Layout L = case_layout(c, in_rows);
    const StLayout *layout = in_rows ? &L.at : NULL; // NULL: the API's (B, H, T, D)
    float *hq = host_random(count), *hk = host_random(count), *hv = host_random(count), *hdout = host_random(count);
    float *inputs[3] = {hq, hk, hv};
    float *q = to_device_laid_out(inputs, 3, L.at.qkv, L.part, 3 * count, c), *k = q + L.part, *v = k + L.part;
    float *dout = to_device_laid_out(&hdout, 1, L.at.out, 0, count, c);
    float *out = device_poisoned(count), *lse = device_poisoned(rows);
    float *dq = device_poisoned(3 * count), *dk = dq + L.part, *dv = dk + L.part;

    StAttention *att = st_attention_create(&c->p, c->layer, n, H, D);
    st_attention_forward(att, out, lse, q, k, v, B, layout);
    st_set_keep_ds(2); // every step's dS kept for the dQ kernel, whatever its size
    st_attention_backward(att, dq, dk, dv, dout, out, lse, q, k, v, B, layout);
    float *g_out = from_device_laid_out(out, count, L.at.out, c), *g_lse = to_host(lse, rows);
    float *g_dq = from_device_laid_out(dq, 3 * count, L.at.qkv, c);
    float *g_dk = from_device_laid_out(dk, 3 * count - L.part, L.at.qkv, c);
    float *g_dv = from_device_laid_out(dv, 3 * count - 2 * L.part, L.at.qkv, c);
    // Again with no dS kept between the backward's kernels (the dQ kernel computes it again): the same bits
    float *poison = host_poisoned(3 * count), *kept = to_host(dq, 3 * count);
    st_to_device(dq, poison, 3 * count * sizeof(float));
    st_set_keep_ds(0);
    st_attention_backward(att, dq, dk, dv, dout, out, lse, q, k, v, B, layout);
    st_set_keep_ds(1); // the default
    float *again = to_host(dq, 3 * count);
    const int recomputed_differs = memcmp(again, kept, 3 * count * sizeof(float)) != 0;
    free(again);
    free(kept);
    free(poison);

    // reference, head by head, in double
    double *t = malloc(9 * (size_t)n * D * sizeof(double) + n * sizeof(double));
    double *rq = t, *rk = rq + n * D, *rv = rk + n * D, *rdout = rv + n * D, *rout = rdout + n * D;
    double *rdq = rout + n * D, *rdk = rdq + n * D, *rdv = rdk + n * D, *rlse = rdv + n * D;
    unsigned char *mask = malloc((size_t)n * n);
    Diff e_out = {0}, e_lse = {0}, e_dq = {0}, e_dk = {0}, e_dv = {0};
    long lse_inf_mismatch = 0; // rows with no key: lse must be -inf there, and finite elsewhere
    size_t first_mismatch = 0;
    long allowed = 0;
    for (int h = 0; h < H; h++) {
        build_mask(mask, n, &c->p, c->layer, h);
        for (size_t e = 0; e < (size_t)n * n; e++) allowed += mask[e];
        for (int b = 0; b < B; b++) {
            const size_t base = ((size_t)b * H + h) * n;
            for (size_t e = 0; e < (size_t)n * D; e++) {
                rq[e] = hq[base * D + e], rk[e] = hk[base * D + e], rv[e] = hv[base * D + e];
                rdout[e] = hdout[base * D + e];
            }
            ref_forward(rout, rlse, rq, rk, rv, mask, n, D);
            ref_backward(rdq, rdk, rdv, rdout, rlse, rq, rk, rv, mask, n, D);
            for (size_t e = 0; e < (size_t)n * D; e++) {
                const size_t at = base * D + e;
                diff_add(&e_out, g_out[at], rout[e], at);
                diff_add(&e_dq, g_dq[at], rdq[e], at);
                diff_add(&e_dk, g_dk[at], rdk[e], at);
                diff_add(&e_dv, g_dv[at], rdv[e], at);
            }
            for (int i = 0; i < n; i++) {
                const float got = g_lse[base + i];
                if (isinf(rlse[i]) && got == rlse[i]) continue; // a row with no key: -inf, as it should
                if (!isnan(got) && isinf(rlse[i]) != isinf(got)) {
                    if (!lse_inf_mismatch++) first_mismatch = base + i;
                    continue;
                }
                diff_add(&e_lse, got, rlse[i], base + i);
            }
        }
    }
    const StAttentionStats stats = st_attention_stats(att);
    char name[160];
    snprintf(name, sizeof name, "%s %s/%s l=%d c=%d G=%d layer %d n=%d H=%d D=%d B=%d%s",
             st_precision_name(st_get_precision()), st_pattern_kind_name(c->p.kind), st_combine_name(c->p.combine),
             c->p.stride, c->p.summary, c->p.groups, c->layer, n, H, D, B, in_rows ? " rows" : "");
    const int tf32 = st_get_precision() == ST_TF32;
    const double tol_f = tf32 ? TOL_FORWARD_TF32 : TOL_FORWARD, tol_b = tf32 ? TOL_BACKWARD_TF32 : TOL_BACKWARD;
    const int out_bad = diff_bad(&e_out, tol_f), lse_bad = diff_bad(&e_lse, tol_f) || lse_inf_mismatch;
    const Diff *grads[3] = {&e_dq, &e_dk, &e_dv};
    const char *grad_names[3] = {"dq", "dk", "dv"};
    int worst_grad = 0; // the gradient to name: one with entries that are not numbers, else the largest error
    for (int g = 1; g < 3; g++)
        if (diff_not_numbers(grads[g]) > diff_not_numbers(grads[worst_grad]) ||
            (!diff_not_numbers(grads[worst_grad]) && rel_value(grads[g]->rel) > rel_value(grads[worst_grad]->rel)))
            worst_grad = g;
    const int grads_bad = diff_bad(&e_dq, tol_b) || diff_bad(&e_dk, tol_b) || diff_bad(&e_dv, tol_b);
    const int bwd_bad = grads_bad || recomputed_differs;
    char phrase[512], keys[256] = ""; // keys: what the layout's key ranges admit, when not what the rule allows
    if (stats.pairs_allowed != (double)allowed)
        snprintf(keys, sizeof keys, ". The key ranges admit %.0f (query, key) pairs where the rule allows %ld: %s",
                 stats.pairs_allowed, allowed, stats.pairs_allowed > allowed
                 ? "too many keys, so a range reaches keys the rule forbids" : "too few keys, so a range misses keys the rule allows");
    if (out_bad) {
        diff_phrase(phrase, sizeof phrase, &e_out, "out", c, 1, tol_f);
        set_verdict("forward output wrong (%s): %s%s", name, phrase, keys);
    } else if (lse_bad) {
        if (diff_not_numbers(&e_lse) || !lse_inf_mismatch) diff_phrase(phrase, sizeof phrase, &e_lse, "lse", c, 0, tol_f);
        else {
            char where[96];
            entry_name(where, sizeof where, "lse", first_mismatch, c, 0);
            snprintf(phrase, sizeof phrase, "%ld rows where exactly one of lse and the reference is infinite, first %s "
                     "(a row with no allowed key has lse -inf)", lse_inf_mismatch, where);
        }
        set_verdict("forward log-sum-exp wrong, its output right (%s): %s", name, phrase);
    } else if (!grads_bad && recomputed_differs) {
        set_verdict("the backward's gradients differ when the dQ kernel computes dS again instead of reading what "
                    "the dK/dV kernel kept (%s): both must compute it alike (probability_gradients)", name);
    } else if (bwd_bad) {
        diff_phrase(phrase, sizeof phrase, grads[worst_grad], grad_names[worst_grad], c, 1, tol_b);
        set_verdict("only the backward is wrong, the forward is right (%s): %s", name, phrase);
    }
    const int one_tile = n <= TILE, two_steps = (c->p.kind == ST_STRIDED || c->p.kind == ST_FIXED) && c->p.combine == ST_MERGED;
    if (out_bad || lse_bad) {
        tally.fwd_fail_one_tile += one_tile, tally.fwd_fail_beyond += !one_tile;
        tally.fwd_fail_merged += two_steps, tally.fwd_fail_other += !two_steps, tally.bwd_fail_too += bwd_bad;
    } else {
        tally.fwd_pass_one_tile += one_tile;
    }
    check(!out_bad && !lse_bad, "forward  %-52s rel err out %.1e, lse %.1e; not numbers: out %ld, lse %ld; "
          "empty-row mismatches %ld", name, rel_value(e_out.rel), rel_value(e_lse.rel), diff_not_numbers(&e_out),
          diff_not_numbers(&e_lse), lse_inf_mismatch);
    check(!bwd_bad, "backward %-52s rel err dq %.1e dk %.1e dv %.1e; not numbers %ld; dS kept = recomputed: %s",
          name, rel_value(e_dq.rel), rel_value(e_dk.rel), rel_value(e_dv.rel),
          diff_not_numbers(&e_dq) + diff_not_numbers(&e_dk) + diff_not_numbers(&e_dv),
          recomputed_differs ? "NO" : "yes");
    check(stats.pairs_allowed == (double)allowed && stats.pairs_computed <= work_bound(c, allowed),
          "work     %-52s allowed %ld (layout %.0f), computed %.0f = %.2fx, bound %.0f", name, allowed,
          stats.pairs_allowed, stats.pairs_computed, stats.pairs_computed / allowed, work_bound(c, allowed));

    st_attention_free(att);
    float *device[] = {q, dout, out, lse, dq};
    for (size_t i = 0; i < sizeof device / sizeof device[0]; i++) st_free(device[i]);
    float *host[] = {hq, hk, hv, hdout, g_out, g_lse, g_dq, g_dk, g_dv};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) free(host[i]);
    free(t);
    free(mask);
}

static void test_kernels(void) {
    const StPattern dense = {ST_DENSE, ST_INTERLEAVED, 0, 0, 0};
    const Case cases[] = {
        // dense: one tile, odd sizes, every head size
        {dense, 0, 1, 1, 32, 1},
        {dense, 0, 7, 2, 64, 2},
        {dense, 0, 100, 2, 32, 2},
        {dense, 0, 257, 3, 64, 1},
        {dense, 0, 96, 2, 128, 2},
        // strided: both layers of interleaved, merged, multihead; l not a power of two
        {{ST_STRIDED, ST_INTERLEAVED, 12, 0, 0}, 0, 150, 2, 32, 2},
        {{ST_STRIDED, ST_INTERLEAVED, 12, 0, 0}, 1, 150, 2, 32, 2},
        {{ST_STRIDED, ST_MERGED, 7, 0, 0}, 0, 200, 2, 64, 2},
        {{ST_STRIDED, ST_MERGED, 45, 0, 0}, 0, 300, 2, 32, 1},
        {{ST_STRIDED, ST_MERGED, 3, 0, 0}, 0, 20, 2, 128, 2},
        {{ST_STRIDED, ST_MERGED, 16, 0, 0}, 1, 256, 2, 64, 1},
        {{ST_STRIDED, ST_MULTIHEAD, 10, 0, 0}, 0, 123, 4, 32, 2},
        {{ST_STRIDED, ST_MERGED, 1, 0, 0}, 0, 40, 1, 32, 1},
        {{ST_STRIDED, ST_INTERLEAVED, 5, 0, 0}, 1, 5, 1, 64, 1},
        // fixed: block steps, summary groups per head, c and l not powers of two
        {{ST_FIXED, ST_INTERLEAVED, 20, 3, 2}, 0, 130, 2, 32, 2},
        {{ST_FIXED, ST_INTERLEAVED, 20, 3, 2}, 1, 130, 2, 32, 2},
        {{ST_FIXED, ST_MERGED, 24, 5, 3}, 0, 200, 3, 64, 1},
        {{ST_FIXED, ST_MERGED, 64, 16, 2}, 0, 300, 2, 32, 1},
        {{ST_FIXED, ST_MERGED, 6, 2, 3}, 0, 17, 3, 128, 2},
        {{ST_FIXED, ST_MULTIHEAD, 15, 4, 2}, 0, 111, 4, 32, 2},
        {{ST_FIXED, ST_MERGED, 7, 7, 1}, 0, 50, 1, 32, 1},
        // local: one step whatever the combination; a window below, at and above the tile size
        {{ST_LOCAL, ST_MERGED, 5, 0, 0}, 0, 77, 2, 64, 2},
        {{ST_LOCAL, ST_MULTIHEAD, 32, 0, 0}, 1, 100, 1, 32, 1},
        {{ST_LOCAL, ST_INTERLEAVED, 45, 0, 0}, 1, 200, 2, 128, 1},
        // dilated: one step in the transposed order; a window that ends inside a column and one that spans it
        {{ST_DILATED, ST_MERGED, 3, 0, 0}, 0, 30, 1, 32, 1},
        {{ST_DILATED, ST_MULTIHEAD, 6, 0, 0}, 1, 150, 2, 64, 2},
        {{ST_DILATED, ST_INTERLEAVED, 13, 0, 0}, 0, 300, 2, 128, 1},
    };
    const int had_verdict = verdict[0] != 0;
    for (int p = 0; p < 2; p++) {
        if (only_precision >= 0 && p != only_precision) continue;
        st_set_precision((StPrecision)p);
        // every case in the API's (B, H, T, D); also in the model's rows (StLayout), on the same inputs
        // (the kernels then do the same sums): every case in float32, every third in TF32 (the GPU's
        // default; the emulated tensor cores are slow)
        uint64_t seeds[sizeof cases / sizeof cases[0]];
        for (int in_rows = 0; in_rows <= 1; in_rows++)
            for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
                if (!in_rows) seeds[i] = rng_state;
                else rng_state = seeds[i];
                if (!in_rows || p == ST_FP32 || i % 3 == 0) run_case(&cases[i], in_rows);
            }
    }
    st_set_precision(ST_FP32);
    // Hints from which cases failed: they say where to look.
    if (had_verdict || !verdict[0]) return;
    size_t len = strlen(verdict);
    if (tally.fwd_fail_beyond && !tally.fwd_fail_one_tile && tally.fwd_pass_one_tile)
        len += snprintf(verdict + len, sizeof verdict - len, ". The forward is right wherever a row's keys fit in one "
                        "key tile (n <= %d) and wrong beyond: look at what carries a row from one key tile to the next "
                        "(the running max, the running sum, the rescale alpha)", TILE);
    else if (tally.fwd_fail_merged && !tally.fwd_fail_other)
        len += snprintf(verdict + len, sizeof verdict - len, ". The forward is wrong only in merged heads, whose two "
                        "steps run one after the other: look at how the second step's result merges into the first's "
                        "(the log-sum-exp rule)");
    if (tally.bwd_fail_too && len < sizeof verdict)
        snprintf(verdict + len, sizeof verdict - len, ". Where the forward is wrong the backward fails too: it reads the "
                 "forward's out and lse");
}

// At a realistic size (n = 16384, l = 128 = sqrt(n), the paper's c = 32) the tile edges are small next
// to a query's l + n/l keys, so the work must be within 3x the allowed pairs for every pattern (2x
// for the diagonal triangle of tiles, the rest for the edges); an O(n^2) layout would be 40x here.
// Only the layout is built (no kernel runs): it is what decides the work.
static void test_work_at_scale(void) {
    const int n = 16384, H = 4;
    const StPattern patterns[] = {
        {ST_DENSE, ST_INTERLEAVED, 0, 0, 0},   {ST_STRIDED, ST_INTERLEAVED, 128, 0, 0},
        {ST_STRIDED, ST_MERGED, 128, 0, 0},    {ST_STRIDED, ST_MULTIHEAD, 128, 0, 0},
        {ST_STRIDED, ST_MERGED, 100, 0, 0},    {ST_FIXED, ST_INTERLEAVED, 128, 32, 1},
        {ST_FIXED, ST_MERGED, 128, 32, 4},     {ST_FIXED, ST_MULTIHEAD, 128, 32, 2},
        {ST_FIXED, ST_MERGED, 100, 7, 3},      {ST_LOCAL, ST_MERGED, 128, 0, 0},
        {ST_DILATED, ST_MERGED, 128, 0, 0},    {ST_DILATED, ST_MERGED, 40, 0, 0},
    };
    for (size_t t = 0; t < sizeof patterns / sizeof patterns[0]; t++) {
        const StPattern *p = &patterns[t];
        const int two_steps = p->kind == ST_STRIDED || p->kind == ST_FIXED;
        for (int layer = 0; layer < (p->combine == ST_INTERLEAVED && two_steps ? 2 : 1); layer++) {
            StAttention *att = st_attention_create(p, layer, n, H, 64);
            const StAttentionStats s = st_attention_stats(att);
            long expected = 0;
            for (int h = 0; h < H; h++) expected += expected_pairs(p, n, layer, h);
            const double ratio = s.pairs_computed / s.pairs_allowed;
            check(s.pairs_allowed == (double)expected && ratio <= 3.0,
                  "work at n=%d %s/%s l=%d c=%d G=%d layer %d: allowed %.0f (expected %ld), computed %.2fx",
                  n, st_pattern_kind_name(p->kind), st_combine_name(p->combine), p->stride, p->summary,
                  p->groups, layer, s.pairs_allowed, expected, ratio);
            st_attention_free(att);
        }
    }
}

// ----------------------------------------------------------------------------
// 4. Data files, mu-law, synthetic data

static char temp_dir[64];

static void write_raw(const char *path, const unsigned char *bytes, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(bytes, 1, n, f) != n) { perror(path); exit(1); }
    fclose(f);
}
static unsigned char *read_raw(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = malloc(*n + 1);
    if (fread(b, 1, *n, f) != *n) { perror(path); exit(1); }
    fclose(f);
    return b;
}

static const char *load_checkpoint(const char *path) {
    StTrainState st;
    StModelConfig sc;
    const char *err;
    StModel *m = st_checkpoint_load(path, &st, &sc, &err);
    st_model_free(m);
    return m ? NULL : err;
}
static const char *load_data(const char *path) {
    StDataInfo info;
    const char *err;
    free(st_data_load(path, &info, &err));
    return err;
}

// Every byte of a file's header changed to four other values, one at a time (1024 files for a
// checkpoint): each is loaded or refused with a message that names the file, and none crashes (CI
// runs this under AddressSanitizer and UndefinedBehaviorSanitizer too). The fuzzers (tools/fuzz/)
// go further; this is the exhaustive single-byte part, in every test run.
static void test_header_mutations(const char *what, const char *good, unsigned char *file, size_t size, int header,
                                  const char *bad, const char *(*load)(const char *)) {
    int loaded = 0, refused = 0, unnamed = 0;
    for (int offset = 0; offset < header; offset++) {
        const unsigned char original = file[offset], values[4] = {original ^ 0x01, original ^ 0x80, 0x00, 0xff};
        for (int k = 0; k < 4; k++) {
            if (values[k] == original) continue;
            file[offset] = values[k];
            write_raw(bad, file, size);
            const char *err = load(bad);
            if (!err) loaded++;
            else if (strstr(err, bad)) refused++;
            else unnamed++;
        }
        file[offset] = original;
    }
    check(unnamed == 0 && refused > 0 && load(good) == NULL, "%s header, every byte changed: %d loaded, %d refused "
          "with a message naming the file, %d without, no crash", what, loaded, refused, unnamed);
}

// Every kind of data file written and read back: the same description, the same bytes.
static void test_data_round_trip(void) {
    const StDataInfo kinds[] = {
        {ST_TEXT, 0, 0, 0, 0, 1000}, {ST_IMAGE, 2, 3, 3, 0, 4 * 18}, {ST_AUDIO, 0, 0, 0, 8000, 777}};
    for (int k = 0; k < 3; k++) {
        char path[128];
        snprintf(path, sizeof path, "%s/round_trip.bin", temp_dir);
        unsigned char *bytes = malloc(kinds[k].n_bytes);
        for (size_t i = 0; i < kinds[k].n_bytes; i++) bytes[i] = (unsigned char)(uniform() * 128 + 128);
        const char *err = st_data_write(path, &kinds[k], bytes);
        StDataInfo back;
        const char *load_err = NULL;
        unsigned char *loaded = err ? NULL : st_data_load(path, &back, &load_err);
        const int same = loaded && back.kind == kinds[k].kind && back.height == kinds[k].height &&
                         back.width == kinds[k].width && back.channels == kinds[k].channels &&
                         back.sample_rate == kinds[k].sample_rate && back.n_bytes == kinds[k].n_bytes &&
                         memcmp(loaded, bytes, back.n_bytes) == 0;
        check(same, "data file round trip, %s: %s", st_data_kind_name(kinds[k].kind),
              err ? err : load_err ? load_err : "same description and bytes");
        free(bytes);
        free(loaded);
    }
}

// A damaged copy of a good file is rejected with a message that says what is wrong.
static void test_data_rejections(void) {
    char good[128], bad[128], missing[128];
    snprintf(good, sizeof good, "%s/good.bin", temp_dir);
    snprintf(bad, sizeof bad, "%s/bad.bin", temp_dir);
    snprintf(missing, sizeof missing, "%s/missing.bin", temp_dir);
    const StDataInfo image = {ST_IMAGE, 4, 4, 1, 0, 64};
    unsigned char pixels[64];
    for (int i = 0; i < 64; i++) pixels[i] = (unsigned char)(uniform() * 100 + 100);
    if (st_data_write(good, &image, pixels)) { check(0, "writing the fixture"); return; }
    size_t n;
    unsigned char *file = read_raw(good, &n);
    const struct { const char *what; size_t offset; int value; long size_change; const char *expect; } cases[] = {
        {"bad magic", 0, 'X', 0, "not a data file"},
        {"unknown version", 8, 7, 0, "version"},
        {"unknown kind", 12, 9, 0, "corrupt header"},
        {"zero height", 16, 0, 0, "corrupt header"},
        {"truncated", 0, -1, -1, "truncated"},
        {"too long", 0, -1, +1, "too long"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        unsigned char *copy = malloc(n + 1);
        memcpy(copy, file, n);
        copy[n] = 0;
        if (cases[c].value >= 0) copy[cases[c].offset] = (unsigned char)cases[c].value;
        write_raw(bad, copy, n + cases[c].size_change);
        StDataInfo info;
        const char *err = st_data_read_info(bad, &info);
        check(err && strstr(err, cases[c].expect), "data file with %s rejected: %s", cases[c].what,
              err ? err : "(accepted)");
        free(copy);
    }
    StDataInfo info;
    const char *err = st_data_read_info(missing, &info);
    check(err && strstr(err, "cannot open"), "missing data file rejected: %s", err ? err : "(accepted)");
    const StDataInfo ragged = {ST_IMAGE, 4, 4, 1, 0, 60};
    err = st_data_write(bad, &ragged, pixels);
    check(err != NULL, "writing 60 bytes as 4 x 4 images refused: %s", err ? err : "(accepted)");
    test_header_mutations("data file", good, file, n, ST_DATA_HEADER_BYTES, bad, load_data);
    free(file);
}

// Companding: every byte survives decode then encode, and every sample in [-1, 1] comes back within
// its quantisation cell. Bytes are levels of y = ln(1 + 255|x|) / ln 256 spaced 2/255 apart, so
// |y - y_q| <= 1/255; x = (256^|y| - 1) / 255 is convex in |y|, so the error in x is at most
// 1/255 times its slope at the cell's outer edge: ln(256) / 255 * 256^(|y_q| + 1/255).
static void test_mulaw(void) {
    int bytes_ok = 1, monotonic = 1;
    double worst = 0;
    for (int b = 0; b < 256; b++) {
        bytes_ok &= st_mulaw_encode(st_mulaw_decode((unsigned char)b)) == b;
        if (b > 0) monotonic &= st_mulaw_decode((unsigned char)b) > st_mulaw_decode((unsigned char)(b - 1));
    }
    for (int i = 0; i <= 20000; i++) {
        const double x = -1.0 + i / 10000.0;
        const unsigned char q = st_mulaw_encode((float)x);
        const double y_q = fabs(q / 127.5 - 1.0);
        const double bound = 1.0 / 255.0 * log(256.0) / 255.0 * pow(256.0, y_q + 1.0 / 255.0) + 1e-6;
        const double err = fabs(st_mulaw_decode(q) - x) / bound;
        if (err > worst) worst = err;
    }
    check(bytes_ok && monotonic && worst <= 1.0 && st_mulaw_encode(-1.0f) == 0 && st_mulaw_encode(1.0f) == 255,
          "mu-law: bytes round trip %s, decode increasing %s, samples within %.2f of their cell's bound",
          bytes_ok ? "yes" : "NO", monotonic ? "yes" : "NO", worst);
}

// The synthetic source: deterministic in its seed, and built as documented (copies one period back,
// noise at the stated rate, a newline ending each line, letters and spaces only).
static void test_synthetic(void) {
    const size_t n = 200000;
    const int period = 100;
    const double noise = 0.1;
    unsigned char *a = malloc(n), *b = malloc(n), *c = malloc(n);
    st_synthetic(a, n, period, noise, 42);
    st_synthetic(b, n, period, noise, 42);
    st_synthetic(c, n, period, noise, 43);
    size_t copies = 0, positions = 0, bad_newlines = 0, bad_letters = 0;
    for (size_t t = 0; t < n; t++) {
        const int newline_slot = t % period == (size_t)period - 1;
        bad_newlines += newline_slot != (a[t] == '\n');
        bad_letters += !newline_slot && !(a[t] == ' ' || (a[t] >= 'a' && a[t] <= 'z'));
        if (t >= (size_t)period && !newline_slot) positions++, copies += a[t] == a[t - period];
    }
    // a byte equals the one a period back unless noise struck and drew another of the 27 symbols
    const double expected = 1.0 - noise * 26.0 / 27.0, measured = (double)copies / positions;
    check(memcmp(a, b, n) == 0 && memcmp(a, c, n) != 0, "synthetic data: same seed same bytes, other seed other bytes");
    check(bad_newlines == 0 && bad_letters == 0 && fabs(measured - expected) < 0.005,
          "synthetic data: %.4f of bytes repeat the line above (expected %.4f), %zu misplaced newlines, %zu "
          "bytes outside the alphabet", measured, expected, bad_newlines, bad_letters);
    check(st_synthetic_entropy(period, 0.0) == 0.0 &&
          fabs(st_synthetic_entropy(period, 1.0) - log2(27.0) * (period - 1) / period) < 1e-12,
          "synthetic entropy: 0 without noise, log2(27) per letter with only noise");
    free(a);
    free(b);
    free(c);
}

static void test_data(void) {
    test_data_round_trip();
    test_data_rejections();
    test_mulaw();
    test_synthetic();
}

// Fixture files go to a fresh temporary folder, removed at the end.
static void make_temp_dir(void) {
    strcpy(temp_dir, "/tmp/test_kernels_XXXXXX");
    if (!mkdtemp(temp_dir)) { perror("mkdtemp"); exit(1); }
}
static void remove_temp_dir(void) {
    const char *files[] = {"round_trip.bin", "good.bin", "bad.bin", "model.bin"};
    for (int i = 0; i < 4; i++) {
        char path[128];
        snprintf(path, sizeof path, "%s/%s", temp_dir, files[i]);
        remove(path);
    }
    rmdir(temp_dir);
}

// ----------------------------------------------------------------------------
// 5. The model

static StModelConfig tiny_config(StPattern pattern, int recompute, float dropout) {
    StModelConfig c = {64, 64, 2, 2, 4, pattern, dropout, recompute, ST_TEXT, 0, 0, 0, 0};
    return c;
}

// Random bytes with some structure (not zeros), and the next byte as target.
static void random_batch(unsigned char *inputs, unsigned char *targets, int B, int T) {
    for (int i = 0; i < B * T + 1; i++) {
        const unsigned char byte = (unsigned char)(97 + (int)((uniform() + 1.0) * 6.0));
        if (i < B * T) inputs[i] = byte;
        if (i > 0) targets[i - 1] = byte;
    }
}

// The mean loss of one forward (st_model_loss waits for the device).
static double forward_loss(StModel *m, const unsigned char *inputs, const unsigned char *targets, int B, int training,
                           unsigned long long seed) {
    st_model_forward(m, inputs, targets, B, training, seed);
    return st_model_loss(m);
}

// Every tensor's gradient against a central difference of the loss along a direction u in that
// tensor's own coordinates: (L(p + eps u) - L(p - eps u)) / (2 eps) = g . u + O(eps^2).
// u mixes g / |g| (largest signal: a gradient wrong in size or direction changes g . u) with a random
// unit vector (so a gradient missing altogether is caught too). The parameters are first randomised:
// at initialisation the output weights are 0 and most gradients would be 0 too.
// Tolerance: relative 5e-3 of |g . u|, or 1e-4 absolute. In float32 the loss (about 5.5) carries
// rounding of about 1e-6, which eps = 1e-2 turns into 5e-5 on the difference quotient; the O(eps^2)
// curvature term is about 1e-4 relative. Measured: at most 4e-4 relative. A missing or wrong term in
// a backward formula errs by 1% or more.
// The operation a tensor belongs to, by its name (st_model_tensor: "wte", "h1.fcw", "lnfw", ...).
static const char *tensor_operation(const char *name) {
    static const struct { const char *suffix, *operation; } ops[] = {
        {"ln1w", "a layer norm"}, {"ln1b", "a layer norm"}, {"ln2w", "a layer norm"}, {"ln2b", "a layer norm"},
        {"lnfw", "the final layer norm"}, {"lnfb", "the final layer norm"}, {"qkvw", "the q, k, v product"},
        {"qkvb", "the q, k, v product"}, {"projw", "the attention's output product"},
        {"projb", "the attention's output product"}, {"fcw", "the MLP's first product (before the GELU)"},
        {"fcb", "the MLP's first product (before the GELU)"}, {"fc2w", "the MLP's second product (after the GELU)"},
        {"fc2b", "the MLP's second product (after the GELU)"}, {"outw", "the output logits"}};
    const char *dot = strchr(name, '.'), *suffix = dot ? dot + 1 : name;
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
        if (strcmp(suffix, ops[i].suffix) == 0) return ops[i].operation;
    return "the embeddings";
}

// The verdict for gradients that are off: which tensors, and what they have in common. The tensors
// are in the forward's order, so the backward reaches them last to first: when the off ones are
// exactly the first k, the gradient is right down to tensor k and wrong from tensor k - 1 back.
static void gradient_verdict(const char *what, char (*names)[32], const int *off, int n, int bad) {
    int k = 0;
    while (k < n && off[k]) k++;
    int prefix = k > 0 && k < n;
    for (int t = k; t < n; t++) prefix = prefix && !off[t];
    if (prefix) {
        set_verdict("model gradients wrong (%s): %d of %d tensors off, every one upstream of %s and none from it "
                    "on: the gradient is right down to %s and wrong from %s back, so the fault is in the backward "
                    "between them, through %s or what comes just before it", what, bad, n, names[k], names[k],
                    names[k - 1], tensor_operation(names[k]));
        return;
    }
    char list[384] = "";
    size_t len = 0;
    int listed = 0;
    for (int t = 0; t < n && len < sizeof list; t++)
        if (off[t] && listed++ < 8) len += snprintf(list + len, sizeof list - len, "%s%s", listed > 1 ? ", " : "", names[t]);
    const char *common = NULL; // the operation every off tensor belongs to, if they share one
    for (int t = 0; t < n; t++)
        if (off[t]) common = !common || strcmp(common, tensor_operation(names[t])) == 0 ? tensor_operation(names[t]) : "";
    set_verdict("model gradients wrong (%s): %d of %d tensors off: %s%s%s%s", what, bad, n, list, bad > 8 ? ", ..." : "",
                common && common[0] ? "; all of them parameters of " : "", common && common[0] ? common : "");
}

// A model made with `seed` whose parameters are then moved by 0.1 uniform noise (at initialisation the
// output weights are 0, and most gradients would be too); *params gets them (malloc'd, the caller frees).
static StModel *perturbed_model(StModelConfig cfg, unsigned long long seed, float **params) {
    StModel *m = st_model_create(&cfg, seed);
    const size_t n = st_model_num_params(m);
    float *p = malloc(n * sizeof(float));
    st_model_get(m, ST_PARAMS, p);
    for (size_t i = 0; i < n; i++) p[i] += 0.1f * (float)uniform();
    st_model_set(m, ST_PARAMS, p);
    *params = p;
    return m;
}

static void check_model_gradients(const char *what, StModelConfig cfg) {
    const int B = 2, T = cfg.ctx;
    float *p;
    StModel *m = perturbed_model(cfg, 7, &p);
    const size_t n = st_model_num_params(m);
    float *g = malloc(n * sizeof(float)), *q = malloc(n * sizeof(float));
    unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
    random_batch(inputs, targets, B, T);
    const unsigned long long seed = 99;
    const double loss0 = forward_loss(m, inputs, targets, B, 1, seed);
    st_model_backward(m);
    st_model_get(m, ST_GRADS, g);
    if (!isfinite(loss0)) { // nothing below can be measured: say so, in the terms of the forward
        set_verdict("model forward wrong (%s): the loss is %s before any gradient is taken: the forward gives "
                    "NaN or infinity somewhere (a 0 / 0, an exp of inf - inf, or an unwritten output)", what,
                    isnan(loss0) ? "NaN" : "infinite");
        check(0, "model gradients, %s: the forward's loss is %g", what, loss0);
        st_model_free(m);
        free(p), free(g), free(q), free(inputs), free(targets);
        return;
    }
    int bad = 0, not_numbers = 0; // tensors off; of them, those whose gradient holds NaN or infinity
    char first_nan[48] = "";
    double worst = 0;
    char worst_name[64] = "";
    const int n_tensors = st_model_num_tensors(m);
    char (*names)[32] = malloc(n_tensors * sizeof *names);
    int *off = calloc(n_tensors, sizeof(int));
    for (int t = 0; t < n_tensors; t++) {
        size_t offset, size;
        const char *name = st_model_tensor(m, t, &offset, &size);
        snprintf(names[t], sizeof names[t], "%s", name);
        double gnorm = 0, rnorm = 0;
        double *u = malloc(size * sizeof(double)), *r = malloc(size * sizeof(double));
        for (size_t i = 0; i < size; i++) r[i] = uniform(), rnorm += r[i] * r[i], gnorm += (double)g[offset + i] * g[offset + i];
        gnorm = sqrt(gnorm), rnorm = sqrt(rnorm);
        if (!isfinite(gnorm)) { // NaN or infinity in the gradient: off, and named so
            not_numbers++, snprintf(first_nan, sizeof first_nan, "%s", name); // the last: the backward's first
            bad++, off[t] = 1;
            free(u), free(r);
            continue;
        }
        double unorm = 0, gu = 0;
        for (size_t i = 0; i < size; i++) u[i] = (gnorm > 0 ? g[offset + i] / gnorm : 0) + r[i] / rnorm, unorm += u[i] * u[i];
        unorm = sqrt(unorm);
        for (size_t i = 0; i < size; i++) u[i] /= unorm, gu += u[i] * g[offset + i];
        const double eps = 1e-2;
        double loss[2];
        for (int side = 0; side < 2; side++) {
            memcpy(q, p, n * sizeof(float));
            for (size_t i = 0; i < size; i++) q[offset + i] += (float)((side ? -eps : eps) * u[i]);
            st_model_set(m, ST_PARAMS, q);
            loss[side] = forward_loss(m, inputs, targets, B, 1, seed);
        }
        const double fd = (loss[0] - loss[1]) / (2 * eps), err = fabs(fd - gu);
        const double of_tolerance = err / fmax(5e-3 * fabs(gu), 1e-4);
        if (of_tolerance > worst)
            worst = of_tolerance, snprintf(worst_name, sizeof worst_name, "%s (g.u %.4e, difference quotient %.4e)", name, gu, fd);
        if (!isfinite(of_tolerance)) not_numbers++, snprintf(first_nan, sizeof first_nan, "%s (its loss)", name);
        if (!(of_tolerance <= 1.0)) {
            bad++, off[t] = 1;
            if (verbose) printf("     %s: the gradient along u, g.u = %.6e; the loss's difference quotient along u %.6e\n", name, gu, fd);
        }
        free(u);
        free(r);
    }
    if (not_numbers) {
        char nan_what[160];
        snprintf(nan_what, sizeof nan_what, "%s; NaN or infinity in the gradient of %d of them, the first the "
                 "backward reaches %s", what, not_numbers, first_nan);
        gradient_verdict(nan_what, names, off, n_tensors, bad);
    } else if (bad) {
        gradient_verdict(what, names, off, n_tensors, bad);
    }
    check(bad == 0, "model gradients, %s: %d of %d tensors off (%d of them NaN or infinite); the worst finite one "
          "%.3f times its tolerance%s%s", what, bad, n_tensors, not_numbers, worst, worst_name[0] ? ", " : "", worst_name);
    free(names), free(off);
    st_model_free(m);
    free(p), free(g), free(q), free(inputs), free(targets);
}

static void test_model_gradients(void) {
    const StPattern dense = {ST_DENSE, ST_INTERLEAVED, 8, 0, 0};
    const StPattern strided = {ST_STRIDED, ST_MERGED, 8, 0, 0};
    const StPattern strided_i = {ST_STRIDED, ST_INTERLEAVED, 8, 0, 0};
    const StPattern fixed_m = {ST_FIXED, ST_MULTIHEAD, 16, 4, 2};
    const StPattern fixed = {ST_FIXED, ST_MERGED, 16, 3, 2};
    check_model_gradients("dense", tiny_config(dense, 0, 0));
    check_model_gradients("strided/merged", tiny_config(strided, 0, 0));
    check_model_gradients("strided/interleaved", tiny_config(strided_i, 0, 0));
    check_model_gradients("fixed/multihead", tiny_config(fixed_m, 0, 0));
    check_model_gradients("fixed/merged, dropout 0.1", tiny_config(fixed, 0, 0.1f));
    check_model_gradients("strided/merged, recompute, dropout 0.1", tiny_config(strided, 1, 0.1f));
    check_model_gradients("local", tiny_config((StPattern){ST_LOCAL, ST_MERGED, 8, 0, 0}, 0, 0));
    check_model_gradients("dilated", tiny_config((StPattern){ST_DILATED, ST_MERGED, 5, 0, 0}, 0, 0));
}

// The gradient's column sums (biases, layer norms) in chunks, as a GPU does them (two passes, section 7
// of the .cu), here on the CPU: chunks of 5 rows (26 chunks of the 128 rows, the last one short). Every
// gradient tensor must agree with the one-chunk sums of the CPU build, which the central differences
// above check. Reordering a float sum of n = 128 terms moves it by at most about n u = 8e-6 of the sum
// of the terms' magnitudes, and norm-wise over a tensor by far less. Tolerance 1e-5; a chunk left out
// or counted twice errs by about 1/26 or more.
static void test_chunked_sums(void) {
    const StPattern strided = {ST_STRIDED, ST_MERGED, 8, 0, 0};
    StModelConfig cfg = tiny_config(strided, 0, 0);
    const int B = 2, T = cfg.ctx;
    StModel *m = st_model_create(&cfg, 7);
    const size_t n = st_model_num_params(m);
    float *g[2] = {malloc(n * sizeof(float)), malloc(n * sizeof(float))};
    st_model_get(m, ST_PARAMS, g[0]); // random parameters (a new model's output layer is zero: no gradient)
    for (size_t i = 0; i < n; i++) g[0][i] += 0.1f * (float)uniform();
    st_model_set(m, ST_PARAMS, g[0]);
    unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
    random_batch(inputs, targets, B, T);
    for (int chunked = 0; chunked < 2; chunked++) {
        st_model_set_chunk_rows(m, chunked ? 5 : 0);
        st_model_forward(m, inputs, targets, B, 1, 3);
        st_model_backward(m);
        st_model_get(m, ST_GRADS, g[chunked]);
    }
    double worst = 0;
    int zero = 0; // tensors without a gradient: none may be, or the comparison proves nothing
    for (int t = 0; t < st_model_num_tensors(m); t++) {
        size_t offset, size;
        st_model_tensor(m, t, &offset, &size);
        double diff = 0, norm = 0;
        for (size_t i = offset; i < offset + size; i++) {
            diff += ((double)g[1][i] - g[0][i]) * ((double)g[1][i] - g[0][i]);
            norm += (double)g[0][i] * g[0][i];
        }
        if (norm > 0) worst = fmax(worst, sqrt(diff / norm));
        else zero++;
    }
    check(worst < 1e-5 && zero == 0, "column sums in chunks of 5 rows (a GPU's two passes): every gradient tensor "
          "as with one chunk, worst %.1e relative (tolerance 1e-5); %d tensors without a gradient", worst, zero);
    st_model_free(m);
    free(g[0]), free(g[1]), free(inputs), free(targets);
}

// The model in TF32 (every matrix product on the tensor cores, cuBLAS included) against the same model
// in float32, whose gradients the central differences above check: loss and every tensor's gradient.
// (Central differences cannot check TF32 gradients directly: rounding each operand to 10 bits moves
// the loss by about 1e-4, which a step of 1e-2 turns into 1e-2 of noise on the difference quotient.)
// Each product errs by up to about 2u relative (see TOL_FORWARD_TF32), and a forward and backward
// through 2 blocks chains about 10 of them, whose independent errors add up as sqrt(10): about 6u at
// worst per gradient tensor (norm of the difference over norm of the float32 gradient); the loss, a
// mean over B T = 128 bytes with independent errors, by about 2u / sqrt(128) = u/6. Measured here, with
// operands rounded to nearest: gradients 1.5u to 1.8u, loss 0.015u. cuBLAS on a GPU may instead drop the
// low 13 bits (truncation, as a tensor core does with unrounded operands): errors then all lean one way
// and do not average out in the mean (emulated here: gradients 3.7u, loss 0.1u). Tolerances 8u and u/2;
// a dropped term or a wrong scale errs by 10% or more.
static void test_model_tf32(void) {
    const StPattern patterns[] = {{ST_STRIDED, ST_MERGED, 8, 0, 0}, {ST_FIXED, ST_MULTIHEAD, 16, 4, 2}};
    for (size_t k = 0; k < sizeof patterns / sizeof patterns[0]; k++) {
        StModelConfig cfg = tiny_config(patterns[k], (int)k, 0.1f);
        const int B = 2, T = cfg.ctx;
        StModel *m = st_model_create(&cfg, 17);
        const size_t n = st_model_num_params(m);
        float *p = malloc(n * sizeof(float)), *g[2] = {malloc(n * sizeof(float)), malloc(n * sizeof(float))};
        st_model_get(m, ST_PARAMS, p);
        for (size_t i = 0; i < n; i++) p[i] += 0.1f * (float)uniform();
        st_model_set(m, ST_PARAMS, p);
        unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
        random_batch(inputs, targets, B, T);
        double loss[2];
        for (int prec = 0; prec < 2; prec++) {
            st_set_precision((StPrecision)prec);
            loss[prec] = forward_loss(m, inputs, targets, B, 1, 5);
            st_model_backward(m);
            st_model_get(m, ST_GRADS, g[prec]);
        }
        st_set_precision(ST_FP32);
        double worst = 0;
        const char *worst_name = "";
        for (int t = 0; t < st_model_num_tensors(m); t++) {
            size_t offset, size;
            const char *name = st_model_tensor(m, t, &offset, &size);
            RelErr e = {0, 0};
            for (size_t i = offset; i < offset + size; i++) rel_add(&e, g[1][i], g[0][i]);
            if (rel_value(e) > worst) worst = rel_value(e), worst_name = name;
        }
        const double loss_err = fabs(loss[1] - loss[0]) / loss[0];
        check(loss_err < TF32_U / 2 && worst < 8 * TF32_U, "model in tf32 against fp32, %s/%s: loss %.1e, "
              "gradients %.1e relative (worst tensor %s)", st_pattern_kind_name(patterns[k].kind),
              st_combine_name(patterns[k].combine), loss_err, worst, worst_name);
        st_model_free(m);
        free(p), free(g[0]), free(g[1]), free(inputs), free(targets);
    }
}

// Recomputing each block in the backward must give the very gradients of storing its activations:
// the same operations on the same numbers, with the same dropout masks (drawn from a hash, not stored).
static void test_recompute_equal(void) {
    const StPattern strided = {ST_STRIDED, ST_MERGED, 8, 0, 0};
    const int B = 2, T = 64;
    unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
    random_batch(inputs, targets, B, T);
    float *g[2];
    for (int r = 0; r < 2; r++) {
        StModelConfig cfg = tiny_config(strided, r, 0.2f);
        StModel *m = st_model_create(&cfg, 3);
        g[r] = malloc(st_model_num_params(m) * sizeof(float));
        st_model_forward(m, inputs, targets, B, 1, 5);
        st_model_backward(m);
        st_model_get(m, ST_GRADS, g[r]);
        if (r == 1) {
            const size_t n = st_model_num_params(m);
            check(memcmp(g[0], g[1], n * sizeof(float)) == 0 &&
                      st_model_activation_bytes(m, B, 1) < st_model_activation_bytes(m, B, 0),
                  "recompute with dropout: gradients identical to stored activations; activations %zu vs %zu bytes",
                  st_model_activation_bytes(m, B, 1), st_model_activation_bytes(m, B, 0));
        }
        st_model_free(m);
    }
    free(g[0]), free(g[1]), free(inputs), free(targets);
}

// A model's activations are laid out for the largest batch it has seen; a smaller batch after it (the
// last batch of an evaluation) must still score each window against its own targets. The loss of B
// windows equals the mean of the same windows' losses computed one by one by a twin model that only
// ever saw batches of 1, for every B up to the allocated 4, with and without recompute. The
// parameters are randomised first: at initialisation the output weights are 0, every prediction is
// uniform and any target gives ln 256. Tolerance 1e-6 relative: the per-window sums are the same
// float32 operations; only the host's double sum of the B T losses differs in order. A window scored
// against another window's bytes moves the loss by 1e-3 or more.
static void test_partial_batch(void) {
    const StPattern fixed = {ST_FIXED, ST_MERGED, 8, 2, 1};
    const int full = 4;
    for (int recompute = 0; recompute < 2; recompute++) {
        StModelConfig cfg = tiny_config(fixed, recompute, 0);
        const int T = cfg.ctx;
        StModel *m = st_model_create(&cfg, 13), *one = st_model_create(&cfg, 13);
        const size_t n = st_model_num_params(m);
        float *p = malloc(n * sizeof(float));
        st_model_get(m, ST_PARAMS, p);
        for (size_t i = 0; i < n; i++) p[i] += 0.1f * (float)uniform();
        st_model_set(m, ST_PARAMS, p), st_model_set(one, ST_PARAMS, p);
        unsigned char *inputs = malloc(full * T), *targets = malloc(full * T);
        random_batch(inputs, targets, full, T);
        double alone[4], worst = 0;
        for (int b = 0; b < full; b++) alone[b] = forward_loss(one, inputs + b * T, targets + b * T, 1, 0, 0);
        st_model_forward(m, inputs, targets, full, 0, 0); // lays the activations out for 4
        for (int B = 1; B <= full; B++) {
            double mean = 0;
            for (int b = 0; b < B; b++) mean += alone[b] / B;
            const double got = forward_loss(m, inputs, targets, B, 0, 0);
            worst = fmax(worst, fabs(got - mean) / mean);
        }
        check(worst < 1e-6, "a batch of 1..%d windows after one of %d%s: loss = mean of the windows' own losses "
              "(worst relative error %.1e)", full, full, recompute ? ", recompute" : "", worst);
        st_model_free(m), st_model_free(one);
        free(p), free(inputs), free(targets);
    }
}

// The update clips with the gradient's global norm, computed on the device: it equals the norm of
// st_model_get(ST_GRADS) summed in double on the host (1e-6 relative: float32 squares, summed in
// another order).
static void test_grad_norm(void) {
    StModelConfig cfg = tiny_config((StPattern){ST_STRIDED, ST_MERGED, 8, 0, 0}, 0, 0);
    const int B = 2, T = cfg.ctx;
    float *p;
    StModel *m = perturbed_model(cfg, 19, &p);
    const size_t n = st_model_num_params(m);
    unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
    random_batch(inputs, targets, B, T);
    st_model_forward(m, inputs, targets, B, 1, 3);
    st_model_backward(m);
    st_model_get(m, ST_GRADS, p);
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += (double)p[i] * p[i];
    st_model_update(m, 1e-3f, 0.01f, 0.5f, 1);
    const double norm = st_model_grad_norm(m), want = sqrt(sum);
    check(fabs(norm - want) <= 1e-6 * want, "the update's gradient norm, computed on the device: %.6f, on the host %.6f",
          norm, want);
    st_model_free(m);
    free(p), free(inputs), free(targets);
}

// AdamW's one launch over the parameter buffer equals AdamW in double on the host, entry by entry, for
// the first step (moments from 0, bias corrections 1 - beta): p -= lr (m^ / (sqrt(v^) + eps) + wd p),
// weight decay on matrices only (the tensors named w..., not the layer norms' weights; biases end in b).
// The step is about lr in size; storing p in float32 rounds it by at most half a unit in its last
// place (2^-24 |p|), and the step's own float32 arithmetic errs by about 1e-6 lr, so the change must
// match within 2^-23 |p| + 1e-5 lr. An entry left out is off by about lr (1e-3); a wrong decay flag by
// lr wd |p| = 5e-4 |p|: both thousands of times the tolerance.
static void test_adamw(void) {
    StModelConfig cfg = tiny_config((StPattern){ST_FIXED, ST_MERGED, 16, 3, 2}, 0, 0);
    const int B = 2, T = cfg.ctx;
    float *p;
    StModel *m = perturbed_model(cfg, 23, &p);
    const size_t n = st_model_num_params(m);
    float *g = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
    random_batch(inputs, targets, B, T);
    st_model_forward(m, inputs, targets, B, 1, 3);
    st_model_backward(m);
    st_model_get(m, ST_GRADS, g);
    const double lr = 1e-3, wd = 0.5, beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
    st_model_update(m, (float)lr, (float)wd, 0.0f, 1); // clip 0: no clipping
    st_model_get(m, ST_PARAMS, got);
    size_t bad = 0, worst_at = 0;
    double worst = 0;
    for (int t = 0; t < st_model_num_tensors(m); t++) {
        size_t offset, size;
        const char *name = st_model_tensor(m, t, &offset, &size);
        const char *dot = strchr(name, '.'), *suffix = dot ? dot + 1 : name; // "h0.qkvw" -> "qkvw"
        const int decay = suffix[0] == 'w' || (suffix[strlen(suffix) - 1] == 'w' && strncmp(suffix, "ln", 2) != 0);
        for (size_t i = offset; i < offset + size; i++) {
            const double mh = (1 - beta1) * g[i] / (1 - beta1), vh = (1 - beta2) * (double)g[i] * g[i] / (1 - beta2);
            const double want = -lr * (mh / (sqrt(vh) + eps) + (decay ? wd * p[i] : 0.0));
            const double err = fabs(((double)got[i] - p[i]) - want) / (ldexp(fabs(p[i]), -23) + 1e-5 * lr);
            if (!(err <= 1.0)) bad++;
            if (!(err <= worst)) worst = err, worst_at = i;
        }
    }
    check(bad == 0, "AdamW in one launch: %zu of %zu entries off a double-precision update beyond the tolerance "
          "(the worst %.3f times it, entry %zu)", bad, n, worst, worst_at);
    st_model_free(m);
    free(p), free(g), free(got), free(inputs), free(targets);
}

// A small model learns a fixed 64-byte string by heart: below 0.1 bits per byte within 400 steps.
static void test_overfit(void) {
    const char *text = "Sparse Transformers factorize attention: O(n sqrt n), not O(n^2).";
    const StPattern fixed = {ST_FIXED, ST_MERGED, 8, 2, 1};
    StModelConfig cfg = tiny_config(fixed, 0, 0);
    StModel *m = st_model_create(&cfg, 11);
    float bpb = 99;
    int step = 0;
    while (step < 400 && bpb >= 0.1f) {
        step++;
        bpb = (float)forward_loss(m, (const unsigned char *)text, (const unsigned char *)text + 1, 1, 1, 0) / logf(2.0f);
        st_model_backward(m);
        st_model_update(m, 3e-3f, 0.0f, 1.0f, step);
    }
    check(bpb < 0.1f, "overfits a 64-byte string: %.3f bits per byte after %d steps", bpb, step);
    st_model_free(m);
}

#define CKPT_PARAMS_AT 256 // the parameters follow the checkpoint's 256-byte header (docs/formats.md)

// Checkpoints: what is saved is what is loaded (every parameter and Adam moment, bit for bit; the
// configuration; the training state), and training on from a loaded checkpoint gives the very losses
// of a run that never stopped. Damaged checkpoints are refused with a message.
static void test_checkpoint(void) {
    const StPattern fixed = {ST_FIXED, ST_MULTIHEAD, 16, 4, 2};
    StModelConfig cfg = tiny_config(fixed, 0, 0.1f);
    const int B = 2, T = cfg.ctx, steps = 6, half = 3;
    unsigned char *inputs = malloc(B * T * steps), *targets = malloc(B * T * steps);
    for (int s = 0; s < steps; s++) random_batch(inputs + s * B * T, targets + s * B * T, B, T);
    float straight[6], resumed[6];
    StModel *a = st_model_create(&cfg, 21);
    for (int s = 0; s < steps; s++) {
        straight[s] = forward_loss(a, inputs + s * B * T, targets + s * B * T, B, 1, 100 + s);
        st_model_backward(a);
        st_model_update(a, 2e-3f, 0.01f, 1.0f, s + 1);
    }
    StModel *b = st_model_create(&cfg, 21);
    for (int s = 0; s < half; s++) {
        st_model_forward(b, inputs + s * B * T, targets + s * B * T, B, 1, 100 + s);
        st_model_backward(b);
        st_model_update(b, 2e-3f, 0.01f, 1.0f, s + 1);
    }
    char path[128];
    snprintf(path, sizeof path, "%s/model.bin", temp_dir);
    const StTrainState state = {half, 0x1234567890abcdefull, 21, steps, 2, B, 2e-3f, 0.01f, 1.0f};
    const char *err = st_checkpoint_save(path, b, &state);
    StTrainState loaded_state;
    StModelConfig loaded_cfg;
    StModel *c = err ? NULL : st_checkpoint_load(path, &loaded_state, &loaded_cfg, &err);
    int same = c != NULL && memcmp(&loaded_cfg, &cfg, sizeof cfg) == 0 && memcmp(&loaded_state, &state, sizeof state) == 0;
    const size_t n = st_model_num_params(b);
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    for (int buf = ST_PARAMS; c && buf <= ST_ADAM_V; buf++) {
        if (buf == ST_GRADS) continue;
        st_model_get(b, (StBuffer)buf, x);
        st_model_get(c, (StBuffer)buf, y);
        same = same && memcmp(x, y, n * sizeof(float)) == 0;
    }
    check(same, "checkpoint round trip: configuration, training state, parameters and Adam moments exact%s%s",
          err ? ": " : "", err ? err : "");
    for (int s = half; c && s < steps; s++) {
        resumed[s] = forward_loss(c, inputs + s * B * T, targets + s * B * T, B, 1, 100 + s);
        st_model_backward(c);
        st_model_update(c, 2e-3f, 0.01f, 1.0f, s + 1);
    }
    check(c && memcmp(straight + half, resumed + half, (steps - half) * sizeof(float)) == 0,
          "training on from a checkpoint repeats the uninterrupted run's losses bit for bit (%.6f %.6f %.6f)",
          straight[3], straight[4], straight[5]);
    // damaged copies
    size_t size;
    unsigned char *file = read_raw(path, &size);
    char bad[128];
    snprintf(bad, sizeof bad, "%s/bad.bin", temp_dir);
    const struct { const char *what; size_t offset; int value; long cut; const char *expect; } cases[] = {
        {"bad magic", 0, 'X', 0, "not a checkpoint"}, {"truncated", 0, -1, 4, "truncated"},
        {"zero heads", 24, 0, 0, "corrupt"}, {"unknown version", 8, 9, 0, "version"}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        if (cases[k].value >= 0) file[cases[k].offset] = (unsigned char)cases[k].value;
        write_raw(bad, file, size - cases[k].cut);
        StTrainState st;
        StModelConfig sc;
        StModel *d = st_checkpoint_load(bad, &st, &sc, &err);
        const char *said = d ? "(accepted)" : err ? err : "(no message)";
        check(d == NULL && err && strstr(err, cases[k].expect), "checkpoint with %s rejected: %s", cases[k].what, said);
        if (d) st_model_free(d);
        free(file);
        file = read_raw(path, &size);
    }
    memset(file + CKPT_PARAMS_AT, 0xff, 4); // the first parameter becomes NaN
    write_raw(bad, file, size);
    StTrainState st;
    StModelConfig sc;
    StModel *d = st_checkpoint_load(bad, &st, &sc, &err);
    check(d == NULL && err && strstr(err, "NaN"), "checkpoint with a NaN parameter rejected: %s",
          d ? "(accepted)" : err ? err : "(no message)");
    if (d) st_model_free(d);
    free(file);
    file = read_raw(path, &size);
    test_header_mutations("checkpoint", path, file, size, CKPT_PARAMS_AT, bad, load_checkpoint);
    file[31] = 0x37; // layers 0x37000002 (byte 31 is the top byte): crashed ./sample in st_model_create
    write_raw(bad, file, size);
    d = st_checkpoint_load(bad, &st, &sc, &err);
    check(d == NULL && err && strstr(err, "-layers"), "checkpoint with a billion layers rejected: %s",
          d ? "(accepted)" : err ? err : "(no message)");
    if (d) st_model_free(d);
    remove(path);
    remove(bad);
    free(file), free(x), free(y), free(inputs), free(targets);
    st_model_free(a), st_model_free(b);
    if (c) st_model_free(c);
}

// Decoding with cached keys and values gives the next-byte distribution of a full forward pass, at
// every position: prefill a prompt, then add the rest one byte at a time. Compared as log-probabilities;
// tolerance 1e-4: the two paths sum the same float32 terms in other orders (about 1e-6 each), through
// 2 layers and a softmax.
static void test_decode_matches_forward(void) {
    const StPattern patterns[] = {{ST_DENSE, ST_INTERLEAVED, 8, 0, 0}, {ST_STRIDED, ST_MERGED, 8, 0, 0},
                                  {ST_STRIDED, ST_INTERLEAVED, 6, 0, 0}, {ST_FIXED, ST_MERGED, 16, 3, 2},
                                  {ST_FIXED, ST_MULTIHEAD, 10, 2, 3}, {ST_LOCAL, ST_MERGED, 12, 0, 0},
                                  {ST_DILATED, ST_MERGED, 5, 0, 0}};
    for (size_t k = 0; k < sizeof patterns / sizeof patterns[0]; k++) {
        StModelConfig cfg = tiny_config(patterns[k], 0, 0);
        const int T = cfg.ctx, prompt = 10;
        StModel *m = st_model_create(&cfg, 5);
        const size_t n = st_model_num_params(m);
        float *p = malloc(n * sizeof(float)), *full = malloc((size_t)T * 256 * sizeof(float)), step[256];
        st_model_get(m, ST_PARAMS, p);
        for (size_t i = 0; i < n; i++) p[i] += 0.1f * (float)uniform();
        st_model_set(m, ST_PARAMS, p);
        unsigned char *text = malloc(T), *targets = malloc(T);
        random_batch(text, targets, 1, T);
        st_model_forward(m, text, NULL, 1, 0, 0);
        st_model_logits(m, full);
        double worst = 0;
        int nan_at = -1, nan_full = 0; // the first position whose log-probabilities are not numbers; which path
        for (int i = prompt - 1; i < T - 1; i++) {
            if (i == prompt - 1) st_model_prefill(m, text, prompt, step);
            else st_model_decode(m, text[i], i, step);
            double lse_a = 0, lse_b = 0;
            for (int v = 0; v < 256; v++) lse_a += exp(step[v]), lse_b += exp(full[(size_t)i * 256 + v]);
            for (int v = 0; v < 256; v++) {
                const double d = fabs((step[v] - log(lse_a)) - (full[(size_t)i * 256 + v] - log(lse_b)));
                if (!(d <= worst)) worst = d; // (a NaN stays)
                if (isnan(d) && nan_at < 0) nan_at = i, nan_full = !isfinite(lse_b);
            }
        }
        const char *kind = st_pattern_kind_name(patterns[k].kind), *combine = st_combine_name(patterns[k].combine);
        if (nan_at >= 0)
            set_verdict("cached decoding wrong (%s/%s): the next-byte log-probabilities of the %s are NaN, first at "
                        "position %d%s", kind, combine, nan_full ? "full forward" : "cached decoding", nan_at,
                        nan_at == prompt - 1 ? " (the prompt's last byte: the prefill)" : "");
        else if (!(worst < 1e-4))
            set_verdict("cached decoding wrong (%s/%s): its next-byte log-probabilities are %.1e from the full "
                        "forward's (tolerance 1e-4)", kind, combine, worst);
        check(worst < 1e-4, "cached decoding, %s/%s: next-byte log-probabilities of a full forward within %.1e",
              kind, combine, worst);
        st_model_free(m);
        free(p), free(full), free(text), free(targets);
    }
}

// The profiler books each launch, matrix product and copy under its name: after `steps` training steps
// of the tiny model (2 layers) with the profiler on, the table shows, per step, the calls that the
// model's code makes: layer norm forward 2 per layer + the final one = 5, the QKV product (W 192 x 64)
// 1 per layer = 2, the products by a W of 256 x 64 (the logits' and the MLP's first, 1 per layer) 3, the batch's upload 3 (tokens, their lists by byte, targets). A step
// run with the profiler off adds nothing; the times are >= 0 and add up to no more than the steps'
// wall clock (on the CPU the launches run one after another; on a GPU the events are in its queue).
// st_profile_reset forgets them: a forward after it books its own 5 layer norms, not 5 more.
static double profile_row(const char *table, const char *name, double *ms) {
    char line[256];
    const char *at = table;
    while (sscanf(at, "%255[^\n]", line) == 1) {
        double t, share, calls;
        int end = 0;
        if (sscanf(line, "%lf %lf%% %lf %n", &t, &share, &calls, &end) == 3 && strcmp(line + end, name) == 0) {
            *ms = t;
            return calls;
        }
        at = strchr(at, '\n');
        if (!at) break;
        at++;
    }
    *ms = -1.0;
    return 0.0;
}
static char *profile_table(int steps, double step_ms) {
    char path[128];
    snprintf(path, sizeof path, "%s/profile.txt", temp_dir);
    FILE *f = fopen(path, "w");
    st_profile_print(f, steps, step_ms);
    fclose(f);
    size_t n = 0;
    unsigned char *text = read_raw(path, &n);
    text = realloc(text, n + 1);
    text[n] = 0;
    return (char *)text;
}
static void test_profile(void) {
    const StPattern strided = {ST_STRIDED, ST_MERGED, 8, 0, 0};
    StModelConfig cfg = tiny_config(strided, 0, 0.0f);
    StModel *m = st_model_create(&cfg, 3);
    const int B = 2, T = 64, steps = 3;
    unsigned char *inputs = malloc(B * T), *targets = malloc(B * T);
    random_batch(inputs, targets, B, T);
    st_profile_reset();
    st_profile(1);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int s = 0; s < steps; s++) {
        st_model_forward(m, inputs, targets, B, 1, 5);
        st_model_backward(m);
        st_model_update(m, 1e-3f, 0.01f, 1.0f, s + 1);
        st_model_loss(m);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    st_profile(0);
    st_model_forward(m, inputs, targets, B, 1, 5); // not booked
    st_model_backward(m);
    const double wall = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) * 1e-6;
    char *table = profile_table(steps, wall / steps);
    double ms[4];
    const double ln = profile_row(table, "layernorm_forward_kernel", &ms[0]);
    const double qkv = profile_row(table, "cublasSgemm forward, W 192 x 64", &ms[1]);
    const double w256 = profile_row(table, "cublasSgemm forward, W 256 x 64", &ms[2]);
    const double up = profile_row(table, "copy to device", &ms[3]);
    check(ln == 5 && qkv == 2 && w256 == 3 && up == 3,
          "profile: calls per step: layer norm forward %g (5), QKV product %g (2), W 256 x 64 products %g (3), uploads %g (3)",
          ln, qkv, w256, up);
    double timed = -1.0;
    const char *total = strstr(table, "profile: timed ");
    if (total) sscanf(total, "profile: timed %lf", &timed);
    check(timed >= 0 && ms[0] >= 0 && ms[1] >= 0 && ms[2] >= 0 &&
              ms[3] >= 0 && timed <= wall / steps * 1.001 + 1e-3,
          "profile: times >= 0 (%.4f %.4f %.4f %.4f ms), %.3f ms timed of a %.3f ms step", ms[0], ms[1], ms[2], ms[3],
          timed, wall / steps);
    free(table);
    st_profile_reset();
    table = profile_table(1, 1.0);
    const int forgotten = profile_row(table, "layernorm_forward_kernel", &ms[0]) == 0 && ms[0] < 0;
    free(table);
    st_profile(1);
    st_model_forward(m, inputs, targets, B, 1, 5);
    st_profile(0);
    table = profile_table(1, 1.0);
    const double again = profile_row(table, "layernorm_forward_kernel", &ms[0]);
    check(forgotten && again == 5, "profile: reset forgets every row (%s); a forward after it books %g layer norms (5)",
          forgotten ? "yes" : "no", again);
    free(table), free(inputs), free(targets);
    st_model_free(m);
}

// The groups of checks, in order; -only NAME runs those whose name contains NAME.
static const struct {
    const char *name;
    void (*run)(void);
} GROUPS[] = {
    {"reference", test_reference_gradients}, {"masks", test_masks}, {"rejections", test_rejections},
    {"kernels", test_kernels}, {"work", test_work_at_scale}, {"data", test_data},
    {"model_gradients", test_model_gradients}, {"chunked_sums", test_chunked_sums}, {"model_tf32", test_model_tf32},
    {"recompute", test_recompute_equal},
    {"partial_batch", test_partial_batch}, {"grad_norm", test_grad_norm}, {"adamw", test_adamw}, {"overfit", test_overfit}, {"decode", test_decode_matches_forward},
    {"checkpoint", test_checkpoint}, {"profile", test_profile},
};

static void print_groups(FILE *f) {
    for (size_t g = 0; g < sizeof GROUPS / sizeof GROUPS[0]; g++) fprintf(f, " %s", GROUPS[g].name);
    fprintf(f, "\n");
}
static void usage(FILE *f) {
    fprintf(f, "usage: ./test_kernels [-v] [-precision fp32|tf32] [-only NAME]\n"
               "  -v          print every check (without it: a verdict, the first failures, the counts)\n"
               "  -precision  run the kernels in one precision only (default: both)\n"
               "  -only NAME  run the groups whose name contains NAME; the groups, in order:\n             ");
    print_groups(f);
}

int main(int argc, char **argv) {
    const char *only = "";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0) verbose = 1;
        else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) { usage(stdout); return 0; }
        else if (strcmp(argv[i], "-precision") == 0 && i + 1 < argc && st_precision_from_name(argv[i + 1]) >= 0)
            only_precision = st_precision_from_name(argv[++i]);
        else if (strcmp(argv[i], "-only") == 0 && i + 1 < argc) only = argv[++i];
        else {
            fprintf(stderr, "unknown flag %s\n", argv[i]);
            usage(stderr);
            return 1;
        }
    }
    printf("device: %s\n", st_device_init());
    // The model's checks hold float32's tolerances (the GPU build's default is tf32); the kernel and
    // TF32 groups set the precision they test.
    st_set_precision(ST_FP32);
    make_temp_dir();
    int groups = 0;
    for (size_t g = 0; g < sizeof GROUPS / sizeof GROUPS[0]; g++)
        if (strstr(GROUPS[g].name, only)) group = GROUPS[g].name, GROUPS[g].run(), groups++;
    remove_temp_dir();
    if (!groups) {
        fprintf(stderr, "-only %s matches no group of checks; the groups:", only);
        print_groups(stderr);
        return 1;
    }
    if (failed) {
        printf("verdict: %s\n", verdict);
        if (!verbose) {
            for (int f = 0; f < failed && f < SHOWN_FAILURES; f++) printf("FAIL %s\n", shown[f]);
            if (failed > SHOWN_FAILURES)
                printf("... and %d more failed checks: %s -v -only %s prints every check\n",
                       failed - SHOWN_FAILURES, argv[0], first_failed_group);
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
