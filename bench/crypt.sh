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
. "$ROOT/bench/lib.sh"

need fio python3
case $KEY_BYTES in 32 | 64) ;; *) die "KEY_BYTES is 32 or 64" ;; esac
bench_build "$PROFILE"

WORK=$(mktemp -d /var/tmp/tapjail-bench-crypt.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/images"
BROKER_PID= MINOR_P= MINOR_E=
bench_policy "$WORK" 393000 393009 4 "$WORK/images"
cleanup() {
    set +e
    [ -n "$MINOR_P" ] && $CTL destroy -m "$MINOR_P" >/dev/null
    [ -n "$MINOR_E" ] && $CTL destroy -m "$MINOR_E" >/dev/null
    [ -n "$BROKER_PID" ] && { kill -TERM "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

head -c "$KEY_BYTES" /dev/urandom >"$WORK/key"
for f in p e; do
    "$BIN/tap-ctl" vhd create -n "$WORK/images/$f.vhd" -s "$SIZE_MIB" >/dev/null
done
"$BIN/tap-ctl" vhd key -s -n "$WORK/images/e.vhd" -k "$WORK/key" >/dev/null
bench_broker "$WORK"

DEV_P=$(attach "vhd:$WORK/images/p.vhd" </dev/null); MINOR_P=${DEV_P##*tapdev}
DEV_E=$(attach "vhd:$WORK/images/e.vhd" -E <"$WORK/key"); MINOR_E=${DEV_E##*tapdev}
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

echo "crypt bench: ${SIZE_MIB} MiB dynamic VHDs (filled), AES-$((KEY_BYTES * 4))-XTS, ${RUNTIME}s x ${REPEAT}, $PROFILE build"
for job in rr4k rw4k sr1m sw1m; do
    unit=IOPS; case $job in *1m) unit=MB/s ;; esac
    compare $job $unit plain "$DEV_P" encrypted "$DEV_E" e/p fio_job $job
done
