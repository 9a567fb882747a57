#!/usr/bin/env bash
# compare_torch.sh: ./train against the same model in PyTorch on this CPU, side by side in one run.
#
# The peer is tools/peers/torch_peer.py: the same model in PyTorch, the pattern as a boolean mask, what a
# PyTorch user without custom kernels writes. It is a measuring instrument, not part of the project: it needs
# PyTorch 2.x in a virtual environment of your own, never installed into the system:
#   python3 -m venv /tmp/torch2 && /tmp/torch2/bin/pip install torch numpy     (about 5 GB)
#   PYTHON=/tmp/torch2/bin/python3 bash tools/compare_torch.sh
# On PyTorch 2.x the attention is F.scaled_dot_product_attention with the mask (ATTN=sdpa, the default;
# FlexAttention has no CPU backward), and COMPILE=1 runs the peer's whole model under torch.compile.
# ATTN=mask is q k^T, masked_fill and softmax, which PyTorch 1.x (Debian's python3-torch) also runs.
# For each configuration (width 128, 4 heads, strided/merged with l = sqrt(ctx)) both train for STEPS
# steps on the same thread count; the table gives the median tokens/s of the steps after the first,
# and the ratio. The first lines say which PyTorch and which BLAS each side uses. With ROUNDS=R each side runs R times, the two alternating, so that
# the machine's slow and fast phases reach both sides: `ratio` is each side's best median against the
# other's, `paired` the median of the R rounds' own ratios (each round's two runs close in time). The
# last two lines are summaries: paired: <ctx>=<ratio> ..., then compare: <ctx>=<ratio> ...
#
# Usage: bash tools/compare_torch.sh [STEPS]    (default 8; PEER=another torch_peer.py, THREADS=2,
#        ROUNDS=1, CONTEXTS="256 1024 4096 8192" (a subset of these), PYTHON=a python3 that has torch,
#        ATTN=sdpa|mask, COMPILE=0|1)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-8}
threads=${THREADS:-2}
rounds=${ROUNDS:-1}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "compare_torch.sh: ROUNDS must be a whole number >= 1, got '$rounds'" >&2; exit 1; }
read -r -d '' -a wanted <<< "${CONTEXTS:-256 1024 4096 8192}" || true # split at any white space
[ ${#wanted[@]} -gt 0 ] || { echo "compare_torch.sh: CONTEXTS is empty: give some of 256 1024 4096 8192" >&2; exit 1; }
for ctx in "${wanted[@]}"; do
    [[ " 256 1024 4096 8192 " == *" $ctx "* ]] || { echo "compare_torch.sh: CONTEXTS takes some of 256 1024 4096 8192, got '$ctx'" >&2; exit 1; }
done
contexts=" ${wanted[*]} "
peer=${PEER:-}
for p in "$peer" tools/peers/torch_peer.py; do
    [ -n "$p" ] && [ -f "$p" ] && { peer=$p; break; }
done
if [ -z "$peer" ] || [ ! -f "$peer" ]; then
    echo "compare_torch.sh: no torch_peer.py (give PEER=path/to/torch_peer.py)" >&2; exit 1
fi
python=""
for p in ${PYTHON:-} /usr/bin/python3 python3; do
    "$p" -c 'import torch' 2> /dev/null && { python=$p; break; }
done
if [ -z "$python" ]; then
    echo "compare_torch.sh: no python3 with PyTorch: python3 -m venv /tmp/torch2 && /tmp/torch2/bin/pip install torch numpy, then PYTHON=/tmp/torch2/bin/python3 bash tools/compare_torch.sh" >&2
    exit 1
fi
major=$("$python" -c 'import torch; print(torch.__version__.split(".")[0])')
attn=${ATTN:-$([ "$major" -ge 2 ] && echo sdpa || echo mask)}
compile=${COMPILE:-0}
[[ "$attn" == sdpa || "$attn" == mask ]] || { echo "compare_torch.sh: ATTN is sdpa or mask, got '$attn'" >&2; exit 1; }
[[ "$compile" == 0 || "$compile" == 1 ]] || { echo "compare_torch.sh: COMPILE is 0 or 1, got '$compile'" >&2; exit 1; }
if [ "$major" -lt 2 ] && [ "$attn$compile" != mask0 ]; then
    echo "compare_torch.sh: ATTN=sdpa and COMPILE=1 need PyTorch 2.x; $python has $("$python" -c 'import torch; print(torch.__version__)')" >&2; exit 1
fi
make -s cpu train build/datatool > /dev/null
data=build/compare
mkdir -p "$data"
[ -f "$data/train.bin" ] || ./build/datatool synthetic -bytes 300000 2> /dev/null | ./build/datatool pack "$data/train.bin" -kind text
[ -f "$data/val.bin" ] || ./build/datatool synthetic -bytes 20000 -seed 2 2> /dev/null | ./build/datatool pack "$data/val.bin" -kind text
# A current OpenBLAS is slowed by these (set on some machines for an older one)
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
export OMP_NUM_THREADS=$threads

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }
echo "ours: $(./test_kernels -only rejections | sed -n 's/^device: //p')"
echo "peer: $("$python" -c 'import re, torch; m = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
print("PyTorch " + torch.__version__ + ", BLAS " + (m.group(1) if m else "unknown"))'), attention $attn, torch.compile $compile"

printf '%-8s %-18s %14s %14s %8s %8s\n' ctx "batch, layers" "./train tok/s" "PyTorch tok/s" ratio paired
summary="compare:"
paired_summary="paired:"
for config in "256 8 4" "1024 4 2" "4096 1 2" "8192 1 2"; do
    read -r ctx batch layers <<< "$config"
    [[ "$contexts" == *" $ctx "* ]] || continue
    stride=$(awk -v n="$ctx" 'BEGIN { printf "%d", sqrt(n) + 0.5 }')
    ours=0 theirs=0 round_ratios=""
    for ((round = 1; round <= rounds; round++)); do # alternating, so that both sides meet the same phases
        a=$(./train -i "$data" -o "$data/out" -ctx "$ctx" -stride "$stride" -dim 128 -heads 4 -layers "$layers" \
            -batch "$batch" -steps "$steps" -eval_every 0 -sample_every 0 -save_every 0 -eval_bytes 1 |
            sed -n 's/^step \([0-9]*\)\/.* | \([0-9]*\) tok\/s$/\1 \2/p' | awk '$1 > 1 { print $2 }' | median)
        b=$("$python" "$peer" --ctx "$ctx" --stride "$stride" --dim 128 --heads 4 --layers "$layers" --batch "$batch" \
            --steps "$steps" --threads "$threads" --attn "$attn" --compile "$compile" --data "$data/train.bin" | sed -n 's/^peer: tok\/s=\([0-9]*\).*/\1/p')
        a=${a:-0} b=${b:-0}
        ours=$((a > ours ? a : ours)) theirs=$((b > theirs ? b : theirs))
        round_ratios="$round_ratios $(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.4f", (b > 0 ? a / b : 0) }')"
    done
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    paired=$(printf '%s\n' $round_ratios | median | awk '{ printf "%.2f", $1 }')
    printf '%-8s %-18s %14s %14s %7sx %7sx\n' "$ctx" "$batch, $layers" "$ours" "$theirs" "$ratio" "$paired"
    summary="$summary $ctx=${ratio}x"
    paired_summary="$paired_summary $ctx=${paired}x"
done
echo "$paired_summary (the median over rounds of each round's own ratio)"
echo "$summary (threads $threads, $steps steps each, best of $rounds round$([ "$rounds" = 1 ] || echo s); peer attention $attn, torch.compile $compile)"
