/*
train.c: the training driver of the Sparse Transformer.

For now it holds the pattern viewer: `./train ... -show_pattern` prints, for every layer and head, which
keys each query may attend to, as a grid of '#' (allowed) and '.' (not allowed), row = query i,
column = key j. Training arrives with the model.

Flags are parsed llm.c style: every flag takes one value (-show_pattern may stand alone); -h lists them.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparse_transformer.h"

typedef struct {
    StPattern pattern;
    int ctx, dim, heads, layers, show_pattern;
} Config;

static void usage(const Config *c) {
    fprintf(stderr,
            "usage: ./train [flags]\n"
            "  -pattern P          dense | strided | fixed (default %s)\n"
            "  -combine C          interleaved | merged | multihead: how a layer uses the pattern's two\n"
            "                      steps (default %s; ignored by dense)\n"
            "  -ctx N              context length in bytes (default %d)\n"
            "  -stride L           stride (strided) or block length (fixed) (default %d)\n"
            "  -summary C          summary cells per block, fixed (default %d)\n"
            "  -summary_groups G   summary groups, head h uses group h mod G, fixed (default %d)\n"
            "  -dim D              model width (default %d)\n"
            "  -heads H            attention heads; must divide dim (default %d)\n"
            "  -layers R           residual blocks (default %d)\n"
            "  -show_pattern       print every layer's and head's attention mask and exit\n"
            "  -h                  this help\n",
            st_pattern_kind_name(c->pattern.kind), st_combine_name(c->pattern.combine), c->ctx,
            c->pattern.stride, c->pattern.summary, c->pattern.groups, c->dim, c->heads, c->layers);
}

// Parses a whole decimal integer in [lo, hi], or exits with a message naming the flag.
static int parse_int(const char *flag, const char *text, int lo, int hi) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < lo || value > hi) {
        fprintf(stderr, "%s expects a whole number from %d to %d, got '%s'\n", flag, lo, hi, text);
        exit(1);
    }
    return (int)value;
}

static void parse_args(Config *c, int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "-h") == 0 || strcmp(flag, "--help") == 0) { usage(c); exit(0); }
        // the one switch: "-show_pattern" alone means "-show_pattern 1"
        if (strcmp(flag, "-show_pattern") == 0 && (i + 1 >= argc || argv[i + 1][0] == '-')) {
            c->show_pattern = 1;
            continue;
        }
        if (flag[0] != '-' || i + 1 >= argc) {
            fprintf(stderr, "expected '-flag value', got '%s'%s (./train -h lists the flags)\n", flag,
                    flag[0] == '-' ? " without a value" : "");
            exit(1);
        }
        const char *value = argv[++i];
        if (strcmp(flag, "-pattern") == 0) {
            int kind = st_pattern_kind_from_name(value);
            if (kind < 0) { fprintf(stderr, "-pattern must be dense, strided or fixed, got '%s'\n", value); exit(1); }
            c->pattern.kind = (StPatternKind)kind;
        } else if (strcmp(flag, "-combine") == 0) {
            int combine = st_combine_from_name(value);
            if (combine < 0) {
                fprintf(stderr, "-combine must be interleaved, merged or multihead, got '%s'\n", value);
                exit(1);
            }
            c->pattern.combine = (StCombine)combine;
        } else if (strcmp(flag, "-ctx") == 0) c->ctx = parse_int(flag, value, 1, 1 << 24);
        else if (strcmp(flag, "-stride") == 0) c->pattern.stride = parse_int(flag, value, 1, 1 << 24);
        else if (strcmp(flag, "-summary") == 0) c->pattern.summary = parse_int(flag, value, 1, 1 << 24);
        else if (strcmp(flag, "-summary_groups") == 0) c->pattern.groups = parse_int(flag, value, 1, 1 << 24);
        else if (strcmp(flag, "-dim") == 0) c->dim = parse_int(flag, value, 1, 1 << 16);
        else if (strcmp(flag, "-heads") == 0) c->heads = parse_int(flag, value, 1, 1024);
        else if (strcmp(flag, "-layers") == 0) c->layers = parse_int(flag, value, 1, 4096);
        else if (strcmp(flag, "-show_pattern") == 0) c->show_pattern = parse_int(flag, value, 0, 1);
        else { fprintf(stderr, "unknown flag %s (./train -h lists the flags)\n", flag); exit(1); }
    }
}

// One grid per layer and head; a grid is `ctx` lines of `ctx` characters.
static void show_pattern(const Config *c) {
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

int main(int argc, char **argv) {
    Config c = {{ST_STRIDED, ST_MERGED, 32, 8, 1}, 1024, 256, 4, 4, 0};
    parse_args(&c, argc, argv);
    if (c.dim % c.heads != 0) {
        fprintf(stderr, "-heads %d does not divide -dim %d: choose dim = heads * head size\n", c.heads, c.dim);
        return 1;
    }
    const char *err = st_pattern_check(&c.pattern, c.ctx, c.heads, c.dim / c.heads);
    if (err) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (c.show_pattern) {
        printf("pattern %s, combine %s, ctx %d, stride %d", st_pattern_kind_name(c.pattern.kind),
               st_combine_name(c.pattern.combine), c.ctx, c.pattern.stride);
        if (c.pattern.kind == ST_FIXED) printf(", summary %d, summary_groups %d", c.pattern.summary, c.pattern.groups);
        printf("\n");
        show_pattern(&c);
        return 0;
    }
    fprintf(stderr, "training is not built yet: the model arrives next. For now, view the patterns with "
                    "./train -pattern strided -ctx 16 -stride 4 -show_pattern, and run make test\n");
    return 1;
}
