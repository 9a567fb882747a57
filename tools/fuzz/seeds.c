/*
seeds.c: writes the fuzzers' seed corpus, valid files of every kind, to DIR/checkpoint and DIR/data:
  - checkpoints of the smallest models (width 32, one head, one layer) for every pattern and for text,
    image and audio data, saved after one training step so that Adam's moments are not zero;
  - data files of text, images and audio.
Usage: build/fuzz_seeds DIR (the folders must exist).
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../sparse_transformer.h"

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s DIR\n", argv[0]); return 1; }
    char path[4096];
    const StPattern patterns[] = {{ST_DENSE, ST_INTERLEAVED, 4, 1, 1}, {ST_STRIDED, ST_MERGED, 4, 1, 1},
                                  {ST_FIXED, ST_MERGED, 4, 1, 1}};
    const StDataInfo shapes[] = {{ST_TEXT, 0, 0, 0, 0, 0}, {ST_IMAGE, 2, 2, 4, 0, 0}, {ST_AUDIO, 0, 0, 0, 8000, 0}};
    unsigned char bytes[64];
    for (int i = 0; i < 64; i++) bytes[i] = (unsigned char)(i * 37 + 11);
    int files = 0;
    for (int k = 0; k < 3; k++) {
        StDataInfo info = shapes[k];
        info.n_bytes = sizeof bytes;
        snprintf(path, sizeof path, "%s/data/%s.bin", argv[1], st_data_kind_name(info.kind));
        const char *err = st_data_write(path, &info, bytes);
        if (err) { fprintf(stderr, "%s\n", err); return 1; }
        files++;
        for (int p = 0; p < 3; p++) {
            StModelConfig c = {16, 32, 1, 1, 1, patterns[p], 0.1f, p == 1, info.kind,
                               info.height, info.width, info.channels, info.sample_rate};
            StModel *m = st_model_create(&c, 1);
            st_model_forward(m, bytes, bytes + 1, 1, 1, 1);
            st_model_backward(m);
            st_model_update(m, 1e-3f, 0.01f, 1.0f, 1);
            const StTrainState state = {1, 12345, 1, 10, 2, 1, 1e-3f, 0.01f, 1.0f};
            snprintf(path, sizeof path, "%s/checkpoint/%s_%s.bin", argv[1], st_data_kind_name(info.kind),
                     st_pattern_kind_name(patterns[p].kind));
            err = st_checkpoint_save(path, m, &state);
            if (err) { fprintf(stderr, "%s\n", err); return 1; }
            st_model_free(m);
            files++;
        }
    }
    printf("fuzz_seeds: %d valid files in %s/checkpoint and %s/data\n", files, argv[1], argv[1]);
    return 0;
}
