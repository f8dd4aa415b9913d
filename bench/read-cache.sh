#!/usr/bin/env bash
# What `open -r` (XAPI's IntelliCache) buys when the parent sits on slower
# storage, in one run. The "slow storage" is an ext4 filesystem on a tapjail
# FUSE + loop disk whose reads are throttled (`tap-ctl throttle --read-bps`,
# `--read-iops`), standing in for the shared SR; the cache and the clones
# sit on the local disk /var/tmp is on. Two disks over the same gold image
# (SIZE_MIB of random data in slow/gold.vhd):
#
#   (u) uncached: `open -a vhd:local/clone.vhd`, a plain child of the gold
#                 image: every read of the gold's data goes to slow storage
#   (c) cached:   `open -a vhd:local/cache/gold.vhdcache -r`, a read cache:
#                 the first pass fills it, later reads stay local
#
#   sudo bench/read-cache.sh   (env: SIZE_MIB=64 SLOW_BPS=33554432
#                               SLOW_IOPS=400 RUNTIME=5 REPEAT=3
#                               PROFILE=release|debug)
#
# After one full read of each disk (the fill, timed too), it alternates
# (u c, c u, ...) REPEAT times: a full sequential read (dd, 1 MiB, O_DIRECT,
# MB/s) and fio 4 KiB random reads at depth 16 (IOPS, RUNTIME seconds).
# Prints medians with spread and the ratio c/u: read-after-fill, cached
# against uncached, on this machine in this run. The cache's hits/misses
# from `tap-ctl stats` are printed at the end.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-64}
SLOW_BPS=${SLOW_BPS:-33554432}
SLOW_IOPS=${SLOW_IOPS:-400}
RUNTIME=${RUNTIME:-5}
REPEAT=${REPEAT:-3}
PROFILE=${PROFILE:-release}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"

need fio python3 mkfs.ext4 dd
bench_build "$PROFILE"

WORK=$(mktemp -d /var/tmp/tapjail-bench-rcache.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/store" "$WORK/slow" "$WORK/local/cache"
BROKER_PID= MINOR_S= MINOR_U= MINOR_C=
bench_policy "$WORK" 392000 392049 8 "$WORK/store" "$WORK/slow" "$WORK/local"
echo "read_cache_root = \"$WORK/local/cache\"" >>"$WORK/policy.toml"
cleanup() {
    set +e
    # The disks over the slow filesystem first, then the filesystem, then
    # its disk; SIGINT takes down whatever is left with the broker.
    for m in "$MINOR_U" "$MINOR_C"; do [ -n "$m" ] && $CTL destroy -m "$m" >/dev/null 2>&1; done
    mountpoint -q "$WORK/slow" && umount "$WORK/slow"
    [ -n "$MINOR_S" ] && $CTL destroy -m "$MINOR_S" >/dev/null 2>&1
    [ -n "$BROKER_PID" ] && { kill -INT "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    mountpoint -q "$WORK/slow" || rm -rf "$WORK"
}
trap cleanup EXIT

bench_broker "$WORK"

# The slow storage: ext4 on a throttled tapjail disk.
truncate -s $((SIZE_MIB * 2 + 64))M "$WORK/store/store.raw"
DEV_S=$(attach "aio:$WORK/store/store.raw"); MINOR_S=${DEV_S##*tapdev}
mkfs.ext4 -q -F "$DEV_S"
mount "$DEV_S" "$WORK/slow"
dd if=/dev/urandom of="$WORK/local/data.raw" bs=1M count="$SIZE_MIB" status=none
"$BIN/tap-ctl" vhd convert -q -O vhd -f raw "$WORK/local/data.raw" "$WORK/slow/gold.vhd"
rm "$WORK/local/data.raw"
sync
"$BIN/tap-ctl" vhd snapshot -n "$WORK/local/clone.vhd" -p "$WORK/slow/gold.vhd" >/dev/null 2>&1
"$BIN/tap-ctl" vhd snapshot -n "$WORK/local/cache/gold.vhdcache" -p "$WORK/slow/gold.vhd" >/dev/null 2>&1
$CTL throttle -m "$MINOR_S" --read-bps "$SLOW_BPS" --read-iops "$SLOW_IOPS" >/dev/null

DEV_U=$(attach "vhd:$WORK/local/clone.vhd"); MINOR_U=${DEV_U##*tapdev}
DEV_C=$(attach "vhd:$WORK/local/cache/gold.vhdcache" -r); MINOR_C=${DEV_C##*tapdev}

seqread() { # DEV -> MB/s of one full O_DIRECT read
    local t0 t1
    t0=$(date +%s.%N)
    dd if="$1" of=/dev/null bs=1M iflag=direct status=none
    t1=$(date +%s.%N)
    python3 -c "print('%.1f' % ($SIZE_MIB * 1.048576 / ($t1 - $t0)))"
}
echo "read-cache bench: ${SIZE_MIB} MiB gold on ext4 over a tapjail disk throttled to $SLOW_BPS B/s, $SLOW_IOPS IOPS; ${RUNTIME}s x ${REPEAT}, $PROFILE build"
echo "first full read (c fills its cache): uncached $(seqread "$DEV_U") MB/s, cached $(seqread "$DEV_C") MB/s"
compare seqread MB/s uncached "$DEV_U" cached "$DEV_C" c/u seqread
compare randread IOPS uncached "$DEV_U" cached "$DEV_C" c/u fio_job rr4k16
$CTL stats -m "$MINOR_C" | python3 -c 'import json,sys; r=json.load(sys.stdin)["read_cache"]; print("read cache:", r["hits"], "hits,", r["misses"], "misses,", r["filled"], "filled (sectors)")'
