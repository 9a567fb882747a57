#!/usr/bin/env bash
# tools/test_exercises.sh: proves that every exercise is real and that its feedback is right (CI runs it).
# For each exercise N:
#   1. `check` before `start` refuses: NOT STARTED, exit 1 (the code there is the original);
#   2. `task` prints the task's text again;
#   3. `tools/exercise.sh N start` changes its file; it still compiles, and `check` then FAILS (the
#      TODO is not a solution);
#   4. the original code typed back in (as a student who found it would) is SOLVED;
#   5. a planted mistake, for the exercises that have one below: `check` fails, and its first line
#      names the quantity that is wrong;
#   6. `tools/exercise.sh N reset` gives back the file byte for byte.
# Then `-h` prints the usage on stdout with exit 0, and a usage error exits 1.
# Its last line is "N passed, M failed"; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
result() { if [ "$1" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $2"; fi; }
mkdir -p build/exercises
log=build/exercises/test.log

# Planted mistakes, one per kernel exercise and one in the model: the exercise, the text of the original
# code, the mistake put in its place, and what the first line of `check` must then say, separated by @.
plants=(
    "2@const int i = t * st.l + r;@const int i = r * st.l + t;@NOT YET: forward output wrong"
    "3@row_sum = row_sum * alpha + tile_sum;@row_sum = row_sum + tile_sum;@the rescale alpha"
    "4@merged == -INFINITY || row_sum == 0.0f ? 0.0f : expf(lse_new - merged) / row_sum@expf(lse_new - merged) / row_sum@out has NaN"
    "5@p * (dS_s[r * S::SROW + c] - delta_s[r])@p * dS_s[r * S::SROW + c]@only the backward is wrong"
    "7@(s + 1.702f * x[e] * s * (1.0f - s))@(s + x[e] * s * (1.0f - s))@every one upstream of h1.fc2w"
    "10@p - st.l + 1 ? p - p % st.column : p - st.l + 1@p - st.l ? p - p % st.column : p - st.l@forward output wrong (fp32 dilated"
)

# fill N FILE CODE: the lines between exercise N's signposts in FILE become the file CODE.
fill() {
    local b e
    b=$(grep -n "Exercise $1 starts here:" "$2" | cut -d: -f1)
    e=$(grep -n "Exercise $1 ends here\." "$2" | cut -d: -f1)
    { head -n "$b" "$2"; cat "$3"; tail -n +"$e" "$2"; } > "$2.tmp" && mv "$2.tmp" "$2"
}
# plant N FROM TO: exercise N's original code with the literal text FROM replaced by TO.
plant() {
    awk -v from="$2" -v to="$3" '{ i = index($0, from); if (i) { $0 = substr($0, 1, i - 1) to substr($0, i + length(from)); n++ }
                                   print } END { if (n != 1) exit 1 }' "build/exercises/$1.orig"
}

for spec in tools/exercises/[0-9]*-*.txt; do
    n=$(basename "$spec" | cut -d- -f1)
    file=$(sed -n 's/^file: //p' "$spec")
    cp "$file" build/exercises/before
    tools/exercise.sh "$n" check > "$log" 2>&1
    [ $? != 0 ] && grep -q "exercise $n: NOT STARTED" "$log"
    result $? "exercise $n: check before start did not refuse ($log)"
    tools/exercise.sh "$n" task > "$log" 2>&1 && grep -qF "$(sed -n 5p "$spec")" "$log"
    result $? "exercise $n: task did not print the task ($log)"

    tools/exercise.sh "$n" start > "$log" 2>&1
    result $? "exercise $n: start failed ($log)"
    ! cmp -s "$file" build/exercises/before
    result $? "exercise $n: start did not change $file"
    tools/exercise.sh "$n" check > "$log" 2>&1
    [ $? != 0 ] && grep -q "exercise $n: NOT YET: " "$log" && ! grep -q 'does not compile' "$log"
    result $? "exercise $n: right after start, check did not compile and fail ($log)"

    fill "$n" "$file" "build/exercises/$n.orig"
    tools/exercise.sh "$n" check > "$log" 2>&1 && grep -q "exercise $n: SOLVED" "$log"
    result $? "exercise $n: the original code typed back in is not SOLVED ($log)"

    for p in "${plants[@]}"; do
        IFS='@' read -r pn from to expect <<< "$p"
        [ "$pn" = "$n" ] || continue
        plant "$n" "$from" "$to" > build/exercises/planted
        result $? "exercise $n: the code to plant a mistake in is not in the original ($from)"
        fill "$n" "$file" build/exercises/planted
        tools/exercise.sh "$n" check > "$log" 2>&1
        [ $? != 0 ] && grep -m 1 "exercise $n: NOT YET" "$log" | grep -F "$expect" > /dev/null
        result $? "exercise $n: with '$to' planted, check's first line does not say '$expect' ($log)"
        echo "exercise $n, planted '$to': $(grep "exercise $n: NOT YET" "$log" | head -n 1 | cut -c1-160)..."
    done

    tools/exercise.sh "$n" reset > "$log" 2>&1
    cmp -s "$file" build/exercises/before
    result $? "exercise $n: reset did not restore $file byte for byte"
    echo "exercise $n: check refuses before start, task, start, check fails, the original is SOLVED, reset"
done
# asked for help: the usage on stdout, exit 0 (a usage error stays on stderr, exit 1)
help=$(bash tools/exercise.sh -h 2> /dev/null); rc=$?
[ $rc = 0 ] && [[ "$help" == usage:*"N check"* ]]; result $? "exercise.sh -h: exit $rc, stdout '${help:0:60}'"
bash tools/exercise.sh bogus > /dev/null 2>&1; rc=$?
[ $rc = 1 ]; result $? "exercise.sh bogus: exit $rc (1 expected)"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
