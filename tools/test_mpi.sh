#!/usr/bin/env bash
# tools/test_mpi.sh: one model trained by several processes with MPI (mpirun -np N ./train). CI runs it;
# it needs a ./train built with MPI (make finds mpicc: apt-get install openmpi-bin libopenmpi-dev).
#   1. 2 ranks with -batch 4 train as 1 process with -batch 8: every step's loss and the final validation
#      agree within 1e-4 relative (the same windows and the averaged gradients; only the order of the
#      float sums differs, about 1e-7); and only rank 0 writes: the -log file has one line per step;
#   2. 6 steps, then -resume 1 to step 12, under 2 ranks: the same losses as 12 steps at once; and
#      resumed by 1 process instead, the same stream (it takes -batch 8 from the checkpoint), while 3
#      ranks, which cannot share 8 windows, refuse;
#   3. ranks given different flags: a one-line error, exit 1, no hang;
#   4. a rank killed mid-run: the job ends with an error, and the checkpoint it leaves loads;
#   5. a ./train built without MPI, started by mpirun with 2 processes, refuses;
#   6. the GPU build's NCCL path of train.c, built with the CPU build against tools/fake_nccl/nccl.h (NCCL's
#      calls done with MPI on host memory): 2 ranks x -batch 4 as 1 process x -batch 8, as in 1.
# Everything runs under `timeout`: a hang fails. The last line is "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
result() { if [ "$1" = 0 ]; then passed=$((passed + 1)); echo "ok   $2"; else failed=$((failed + 1)); echo "FAIL $2"; fi; }
command -v mpirun > /dev/null || { echo "test_mpi.sh: no mpirun (apt-get install openmpi-bin libopenmpi-dev)"; exit 1; }
make -s build/datatool build/nompi/train build/fakenccl/train train > /dev/null || exit 1
dir=build/mpi_test
rm -rf "$dir" && mkdir -p "$dir/data"
build/datatool synthetic -bytes 200000 -period 32 -seed 3 2> /dev/null | build/datatool pack "$dir/data/train.bin" -kind text
build/datatool synthetic -bytes 20000 -period 32 -seed 4 2> /dev/null | build/datatool pack "$dir/data/val.bin" -kind text
export OMP_NUM_THREADS=1
mpi="timeout 120 mpirun --allow-run-as-root --oversubscribe"
model="-i $dir/data -ctx 128 -stride 11 -dim 64 -heads 2 -layers 2 -eval_every 0 -sample_every 0 -eval_bytes 8192"
# From a -log file (6 digits): each step's loss, and the final validation's
losses() { awk -F'\t' '$1 == "train" { print $2, $3 }' "$1"; }
final() { awk -F'\t' '$1 == "final" { v = $3 } END { if (v != "") print "final", v }' "$1"; }
# same A.tsv B.tsv TOLERANCE [WHAT]: the runs' step losses (and final validations, unless WHAT is "steps")
# are the same steps, each within TOLERANCE relative of the other
same() {
    local a b
    a=$(losses "$1"; [ "${4:-}" = steps ] || final "$1")
    b=$(losses "$2"; [ "${4:-}" = steps ] || final "$2")
    [ -n "$a" ] && [ "$(echo "$a" | wc -l)" = "$(echo "$b" | wc -l)" ] &&
        paste <(echo "$a") <(echo "$b") | awk -v tol="$3" '{ d = $2 - $4; if (d < 0) d = -d
            if ($1 != $3 || d > tol * ($2 > 0 ? $2 : -$2)) bad++ } END { exit bad > 0 }'
}

# 1.
./train $model -batch 8 -steps 12 -o "$dir/one" -log "$dir/one.tsv" > "$dir/one.log" 2>&1
$mpi -np 2 ./train $model -batch 4 -steps 12 -o "$dir/two" -log "$dir/two.tsv" > "$dir/two.log" 2>&1
result $? "2 ranks run ($dir/two.log)"
same "$dir/one.tsv" "$dir/two.tsv" 1e-4
result $? "2 ranks x batch 4 = 1 process x batch 8: 12 losses and the final validation within 1e-4 ($dir/one.tsv, $dir/two.tsv)"
[ "$(grep -c '^train' "$dir/two.tsv")" = 12 ] && [ "$(grep -c '^final' "$dir/two.tsv")" = 1 ]
result $? "only rank 0 writes: the log has 12 step lines and one final line ($dir/two.tsv)"

# 2.
$mpi -np 2 ./train $model -batch 4 -steps 6 -o "$dir/resumed" -log "$dir/resumed.tsv" > "$dir/resumed.log" 2>&1 &&
    $mpi -np 2 ./train $model -batch 4 -steps 12 -o "$dir/resumed" -resume 1 -log "$dir/resumed.tsv" >> "$dir/resumed.log" 2>&1
result $? "2 ranks: 6 steps, then resumed to 12 ($dir/resumed.log)"
same "$dir/two.tsv" "$dir/resumed.tsv" 0 steps
result $? "the resumed 2-rank run has the losses of the uninterrupted one, to the last digit"

# 2b. the windows of a step are in the checkpoint: 1 process resumes what 2 ranks began, as one stream
$mpi -np 2 ./train $model -batch 4 -steps 6 -o "$dir/handover" -log "$dir/handover.tsv" > "$dir/handover.log" 2>&1 &&
    ./train $model -steps 12 -o "$dir/handover" -resume 1 -log "$dir/handover.tsv" >> "$dir/handover.log" 2>&1 &&
    grep -q 'ranks: 2, each with -batch 4' "$dir/handover.log"
result $? "2 ranks for 6 steps, then 1 process resumes to step 12 ($dir/handover.log)"
same "$dir/two.tsv" "$dir/handover.tsv" 1e-4 steps
result $? "the handed-over run has the 2-rank run's losses within 1e-4: 1 process took -batch 8 from the checkpoint"
$mpi -np 3 ./train $model -steps 14 -o "$dir/handover" -resume 1 > "$dir/three.log" 2>&1
code=$?
[ $code != 0 ] && [ $code != 124 ] && grep -q 'its steps had 8 windows, which 3 ranks cannot share evenly' "$dir/three.log"
result $? "3 ranks cannot share a step of 8 windows: they say so (exit $code, $dir/three.log)"

# 3.
$mpi -np 1 ./train $model -batch 4 -steps 3 -lr 1e-3 -o "$dir/mixed" : -np 1 ./train $model -batch 4 -steps 3 -lr 2e-3 \
    -o "$dir/mixed" > "$dir/mixed.log" 2>&1
code=$?
[ $code != 0 ] && [ $code != 124 ] && grep -q 'ranks were given different flags or data' "$dir/mixed.log"
result $? "ranks with different flags: a clear error, no hang (exit $code, $dir/mixed.log)"

# 4.
$mpi -np 2 ./train $model -batch 4 -steps 100000 -save_every 5 -o "$dir/killed" > "$dir/killed.log" 2>&1 &
for _ in $(seq 600); do [ -f "$dir/killed/model.bin" ] && break; sleep 0.1; done
sleep 1
pkill -9 -n -f "train $model -batch 4 -steps 100000"
wait $!
code=$?
[ $code != 0 ] && [ $code != 124 ] && ./train -i "$dir/data" -o "$dir/killed" -eval_only -eval_bytes 4096 > "$dir/killed_eval.log" 2>&1
result $? "a rank killed: the job ends with an error (exit $code), its checkpoint loads ($dir/killed.log)"

# 5.
$mpi -np 2 build/nompi/train $model -batch 4 -steps 3 -o "$dir/nompi" > "$dir/nompi.log" 2>&1
code=$?
[ $code != 0 ] && [ $code != 124 ] && grep -q 'built without MPI but runs as one of 2 processes' "$dir/nompi.log"
result $? "a ./train without MPI started by mpirun refuses (exit $code, $dir/nompi.log)"

# 6.
$mpi -np 2 build/fakenccl/train $model -batch 4 -steps 12 -o "$dir/nccl" -log "$dir/nccl.tsv" > "$dir/nccl.log" 2>&1 &&
    [ "$(grep -c '^fake NCCL: communicator of rank [01] of 2$' "$dir/nccl.log")" = 2 ]
result $? "the GPU build's NCCL path, against a stand-in NCCL: 2 ranks run, each with a communicator ($dir/nccl.log)"
same "$dir/one.tsv" "$dir/nccl.tsv" 1e-4
result $? "the NCCL path: 2 ranks x batch 4 = 1 process x batch 8, 12 losses and the final validation within 1e-4"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
