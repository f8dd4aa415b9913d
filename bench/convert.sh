#!/usr/bin/env bash
# Benchmark: convert a 1 GiB, half-filled dynamic VHD to raw with
# `tap-ctl vhd convert` and with `qemu-img convert`, in the same run, and
# print the ratio. Not a test: it prints numbers.
#
#   bench/convert.sh [RUNS]        (default 3 runs each, best time kept)
#
# The image is written by qemu-io (so neither tool reads its own layout):
# every other 2 MiB block holds random data. Both tools write a fresh
# output file into the page cache without syncing (qemu-img's default;
# tap-ctl's without --sync), after an untimed warm-up run that puts the
# source in the page cache, with a `sync` before each timed run.
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

# Run "$@" RUNS times; print the best wall time and the best CPU time
# (user + system) in seconds. CPU time is what the tool costs the host;
# wall time also counts waiting for a CPU when the machine is busy.
best() {
  local bw=999999 bc=999999 w c out
  "$@" > /dev/null 2>&1 # warm-up: source in the page cache
  for ((i = 0; i < RUNS; i++)); do
    # A fresh output, and no writeback of the previous run still pending
    # (truncating or deleting a file under writeback stalls on ext4).
    rm -f "$work/out.raw"
    sync
    /usr/bin/time -o "$work/time" -f "%e %U %S" "$@" > /dev/null 2>&1
    out=$(tail -1 "$work/time")
    w=$(echo "$out" | awk '{print $1}')
    c=$(echo "$out" | awk '{print $2 + $3}')
    if (($(echo "$w < $bw" | bc -l))); then bw=$w; fi
    if (($(echo "$c < $bc" | bc -l))); then bc=$c; fi
  done
  echo "$bw $bc"
}

# On a shared machine other processes' CPU use swamps the difference; as
# root both tools run under the same real-time priority (briefly) so each
# gets the CPU when it wants it. BENCH_RT=0 turns that off.
RT=()
if [[ ${BENCH_RT:-1} != 0 && $(id -u) == 0 ]] && command -v chrt > /dev/null; then
  RT=(chrt -f 10)
fi
read -r ours_w ours_c < <(best "${RT[@]}" "$TAPCTL" vhd convert -O raw "$img" "$work/out.raw")
cp "$work/out.raw" "$work/ours.raw"
read -r qemu_w qemu_c < <(best "${RT[@]}" qemu-img convert -f vpc -O raw "$img" "$work/out.raw")
cmp "$work/ours.raw" "$work/out.raw" || { echo "outputs differ!"; exit 1; }
printf 'convert 1 GiB dynamic VHD (512 MiB allocated) to raw, best of %d runs:\n' "$RUNS"
printf '                      wall      cpu (user+sys)\n'
printf '  tap-ctl vhd convert: %6.3f s  %6.3f s\n' "$ours_w" "$ours_c"
printf '  qemu-img convert:    %6.3f s  %6.3f s\n' "$qemu_w" "$qemu_c"
printf '  ratio (qemu-img / tap-ctl): wall %.2fx, cpu %.2fx\n' \
  "$(echo "$qemu_w / $ours_w" | bc -l)" "$(echo "$qemu_c / $ours_c" | bc -l)"
printf '  load average during the run: %s%s\n' "$(cut -d' ' -f1-3 /proc/loadavg)" \
  "${RT:+ (both run with ${RT[*]})}"
