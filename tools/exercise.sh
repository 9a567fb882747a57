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
#   tools/exercise.sh N reset     put the original code back (your lines are kept in build/exercises/N.yours)
#   tools/exercise.sh reset       reset every started exercise
#   tools/exercise.sh -h          this list (on stdout)
set -euo pipefail
cd "$(dirname "$0")/.."
SAVED=build/exercises

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
# The task (after the header lines) and the TODO (after the line that starts with ---).
task() { awk 'NR > 1 && /^--- / { exit } NR > 3' "$1"; }
todo() { awk 'found { print } /^--- / { found = 1 }' "$1"; }

# The signposts of exercise N in FILE must be there, once each, in order; prints their line numbers.
signposts() {
    local n=$1 file=$2 begin end
    begin=$(grep -n "Exercise $n starts here:" "$file" | cut -d: -f1)
    end=$(grep -n "Exercise $n ends here\." "$file" | cut -d: -f1)
    [[ "$begin" =~ ^[0-9]+$ && "$end" =~ ^[0-9]+$ && $begin -lt $end ]] ||
        fail "$file lacks the signposts 'Exercise $n starts here:' and 'Exercise $n ends here.' (once each, in that order)"
    echo "$begin $end"
}
# Replaces the lines strictly between exercise N's signposts in FILE with the contents of REPLACEMENT.
replace_between() {
    local n=$1 file=$2 replacement=$3 lines
    lines=$(signposts "$n" "$file")
    awk -v b="${lines% *}" -v e="${lines#* }" -v r="$replacement" \
        'FNR == NR { text = text $0 "\n"; next } FNR == b { printf "%s\n%s", $0, text; next } FNR > b && FNR < e { next } { print }' \
        "$replacement" "$file" > "$file.exercise" && mv "$file.exercise" "$file"
}
between() { local lines; lines=$(signposts "$1" "$2"); sed -n "$((${lines% *} + 1)),$((${lines#* } - 1))p" "$2"; }

start() {
    local n=$1 s file; s=$(spec "$n"); file=$(field "$s" file)
    [ ! -f "$SAVED/$n.orig" ] || fail "exercise $n is already started: edit $file, or 'tools/exercise.sh $n reset' to start over"
    mkdir -p "$SAVED"
    between "$n" "$file" > "$SAVED/$n.orig"
    todo "$s" > "$SAVED/$n.todo"
    replace_between "$n" "$file" "$SAVED/$n.todo"
    echo "== $(title "$s")"
    task "$s"
    echo
    echo "Your code goes in $file, line $(( $(signposts "$n" "$file" | cut -d' ' -f1) + 1 )) (after 'Exercise $n starts here')."
    echo "Then: tools/exercise.sh $n check     (to give up and see the original: tools/exercise.sh $n reset)"
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
    # The verdict first; then the compiler's warnings on your code, if any, and the details
    warnings() { grep -E 'warning' "$SAVED/build.log" | head -n 10 || true; }
    if bash -c "$judge" > "$log" 2>&1; then
        echo "exercise $n: SOLVED: the tests that judge it pass ($(tail -n 1 "$log"))"
        warnings
        return 0
    fi
    verdict=$(sed -n 's/^verdict: //p' "$log" | head -n 1)
    echo "exercise $n: NOT YET: ${verdict:-the tests below fail}"
    warnings
    grep -v '^verdict: ' "$log" | grep -v '^device: ' || true
    return 1
}

reset() {
    local n=$1 s file; s=$(spec "$n"); file=$(field "$s" file)
    if [ ! -f "$SAVED/$n.orig" ]; then echo "exercise $n is not started: nothing to reset"; return 0; fi
    between "$n" "$file" > "$SAVED/$n.yours"
    replace_between "$n" "$file" "$SAVED/$n.orig"
    rm -f "$SAVED/$n.orig" "$SAVED/$n.todo"
    echo "exercise $n: the original code is back in $file (yours is in $SAVED/$n.yours)"
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
