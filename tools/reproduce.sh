#!/usr/bin/env bash
# reproduce.sh: the paper's Table 2 at a scale that fits, with plots.
#
#   1. text (enwik8 if data/enwik8 is there, else kjv) and images (cifar10 if there, else fashion_mnist):
#      dense, fixed and strided attention with the same context, model and steps; the final validation
#      bits per byte (bits per dim) and the time per iteration, side by side, as in the paper's Table 2;
#   2. the synthetic long-range task (lines of 64 letters and a newline, each byte copying the one a
#      line above, 5% noise): a local window that cannot reach a line up, against strided (the byte to
#      copy is 64 back from the query, a multiple of the stride 16: one stride step), fixed (a block
#      per line) and dense. Past a window's first line the floor is 0.50 bits per byte; over whole
#      windows of 256 bytes, whose first line has nothing above it, about 1.56.
#
# Every run is repeated for each seed of SEEDS (cpu mode: 3 seeds, "1337 1 2"; gpu and quick: 1337), so
# that a difference between patterns can be told from the spread between seeds: the table gives each
# run's mean over the seeds, their range, and for each pattern its difference from dense seed by seed.
# Each run writes its log (./train -log) and checkpoint to OUT/NAME.sSEED; the table goes to OUT/table.md
# and to the screen, the validation curves (the first seed's) to OUT/text.png, OUT/images.png and OUT/synthetic.png (gnuplot,
# installed from Debian when run as root; without it the table is still made, and `plot` draws the
# curves later from the logs). The final evaluation of each run scores the first EVAL_BYTES of the
# validation split (all runs of a task the same bytes).
#
# Usage: bash tools/reproduce.sh cpu|gpu|quick [OUT]     (default OUT: build/reproduce/MODE)
#        bash tools/reproduce.sh plot OUT                (the plots of runs made elsewhere)
#   cpu    about 13 minutes on 2 CPU cores with AVX2, 3 seeds (budget 45)
#   gpu    a larger model, longer contexts and more steps, sized for about 8 minutes on one H200, so
#          that it fits one call of a lent GPU (not run yet). A machine without network needs the
#          data sets already there: data/kjv (or enwik8), data/fashion_mnist's train.bin and val.bin,
#          and build/reproduce/synthetic_p65_3000000 (made by `prepare`). Where ./train cannot be
#          built, it runs build/gpu_carry/bin/train (made by `tools/gpu_check.sh prepare`).
#   prepare  makes the gpu mode's data sets here and trains nothing (for a GPU machine without network
#          or data tool: copy them there)
#   quick  a few steps of tiny models, to check that the script works (CI)
#
#        bash tools/reproduce.sh long [cpu|gpu|quick] [OUT]
#          the paper's headline: sequences far longer at the same cost, and what a long context buys
#          (tools/reproduce_long.sh, which says what it runs)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" != long ] || exec bash tools/reproduce_long.sh "${@:2}"
mode=${1:-}
case "$mode" in cpu|gpu|quick|prepare) ;; plot) [ -n "${2:-}" ] || mode="" ;; *) mode="" ;; esac
[ -n "$mode" ] || { echo "usage: bash tools/reproduce.sh cpu|gpu|quick [OUT], plot OUT, prepare, or long [cpu|gpu|quick] [OUT]" >&2; exit 1; }
out=${2:-build/reproduce/$mode}

if [ "$mode" != prepare ] && ! command -v gnuplot > /dev/null && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    echo "reproduce.sh: installing the Debian package gnuplot-nox" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox > /dev/null 2>&1 ||
        { apt-get update -qq > /dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gnuplot-nox > /dev/null 2>&1; } ||
        echo "reproduce.sh: could not install gnuplot-nox" >&2
fi
[ "$mode" = prepare ] || command -v gnuplot > /dev/null || {
    echo "reproduce.sh: no gnuplot (sudo apt-get install gnuplot-nox): no plots, only the table" >&2
    [ "$mode" != plot ] || exit 1
}

# plot: the validation during training (the same windows every time) against the step, one picture
# per task. The table's numbers are the final evaluation's, on other windows: not plotted.
plot() {
    for task in text images synthetic; do
        plots=""
        while read -r t name flags; do
            [ "$t" = "$task" ] || continue
            plots="$plots${plots:+, }'< grep ^val $out/$name.s$first_seed.tsv' using 2:4 with linespoints title '${name#*_}'"
        done < <(awk -v s="$first_seed" '$3 == s { $3 = ""; print }' "$out/runs.txt")
        gnuplot -e "set terminal png size 800,480; set output '$out/$task.png'; set xlabel 'step';
                    set ylabel 'validation bits per byte'; set title '$task ($1, seed $first_seed)'; set key top right; plot $plots"
    done
    echo "reproduce.sh: $out/text.png, $out/images.png, $out/synthetic.png"
}
if [ "$mode" = plot ]; then
    [ -f "$out/runs.txt" ] || { echo "reproduce.sh: no runs.txt in $out: give the folder a run wrote" >&2; exit 1; }
    first_seed=$(awk 'NR == 1 { print $3 }' "$out/runs.txt")
    plot "$(basename "$out")"
    exit 0
fi
[ "$mode" = prepare ] || mkdir -p "$out"
datatool=build/datatool
if ! make -s train build/datatool > /dev/null; then
    [ -x build/gpu_carry/bin/train ] || { echo "reproduce.sh: the build failed" >&2; exit 1; }
    echo "reproduce.sh: the build failed here: running build/gpu_carry/bin/train (tools/gpu_check.sh prepare)" >&2
    cp build/gpu_carry/bin/train . && datatool=""
fi

# The data: the paper's where they are, else the Debian ones (prepare.sh keeps what it made).
text=data/kjv; [ -f data/enwik8/val.bin ] && text=data/enwik8
images=data/fashion_mnist; [ -f data/cifar10/val.bin ] && images=data/cifar10
[ -f "$text/val.bin" ] || bash data/prepare.sh kjv
[ -f "$images/val.bin" ] || bash data/prepare.sh fashion_mnist
syn_bytes=600000; [ "$mode" = gpu ] || [ "$mode" = prepare ] && syn_bytes=3000000 # the gpu mode's runs see 5M bytes
synthetic=build/reproduce/synthetic_p65_$syn_bytes # (period and size in the name: an older set is not reused)
if [ ! -f "$synthetic/val.bin" ]; then
    [ -n "$datatool" ] || { echo "reproduce.sh: no $synthetic and no data tool: make it where the data tool builds (bash tools/reproduce.sh prepare) and copy it here" >&2; exit 1; }
    mkdir -p "$synthetic"
    "$datatool" synthetic -bytes "$syn_bytes" -period 65 -seed 1 2> /dev/null | "$datatool" pack "$synthetic/train.bin" -kind text
    "$datatool" synthetic -bytes 60000 -period 65 -seed 2 2> /dev/null | "$datatool" pack "$synthetic/val.bin" -kind text
fi
if [ "$mode" = prepare ]; then
    echo "reproduce.sh: the gpu mode's data: $text, $images/train.bin, $images/val.bin, $synthetic ($(du -sch "$text" "$images/train.bin" "$images/val.bin" "$synthetic" | tail -1 | cut -f1))"
    exit 0
fi
# An image's bytes: height x width x channels, the data file header's three numbers at offset 16.
image_bytes=$(od -An -t u4 -j 16 -N 12 "$images/val.bin" | awk '{ print $1 * $2 * $3 }')
side=$(awk -v n="$image_bytes" 'BEGIN { printf "%d", sqrt(n) + 0.5 }') # about sqrt(ctx)

# The sizes: model, steps, evaluation. Every run of a task gets the same, only the pattern differs.
case "$mode" in
cpu)   model=(-dim 64 -heads 2 -layers 2 -batch 4 -lr 1e-3); text_ctx=512; text_steps=400; image_steps=300
       syn_ctx=256; syn_steps=800; eval_every=50; eval_bytes=40000 ;;
gpu)   model=(-dim 256 -heads 4 -layers 4 -batch 8 -lr 5e-4); text_ctx=2048; text_steps=1000; image_steps=1000
       syn_ctx=1024; syn_steps=600; eval_every=100; eval_bytes=400000 ;;
quick) model=(-dim 32 -heads 1 -layers 1 -batch 2 -lr 1e-3); text_ctx=64; text_steps=4; image_steps=4
       syn_ctx=128; syn_steps=4; eval_every=2; eval_bytes=$image_bytes ;;
esac
text_l=$(awk -v n="$text_ctx" 'BEGIN { printf "%d", sqrt(n) + 0.5 }')
default_seeds="1337"; [ "$mode" = cpu ] && default_seeds="1337 1 2"
read -r -a seeds <<< "${SEEDS:-$default_seeds}"
first_seed=${seeds[0]}

# run TASK NAME DATA CTX STEPS PATTERN-FLAGS...: one training run with seed $seed, logged to OUT/NAME.sSEED.tsv
run() {
    local task=$1 name=$2 data=$3 ctx=$4 steps=$5
    shift 5
    echo "reproduce.sh: $task, $name, seed $seed ($*)" >&2
    ./train -i "$data" -o "$out/$name.s$seed" -log "$out/$name.s$seed.tsv" -ctx "$ctx" -steps "$steps" -warmup $((steps / 10 + 1)) \
        "${model[@]}" -eval_every "$eval_every" -eval_batches 4 -sample_every 0 -save_every 0 -eval_bytes "$eval_bytes" \
        -seed "$seed" "$@" > "$out/$name.s$seed.log" 2>&1 || { echo "reproduce.sh: the run $name failed: $out/$name.s$seed.log" >&2; exit 1; }
    echo "$task $name $seed $*" >> "$out/runs.txt"
}
: > "$out/runs.txt"
for seed in "${seeds[@]}"; do
run text text_dense "$text" "$text_ctx" "$text_steps" -pattern dense
run text text_fixed "$text" "$text_ctx" "$text_steps" -pattern fixed -combine merged -stride 32 -summary 4
run text text_strided "$text" "$text_ctx" "$text_steps" -pattern strided -combine merged -stride "$text_l"
run images images_dense "$images" "$image_bytes" "$image_steps" -pattern dense -stride "$side"
run images images_fixed "$images" "$image_bytes" "$image_steps" -pattern fixed -combine merged -stride "$side" -summary 4
run images images_strided "$images" "$image_bytes" "$image_steps" -pattern strided -combine merged -stride "$side"
run synthetic synthetic_local "$synthetic" "$syn_ctx" "$syn_steps" -pattern local -stride 16
run synthetic synthetic_strided "$synthetic" "$syn_ctx" "$syn_steps" -pattern strided -combine merged -stride 16
run synthetic synthetic_fixed "$synthetic" "$syn_ctx" "$syn_steps" -pattern fixed -combine merged -stride 65 -summary 8
run synthetic synthetic_dense "$synthetic" "$syn_ctx" "$syn_steps" -pattern dense
done

# The table: final bits per byte (the "final" line of each log): the mean over the seeds and their range;
# the median time per step (over every seed's steps after the first); then, per task, each pattern's
# difference from dense, seed by seed (the same seed: the same data order and a like initialisation).
while read -r task name seed flags; do
    bpb=$(awk -F'\t' '$1 == "final" { printf "%.4f", $4 }' "$out/$name.s$seed.tsv")
    ms=$(awk -F'\t' '$1 == "train" && $2 > 1 { print $6 }' "$out/$name.s$seed.tsv" | sort -n |
         awk '{ v[NR] = $1 } END { printf "%.0f", v[int((NR + 1) / 2)] }')
    echo "$task $name $seed $bpb $ms $flags"
done < "$out/runs.txt" > "$out/results.txt"
awk -v seeds="${#seeds[@]}" '
    { key = $1 " " $2; if (!(key in n)) { order[++keys] = key; flags[key] = ""; for (i = 6; i <= NF; i++) flags[key] = flags[key] (i > 6 ? " " : "") $i }
      n[key]++; sum[key] += $4; bpb[key, $3] = $4; ms[key, n[key]] = $5
      lo[key] = n[key] == 1 || $4 < lo[key] ? $4 : lo[key]; hi[key] = n[key] == 1 || $4 > hi[key] ? $4 : hi[key]
      if (!($3 in seen)) { seen[$3] = 1; seed_list[++n_seeds] = $3 } }
    END {
        print "| task | pattern | validation bits per byte, mean of " seeds " seed(s) | range over the seeds | ms per iteration |"
        print "|---|---|---|---|---|"
        for (k = 1; k <= keys; k++) {
            key = order[k]; split(key, t, " ")
            for (i = 1; i <= n[key]; i++) m[i] = ms[key, i]
            for (i = 2; i <= n[key]; i++) for (j = i; j > 1 && m[j - 1] > m[j]; j--) { x = m[j]; m[j] = m[j - 1]; m[j - 1] = x }
            printf "| %s | %s (%s) | %.3f | %.3f to %.3f | %.0f |\n", t[1], substr(t[2], index(t[2], "_") + 1), flags[key], sum[key] / n[key], lo[key], hi[key], m[int((n[key] + 1) / 2)]
            delete m
        }
        print ""
        for (k = 1; k <= keys; k++) {
            key = order[k]; split(key, t, " "); dense = t[1] " " t[1] "_dense"
            if (key == dense || !(dense in n)) continue
            lower = 0; list = ""; d_sum = 0
            for (s = 1; s <= n_seeds; s++) {
                d = bpb[key, seed_list[s]] - bpb[dense, seed_list[s]]; d_sum += d; lower += d < 0
                list = list (s > 1 ? ", " : "") sprintf("%+.3f", d)
            }
            printf "%s, %s - dense: %+.3f bits on average (seed by seed: %s); lower than dense in %d of %d seeds\n", t[1], substr(t[2], index(t[2], "_") + 1), d_sum / n_seeds, list, lower, n_seeds
        }
    }' "$out/results.txt" > "$out/table.md"
echo "($mode, seeds ${seeds[*]}, $(date -u +%Y-%m-%d), $(( SECONDS / 60 )) min $(( SECONDS % 60 )) s in all; device: $(sed -n 's/^device: //p' "$out/text_dense.s$first_seed.log"))" >> "$out/table.md"
cat "$out/table.md"

if command -v gnuplot > /dev/null; then
    plot "$mode"
else
    echo "reproduce.sh: the plots, on a machine with gnuplot: bash tools/reproduce.sh plot $out" >&2
fi
