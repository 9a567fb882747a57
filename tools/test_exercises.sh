#!/usr/bin/env bash
# tools/test_exercises.sh: proves that every exercise is real (CI runs it). For each exercise N:
#   1. `tools/exercise.sh N start` changes its file; it still compiles, and `check` then FAILS (the
#      TODO is not a solution);
#   2. `tools/exercise.sh N reset` gives back the file byte for byte, and `check` then passes.
# Its last line is "N passed, M failed"; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
result() { if [ "$1" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $2"; fi; }
mkdir -p build/exercises
for spec in tools/exercises/[0-9]*-*.txt; do
    n=$(basename "$spec" | cut -d- -f1)
    file=$(sed -n 's/^file: //p' "$spec")
    cp "$file" build/exercises/before
    tools/exercise.sh "$n" start > build/exercises/test.log 2>&1
    result $? "exercise $n: start failed (build/exercises/test.log)"
    ! cmp -s "$file" build/exercises/before
    result $? "exercise $n: start did not change $file"
    tools/exercise.sh "$n" check >> build/exercises/test.log 2>&1
    [ $? != 0 ] && grep -q "NOT YET: the tests above fail" build/exercises/test.log
    result $? "exercise $n: right after start, check did not compile and fail (build/exercises/test.log)"
    tools/exercise.sh "$n" reset >> build/exercises/test.log 2>&1
    cmp -s "$file" build/exercises/before
    result $? "exercise $n: reset did not restore $file byte for byte"
    tools/exercise.sh "$n" check >> build/exercises/test.log 2>&1
    result $? "exercise $n: check fails on the original code (build/exercises/test.log)"
    echo "exercise $n: start, check fails, reset, check passes"
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
