#!/usr/bin/env bash
# NBD benchmark: tapdisk vs qemu-nbd serving the same image, in one run.
#
#   bench/nbd.sh [COUNT] [FORMAT] [ROUNDS]   (defaults: 60000 requests, vhd, 5)
#
# `qemu-img bench` sends COUNT 4 KiB reads or writes, 32 in flight, over
# nbd+unix. Pairs compared:
#   direct:   tapdisk (default: O_DIRECT where possible)  vs  qemu-nbd --cache=none --aio=io_uring
#   buffered: tapdisk --cache buffered                    vs  qemu-nbd (default writeback cache)
#
# The machine is shared and noisy, so both servers run at the same time,
# each on its own copy of the image (identical bytes, both in the page
# cache), and are measured alternately: every round times one run against
# each server (which goes first alternates) and gives one ratio. Prints the
# median IOPS of each and the median ratio tapdisk/qemu-nbd with its spread
# (min..max) over ROUNDS rounds. As root, servers and client run under the
# same real-time round-robin priority (BENCH_RT=0 turns that off). Reports
# the cache mode each server's image fd really has (bench/cache-mode.sh),
# with a WARNING when it is not the mode of the pair.
set -euo pipefail

COUNT=${1:-60000}
FORMAT=${2:-vhd}
ROUNDS=${3:-5}
SIZE=256M
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/cache-mode.sh
. "$ROOT/bench/cache-mode.sh"

for tool in qemu-img qemu-nbd qemu-io; do
  command -v "$tool" >/dev/null || { echo "bench: $tool not installed (apt-get install qemu-utils)" >&2; exit 2; }
done

# TAPDISK=path/to/tapdisk compares another build (e.g. before a change).
if [ -z "${TAPDISK:-}" ]; then
  cargo build --quiet --release -p tapjail-worker --manifest-path "$ROOT/Cargo.toml"
  TAPDISK="$ROOT/target/release/tapdisk"
fi

RT=()
if [[ ${BENCH_RT:-1} != 0 && $(id -u) == 0 ]] && command -v chrt > /dev/null; then
  RT=(chrt -r 10)
fi

WORK=$(mktemp -d /tmp/tapjail-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

IMG_T="$WORK/tapdisk.$FORMAT"
IMG_Q="$WORK/qemu.$FORMAT"
case "$FORMAT" in
  vhd) QFMT=vpc; TYPE=vhd; qemu-img create -q -f vpc -o subformat=dynamic "$IMG_T" "$SIZE" ;;
  raw) QFMT=raw; TYPE=aio; qemu-img create -q -f raw "$IMG_T" "$SIZE" ;;
  *) echo "bench: FORMAT is vhd or raw" >&2; exit 2 ;;
esac
# Allocate and fill every block, so reads hit data and writes overwrite.
qemu-io -f "$QFMT" -c "write -P 0x5a 0 $SIZE" "$IMG_T" >/dev/null
cp "$IMG_T" "$IMG_Q"
cat "$IMG_T" "$IMG_Q" > /dev/null # both in the page cache

SOCK_T="$WORK/tapdisk.sock"
SOCK_Q="$WORK/qemu.sock"

wait_socket() { # socket
  for _ in $(seq 200); do
    [ -S "$1" ] && qemu-img info -f raw "nbd+unix:///?socket=$1" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "bench: server on $1 did not come up" >&2; exit 1
}

start_servers() { # tapdisk args | qemu-nbd args
  local targs=$1 qargs=$2
  rm -f "$SOCK_T" "$SOCK_Q"
  # shellcheck disable=SC2086
  "${RT[@]}" "$TAPDISK" --nbd "$SOCK_T" -a "$TYPE:$IMG_T" $targs 2>"$WORK/tapdisk.log" &
  PIDS+=($!)
  # shellcheck disable=SC2086
  "${RT[@]}" qemu-nbd -f "$QFMT" --persistent --shared=8 -k "$SOCK_Q" $qargs "$IMG_Q" 2>"$WORK/qemu-nbd.log" &
  PIDS+=($!)
  wait_socket "$SOCK_T"
  wait_socket "$SOCK_Q"
}

stop_servers() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  PIDS=()
}

iops() { # socket read|write
  local w= secs
  [ "$2" = write ] && w=-w
  secs=$("${RT[@]}" qemu-img bench -f raw -t none $w -d 32 -s 4k -c "$COUNT" "nbd+unix:///?socket=$1" 2>&1 |
         sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p')
  awk -v c="$COUNT" -v s="$secs" 'BEGIN { printf "%d", c / s }'
}

# Median and spread of a list of numbers (one per line).
stats() { # printf format
  sort -g | awk -v f="$1" '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf f " (" f ".." f ")", m, v[1], v[NR] }'
}

run_mode() { # label, tapdisk args, qemu-nbd args
  local label=$1 t q i op
  start_servers "$2" "$3"
  [ "$label" = direct ] && grep -h "serving" "$WORK/tapdisk.log" | sed 's/^/  /' >&2
  # What each side really runs with, from the kernel's view of its image fd.
  local want=buffered tpid
  [ "$label" = direct ] && want=direct
  tpid=$(sed -n 's/.*worker pid \([0-9]*\).*/\1/p' "$WORK/tapdisk.log" | head -1)
  cache_report "$label: tapdisk worker $tpid, image fd" "$want" "$(fd_mode "$tpid" "$IMG_T")"
  cache_report "$label: qemu-nbd ${PIDS[1]}, image fd" "$want" "$(fd_mode "${PIDS[1]}" "$IMG_Q")"
  for op in read write; do
    : > "$WORK/$label.$op"
    for ((i = 0; i < ROUNDS; i++)); do
      if ((i % 2 == 0)); then
        t=$(iops "$SOCK_T" $op); q=$(iops "$SOCK_Q" $op)
      else
        q=$(iops "$SOCK_Q" $op); t=$(iops "$SOCK_T" $op)
      fi
      echo "$t $q" >> "$WORK/$label.$op"
    done
  done
  stop_servers
}

echo "image: $FORMAT $SIZE, $COUNT x 4 KiB requests, depth 32, $ROUNDS alternating rounds${RT:+, ${RT[*]}}" >&2
run_mode direct "" "--cache=none --aio=io_uring"
run_mode buffered "--cache buffered" ""

printf 'median (min..max) over %d rounds\n' "$ROUNDS"
printf '%-9s %-6s %-26s %-26s %s\n' mode op "tapdisk IOPS" "qemu-nbd IOPS" "ratio tapdisk/qemu-nbd"
for label in direct buffered; do
  for op in read write; do
    f="$WORK/$label.$op"
    printf '%-9s %-6s %-26s %-26s %s\n' "$label" "$op" \
      "$(awk '{ print $1 }' "$f" | stats %d)" \
      "$(awk '{ print $2 }' "$f" | stats %d)" \
      "$(awk '$2 > 0 { print $1 / $2 }' "$f" | stats %.2fx)"
  done
done
printf 'load average: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
cache_summary
