#!/usr/bin/env bash
# gpu_check.sh: everything to check on a machine with an NVIDIA GPU, in one go (GPU time is short and rare).
#   1. builds the GPU version for this GPU's architecture (binaries only: no data set from the network)
#   2. ./test_kernels on the GPU: every kernel in both precisions (fp32 and TF32 tensor cores), the model
#   3. make bench: dense and strided/merged, n = 1024 .. 262144, both precisions, effective TFLOP/s
#   4. ./train's GPU default for 30 steps on synthetic data (tokens/s), in tf32 and in fp32
#   5. one training step at a context of 1,048,576 bytes (a 3.3M-parameter model, as the paper's Table 4)
#   6. the PyTorch peers, when gpu_peer.py and torch_peer.py are found (PEERS, default build/peers, then
#      ../shared/tools): FlexAttention and SDPA forward + backward, and the same model trained with
#      FlexAttention, float32 with TF32 allowed, as ours runs
#   7. compute-sanitizer memcheck and racecheck on the kernel tests (tf32 and fp32; each step has a time
#      limit, and a machine that refuses the tool says so in the table)
# Each step has a time limit and keeps its full log; the short table comes last, and the logs of
# whatever finished come back even if the whole is cut short. About 6 to 8 minutes on an H200.
# Usage: bash tools/gpu_check.sh [LOG_DIR]   (default: $OUT if set, else build/gpu_logs)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
logs="${1:-${OUT:-build/gpu_logs}}"
mkdir -p "$logs"
export PATH="$PATH:/usr/local/cuda/bin"
peers="${PEERS:-build/peers}"
[ -f "$peers/gpu_peer.py" ] || peers=../shared/tools

# step NAME SECONDS COMMAND...: runs the command with a time limit, its output in $logs/NAME.log;
# records "NAME exit-code seconds" in $logs/steps.txt (exit 124: the time limit).
step() {
    local name=$1 limit=$2 t0 rc
    t0=$(date +%s)
    shift 2
    timeout "$limit" "$@" > "$logs/$name.log" 2>&1; rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$logs/steps.txt"
    return $rc
}
status() { awk -v n="$1" '$1 == n { printf "%s in %s s", ($2 == 0 ? "ok" : $2 == 124 ? "TIMED OUT" : "FAILED (exit " $2 ")"), $3 }' "$logs/steps.txt"; }

: > "$logs/steps.txt"
nvidia-smi -L > "$logs/gpu.txt" 2>&1 || echo "nvidia-smi failed" >> "$logs/gpu.txt"
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch="-gencode arch=compute_${cc:-90},code=sm_${cc:-90}" # this GPU only: half the build time
start=$(date +%s)
if step build 600 make TARGET=gpu GPU_ARCHS="$arch" -j 8 train sample test_kernels build/datatool build/gpu/bench; then
    step tests 300 ./test_kernels -v
    step bench 600 build/gpu/bench
    run=build/gpu_run
    mkdir -p "$run/data" "$run/long"
    ./build/datatool synthetic -bytes 4000000 2>/dev/null | head -c 3800000 | ./build/datatool pack "$run/data/train.bin" -kind text
    ./build/datatool synthetic -bytes 400000 -seed 2 2>/dev/null | ./build/datatool pack "$run/data/val.bin" -kind text
    ./build/datatool synthetic -bytes 1200000 -seed 3 2>/dev/null | ./build/datatool pack "$run/long/train.bin" -kind text
    cp "$run/long/train.bin" "$run/long/val.bin"
    quick=(-steps 30 -eval_every 0 -sample_every 0 -save_every 0 -eval_bytes 100000)
    step train_tf32 300 ./train -i "$run/data" -o "$run/tf32" -precision tf32 "${quick[@]}"
    step train_fp32 300 ./train -i "$run/data" -o "$run/fp32" -precision fp32 "${quick[@]}"
    step ctx1m 300 ./train -i "$run/long" -o "$run/ctx1m" -ctx 1048576 -dim 256 -heads 4 -layers 4 -stride 1024 \
        -recompute 1 -batch 1 -steps 1 -warmup 1 -eval_every 0 -sample_every 0 -eval_bytes 1
    if [ -f "$peers/gpu_peer.py" ]; then
        step peer_attention 400 python3 "$peers/gpu_peer.py" attention --sizes 8192,32768 --dtypes float32,bfloat16 --tf32 1
        step peer_train 300 python3 "$peers/gpu_peer.py" train --tf32 1
    else
        echo "peers: no gpu_peer.py in build/peers or ../shared/tools (copy them there)" > "$logs/peer_attention.log"
    fi
    if command -v compute-sanitizer > /dev/null; then
        step memcheck 240 compute-sanitizer --tool memcheck --error-exitcode 9 ./test_kernels -only kernels
        step racecheck 240 compute-sanitizer --tool racecheck --error-exitcode 9 ./test_kernels -only kernels -precision tf32
    else
        echo "compute-sanitizer not found" > "$logs/memcheck.log"
    fi
fi

echo
echo "==== GPU check $(date -u +%Y-%m-%d) ($(( $(date +%s) - start )) s; logs in $logs)"
printf '%-10s %s\n' "gpu" "$(head -1 "$logs/gpu.txt")"
printf '%-10s %s\n' "build" "$(status build)"
printf '%-10s %s: %s\n' "tests" "$(status tests)" "$(tail -1 "$logs/tests.log" 2>/dev/null)"
grep '^FAIL' "$logs/tests.log" 2>/dev/null | head -5
if [ -f "$logs/bench.log" ]; then
    printf '%-10s %s\n' "bench" "$(status bench)"
    grep -E '^ *[0-9]+ +(dense|strided)' "$logs/bench.log" | awk '{printf "  n=%-7s %-8s %-5s %10s ms %8s TFLOP/s\n", $1, $2, $(NF-4), $(NF-2), $(NF-1)}'
    grep '^bench:' "$logs/bench.log"
fi
for t in train_tf32 train_fp32 ctx1m; do
    [ -f "$logs/$t.log" ] && printf '%-10s %s: %s\n' "$t" "$(status $t)" \
        "$(grep -E '^(step [0-9]+/|val .* on |activations)' "$logs/$t.log" | tail -2 | tr '\n' ' ')"
done
for t in peer_attention peer_train; do
    [ -f "$logs/$t.log" ] && { printf '%-10s %s\n' "$t" "$(status $t)"; grep -E '^peer' "$logs/$t.log" | sed 's/^/  /'; }
done
for t in memcheck racecheck; do
    [ -f "$logs/$t.log" ] && printf '%-10s %s: %s\n' "$t" "$(status $t)" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|not found|passed' "$logs/$t.log" | tail -2 | tr '\n' ' ')"
done
awk '$2 != 0 { bad = 1 } END { exit bad }' "$logs/steps.txt"
