#!/usr/bin/env bash
# FUSE + loop benchmark: tapjail's block device against its two peers, in
# one run, one table.
#
#   sudo bench/fuse.sh            (env: SIZE_MIB=1024 RUNTIME=6 REPEAT=5,
#                                  TAPDISK=path to compare another worker build,
#                                  DEVICES="a b c r u" to measure only some)
#
#   (a) loop (direct I/O) over a raw file                      the ceiling
#   (b) tapjail: tap-broker (frontend fuse) + `tap-ctl create` on a dynamic
#       VHD: confined tapdisk, FUSE, loop (direct I/O)         what we ship
#   (c) qemu-storage-daemon, vpc driver (cache.direct=on) on the same kind
#       of dynamic VHD, `--export type=fuse`, + loop (direct I/O)
#   (r) tapjail on a raw file (`aio:`): (r)/(a) is the cost of the FUSE hop
#       alone, (b)/(r) the cost of the VHD format
#   (u) tapjail on a dynamic VHD whose blocks are NOT 4 KiB-aligned in the
#       file (made by `qemu-img convert`, which lays blocks end to end as
#       tapjail did before its placement rule): (b)/(u) is what placing each
#       block's data on a 4 KiB boundary (libvhd's rule) is worth
#
# Every image is filled first (reads hit data, writes overwrite allocated
# blocks). Then fio (libaio, O_DIRECT) runs 4 KiB random read and write at
# depth 32 and 1 MiB sequential read and write at depth 8, RUNTIME seconds
# each; the devices take turns per job (a b c r, a b c r, ...) and each job
# is repeated REPEAT times. The machine is shared, so it prints the median
# and the spread (min-max) of each: IOPS for 4 KiB jobs, MB/s for 1 MiB
# jobs, and the ratios of the medians b/a, b/c and r/a. It reports the cache
# mode every side really ran with (each loop's dio flag, each server's image
# fd flags; bench/cache-mode.sh), with a WARNING for any that fell back.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-6}
REPEAT=${REPEAT:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/cache-mode.sh
. "$ROOT/bench/cache-mode.sh"

die() { echo "bench: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE mounts)"
for tool in fio qemu-img qemu-storage-daemon losetup python3; do
    command -v "$tool" >/dev/null || die "$tool not installed (apt-get install fio qemu-utils qemu-system-common util-linux python3)"
done

cargo build --quiet --release --workspace --bins --manifest-path "$ROOT/Cargo.toml"
BIN=$ROOT/target/release
TAPDISK=${TAPDISK:-$BIN/tapdisk}

WORK=$(mktemp -d /var/tmp/tapjail-bench-fuse.XXXXXX)
chmod 755 "$WORK"
BROKER_PID= QSD_PID= LOOP_A= LOOP_C= MINOR= MINOR_R= MINOR_U=
DEVICES=${DEVICES:-a b c r u}
cleanup() {
    set +e
    [ -n "$MINOR" ] && "$BIN/tap-ctl" --socket "$WORK/run/broker.sock" destroy -m "$MINOR" >/dev/null
    [ -n "$MINOR_R" ] && "$BIN/tap-ctl" --socket "$WORK/run/broker.sock" destroy -m "$MINOR_R" >/dev/null
    [ -n "$MINOR_U" ] && "$BIN/tap-ctl" --socket "$WORK/run/broker.sock" destroy -m "$MINOR_U" >/dev/null
    [ -n "$BROKER_PID" ] && { kill -TERM "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    [ -n "$LOOP_C" ] && losetup -d "$LOOP_C"
    [ -n "$QSD_PID" ] && { kill -TERM "$QSD_PID"; wait "$QSD_PID"; } 2>/dev/null
    [ -n "$LOOP_A" ] && losetup -d "$LOOP_A"
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- (a) loop over raw ------------------------------------------------------
truncate -s "${SIZE_MIB}M" "$WORK/a.raw"
LOOP_A=$(losetup --direct-io=on -f --show "$WORK/a.raw")

# --- (b) tapjail --------------------------------------------------------------
mkdir -p "$WORK/images"
cat >"$WORK/policy.toml" <<EOF
socket = "$WORK/run/broker.sock"
audit_log = "$WORK/log/audit.jsonl"
state_dir = "$WORK/state"
device_dir = "$WORK/dev"
worker_uids = [390000, 390049]
tapdisk = "$TAPDISK"
frontend = "fuse"

[[tenant]]
name = "bench"
uids = [0]
image_roots = ["$WORK/images"]
writable = true
max_disks = 4
admin = true
EOF
"$BIN/tap-ctl" vhd create -n "$WORK/images/b.vhd" -s "$SIZE_MIB" >/dev/null
"$BIN/tap-broker" --config "$WORK/policy.toml" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
CTL="$BIN/tap-ctl --socket $WORK/run/broker.sock"
for _ in $(seq 100); do $CTL list >/dev/null 2>&1 && break; sleep 0.1; done
DEV_B=$($CTL create -a "vhd:$WORK/images/b.vhd") || { cat "$WORK/broker.log"; die "tap-ctl create failed"; }
MINOR=${DEV_B##*tapdev}
truncate -s "${SIZE_MIB}M" "$WORK/images/r.raw"
DEV_R=$($CTL create -a "aio:$WORK/images/r.raw") || { cat "$WORK/broker.log"; die "tap-ctl create (raw) failed"; }
MINOR_R=${DEV_R##*tapdev}

# --- (u) tapjail on a VHD with unaligned blocks ---------------------------------
# qemu-img convert allocates every block of a full source, end to end after
# its BAT: block k's data starts 512*k bytes (mod 4 KiB) off alignment. The
# fill below only overwrites allocated blocks, so the layout stays.
fio --name=src --filename="$WORK/u.src" --ioengine=psync --rw=write --bs=1M \
    --size="${SIZE_MIB}M" --output=/dev/null
qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$WORK/u.src" "$WORK/images/u.vhd"
rm -f "$WORK/u.src"
DEV_U=$($CTL create -a "vhd:$WORK/images/u.vhd") || { cat "$WORK/broker.log"; die "tap-ctl create (unaligned) failed"; }
MINOR_U=${DEV_U##*tapdev}

# --- (c) qemu-storage-daemon FUSE export + loop --------------------------------
"$BIN/tap-ctl" vhd create -n "$WORK/c.vhd" -s "$SIZE_MIB" >/dev/null
touch "$WORK/c.export"
start_qsd() {
    qemu-storage-daemon \
        --blockdev "driver=file,node-name=f,filename=$WORK/c.vhd,cache.direct=on,aio=$1" \
        --blockdev driver=vpc,node-name=d,file=f \
        --export "type=fuse,id=e,node-name=d,mountpoint=$WORK/c.export,writable=on" \
        >"$WORK/qsd.log" 2>&1 &
    QSD_PID=$!
    for _ in $(seq 100); do
        [ "$(stat -c %s "$WORK/c.export")" -gt 0 ] && return 0
        kill -0 "$QSD_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
QSD_AIO=io_uring
start_qsd io_uring || {
    echo "bench: WARNING: qemu-storage-daemon aio=io_uring failed ($(tail -1 "$WORK/qsd.log")); (c) falls back to aio=native" >&2
    QSD_PID= QSD_AIO=native
    start_qsd native
} || { cat "$WORK/qsd.log"; die "qemu-storage-daemon did not export"; }
LOOP_C=$(losetup --direct-io=on -f --show "$WORK/c.export")

# --- the cache mode each side really runs with ----------------------------------
CTL_ARGS=("$BIN/tap-ctl" --socket "$WORK/run/broker.sock")
cache_report "(a) loop over raw" direct "$(loop_mode "$LOOP_A")"
cache_report "(b) tapdisk image fd" direct "$(fd_mode "$(worker_pid "${CTL_ARGS[@]}" "$MINOR")" "$WORK/images/b.vhd")"
cache_report "(b) loop over FUSE" direct "$(loop_mode "$DEV_B")"
cache_report "(c) qemu-storage-daemon aio=$QSD_AIO image fd" direct "$(fd_mode "$QSD_PID" "$WORK/c.vhd")"
cache_report "(c) loop over the FUSE export" direct "$(loop_mode "$LOOP_C")"
cache_report "(r) tapdisk image fd" direct "$(fd_mode "$(worker_pid "${CTL_ARGS[@]}" "$MINOR_R")" "$WORK/images/r.raw")"
cache_report "(r) loop over FUSE" direct "$(loop_mode "$DEV_R")"
cache_report "(u) tapdisk image fd" direct "$(fd_mode "$(worker_pid "${CTL_ARGS[@]}" "$MINOR_U")" "$WORK/images/u.vhd")"
cache_report "(u) loop over FUSE" direct "$(loop_mode "$DEV_U")"

DEVS=("$LOOP_A" "$DEV_B" "$LOOP_C" "$DEV_R" "$DEV_U")
NAMES=(a b c r u)
RUN=()
for i in 0 1 2 3 4; do
    case " $DEVICES " in *" ${NAMES[$i]} "*) RUN+=("$i") ;; esac
done

# --- fill -----------------------------------------------------------------------
for i in "${RUN[@]}"; do
    d=${DEVS[$i]}
    fio --name=fill --filename="$d" --ioengine=libaio --direct=1 --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_MIB}M" --output=/dev/null
done

# --- measure --------------------------------------------------------------------
# fio_once DEV RW BS DEPTH -> "IOPS MBps"
fio_once() {
    fio --name=j --filename="$1" --ioengine=libaio --direct=1 --rw="$2" --bs="$3" \
        --iodepth="$4" --runtime="$RUNTIME" --time_based --size="${SIZE_MIB}M" \
        --random_generator=lfsr --output-format=json 2>/dev/null |
        python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"][0]
d = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print("%.0f %.1f" % (d["iops"], d["bw_bytes"] / 1e6))'
}

JOBS=("randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8")
declare -A SAMPLES
for job in "${JOBS[@]}"; do
    read -r rw bs depth <<<"$job"
    for _ in $(seq "$REPEAT"); do
        for i in "${RUN[@]}"; do
            read -r iops mbps < <(fio_once "${DEVS[$i]}" "$rw" "$bs" "$depth")
            v=$([ "$bs" = 4k ] && echo "$iops" || echo "$mbps")
            SAMPLES["$job/$i"]+="$v "
        done
    done
done

# --- table ----------------------------------------------------------------------
# unaligned VHD -> "N of M blocks' data off 4 KiB"
unaligned() {
    python3 - "$1" <<'PY'
import struct, sys
f = open(sys.argv[1], "rb")
f.seek(16); data_offset = struct.unpack(">Q", f.read(8))[0]
f.seek(data_offset + 16); table = struct.unpack(">Q", f.read(8))[0]
f.seek(data_offset + 28); n, bs = struct.unpack(">II", f.read(8))
bitmap = ((bs // 512 + 7) // 8 + 511) // 512 * 512
f.seek(table); bat = struct.unpack(">%dI" % n, f.read(4 * n))
used = [e for e in bat if e != 0xFFFFFFFF]
off = sum(1 for e in used if (e * 512 + bitmap) % 4096)
print("%d of %d blocks' data off 4 KiB" % (off, len(used)))
PY
}
fe=$(grep -o 'frontend [a-z]*' "$WORK/broker.log" | head -1)
echo
echo "tapjail FUSE + loop: ${SIZE_MIB} MiB images, filled; fio libaio O_DIRECT; median (min-max) of $REPEAT x ${RUNTIME}s, devices alternating; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "  (a) loop --direct-io over a raw file"
echo "  (b) tapjail $fe: tap-ctl create on a dynamic VHD ($DEV_B -> $(readlink "$DEV_B"))"
echo "  (c) qemu-storage-daemon $(qemu-storage-daemon --version | head -1 | grep -o '[0-9][0-9.]*' | head -1) vpc cache.direct=on, --export type=fuse, + loop --direct-io"
echo "  (r) tapjail on the raw file (aio:): r/a = the FUSE hop alone"
echo "  (u) tapjail on a qemu-img-made dynamic VHD: $(unaligned "$WORK/images/u.vhd"); (b): $(unaligned "$WORK/images/b.vhd"); b/u = what 4 KiB placement is worth"
{ grep -h 'fuse: .*RLIMIT_MEMLOCK' "$WORK/broker.log" || true; } | sort -u | sed 's/^/  note: /'
for job in "${JOBS[@]}"; do
    read -r rw bs depth <<<"$job"
    unit=$([ "$bs" = 4k ] && echo IOPS || echo MB/s)
    echo "$bs $rw QD$depth|$unit|${SAMPLES["$job/0"]:-}|${SAMPLES["$job/1"]:-}|${SAMPLES["$job/2"]:-}|${SAMPLES["$job/3"]:-}|${SAMPLES["$job/4"]:-}"
done | python3 -c '
import statistics, sys
def cell(xs):
    if not xs:
        return "-"
    fmt = "%.0f" if max(xs) >= 1000 else "%.1f"
    return (fmt % statistics.median(xs)) + " (" + (fmt % min(xs)) + "-" + (fmt % max(xs)) + ")"
print("%-20s %5s %24s %24s %24s %6s %6s %24s %6s %24s %6s" % ("job", "unit", "(a)", "(b)", "(c)", "b/a", "b/c", "(r)", "r/a", "(u)", "b/u"))
for line in sys.stdin:
    job, unit, *cols = line.rstrip("\n").split("|")
    a, b, c, r, u = ([float(x) for x in col.split()] for col in cols)
    ma, mb, mc, mr, mu = (statistics.median(x) if x else 0 for x in (a, b, c, r, u))
    ratio = lambda x, y: "%.2f" % (x / y) if x and y else "-"
    print("%-20s %5s %24s %24s %24s %6s %6s %24s %6s %24s %6s" % (job, unit, cell(a), cell(b), cell(c),
          ratio(mb, ma), ratio(mb, mc), cell(r), ratio(mr, ma), cell(u), ratio(mb, mu)))
'
cache_summary
