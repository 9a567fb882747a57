#!/usr/bin/env bash
# gpu_check.sh: everything to check on a machine with an NVIDIA GPU, in one go (GPU time is short and rare).
#   1. builds the GPU version for this GPU's architecture (binaries only: no data set from the network),
#      or, where that fails, takes the binaries that `prepare` (below) built and carried
#   2. ./test_kernels on the GPU: every kernel in both precisions (fp32 and TF32 tensor cores), the model
#   3. ./train's GPU default for 30 steps on synthetic data (tokens/s), in tf32; where its step's time
#      goes (profile: ./train -profile 20, CUDA events per kernel and product, and nsys where found); then the same under
#      mpirun -np 1 (nccl): the data-parallel path, its gradients averaged by NCCL, on one GPU, where the
#      machine has mpirun and the build found MPI and NCCL (NCCL_HOME: the toolkit's, else PyTorch's)
#   4. one training step at a context of 1,048,576 bytes (a 3.3M-parameter model, as the paper's Table 4)
#   5. make bench: dense and strided/merged, n = 1024 .. 262144, both precisions, effective TFLOP/s; then
#      strided to 65536 in tf32 with the backward's dS never kept (bench_recompute): does keeping it pay?
#   6. the PyTorch peers (tools/peers/gpu_peer.py, or PEERS=another folder), where python3 has PyTorch:
#      FlexAttention and SDPA forward + backward, and the same model trained with FlexAttention, float32
#      with TF32 allowed, as ours runs
#   7. compute-sanitizer racecheck (tf32) and memcheck on the kernel tests (a machine that refuses the tool
#      says so in the table), synccheck on all of ./test_kernels in fp32 (the barriers, and the row
#      kernels' warp shuffles and their masks), then ./train in fp32, and racecheck in fp32
# Each step has a time limit, cut to what is left of BUDGET seconds (default 480: a lent machine's call
# must end in time for its files to come back); what does not fit is marked skipped, and
# STEPS="racecheck memcheck ..." runs only the named steps (after the build) in a second call. Each
# step's status is printed when it ends; the short table comes last. Logs go to LOG_DIR (default
# build/gpu_logs); with $OUT set (a lent machine), steps.txt, table.txt and logs.tgz (every log) are
# refreshed there after each step, so that whatever finished comes back even if the call is cut short.
#
# A GPU machine lent for minutes may lack what the build needs (libpng's headers, OpenBLAS for the data
# tool) and cannot install it. So, first, on the machine you work on (with nvcc, no GPU needed):
#   bash tools/gpu_check.sh prepare
# builds the GPU binaries for sm_90 with libpng linked in and no MPI and writes the check's data files,
# all into build/gpu_carry/ (about 16 MB) for the GPU machine to receive. There the
# check builds if it can, and otherwise runs the carried binaries (the table says which).
# Usage: bash tools/gpu_check.sh [LOG_DIR]   (BUDGET=seconds, STEPS="names"; see above)
#        bash tools/gpu_check.sh prepare
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PATH="$PATH:/usr/local/cuda/bin"
carry=build/gpu_carry

# The check's data: synthetic text for the 30-step runs and for the 1,048,576-byte step.
make_data() { # make_data DATATOOL FOLDER
    mkdir -p "$2/data" "$2/long"
    "$1" synthetic -bytes 3800000 2>/dev/null | "$1" pack "$2/data/train.bin" -kind text &&
    "$1" synthetic -bytes 400000 -seed 2 2>/dev/null | "$1" pack "$2/data/val.bin" -kind text &&
    "$1" synthetic -bytes 1200000 -seed 3 2>/dev/null | "$1" pack "$2/long/train.bin" -kind text &&
    cp "$2/long/train.bin" "$2/long/val.bin"
}

if [ "${1:-}" = prepare ]; then
    make -s TARGET=cpu build/datatool > /dev/null || exit 1
    rm -rf "$carry" && mkdir -p "$carry/bin" || exit 1
    make_data build/datatool "$carry" || exit 1
    src=$(mktemp -d) && git archive HEAD | tar -x -C "$src" || exit 1 # the committed code, built apart
    png="-lm /usr/lib/x86_64-linux-gnu/libpng16.a /usr/lib/x86_64-linux-gnu/libz.a"
    make -C "$src" -s TARGET=gpu HAVE_MPI= GPU_ARCHS="-gencode arch=compute_90,code=sm_90" LIBS="$png" -j 2 \
        train sample test_kernels build/gpu/bench > /dev/null || exit 1
    cp "$src"/train "$src"/sample "$src"/test_kernels "$src"/build/gpu/bench "$carry/bin/" && rm -rf "$src"
    git rev-parse --short HEAD > "$carry/COMMIT"
    echo "gpu_check.sh: $carry is ready ($(du -sh "$carry" | cut -f1), code of commit $(git rev-parse --short HEAD));"
    echo "  on the GPU machine: bash tools/gpu_check.sh, with $carry carried there"
    exit 0
fi

logs="${1:-build/gpu_logs}"
mkdir -p "$logs"
peers="${PEERS:-tools/peers}"
# cuBLAS for carried binaries: the toolkit's, or the one PyTorch's Python packages bring
cublas=$(python3 -c 'import nvidia.cublas, os; print(os.path.dirname(nvidia.cublas.__file__) + "/lib")' 2>/dev/null)
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64${cublas:+:$cublas}"
# NCCL for the build (make looks in NCCL_HOME, then the toolkit): PyTorch's, where the toolkit has none
[ -f /usr/local/cuda/include/nccl.h ] || export NCCL_HOME="${NCCL_HOME:-$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))' 2>/dev/null)}"
start=$(date +%s)
deadline=$(( start + ${BUDGET:-480} ))
wanted=" build ${STEPS:-tests train_tf32 profile nccl ctx1m bench bench_recompute peer_attention peer_train peer_train_bf16 racecheck memcheck synccheck train_fp32 racecheck_fp32} "

# The profile step: where a training step of the GPU default goes, kernel by kernel (./train -profile:
# CUDA events), then Nsight Systems' per-kernel summary of the same, where nsys is found.
profile_steps() { # profile_steps DATA OUTPUT
    ./train -i "$1" -o "$2" -precision tf32 -profile 20 || return
    local nsys
    nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
    if [ -z "$nsys" ]; then echo "nsys: not found here (the table above is the profiler's own)"; return 0; fi
    "$nsys" profile -o "$2/nsys" --force-overwrite true ./train -i "$1" -o "$2" -precision tf32 -profile 10 > /dev/null &&
        "$nsys" stats --report cuda_gpu_kern_sum "$2/nsys.nsys-rep" | head -45 || echo "nsys: no report"
}

# step NAME SECONDS COMMAND...: runs the command with a time limit (cut to what is left of BUDGET), its
# output in $logs/NAME.log; records "NAME exit-code seconds" in $logs/steps.txt (exit 124: the time
# limit; "skipped": too little time was left), prints that at once, and refreshes the table (and $OUT).
step() {
    local name=$1 limit=$2 t0 rc left
    shift 2
    [[ "$wanted" == *" $name "* ]] || return 0
    left=$(( deadline - $(date +%s) - 5 ))
    if [ "$left" -lt 15 ]; then
        echo "$name skipped 0" >> "$logs/steps.txt"; echo "gpu_check: $name skipped (BUDGET spent)"; return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t0=$(date +%s)
    timeout "$limit" "$@" > "$logs/$name.log" 2>&1; rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$logs/steps.txt"
    echo "gpu_check: $name $(status "$name")"
    table > "$logs/table.txt"
    refresh_out
    return $rc
}
# What comes back from a lent machine ($OUT): a few files, the logs as one archive.
refresh_out() {
    [ -z "${OUT:-}" ] || { cp "$logs/steps.txt" "$logs/table.txt" "$OUT/" && tar -czf "$OUT/logs.tgz" -C "$logs" .; }
}
status() {
    awk -v n="$1" '$1 == n { printf "%s in %s s", ($2 == 0 ? "ok" : $2 == 124 ? "TIMED OUT" : $2 == "skipped" ? "skipped" : "FAILED (exit " $2 ")"), $3 }' "$logs/steps.txt"
}
table() {
    echo "==== GPU check $(date -u +%Y-%m-%d) ($(( $(date +%s) - start )) s; logs in $logs)"
    printf '%-10s %s\n' "gpu" "$(head -1 "$logs/gpu.txt")"
    printf '%-10s %s\n' "build" "$(status build); binaries: $binaries"
    printf '%-10s %s: %s\n' "tests" "$(status tests)" "$(tail -1 "$logs/tests.log" 2>/dev/null)"
    grep '^FAIL' "$logs/tests.log" 2>/dev/null | head -5
    if [ -f "$logs/bench.log" ]; then
        printf '%-10s %s\n' "bench" "$(status bench)"
        grep -E '^ *[0-9]+ +(dense|strided)' "$logs/bench.log" | awk '{printf "  n=%-7s %-8s %-5s %10s ms %8s TFLOP/s %8s us/tile\n", $1, $2, $(NF-5), $(NF-3), $(NF-2), $NF}'
        grep '^bench:' "$logs/bench.log"
    fi
    if [ -f "$logs/bench_recompute.log" ]; then
        printf '%-10s %s (dS never kept)\n' "bench_recompute" "$(status bench_recompute)"
        grep -E '^ *[0-9]+ +strided' "$logs/bench_recompute.log" | awk '{printf "  n=%-7s %-8s %-5s %10s ms %8s TFLOP/s %8s us/tile\n", $1, $2, $(NF-5), $(NF-3), $(NF-2), $NF}'
    fi
    if [ -f "$logs/profile.log" ]; then # the step's time and its ten largest rows
        printf '%-10s %s: %s\n' "profile" "$(status profile)" "$(grep '^profile: a step' "$logs/profile.log")"
        grep -A 11 '^profile: a step' "$logs/profile.log" | tail -n +3 | sed 's/^/  /'
    fi
    for t in train_tf32 nccl train_fp32 ctx1m; do
        [ -f "$logs/$t.log" ] && printf '%-10s %s: %s\n' "$t" "$(status $t)" \
            "$(grep -E '^(step [0-9]+/|val .* on |activations|not run)' "$logs/$t.log" | tail -2 | tr '\n' ' ')"
    done
    for t in peer_attention peer_train peer_train_bf16; do
        [ -f "$logs/$t.log" ] && { printf '%-10s %s\n' "$t" "$(status $t)"; grep -E '^peer' "$logs/$t.log" | sed 's/^/  /'; }
    done
    for t in memcheck racecheck synccheck racecheck_fp32; do
        [ -f "$logs/$t.log" ] && printf '%-10s %s: %s\n' "$t" "$(status $t)" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|not found|passed' "$logs/$t.log" | tail -2 | tr '\n' ' ')"
    done
}

: > "$logs/steps.txt"
nvidia-smi -L > "$logs/gpu.txt" 2>&1 || echo "nvidia-smi failed" >> "$logs/gpu.txt"
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch="-gencode arch=compute_${cc:-90},code=sm_${cc:-90}" # this GPU only: half the build time
here=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown commit")
# (a lent machine's copy may carry files newer than its HEAD: say so rather than name a commit it is not)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null | head -n 1)" ] || here="$here, with changes not in it"
have_binaries=1 binaries="built here (the working tree at $here)"
if ! step build 300 make TARGET=gpu GPU_ARCHS="$arch" -j 8 train sample test_kernels build/gpu/bench; then
    if [ -x "$carry/bin/train" ]; then # the binaries of `prepare` (sm_90)
        mkdir -p build/gpu && cp "$carry"/bin/{train,sample,test_kernels} . && cp "$carry/bin/bench" build/gpu/bench
        binaries="carried (tools/gpu_check.sh prepare, commit $(cat "$carry/COMMIT" 2>/dev/null)): the build here failed"
    else
        have_binaries=0 binaries="none: the build here failed, and nothing was carried (tools/gpu_check.sh prepare)"
    fi
fi
run=build/gpu_run data=build/gpu_run # the runs' outputs, and their data (carried, or made here)
mkdir -p "$run"
if [ -f "$carry/data/train.bin" ]; then data=$carry
else make -s TARGET=cpu build/datatool > "$logs/datatool.log" 2>&1 && make_data build/datatool "$data"; fi
if [ "$have_binaries" = 1 ]; then
    # In the order of what the check is for; BUDGET (seconds, default 480) cuts what does not fit, and
    # STEPS="name ..." runs a chosen few (e.g. the ones a first run had no time for).
    step tests 180 env CUDA_LAUNCH_BLOCKING=1 ./test_kernels -v # a fault reported where it happens
    quick=(-steps 30 -eval_every 0 -sample_every 0 -save_every 0 -eval_bytes 100000)
    step train_tf32 120 ./train -i "$data/data" -o "$run/tf32" -precision tf32 "${quick[@]}"
    step profile 90 bash -c "$(declare -f profile_steps); profile_steps '$data/data' '$run/profile'"
    # (grep reads all of ldd's output: with -q it could stop early, and pipefail would see ldd's SIGPIPE)
    if [[ "$wanted" != *" nccl "* ]]; then :
    elif ! ldd ./train 2>/dev/null | grep libnccl > /dev/null; then
        echo "not run: this ./train has no NCCL (make found no mpicc or no nccl.h here: see build.log's ranks line)" > "$logs/nccl.log"
    elif ! command -v mpirun > /dev/null; then
        echo "not run: no mpirun on this machine" > "$logs/nccl.log"
    else # (one process needs no ssh: a container may have none)
        step nccl 120 env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm_rsh_agent=false \
            mpirun -np 1 ./train -i "$data/data" -o "$run/nccl" -precision tf32 "${quick[@]}"
    fi
    step ctx1m 180 ./train -i "$data/long" -o "$run/ctx1m" -ctx 1048576 -dim 256 -heads 4 -layers 4 -stride 1024 \
        -recompute 1 -batch 1 -steps 1 -warmup 1 -eval_every 0 -sample_every 0 -eval_bytes 1
    step bench 240 build/gpu/bench
    step bench_recompute 60 build/gpu/bench -keep_ds 0 -precision tf32 -max_ctx 65536 -max_dense 1024
    if [ -f "$peers/gpu_peer.py" ] && python3 -c 'import torch' 2> /dev/null; then
        step peer_attention 240 python3 "$peers/gpu_peer.py" attention --sizes 8192,32768 --dtypes float32,bfloat16 --tf32 1
        step peer_train 180 python3 "$peers/gpu_peer.py" train --tf32 1
        step peer_train_bf16 120 python3 "$peers/gpu_peer.py" train --amp 1 # (the bar for our bf16, when it comes)
    else
        echo "peers: not run (no $peers/gpu_peer.py, or no python3 with PyTorch here)" > "$logs/peer_attention.log"
    fi
    if command -v compute-sanitizer > /dev/null; then
        step racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 ./test_kernels -only kernels -precision tf32
        step memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 ./test_kernels -only kernels
        step synccheck 150 compute-sanitizer --tool synccheck --error-exitcode 9 ./test_kernels -precision fp32
    else
        echo "compute-sanitizer not found" > "$logs/memcheck.log"
    fi
    step train_fp32 120 ./train -i "$data/data" -o "$run/fp32" -precision fp32 "${quick[@]}"
    command -v compute-sanitizer > /dev/null &&
        step racecheck_fp32 150 compute-sanitizer --tool racecheck --error-exitcode 9 ./test_kernels -only kernels -precision fp32
fi

echo
table | tee "$logs/table.txt"
refresh_out
awk '$2 != 0 { bad = 1 } END { exit bad }' "$logs/steps.txt"
