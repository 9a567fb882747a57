#!/usr/bin/env bash
# test_train.sh: ./train end to end, as a user runs it (called by .ci/run after make).
#   1. a short run on synthetic data: step lines, validation, checkpoint, final whole-split bpb
#   2. Ctrl-C in the middle of the same run, then -resume 1: the step lines equal the uninterrupted run's;
#      Ctrl-C during a validation reports no number for it (not the mean of the part it scored); kill
#      (SIGTERM) saves as Ctrl-C does
#   3. bad input: each gets one line on stderr and exit code 1
#   4. the final evaluation: every byte of the split but the first scored once, whatever the batch;
#      images: every image; -eval_bytes caps it
#   5. a save that fails midway (a file size limit) keeps the earlier checkpoint and exits 1
#   6. the training log (-log): a run killed after a checkpoint, then resumed, logs what a straight run does
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0 failed=0
ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1"; failed=$((failed + 1)); }

./build/datatool synthetic -bytes 100000 -period 32 2>/dev/null | ./build/datatool pack "$work/train.bin" -kind text
./build/datatool synthetic -bytes 20000 -period 32 -seed 2 2>/dev/null | ./build/datatool pack "$work/val.bin" -kind text
flags=(-i "$work" -ctx 64 -stride 8 -dim 64 -heads 2 -layers 2 -batch 4 -steps 16 -warmup 2 -eval_every 8
       -sample_every 8 -save_every 5)

# 1.
./train "${flags[@]}" -o "$work/a" -log "$work/a.tsv" > "$work/a.log" 2>&1 && a=0 || a=$?
steps=$(grep -c '^step [0-9]*/16 | loss [0-9.]* | [0-9.]* bpb | lr [0-9.e+-]* | [0-9]* ms | [0-9]* tok/s$' "$work/a.log" || true)
if [ $a = 0 ] && [ "$steps" = 16 ] && grep -q '^val .* bpb (step 8)' "$work/a.log" && grep -q '^sample: ' "$work/a.log" &&
   grep -q 'on the whole validation split: 19999 bytes scored' "$work/a.log" && [ -s "$work/a/model.bin" ]; then
    ok "a short run prints 16 step lines, validation, a sample, the final bpb, and saves model.bin"
else
    bad "short run (exit $a, $steps step lines)"; cat "$work/a.log"
fi
first=$(grep -m1 '^step 1/' "$work/a.log" | sed 's/.*| loss \([0-9.]*\).*/\1/')
last=$(grep '^step 16/' "$work/a.log" | sed 's/.*| loss \([0-9.]*\).*/\1/')
awk -v f="$first" -v l="$last" 'BEGIN { exit !(l < f - 0.3) }' && ok "the loss falls ($first -> $last)" || bad "the loss does not fall ($first -> $last)"

# 2.
# stop_at STEP "SIGNAL ..." LOG ARGS...: ./train ARGS in the background, its output in LOG; once LOG shows
# step STEP, each SIGNAL is sent at once, one after the other; rc is its exit code
stop_at() {
    local step=$1 signals=$2 log=$3 pid sig
    shift 3
    ./train "$@" > "$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 3000); do grep -q "^step $step/" "$log" 2>/dev/null && break; sleep 0.01; done
    for sig in $signals; do kill -"$sig" $pid; done
    wait $pid && rc=0 || rc=$?
}
stop_at 3 INT "$work/b1.log" "${flags[@]}" -o "$work/b"
./train "${flags[@]}" -o "$work/b" -resume 1 > "$work/b2.log" 2>&1
losses() { grep -hE '^(step|val|sample)' "$@" | sed 's/ | [0-9]* ms | .*//; s/ ([0-9]* windows, .*//'; }
if [ $rc = 130 ] && grep -q '^saved' "$work/b1.log" && [ "$(losses "$work/a.log")" = "$(losses "$work/b1.log" "$work/b2.log")" ]; then
    ok "Ctrl-C saves (exit 130); -resume 1 continues with the very losses, validations and samples of the run above"
else
    bad "interrupt and resume (exit $rc)"; diff <(losses "$work/a.log") <(losses "$work/b1.log" "$work/b2.log") || true
fi

# kill (SIGTERM, what a job scheduler sends) saves as Ctrl-C does
stop_at 3 "TERM TERM" "$work/t.log" "${flags[@]}" -o "$work/t" # twice, as `timeout` does (process, then group)
if [ $rc = 143 ] && grep -q '^saved' "$work/t.log" && ./train "${flags[@]}" -o "$work/t" -resume 1 > "$work/t2.log" 2>&1 &&
   grep -q '^step 16/' "$work/t2.log"; then
    ok "kill (SIGTERM), sent twice at once as timeout does, saves and stops (exit 143), and the run resumes"
else
    bad "SIGTERM (exit $rc)"; cat "$work/t.log"
fi

# Ctrl-C during a validation (a long one: all 19936 windows of the split, from step 2)
stop_at 2 INT "$work/v.log" "${flags[@]}" -o "$work/v" -eval_every 2 -eval_batches 5000 -log "$work/v.tsv"
if [ $rc = 130 ] && grep -q '^val (step 2) interrupted: not reported$' "$work/v.log" &&
   ! grep -q '^val [0-9]' "$work/v.log" && ! grep -q '^val' "$work/v.tsv" && grep -q '^saved' "$work/v.log"; then
    ok "Ctrl-C during a validation: no number reported or logged for it, the checkpoint saved (exit 130)"
else
    bad "Ctrl-C during a validation (exit $rc)"; cat "$work/v.log"
fi

# 3.
expect_error() { # expect_error WHAT PATTERN ARGS...: one line on stderr matching PATTERN, exit code 1
    local what=$1 pattern=$2
    shift 2
    ./train "$@" > "$work/out.log" 2> "$work/err.log" && rc=0 || rc=$?
    if [ $rc = 1 ] && [ "$(wc -l < "$work/err.log")" = 1 ] && grep -q "$pattern" "$work/err.log"; then
        ok "$what: $(cat "$work/err.log")"
    else
        bad "$what (exit $rc): $(cat "$work/err.log")"
    fi
}
expect_error "unknown flag" "unknown flag" -bogus 1
expect_error "malformed number" "expects a whole number" -steps 12x
expect_error "value out of range" "expects a number" -dropout 2
expect_error "missing data" "cannot open" -i "$work/nowhere"
expect_error "context the data cannot fill" "cannot fill a context" "${flags[@]}" -ctx 30000 -stride 100 -o "$work/c"
expect_error "pattern the shape does not allow" "summary_groups \* summary <= stride" "${flags[@]}" -pattern fixed -summary 5 -summary_groups 2 -o "$work/c"
expect_error "heads that do not divide the width" "does not divide" "${flags[@]}" -heads 3 -o "$work/c"
expect_error "resume with another model" "it was trained with -dim 64" "${flags[@]}" -dim 128 -heads 4 -o "$work/a" -resume 1
expect_error "resume with another dropout" "trained with -dropout 0" "${flags[@]}" -dropout 0.1 -o "$work/a" -resume 1
expect_error "resume without a checkpoint" "cannot open the checkpoint" "${flags[@]}" -o "$work/none" -resume 1
head -c 1000 "$work/a/model.bin" > "$work/a/cut.bin" && mkdir -p "$work/d" && mv "$work/a/cut.bin" "$work/d/model.bin"
expect_error "truncated checkpoint" "truncated" "${flags[@]}" -o "$work/d" -resume 1
expect_error "out of memory" "memory: asked for" "${flags[@]}" -ctx 4096 -stride 64 -batch 65535 -o "$work/c"
# NaN: a checkpoint whose Adam second moments are NaN (bytes 0xff) turns the parameters into NaN at its
# first update: the next loss is NaN, the run stops there and the checkpoint stays as it was.
# (NaN parameters themselves are refused when the checkpoint is loaded.)
mkdir -p "$work/g" && cp "$work/a/model.bin" "$work/g/model.bin"
n=$(( ($(stat -c %s "$work/g/model.bin") - 256) / 12 ))
head -c 4096 /dev/zero | tr '\0' '\377' | dd of="$work/g/model.bin" bs=1 seek=$((256 + 8 * n)) conv=notrunc status=none
cp "$work/g/model.bin" "$work/g/before.bin"
expect_error "NaN in training" "the loss became NaN at step 18" "${flags[@]}" -steps 20 -o "$work/g" -resume 1
cmp -s "$work/g/model.bin" "$work/g/before.bin" && ok "after the NaN, the last checkpoint is unchanged" || bad "the checkpoint changed after the NaN"
cp "$work/train.bin" "$work/t.bin" && head -c 5000 "$work/t.bin" > "$work/train.bin"
expect_error "truncated data file" "truncated" "${flags[@]}" -o "$work/e"
mv "$work/t.bin" "$work/train.bin"

# 4.
bpb() { sed -n 's/^val \([0-9.]*\) bpb on the .*/\1/p' "$1"; }
for b in 1 3 0; do
    ./train "${flags[@]}" -o "$work/a" -eval_only -eval_batch $b > "$work/eval$b.log" 2>&1 || true
done
if [ -n "$(bpb "$work/a.log")" ] && [ "$(bpb "$work/eval1.log")" = "$(bpb "$work/a.log")" ] &&
   [ "$(bpb "$work/eval3.log")" = "$(bpb "$work/a.log")" ] && [ "$(bpb "$work/eval0.log")" = "$(bpb "$work/a.log")" ] &&
   grep -q '19999 bytes scored' "$work/eval3.log"; then
    ok "-eval_only scores the checkpoint as the run's end did, at eval batch 1, 3 and the default: $(bpb "$work/a.log") bpb"
else
    bad "evaluation depends on the batch: $(bpb "$work/a.log") $(bpb "$work/eval1.log") $(bpb "$work/eval3.log") $(bpb "$work/eval0.log")"
fi
./train "${flags[@]}" -o "$work/a" -eval_only -eval_bytes 1000 > "$work/cap.log" 2>&1 || true
grep -q 'on the first 1001 bytes of the validation split: 1000 bytes scored' "$work/cap.log" &&
    ok "-eval_bytes 1000 scores 1000 bytes" || bad "-eval_bytes: $(tail -1 "$work/cap.log")"
# 37 images of 4 x 4 x 2 (32 bytes) for validation, contexts of 2 images: 18 windows of 2, then one
# last window for the 37th image. Every byte but the first is scored: 37 * 32 - 1 = 1183.
mkdir -p "$work/img"
head -c 64000 /dev/urandom | ./build/datatool pack "$work/img/train.bin" -kind image -height 4 -width 4 -channels 2
head -c 1184 /dev/urandom | ./build/datatool pack "$work/img/val.bin" -kind image -height 4 -width 4 -channels 2
./train -i "$work/img" -o "$work/img/out" -ctx 64 -stride 8 -dim 64 -heads 2 -layers 1 -batch 4 -steps 2 \
    -eval_every 0 > "$work/img.log" 2>&1 || true
grep -q 'on the whole validation split: 1183 bytes scored, every byte but the first (19 windows' "$work/img.log" &&
    ok "images: every one of 37 validation images scored (1183 bytes in 19 windows)" || bad "images: $(tail -1 "$work/img.log")"

# 5.
mkdir -p "$work/f" && cp "$work/a/model.bin" "$work/f/model.bin" && cp "$work/a/model.bin" "$work/f/before.bin"
limit=$(( $(stat -c %s "$work/a/model.bin") / 2048 )) # in 1024-byte blocks: half the checkpoint
( trap '' XFSZ; ulimit -f $limit; ./train "${flags[@]}" -steps 20 -o "$work/f" -resume 1 > "$work/out.log" 2> "$work/err.log" ) && rc=0 || rc=$?
if [ $rc = 1 ] && [ "$(wc -l < "$work/err.log")" = 1 ] && grep -q 'cannot write the checkpoint .*File too large; any earlier .* is unchanged' "$work/err.log" &&
   cmp -s "$work/f/model.bin" "$work/f/before.bin" && [ ! -e "$work/f/model.bin.tmp" ]; then
    ok "a save cut short by a file size limit: exit 1, the earlier checkpoint unchanged: $(cat "$work/err.log")"
else
    bad "failed save (exit $rc): $(cat "$work/err.log")"
fi

# 6. Killed (no save) after the checkpoint of step 10, at step 12 or later; the log then runs ahead of
# the checkpoint, and the resumed run must neither repeat nor lose a line.
stop_at 12 KILL "$work/k1.log" "${flags[@]}" -o "$work/k" -log "$work/k.tsv" 2>/dev/null
ahead=$(grep -c '^train' "$work/k.tsv" || true) # lines logged before the kill: more than the checkpoint's 10
./train "${flags[@]}" -o "$work/k" -log "$work/k.tsv" -resume 1 > "$work/k2.log" 2>&1 || true
columns() { grep -v '^#' "$1" | cut -f1-5; }
if [ "$ahead" -gt 10 ] && [ "$(columns "$work/a.tsv")" = "$(columns "$work/k.tsv")" ] && [ "$(grep -c '^train' "$work/a.tsv")" = 16 ] &&
   [ "$(grep -c '^val' "$work/a.tsv")" = 1 ] && [ "$(grep -c '^final' "$work/a.tsv")" = 1 ]; then
    ok "-log: 16 train lines, a validation, the final line; killed with $ahead steps logged, resumed from step 10: the same lines"
else
    bad "-log after a kill and resume"; diff <(columns "$work/a.tsv") <(columns "$work/k.tsv") | head -5
fi

echo "$passed passed, $failed failed"
[ $failed = 0 ]
