/*
train.c: trains the byte-level Sparse Transformer on a data set made by data/prepare.sh.

Read it in this order: the flags (one table: parsing, defaults and -h all come from it), the data
(random windows for training, fixed ones for validation), the ranks (several processes under mpirun,
in a build with MPI), the evaluation, the learning-rate schedule, then main(), which is the training
loop: forward, backward, AdamW, a line per step, validation, samples and checkpoints.
`./train -show_pattern` only prints the attention patterns and exits; `./train -profile N` times N steps
kernel by kernel, prints where a step's time goes and exits.

Every run can be resumed: checkpoints hold the model, Adam's moments, the step and the random state,
and are written to a temporary file then renamed. Ctrl-C (or kill, SIGTERM) saves one before exiting.
On the CPU build a resumed run prints the same losses, to the last digit, as a run that was never
interrupted.
*/
#define _XOPEN_SOURCE 700 // clock_gettime, sigaction, M_PI
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "sparse_transformer.h"
#ifdef ST_MPI
#include <mpi.h> // several ranks (section Ranks)
#endif
#ifdef ST_NCCL
#include <nccl.h> // the GPU build's all-reduce between GPUs (section Ranks)
#endif
static void ranks_end(void); // section Ranks

// ----------------------------------------------------------------------------
// Flags

typedef struct {
    const char *data_dir, *out_dir, *log_path;
    StModelConfig model;
    int batch, steps, warmup, eval_every, eval_batches, eval_batch, save_every, sample_every, resume, eval_only,
        show_pattern, profile;
    float lr, weight_decay, clip;
    long long seed, eval_bytes;
    StPrecision precision;
} Options;

typedef enum { INT, FLOAT, LONG, TEXT, PATTERN, COMBINE, PRECISION } FlagType;
typedef struct {
    const char *name;
    FlagType type;
    void *value;
    double lo, hi; // allowed range of numbers
    const char *help;
    int given;     // set on the command line (a resumed run keeps the checkpoint's value otherwise)
} Flag;

static Options opt;
static volatile sig_atomic_t interrupted = 0; // the signal of Ctrl-C (SIGINT) or of kill (SIGTERM): save and stop
static Flag flags[] = {
    {"-i", TEXT, &opt.data_dir, 0, 0, "data folder holding train.bin and val.bin (data/prepare.sh NAME)", 0},
    {"-o", TEXT, &opt.out_dir, 0, 0, "output folder; the checkpoint is DIR/model.bin", 0},
    {"-log", TEXT, &opt.log_path, 0, 0, "also write a tab-separated line per step and per validation to FILE "
     "(docs/formats.md: the columns; a resumed run appends)", 0},
    {"-pattern", PATTERN, &opt.model.pattern.kind, 0, 0, "attention pattern: dense | strided | fixed | local (a window of -stride bytes) | dilated (-stride keys, -stride apart)", 0},
    {"-combine", COMBINE, &opt.model.pattern.combine, 0, 0,
     "how a layer uses the pattern's two steps: interleaved | merged | multihead", 0},
    {"-ctx", INT, &opt.model.ctx, 1, ST_MAX_CTX, "context length in bytes", 0},
    {"-stride", INT, &opt.model.pattern.stride, 1, ST_MAX_CTX,
     "stride (strided) or block length (fixed); also the width of the text/audio position grid", 0},
    {"-summary", INT, &opt.model.pattern.summary, 1, ST_MAX_CTX, "summary cells per block (fixed)", 0},
    {"-summary_groups", INT, &opt.model.pattern.groups, 1, ST_MAX_CTX, "summary groups; head h uses group h mod G (fixed)", 0},
    {"-dim", INT, &opt.model.dim, 1, ST_MAX_DIM, "model width", 0},
    {"-heads", INT, &opt.model.heads, 1, ST_MAX_HEADS, "attention heads; dim / heads must be 32, 64 or 128", 0},
    {"-layers", INT, &opt.model.layers, 1, ST_MAX_LAYERS, "residual blocks", 0},
    {"-ff", INT, &opt.model.ff, 1, ST_MAX_FF, "MLP width as a multiple of dim (2: the paper's half-size variant)", 0},
    {"-dropout", FLOAT, &opt.model.dropout, 0, ST_MAX_DROPOUT, "dropout at the end of each residual branch", 0},
    {"-recompute", INT, &opt.model.recompute, 0, 1, "1: keep only each block's input, recompute in the backward", 0},
    {"-precision", PRECISION, &opt.precision, 0, 0, "matrix products: fp32 (exact float32) | tf32 (tensor cores, "
     "10-bit mantissas; the GPU's default)", 0},
    {"-batch", INT, &opt.batch, 1, ST_MAX_BATCH, "sequences per step", 0},
    {"-steps", INT, &opt.steps, 1, ST_MAX_STEPS, "optimizer steps in all", 0},
    {"-lr", FLOAT, &opt.lr, 0, 1, "peak learning rate (linear warmup, then cosine decay to 0)", 0},
    {"-warmup", INT, &opt.warmup, 0, ST_MAX_STEPS, "warmup steps", 0},
    {"-wd", FLOAT, &opt.weight_decay, 0, 1, "AdamW weight decay, on matrices only", 0},
    {"-clip", FLOAT, &opt.clip, 0, 1e6, "clip the gradient's global norm to this (0: no clipping)", 0},
    {"-seed", LONG, &opt.seed, 0, 9e18, "random seed (initialisation, batches, dropout, samples)", 0},
    {"-eval_every", INT, &opt.eval_every, 0, 1 << 30, "validation every N steps (0: only at the end)", 0},
    {"-eval_batches", INT, &opt.eval_batches, 1, 1 << 20, "batches of validation data each time", 0},
    {"-eval_bytes", LONG, &opt.eval_bytes, 0, 9e18,
     "the final evaluation scores the first N bytes of the validation split (0: all of it)", 0},
    {"-eval_batch", INT, &opt.eval_batch, 0, ST_MAX_BATCH,
     "windows per batch in the final evaluation (0: -batch on the CPU; on a GPU as many as fit in training's memory or 1 GiB)", 0},
    {"-save_every", INT, &opt.save_every, 0, 1 << 30, "checkpoint every N steps (0: only at the end)", 0},
    {"-sample_every", INT, &opt.sample_every, 0, 1 << 30, "print a sample every N steps, text data (0: never)", 0},
    {"-resume", INT, &opt.resume, 0, 1, "1: continue from DIR/model.bin", 0},
    {"-eval_only", INT, &opt.eval_only, 0, 1, "score DIR/model.bin on the validation split (the final evaluation) "
     "and exit", 0},
    {"-profile", INT, &opt.profile, 0, 1 << 20, "N: time every kernel, matrix product and copy of N steps (after "
     "one untimed), print where a step's time goes and exit; nothing is saved", 0},
    {"-show_pattern", INT, &opt.show_pattern, 0, 1, "print every layer's and head's attention mask and exit "
     "(with -o FILE.png: draw them, like the paper's Figure 3)", 0},
};
#define N_FLAGS (int)(sizeof flags / sizeof flags[0])

// Defaults: small enough on a CPU to print a step line every few seconds on 2 cores; larger on a GPU.
static void set_defaults(int gpu) {
    opt.data_dir = "data/default";
    opt.out_dir = "out";
    opt.log_path = "";
    opt.model = (StModelConfig){gpu ? 1024 : 256, gpu ? 512 : 128, gpu ? 8 : 4, gpu ? 8 : 4, 4,
                                {ST_STRIDED, ST_MERGED, gpu ? 32 : 16, gpu ? 8 : 4, 1}, 0.0f, 0, ST_TEXT, 0, 0, 0, 0};
    opt.batch = gpu ? 16 : 8;
    opt.steps = gpu ? 5000 : 2000;
    opt.warmup = gpu ? 500 : 50;
    opt.lr = gpu ? 3e-4f : 1e-3f;
    opt.weight_decay = 0.01f;
    opt.clip = 1.0f;
    opt.seed = 1337;
    opt.eval_every = gpu ? 250 : 100;
    opt.eval_batches = gpu ? 16 : 8;
    opt.save_every = gpu ? 1000 : 500;
    opt.sample_every = gpu ? 500 : 200;
    opt.precision = st_get_precision(); // tf32 on a GPU, fp32 on the CPU
}

static void print_value(const Flag *f) {
    switch (f->type) {
    case INT: printf("%d", *(int *)f->value); break;
    case FLOAT: printf("%g", *(float *)f->value); break;
    case LONG: printf("%lld", *(long long *)f->value); break;
    case TEXT: printf("%s", **(const char **)f->value ? *(const char **)f->value : "none"); break;
    case PATTERN: printf("%s", st_pattern_kind_name(*(StPatternKind *)f->value)); break;
    case COMBINE: printf("%s", st_combine_name(*(StCombine *)f->value)); break;
    case PRECISION: printf("%s", st_precision_name(*(StPrecision *)f->value)); break;
    }
}

static void usage(void) {
    printf("usage: ./train [-flag value ...]   (defaults for this build)\n");
    for (int i = 0; i < N_FLAGS; i++) {
        printf("  %-16s %s (default ", flags[i].name, flags[i].help);
        print_value(&flags[i]);
        printf(")\n");
    }
#ifdef ST_MPI
    printf("several processes: mpirun -np N ./train ... trains one model; -batch is each rank's, so N x -batch windows "
           "a step; %s (rank 0 prints and saves)\n", st_device_is_gpu() ? "each rank takes one GPU of its machine"
           : "give each rank its threads with OMP_NUM_THREADS");
#ifndef ST_NCCL
    if (st_device_is_gpu()) printf("  (this GPU build has no NCCL: the gradients are averaged through the host, slowly)\n");
#endif
#else
    printf("several processes: this build has no MPI (apt-get install openmpi-bin libopenmpi-dev; make clean && make)\n");
#endif
}


static void parse_flag(Flag *f, const char *text) {
    char *end;
    errno = 0;
    if (f->type == TEXT) {
        *(const char **)f->value = text;
    } else if (f->type == PATTERN || f->type == COMBINE || f->type == PRECISION) {
        const int v = f->type == PATTERN ? st_pattern_kind_from_name(text)
                      : f->type == COMBINE ? st_combine_from_name(text) : st_precision_from_name(text);
        if (v < 0) st_fail("%s does not take '%s' (./train -h lists the choices)", f->name, text);
        *(int *)f->value = v;
    } else {
        const double v = strtod(text, &end);
        const int digits_only = strspn(text, "0123456789") == strlen(text); // whole numbers: no 0x40, no 1e2
        if (*text == '\0' || *end != '\0' || errno || !isfinite(v) || v < f->lo || v > f->hi ||
            (f->type != FLOAT && !digits_only)) {
            char range[128];
            if (f->type == FLOAT) snprintf(range, sizeof range, "a number from %g to %g", f->lo, f->hi);
            else snprintf(range, sizeof range, "a whole number from %.0f to %.0f", f->lo, f->hi);
            fprintf(stderr, "%s expects %s, got '%s'\n", f->name, range, text);
            exit(1);
        }
        if (f->type == INT) *(int *)f->value = (int)v;
        else if (f->type == LONG) *(long long *)f->value = (long long)v;
        else *(float *)f->value = (float)v;
    }
    f->given = 1;
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) { usage(); ranks_end(); exit(0); }
        Flag *f = NULL;
        for (int k = 0; k < N_FLAGS; k++)
            if (strcmp(argv[i], flags[k].name) == 0) f = &flags[k];
        if (!f) st_fail("unknown flag '%s' (./train -h lists the flags)", argv[i]);
        // the switches: "-show_pattern" alone means "-show_pattern 1", as does "-eval_only"
        if ((f->value == &opt.show_pattern || f->value == &opt.eval_only) && (i + 1 >= argc || argv[i + 1][0] == '-')) {
            parse_flag(f, "1");
            continue;
        }
        if (i + 1 >= argc) st_fail("%s needs a value (./train -h lists the flags)", argv[i]);
        parse_flag(f, argv[++i]);
    }
}

static int given(const void *value) {
    for (int k = 0; k < N_FLAGS; k++)
        if (flags[k].value == value) return flags[k].given;
    return 0;
}

// ----------------------------------------------------------------------------
// The pattern viewer: for every layer and head, ctx lines of ctx characters, or a picture

// The picture (-show_pattern -o FILE.png), like the paper's Figure 3: a grid with a row per layer and a
// column per head, each cell the (query i, key j) mask, key j to the right. A cell is at most 256
// pixels wide; beyond that each pixel covers a square of pairs and its darkness is the square root of
// the share of them allowed (so that a stride's lone keys still show). A grey frame separates cells.
static void draw_pattern(const char *path) {
    const StModelConfig *c = &opt.model;
    const int n = c->ctx, cell = n < 256 ? n : 256, gap = 4;
    const int width = c->heads * (cell + gap) + gap, height = c->layers * (cell + gap) + gap;
    if ((double)n * n * c->layers * c->heads > 4e9)
        st_fail("-show_pattern -o FILE.png looks at every (query, key) pair: ctx^2 x layers x heads must stay "
                "below 4e9 (use a smaller -ctx, or fewer -layers or -heads)");
    FILE *f = fopen(path, "wb");
    if (!f) st_fail("cannot write %s: %s", path, strerror(errno));
    unsigned char *pixels = st_host_alloc((size_t)width * height);
    memset(pixels, 160, (size_t)width * height); // the frame
    for (int layer = 0; layer < c->layers; layer++)
        for (int head = 0; head < c->heads; head++)
            for (int y = 0; y < cell; y++)
                for (int x = 0; x < cell; x++) {
                    const int i0 = (int)((long)y * n / cell), i1 = (int)((long)(y + 1) * n / cell);
                    const int j0 = (int)((long)x * n / cell), j1 = (int)((long)(x + 1) * n / cell);
                    long allowed = 0;
                    for (int i = i0; i < i1; i++)
                        for (int j = j0; j < j1; j++) allowed += st_pattern_allows(&c->pattern, layer, head, i, j);
                    const double share = (double)allowed / ((long)(i1 - i0) * (j1 - j0));
                    const size_t at = (size_t)(gap + layer * (cell + gap) + y) * width + gap + head * (cell + gap) + x;
                    pixels[at] = (unsigned char)lround(255 * (1 - sqrt(share))); // allowed is dark
                }
    st_png_write(f, path, pixels, width, height, 1);
    free(pixels);
    printf("wrote %s: %d layers x %d heads, %d x %d pixels per head (ctx %d)\n", path, c->layers, c->heads, cell, cell, n);
}

static void show_pattern(void) {
    const StModelConfig *c = &opt.model;
    printf("pattern %s", st_pattern_kind_name(c->pattern.kind));
    if (c->pattern.kind == ST_STRIDED || c->pattern.kind == ST_FIXED) printf(", combine %s", st_combine_name(c->pattern.combine));
    printf(", ctx %d", c->ctx);
    if (c->pattern.kind != ST_DENSE)
        printf(", %s %d", c->pattern.kind == ST_LOCAL ? "window" : c->pattern.kind == ST_DILATED ? "dilation" : "stride",
               c->pattern.stride);
    if (c->pattern.kind == ST_FIXED) printf(", summary %d, summary_groups %d", c->pattern.summary, c->pattern.groups);
    printf("\n");
    for (int layer = 0; layer < c->layers; layer++) {
        for (int head = 0; head < c->heads; head++) {
            printf("layer %d head %d\n", layer, head);
            for (int i = 0; i < c->ctx; i++) {
                for (int j = 0; j < c->ctx; j++) putchar(st_pattern_allows(&c->pattern, layer, head, i, j) ? '#' : '.');
                putchar('\n');
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Data: windows of ctx + 1 bytes (inputs and next-byte targets)

typedef struct {
    unsigned char *bytes;
    StDataInfo info;
} Split;

static Split load_split(const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", opt.data_dir, name);
    Split s;
    const char *err;
    s.bytes = st_data_load(path, &s.info, &err);
    if (!s.bytes) st_fail("%s", err);
    return s;
}

static void check_fills_context(const Split *s, const char *name) {
    if (s->info.n_bytes < (size_t)opt.model.ctx + 1)
        st_fail("%s/%s: %zu bytes cannot fill a context of %d (+1 target): use a smaller -ctx or more data",
                opt.data_dir, name, s->info.n_bytes, opt.model.ctx);
}

// Windows start anywhere in text and audio, at the start of an image in image data.
static size_t window_unit(const Split *s) {
    return s->info.kind == ST_IMAGE ? (size_t)s->info.height * s->info.width * s->info.channels : 1;
}

// The window's T inputs and their next bytes as targets; a target past the end of the split is 0 (the
// last window of an evaluation may reach it; it is not scored).
static void copy_window(const Split *s, size_t start, unsigned char *inputs, unsigned char *targets, int T) {
    const size_t after = s->info.n_bytes - start - 1, have = after < (size_t)T ? after : (size_t)T;
    memcpy(inputs, s->bytes + start, T);
    memcpy(targets, s->bytes + start + 1, have);
    memset(targets + have, 0, T - have);
}

// `count` random windows; the random state is the trainer's (saved in checkpoints).
static void random_batch(const Split *s, unsigned long long *rng, int count, unsigned char *inputs,
                         unsigned char *targets) {
    const int T = opt.model.ctx;
    const size_t unit = window_unit(s), starts = (s->info.n_bytes - T - 1) / unit + 1;
    for (int b = 0; b < count; b++) {
        // xorshift64*: a small generator the checkpoint can hold in one number
        *rng ^= *rng >> 12, *rng ^= *rng << 25, *rng ^= *rng >> 27;
        const size_t start = (size_t)((*rng * 2685821657736338717ull) % starts) * unit;
        copy_window(s, start, inputs + (size_t)b * T, targets + (size_t)b * T, T);
    }
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

// ----------------------------------------------------------------------------
// Ranks: one model trained by N processes (mpirun -np N ./train), in a build with MPI
//
// Every rank holds the whole model. A step draws the windows that one process with batch N x B would
// draw, and rank r trains on windows r B .. r B + B - 1 of them; the gradients are then averaged over
// the ranks before the update, so every rank applies the same update, and N ranks with -batch B train
// as one process with -batch N B, up to the order of the float sums. The evaluations are shared: each
// rank scores a part of the windows. Rank 0 alone prints, logs, samples and saves (the other ranks'
// standard output goes to /dev/null; their errors still reach standard error). In the GPU build each
// rank takes one GPU of its machine, and NCCL averages the gradients in GPU memory. A process that no
// launcher started runs alone, without MPI at all: ranks is 1, and each of these functions does nothing.
static int rank = 0, ranks = 1;

// The number of processes a launcher (mpirun: Open MPI, or a PMI one) started, 0 if none did.
static int launched(void) {
    const char *names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"};
    for (int i = 0; i < 2; i++)
        if (getenv(names[i])) return atoi(getenv(names[i]));
    return 0;
}

#ifdef ST_MPI
#ifdef ST_NCCL
// The GPU build averages the gradients where they are, in GPU memory, with NCCL: an all-reduce over
// NVLink or PCIe, queued on the device after the backward. Its communicator is made once: rank 0 draws
// an id and MPI sends it to the others. Under a launcher this path runs even alone (mpirun -np 1), so
// that one GPU can check it (tools/gpu_check.sh).
static ncclComm_t nccl;
static void nccl_check(ncclResult_t result, const char *file, int line) {
    if (result == ncclSuccess) return;
    fprintf(stderr, "[NCCL error] %s:%d: rank %d: %s (NCCL_DEBUG=WARN says more)\n", file, line, rank,
            ncclGetErrorString(result));
    MPI_Abort(MPI_COMM_WORLD, 1); // the other ranks would wait for this one forever
}
#define ncclCheck(call) nccl_check((call), __FILE__, __LINE__)
static void nccl_start(void) {
    ncclUniqueId id;
    if (rank == 0) ncclCheck(ncclGetUniqueId(&id));
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclCheck(ncclCommInitRank(&nccl, ranks, id, rank));
}
// Waits for the all-reduce (and the step's kernels before it). A rank that died, or a broken link,
// would leave the others inside it for ever: NCCL reports a broken connection as an asynchronous error,
// which this polls, and a peer that simply stopped shows as no end in NCCL_WAIT_S seconds. Either
// prints a line and ends the job.
#define NCCL_WAIT_S 600
static void nccl_wait(void) {
    const double deadline = now_ms() + NCCL_WAIT_S * 1e3;
    cudaError_t done;
    while ((done = cudaStreamQuery(0)) == cudaErrorNotReady) {
        ncclResult_t async;
        ncclCheck(ncclCommGetAsyncError(nccl, &async));
        ncclCheck(async);
        if (now_ms() > deadline) {
            fprintf(stderr, "rank %d: the gradients' all-reduce has not ended in %d s: a rank is gone or stuck; "
                    "the job stops (the last checkpoint is %s/model.bin)\n", rank, NCCL_WAIT_S, opt.out_dir);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    if (done != cudaSuccess) st_fail("rank %d: the all-reduce failed: %s", rank, cudaGetErrorString(done));
}
// One all-reduce: x (n floats in GPU memory) becomes the mean of every rank's x.
static void nccl_average(float *x, size_t n) {
    ncclCheck(ncclAllReduce(x, x, n, ncclFloat, ncclAvg, nccl, 0));
    nccl_wait();
}
#endif
// A rank that exits without finishing MPI (an error: st_fail, a CUDA check, memory) ends the job: the
// other ranks would otherwise wait for it for ever inside a collective, under launchers that do not
// stop them themselves.
static void abort_unfinished(void) {
    int started = 0, finished = 0;
    MPI_Initialized(&started), MPI_Finalized(&finished);
    if (started && !finished) MPI_Abort(MPI_COMM_WORLD, 1);
}
static void ranks_start(int *argc, char ***argv) {
    if (!launched()) return;
    MPI_Init(argc, argv);
    atexit(abort_unfinished);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    if (rank > 0 && !freopen("/dev/null", "w", stdout)) st_fail("rank %d: cannot silence its output", rank);
    if (st_device_is_gpu()) { // one GPU per rank, by the rank's place among those of its machine
        MPI_Comm machine;
        int local;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &machine);
        MPI_Comm_rank(machine, &local);
        MPI_Comm_free(&machine);
        st_device_select(local);
    }
#ifdef ST_NCCL
    nccl_start();
#endif
}
static void ranks_end(void) {
    if (!launched()) return;
#ifdef ST_NCCL
    ncclCheck(ncclCommDestroy(nccl));
#endif
    MPI_Finalize();
}
// The sum of x over the ranks, in place (MPI's count is an int: large buffers go in parts).
static void sum_over_ranks(float *x, size_t n) {
    if (ranks == 1) return;
    for (size_t done = 0; done < n; done += INT_MAX / 2) {
        const size_t part = n - done < INT_MAX / 2 ? n - done : INT_MAX / 2;
        MPI_Allreduce(MPI_IN_PLACE, x + done, (int)part, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    }
}
static void sum_doubles_over_ranks(double *x, int n) {
    if (ranks > 1) MPI_Allreduce(MPI_IN_PLACE, x, n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}
static int any_rank(int flag) {
    if (ranks > 1) MPI_Allreduce(MPI_IN_PLACE, &flag, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return flag;
}
// FNV-1a: a checksum of bytes, continued from h (start: FNV_START).
#define FNV_START 1469598103934665603ull
static unsigned long long fnv1a(unsigned long long h, const void *bytes, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char *)bytes)[i]) * 1099511628211ull;
    return h;
}
// Whether every rank has the same checksum; if not, rank 0 says `why` and every rank exits 1.
static void ranks_same(unsigned long long h, const char *why) {
    unsigned long long lo = h, hi = h;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    if (lo == hi) return;
    if (rank == 0) fprintf(stderr, "%s\n", why);
    MPI_Finalize();
    exit(1);
}
// Ranks started with other flags or other data would train different models in lockstep: each rank
// hashes its settings and data sizes, and they must all agree.
static void ranks_agree(const Split *train, const Split *val) {
    if (ranks == 1) return;
    const void *parts[] = {&opt.model, &opt.batch, &opt.steps, &opt.warmup, &opt.lr, &opt.weight_decay, &opt.clip,
                           &opt.seed, &opt.resume, &train->info.n_bytes, &val->info.n_bytes};
    const size_t sizes[] = {sizeof opt.model, sizeof opt.batch, sizeof opt.steps, sizeof opt.warmup, sizeof opt.lr,
                            sizeof opt.weight_decay, sizeof opt.clip, sizeof opt.seed, sizeof opt.resume,
                            sizeof train->info.n_bytes, sizeof val->info.n_bytes};
    unsigned long long h = FNV_START;
    for (size_t p = 0; p < sizeof parts / sizeof parts[0]; p++) h = fnv1a(h, parts[p], sizes[p]);
    char why[160];
    snprintf(why, sizeof why, "the %d ranks were given different flags or data: start every rank with the same "
             "command line and data folder", ranks);
    ranks_same(h, why);
}
// Before each save the ranks compare a checksum of their parameters: ranks whose models drifted apart
// (the averaged gradients should make that impossible) stop rather than save one rank's model.
static void ranks_same_model(const StModel *m, float *host, long long step) {
    if (ranks == 1) return;
    st_model_get(m, ST_PARAMS, host);
    char why[200];
    snprintf(why, sizeof why, "the %d ranks' parameters differ at step %lld: stopped without saving; the last "
             "checkpoint is %s/model.bin", ranks, step, opt.out_dir);
    ranks_same(fnv1a(FNV_START, host, st_model_num_params(m) * sizeof(float)), why);
}
#else
// A build without MPI started by mpirun would train N separate models side by side: it refuses.
static void ranks_start(int *argc, char ***argv) {
    (void)argc, (void)argv;
    if (launched() > 1)
        st_fail("this ./train was built without MPI but runs as one of %d processes: each would train a model of its "
                "own. Install MPI (apt-get install openmpi-bin libopenmpi-dev), then: make clean && make", launched());
}
static void ranks_end(void) {}
static void sum_over_ranks(float *x, size_t n) { (void)x, (void)n; }
static void sum_doubles_over_ranks(double *x, int n) { (void)x, (void)n; }
static int any_rank(int flag) { return flag; }
static void ranks_agree(const Split *train, const Split *val) { (void)train, (void)val; }
static void ranks_same_model(const StModel *m, float *host, long long step) { (void)m, (void)host, (void)step; }
#endif

// The gradients averaged over the ranks: where they are, in GPU memory, by NCCL in a GPU build that
// has it; else through the host (the MPI here knows no device memory).
static void average_gradients(StModel *m, float *host) {
#ifdef ST_NCCL
    (void)host;
    if (launched()) nccl_average(st_model_buffer(m, ST_GRADS), st_model_num_params(m));
#else
    if (ranks == 1) return;
    const size_t n = st_model_num_params(m);
    st_model_get(m, ST_GRADS, host);
    sum_over_ranks(host, n);
    for (size_t i = 0; i < n; i++) host[i] /= ranks;
    st_model_set(m, ST_GRADS, host);
#endif
}

// ----------------------------------------------------------------------------
// Evaluation: the mean loss over chosen bytes of the validation split

// A window of the split: inputs start .. start + T - 1; positions from .. to - 1 are scored, each
// against the byte after it.
typedef struct {
    size_t start;
    int from, to;
} Window;

// Mean loss in nats per scored byte over `count` windows, `batch` at a time; *scored counts the bytes.
// Under several ranks each scores its share of the windows, and the sums are added up. An evaluation
// that runs longer than 10 s says how far it is every 10 s (in place on a terminal). An interrupt
// (Ctrl-C, kill) stops it early: then NaN, never the mean of the part done.
static double score(StModel *m, const Split *s, const Window *w, long count, int batch, size_t *scored) {
    const int T = opt.model.ctx;
    unsigned char *inputs = st_host_alloc((size_t)batch * T), *targets = st_host_alloc((size_t)batch * T);
    float *losses = st_host_alloc((size_t)batch * T * sizeof(float));
    const int tty = isatty(fileno(stdout));
    double sum = 0, next_report = now_ms() + 10e3;
    int reported = 0;
    *scored = 0;
    const long first = count * rank / ranks, end = count * (rank + 1) / ranks; // this rank's windows
    for (long done = first; done < end && !interrupted;) {
        const int B = end - done < batch ? (int)(end - done) : batch;
        for (int b = 0; b < B; b++) copy_window(s, w[done + b].start, inputs + (size_t)b * T, targets + (size_t)b * T, T);
        st_model_forward(m, inputs, targets, B, 0, 0);
        st_model_losses(m, losses);
        for (int b = 0; b < B; b++, done++)
            for (int t = w[done].from; t < w[done].to; t++) sum += losses[(size_t)b * T + t], ++*scored;
        if (now_ms() >= next_report && done < end) {
            printf("%seval: %ld/%ld windows, %.4f bpb so far%s", tty ? "\r" : "", (done - first) * ranks, count,
                   sum / *scored / M_LN2, tty ? "" : "\n");
            fflush(stdout);
            next_report = now_ms() + 10e3, reported = 1;
        }
    }
    if (reported && tty) printf("\n");
    free(inputs), free(targets), free(losses);
    if (any_rank(interrupted)) return NAN;
    double parts[2] = {sum, (double)*scored};
    sum_doubles_over_ranks(parts, 2);
    *scored = (size_t)parts[1];
    return *scored ? parts[0] / *scored : 0.0;
}

// Validation during training: eval_batches batches of windows spread evenly over the split, the same
// windows every time so that the numbers compare. NaN when an interrupt stopped it.
static double eval_spread(StModel *m, const Split *s) {
    const size_t unit = window_unit(s), starts = (s->info.n_bytes - opt.model.ctx - 1) / unit + 1;
    const long count = (long)opt.eval_batches * opt.batch < (long)starts ? (long)opt.eval_batches * opt.batch : (long)starts;
    Window *w = st_host_alloc(count * sizeof(Window));
    for (long k = 0; k < count; k++) w[k] = (Window){(size_t)k * (starts / count) * unit, 0, opt.model.ctx};
    size_t scored;
    const double loss = score(m, s, w, count, opt.batch, &scored);
    free(w);
    return loss;
}

// The final evaluation scores every byte of the split's first n once, but the very first (nothing
// precedes it): windows side by side, then one last window that ends where the split does (at an
// image boundary for images) and scores only the bytes that the windows before it did not. A byte
// sees the bytes before it in its own window: from none (at a window's start) to T - 1.
static Window *whole_windows(const Split *s, size_t n, long *count) {
    const size_t T = opt.model.ctx, unit = window_unit(s), full = (n - 1) / T; // n >= T + 1
    const size_t next = full * T + 1;                                           // first byte not yet scored
    *count = (long)full + (next <= n - 1);
    Window *w = st_host_alloc(*count * sizeof(Window));
    for (size_t k = 0; k < full; k++) w[k] = (Window){k * T, 0, (int)T};
    if (next <= n - 1) {
        const size_t last = (n - T) / unit * unit;
        w[full] = (Window){last, (int)(next - last - 1), (int)(n - 1 - last)};
    }
    return w;
}

// The final evaluation needs no backward: the model switches to recompute (only each block's input is
// kept; the results are the same) and, on a GPU, runs as many windows at once as fit in the memory
// training used, or in 1 GiB if that is more: larger batches keep a GPU busy. On the CPU build they
// do not help (measured: 27.0 s at batch 128 against 24.5 s at batch 8 for the default model), so it
// keeps the training batch. -eval_batch sets the number.
static int final_eval_batch(StModel *m, long windows) {
    if (opt.eval_batch) return opt.eval_batch < windows ? opt.eval_batch : (int)windows;
    if (!st_device_is_gpu()) return opt.batch < windows ? opt.batch : (int)windows;
    const size_t trained = st_model_activation_bytes(m, opt.batch, opt.model.recompute);
    const size_t budget = trained > (size_t)1 << 30 ? trained : (size_t)1 << 30;
    int B = 1;
    while (B < windows && 2 * B <= 65535 && st_model_activation_bytes(m, 2 * B, 1) <= budget) B *= 2;
    if (B < opt.batch) B = opt.batch;
    return B < windows ? B : (int)windows;
}

// The mean loss over the split's first n bytes (all of them without -eval_bytes), with a line that
// says what was scored. NaN when an interrupt stopped it.
static double eval_final(StModel *m, const Split *s) {
    const size_t T = opt.model.ctx, unit = window_unit(s), all = s->info.n_bytes;
    size_t n = all;
    if (opt.eval_bytes && (size_t)opt.eval_bytes < all - 1) {
        n = (size_t)opt.eval_bytes + 1 > T + 1 ? (size_t)opt.eval_bytes + 1 : T + 1;
        n = (n + unit - 1) / unit * unit; // whole images; all is a multiple of unit, and n <= all
    }
    long count;
    Window *w = whole_windows(s, n, &count);
    st_model_set_recompute(m, 1);
    const int batch = final_eval_batch(m, count);
    const double start = now_ms();
    size_t scored;
    const double loss = score(m, s, w, count, batch, &scored);
    free(w);
    if (isnan(loss)) return NAN; // interrupted
    if (n == all) printf("val %.4f bpb on the whole validation split: %zu bytes scored, every byte but the first", loss / M_LN2, scored);
    else printf("val %.4f bpb on the first %zu bytes of the validation split: %zu bytes scored (-eval_bytes)", loss / M_LN2, n, scored);
    printf(" (%ld windows, batch %d, %.1f s)\n", count, batch, (now_ms() - start) / 1e3);
    return loss;
}

// ----------------------------------------------------------------------------
// The training log (-log FILE): tab-separated columns, for plotting
//   kind  step  loss (nats per byte)  bpb  lr  ms  tok/s
// kind is "train" (one line per step), "val" (each validation) or "final" (the whole split at the end);
// validation lines have "-" for lr, ms and tok/s. Lines starting with # are comments.

static FILE *log_file;

// A new run starts the file anew. A resumed run keeps the lines up to its checkpoint's step and
// appends: the steps after it are trained again, and would otherwise appear twice.
static void log_open(int resumed, long long step) {
    if (!opt.log_path[0]) return;
    FILE *old = resumed ? fopen(opt.log_path, "r") : NULL;
    char tmp[4096], line[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", opt.log_path);
    FILE *f = fopen(old ? tmp : opt.log_path, "w");
    if (!f) st_fail("cannot write the log %s: %s", old ? tmp : opt.log_path, strerror(errno));
    if (!old) fprintf(f, "# kind\tstep\tloss\tbpb\tlr\tms\ttok/s\n");
    while (old && fgets(line, sizeof line, old)) {
        long long at = 0;
        if (line[0] == '#' || (sscanf(strchr(line, '\t') ? strchr(line, '\t') + 1 : "", "%lld", &at) == 1 && at <= step))
            fputs(line, f);
    }
    if (old) {
        fclose(old);
        if (fclose(f) != 0 || rename(tmp, opt.log_path) != 0 || !(f = fopen(opt.log_path, "a")))
            st_fail("cannot rewrite the log %s: %s", opt.log_path, strerror(errno));
    }
    log_file = f;
}

static void log_line(const char *kind, int step, double loss, float lr, double ms, double tok_per_s) {
    if (!log_file) return;
    fprintf(log_file, "%s\t%d\t%.6f\t%.6f\t", kind, step, loss, loss / M_LN2);
    if (ms > 0) fprintf(log_file, "%.3e\t%.1f\t%.1f\n", lr, ms, tok_per_s);
    else fprintf(log_file, "-\t-\t-\n");
    fflush(log_file);
}

// ----------------------------------------------------------------------------
// Learning rate: linear warmup, then cosine decay to 0

static float learning_rate(int step) {
    if (step < opt.warmup) return opt.lr * (step + 1) / opt.warmup;
    const double progress = (double)(step - opt.warmup) / fmax(1.0, opt.steps - opt.warmup);
    return (float)(opt.lr * 0.5 * (1.0 + cos(M_PI * fmin(1.0, progress))));
}

// ----------------------------------------------------------------------------
// Checkpoints, Ctrl-C and kill (a job scheduler that stops a run sends SIGTERM: it saves too)

// A second Ctrl-C does not wait. A repeat within half a second is the same request sent twice: `timeout`
// signals the process and then its whole group, so a run it stops would otherwise exit without saving.
static void on_interrupt(int sig) {
    static double first; // when the first signal came (clock_gettime may be called in a signal handler)
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    const double t = now.tv_sec + now.tv_nsec * 1e-9;
    if (!interrupted) interrupted = sig, first = t;
    else if (t - first > 0.5) _Exit(128 + interrupted);
}

static void install_interrupt(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static void checkpoint_path(char *path, size_t size) { snprintf(path, size, "%s/model.bin", opt.out_dir); }

static void save(const StModel *m, const StTrainState *s) {
    char path[4096];
    checkpoint_path(path, sizeof path);
    const char *err = st_checkpoint_save(path, m, s);
    if (err) st_fail("%s", err);
    printf("saved %s at step %lld\n", path, s->step);
}

// A resumed run (or -eval_only) takes the model and training settings from the checkpoint; a model flag
// given on the command line that disagrees with it, or data of another kind or shape, is an error (a
// different model cannot continue this one). Training flags given on the command line win (-steps to
// train longer).
static StModel *load(StTrainState *state) {
    char path[4096];
    checkpoint_path(path, sizeof path);
    const char *err;
    StModelConfig saved;
    StModel *m = st_checkpoint_load(path, state, &saved, &err);
    if (!m) st_fail("cannot resume: %s", err);
    const StModelConfig *c = &opt.model;
    if (given(&c->pattern.kind) && c->pattern.kind != saved.pattern.kind)
        st_fail("cannot resume %s: it was trained with -pattern %s, not %s", path, st_pattern_kind_name(saved.pattern.kind),
                st_pattern_kind_name(c->pattern.kind));
    if (given(&c->pattern.combine) && c->pattern.combine != saved.pattern.combine)
        st_fail("cannot resume %s: it was trained with -combine %s, not %s", path, st_combine_name(saved.pattern.combine),
                st_combine_name(c->pattern.combine));
    const struct { const void *flag; int mine, theirs; } model_flags[] = {
        {&c->ctx, c->ctx, saved.ctx}, {&c->dim, c->dim, saved.dim}, {&c->heads, c->heads, saved.heads},
        {&c->layers, c->layers, saved.layers}, {&c->ff, c->ff, saved.ff},
        {&c->pattern.stride, c->pattern.stride, saved.pattern.stride}, {&c->pattern.summary, c->pattern.summary, saved.pattern.summary},
        {&c->pattern.groups, c->pattern.groups, saved.pattern.groups}};
    for (size_t i = 0; i < sizeof model_flags / sizeof model_flags[0]; i++) {
        if (given(model_flags[i].flag) && model_flags[i].mine != model_flags[i].theirs) {
            const char *name = "";
            for (int k = 0; k < N_FLAGS; k++)
                if (flags[k].value == model_flags[i].flag) name = flags[k].name;
            st_fail("cannot resume %s: it was trained with %s %d, not %d: drop the flag, or train anew in another -o",
                    path, name, model_flags[i].theirs, model_flags[i].mine);
        }
    }
    if (given(&opt.seed) && (unsigned long long)opt.seed != state->seed)
        st_fail("cannot resume %s: it was trained with -seed %llu, not %lld: drop the flag", path, state->seed, opt.seed);
    if (saved.kind != c->kind || saved.height != c->height || saved.width != c->width || saved.channels != c->channels ||
        saved.sample_rate != c->sample_rate)
        st_fail("cannot resume %s: it was trained on %s data of another shape than %s holds", path,
             st_data_kind_name(saved.kind), opt.data_dir);
    if (given(&c->dropout) && c->dropout != saved.dropout)
        st_fail("cannot resume %s: it was trained with -dropout %g, not %g: drop the flag", path, saved.dropout, c->dropout);
    const int recompute = given(&c->recompute) ? c->recompute : saved.recompute; // may change: same results
    opt.model = saved;
    opt.model.recompute = recompute;
    st_model_set_recompute(m, recompute);
    if (!given(&opt.steps)) opt.steps = state->steps;
    if (!given(&opt.warmup)) opt.warmup = state->warmup;
    if (!given(&opt.batch)) { // the checkpoint holds the windows of a step, all ranks': split them again
        if (state->batch % ranks)
            st_fail("cannot resume %s: its steps had %d windows, which %d ranks cannot share evenly: run a number of "
                    "ranks that divides %d, or give -batch", path, state->batch, ranks, state->batch);
        opt.batch = state->batch / ranks;
    }
    if (!given(&opt.lr)) opt.lr = state->lr;
    if (!given(&opt.weight_decay)) opt.weight_decay = state->weight_decay;
    if (!given(&opt.clip)) opt.clip = state->clip;
    opt.seed = (long long)state->seed;
    if (opt.eval_only) return m;
    if (state->step >= opt.steps)
        st_fail("cannot resume %s: it has trained %lld steps of %d already: give a larger -steps to train on", path,
                state->step, opt.steps);
    printf("resuming %s at step %lld of %d\n", path, state->step, opt.steps);
    return m;
}

// ----------------------------------------------------------------------------
// Samples: a line of generated text after a prompt from the validation data

static void print_sample(StModel *m, const Split *val, long long step) {
    const long prompt = val->info.n_bytes < 32 ? (long)val->info.n_bytes : 32, total = prompt + 160;
    unsigned char *text = st_host_alloc(total);
    memcpy(text, val->bytes, prompt);
    unsigned long long rng = (unsigned long long)opt.seed * 7919 + (unsigned long long)step;
    st_generate(m, text, prompt, total, 1.0f, 0, &rng);
    printf("sample: \"");
    for (long i = 0; i < total; i++) {
        if (i == prompt) printf("\" -> \"");
        putchar(text[i] == '\n' ? '/' : text[i] >= 32 && text[i] < 127 ? text[i] : '?');
    }
    printf("\"\n");
    free(text);
}

// ----------------------------------------------------------------------------
// The training step, and the profiler (-profile N)

// One step on a random batch: forward, backward, the gradients averaged over the ranks, AdamW. Returns
// the loss, the mean over every rank's windows. inputs and targets hold all ranks' windows; grads is the
// gradients' host copy for the ranks (NULL for one process).
static float train_step(StModel *m, Split *train, StTrainState *state, unsigned char *inputs, unsigned char *targets,
                        float *grads, int step) {
    const int T = opt.model.ctx, B = opt.batch;
    random_batch(train, &state->rng, ranks * B, inputs, targets);
    // the step's kernels are queued on the device back to back; reading its loss waits for all of them
    const size_t mine = (size_t)rank * B * T;
    st_model_forward(m, inputs + mine, targets + mine, B, 1, (unsigned long long)opt.seed * 1000003ull + step);
    st_model_backward(m);
    average_gradients(m, grads);
    st_model_update(m, learning_rate(step), opt.weight_decay, opt.clip, step + 1);
    float loss = st_model_loss(m);
    sum_over_ranks(&loss, 1);
    return loss / ranks;
}

// -profile N: one step untimed (it allocates the workspaces and warms the caches), then N steps with
// every kernel, matrix product and copy timed; prints the table (sparse_transformer.cu, section 1) and
// returns. Nothing is saved.
static void profile_steps(StModel *m, Split *train, StTrainState *state, unsigned char *inputs,
                          unsigned char *targets, float *grads) {
    const int first = (int)state->step;
    train_step(m, train, state, inputs, targets, grads, first);
    st_profile(1);
    const double start = now_ms();
    for (int i = 1; i <= opt.profile; i++) train_step(m, train, state, inputs, targets, grads, first + i);
    const double step_ms = (now_ms() - start) / opt.profile;
    st_profile(0);
    if (rank == 0) st_profile_print(stdout, opt.profile, step_ms);
}

// ----------------------------------------------------------------------------

int main(int argc, char **argv) {
    ranks_start(&argc, &argv);
    const char *device = st_device_init();
    set_defaults(st_device_is_gpu());
    parse_args(argc, argv);
    st_set_precision(opt.precision);
    if (opt.show_pattern) {
        const char *err = opt.model.dim % opt.model.heads ? "-heads must divide -dim"
                          : st_pattern_check(&opt.model.pattern, opt.model.ctx, opt.model.heads, opt.model.dim / opt.model.heads);
        if (err) st_fail("%s", err);
        const size_t len = strlen(opt.out_dir);
        if (len > 4 && strcmp(opt.out_dir + len - 4, ".png") == 0) {
            draw_pattern(opt.out_dir);
            ranks_end();
            return 0;
        }
        if (opt.model.ctx > 2048) st_fail("-show_pattern draws ctx x ctx characters per head: use -ctx 2048 or less, or a picture: -o FILE.png");
        show_pattern();
        ranks_end();
        return 0;
    }
    Split train = load_split("train.bin"), val = load_split("val.bin");
    if (train.info.kind != val.info.kind || train.info.height != val.info.height || train.info.width != val.info.width ||
        train.info.channels != val.info.channels || train.info.sample_rate != val.info.sample_rate)
        st_fail("%s: train.bin and val.bin describe different data (kind or shape): remake them with data/prepare.sh",
                opt.data_dir);
    StModelConfig *c = &opt.model;
    c->kind = train.info.kind, c->height = train.info.height, c->width = train.info.width;
    c->channels = train.info.channels, c->sample_rate = train.info.sample_rate;

    StTrainState state = {0, 0, 0, 0, 0, 0, 0, 0, 0};
    StModel *m;
    if (opt.resume || opt.eval_only) {
        m = load(&state);
    } else {
        const char *err = st_model_check(c);
        if (err) st_fail("%s", err);
        m = st_model_create(c, (unsigned long long)opt.seed);
        state.rng = (unsigned long long)opt.seed * 0x9E3779B97F4A7C15ull | 1; // xorshift needs a non-zero state
    }
    check_fills_context(&train, "train.bin");
    check_fills_context(&val, "val.bin");
    ranks_agree(&train, &val);
    printf("device: %s\n", device);
    if (ranks > 1) printf("ranks: %d, each with -batch %d: %d windows a step\n", ranks, opt.batch, ranks * opt.batch);
    printf("data: %s, %s, train %zu bytes, val %zu bytes\n", opt.data_dir, st_data_kind_name(train.info.kind),
           train.info.n_bytes, val.info.n_bytes);
    printf("model: %s/%s stride %d, ctx %d, dim %d, heads %d, layers %d: %.2fM parameters; %s products\n",
           st_pattern_kind_name(c->pattern.kind), st_combine_name(c->pattern.combine), c->pattern.stride, c->ctx,
           c->dim, c->heads, c->layers, st_model_num_params(m) / 1e6, st_precision_name(opt.precision));
    install_interrupt();
    if (opt.eval_only) {
        const double loss = eval_final(m, &val);
        st_model_free(m);
        ranks_end();
        return isnan(loss) ? 128 + interrupted : 0;
    }
    struct stat out_dir;
    if ((mkdir(opt.out_dir, 0755) != 0 && errno != EEXIST) || stat(opt.out_dir, &out_dir) != 0 || !S_ISDIR(out_dir.st_mode))
        st_fail("cannot use %s as the output folder: %s", opt.out_dir, errno == EEXIST ? "a file has that name" : strerror(errno));
    state.seed = (unsigned long long)opt.seed, state.steps = opt.steps, state.warmup = opt.warmup;
    state.batch = ranks * opt.batch; // a step's windows, all ranks': another number of ranks can resume the stream
    state.lr = opt.lr, state.weight_decay = opt.weight_decay, state.clip = opt.clip;

    if (rank == 0) log_open(opt.resume, state.step);
    const int T = c->ctx, B = opt.batch;
    // the step's windows, all ranks' (this rank trains on its slice), and the gradients' host copy
    unsigned char *inputs = st_host_alloc((size_t)ranks * B * T), *targets = st_host_alloc((size_t)ranks * B * T);
    float *grads = ranks > 1 ? st_host_alloc(st_model_num_params(m) * sizeof(float)) : NULL;
    printf("activations: %.1f MiB for batch %d%s; %.1f MiB with -recompute %d\n",
           st_model_activation_bytes(m, B, c->recompute) / 1048576.0, B, c->recompute ? " with recompute" : "",
           st_model_activation_bytes(m, B, !c->recompute) / 1048576.0, !c->recompute);

    if (opt.profile) {
        profile_steps(m, &train, &state, inputs, targets, grads);
        ranks_end();
        return 0;
    }
    for (int step = (int)state.step; step < opt.steps; step++) {
        const float lr = learning_rate(step);
        const double start = now_ms();
        const float loss = train_step(m, &train, &state, inputs, targets, grads, step);
        if (!isfinite(loss)) {
            st_fail("the loss became %s at step %d: stopped; the last good checkpoint (if any) is %s/model.bin; try a "
                    "lower -lr or a longer -warmup", isnan(loss) ? "NaN" : "infinite", step + 1, opt.out_dir);
        }
        const double ms = now_ms() - start;
        state.step = step + 1;
        const double tok_per_s = (double)ranks * B * T / (ms / 1e3);
        printf("step %d/%d | loss %.4f | %.2f bpb | lr %.1e | %.0f ms | %.0f tok/s\n", step + 1, opt.steps, loss,
               loss / M_LN2, lr, ms, tok_per_s);
        fflush(stdout);
        log_line("train", step + 1, loss, lr, ms, tok_per_s);
        const int last = step + 1 == opt.steps;
        if (opt.eval_every && (step + 1) % opt.eval_every == 0 && !last) {
            const double val_loss = eval_spread(m, &val);
            if (isnan(val_loss)) { // interrupted: a part of the windows is not the validation, so nothing is reported
                printf("val (step %d) interrupted: not reported\n", step + 1);
            } else {
                printf("val %.4f bpb (step %d)\n", val_loss / M_LN2, step + 1);
                log_line("val", step + 1, val_loss, 0, 0, 0);
            }
        }
        if (rank == 0 && opt.sample_every && (step + 1) % opt.sample_every == 0 && train.info.kind == ST_TEXT)
            print_sample(m, &val, step + 1);
        const int stop = any_rank(interrupted); // after the validation, which an interrupt may have cut; every rank agrees
        if ((opt.save_every && (step + 1) % opt.save_every == 0) || last || stop) {
            ranks_same_model(m, grads, step + 1); // (the gradients' host copy, free between steps)
            if (rank == 0) save(m, &state);
        }
        if (stop) {
            printf("interrupted: resume with ./train -i %s -o %s -resume 1\n", opt.data_dir, opt.out_dir);
            ranks_end();
            return 128 + (interrupted ? interrupted : SIGTERM);
        }
    }
    free(inputs), free(targets), free(grads);
    const double final_loss = eval_final(m, &val);
    ranks_end();
    if (isnan(final_loss)) {
        printf("interrupted during the final evaluation; the checkpoint is saved\n");
        return 128 + interrupted;
    }
    log_line("final", opt.steps, final_loss, 0, 0, 0);
    st_model_free(m);
    free(train.bytes), free(val.bytes);
    return 0;
}
