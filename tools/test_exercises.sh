#!/usr/bin/env bash
# tools/test_exercises.sh: proves that every exercise is real and that its feedback is right (CI runs it).
# For each exercise N:
#   1. `check` before `start` refuses: NOT STARTED, exit 1 (the code there is the original);
#   2. `task` prints the task's text again;
#   3. `tools/exercise.sh N start` changes its file; it still compiles, and `check` then FAILS (the
#      TODO is not a solution);
#   4. the original code typed back in (as a student who found it would) is SOLVED;
#   5. a planted mistake, for the exercises that have one below (all but 1 and 9): `check` fails, and its first line
#      names the quantity that is wrong;
#   6. `tools/exercise.sh N reset` gives back the file byte for byte.
# Then the tooling's traps, each closed: three exercises started at once (each verdict names the others,
# and says whether its code runs in this check); a blank's first verdict says it is still blank; a NaN
# gradient is called NaN; `reset` never overwrites a saved solution (numbered copies) and keeps nothing
# from a blank; `reset` recovers a file whose signposts were edited away; the time of a try (build +
# check) at its slowest judge, printed. Last, `-h` prints the usage on stdout with exit 0, and a usage
# error exits 1.
# Its last line is "N passed, M failed"; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
passed=0 failed=0
result() { if [ "$1" = 0 ]; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL $2"; fi; }
# exercise.sh keeps its saved code here, not in build/exercises where a student's solutions are
export EXERCISE_SAVED=build/exercises_test
S=$EXERCISE_SAVED
rm -rf "$S" && mkdir -p "$S"
log=$S/test.log

# Planted mistakes, one per kernel exercise and one in the model: the exercise, the text of the original
# code, the mistake put in its place, and what the first line of `check` must then say, separated by @.
plants=(
    "2@const int i = t * st.l + r;@const int i = r * st.l + t;@NOT YET: forward output wrong"
    "3@row_sum = row_sum * alpha + tile_sum;@row_sum = row_sum + tile_sum;@the rescale alpha"
    "4@merged == -INFINITY || row_sum == 0.0f ? 0.0f : expf(lse_new - merged) / row_sum@expf(lse_new - merged) / row_sum@out has NaN"
    "5@p * (dS_s[r * S::SROW + c] - delta_s[r])@p * dS_s[r * S::SROW + c]@only the backward is wrong"
    "6@sum_d / C - xhat@sum_d / (C - C) - xhat@NaN or infinity in the gradient of"
    "7@(s + 1.702f * x[e] * s * (1.0f - s))@(s + x[e] * s * (1.0f - s))@every one upstream of h1.fc2w"
    "8@dot / sqrtf((float)D)@dot * sqrtf((float)D)@cached decoding wrong (dense/interleaved): its next-byte log-probabilities"
    "10@p - st.l + 1 ? p - p % st.column : p - st.l + 1@p - st.l ? p - p % st.column : p - st.l@too many keys"
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
                                   print } END { if (n != 1) exit 1 }' "$S/$1.orig"
}

for spec in tools/exercises/[0-9]*-*.txt; do
    n=$(basename "$spec" | cut -d- -f1)
    file=$(sed -n 's/^file: //p' "$spec")
    cp "$file" $S/before
    tools/exercise.sh "$n" check > "$log" 2>&1
    [ $? != 0 ] && grep -q "exercise $n: NOT STARTED" "$log"
    result $? "exercise $n: check before start did not refuse ($log)"
    tools/exercise.sh "$n" task > "$log" 2>&1 && grep -qF "$(awk 'body { print; exit } /^$/ { body = 1 }' "$spec")" "$log"
    result $? "exercise $n: task did not print the task ($log)"

    tools/exercise.sh "$n" start > "$log" 2>&1
    result $? "exercise $n: start failed ($log)"
    ! cmp -s "$file" $S/before
    result $? "exercise $n: start did not change $file"
    tools/exercise.sh "$n" check > "$log" 2>&1
    [ $? != 0 ] && grep -q "exercise $n: NOT YET: the code is still the blank TODO" "$log" && ! grep -q 'does not compile' "$log"
    result $? "exercise $n: right after start, check did not compile and fail, saying the code is still blank ($log)"

    fill "$n" "$file" "$S/$n.orig"
    tools/exercise.sh "$n" check > "$log" 2>&1 && grep -q "exercise $n: SOLVED" "$log"
    result $? "exercise $n: the original code typed back in is not SOLVED ($log)"

    for p in "${plants[@]}"; do
        IFS='@' read -r pn from to expect <<< "$p"
        [ "$pn" = "$n" ] || continue
        plant "$n" "$from" "$to" > $S/planted
        result $? "exercise $n: the code to plant a mistake in is not in the original ($from)"
        fill "$n" "$file" $S/planted
        tools/exercise.sh "$n" check > "$log" 2>&1
        [ $? != 0 ] && grep -m 1 "exercise $n: NOT YET" "$log" | grep -F "$expect" > /dev/null
        result $? "exercise $n: with '$to' planted, check's first line does not say '$expect' ($log)"
        echo "exercise $n, planted '$to': $(grep "exercise $n: NOT YET" "$log" | head -n 1 | cut -c1-160)..."
    done

    tools/exercise.sh "$n" reset > "$log" 2>&1
    cmp -s "$file" $S/before
    result $? "exercise $n: reset did not restore $file byte for byte"
    echo "exercise $n: check refuses before start, task, start, check fails, the original is SOLVED, reset"
done

ex() { tools/exercise.sh "$@" > "$log" 2>&1; }
file=sparse_transformer.cu
cp "$file" $S/before
# Two started at once: exercise 3's blank forward makes exercise 6's judge fail; the verdict says NaN and
# names exercise 3 as running in the check. Exercise 6's verdict is then the blank one (its own code is
# blank too); exercise 1's check says exercise 3's code does not run in it.
ex 3 start && ex 6 start && ex 1 start
result $? "two started: start failed ($log)"
ex 6 check
[ $? != 0 ] && head -n 2 "$log" | grep -q "NaN" &&
    grep -q "exercise 3 is also started (its code is still the blank TODO), and its code runs in this check" "$log"
result $? "two started: exercise 6's verdict does not say NaN and name exercise 3 as running in its check ($log)"
echo "two started, exercise 6: $(head -n 2 "$log" | tail -n 1 | cut -c1-150)... $(grep 'exercise 3 is also' "$log" | cut -c1-100)..."
fill 1 "$file" $S/1.orig
ex 1 check
[ $? = 0 ] && grep -q "exercise 3 is also started (its code is still the blank TODO); its code does not run in this check" "$log"
result $? "two started: exercise 1 is not SOLVED with a note that exercise 3's code does not run in its check ($log)"
ex reset
cmp -s "$file" $S/before
result $? "two started: reset (all) did not restore $file byte for byte"

rm -f $S/[0-9]*.yours* # (the loop above kept each planted mistake there)
# reset keeps every solution: solved, reset (3.yours); started again and reset blank (nothing kept, 3.yours
# untouched); started, a wrong try, reset (3.yours.2).
ex 3 start && fill 3 "$file" $S/3.orig && ex 3 reset && cp $S/3.yours $S/solution &&
    ex 3 start && grep -q "your code from before is kept: $S/3.yours" "$log" && ex 3 reset &&
    grep -q "nothing of yours to keep" "$log" && cmp -s $S/3.yours $S/solution &&
    ex 3 start && plant 3 "row_sum = row_sum * alpha + tile_sum;" "row_sum = row_sum + tile_sum;" > $S/planted &&
    fill 3 "$file" $S/planted && ex 3 reset && grep -q "yours is in $S/3.yours.2" "$log" &&
    cmp -s $S/3.yours $S/solution && cmp -s $S/3.yours.2 $S/planted &&
    cmp -s "$file" $S/before
result $? "reset: a saved solution was overwritten, or the file not restored ($log)"

# reset after the signposts were edited away: the file as before start comes back, the student's whole file aside
ex 3 start && grep -v "Exercise 3 ends here" "$file" > $S/edited && cp $S/edited "$file" &&
    ! ex 3 check && grep -q "'tools/exercise.sh 3 reset' puts the file back" "$log" &&
    ex 3 reset && grep -q "signposts were edited away" "$log" && cmp -s "$file" $S/before &&
    cmp -s $S/3.yours.whole $S/edited
result $? "reset with the signposts edited away: the file was not recovered, or the student's not kept ($log)"
cp $S/before "$file"; rm -f $S/[0-9]*.orig $S/[0-9]*.todo $S/[0-9]*.file

# A try at the slowest judge (model_gradients, exercise 6): the code changed, so build + check, timed.
ex 6 start && fill 6 "$file" $S/6.orig
start=$(date +%s%N); ex 6 check; rc=$?; ms=$((($(date +%s%N) - start) / 1000000))
[ $rc = 0 ]; result $? "exercise 6's try: not SOLVED ($log)"
echo "a try at the slowest judge (exercise 6: build + check): $((ms / 1000)).$((ms % 1000 / 100)) s on $(nproc) cores (the target: within 10 s on a 2-core laptop)"
ex 6 reset; cp $S/before "$file"; rm -f $S/[0-9]*.yours*

# asked for help: the usage on stdout, exit 0 (a usage error stays on stderr, exit 1)
help=$(bash tools/exercise.sh -h 2> /dev/null); rc=$?
[ $rc = 0 ] && [[ "$help" == usage:*"N check"* ]]; result $? "exercise.sh -h: exit $rc, stdout '${help:0:60}'"
bash tools/exercise.sh bogus > /dev/null 2>&1; rc=$?
[ $rc = 1 ]; result $? "exercise.sh bogus: exit $rc (1 expected)"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
