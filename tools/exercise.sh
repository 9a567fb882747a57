#!/usr/bin/env bash
# tools/exercise.sh: the classroom exercises, checked by the tests. Each one is a file in
# tools/exercises/ (N-name.txt): its title, the file it works on, the command that judges it, the task,
# and the TODO that replaces the code. In the source, the code sits between two signposts,
# "Exercise N starts here: ..." and "Exercise N ends here.".
#
#   tools/exercise.sh list        the exercises, and which are started
#   tools/exercise.sh N start     print the task, and blank exercise N's code in place: the lines between
#                                 its signposts become a TODO that states the contract (the original
#                                 lines are kept in build/exercises/N.orig)
#   tools/exercise.sh N task      print the task again
#   tools/exercise.sh N check     build, then run only the tests that judge exercise N; exit 0 = solved.
#                                 The first line says SOLVED or NOT YET, and if not yet, the first thing
#                                 found wrong; the details follow. The build is the exercises' own
#                                 (build/exercise/, make exercise): quicker to compile, and warnings in
#                                 unfinished code are shown, not fatal
#   tools/exercise.sh N reset     put the original code back; your lines are kept in build/exercises/N.yours
#                                 (N.yours.2, .3, ... if that is taken: nothing of yours is overwritten).
#                                 If the signposts were edited away, the whole file as it was before
#                                 `start` comes back, and yours is kept whole beside your lines
#   tools/exercise.sh reset       reset every started exercise
#   tools/exercise.sh -h          this list (on stdout)
# With several exercises started, every verdict names the others, and says whether their code runs in
# this one's check (the "runs in:" line of each exercise's file lists the test groups that run it).
set -euo pipefail
cd "$(dirname "$0")/.."
SAVED=${EXERCISE_SAVED:-build/exercises} # (tools/test_exercises.sh keeps its own, away from yours)
export EXERCISE_SAVED=$SAVED              # (exercise 9's judge writes its table there)

fail() { echo "exercise.sh: $*" >&2; exit 1; }
USAGE="usage: tools/exercise.sh list | N start | N task | N check | N reset | reset"
usage() { fail "$USAGE   (N from: $(numbers))"; }
numbers() { ls tools/exercises/ | sed -n 's/^\([0-9]*\)-.*\.txt$/\1/p' | sort -n | paste -sd' '; }
spec() {
    local found=(tools/exercises/"$1"-*.txt)
    [[ "$1" =~ ^[0-9]+$ && -f "${found[0]}" ]] || fail "there is no exercise $1 (the exercises: $(numbers))"
    echo "${found[0]}"
}
field() { sed -n "s/^$2: //p" "$1" | head -n 1; }
title() { head -n 1 "$1"; }
# The task (after the header lines, which end at the first empty line) and the TODO (after the line that
# starts with ---).
task() { awk '/^--- / { exit } body { print } /^$/ { body = 1 }' "$1"; }
todo() { awk 'found { print } /^--- / { found = 1 }' "$1"; }

# The signposts of exercise N in FILE must be there, once each, in order; prints their line numbers.
signposts() {
    local n=$1 file=$2 begin end
    begin=$(grep -n "Exercise $n starts here:" "$file" | cut -d: -f1 || true)
    end=$(grep -n "Exercise $n ends here\." "$file" | cut -d: -f1 || true)
    [[ "$begin" =~ ^[0-9]+$ && "$end" =~ ^[0-9]+$ && $begin -lt $end ]] ||
        fail "$file lacks the signposts 'Exercise $n starts here:' and 'Exercise $n ends here.' (once each, in that order)$(
            [ ! -f "$SAVED/$n.orig" ] || echo ": 'tools/exercise.sh $n reset' puts the file back as it was before start, and keeps yours")"
    echo "$begin $end"
}
intact() { (signposts "$1" "$2") > /dev/null 2>&1; }
# Replaces the lines strictly between exercise N's signposts in FILE with the contents of REPLACEMENT.
replace_between() {
    local n=$1 file=$2 replacement=$3 lines
    lines=$(signposts "$n" "$file")
    awk -v b="${lines% *}" -v e="${lines#* }" -v r="$replacement" \
        'FNR == NR { text = text $0 "\n"; next } FNR == b { printf "%s\n%s", $0, text; next } FNR > b && FNR < e { next } { print }' \
        "$replacement" "$file" > "$file.exercise" && mv "$file.exercise" "$file"
}
between() { local lines; lines=$(signposts "$1" "$2"); sed -n "$((${lines% *} + 1)),$((${lines#* } - 1))p" "$2"; }
# Exercise N's code is still the TODO that start put there (the signposts intact, nothing written).
blank() { intact "$1" "$2" && [ -f "$SAVED/$1.todo" ] && cmp -s <(between "$1" "$2") "$SAVED/$1.todo"; }
# The test group that judges exercise N ("bench" for the benchmark's judge), and the groups its code runs in.
group() { local check; check=$(field "$(spec "$1")" check); [[ "$check" =~ -only\ ([a-z_]+) ]] && echo "${BASH_REMATCH[1]}" || echo bench; }
runs_in() { field "$(spec "$1")" "runs in"; }
# The first free name of PATH, PATH.2, PATH.3, ...: what is saved there never overwrites an earlier save.
free_name() { local k=2 name=$1; while [ -e "$name" ]; do name=$1.$k; k=$((k + 1)); done; echo "$name"; }
# One line per other started exercise, for exercise N's verdict: is its code still blank, and does it
# run in N's check (then a fault there shows here).
others() {
    local n=$1 m state g; g=$(group "$n")
    for m in $(numbers); do
        [ "$m" != "$n" ] && [ -f "$SAVED/$m.orig" ] || continue
        blank "$m" "$(field "$(spec "$m")" file)" && state="its code is still the blank TODO" || state="its code is yours"
        if [[ " $(runs_in "$m") " == *" $g "* ]]; then
            echo "exercise $m is also started ($state), and its code runs in this check: what fails may be exercise $m's (check it first, or 'tools/exercise.sh $m reset')"
        else
            echo "exercise $m is also started ($state); its code does not run in this check"
        fi
    done
}

start() {
    local n=$1 s file; s=$(spec "$n"); file=$(field "$s" file)
    [ ! -f "$SAVED/$n.orig" ] || fail "exercise $n is already started: edit $file, or 'tools/exercise.sh $n reset' to start over"
    mkdir -p "$SAVED"
    between "$n" "$file" > "$SAVED/$n.orig"
    cp "$file" "$SAVED/$n.file" # the whole file, for a reset after the signposts were edited away
    todo "$s" > "$SAVED/$n.todo"
    replace_between "$n" "$file" "$SAVED/$n.todo"
    echo "== $(title "$s")"
    task "$s"
    echo
    echo "Your code goes in $file, line $(( $(signposts "$n" "$file" | cut -d' ' -f1) + 1 )) (after 'Exercise $n starts here')."
    echo "Then: tools/exercise.sh $n check     (to give up and see the original: tools/exercise.sh $n reset)"
    [ ! -f "$SAVED/$n.yours" ] || echo "(your code from before is kept: $(ls "$SAVED/$n".yours* | paste -sd' '))"
    others "$n"
}

show_task() {
    local s; s=$(spec "$1")
    echo "== $(title "$s")"
    task "$s"
}

# The judge runs on the exercises' build: "./test_kernels" in a check line is build/exercise/test_kernels.
check() {
    local n=$1 s file log verdict; s=$(spec "$n"); file=$(field "$s" file)
    echo "== $(title "$s")"
    if [ ! -f "$SAVED/$n.orig" ]; then
        echo "exercise $n: NOT STARTED: 'tools/exercise.sh $n start' blanks its code for you to write (the code there now is the original, so there is nothing of yours to check)"
        return 1
    fi
    signposts "$n" "$file" > /dev/null # (if they were edited away, this says how to recover)
    mkdir -p "$SAVED"
    log=$SAVED/check.log
    local judge; judge=$(field "$s" check)
    # (exercise 9's judge, the benchmark, builds what it runs itself)
    : > "$SAVED/build.log"
    if [[ "$judge" == ./test_kernels* ]] && ! make --no-print-directory exercise > "$SAVED/build.log" 2>&1; then
        echo "exercise $n: NOT YET: the code does not compile:"
        grep -E 'error' "$SAVED/build.log" | head -n 20 || true
        echo "(the whole log: $SAVED/build.log)"
        return 1
    fi
    judge=${judge/#.\/test_kernels/build/exercise/test_kernels}
    # The verdict first, with the other started exercises; then the compiler's warnings on your code, if
    # any, and the details
    warnings() { grep -E 'warning' "$SAVED/build.log" | head -n 10 || true; }
    if bash -c "$judge" > "$log" 2>&1; then
        echo "exercise $n: SOLVED: the tests that judge it pass ($(tail -n 1 "$log"))"
        others "$n"
        warnings
        return 0
    fi
    verdict=$(sed -n 's/^verdict: //p' "$log" | head -n 1)
    if blank "$n" "$file"; then
        echo "exercise $n: NOT YET: the code is still the blank TODO that start put in $file: write yours there (the tests say of the blank: ${verdict:-see below})"
    else
        echo "exercise $n: NOT YET: ${verdict:-the tests below fail}"
    fi
    others "$n"
    warnings
    grep -v '^verdict: ' "$log" | grep -v '^device: ' || true
    return 1
}

# Your lines go to the first free N.yours (never over an earlier one), unless they are still the blank.
reset() {
    local n=$1 s file kept m; s=$(spec "$n"); file=$(field "$s" file)
    if [ ! -f "$SAVED/$n.orig" ]; then echo "exercise $n is not started: nothing to reset"; return 0; fi
    if ! intact "$n" "$file"; then
        [ -f "$SAVED/$n.file" ] || fail "$file lacks exercise $n's signposts and no copy from before start is kept: 'git checkout $file' restores it (your edits there are lost then: copy them first)"
        kept=$(free_name "$SAVED/$n.yours.whole")
        cp "$file" "$kept"
        cp "$SAVED/$n.file" "$file"
        rm -f "$SAVED/$n.orig" "$SAVED/$n.todo" "$SAVED/$n.file"
        echo "exercise $n: its signposts were edited away, so $file is back as it was before 'start' (your whole file is in $kept)"
        for m in $(numbers); do # exercises started after N in the same file were put back by that copy
            [ -f "$SAVED/$m.orig" ] && [ "$(field "$(spec "$m")" file)" = "$file" ] && intact "$m" "$file" &&
                cmp -s <(between "$m" "$file") "$SAVED/$m.orig" || continue
            rm -f "$SAVED/$m.orig" "$SAVED/$m.todo" "$SAVED/$m.file"
            echo "exercise $m: started after exercise $n, so that copy has its original code: it is not started any more"
        done
        return 0
    fi
    if blank "$n" "$file"; then
        kept="nothing of yours to keep: the code was still the blank TODO"
    else
        kept=$(free_name "$SAVED/$n.yours")
        between "$n" "$file" > "$kept"
        kept="yours is in $kept"
    fi
    replace_between "$n" "$file" "$SAVED/$n.orig"
    rm -f "$SAVED/$n.orig" "$SAVED/$n.todo" "$SAVED/$n.file"
    echo "exercise $n: the original code is back in $file ($kept)"
}

case "${1:-}-${2:-}" in
-h-|--help-) # asked for: on stdout, exit 0
    echo "$USAGE   (N from: $(numbers))"
    sed -n '\|^#   tools/exercise.sh list|,\|^#   tools/exercise.sh -h|s/^#   //p' "$0" ;;
list-)
    for n in $(numbers); do
        s=$(spec "$n")
        echo "$(title "$s")$([ -f "$SAVED/$n.orig" ] && echo "   (started)" || true)"
    done ;;
reset-)
    for n in $(numbers); do [ ! -f "$SAVED/$n.orig" ] || reset "$n"; done ;;
*-start) start "$1" ;;
*-task) show_task "$1" ;;
*-check) check "$1" ;;
*-reset) reset "$1" ;;
*) usage ;;
esac
