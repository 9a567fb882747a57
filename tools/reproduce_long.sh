#!/usr/bin/env bash
# tools/reproduce_long.sh, run as `bash tools/reproduce.sh long [cpu|gpu|quick] [OUT]`: the paper's
# headline, shown. Factorized attention costs O(n sqrt n), so at the cost of a dense model's step a
# sparse one sees a far longer sequence, and a long context is then something a model can use:
#
#   1. Length at equal cost. One training step of the same model, dense and strided (l = sqrt(n)), at
#      growing n (./train -profile: the mean of a few timed steps). Dense stops where a step would take
#      too long; its time there is extrapolated from its last two points, and said so. For each time
#      dense takes at a measured n, the longest n strided reaches in that time (log-log interpolation
#      between measured points; past the last one, the last two points' exponent, marked "extrapolated").
#   2. Reach. The synthetic copy task with lines of 1024 letters: each byte copies the one 1025 back
#      (5% noise), so the query that predicts it (the byte before) must find the key 1024 back. Strided
#      at context 2048, stride 128 (1024 = 8 x 128: that key is in the query's own stride step, 8 rows
#      up its column); a local window with as many keys per query (128 + 2048 / 128 = 144); dense with
#      the context whose step takes what strided's does at 2048 (from part 1's times). Same model and
#      steps; the final validation bits per byte. (With stride 64, fewer keys, strided had not found
#      the key after 1000 steps; with 128 it finds it between steps 800 and 1100 of 2000,
#      and ends near the floor for windows of 2048, about 2.6: their first 1025 bytes have no line above.)
#   3. Audio with seconds of context. Music (data/music, 8 kHz mu-law) at contexts of 0.13 s, 0.5 s and
#      2 s, strided, the same bytes per step (batch x context) and steps, for each seed of SEEDS; the
#      final bits per sample over the same validation bytes, and a WAV sampled from the longest.
#
# Writes OUT/table.md (also printed), OUT/steps.txt (part 1's times), every run's log, checkpoint and
# -log file, OUT/step_time.png and OUT/audio.png (gnuplot, if present), OUT/long.wav.
#   cpu    about 13 minutes on 2 CPU cores (AVX2)
#   gpu    a wider model and longer sequences, sized for about 8 minutes on one H100 or H200 (not run yet)
#   quick  a few steps of tiny models, to check that the script works (CI, seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-cpu}
case "$size" in cpu|gpu|quick) ;; *) echo "usage: bash tools/reproduce.sh long [cpu|gpu|quick] [OUT]" >&2; exit 1 ;; esac
out=${2:-build/reproduce/long_$size}
mkdir -p "$out"
make -s train sample build/datatool > /dev/null || { echo "reproduce.sh long: the build failed" >&2; exit 1; }

# The sizes. part 1: the model, the lengths, the longest dense one, the timed steps; part 2: the copy
# distance (period), context, stride and steps; part 3: contexts, bytes per step, steps, seeds.
case "$size" in
cpu)   model=(-dim 64 -heads 2 -layers 2 -batch 1); lengths="512 1024 2048 4096 16384 65536"; dense_max=16384; timed=2
       period=1025; reach_ctx=2048; reach_l=128; reach_steps=2000
       audio_ctxs="1024 4096 16384"; audio_bytes=16384; audio_steps=120; default_seeds="1337 1"; eval_bytes=65536 ;;
gpu)   model=(-dim 256 -heads 4 -layers 4 -batch 1); lengths="4096 16384 65536 262144"; dense_max=65536; timed=3
       period=1025; reach_ctx=2048; reach_l=128; reach_steps=2000
       audio_ctxs="1024 8192 16384 65536"; audio_bytes=65536; audio_steps=500; default_seeds="1337 1"; eval_bytes=262144 ;;
quick) model=(-dim 32 -heads 1 -layers 1 -batch 1); lengths="256 512 1024"; dense_max=512; timed=1
       period=65; reach_ctx=128; reach_l=8; reach_steps=4
       audio_ctxs="256 512"; audio_bytes=512; audio_steps=4; default_seeds="1337"; eval_bytes=1024 ;;
esac
read -r -a seeds <<< "${SEEDS:-$default_seeds}"
stride_of() { awk -v n="$1" 'BEGIN { printf "%d", sqrt(n) + 0.5 }'; }

# The copy task's data: lines of period - 1 letters and a newline (made once, kept).
copy=build/reproduce/synthetic_p${period}_3000000
if [ ! -f "$copy/val.bin" ]; then
    mkdir -p "$copy"
    build/datatool synthetic -bytes 3000000 -period "$period" -seed 1 2> /dev/null | build/datatool pack "$copy/train.bin" -kind text
    build/datatool synthetic -bytes 300000 -period "$period" -seed 2 2> /dev/null | build/datatool pack "$copy/val.bin" -kind text
fi
[ -f data/music/val.bin ] || bash data/prepare.sh music

# ---- 1. Length at equal cost ----------------------------------------------------------------------
: > "$out/steps.txt"
for n in $lengths; do
    for pattern in dense strided; do
        [ "$pattern" = strided ] || [ "$n" -le "$dense_max" ] || continue
        echo "reproduce.sh long: step time, $pattern, n = $n" >&2
        ms=$(./train -i "$copy" -ctx "$n" -stride "$(stride_of "$n")" -pattern "$pattern" -combine merged "${model[@]}" \
                 -profile "$timed" 2> "$out/profile_${pattern}_$n.err" | tee "$out/profile_${pattern}_$n.txt" |
             sed -n 's/^profile: a step of \([0-9.]*\) ms.*/\1/p')
        [ -n "$ms" ] || { echo "reproduce.sh long: ./train -profile failed: $out/profile_${pattern}_$n.err" >&2; exit 1; }
        echo "$pattern $n $ms" >> "$out/steps.txt"
    done
done
# at PATTERN MS: the n at which PATTERN's step takes MS, by log-log interpolation of steps.txt (past its
# ends, the nearest two points' exponent); prints "n extrapolated" (extrapolated: 0 or 1). A time below
# the one before it (a noisy tiny run) counts as a hair above it, so that the curve rises.
at() {
    awk -v p="$1" -v t="$2" '$1 == p { k++; n[k] = $2; ms[k] = k > 1 && $3 <= ms[k - 1] ? ms[k - 1] * 1.001 : $3 }
        END { i = 1; while (i < k - 1 && t > ms[i + 1]) i++
              e = log(n[i + 1] / n[i]) / log(ms[i + 1] / ms[i])
              printf "%d %d\n", n[i] * exp(e * log(t / ms[i])), (t < ms[1] || t > ms[k]) }' "$out/steps.txt"
}
# time PATTERN N: PATTERN's step time at N, interpolated the same way; "ms extrapolated".
time_at() {
    awk -v p="$1" -v x="$2" '$1 == p { k++; n[k] = $2; ms[k] = k > 1 && $3 <= ms[k - 1] ? ms[k - 1] * 1.001 : $3 }
        END { i = 1; while (i < k - 1 && x > n[i + 1]) i++
              e = log(ms[i + 1] / ms[i]) / log(n[i + 1] / n[i])
              printf "%.1f %d\n", ms[i] * exp(e * log(x / n[i])), (x < n[1] || x > n[k]) }' "$out/steps.txt"
}

# ---- 2. Reach -------------------------------------------------------------------------------------
# run NAME DATA CTX STEPS SEED FLAGS...: a training run, its final bits per byte and median step time
run() {
    local name=$1 data=$2 ctx=$3 steps=$4 seed=$5
    shift 5
    echo "reproduce.sh long: $name, seed $seed ($*)" >&2
    ./train -i "$data" -o "$out/$name.s$seed" -log "$out/$name.s$seed.tsv" -ctx "$ctx" -steps "$steps" \
        -warmup $((steps / 10 + 1)) -eval_every $((steps / 4 > 0 ? steps / 4 : 1)) -eval_batches 2 -sample_every 0 \
        -save_every 0 -eval_bytes "$eval_bytes" -seed "$seed" "$@" > "$out/$name.s$seed.log" 2>&1 ||
        { echo "reproduce.sh long: the run $name failed: $out/$name.s$seed.log" >&2; exit 1; }
}
final() { awk -F'\t' '$1 == "final" { printf "%.3f", $4 }' "$out/$1.tsv"; }
median_ms() {
    awk -F'\t' '$1 == "train" && $2 > 1 { print $6 }' "$out/$1.tsv" | sort -n | awk '{ v[NR] = $1 } END { printf "%.0f", v[int((NR + 1) / 2)] }'
}
seed=${seeds[0]} # part 2 runs with the first seed only
reach_keys=$((reach_l + (reach_ctx + reach_l - 1) / reach_l))
run reach_strided "$copy" "$reach_ctx" "$reach_steps" "$seed" "${model[@]}" -pattern strided -combine merged -stride "$reach_l"
run reach_local "$copy" "$reach_ctx" "$reach_steps" "$seed" "${model[@]}" -pattern local -stride "$reach_keys"
# dense's context at strided's cost (part 1's times, the same model and batch), a multiple of 64
read -r strided_ms _ <<< "$(time_at strided "$reach_ctx")"
read -r dense_n dense_extrapolated <<< "$(at dense "$strided_ms")"
dense_ctx=$((dense_n / 64 * 64)); [ "$dense_ctx" -ge 64 ] || dense_ctx=64
run reach_dense "$copy" "$dense_ctx" "$reach_steps" "$seed" "${model[@]}" -pattern dense -stride "$reach_l"

# ---- 3. Audio with seconds of context --------------------------------------------------------------
reach_seed=$seed
for seed in "${seeds[@]}"; do
    for ctx in $audio_ctxs; do
        batch=$((audio_bytes / ctx > 0 ? audio_bytes / ctx : 1))
        run "audio_$ctx" data/music "$ctx" "$audio_steps" "$seed" "${model[@]}" -batch "$batch" -pattern strided \
            -combine merged -stride "$(stride_of "$ctx")"
    done
done
longest=${audio_ctxs##* }
./sample -i "$out/audio_$longest.s${seeds[0]}/model.bin" -n 16000 -o "$out/long.wav" > "$out/sample.log" 2>&1 ||
    { echo "reproduce.sh long: ./sample failed: $out/sample.log" >&2; exit 1; }

# ---- The table ------------------------------------------------------------------------------------
{
    echo "### 1. Length at equal cost: one training step (${model[*]}), ms"
    echo
    echo "| n | dense | strided, l = sqrt(n) | dense / strided |"
    echo "|---|---|---|---|"
    for n in $lengths; do
        s=$(awk -v n="$n" '$1 == "strided" && $2 == n { print $3 }' "$out/steps.txt")
        d=$(awk -v n="$n" '$1 == "dense" && $2 == n { print $3 }' "$out/steps.txt")
        if [ -z "$d" ]; then read -r d _ <<< "$(time_at dense "$n")"; dl="~$d (extrapolated)"; else dl=$d; fi
        echo "| $n | $dl | $s | $(awk -v d="$d" -v s="$s" 'BEGIN { printf "%.1fx", d / s }') |"
    done
    echo
    echo "| a step's time (dense's at n) | the longest n dense reaches | the longest n strided reaches | strided / dense |"
    echo "|---|---|---|---|"
    while read -r pattern n ms; do
        [ "$pattern" = dense ] || continue
        read -r sn sx <<< "$(at strided "$ms")"
        echo "| $ms ms | $n | $sn$([ "$sx" = 1 ] && echo " (extrapolated)" || true) | $(awk -v a="$sn" -v b="$n" 'BEGIN { printf "%.1fx", a / b }') |"
    done < "$out/steps.txt"
    echo
    echo "### 2. Reach: copy the byte $period back, a key $((period - 1)) back from the query (lines of $((period - 1)) letters), $reach_steps steps, final validation bits per byte"
    echo
    echo "| run | context | keys per query | sees $period back | ms per step | bits per byte |"
    echo "|---|---|---|---|---|---|"
    echo "| strided, l = $reach_l | $reach_ctx | about $reach_keys | $([ $(((period - 1) % reach_l)) = 0 ] && echo "yes: $((period - 1)) = $(((period - 1) / reach_l)) x $reach_l" || echo "no: $((period - 1)) is not a multiple of $reach_l") | $(median_ms reach_strided.s$reach_seed) | $(final reach_strided.s$reach_seed) |"
    echo "| local window $reach_keys | $reach_ctx | $reach_keys | no | $(median_ms reach_local.s$reach_seed) | $(final reach_local.s$reach_seed) |"
    echo "| dense at strided's step time$([ "$dense_extrapolated" = 1 ] && echo " (extrapolated)" || true) | $dense_ctx | up to $dense_ctx | $([ "$dense_ctx" -gt "$period" ] && echo "for the window's last $((dense_ctx - period)) bytes" || echo no) | $(median_ms reach_dense.s$reach_seed) | $(final reach_dense.s$reach_seed) |"
    echo
    echo "### 3. Audio (music, 8 kHz mu-law), strided, $audio_bytes bytes a step, $audio_steps steps, final validation bits per sample"
    echo
    echo "| context | seconds | $(for s in "${seeds[@]}"; do printf 'seed %s | ' "$s"; done)mean |"
    echo "|---|---|$(for s in "${seeds[@]}"; do printf -- '---|'; done)---|"
    for ctx in $audio_ctxs; do
        values=$(for s in "${seeds[@]}"; do final "audio_$ctx.s$s"; echo; done)
        echo "| $ctx | $(awk -v c="$ctx" 'BEGIN { printf "%.2f", c / 8000 }') | $(echo "$values" | paste -sd'|' | sed 's/|/ | /g') | $(echo "$values" | awk '{ s += $1 } END { printf "%.3f", s / NR }') |"
    done
    echo
    echo "A sample from the $longest-byte model: $out/long.wav (2 s)."
    echo "(long $size, seeds ${seeds[*]}, $(date -u +%Y-%m-%d), $((SECONDS / 60)) min $((SECONDS % 60)) s in all; device: $(sed -n 's/^device: //p' "$out/reach_strided.s${seeds[0]}.log"))"
} > "$out/table.md"
cat "$out/table.md"

if command -v gnuplot > /dev/null; then
    gnuplot -e "set terminal png size 800,480; set output '$out/step_time.png'; set logscale xy; set xlabel 'sequence length n';
                set ylabel 'ms per training step'; set title 'one training step: dense against strided ($size)'; set key top left;
                plot '< grep ^dense $out/steps.txt' using 2:3 with linespoints title 'dense',
                     '< grep ^strided $out/steps.txt' using 2:3 with linespoints title 'strided, l = sqrt(n)'"
    for ctx in $audio_ctxs; do for s in "${seeds[@]}"; do echo "$ctx $(final "audio_$ctx.s$s")"; done; done > "$out/audio.txt"
    gnuplot -e "set terminal png size 800,480; set output '$out/audio.png'; set logscale x; set xlabel 'context (samples at 8 kHz)';
                set ylabel 'validation bits per sample'; set title 'music: what a longer context buys ($size)'; set key off;
                plot '$out/audio.txt' using 1:2 with points pointtype 7"
    echo "reproduce.sh long: $out/step_time.png, $out/audio.png" >&2
fi
