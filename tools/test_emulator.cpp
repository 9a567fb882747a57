/*
test_emulator.cpp: checks cuda_on_cpu.h, the header that runs sparse_transformer.cu's kernels on a CPU.

The kernel tests trust the emulator to honour barriers and shared memory as a GPU does; this checks
that trust directly, and that a kernel with a barrier bug aborts with a clear message instead of
giving a wrong answer. Built and run by `make test` (always for the CPU). Last line: N passed, M failed.
*/
#include "../cuda_on_cpu.h"

#include <sys/wait.h>
#include <unistd.h>

#include <string>

static int passed = 0, failed = 0;

static void check(bool ok, const char *what) {
    ok ? passed++ : failed++;
    printf("%s %s\n", ok ? "ok  " : "FAIL", what);
}

// Each thread writes its slot of shared memory, then reads the slot of the thread opposite: wrong
// without the barrier, in one thread order or the other.
__global__ void reverse_through_shared(int *out) {
    __shared__ int slots[256];
    slots[threadIdx.x] = (int)(blockIdx.x * 1000 + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = slots[blockDim.x - 1 - threadIdx.x];
}

// Tree sum in dynamic shared memory: a barrier inside a loop, reached the same number of times by all.
extern __shared__ float smem[];
__global__ void block_sum(float *out, const float *x) {
    smem[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        __syncthreads();
        if (threadIdx.x < half) smem[threadIdx.x] += smem[threadIdx.x + half];
    }
    if (threadIdx.x == 0) out[blockIdx.x] = smem[0];
}

// No barrier: runs as plain calls. 2D blocks and grids, out-of-range threads return early.
__global__ void scale_2d(float *y, const float *x, int width, int height) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x, row = blockIdx.y * blockDim.y + threadIdx.y;
    if (col >= width || row >= height) return;
    y[row * width + col] = 2.0f * x[row * width + col];
}

// Barrier bugs: threads split between two barriers; a barrier that thread 0 skips.
__global__ void split_barriers(int *out) {
    if (threadIdx.x < 5) {
        __syncthreads();
        out[0] = 1;
    } else {
        __syncthreads();
    }
}
__global__ void thread0_skips_barrier(int *out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Runs `body` in a child process; true if it exits 1 and its stderr contains `expected`.
template <typename F> static bool aborts_with(F body, const char *expected) {
    int err[2];
    if (pipe(err) != 0) return false;
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        dup2(err[1], 2);
        close(err[0]);
        body();
        _exit(0);
    }
    close(err[1]);
    std::string text;
    char buf[512];
    for (ssize_t got; (got = read(err[0], buf, sizeof buf)) > 0;) text.append(buf, got);
    close(err[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) && WEXITSTATUS(status) == 1 && text.find(expected) != std::string::npos;
}

int main() {
    {
        const int blocks = 3, threads = 256;
        std::vector<int> out(blocks * threads, -1);
        KERNEL_LAUNCH(reverse_through_shared, blocks, threads, 0, out.data());
        bool ok = true;
        for (int b = 0; b < blocks; b++)
            for (int t = 0; t < threads; t++) ok = ok && out[b * threads + t] == b * 1000 + threads - 1 - t;
        check(ok, "__shared__ memory is shared by a block's threads and a barrier orders writes before reads");
    }
    {
        const int blocks = 5, threads = 128;
        std::vector<float> x(blocks * threads), out(blocks, NAN);
        for (size_t i = 0; i < x.size(); i++) x[i] = (float)(i % 7);
        KERNEL_LAUNCH(block_sum, blocks, threads, threads * sizeof(float), out.data(), x.data());
        bool ok = true;
        for (int b = 0; b < blocks; b++) {
            float want = 0;
            for (int t = 0; t < threads; t++) want += x[b * threads + t];
            ok = ok && out[b] == want;
        }
        check(ok, "barriers inside a loop, dynamic shared memory: block sums are exact");
    }
    {
        const int width = 37, height = 19;
        std::vector<float> x(width * height), y(width * height, NAN);
        for (size_t i = 0; i < x.size(); i++) x[i] = (float)i;
        KERNEL_LAUNCH(scale_2d, dim3(3, 2), dim3(16, 16), 0, y.data(), x.data(), width, height);
        bool ok = true;
        for (size_t i = 0; i < x.size(); i++) ok = ok && y[i] == 2.0f * x[i];
        check(ok, "a barrier-free kernel over a 2D grid of 2D blocks writes every element once");
    }
    int scratch[64] = {0};
    check(aborts_with([&] { KERNEL_LAUNCH(split_barriers, 1, 64, 0, scratch); }, "wait at different barriers"),
          "threads waiting at different barriers abort with both places named");
    check(aborts_with([&] { KERNEL_LAUNCH(thread0_skips_barrier, 1, 64, 0, scratch); },
                      "a barrier must be reached by every live thread"),
          "a barrier that thread 0 never reaches aborts with a clear message");
    check(aborts_with([&] { KERNEL_LAUNCH(block_sum, 1, 2048, 0, (float *)NULL, (const float *)NULL); },
                      "more than 1024 threads"),
          "a block of more than 1024 threads is refused");
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
