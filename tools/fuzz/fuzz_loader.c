/*
fuzz_loader.c: libFuzzer harnesses for the two file loaders, the checkpoint's and the data file's.

One source, two targets, chosen when it is compiled: -DFUZZ_CHECKPOINT (st_checkpoint_load) or
-DFUZZ_DATA (st_data_load). Each input is written to a file and handed to the loader, which must load
it or refuse it with a message; it must never crash, leak, read out of bounds, hit undefined behaviour,
or exit (libFuzzer reports an exit as a failure). Built two ways:
  - by clang with -fsanitize=fuzzer,address,undefined: `make fuzz` runs each target for a fixed
    budget from a seed corpus of valid files that build/fuzz_seeds makes (tools/fuzz/seeds.c);
  - by gcc with tools/fuzz/replay.c as its main: `make test` replays tools/fuzz/regressions/, the
    inputs that once crashed a loader, through it.
*/
#define _POSIX_C_SOURCE 200809L // mkstemp, fileno
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "../../sparse_transformer.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char path[64] = ""; // one scratch file per process, removed at exit
static void remove_scratch(void) { remove(path); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!path[0]) {
        snprintf(path, sizeof path, "/tmp/fuzz_loader_XXXXXX");
        const int fd = mkstemp(path);
        if (fd < 0) { perror("mkstemp"); abort(); }
        close(fd);
        atexit(remove_scratch);
    }
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) { perror(path); abort(); }
    const char *error = NULL;
#if defined(FUZZ_CHECKPOINT)
    StTrainState state;
    StModelConfig config;
    StModel *m = st_checkpoint_load(path, &state, &config, &error);
    if (!m == !error) abort(); // exactly one of a model and a message
    st_model_free(m);
#elif defined(FUZZ_DATA)
    StDataInfo info;
    unsigned char *bytes = st_data_load(path, &info, &error);
    if (!bytes == !error) abort();
    free(bytes);
#else
#error "compile with -DFUZZ_CHECKPOINT or -DFUZZ_DATA"
#endif
    return 0;
}
