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
. "$ROOT/bench/lib.sh"

need fio qemu-nbd python3
bench_build "$PROFILE"

WORK=$(mktemp -d /var/tmp/tapjail-bench-mirror.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/images" "$WORK/sec"
chmod 755 "$WORK/sec"
BROKER_PID= NBD_PID= MINOR_P= MINOR_M=
bench_policy "$WORK" 391000 391049 4 "$WORK/images"
echo "mirror = { unix_dirs = [\"$WORK/sec\"] }" >>"$WORK/policy.toml"
cleanup() {
    set +e
    [ -n "$MINOR_P" ] && $CTL destroy -m "$MINOR_P" >/dev/null
    [ -n "$MINOR_M" ] && $CTL destroy -m "$MINOR_M" >/dev/null
    [ -n "$BROKER_PID" ] && { kill -TERM "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    [ -n "$NBD_PID" ] && { kill -TERM "$NBD_PID"; wait "$NBD_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

for f in p m; do
    fio --name=fill --filename="$WORK/images/$f.raw" --ioengine=psync --rw=write --bs=1M \
        --size="${SIZE_MIB}M" --output=/dev/null
done
truncate -s "${SIZE_MIB}M" "$WORK/sec/s.raw"
qemu-nbd -f raw -t --cache=none --aio=threads -k "$WORK/sec/s.sock" "$WORK/sec/s.raw" &
NBD_PID=$!
bench_broker "$WORK"
for _ in $(seq 100); do [ -S "$WORK/sec/s.sock" ] && break; sleep 0.1; done

DEV_P=$(attach "aio:$WORK/images/p.raw"); MINOR_P=${DEV_P##*tapdev}
DEV_M=$(attach "aio:$WORK/images/m.raw" -2 "nbd:$WORK/sec/s.sock"); MINOR_M=${DEV_M##*tapdev}
for _ in $(seq 6000); do
    $CTL stats -m "$MINOR_M" | grep -q '"state":"synced"' && break
    sleep 0.1
done
$CTL stats -m "$MINOR_M" | grep -q '"state":"synced"' || die "mirror never in sync: $($CTL stats -m "$MINOR_M")"

echo "mirror bench: ${SIZE_MIB} MiB raw, ${RUNTIME}s x ${REPEAT}, $PROFILE build"
compare rw4k IOPS plain "$DEV_P" mirrored "$DEV_M" m/p fio_job rw4k
compare sw1m MB/s plain "$DEV_P" mirrored "$DEV_M" m/p fio_job sw1m
$CTL stats -m "$MINOR_M" | python3 -c 'import json,sys; m=json.load(sys.stdin)["mirror"]; print("mirror after the runs:", m["state"], m["mirrored_writes"], "mirrored writes")'
