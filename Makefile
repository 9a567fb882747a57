# Makefile: builds the Sparse Transformer for an NVIDIA GPU or, from the same sources, for the CPU.
#
#   make            GPU build when nvcc is found and `nvidia-smi -L` lists a GPU, CPU build otherwise;
#                   also prepares the default data set once (data/prepare.sh default)
#                   (either trains on several processes, mpirun -np N ./train, where mpicc is found)
#   make cpu        force the CPU build (g++ compiles sparse_transformer.cu through cuda_on_cpu.h; needs
#                   OpenBLAS, Debian's libopenblas-openmp-dev, for its matrix products)
#   make gpu        force the GPU build (sm_80, sm_90 and PTX; compiles without a GPU, warnings are errors)
#   make test       build (no data needed), then run the emulator's test (tools/test_emulator.cpp), ./test_kernels
#                   (again with the GPU's 4 warps per tile block and a warp per row, on the CPU:
#                   build/warps4/test_kernels) and
#                   the loaders over the inputs that once crashed them (tools/fuzz/regressions/)
#   make fuzz       fuzz the checkpoint and data-file loaders with libFuzzer (clang), FUZZ_SECONDS each
#   make exercise   the classroom exercises' quicker build of the tests (build/exercise/test_kernels)
#   make bench      build, then time the attention (tools/bench.c; flags in BENCH_FLAGS="...")
#   make asan       CPU build with AddressSanitizer and UndefinedBehaviorSanitizer in build/asan/
#   make clean
#
# Binaries (train, sample, test_kernels) land in this folder; objects in build/<target>/.

CC ?= gcc
CXX ?= g++
NVCC ?= nvcc
CFLAGS = -O2 -std=c11 -Wall -Wextra -Werror
# -march=native: this CPU's vector width and FMA (nvcc fuses a * b + c too), with which the element-wise
# kernels run several threads at a time (cuda_on_cpu.h); the binaries are for the machine that builds them.
# -fno-trapping-math: no program here traps on floating-point exceptions, so the compiler may compute a
# guarded element (`if (e < n) y[e] = x[e] / ...`) for the whole vector and keep the lanes in range;
# without it, on a CPU without AVX-512's masked arithmetic, GELU and its backward stay scalar. Results
# are the same bits.
# -ftls-model=local-exec: the emulator's thread-locals (shared memory) live in executables only; GCC 12
# under register pressure otherwise emits a GOT access to them that GNU ld 2.40 cannot link.
# MARCH= another target: MARCH=-march=x86-64-v3 (any AVX2 machine: a laptop's speed on a machine with
# AVX-512), MARCH=-march=armv8-a (cross-compiled for arm64, tools/test_arm64.sh).
MARCH ?= -march=native
CPU_FLAGS = -O3 $(MARCH) -fno-trapping-math -ftls-model=local-exec -std=c++17 -fopenmp -Wall -Wextra -Werror -Wno-unknown-pragmas -x c++  # (#pragma unroll is for nvcc)
# clang (macOS's compiler; CC=clang CXX=clang++ elsewhere) knows `#pragma unroll` and warns where it cannot
# unroll a loop whose count only a template argument fixes on the GPU's path: the pragma is for nvcc.
IS_CLANG := $(if $(filter 0,$(shell $(CXX) --version 2>/dev/null | grep -c clang)),0,1)
ifeq ($(IS_CLANG),1)
  CPU_FLAGS += -Wno-pass-failed
endif
GPU_ARCHS = -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
            -gencode arch=compute_90,code=compute_90  # PTX too, for GPUs newer than sm_90
GPU_FLAGS = -O3 -std=c++17 $(GPU_ARCHS) -Werror all-warnings -Xptxas --warn-on-spills,--warning-as-error \
            -Xcompiler -Wall,-Wextra
LIBS = -lm -lpng
# The CPU build's cublasSgemm is OpenBLAS's (cuda_on_cpu.h). Debian ships OpenBLAS in variants (OpenMP,
# pthreads, serial) behind one name, libopenblas.so.0; with several installed the system resolves it to
# the pthreads one first, whose threads then fight the OpenMP threads of the kernels for the cores (half
# the speed). So the build links the OpenMP variant's own folder, with an rpath, wherever it is
# installed (libopenblas-openmp-dev); the programs check at start which variant they got.
OPENBLAS_OPENMP := $(firstword $(wildcard /usr/lib/$(shell $(CC) -print-multiarch 2>/dev/null)/openblas-openmp/libopenblas.so))
ifneq ($(OPENBLAS_OPENMP),)
  BLAS = -L$(dir $(OPENBLAS_OPENMP)) -Wl,-rpath,$(dir $(OPENBLAS_OPENMP)) -lopenblas
  BLAS_WHY = OpenBLAS, its OpenMP variant: $(dir $(OPENBLAS_OPENMP)), by rpath
else
  BLAS = -lopenblas
  BLAS_WHY = OpenBLAS as the system resolves libopenblas.so.0: its OpenMP variant is not installed (apt-get install libopenblas-openmp-dev)
endif
CPU_LIBS = $(LIBS) $(BLAS)

HAVE_NVCC := $(shell command -v $(NVCC) 2>/dev/null)
HAVE_GPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
ifeq ($(TARGET),)
  ifeq ($(HAVE_NVCC),)
    TARGET := cpu
    WHY := nvcc was not found
  else ifeq ($(HAVE_GPU),0)
    TARGET := cpu
    WHY := nvcc was found but nvidia-smi -L lists no GPU
  else
    TARGET := gpu
    WHY := nvcc was found and nvidia-smi -L lists a GPU
  endif
else
  WHY := asked for with TARGET=$(TARGET)
endif

BUILD = build/$(TARGET)
# Data-parallel training (mpirun -np N ./train) where MPI's compiler wrapper is found (Debian's
# openmpi-bin libopenmpi-dev): train.c is compiled with -DST_MPI and linked with MPI. The GPU build also
# looks for NCCL (nccl.h: CUDA's toolkit may ship it; NCCL_HOME=folder names another), which averages
# the gradients in GPU memory (-DST_NCCL); without NCCL they travel through the host. HAVE_MPI= (empty)
# builds without MPI.
HAVE_MPI := $(shell command -v mpicc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/,%,$(dir $(HAVE_NVCC)))
ifneq ($(HAVE_MPI),)
$(BUILD)/train.o: CFLAGS += -DST_MPI $(shell mpicc --showme:compile)
# (MPI's libraries by name and folder, with a run path: nvcc, the GPU build's linker, takes no -pthread)
MPI_DIRS := $(shell mpicc --showme:libdirs)
MPI_LIBS = $(addprefix -L,$(MPI_DIRS)) $(addprefix -l,$(shell mpicc --showme:libs)) $(addprefix -Xlinker -rpath -Xlinker ,$(MPI_DIRS))
ifeq ($(TARGET),gpu)
NCCL_H := $(firstword $(wildcard $(if $(NCCL_HOME),$(abspath $(NCCL_HOME))/include/nccl.h) $(CUDA_HOME)/include/nccl.h /usr/include/nccl.h))
ifneq ($(NCCL_H),)
NCCL_DIR = $(patsubst %/include/,%,$(dir $(NCCL_H)))
NCCL_LIB = $(patsubst %/,%,$(dir $(firstword $(wildcard $(NCCL_DIR)/lib/libnccl.so.2 $(NCCL_DIR)/lib64/libnccl.so.2 $(NCCL_DIR)/lib/x86_64-linux-gnu/libnccl.so.2))))
$(BUILD)/train.o: CFLAGS += -DST_NCCL -I$(NCCL_DIR)/include -I$(CUDA_HOME)/include
NCCL_LIBS = $(if $(NCCL_LIB),-L$(NCCL_LIB) -Xlinker -rpath -Xlinker $(NCCL_LIB)) -l:libnccl.so.2
NCCL_WHY = ; NCCL ($(NCCL_H)) averages the gradients in GPU memory
else
NCCL_WHY = ; no NCCL (no nccl.h in NCCL_HOME, $(CUDA_HOME) or /usr): the gradients go through the host
endif
endif
MPI_WHY = MPI (mpicc found): mpirun -np N ./train trains one model on N processes$(NCCL_WHY)
endif
MPI_WHY ?= no MPI: ./train runs as one process (for several: apt-get install openmpi-bin libopenmpi-dev, make clean && make)
BINARIES = train sample test_kernels
# The binaries are relinked whenever the target changes, and train.c recompiled whenever its MPI or NCCL
# does (build/target holds the last of each).
# (`make cpu` and `make gpu` only call make again with TARGET set: they leave it to that one.)
ifeq ($(filter cpu gpu,$(MAKECMDGOALS)),)
$(shell mkdir -p build && (echo $(TARGET) $(HAVE_MPI) $(NCCL_H) | cmp -s - build/target || echo $(TARGET) $(HAVE_MPI) $(NCCL_H) > build/target))
endif

.PHONY: all cpu gpu test bench asan fuzz clean announce exercise
.SECONDARY: # keep intermediate objects (the fuzz harness objects), so that nothing is rebuilt twice
all: announce $(BINARIES) data/default

# The default data set, made once and offline: kjv from Debian, else synthetic (data/prepare.sh says which).
data/default:
	bash data/prepare.sh default

announce:
	@echo "building for the $(TARGET) ($(WHY))"
	@if [ "$(TARGET)" != gpu ]; then echo "matrix products: $(BLAS_WHY)"; fi
	@echo "ranks: $(MPI_WHY)"

cpu:
	@$(MAKE) --no-print-directory TARGET=cpu all
gpu:
	@$(MAKE) --no-print-directory TARGET=gpu all

# Objects of both builds: C files by gcc, the .cu by nvcc (GPU) or by g++ through cuda_on_cpu.h (CPU).
COMPILE_C = @mkdir -p $(@D) && echo "$(CC) $(CFLAGS) -c $< -o $@" && $(CC) $(CFLAGS) -c $< -o $@
build/cpu/%.o: %.c sparse_transformer.h
	$(COMPILE_C)
build/gpu/%.o: %.c sparse_transformer.h
	$(COMPILE_C)
build/asan/%.o: %.c sparse_transformer.h
	$(COMPILE_C)
$(BUILD)/train.o: build/target # train.c again when its MPI or NCCL changes
build/cpu/datatool.o: data/datatool.c sparse_transformer.h
	$(COMPILE_C)

build/cpu/bench.o build/gpu/bench.o: tools/bench.c sparse_transformer.h
	$(COMPILE_C)

build/gpu/sparse_transformer.o: sparse_transformer.cu sparse_transformer.h
	@mkdir -p $(@D)
	$(NVCC) $(GPU_FLAGS) -c $< -o $@

build/cpu/sparse_transformer.o build/asan/sparse_transformer.o: sparse_transformer.cu sparse_transformer.h cuda_on_cpu.h
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) $(SANITIZE) -c $< -o $@

ifeq ($(TARGET),gpu)
LINK = $(NVCC) $(GPU_ARCHS) -lcublas
LINK_LIBS = $(LIBS)
else
LINK_LIBS = $(CPU_LIBS)
LINK = $(CXX) -fopenmp $(SANITIZE)
endif

train: $(BUILD)/train.o $(BUILD)/sparse_transformer.o build/target
	$(LINK) $(BUILD)/train.o $(BUILD)/sparse_transformer.o -o $@ $(LINK_LIBS) $(MPI_LIBS) $(NCCL_LIBS)

sample: $(BUILD)/sample.o $(BUILD)/sparse_transformer.o build/target
	$(LINK) $(BUILD)/sample.o $(BUILD)/sparse_transformer.o -o $@ $(LINK_LIBS)

test_kernels: $(BUILD)/test_kernels.o $(BUILD)/sparse_transformer.o build/target
	$(LINK) $(BUILD)/test_kernels.o $(BUILD)/sparse_transformer.o -o $@ $(LINK_LIBS)

$(BUILD)/bench: $(BUILD)/bench.o $(BUILD)/sparse_transformer.o build/target
	$(LINK) $(BUILD)/bench.o $(BUILD)/sparse_transformer.o -o $@ $(LINK_LIBS)

# The data tool and the emulator's own test are built for the CPU whatever the target.
build/datatool: build/cpu/datatool.o build/cpu/sparse_transformer.o
	$(CXX) -fopenmp $^ -o $@ $(CPU_LIBS)

build/test_emulator: tools/test_emulator.cpp cuda_on_cpu.h
	@mkdir -p build
	$(CXX) -O3 $(MARCH) -ftls-model=local-exec -std=c++17 -fopenmp -Wall -Wextra -Werror $(SANITIZE) $< -o $@ $(BLAS)

# The kernel tests once more with the GPU's block shapes: the CPU build's tile kernels have 1 warp, a
# GPU's 4 (WARPS in sparse_transformer.cu), its row kernels 1 thread per row, a GPU's a warp with
# shuffles (ROW_THREADS), its tile loads a thread per row, a GPU's 8 lanes (LOAD_LANES), so this
# checks, on the CPU, the layout a GPU runs.
build/warps4/sparse_transformer.o: sparse_transformer.cu sparse_transformer.h cuda_on_cpu.h
	@mkdir -p $(@D)
	$(CXX) $(CPU_FLAGS) -DWARPS=4 -DROW_THREADS=32 -DLOAD_LANES=8 -c $< -o $@
build/warps4/test_kernels: build/cpu/test_kernels.o build/warps4/sparse_transformer.o
	$(CXX) -fopenmp $^ -o $@ $(CPU_LIBS)

# The classroom exercises' build (tools/exercise.sh N check): the tests with the .cu compiled with light
# optimisation, its warnings shown but not fatal, so that unfinished code still runs its tests. A try
# (build + judge) must stay within 10 s on a 2-core laptop; measured on a 2-core AVX2 EPYC, 2026-12-07,
# build + the slowest judge (model_gradients): -O0 3.1 + 10.6 s, -Og 9.5 + 1.8 s, -Og with link-time
# optimisation run on every core (GCC's -flto=auto, which compiles the file's functions in parallel) and
# no exception tables 6.7 to 7.0 + 1.8 to 2.3 s. The judges are the same tests with the same tolerances; CI's builds
# keep -O3 and -Werror.
ifeq ($(IS_CLANG),1)
  EXERCISE_FLAGS = $(filter-out -O3 -Werror,$(CPU_FLAGS)) -Og -fno-exceptions
  EXERCISE_LINK =
else
  EXERCISE_FLAGS = $(filter-out -O3 -Werror,$(CPU_FLAGS)) -Og -fno-exceptions -flto
  EXERCISE_LINK = -Og -flto=auto $(MARCH)
endif
build/exercise/sparse_transformer.o: sparse_transformer.cu sparse_transformer.h cuda_on_cpu.h
	@mkdir -p $(@D)
	$(CXX) $(EXERCISE_FLAGS) -c $< -o $@
build/exercise/test_kernels: build/cpu/test_kernels.o build/exercise/sparse_transformer.o
	$(CXX) -fopenmp $(EXERCISE_LINK) $^ -o $@ $(CPU_LIBS)
exercise: build/exercise/test_kernels

# train.c without MPI, for tools/test_mpi.sh: started by mpirun with several processes, it must refuse.
build/nompi/train: train.c build/cpu/sparse_transformer.o sparse_transformer.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -c train.c -o build/nompi/train.o
	$(CXX) -fopenmp build/nompi/train.o build/cpu/sparse_transformer.o -o $@ $(CPU_LIBS)

# train.c's NCCL path on the CPU build, against tools/fake_nccl/nccl.h (MPI on host memory), for
# tools/test_mpi.sh: CI runs the GPU build's data-parallel code without a GPU.
build/fakenccl/train: train.c tools/fake_nccl/nccl.h build/cpu/sparse_transformer.o sparse_transformer.h
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -DST_MPI -DST_NCCL -Itools/fake_nccl $(shell mpicc --showme:compile) -c train.c -o build/fakenccl/train.o
	$(CXX) -fopenmp build/fakenccl/train.o build/cpu/sparse_transformer.o -o $@ $(CPU_LIBS) $(MPI_LIBS)

test: announce $(BINARIES) build/test_emulator build/warps4/test_kernels build/replay_checkpoint build/replay_data
	build/test_emulator
	./test_kernels
	build/warps4/test_kernels
	build/replay_checkpoint tools/fuzz/regressions/checkpoint
	build/replay_data tools/fuzz/regressions/data

bench: announce $(BUILD)/bench
	$(BUILD)/bench $(BENCH_FLAGS)

# Fuzzing the loaders (tools/fuzz/fuzz_loader.c, one source, a target per -DFUZZ_ name).
# The replays are the harness with a plain main, built like the tests; `make fuzz` builds it with clang
# and libFuzzer, writes fresh valid seeds, and runs each target for FUZZ_SECONDS from a fixed random
# seed. A crash stops it and leaves the input in build/fuzz/: add it to tools/fuzz/regressions/TARGET/.
FUZZ_SECONDS ?= 60
FUZZ_SANITIZE = -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
$(BUILD)/fuzz_%.o: tools/fuzz/fuzz_loader.c sparse_transformer.h
	$(CC) $(CFLAGS) -DFUZZ_$(shell echo $* | tr a-z A-Z) -c $< -o $@
$(BUILD)/replay.o: tools/fuzz/replay.c
	$(COMPILE_C)
build/replay_%: $(BUILD)/fuzz_%.o $(BUILD)/replay.o $(BUILD)/sparse_transformer.o build/target
	$(LINK) $(BUILD)/fuzz_$*.o $(BUILD)/replay.o $(BUILD)/sparse_transformer.o -o $@ $(LINK_LIBS)
build/fuzz_seeds: tools/fuzz/seeds.c build/cpu/sparse_transformer.o sparse_transformer.h
	$(CC) $(CFLAGS) -c $< -o build/cpu/seeds.o
	$(CXX) -fopenmp build/cpu/seeds.o build/cpu/sparse_transformer.o -o $@ $(CPU_LIBS)
build/fuzz/sparse_transformer.o: sparse_transformer.cu sparse_transformer.h cuda_on_cpu.h
	@mkdir -p $(@D)
	clang++ -std=c++17 -fopenmp -x c++ -Wall -Wextra -Werror -Wno-unknown-pragmas -Wno-pass-failed $(FUZZ_SANITIZE) \
	  -fsanitize=fuzzer-no-link -c $< -o $@
build/fuzz/fuzz_%: tools/fuzz/fuzz_loader.c build/fuzz/sparse_transformer.o sparse_transformer.h
	clang -std=c11 -Wall -Wextra -Werror $(FUZZ_SANITIZE) -fsanitize=fuzzer -DFUZZ_$(shell echo $* | tr a-z A-Z) \
	  -c $< -o $@.o
	clang++ -fopenmp $(FUZZ_SANITIZE) -fsanitize=fuzzer $@.o build/fuzz/sparse_transformer.o -o $@ $(CPU_LIBS)
fuzz: build/fuzz/fuzz_checkpoint build/fuzz/fuzz_data build/fuzz_seeds
	mkdir -p build/fuzz/corpus/checkpoint build/fuzz/corpus/data
	build/fuzz_seeds build/fuzz/corpus
	for t in checkpoint data; do \
	  build/fuzz/fuzz_$$t -seed=1 -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=4096 \
	    -artifact_prefix=build/fuzz/$$t- build/fuzz/corpus/$$t tools/fuzz/regressions/$$t || exit 1; \
	done

# Sanitizer build of the tests, kept apart from the normal binaries.
asan:
	@$(MAKE) --no-print-directory TARGET=cpu CFLAGS="$(CFLAGS) -g -fsanitize=address,undefined" \
	  SANITIZE="-g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer" build/asan/test_kernels

build/asan/test_kernels: build/asan/test_kernels.o build/asan/sparse_transformer.o
	$(LINK) $^ -o $@ $(LINK_LIBS)

clean:
	rm -rf build $(BINARIES)
