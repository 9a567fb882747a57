#!/usr/bin/env bash
# data/prepare.sh NAME [flags]: makes data/NAME/train.bin and val.bin (and test.bin where the data set has
# one) in the trainer's format (docs/formats.md), then prints what it made.
#
#   downloads (need internet):  enwik8   text, 100 MB of Wikipedia: the paper's split 90M / 5M / 5M
#                               cifar10  images 32 x 32 x 3: train 45000, val 5000, test 10000
#   Debian packages (offline):  kjv            text, the King James Bible (bible-kjv), 4.3 MB
#                               gcide          text, the GNU Collaborative International Dictionary of
#                                              English (dict-gcide), 40 MB
#                               fashion_mnist  images 28 x 28 x 1 (dataset-fashion-mnist): 55000 / 5000 / 10000
#                               music          audio, 8 kHz mu-law (asterisk-moh-opsound-wav), 18 minutes
#                               speech         audio, 8 kHz mu-law (asterisk-core-sounds-en-wav), 21 minutes
#   generated:                  synthetic [-bytes N] [-period P] [-noise PERCENT] [-seed S]
#                               long-range structure a local window cannot see (data/datatool.c)
#   default:                    kjv, else synthetic (made offline: nothing is downloaded); data/default
#                               then points to it (what ./train reads when given no -i)
#
# A data set already made is checked and kept, never downloaded again. Missing Debian packages are
# installed when run as root with apt-get, otherwise the script says which to install.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
tool="$root/build/datatool"

say() { echo "prepare.sh: $*" >&2; }
die() { say "$*"; exit 1; }

[ $# -ge 1 ] || die "usage: data/prepare.sh enwik8|cifar10|kjv|gcide|fashion_mnist|music|speech|synthetic|default"
name=$1
shift
make -s -C "$root" build/datatool >/dev/null || die "could not build the data tool (make build/datatool)"

# need_package PACKAGE PATH: makes sure the Debian package that provides PATH is installed.
need_package() {
    [ -e "$2" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing the Debian package $1"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null 2>&1; } ||
            die "could not install $1 with apt-get"
    else
        die "$name needs the Debian package $1: run  sudo apt-get install $1  and try again"
    fi
    [ -e "$2" ] || die "the package $1 is installed but $2 is missing"
}

# download URL FILE: fetches URL once into data/downloads/FILE (kept for next time).
download() {
    local dest="$here/downloads/$2"
    [ -s "$dest" ] && return 0
    mkdir -p "$here/downloads"
    command -v curl >/dev/null || need_package curl /usr/bin/curl
    say "downloading $1"
    curl -fsSL --connect-timeout 15 --max-time 1800 -o "$dest.part" "$1" ||
        { rm -f "$dest.part"; die "could not download $1 (no internet?); offline data sets: kjv gcide fashion_mnist music speech synthetic"; }
    mv "$dest.part" "$dest"
}

final="$here/$name"
out="$final.partial" # a data set is made here, and replaces $final only once it is whole
report() { for f in "$final"/*.bin; do "$tool" info "$f"; done; }

# A data set is complete when train.bin and val.bin are there and pass the header and size checks.
complete() { [ -f "$1/train.bin" ] && [ -f "$1/val.bin" ] && "$tool" info "$1/train.bin" >/dev/null 2>&1 &&
             "$tool" info "$1/val.bin" >/dev/null 2>&1; }

# cut_splits RAW KIND_FLAGS TRAIN_BYTES VAL_BYTES [TEST_BYTES]: cuts RAW (a plain file) into the splits.
cut_splits() {
    local raw=$1 flags=$2 train=$3 val=$4 test=${5:-0}
    local size
    size=$(stat -c %s "$raw")
    [ "$size" -ge $((train + val + test)) ] || die "$name: the source has $size bytes, fewer than the splits need"
    head -c "$train" "$raw" | "$tool" pack "$out/train.bin" $flags
    tail -c +$((train + 1)) "$raw" | head -c "$val" | "$tool" pack "$out/val.bin" $flags
    if [ "$test" -gt 0 ]; then tail -c +$((train + val + 1)) "$raw" | head -c "$test" | "$tool" pack "$out/test.bin" $flags; fi
}

# The last 5% for validation, at a whole multiple of `unit` bytes.
split_95_5() {
    local raw=$1 flags=$2 unit=${3:-1} size val
    size=$(stat -c %s "$raw")
    val=$((size / 20 / unit * unit))
    cut_splits "$raw" "$flags" $((size - val)) "$val"
}

# Audio: every WAV file under DIR, in name order, as 8 kHz mono mu-law.
audio_to_mulaw() {
    command -v sox >/dev/null || need_package sox /usr/bin/sox
    find "$1" -name '*.wav' | sort | while read -r wav; do
        sox "$wav" -t raw -e signed -b 16 -r 8000 -c 1 - 2>/dev/null | "$tool" mulaw
    done
}

make_set() {
    local raw="$out/raw.tmp"
    rm -rf "$out"
    mkdir -p "$out"
    # On any exit, leave no half-made data set behind: the old one, if any, stays as it was.
    trap 'rm -rf "$out"' EXIT
    case $name in
    enwik8)
        download http://mattmahoney.net/dc/enwik8.zip enwik8.zip
        command -v unzip >/dev/null || need_package unzip /usr/bin/unzip
        unzip -p "$here/downloads/enwik8.zip" enwik8 > "$raw" || die "enwik8.zip is damaged: delete data/downloads/enwik8.zip and rerun"
        [ "$(stat -c %s "$raw")" = 100000000 ] || die "enwik8 should be 100000000 bytes: delete data/downloads/enwik8.zip and rerun"
        cut_splits "$raw" "-kind text" 90000000 5000000 5000000 ;;
    cifar10)
        download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz cifar-10-binary.tar.gz
        tar -xzf "$here/downloads/cifar-10-binary.tar.gz" -C "$out" || die "cifar-10-binary.tar.gz is damaged: delete it from data/downloads and rerun"
        local batches="$out/cifar-10-batches-bin" flags="-kind image -height 32 -width 32 -channels 3"
        cat "$batches"/data_batch_{1,2,3,4,5}.bin | "$tool" cifar > "$raw"
        "$tool" cifar < "$batches/test_batch.bin" > "$raw.test"
        cut_splits "$raw" "$flags" $((45000 * 3072)) $((5000 * 3072))
        "$tool" pack "$out/test.bin" $flags < "$raw.test"
        rm -rf "$batches" "$raw.test" ;;
    kjv)
        need_package bible-kjv /usr/bin/bible
        bible -l1000 gen1:1-rev22:21 > "$raw" # -l1000: otherwise lines are wrapped at $COLUMNS
        split_95_5 "$raw" "-kind text" ;;
    gcide)
        need_package dict-gcide /usr/share/dictd/gcide.dict.dz
        zcat /usr/share/dictd/gcide.dict.dz > "$raw"
        split_95_5 "$raw" "-kind text" ;;
    fashion_mnist)
        local dir=/usr/share/datasets/fashion-mnist flags="-kind image -height 28 -width 28 -channels 1"
        need_package dataset-fashion-mnist "$dir/train-images-idx3-ubyte.gz"
        zcat "$dir/train-images-idx3-ubyte.gz" | "$tool" idx > "$raw"
        cut_splits "$raw" "$flags" $((55000 * 784)) $((5000 * 784))
        zcat "$dir/t10k-images-idx3-ubyte.gz" | "$tool" idx | "$tool" pack "$out/test.bin" $flags ;;
    music)
        need_package asterisk-moh-opsound-wav /usr/share/asterisk/moh/macroform-cold_day.wav
        audio_to_mulaw /usr/share/asterisk/moh > "$raw"
        split_95_5 "$raw" "-kind audio -rate 8000" ;;
    speech)
        need_package asterisk-core-sounds-en-wav /usr/share/asterisk/sounds/en_US_f_Allison
        audio_to_mulaw /usr/share/asterisk/sounds/en_US_f_Allison > "$raw"
        split_95_5 "$raw" "-kind audio -rate 8000" ;;
    synthetic)
        local size=(-bytes 4000000) # unless the flags give one
        case " $* " in *" -bytes "*) size=() ;; esac
        "$tool" synthetic "${size[@]}" "$@" > "$raw"
        split_95_5 "$raw" "-kind text" ;;
    *)
        die "unknown data set '$name': use enwik8 cifar10 kjv gcide fashion_mnist music speech synthetic default" ;;
    esac
    rm -f "$raw"
    rm -rf "$final"
    mv "$out" "$final"
}

if [ "$name" = default ]; then
    # Made offline, never downloaded: kjv when Debian can give it, else the synthetic set.
    why="the King James Bible, from Debian's bible-kjv; the README's expected output is for it"
    if complete "$here/kjv"; then chosen=kjv
    elif bash "$0" kjv; then chosen=kjv
    else
        chosen=synthetic
        why="kjv could not be had (above); the README's expected output is for kjv, so yours will differ"
        complete "$here/synthetic" || bash "$0" synthetic
    fi
    ln -sfn "$chosen" "$here/default"
    say "data/default -> data/$chosen ($why)"
    say "other data sets: data/prepare.sh NAME, e.g. enwik8 (downloads 36 MB), then ./train -i data/NAME"
    exit 0
fi

if complete "$final" && [ $# -eq 0 ]; then
    say "$name is already prepared"
else
    make_set "$@"
fi
report
