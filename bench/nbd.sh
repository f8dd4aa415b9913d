#!/usr/bin/env bash
# NBD benchmark: tapdisk vs qemu-nbd serving the same image, in one run.
#
#   bench/nbd.sh [COUNT] [FORMAT]      (defaults: 60000 requests, vhd)
#
# For each server and cache mode, `qemu-img bench` sends COUNT 4 KiB reads,
# then COUNT 4 KiB writes, 32 in flight, over nbd+unix. Each run is done
# three times and the best is kept (the machine is shared). Pairs compared:
#   direct:   tapdisk (default: O_DIRECT where possible)  vs  qemu-nbd --cache=none --aio=io_uring
#   buffered: tapdisk --cache buffered                    vs  qemu-nbd (default writeback cache)
# Prints IOPS and the ratio tapdisk/qemu-nbd for each.
set -euo pipefail

COUNT=${1:-60000}
FORMAT=${2:-vhd}
SIZE=256M
REPEAT=3
ROOT=$(cd "$(dirname "$0")/.." && pwd)

for tool in qemu-img qemu-nbd qemu-io; do
  command -v "$tool" >/dev/null || { echo "bench: $tool not installed (apt-get install qemu-utils)" >&2; exit 2; }
done

cargo build --quiet --release -p tapjail-worker --manifest-path "$ROOT/Cargo.toml"
TAPDISK="$ROOT/target/release/tapdisk"

WORK=$(mktemp -d /tmp/tapjail-bench.XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

IMG="$WORK/disk.$FORMAT"
case "$FORMAT" in
  vhd) QFMT=vpc; TYPE=vhd; qemu-img create -q -f vpc -o subformat=dynamic "$IMG" "$SIZE" ;;
  raw) QFMT=raw; TYPE=aio; qemu-img create -q -f raw "$IMG" "$SIZE" ;;
  *) echo "bench: FORMAT is vhd or raw" >&2; exit 2 ;;
esac
# Allocate and fill every block, so reads hit data and writes overwrite.
qemu-io -f "$QFMT" -c "write -P 0x5a 0 $SIZE" "$IMG" >/dev/null

SOCK="$WORK/nbd.sock"
URL="nbd+unix:///?socket=$SOCK"

wait_socket() {
  for _ in $(seq 200); do
    [ -S "$SOCK" ] && qemu-img info -f raw "$URL" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "bench: server did not come up" >&2; exit 1
}

start_tapdisk() { # extra args...
  rm -f "$SOCK"
  "$TAPDISK" --nbd "$SOCK" -a "$TYPE:$IMG" "$@" 2>"$WORK/tapdisk.log" &
  SERVER_PID=$!
  wait_socket
}

start_qemu_nbd() { # extra args...
  rm -f "$SOCK"
  qemu-nbd -f "$QFMT" --persistent --shared=8 -k "$SOCK" "$@" "$IMG" 2>"$WORK/qemu-nbd.log" &
  SERVER_PID=$!
  wait_socket
}

stop_server() {
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
}

# best IOPS of REPEAT runs: bench_iops read|write
bench_iops() {
  local best=0 w= secs iops
  [ "$1" = write ] && w=-w
  for _ in $(seq $REPEAT); do
    secs=$(qemu-img bench -f raw -t none $w -d 32 -s 4k -c "$COUNT" "$URL" 2>&1 |
           sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
    iops=$(awk -v c="$COUNT" -v s="$secs" 'BEGIN { printf "%d", c / s }')
    [ "$iops" -gt "$best" ] && best=$iops
  done
  echo "$best"
}

declare -A R
run_pair() { # label, tapdisk args, qemu-nbd args
  local label=$1 targs=$2 qargs=$3
  # shellcheck disable=SC2086
  start_tapdisk $targs
  [ "$label" = direct ] && grep -h "serving" "$WORK/tapdisk.log" | sed 's/^/  /' >&2
  R[$label,tapdisk,read]=$(bench_iops read); R[$label,tapdisk,write]=$(bench_iops write)
  stop_server
  # shellcheck disable=SC2086
  start_qemu_nbd $qargs
  R[$label,qemu,read]=$(bench_iops read); R[$label,qemu,write]=$(bench_iops write)
  stop_server
}

echo "image: $FORMAT $SIZE, $COUNT x 4 KiB requests, depth 32, best of $REPEAT" >&2
run_pair direct "" "--cache=none --aio=io_uring"
run_pair buffered "--cache buffered" ""

printf '%-9s %-6s %12s %12s %8s\n' mode op tapdisk qemu-nbd ratio
for label in direct buffered; do
  for op in read write; do
    t=${R[$label,tapdisk,$op]}; q=${R[$label,qemu,$op]}
    printf '%-9s %-6s %12s %12s %8s\n' "$label" "$op" "$t" "$q" \
      "$(awk -v t="$t" -v q="$q" 'BEGIN { printf "%.2fx", t / q }')"
  done
done
