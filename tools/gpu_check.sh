#!/usr/bin/env bash
# gpu_check.sh: everything to check on a machine with an NVIDIA GPU, in one go (GPU time is short and rare).
#   builds the GPU version, runs ./test_kernels and make bench there, keeps the full logs, and prints a
#   short table last. Takes about 2 minutes on an H100/H200.
# Usage: bash tools/gpu_check.sh [LOG_DIR]   (default: $OUT if set, else build/gpu_logs)
set -uo pipefail
cd "$(dirname "$0")/.."
logs="${1:-${OUT:-build/gpu_logs}}"
mkdir -p "$logs"
export PATH="$PATH:/usr/local/cuda/bin"

nvidia-smi -L > "$logs/gpu.txt" 2>&1 || echo "nvidia-smi failed" >> "$logs/gpu.txt"
start=$(date +%s)
make TARGET=gpu -j 4 train test_kernels > "$logs/build.log" 2>&1; build=$?  # binaries only: no data needed
tests=1; bench=1
if [ $build = 0 ]; then
    ./test_kernels -v > "$logs/test_kernels.log" 2>&1; tests=$?
    make TARGET=gpu bench > "$logs/bench.log" 2>&1; bench=$?
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
[ $build = 0 ] && [ $tests = 0 ] && [ $bench = 0 ]
