/*
datatool.c: the small filters data/prepare.sh builds data sets with. Most read stdin and write stdout,
so that the shell can cut splits with head and tail:

  datatool pack FILE -kind text|image|audio [-height H -width W -channels C] [-rate R] < bytes
                                  writes FILE in the trainer's format (sparse_transformer.h, "Data files")
  datatool info FILE              checks FILE's header and size, prints kind, shape and bytes
  datatool idx < images.idx3      IDX3 images (MNIST layout) -> raw bytes, one image after the other
  datatool cifar < data_batch.bin CIFAR-10 binary records -> images in (row, column, channel) order
  datatool mulaw < samples.s16    signed 16-bit little-endian samples -> 8-bit mu-law bytes
  datatool synthetic -bytes N [-period P] [-noise E] [-seed S]   the synthetic data set (sparse_transformer.h;
                                  period 65 and noise 5% unless given)

Every error is one line on stderr and exit code 1.
*/
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../sparse_transformer.h"

static void fail(const char *what) {
    fprintf(stderr, "datatool: %s\n", what);
    exit(1);
}

// All of stdin, in memory.
static unsigned char *read_stdin(size_t *n) {
    size_t cap = 1 << 20, len = 0;
    unsigned char *buf = malloc(cap);
    for (size_t got; buf && (got = fread(buf + len, 1, cap - len, stdin)) > 0;) {
        len += got;
        if (len == cap) buf = realloc(buf, cap *= 2);
    }
    if (!buf) fail("out of memory reading the input");
    *n = len;
    return buf;
}

static void write_stdout(const unsigned char *bytes, size_t n) {
    if (fwrite(bytes, 1, n, stdout) != n) fail("cannot write the output");
}

static long flag_long(int argc, char **argv, const char *flag, long fallback, long lo, long hi) {
    for (int i = 0; i + 1 < argc; i++) {
        if (strcmp(argv[i], flag) != 0) continue;
        char *end;
        long v = strtol(argv[i + 1], &end, 10);
        if (*end != '\0' || v < lo || v > hi) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s expects a whole number from %ld to %ld, got '%s'", flag, lo, hi, argv[i + 1]);
            fail(msg);
        }
        return v;
    }
    return fallback;
}

static const char *flag_text(int argc, char **argv, const char *flag) {
    for (int i = 0; i + 1 < argc; i++)
        if (strcmp(argv[i], flag) == 0) return argv[i + 1];
    return NULL;
}

static int pack(int argc, char **argv) {
    if (argc < 3) fail("usage: datatool pack FILE -kind text|image|audio [-height H -width W -channels C] [-rate R]");
    const char *kind = flag_text(argc, argv, "-kind");
    StDataInfo info = {ST_TEXT, 0, 0, 0, 0, 0};
    if (!kind || strcmp(kind, "text") == 0) info.kind = ST_TEXT;
    else if (strcmp(kind, "image") == 0) info.kind = ST_IMAGE;
    else if (strcmp(kind, "audio") == 0) info.kind = ST_AUDIO;
    else fail("-kind must be text, image or audio");
    info.height = (int)flag_long(argc, argv, "-height", 0, 0, 1 << 16);
    info.width = (int)flag_long(argc, argv, "-width", 0, 0, 1 << 16);
    info.channels = (int)flag_long(argc, argv, "-channels", 0, 0, 64);
    info.sample_rate = (int)flag_long(argc, argv, "-rate", 0, 0, 1 << 24);
    unsigned char *bytes = read_stdin(&info.n_bytes);
    if (info.n_bytes == 0) fail("no input bytes: the source is empty or missing");
    const char *err = st_data_write(argv[2], &info, bytes);
    if (err) fail(err);
    free(bytes);
    return 0;
}

static int info(int argc, char **argv) {
    if (argc < 3) fail("usage: datatool info FILE");
    StDataInfo d;
    const char *err = st_data_read_info(argv[2], &d);
    if (err) fail(err);
    printf("%s: %s, %zu bytes", argv[2], st_data_kind_name(d.kind), d.n_bytes);
    if (d.kind == ST_IMAGE)
        printf(", %zu images of %d x %d x %d", d.n_bytes / ((size_t)d.height * d.width * d.channels), d.height,
               d.width, d.channels);
    if (d.kind == ST_AUDIO) printf(", %.1f s at %d Hz (mu-law)", (double)d.n_bytes / d.sample_rate, d.sample_rate);
    printf("\n");
    return 0;
}

static uint32_t big_endian_u32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

// IDX3: magic 0x00000803, then counts of images, rows, columns (big-endian), then the pixels.
static int idx(void) {
    size_t n;
    unsigned char *in = read_stdin(&n);
    if (n < 16 || big_endian_u32(in) != 0x803) fail("input is not an IDX3 image file (bad magic)");
    const size_t images = big_endian_u32(in + 4), rows = big_endian_u32(in + 8), cols = big_endian_u32(in + 12);
    if (n != 16 + images * rows * cols) fail("IDX3 file is truncated: its header promises more pixels");
    write_stdout(in + 16, n - 16);
    fprintf(stderr, "datatool idx: %zu images of %zu x %zu\n", images, rows, cols);
    free(in);
    return 0;
}

// CIFAR-10 binary: records of 1 label byte and 3072 pixel bytes, stored as 3 planes (R, G, B) of 32 x 32.
// The Sparse Transformer reads an image in raster order with the channels of a pixel together.
static int cifar(void) {
    const int side = 32, channels = 3, pixels = side * side, record = 1 + channels * pixels;
    size_t n;
    unsigned char *in = read_stdin(&n), image[3 * 32 * 32];
    if (n == 0 || n % record) fail("input is not CIFAR-10 binary data (size is not a multiple of 3073)");
    for (size_t r = 0; r < n / record; r++) {
        const unsigned char *planes = in + r * record + 1;
        for (int p = 0; p < pixels; p++)
            for (int c = 0; c < channels; c++) image[p * channels + c] = planes[c * pixels + p];
        write_stdout(image, sizeof image);
    }
    free(in);
    return 0;
}

static int mulaw(void) {
    size_t n;
    unsigned char *in = read_stdin(&n);
    for (size_t i = 0; i + 1 < n; i += 2) {
        const int16_t sample = (int16_t)(in[i] | in[i + 1] << 8);
        in[i / 2] = st_mulaw_encode(sample / 32768.0f);
    }
    write_stdout(in, n / 2);
    free(in);
    return 0;
}

static int synthetic(int argc, char **argv) {
    const char *known[] = {"-bytes", "-period", "-noise", "-seed"};
    for (int i = 2; i < argc; i += 2) {
        int ok = 0;
        for (int k = 0; k < 4; k++) ok |= strcmp(argv[i], known[k]) == 0;
        if (!ok || i + 1 >= argc) {
            char msg[256];
            snprintf(msg, sizeof msg, "synthetic takes -bytes N -period P -noise PERCENT -seed S, not '%s'", argv[i]);
            fail(msg);
        }
    }
    const size_t n = (size_t)flag_long(argc, argv, "-bytes", -1, 1, 1L << 34);
    const int period = (int)flag_long(argc, argv, "-period", 65, 2, 1 << 24);
    const long noise_percent = flag_long(argc, argv, "-noise", 5, 0, 100);
    const unsigned long long seed = (unsigned long long)flag_long(argc, argv, "-seed", 1, 0, 1L << 62);
    if (n == (size_t)-1) fail("usage: datatool synthetic -bytes N [-period P] [-noise PERCENT] [-seed S]");
    unsigned char *out = malloc(n);
    if (!out) fail("out of memory");
    st_synthetic(out, n, period, noise_percent / 100.0, seed);
    write_stdout(out, n);
    fprintf(stderr, "datatool synthetic: period %d, noise %ld%%: %.3f bits per byte is the best a model can do\n",
            period, noise_percent, st_synthetic_entropy(period, noise_percent / 100.0));
    free(out);
    return 0;
}

int main(int argc, char **argv) {
    const char *cmd = argc > 1 ? argv[1] : "";
    if (strcmp(cmd, "pack") == 0) return pack(argc, argv);
    if (strcmp(cmd, "info") == 0) return info(argc, argv);
    if (strcmp(cmd, "idx") == 0) return idx();
    if (strcmp(cmd, "cifar") == 0) return cifar();
    if (strcmp(cmd, "mulaw") == 0) return mulaw();
    if (strcmp(cmd, "synthetic") == 0) return synthetic(argc, argv);
    fail("usage: datatool pack|info|idx|cifar|mulaw|synthetic ... (see the comment at the top of data/datatool.c)");
    return 1;
}
