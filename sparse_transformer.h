// sparse_transformer.h: the C API of sparse_transformer.cu, used by train.c, test_kernels.c and the tools.
//
// Memory passed to st_attention_* lives on the device: GPU memory in the GPU build, plain host memory in
// the CPU build. Allocate it with st_malloc and move data with st_to_device / st_to_host.
// Tensors are float32, row-major; shapes are written (B, H, T, D): batch, heads, positions, head size.
#ifndef SPARSE_TRANSFORMER_H
#define SPARSE_TRANSFORMER_H

#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------
// Device

// Checks that the device can run the kernels and returns its name. A GPU build started where no
// GPU is usable prints one line saying so and how to build for the CPU, and exits 1.
const char *st_device_init(void);
// The GPU this process uses (index from 0), before st_device_init: several processes on one machine
// take one each. A process that sees one GPU takes it whatever the index; exits 1 if there is no such
// GPU. (The CPU build has one device: the host.)
void st_device_select(int index);
int st_device_is_gpu(void);        // 1 in the GPU build, 0 in the CPU build
// Bad input ends a program with one line on stderr that says what was wrong and what to do, exit code 1.
void st_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void *st_malloc(size_t bytes); // exits 1 with the size asked for when memory runs out
void st_free(void *ptr);
void *st_host_alloc(size_t bytes); // malloc that exits 1 with the size asked for when memory runs out
void st_to_device(void *dst, const void *src, size_t bytes);
void st_to_host(void *dst, const void *src, size_t bytes);
void st_synchronize(void);
// The profiler: while on, every kernel launch, matrix product and copy is timed (CUDA events on the GPU,
// the wall clock on the CPU) and booked under its name. st_profile_print prints the table, most time
// first, per step of `steps` that took `step_ms` each: calls, ms and share of the step.
void st_profile(int on);
void st_profile_reset(void); // forget what was booked
void st_profile_print(FILE *f, int steps, double step_ms);

// The precision of every matrix product: the attention's tile products and the model's cuBLAS calls.
//   ST_FP32: float32 on the CUDA cores, exact float32 arithmetic (the CPU build's default);
//   ST_TF32: tensor cores, each operand rounded to TF32 (8-bit exponent, 10 mantissa bits, unit
//            roundoff 2^-11), products summed in float32 (the GPU build's default; ~7x the FLOP/s).
typedef enum { ST_FP32, ST_TF32 } StPrecision;
void st_set_precision(StPrecision p);
StPrecision st_get_precision(void);
int st_precision_from_name(const char *name); // "fp32" "tf32"; -1 for an unknown name
const char *st_precision_name(StPrecision p);

// ----------------------------------------------------------------------------
// Attention patterns (Child et al. 2019, section 4): positions are 0-based, always causal (j <= i).

// local: strided's local step alone; dilated: l keys l apart. ST_PATTERN_KINDS counts them: a new pattern
// goes just before it, so that the numbers stored in checkpoints keep their meaning (sparse_transformer.cu,
// section 2: how to add one).
typedef enum { ST_DENSE, ST_STRIDED, ST_FIXED, ST_LOCAL, ST_DILATED, ST_PATTERN_KINDS } StPatternKind;
typedef enum { ST_INTERLEAVED, ST_MERGED, ST_MULTIHEAD } StCombine;

typedef struct {
    StPatternKind kind;
    StCombine combine; // how a layer uses the pattern's two steps; ignored by dense
    int stride;        // l: the stride (strided), the block length (fixed), the window (local), the dilation (dilated)
    int summary;       // c: summary cells per block (fixed)
    int groups;        // G: summary groups; head h uses group h mod G (fixed)
} StPattern;

// Name <-> enum: "dense" "strided" "fixed" "local" "dilated"; "interleaved" "merged" "multihead". -1 for an
// unknown name.
int st_pattern_kind_from_name(const char *name);
int st_combine_from_name(const char *name);
const char *st_pattern_kind_name(StPatternKind kind);
const char *st_combine_name(StCombine combine);

// NULL when the pattern can be used with this context length, number of heads and head size;
// otherwise a one-line message that says what is wrong and what to do.
const char *st_pattern_check(const StPattern *p, int n_ctx, int n_head, int d_head);

// 1 when query i may attend to key j in head `head` of layer `layer`: the formulas, as the paper states them.
int st_pattern_allows(const StPattern *p, int layer, int head, int i, int j);

// ----------------------------------------------------------------------------
// Sparse attention of one layer: out_i = softmax_{j allowed for i}(q_i . k_j / sqrt(D)) v_j

typedef struct StAttention StAttention;

typedef struct {
    double pairs_allowed;  // (query, key) pairs the pattern allows, all heads, one batch element
    double pairs_computed; // pairs the kernels compute (whole tiles), all heads, one batch element
    size_t bytes;          // device memory the attention itself holds (layout and workspace)
} StAttentionStats;

// Builds the tile layout of layer `layer` once; exits 1 with st_pattern_check's message if invalid.
StAttention *st_attention_create(const StPattern *p, int layer, int n_ctx, int n_head, int d_head);
void st_attention_free(StAttention *a);
StAttentionStats st_attention_stats(const StAttention *a);

// Where the rows of the heads live: head h's row (position) t of batch element b starts at
// x + b * batch + h * head + t * row, in floats, and holds its D values.
typedef struct { size_t batch, head, row; } StHeadLayout;
// q, k, v and their gradients share one layout, out and dout another. NULL means (B, H, T, D) for all of
// them. Every tensor starts on a 16-byte boundary and every stride is a multiple of 4 floats (the
// kernels read rows 16 bytes at a time; cudaMalloc's memory is aligned, D is 32, 64 or 128). The model passes q, k, v where its product wrote them, side by side in rows of 3C ({T 3C, D, 3C}),
// and the output side by side in rows of C ({T C, D, C}): no pass to split the heads or merge them.
typedef struct { StHeadLayout qkv, out; } StLayout;

// q, k, v, out: (B, H, T, D) unless `layout` says otherwise; lse: (B, H, T), the natural log of each
// row's softmax denominator (-inf for a query with no allowed key; its output is 0).
void st_attention_forward(StAttention *a, float *out, float *lse, const float *q, const float *k,
                          const float *v, int B, const StLayout *layout);
// Overwrites dq, dk, dv with the gradients of the loss given dout = dL/dout (the rows of the layout only).
void st_attention_backward(StAttention *a, float *dq, float *dk, float *dv, const float *dout,
                           const float *out, const float *lse, const float *q, const float *k,
                           const float *v, int B, const StLayout *layout);
// The backward's dK/dV kernel keeps each tile pair's dS (the softmax's gradient) for its dQ kernel,
// which otherwise computes it again: keep = 1 (the default) where a step's dS takes no more memory than
// its q, k and v (memory stays linear in n), 0 never, 2 always (the tests). The same bits either way.
void st_set_keep_ds(int keep);

// ----------------------------------------------------------------------------
// Data files: a 64-byte header, then the bytes (text, images or audio: the model sees bytes 0..255).
//
//   offset  size  field
//        0     8  magic "STBYTES1"
//        8     4  version (1)
//       12     4  kind: 0 text, 1 image, 2 audio
//       16     4  image height       (0 unless image)
//       20     4  image width        (0 unless image)
//       24     4  image channels     (0 unless image)
//       28     4  audio sample rate  (0 unless audio; the bytes are 8-bit mu-law)
//       32     8  number of bytes that follow the header
//       40    24  zero
// Integers are little-endian. Images are stored one after the other, each in (row, column, channel)
// order, so the byte count is a multiple of height * width * channels.

#define ST_DATA_HEADER_BYTES 64

typedef enum { ST_TEXT, ST_IMAGE, ST_AUDIO } StDataKind;

typedef struct {
    StDataKind kind;
    int height, width, channels; // images
    int sample_rate;             // audio
    size_t n_bytes;
} StDataInfo;

#define ST_MAX_IMAGE_SIDE (1 << 16)    // image height, width, channels
#define ST_MAX_SAMPLE_RATE (1 << 20)   // audio samples per second

// NULL when the description is consistent (shape fields in range, 0 where the kind has none), else a
// one-line message.
const char *st_data_check(const StDataInfo *info);
const char *st_data_kind_name(StDataKind kind); // "text" "image" "audio"
// Writes header and bytes to path + ".tmp", then renames it to path. NULL on success, else a message.
const char *st_data_write(const char *path, const StDataInfo *info, const unsigned char *bytes);
// Reads and checks the header (magic, version, kind, shape, file size). NULL on success, else a
// one-line message naming the file, what is wrong and what to do.
const char *st_data_read_info(const char *path, StDataInfo *info);
// Reads the whole file: info and a malloc'd buffer of info->n_bytes, or NULL with *error set.
unsigned char *st_data_load(const char *path, StDataInfo *info, const char **error);

// Writes an 8-bit PNG image (channels: 1 grey, 3 RGB, 4 RGBA) of width x height pixels, row after row,
// to the open file f (named path in messages) with libpng, and closes f. Exits 1 with a message if it
// cannot.
void st_png_write(FILE *f, const char *path, const unsigned char *pixels, int width, int height, int channels);

// 8-bit mu-law (mu = 255) for audio: samples in [-1, 1] <-> bytes, monotonic (byte 0 is -1, 255 is +1).
unsigned char st_mulaw_encode(float sample);
float st_mulaw_decode(unsigned char byte);

// The synthetic data set: lines of `period` bytes (lowercase letters and spaces, a newline last).
// The first line is random; every later byte copies the byte one period back, except that with
// probability `noise` it is a fresh random letter. Deterministic in `seed`. A model predicts byte
// t + 1 at position t, so the byte to copy lies period - 1 back from the query: a window shorter than
// that cannot reach it; one stride step reaches it when the stride divides period - 1 (65 and 16);
// other strides need two steps, local then stride, which a small model learns far more slowly.
void st_synthetic(unsigned char *out, size_t n, int period, double noise, unsigned long long seed);
// The entropy of that source, in bits per byte, once the first line is seen: what a model can reach.
double st_synthetic_entropy(int period, double noise);

// ----------------------------------------------------------------------------
// The model: a byte-level Sparse Transformer (paper section 5)

typedef struct {
    int ctx, dim, heads, layers; // context n, width C, heads H (C / H = 32, 64 or 128), residual blocks
    int ff;                      // the MLP is ff * dim wide: 4, or 2 for the half-size variant
    StPattern pattern;           // pattern.stride also sets the width of the text/audio position grid
    float dropout;               // at the end of each residual branch, while training
    int recompute;               // 1: keep only each block's input; recompute the block in the backward
    StDataKind kind;             // positions: text/audio rows of width stride; images (row, column, channel)
    int height, width, channels; // images
    int sample_rate;             // audio
} StModelConfig;

// The ranges the model's settings must lie in: ./train's flags accept these, and st_model_check (which
// the checkpoint loader calls before it computes any size) holds every configuration to them.
#define ST_MAX_CTX (1 << 20)    // ctx (the attention's too: st_pattern_check); also stride, summary and groups
#define ST_MAX_DIM (1 << 16)    // dim
#define ST_MAX_HEADS 1024       // heads
#define ST_MAX_LAYERS 4096      // layers
#define ST_MAX_FF 16            // ff
#define ST_MAX_DROPOUT 0.99f    // dropout
#define ST_MAX_BATCH 65535      // sequences per batch (the GPU grid's z limit)
#define ST_MAX_STEPS (1 << 30)  // steps, warmup

typedef struct StModel StModel;
typedef enum { ST_PARAMS, ST_GRADS, ST_ADAM_M, ST_ADAM_V } StBuffer;

const char *st_model_check(const StModelConfig *c); // NULL if usable, else a one-line message
StModel *st_model_create(const StModelConfig *c, unsigned long long seed); // exits 1 if not usable
void st_model_free(StModel *m);
// inputs, targets: (B, T) bytes on the host (targets may be NULL). training = 1 applies dropout, with
// masks drawn from `seed`. Like the backward and the update, it queues its kernels on the device and
// returns without waiting for their results (only its upload of the batch, a plain copy, waits for
// the work queued before it). st_model_loss waits and returns the last forward's mean cross-entropy
// in nats (0 without targets).
void st_model_forward(StModel *m, const unsigned char *inputs, const unsigned char *targets, int B,
                      int training, unsigned long long seed);
float st_model_loss(const StModel *m);
void st_model_backward(StModel *m); // gradients of the last forward's loss (overwritten)
// One AdamW step (t = step, from 1): clips the gradient to global norm `clip` (if > 0), decays
// matrices only. It runs on the device without waiting for it (the norm never visits the host);
// st_model_grad_norm waits and returns the last update's gradient norm before clipping.
void st_model_update(StModel *m, float lr, float weight_decay, float clip, int step);
float st_model_grad_norm(const StModel *m);
void st_model_set_recompute(StModel *m, int recompute); // same results, other memory use
// Rows per chunk of the gradient's column sums (0: the device's default, every row on the CPU build):
// for tests, which run the GPU's chunked sums on the CPU.
void st_model_set_chunk_rows(StModel *m, int rows);
size_t st_model_num_params(const StModel *m);
size_t st_model_activation_bytes(const StModel *m, int B, int recompute); // device memory for B sequences
int st_model_num_tensors(const StModel *m);
const char *st_model_tensor(const StModel *m, int i, size_t *offset, size_t *size); // its name
void st_model_get(const StModel *m, StBuffer which, float *host); // n_params floats
void st_model_set(StModel *m, StBuffer which, const float *host);
// The buffer itself, in device memory (n_params floats): for libraries that work on device memory in
// place, such as NCCL's all-reduce of the gradients between GPUs (train.c, section Ranks).
float *st_model_buffer(const StModel *m, StBuffer which);
void st_model_logits(const StModel *m, float *host); // (B, T, 256) of the last forward
void st_model_losses(const StModel *m, float *host); // (B, T) cross-entropies of the last forward with targets
// Incremental decoding (one sequence): st_model_prefill runs window[0 .. len) through the model,
// keeps every layer's keys and values, and returns the logits (256) of the byte after it;
// st_model_decode then adds one byte at window position i = len, len + 1, ... (< ctx), reading the
// cache, and returns the logits of the byte after that: its cost is the keys the pattern lets it see.
void st_model_prefill(StModel *m, const unsigned char *window, int len, float *logits);
void st_model_decode(StModel *m, unsigned char byte, int i, float *logits);
// Extends text[0 .. prompt_len) to text[0 .. total) by sampling the model one byte at a time, at
// `temperature`, from the top_k most likely bytes (0: all). *rng is the random state (advanced).
void st_generate(StModel *m, unsigned char *text, long prompt_len, long total, float temperature, int top_k,
                 unsigned long long *rng);

// ----------------------------------------------------------------------------
// Checkpoints (format in sparse_transformer.cu, section 11, and docs/formats.md)

typedef struct {
    long long step;         // optimizer steps done
    unsigned long long rng; // the trainer's random state: which batches come next
    unsigned long long seed;
    int steps, warmup, batch; // batch: the windows of a step, every rank's (./train under mpirun)
    float lr, weight_decay, clip;
} StTrainState;

// Written to path + ".tmp", then renamed over path. NULL on success, else a message.
const char *st_checkpoint_save(const char *path, const StModel *m, const StTrainState *s);
// A new model with the saved configuration, parameters and Adam moments; NULL with *error set if the
// file is missing, truncated or corrupt.
StModel *st_checkpoint_load(const char *path, StTrainState *s, StModelConfig *config, const char **error);

#ifdef __cplusplus
}
#endif
#endif
