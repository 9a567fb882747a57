// sparse_transformer.h: the C API of sparse_transformer.cu, used by train.c, test_kernels.c and the tools.
//
// Memory passed to st_attention_* lives on the device: GPU memory in the GPU build, plain host memory in
// the CPU build. Allocate it with st_malloc and move data with st_to_device / st_to_host.
// Tensors are float32, row-major; shapes are written (B, H, T, D): batch, heads, positions, head size.
#ifndef SPARSE_TRANSFORMER_H
#define SPARSE_TRANSFORMER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------
// Device

// Checks that the device can run the kernels and returns its name. A GPU build started where no
// GPU is usable prints one line saying so and how to build for the CPU, and exits 1.
const char *st_device_init(void);
int st_device_is_gpu(void);        // 1 in the GPU build, 0 in the CPU build
void *st_malloc(size_t bytes); // exits 1 with the size asked for when memory runs out
void st_free(void *ptr);
void st_to_device(void *dst, const void *src, size_t bytes);
void st_to_host(void *dst, const void *src, size_t bytes);
void st_synchronize(void);

// ----------------------------------------------------------------------------
// Attention patterns (Child et al. 2019, section 4): positions are 0-based, always causal (j <= i).

typedef enum { ST_DENSE, ST_STRIDED, ST_FIXED } StPatternKind;
typedef enum { ST_INTERLEAVED, ST_MERGED, ST_MULTIHEAD } StCombine;

typedef struct {
    StPatternKind kind;
    StCombine combine; // how a layer uses the pattern's two steps; ignored by dense
    int stride;        // l: the stride (strided) or the block length (fixed)
    int summary;       // c: summary cells per block (fixed)
    int groups;        // G: summary groups; head h uses group h mod G (fixed)
} StPattern;

// Name <-> enum: "dense" "strided" "fixed"; "interleaved" "merged" "multihead". -1 for an unknown name.
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

// q, k, v, out: (B, H, T, D); lse: (B, H, T), the natural log of each row's softmax denominator
// (-inf for a query with no allowed key; its output is 0).
void st_attention_forward(StAttention *a, float *out, float *lse, const float *q, const float *k,
                          const float *v, int B);
// Overwrites dq, dk, dv (B, H, T, D) with the gradients of the loss given dout = dL/dout.
void st_attention_backward(StAttention *a, float *dq, float *dk, float *dv, const float *dout,
                           const float *out, const float *lse, const float *q, const float *k,
                           const float *v, int B);

#ifdef __cplusplus
}
#endif
#endif
