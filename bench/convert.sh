#!/usr/bin/env bash
# Benchmark: convert a 1 GiB, half-filled dynamic VHD to raw with
# `tap-ctl vhd convert` and with `qemu-img convert`, in the same run, and
# print the ratio. Not a test: it prints numbers.
#
#   bench/convert.sh [RUNS]        (default 9 runs of each tool)
#
# The image is written by qemu-io (so neither tool reads its own layout):
# every other 2 MiB block holds random data. Both tools write a fresh
# output file into the page cache without syncing (qemu-img's default;
# tap-ctl's without --sync), after an untimed warm-up run that puts the
# source in the page cache, with a `sync` before each timed run.
#
# The machine is shared and noisy, so the two tools are timed alternately
# (which one goes first alternates too) and each pair gives one ratio; the
# median ratio and its spread (min..max) over RUNS pairs are reported,
# with the median times. Wall time is measured to the microsecond; CPU
# time (user + system, from /usr/bin/time) only to 10 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-9}
# TAPCTL=path/to/tap-ctl compares another build (e.g. before a change).
if [[ -z ${TAPCTL:-} ]]; then
  cargo build -q --release -p tapjail-ctl
  TAPCTL=target/release/tap-ctl
fi
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

# On a shared machine other processes' CPU use swamps the difference; as
# root both tools run under the same real-time priority (briefly) so each
# gets the CPU when it wants it. BENCH_RT=0 turns that off.
RT=()
if [[ ${BENCH_RT:-1} != 0 && $(id -u) == 0 ]] && command -v chrt > /dev/null; then
  RT=(chrt -f 10)
fi
OURS=("${RT[@]}" "$TAPCTL" vhd convert -f vhd -O raw "$img" "$work/out.raw")
QEMU=("${RT[@]}" qemu-img convert -f vpc -O raw "$img" "$work/out.raw")

# One timed run of "$@" into a fresh output: prints "wall cpu" in seconds.
timed() {
  # No writeback of the previous run still pending (truncating or
  # deleting a file under writeback stalls on ext4).
  rm -f "$work/out.raw"
  sync
  local t0=$EPOCHREALTIME t1
  /usr/bin/time -o "$work/time" -f "%U %S" "$@" > /dev/null 2>&1
  t1=$EPOCHREALTIME
  awk -v a="$t0" -v b="$t1" '{ printf "%.6f %.2f\n", b - a, $1 + $2 }' "$work/time"
}

# Median and spread of a list of numbers (one per line).
stats() { sort -g | awk '{ v[NR] = $1 } END {
  m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
  printf "%.3f (%.3f..%.3f)", m, v[1], v[NR] }'; }

"${OURS[@]}" > /dev/null 2>&1 # warm-up: source in the page cache
cp "$work/out.raw" "$work/ours.raw"
"${QEMU[@]}" > /dev/null 2>&1
cmp "$work/ours.raw" "$work/out.raw" || { echo "outputs differ!"; exit 1; }
rm -f "$work/ours.raw"

: > "$work/pairs"
for ((i = 0; i < RUNS; i++)); do
  if ((i % 2 == 0)); then
    o=$(timed "${OURS[@]}"); q=$(timed "${QEMU[@]}")
  else
    q=$(timed "${QEMU[@]}"); o=$(timed "${OURS[@]}")
  fi
  echo "$o $q" >> "$work/pairs"
done
# columns: ours_wall ours_cpu qemu_wall qemu_cpu
col() { awk -v c="$1" '{ print $c }' "$work/pairs" | stats; }
ratio() { awk -v a="$1" -v b="$2" '$b > 0 { print $a / $b }' "$work/pairs" | stats; }

printf 'convert 1 GiB dynamic VHD (512 MiB allocated) to raw, %d alternating runs each\n' "$RUNS"
printf '(median, min..max in parentheses):\n'
printf '  tap-ctl vhd convert: wall %s s   cpu %s s\n' "$(col 1)" "$(col 2)"
printf '  qemu-img convert:    wall %s s   cpu %s s\n' "$(col 3)" "$(col 4)"
printf '  ratio qemu-img / tap-ctl, per pair: wall %sx   cpu %sx\n' "$(ratio 3 1)" "$(ratio 4 2)"
printf '  load average during the run: %s%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" \
  "${RT:+ (both run with ${RT[*]})}"
