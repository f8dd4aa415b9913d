#!/usr/bin/env bash
# What mirroring every write to an NBD secondary (`open -2 URI`) costs, in
# one run: two tapjail FUSE + loop disks on raw files of the same size,
#
#   (p) plain:     `open -a aio:p.raw`
#   (m) mirrored:  `open -a aio:m.raw -2 nbd:$WORK/sec/s.sock`, qemu-nbd
#                  (raw, cache=none) serving the secondary on a unix socket;
#                  measured once the background copy is done (stats: synced)
#
#   sudo bench/mirror.sh   (env: SIZE_MIB=256 RUNTIME=5 REPEAT=3
#                           PROFILE=release|debug)
#
# fio (libaio, O_DIRECT) runs 4 KiB random writes at depth 32 and 1 MiB
# sequential writes at depth 8, RUNTIME seconds each; the disks take turns
# (p m, m p, ...) and each job is repeated REPEAT times. Prints the median
# and spread (min-max) of each, IOPS for 4 KiB and MB/s for 1 MiB, and the
# ratio m/p of the medians: what a mirrored write costs against a plain one
# on this machine, in this run. Both sides' data is on the same disk, so the
# ratio includes the secondary's own writes competing with the primary's.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-256}
RUNTIME=${RUNTIME:-5}
REPEAT=${REPEAT:-3}
PROFILE=${PROFILE:-release}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "bench: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE mounts)"
for tool in fio qemu-nbd python3; do
    command -v "$tool" >/dev/null || die "$tool not installed (apt-get install fio qemu-utils python3)"
done

if [ "$PROFILE" = release ]; then
    cargo build --quiet --release --workspace --bins --manifest-path "$ROOT/Cargo.toml"
else
    cargo build --quiet --workspace --bins --manifest-path "$ROOT/Cargo.toml"
fi
BIN=$ROOT/target/$PROFILE

WORK=$(mktemp -d /var/tmp/tapjail-bench-mirror.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/images" "$WORK/sec"
chmod 755 "$WORK/sec"
BROKER_PID= NBD_PID= MINOR_P= MINOR_M=
CTL="$BIN/tap-ctl --socket $WORK/run/broker.sock"
cleanup() {
    set +e
    [ -n "$MINOR_P" ] && $CTL destroy -m "$MINOR_P" >/dev/null
    [ -n "$MINOR_M" ] && $CTL destroy -m "$MINOR_M" >/dev/null
    [ -n "$BROKER_PID" ] && { kill -TERM "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    [ -n "$NBD_PID" ] && { kill -TERM "$NBD_PID"; wait "$NBD_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/policy.toml" <<EOT
socket = "$WORK/run/broker.sock"
audit_log = "$WORK/log/audit.jsonl"
state_dir = "$WORK/state"
device_dir = "$WORK/dev"
worker_uids = [391000, 391049]
tapdisk = "$BIN/tapdisk"
frontend = "fuse"

[[tenant]]
name = "bench"
uids = [0]
image_roots = ["$WORK/images"]
writable = true
max_disks = 4
admin = true
mirror = { unix_dirs = ["$WORK/sec"] }
EOT
for f in p m; do
    fio --name=fill --filename="$WORK/images/$f.raw" --ioengine=psync --rw=write --bs=1M \
        --size="${SIZE_MIB}M" --output=/dev/null
done
truncate -s "${SIZE_MIB}M" "$WORK/sec/s.raw"
qemu-nbd -f raw -t --cache=none --aio=threads -k "$WORK/sec/s.sock" "$WORK/sec/s.raw" &
NBD_PID=$!
"$BIN/tap-broker" --config "$WORK/policy.toml" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 100); do [ -S "$WORK/sec/s.sock" ] && $CTL list >/dev/null 2>&1 && break; sleep 0.1; done

attach() { # IMAGE [FLAGS...] -> device path
    local img=$1; shift
    local dev minor pid
    dev=$($CTL allocate); minor=${dev##*tapdev}
    pid=$($CTL spawn)
    $CTL attach -p "$pid" -m "$minor" >/dev/null
    $CTL open -p "$pid" -m "$minor" -a "aio:$img" "$@" >/dev/null || { cat "$WORK/broker.log"; die "open failed"; }
    echo "$dev"
}
DEV_P=$(attach "$WORK/images/p.raw"); MINOR_P=${DEV_P##*tapdev}
DEV_M=$(attach "$WORK/images/m.raw" -2 "nbd:$WORK/sec/s.sock"); MINOR_M=${DEV_M##*tapdev}
for _ in $(seq 6000); do
    $CTL stats -m "$MINOR_M" | grep -q '"state":"synced"' && break
    sleep 0.1
done
$CTL stats -m "$MINOR_M" | grep -q '"state":"synced"' || die "mirror never in sync: $($CTL stats -m "$MINOR_M")"

run() { # DEV JOB -> IOPS or MB/s
    local dev=$1 job=$2 out
    case $job in
        rw4k) out=$(fio --name=b --filename="$dev" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
                    --iodepth=32 --time_based --runtime="$RUNTIME" --output-format=json);
              python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["write"]["iops"])' <<<"$out" ;;
        sw1m) out=$(fio --name=b --filename="$dev" --ioengine=libaio --direct=1 --rw=write --bs=1M \
                    --iodepth=8 --time_based --runtime="$RUNTIME" --output-format=json);
              python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"]/1e6))' <<<"$out" ;;
    esac
}
median() { python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.argv[1:]]; print("%s (%s-%s)" % (s.median(v), min(v), max(v)))' "$@"; }
ratio() { python3 -c 'import sys,statistics as s; a=[float(x) for x in sys.argv[2:2+int(sys.argv[1])]]; b=[float(x) for x in sys.argv[2+int(sys.argv[1]):]]; print("%.2f" % (s.median(b)/s.median(a)))' "$@"; }

echo "mirror bench: ${SIZE_MIB} MiB raw, ${RUNTIME}s x ${REPEAT}, $PROFILE build"
for job in rw4k sw1m; do
    P=() M=()
    for i in $(seq "$REPEAT"); do
        if [ $((i % 2)) = 1 ]; then P+=("$(run "$DEV_P" $job)"); M+=("$(run "$DEV_M" $job)");
        else M+=("$(run "$DEV_M" $job)"); P+=("$(run "$DEV_P" $job)"); fi
    done
    unit=IOPS; [ $job = sw1m ] && unit=MB/s
    echo "$job ($unit): plain $(median "${P[@]}")  mirrored $(median "${M[@]}")  m/p $(ratio "${#P[@]}" "${P[@]}" "${M[@]}")"
done
$CTL stats -m "$MINOR_M" | python3 -c 'import json,sys; m=json.load(sys.stdin)["mirror"]; print("mirror after the runs:", m["state"], m["mirrored_writes"], "mirrored writes")'
