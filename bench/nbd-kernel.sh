#!/usr/bin/env bash
# Kernel nbd benchmark: our /dev/nbdN (frontend nbd-kernel) against our ublk
# device and the kernel's loop device on a raw file, all in ONE nestvm run
# (this host has neither nbd.ko nor ublk_drv; nestvm boots a 6.12 kernel
# under QEMU/TCG, so absolute numbers mean nothing and the ratios measured
# inside the same guest are the figures).
#
#   bench/nbd-kernel.sh [SECONDS] [REPEAT]   (defaults: 10 s per run, best of 3)
#
# Two brokers (one per frontend) each serve a dynamic VHD of the same size.
# fio: 4 KiB random reads, then random writes, depth 32, libaio, O_DIRECT,
# over a fully written 128 MiB disk; runs alternate loop/ublk/nbd so drift
# on the shared machine hits all three. Prints IOPS and the ratios
# nbd/ublk and nbd/loop. Then the worker of the nbd device is SIGKILLed
# under a depth-16 random writer and the stall (longest gap without a
# completed write, from fio's 100 ms log) is printed.
set -euo pipefail
SECS=${1:-10}
REPEAT=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NESTVM_HOME=${NESTVM_HOME:-$ROOT/../shared/nestvm}
cd "$ROOT"

command -v fio >/dev/null || { echo "bench: fio not installed (apt-get install fio; the VM shares this root fs)" >&2; exit 2; }
"$NESTVM_HOME/setup.sh" >/dev/null
./.ci/nestvm-modules fetch >/dev/null
cargo build --quiet --release -p tapjail-broker -p tapjail-ctl -p tapjail-worker --bins
BIN=$ROOT/target/release

GUEST=$ROOT/target/bench-nbd-kernel-guest.sh
cat > "$GUEST" <<'GUEST_EOF'
set -euo pipefail
BIN=$1 SECS=$2 REPEAT=$3
echo "bench: inside nestvm: kernel $(uname -r), $(nproc) vCPUs" >&2
./.ci/nestvm-modules load
W=$(mktemp -d /tmp/nbdk-bench.XXXXXX)
SIZE_MIB=128
BROKERS=()
start_broker() { # name frontend uid-base
  local d=$W/$1
  mkdir -p "$d/images" "$d/dev"
  cat > "$d/policy.toml" <<EOF
socket = "$d/broker.sock"
audit_log = "$d/audit.jsonl"
state_dir = "$d/state"
device_dir = "$d/dev"
worker_uids = [$3, $(($3 + 9))]
tapdisk = "$BIN/tapdisk"
frontend = "$2"
respawn = true

[[tenant]]
name = "bench"
uids = [0]
image_roots = ["$d/images"]
writable = true
max_disks = 2
admin = true
EOF
  "$BIN/tap-broker" --config "$d/policy.toml" 2>"$d/broker.log" &
  BROKERS+=($!)
  for _ in $(seq 200); do [ -S "$d/broker.sock" ] && break; sleep 0.05; done
  "$BIN/tap-ctl" vhd create -n "$d/images/disk.vhd" -s "$SIZE_MIB" >/dev/null
  "$BIN/tap-ctl" --socket "$d/broker.sock" create -a "vhd:$d/images/disk.vhd" >/dev/null
  echo "bench: $1: $d/dev/tapdev0 -> $(readlink "$d/dev/tapdev0")" >&2
}
LOOP=
cleanup() {
  for n in ublk nbd; do
    "$BIN/tap-ctl" --socket "$W/$n/broker.sock" destroy -m 0 >/dev/null 2>&1 || true
  done
  for b in "${BROKERS[@]}"; do kill "$b" 2>/dev/null || true; wait "$b" 2>/dev/null || true; done
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
start_broker ublk ublk 320000
start_broker nbd nbd-kernel 320100
truncate -s "${SIZE_MIB}M" "$W/disk.raw"
LOOP=$(losetup --direct-io=on -f --show "$W/disk.raw")
dev_path() { case $1 in loop) echo "$LOOP" ;; ublk) echo "$W/ublk/dev/tapdev0" ;; nbd) echo "$W/nbd/dev/tapdev0" ;; esac; }
DEVS="loop ublk nbd"
for d in $DEVS; do
  fio --name=fill --filename="$(dev_path "$d")" --rw=write --bs=1M --iodepth=4 --ioengine=libaio \
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
      v=$(iops "$(dev_path "$dev")" "$op")
      echo "bench:   $op $dev $v" >&2
      [ "$v" -gt "${BEST[$dev,$op]}" ] && BEST[$dev,$op]=$v
    done
  done
done
printf '%-10s %10s %10s %10s %9s %9s\n' op loop/raw ublk/vhd nbd/vhd nbd/ublk nbd/loop
for op in randread randwrite; do
  l=${BEST[loop,$op]} u=${BEST[ublk,$op]} n=${BEST[nbd,$op]}
  printf '%-10s %10s %10s %10s %9s %9s\n' "$op" "$l" "$u" "$n" \
    "$(awk -v a="$n" -v b="$u" 'BEGIN { printf "%.2fx", a / b }')" \
    "$(awk -v a="$n" -v b="$l" 'BEGIN { printf "%.2fx", a / b }')"
done

# The stall of a worker kill: fio logs completed writes per 100 ms; the
# longest run of empty intervals after the kill is the stall.
NBD=$(dev_path nbd)
fio --name=kill --filename="$NBD" --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
    --runtime=$((SECS * 6)) --time_based --size="${SIZE_MIB}M" --eta=never \
    --write_iops_log="$W/kill" --log_avg_msec=100 --output=/dev/null &
FIO=$!
sleep "$SECS"
PID=$("$BIN/tap-ctl" --socket "$W/nbd/broker.sock" list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["pid"])')
kill -9 "$PID"
KILLED_AT=$SECS
wait "$FIO" || { echo "bench: fio saw an error after the kill" >&2; exit 1; }
python3 - "$W"/kill_iops*.log "$KILLED_AT" <<'PY'
import sys
path, killed = sys.argv[1], float(sys.argv[2])
t = [int(l.split(",")[0]) for l in open(path) if int(l.split(",")[1]) > 0]
gaps = [(b - a) for a, b in zip(t, t[1:]) if b / 1000.0 >= killed - 1]
print(f"worker SIGKILL under a depth-16 writer: longest gap without completed writes {max(gaps) / 1000.0:.1f} s (request timeout 30 s)")
PY
GUEST_EOF

echo "bench: 4 KiB random I/O, depth 32, ${SECS} s per run, best of $REPEAT; loop, ublk and nbd-kernel inside ONE nestvm run" >&2
"$NESTVM_HOME/boot.sh" bash "$GUEST" "$BIN" "$SECS" "$REPEAT"
