#!/usr/bin/env bash
# What blktap's encryption (`open -E`, AES-XTS per 512-byte sector) costs,
# in one run: two tapjail FUSE + loop disks on dynamic VHDs of the same size,
#
#   (p) plain:      `open -a vhd:p.vhd`
#   (e) encrypted:  `open -a vhd:e.vhd -E` (64-byte key: AES-256-XTS, what
#                   XAPI passes), the image keyed by `tap-ctl vhd key -s`
#
# Both are filled first through their devices (every block allocated, so
# reads decrypt real sectors, not holes). qemu has no encrypted VHD, so
# the peer is the same frontend unencrypted.
#
#   sudo bench/crypt.sh   (env: SIZE_MIB=256 RUNTIME=5 REPEAT=3
#                          PROFILE=release|debug KEY_BYTES=64|32)
#
# fio (libaio, O_DIRECT) runs 4 KiB random reads and writes at depth 32
# and 1 MiB sequential reads and writes at depth 8, RUNTIME seconds each;
# the disks take turns (p e, e p, ...) and each job is repeated REPEAT
# times. Prints the median and spread (min-max), IOPS for 4 KiB and MB/s
# for 1 MiB, and the ratio e/p of the medians.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-256}
RUNTIME=${RUNTIME:-5}
REPEAT=${REPEAT:-3}
PROFILE=${PROFILE:-release}
KEY_BYTES=${KEY_BYTES:-64}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "bench: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE mounts)"
for tool in fio python3; do
    command -v "$tool" >/dev/null || die "$tool not installed (apt-get install fio python3)"
done
case $KEY_BYTES in 32 | 64) ;; *) die "KEY_BYTES is 32 or 64" ;; esac

if [ "$PROFILE" = release ]; then
    cargo build --quiet --release --workspace --bins --manifest-path "$ROOT/Cargo.toml"
else
    cargo build --quiet --workspace --bins --manifest-path "$ROOT/Cargo.toml"
fi
BIN=$ROOT/target/$PROFILE

WORK=$(mktemp -d /var/tmp/tapjail-bench-crypt.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/images"
BROKER_PID= MINOR_P= MINOR_E=
CTL="$BIN/tap-ctl --socket $WORK/run/broker.sock"
cleanup() {
    set +e
    [ -n "$MINOR_P" ] && $CTL destroy -m "$MINOR_P" >/dev/null
    [ -n "$MINOR_E" ] && $CTL destroy -m "$MINOR_E" >/dev/null
    [ -n "$BROKER_PID" ] && { kill -TERM "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/policy.toml" <<EOT
socket = "$WORK/run/broker.sock"
audit_log = "$WORK/log/audit.jsonl"
state_dir = "$WORK/state"
device_dir = "$WORK/dev"
worker_uids = [393000, 393009]
tapdisk = "$BIN/tapdisk"
frontend = "fuse"

[[tenant]]
name = "bench"
uids = [0]
image_roots = ["$WORK/images"]
writable = true
max_disks = 4
admin = true
EOT
head -c "$KEY_BYTES" /dev/urandom >"$WORK/key"
for f in p e; do
    "$BIN/tap-ctl" vhd create -n "$WORK/images/$f.vhd" -s "$SIZE_MIB" >/dev/null
done
"$BIN/tap-ctl" vhd key -s -n "$WORK/images/e.vhd" -k "$WORK/key" >/dev/null
"$BIN/tap-broker" --config "$WORK/policy.toml" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 100); do $CTL list >/dev/null 2>&1 && break; sleep 0.1; done

attach() { # IMAGE STDIN [FLAGS...] -> device path
    local img=$1 input=$2; shift 2
    local dev minor pid
    dev=$($CTL allocate); minor=${dev##*tapdev}
    pid=$($CTL spawn)
    $CTL attach -p "$pid" -m "$minor" >/dev/null
    $CTL open -p "$pid" -m "$minor" -a "vhd:$img" "$@" <"$input" >/dev/null ||
        { cat "$WORK/broker.log"; die "open failed"; }
    echo "$dev"
}
DEV_P=$(attach "$WORK/images/p.vhd" /dev/null); MINOR_P=${DEV_P##*tapdev}
DEV_E=$(attach "$WORK/images/e.vhd" "$WORK/key" -E); MINOR_E=${DEV_E##*tapdev}
for dev in "$DEV_P" "$DEV_E"; do
    fio --name=fill --filename="$dev" --ioengine=libaio --direct=1 --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_MIB}M" --output=/dev/null
done
# The encrypted image holds no plaintext of what was written (fio's fill
# pattern repeats; a plaintext image would hold it many times over).
python3 - "$WORK/images/p.vhd" "$WORK/images/e.vhd" <<'EOF' || die "the encrypted image is not encrypted"
import sys
p, e = (open(f, "rb") for f in sys.argv[1:3])
p.seek(8 << 20); probe = p.read(4096)
data = e.read()
sys.exit(1 if probe.strip(b"\0") and probe in data else 0)
EOF

run() { # DEV JOB -> IOPS or MB/s
    local dev=$1 job=$2 rw bs depth key out
    case $job in
        rr4k) rw=randread bs=4k depth=32 key=read ;;
        rw4k) rw=randwrite bs=4k depth=32 key=write ;;
        sr1m) rw=read bs=1M depth=8 key=read ;;
        sw1m) rw=write bs=1M depth=8 key=write ;;
    esac
    out=$(fio --name=b --filename="$dev" --ioengine=libaio --direct=1 --rw=$rw --bs=$bs \
        --iodepth=$depth --time_based --runtime="$RUNTIME" --output-format=json)
    case $bs in
        4k) python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0][sys.argv[1]]["iops"])' $key <<<"$out" ;;
        *) python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["jobs"][0][sys.argv[1]]["bw_bytes"]/1e6))' $key <<<"$out" ;;
    esac
}
median() { python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.argv[1:]]; print("%s (%s-%s)" % (s.median(v), min(v), max(v)))' "$@"; }
ratio() { python3 -c 'import sys,statistics as s; a=[float(x) for x in sys.argv[2:2+int(sys.argv[1])]]; b=[float(x) for x in sys.argv[2+int(sys.argv[1]):]]; print("%.2f" % (s.median(b)/s.median(a)))' "$@"; }

echo "crypt bench: ${SIZE_MIB} MiB dynamic VHDs (filled), AES-$((KEY_BYTES * 4))-XTS, ${RUNTIME}s x ${REPEAT}, $PROFILE build"
for job in rr4k rw4k sr1m sw1m; do
    P=() E=()
    for i in $(seq "$REPEAT"); do
        if [ $((i % 2)) = 1 ]; then P+=("$(run "$DEV_P" $job)"); E+=("$(run "$DEV_E" $job)");
        else E+=("$(run "$DEV_E" $job)"); P+=("$(run "$DEV_P" $job)"); fi
    done
    unit=IOPS; case $job in *1m) unit=MB/s ;; esac
    echo "$job ($unit): plain $(median "${P[@]}")  encrypted $(median "${E[@]}")  e/p $(ratio "${#P[@]}" "${P[@]}" "${E[@]}")"
done
