#!/usr/bin/env bash
# test_busy.sh: the CPU build on a busy machine (called by .ci/run after make).
# A student's laptop runs a browser or a compile beside ./train. With as many other CPU-bound programs
# as the machine has cores, a run must cost at most 4 times what it costs on the quiet machine (the
# emulator runs its launches on the cores others leave free: cuda_on_cpu.h, "Sharing the cores").
# Two commands, each timed quiet, then busy, then quiet again (the mean of the two quiet runs, so that
# a slow phase of the machine lands on both sides):
#   1. ./train -profile 20 (the default model's steps, on synthetic data)
#   2. ./test_kernels -only model_gradients (what `tools/exercise.sh 6 check` runs)
# Prints each ratio; exits 1 if one is above LIMIT (default 4). The ratio, not a time: the machine's
# speed cancels out.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
hogs=()
trap 'if [ ${#hogs[@]} -gt 0 ]; then kill "${hogs[@]}" 2> /dev/null || true; fi; rm -rf "$work"' EXIT
limit=${LIMIT:-4}
cores=$(nproc)
passed=0 failed=0

./build/datatool synthetic -bytes 200000 -period 64 2>/dev/null | ./build/datatool pack "$work/train.bin" -kind text
cp "$work/train.bin" "$work/val.bin"

seconds() { # seconds COMMAND...: its wall time
    local start end
    start=$(date +%s%N)
    "$@" > "$work/out.log" 2>&1 || { cat "$work/out.log"; echo "FAIL: $* exited with an error"; exit 1; }
    end=$(date +%s%N)
    echo $(( (end - start) / 1000000 ))
}
busy_ratio() { # busy_ratio NAME COMMAND...
    local name=$1 quiet1 quiet2 busy ratio
    shift
    quiet1=$(seconds "$@")
    for _ in $(seq "$cores"); do (while :; do :; done) & hogs+=($!); done
    busy=$(seconds "$@")
    kill "${hogs[@]}" 2>/dev/null; wait "${hogs[@]}" 2>/dev/null || true; hogs=()
    quiet2=$(seconds "$@")
    ratio=$(awk -v b="$busy" -v q1="$quiet1" -v q2="$quiet2" 'BEGIN { printf "%.2f", 2 * b / (q1 + q2) }')
    if awk -v r="$ratio" -v l="$limit" 'BEGIN { exit !(r <= l) }'; then
        echo "ok   $name: ${ratio}x its quiet time with $cores other programs busy (quiet $quiet1 and $quiet2 ms, busy $busy ms; at most ${limit}x)"
        passed=$((passed + 1))
    else
        echo "FAIL $name: ${ratio}x its quiet time with $cores other programs busy (quiet $quiet1 and $quiet2 ms, busy $busy ms; at most ${limit}x)"
        failed=$((failed + 1))
    fi
}

busy_ratio "./train -profile 20" ./train -i "$work" -o "$work/out" -profile 20
busy_ratio "./test_kernels -only model_gradients" ./test_kernels -only model_gradients
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
