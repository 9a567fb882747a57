#!/usr/bin/env bash
# gpu_check.sh: everything to check on a machine with an NVIDIA GPU, in one go (GPU time is short and rare).
#   1. builds the GPU version (binaries only: no data set is needed from the network)
#   2. runs ./test_kernels on the GPU
#   3. make bench on the GPU
#   4. trains the GPU default model for 40 steps on the synthetic data set: tokens per second
#   5. samples 4096 bytes from a context-4096 model: bytes per second of the cached decoding
# Keeps the full logs and prints a short table last. About 3 minutes on an H100/H200.
# Usage: bash tools/gpu_check.sh [LOG_DIR]   (default: $OUT if set, else build/gpu_logs)
set -uo pipefail
cd "$(dirname "$0")/.."
logs="${1:-${OUT:-build/gpu_logs}}"
mkdir -p "$logs"
export PATH="$PATH:/usr/local/cuda/bin"

nvidia-smi -L > "$logs/gpu.txt" 2>&1 || echo "nvidia-smi failed" >> "$logs/gpu.txt"
start=$(date +%s)
make TARGET=gpu -j 4 train sample test_kernels build/datatool > "$logs/build.log" 2>&1; build=$?
tests=1 bench=1 train=1 sample=1
if [ $build = 0 ]; then
    ./test_kernels -v > "$logs/test_kernels.log" 2>&1; tests=$?
    make TARGET=gpu bench > "$logs/bench.log" 2>&1; bench=$?
    run=build/gpu_run
    mkdir -p "$run/data"
    ./build/datatool synthetic -bytes 4000000 2>/dev/null | head -c 3800000 | ./build/datatool pack "$run/data/train.bin" -kind text
    ./build/datatool synthetic -bytes 400000 -seed 2 2>/dev/null | ./build/datatool pack "$run/data/val.bin" -kind text
    ./train -i "$run/data" -o "$run/default" -steps 40 -eval_every 0 -sample_every 0 > "$logs/train.log" 2>&1; train=$?
    ./train -i "$run/data" -o "$run/ctx4096" -ctx 4096 -stride 64 -steps 1 -eval_every 0 -sample_every 0 > "$logs/train4096.log" 2>&1 &&
        ./sample -i "$run/ctx4096/model.bin" -n 4096 -o "$run/sample.txt" > "$logs/sample.log" 2>&1; sample=$?
fi

echo
echo "==== GPU check ($(( $(date +%s) - start )) s; logs in $logs)"
printf '%-8s %s\n' "gpu" "$(head -1 "$logs/gpu.txt")"
printf '%-8s %s\n' "build" "$([ $build = 0 ] && echo ok || echo "FAILED: $(tail -3 "$logs/build.log" | tr '\n' ' ')")"
printf '%-8s %s\n' "tests" "$(tail -1 "$logs/test_kernels.log" 2>/dev/null) (exit $tests)"
grep '^FAIL' "$logs/test_kernels.log" 2>/dev/null | head -5
if [ -f "$logs/bench.log" ]; then
    grep -E '^ *[0-9]+ +(dense|strided)' "$logs/bench.log" | awk '{printf "bench    n=%-6s %-8s %s ms\n", $1, $2, $(NF-2)}'
    printf '%-8s %s\n' "summary" "$(grep '^bench:' "$logs/bench.log")"
fi
[ -f "$logs/train.log" ] && printf '%-8s %s (exit %s)\n' "train" "$(grep '^model:' "$logs/train.log"); $(grep '^step 40/' "$logs/train.log")" $train
[ -f "$logs/sample.log" ] && printf '%-8s %s (exit %s)\n' "sample" "$(tail -1 "$logs/sample.log")" $sample
[ $build = 0 ] && [ $tests = 0 ] && [ $bench = 0 ] && [ $train = 0 ] && [ $sample = 0 ]
