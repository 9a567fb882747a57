/*
replay.c: runs a fuzz target over given files, once each, without libFuzzer: the main that `make test`
links with tools/fuzz/fuzz_loader.c to replay the regression corpus (tools/fuzz/regressions/) with
gcc. Each argument is a file or a folder of files. A loader that crashes on one of them ends this
program with the crash; a clean pass prints how many inputs it replayed.
*/
#define _DEFAULT_SOURCE // DT_REG
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int replay_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "replay: cannot open %s\n", path); exit(1); }
    fseek(f, 0, SEEK_END);
    const long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *data = malloc(size > 0 ? (size_t)size : 1);
    if (!data || fread(data, 1, size, f) != (size_t)size) { fprintf(stderr, "replay: cannot read %s\n", path); exit(1); }
    fclose(f);
    LLVMFuzzerTestOneInput(data, (size_t)size);
    free(data);
    return 1;
}

int main(int argc, char **argv) {
    int count = 0;
    for (int i = 1; i < argc; i++) {
        DIR *dir = opendir(argv[i]);
        if (!dir) { count += replay_file(argv[i]); continue; }
        for (struct dirent *e; (e = readdir(dir));) {
            if (e->d_name[0] == '.') continue;
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", argv[i], e->d_name);
            count += replay_file(path);
        }
        closedir(dir);
    }
    printf("%s: %d inputs replayed, none crashed\n", argv[0], count);
    return count ? 0 : 1;
}
