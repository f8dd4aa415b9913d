#!/usr/bin/env bash
# ublk benchmark: our ublk device on a dynamic VHD (tap-broker + confined
# tapdisk, created with tap-ctl) against the kernel's loop device on a raw
# file, in ONE nestvm run (this host's kernel has no ublk_drv; nestvm boots a
# 6.12 kernel under QEMU/TCG, so absolute numbers mean nothing and the ratio
# measured inside the same guest is the figure).
#
#   bench/ublk.sh [SECONDS] [REPEAT] [FORMAT]   (defaults: 10 s per run, best of 3, vhd)
#   FORMAT raw serves a raw file over ublk too, to tell ublk's cost from the VHD engine's.
#   FORMAT placement adds a third device in the same guest: ublk on a dynamic VHD whose
#   blocks are NOT 4 KiB-aligned in the file (made by `qemu-img convert`, blocks end to
#   end as tapjail wrote them before its placement rule); ratio vhd/unaligned.
#
# fio: 4 KiB random reads, then random writes, depth 32, libaio, O_DIRECT on
# the block device, over a fully written 128 MiB disk. Runs alternate
# loop/ublk so drift on the shared machine hits both. Prints IOPS and the
# ratio ublk/loop, and the cache mode each side really ran with (the loop's
# dio flag, the worker's image fd flags; bench/cache-mode.sh), loudly when
# one fell back to the page cache.
set -euo pipefail
SECS=${1:-10}
REPEAT=${2:-3}
FORMAT=${3:-vhd}
case "$FORMAT" in vhd|raw|placement) ;; *) echo "bench: FORMAT is vhd, raw or placement" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NESTVM_HOME=${NESTVM_HOME:-$ROOT/../shared/nestvm}
cd "$ROOT"

command -v fio >/dev/null || { echo "bench: fio not installed (apt-get install fio; the VM shares this root fs)" >&2; exit 2; }
"$NESTVM_HOME/setup.sh" >/dev/null
./.ci/nestvm-modules fetch >/dev/null
cargo build --quiet --release -p tapjail-broker -p tapjail-ctl -p tapjail-worker --bins
BIN=$ROOT/target/release

GUEST=$ROOT/target/bench-ublk-guest.sh
cat > "$GUEST" <<'GUEST_EOF'
set -euo pipefail
BIN=$1 SECS=$2 REPEAT=$3 FORMAT=$4
echo "bench: inside nestvm: kernel $(uname -r), $(nproc) vCPUs" >&2
./.ci/nestvm-modules load
. ./bench/cache-mode.sh
W=$(mktemp -d /tmp/ublk-bench.XXXXXX)
mkdir -p "$W/images" "$W/dev"
SIZE_MIB=128
cat > "$W/policy.toml" <<EOF
socket = "$W/broker.sock"
audit_log = "$W/audit.jsonl"
state_dir = "$W/state"
device_dir = "$W/dev"
worker_uids = [310000, 310009]
tapdisk = "$BIN/tapdisk"
frontend = "ublk"
respawn = false

[[tenant]]
name = "bench"
uids = [0]
image_roots = ["$W/images"]
writable = true
max_disks = 2
admin = true
EOF
"$BIN/tap-broker" --config "$W/policy.toml" 2>"$W/broker.log" &
BROKER=$!
LOOP=
cleanup() {
  "$BIN/tap-ctl" --socket "$W/broker.sock" destroy -m 1 >/dev/null 2>&1 || true
  "$BIN/tap-ctl" --socket "$W/broker.sock" destroy -m 0 >/dev/null 2>&1 || true
  kill "$BROKER" 2>/dev/null || true; wait "$BROKER" 2>/dev/null || true
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
for _ in $(seq 200); do [ -S "$W/broker.sock" ] && break; sleep 0.05; done

if [ "$FORMAT" != raw ]; then
  "$BIN/tap-ctl" vhd create -n "$W/images/disk.vhd" -s "$SIZE_MIB" >/dev/null
  "$BIN/tap-ctl" --socket "$W/broker.sock" create -a "vhd:$W/images/disk.vhd" >/dev/null
else
  truncate -s "${SIZE_MIB}M" "$W/images/disk.img"
  "$BIN/tap-ctl" --socket "$W/broker.sock" create -a "aio:$W/images/disk.img" >/dev/null
fi
UBLK=$W/dev/tapdev0
DEVS="loop ublk"
if [ "$FORMAT" = placement ]; then
  # Every block allocated by qemu-img, end to end after its BAT: block k's
  # data lies 512*k bytes (mod 4 KiB) off alignment. The fill below only
  # overwrites, so the layout stays.
  fio --name=src --filename="$W/u.src" --rw=write --bs=1M --ioengine=psync \
      --size="${SIZE_MIB}M" --eta=never --output=/dev/null
  qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$W/u.src" "$W/images/u.vhd"
  rm -f "$W/u.src"
  "$BIN/tap-ctl" --socket "$W/broker.sock" create -a "vhd:$W/images/u.vhd" >/dev/null
  UBLK_U=$W/dev/tapdev1
  DEVS="loop ublk unaligned"
  cache_report "ublk tapdisk unaligned image fd" direct \
    "$(fd_mode "$(worker_pid "$BIN/tap-ctl" --socket "$W/broker.sock" 1)" "$W/images/u.vhd")"
fi
echo "bench: $UBLK -> $(readlink "$UBLK") ($(grep -o 'frontend [a-z]*' "$W/broker.log" | head -1))" >&2
truncate -s "${SIZE_MIB}M" "$W/disk.raw"
LOOP=$(losetup --direct-io=on -f --show "$W/disk.raw")
echo "bench: loop device $LOOP on a raw file" >&2
# What each side really runs with: the loop's own I/O to its file, and the
# worker's image fd as the kernel holds it (both fall back to the page cache
# where the guest's filesystem refuses O_DIRECT; then this says so).
IMG=$W/images/disk.img; [ "$FORMAT" != raw ] && IMG=$W/images/disk.vhd
cache_report "loop over raw" direct "$(loop_mode "$LOOP")"
cache_report "ublk tapdisk image fd" direct \
  "$(fd_mode "$(worker_pid "$BIN/tap-ctl" --socket "$W/broker.sock" 0)" "$IMG")"

# Write every block of both, so reads hit data and VHD writes overwrite.
dev_path() { case $1 in loop) echo "$LOOP" ;; ublk) echo "$UBLK" ;; unaligned) echo "$UBLK_U" ;; esac; }
for d in $DEVS; do
  dev=$(dev_path "$d")
  fio --name=fill --filename="$dev" --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
      --direct=1 --size="${SIZE_MIB}M" --eta=never --output=/dev/null
done

iops() { # device, randread|randwrite
  fio --name=b --filename="$1" --rw="$2" --bs=4k --iodepth=32 --ioengine=libaio --direct=1 \
      --runtime="$SECS" --time_based --size="${SIZE_MIB}M" --randrepeat=0 --eta=never \
      --output-format=json |
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))'
}
declare -A BEST
for op in randread randwrite; do
  for dev in $DEVS; do BEST[$dev,$op]=0; done
  for _ in $(seq "$REPEAT"); do
    for dev in $DEVS; do
      path=$(dev_path "$dev")
      v=$(iops "$path" "$op")
      echo "bench:   $op $dev $v" >&2
      [ "$v" -gt "${BEST[$dev,$op]}" ] && BEST[$dev,$op]=$v
    done
  done
done
NAME=$FORMAT; [ "$FORMAT" = placement ] && NAME=vhd
printf '%-10s %12s %12s %8s' op loop/raw "ublk/$NAME" ratio
[ "$FORMAT" = placement ] && printf ' %16s %14s' ublk/unaligned vhd/unaligned
echo
for op in randread randwrite; do
  l=${BEST[loop,$op]}; u=${BEST[ublk,$op]}
  printf '%-10s %12s %12s %8s' "$op" "$l" "$u" "$(awk -v u="$u" -v l="$l" 'BEGIN { printf "%.2fx", u / l }')"
  if [ "$FORMAT" = placement ]; then
    x=${BEST[unaligned,$op]}
    printf ' %16s %14s' "$x" "$(awk -v u="$u" -v x="$x" 'BEGIN { printf "%.2fx", u / x }')"
  fi
  echo
done
cache_summary
GUEST_EOF

echo "bench: 4 KiB random I/O, depth 32, ${SECS} s per run, best of $REPEAT, ublk on $FORMAT; inside ONE nestvm run" >&2
"$NESTVM_HOME/boot.sh" bash "$GUEST" "$BIN" "$SECS" "$REPEAT" "$FORMAT"
