#!/usr/bin/env bash
# Benchmark: convert a 1 GiB, half-filled dynamic VHD to raw with
# `tap-ctl vhd convert` and with `qemu-img convert`, in the same run, and
# print the ratio. Not a test: it prints numbers.
#
#   bench/convert.sh [RUNS]        (default 3 runs each, best time kept)
#
# The image is written by qemu-io (so neither tool reads its own layout):
# every other 2 MiB block holds random data. Outputs go to a temp dir next
# to the image; page cache is shared, so each tool's run is preceded by
# one untimed warm-up run.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
cargo build -q --release -p tapjail-ctl
TAPCTL=target/release/tap-ctl
command -v qemu-img >/dev/null || { echo "qemu-img missing (apt-get install qemu-utils)"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/tapjail-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

img="$work/src.vhd"
qemu-img create -q -f vpc -o subformat=dynamic,force_size=on "$img" 1G
# Half filled: random data in every other 2 MiB block (one qemu-io process).
head -c $((2 << 20)) /dev/urandom > "$work/chunk"
cmds=()
for ((b = 0; b < 512; b += 2)); do
  cmds+=(-c "write -s $work/chunk $((b << 21)) 2M")
done
qemu-io -f vpc "${cmds[@]}" "$img" > /dev/null
sync

best() { # best wall time in seconds of "$@" over RUNS runs
  local best=999999 t s e
  "$@" > /dev/null 2>&1 # warm-up
  for ((i = 0; i < RUNS; i++)); do
    rm -f "$work/out.raw"
    s=$(date +%s.%N)
    "$@" > /dev/null 2>&1
    e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc -l)
    if (($(echo "$t < $best" | bc -l))); then best=$t; fi
  done
  echo "$best"
}

ours=$(best "$TAPCTL" vhd convert -O raw "$img" "$work/out.raw")
cp "$work/out.raw" "$work/ours.raw"
qemu=$(best qemu-img convert -f vpc -O raw "$img" "$work/out.raw")
cmp "$work/ours.raw" "$work/out.raw" || { echo "outputs differ!"; exit 1; }
ratio=$(echo "$qemu / $ours" | bc -l)
printf 'convert 1 GiB dynamic VHD (512 MiB allocated) to raw, best of %d:\n' "$RUNS"
printf '  tap-ctl vhd convert: %6.3f s\n' "$ours"
printf '  qemu-img convert:    %6.3f s\n' "$qemu"
printf '  ratio (qemu-img / tap-ctl): %.2fx\n' "$ratio"
