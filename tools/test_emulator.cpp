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

// Blocks that differ: even blocks copy with no barrier, odd ones through shared memory, as a kernel whose
// blocks with no work return early (legal CUDA: every thread of a block takes the same branch).
__global__ void odd_blocks_reverse(int *out) {
    __shared__ int slots[256];
    const int at = blockIdx.x * blockDim.x + threadIdx.x;
    if (blockIdx.x % 2 == 0) {
        out[at] = at;
        return;
    }
    slots[threadIdx.x] = at;
    __syncthreads();
    out[at] = slots[blockDim.x - 1 - threadIdx.x];
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
__global__ void thread5_skips_barrier(int *out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// Tensor cores: each warp of the block computes its own D = A B + C (16 x 8 by 8 x 8, TF32 operands,
// float accumulators) with mma_tf32; warp w reads matrices w (row-major) and repeats the product w + 1
// times (warps meet at their collective operations independently), then all meet at a barrier. The
// fragments are taken and put back by PTX's lane map, written here from the PTX manual (group g = lane
// / 4, t = lane % 4), apart from the emulator's own: a product gathered by another map comes out wrong.
__device__ static int a_at(int e, int lane) { return (lane / 4 + 8 * (e % 2)) * 8 + lane % 4 + 4 * (e / 2); }
__device__ static int b_at(int e, int lane) { return (lane % 4 + 4 * e) * 8 + lane / 4; }
__device__ static int d_at(int e, int lane) { return (lane / 4 + 8 * (e / 2)) * 8 + 2 * (lane % 4) + e % 2; }
__global__ void mma_products(float *d, const float *a, const float *b, const float *c, int round) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    a += w * 128, b += w * 64, c += w * 128, d += w * 128;
    float fa[4], fb[2], fd[4];
    for (int e = 0; e < 4; e++) fa[e] = round ? to_tf32(a[a_at(e, lane)]) : a[a_at(e, lane)];
    for (int e = 0; e < 2; e++) fb[e] = round ? to_tf32(b[b_at(e, lane)]) : b[b_at(e, lane)];
    for (int e = 0; e < 4; e++) fd[e] = c[d_at(e, lane)];
    for (int rep = 0; rep <= w; rep++) mma_tf32(fd, fa, fb);
    __syncthreads();
    for (int e = 0; e < 4; e++) d[d_at(e, lane)] = fd[e];
}

// Collective bugs: lane 5 skips the product; lanes split between two products.
__global__ void lane_skips_mma(float *d) {
    float fa[4] = {1, 1, 1, 1}, fb[2] = {1, 1}, fd[4] = {};
    if (threadIdx.x == 5) return;
    mma_tf32(fd, fa, fb);
    d[threadIdx.x] = fd[0];
}
__global__ void lanes_split(float *d) {
    float fa[4] = {1, 1, 1, 1}, fb[2] = {1, 1}, fd[4] = {};
    if (threadIdx.x < 16) mma_tf32(fd, fa, fb);
    else mma_tf32(fd, fa, fb); // the same product, another place
    d[threadIdx.x] = fd[0];
}

// Warp shuffles: each lane's value is its lane number plus 100 times its warp; out[t] gets lane t ^ m's.
__global__ void shuffle_xor(float *out, int m) {
    out[blockIdx.x * blockDim.x + threadIdx.x] = __shfl_xor_sync(0xffffffffu, threadIdx.x % 32 + 100.0f * (threadIdx.x / 32), m);
}
__global__ void lane_skips_shuffle(float *out) {
    if (threadIdx.x == 7) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// No barrier, one element per thread and the last block's tail idle: the loop that runs such a block
// is vectorised (run_plain), so this checks that the lanes write exactly their own elements.
__global__ void sigmoid_elements(float *y, const float *x, size_t n) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) y[e] = 1.0f / (1.0f + expf(-x[e]));
}

// Device memory as cudaMalloc gives it (aligned), poisoned with NaN.
struct Buffer {
    float *p;
    size_t n;
    explicit Buffer(size_t count) : n(count) {
        cudaMalloc(&p, n * sizeof(float));
        for (size_t i = 0; i < n; i++) p[i] = NAN;
    }
    ~Buffer() { cudaFree(p); }
    float &operator[](size_t i) { return p[i]; }
    float *data() { return p; }
    float *begin() { return p; }
    float *end() { return p + n; }
};

static float bits_to_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// Runs `body` in a child process; true if it exits 1 and its stderr contains `expected`.
template <typename F> static bool aborts_with(F body, const char *expected) {
    int err[2];
    if (pipe(err) != 0) return false;
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        omp_set_num_threads(1); // the parent's OpenMP threads do not exist here: a team of them would hang
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

// The kernels that must abort, each in a child process. They run first, while this process has one
// thread: under qemu-user a fork beside OpenMP's idle threads hung the child now and then (2 runs in 20).
// The last check runs a launch here, and so starts those threads.
static void check_aborts() {
    int scratch[64] = {0};
    check(aborts_with([&] { KERNEL_LAUNCH(split_barriers, 1, 64, 0, scratch); }, "wait at different barriers"),
          "threads waiting at different barriers abort with both places named");
    check(aborts_with([&] { KERNEL_LAUNCH(thread0_skips_barrier, 1, 64, 0, scratch); },
                      "a barrier must be reached by every live thread"),
          "a barrier that thread 0 never reaches aborts with a clear message");
    check(aborts_with([&] { KERNEL_LAUNCH(thread5_skips_barrier, 1, 64, 0, scratch); },
                      "thread 5 finished while thread"),
          "a thread that finishes while the others wait at a barrier aborts, naming both");
    check(aborts_with([&] { KERNEL_LAUNCH(block_sum, 1, 2048, 0, (float *)NULL, (const float *)NULL); },
                      "more than 1024 threads"),
          "a block of more than 1024 threads is refused");
    {
        Buffer tiles(512);
        for (float &x : tiles) x = 1.0f;
        check(aborts_with([&] { KERNEL_LAUNCH(lane_skips_mma, 1, 32, 0, tiles.data()); }, "lane 5 has finished"),
              "a tensor-core product that lane 5 skips aborts, naming the lane and the place");
        check(aborts_with([&] { KERNEL_LAUNCH(lanes_split, 1, 32, 0, tiles.data()); }, "every lane of the warp must reach"),
              "lanes split between two tensor-core products abort with both places named");
    }
    {
        Buffer out(32);
        check(aborts_with([&] { KERNEL_LAUNCH(lane_skips_shuffle, 1, 32, 0, out.data()); }, "lane 7 has finished"),
              "a shuffle that lane 7 skips aborts, naming the lane and the place");
    }
    {
        // More than 48 KB of dynamic shared memory: only after the kernel opted in, as on a GPU
        const int threads = 128;
        std::vector<float> x(threads, 1.0f), out(1, NAN);
        const size_t big = 64 * 1024;
        const bool refused = aborts_with([&] { KERNEL_LAUNCH(block_sum, 1, threads, big, out.data(), x.data()); },
                                         "call cudaFuncSetAttribute");
        const bool opted = cudaFuncSetAttribute(block_sum, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)big) ==
                           cudaSuccess;
        KERNEL_LAUNCH(block_sum, 1, threads, big, out.data(), x.data());
        check(refused && opted && out[0] == (float)threads,
              "more than 48 KB of dynamic shared memory: refused before cudaFuncSetAttribute, run after it");
    }
}

int main() {
    check_aborts();
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
        const int blocks = 300, threads = 64; // enough blocks that each OS thread meets both kinds
        std::vector<int> out(blocks * threads, -1);
        KERNEL_LAUNCH(odd_blocks_reverse, blocks, threads, 0, out.data());
        bool ok = true;
        for (int b = 0; b < blocks; b++)
            for (int t = 0; t < threads; t++)
                ok = ok && out[b * threads + t] == b * threads + (b % 2 ? threads - 1 - t : t);
        check(ok, "blocks of one launch that differ in meeting a barrier each run right");
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
    {
        // TF32 rounding: to nearest with 10 explicit mantissa bits, ties away from zero (cvt.rna)
        const float one = 1.0f, ulp = ldexpf(1.0f, -10), half = ldexpf(1.0f, -11);
        const bool ok = to_tf32(one + half) == one + ulp &&            // a tie rounds away
                        to_tf32(-(one + half)) == -(one + ulp) &&
                        to_tf32(one + half - ldexpf(1.0f, -23)) == one && // below the tie: down
                        to_tf32(one + 3 * half) == one + 2 * ulp &&      // 1.5 ulp: a tie, away
                        to_tf32(bits_to_float(0x3f802000u)) == bits_to_float(0x3f802000u) &&
                        std::isnan(to_tf32(NAN)) && to_tf32(INFINITY) == INFINITY;
        check(ok, "to_tf32 rounds to nearest, 10 mantissa bits, ties away from zero; NaN and inf stay");
    }
    {
        // 4 warps, each its own product (a different number of times), against a double reference of
        // the same rounded operands. Rounded operands are exact in float and their products too
        // (11 x 11 bits); the sums of 8 terms err by at most 8 float roundings: 1e-6 relative.
        const int warps = 4;
        Buffer a(warps * 128), b(warps * 64), c(warps * 128), d(warps * 128);
        unsigned state = 12345;
        auto rnd = [&] { state = state * 1664525u + 1013904223u; return (float)(state >> 8) / 16777216.0f * 2 - 1; };
        for (auto &x : a) x = rnd();
        for (auto &x : b) x = rnd();
        for (auto &x : c) x = rnd();
        double worst = 0;
        for (int round = 1; round >= 0; round--) {
            KERNEL_LAUNCH(mma_products, 1, 32 * warps, 0, d.data(), a.data(), b.data(), c.data(), round);
            worst = 0;
            for (int w = 0; w < warps; w++)
                for (int r = 0; r < 16; r++)
                    for (int col = 0; col < 8; col++) {
                        double dot = 0;
                        for (int k = 0; k < 8; k++) {
                            const float x = a[w * 128 + r * 8 + k], y = b[w * 64 + k * 8 + col];
                            dot += (double)(round ? to_tf32(x) : cuda_emu::tf32_operand(x)) *
                                   (round ? to_tf32(y) : cuda_emu::tf32_operand(y));
                        }
                        const double want = c[w * 128 + r * 8 + col] + (w + 1) * dot;
                        worst = fmax(worst, fabs(d[w * 128 + r * 8 + col] - want) / (fabs(want) + 1));
                    }
            check(worst < 1e-6, round ? "mma_tf32 products of 4 warps, each at its own pace, by PTX's lane map: exact to float rounding"
                                      : "mma_tf32 reads unrounded operands' top 19 bits (truncation), as the hardware does");
        }
    }
    {
        Buffer out(128);
        bool ok = true;
        for (int m : {1, 2, 16, 31}) {
            KERNEL_LAUNCH(shuffle_xor, 2, 64, 0, out.data(), m);
            for (unsigned t = 0; t < 128; t++) ok = ok && out[t] == (float)((t % 32) ^ m) + 100.0f * (t % 64 / 32);
        }
        check(ok, "__shfl_xor_sync gives each lane the value of lane ^ mask, within its own warp");
    }
    {
        // expf and exp2f against exp and exp2 in double, over every 61st float of the range that reaches
        // past the overflow to inf and the gradual underflow to 0: CUDA promises 2 units in the last place
        // for both; these were 1.01 and 0.95 at worst over every float. Below 2^-126 a unit is 2^-149.
        auto worst_ulps = [](float (*f)(float), double (*want_of)(double), float lo, float hi, bool *specials) {
            double worst = 0;
            for (uint32_t u = 0; u < 0xffffffffu - 61; u += 61) {
                const float x = bits_to_float(u);
                if (!(x >= lo && x <= hi)) continue;
                const double want = want_of(x), ulp = ldexp(1.0, (want < 0x1p-126 ? -126 : ilogb(want)) - 23);
                const float got = f(x);
                if ((float)want == INFINITY || (float)want == 0.0f) *specials = *specials && (got == (float)want ||
                                                                                              fabs(got - want) <= ulp);
                else worst = fmax(worst, fabs(got - want) / ulp);
            }
            *specials = *specials && std::isnan(f(NAN)) && f(INFINITY) == INFINITY && f(-INFINITY) == 0.0f &&
                        f(0.0f) == 1.0f && f(-0.0f) == 1.0f;
            return worst;
        };
        bool specials = true;
        const double e = worst_ulps([](float x) { return expf(x); }, [](double x) { return exp(x); }, -110, 90, &specials);
        const double e2 = worst_ulps([](float x) { return exp2f(x); }, [](double x) { return exp2(x); }, -160, 130, &specials);
        printf("     expf: at most %.3f units in the last place off; exp2f: %.3f\n", e, e2);
        check(e <= 2.0 && e2 <= 2.0 && specials, "expf and exp2f are within 2 units in the last place (CUDA's bound); "
                                                 "inf, 0, NaN as exp and exp2");
    }
    {
        const size_t n = 1000; // 4 blocks of 256, the last one 24 threads short
        Buffer x(n), y(1024);
        for (size_t i = 0; i < n; i++) x[i] = (float)i / 50.0f - 10.0f;
        KERNEL_LAUNCH(sigmoid_elements, 4, 256, 0, y.data(), x.data(), n);
        bool ok = true;
        for (size_t i = 0; i < 1024; i++) ok = ok && (i < n ? y[i] == 1.0f / (1.0f + expf(-x[i])) : std::isnan(y[i]));
        check(ok, "an element-wise kernel run in vector lanes writes its elements, and nothing past the last");
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
