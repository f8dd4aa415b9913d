#!/usr/bin/env bash
# tapjail's main job, on a fresh machine: build everything, start tap-broker
# with its embedded default policy (root only, images under
# /var/lib/tapjail, devices under /dev/tapjail), create a small dynamic VHD,
# attach it as a real block device with `tap-ctl create`, print `list` and
# `stats`, and keep it up until Ctrl-C; then take it all down again.
#
#   sudo ./examples/demo.sh            # 128 MiB demo disk
#   sudo DEMO_SIZE_MIB=1024 ./examples/demo.sh
#   sudo DEMO_HOLD=0 ./examples/demo.sh  # exercise the device, then exit
#                                         # (also when stdin is no terminal)
#
# While it runs, use the device from a second terminal (see README.md):
#   sudo mkfs.ext4 /dev/tapjail/tapdev0 && sudo mount /dev/tapjail/tapdev0 /mnt
#
# A tap-broker already serving /run/tapjail/broker.sock (the systemd unit) is
# used as is; otherwise one is started here and stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

die() { echo "demo: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (sudo $0): the broker creates block devices"

IMAGE_DIR=/var/lib/tapjail
IMAGE=$IMAGE_DIR/demo.vhd
SIZE_MIB=${DEMO_SIZE_MIB:-128}
SOCKET=/run/tapjail/broker.sock

# --- build (as the invoking user under sudo, so target/ stays theirs) -------
cargo=$(command -v cargo || true)
if [ -z "$cargo" ] && [ -n "${SUDO_USER:-}" ]; then
    cargo=$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cargo/bin/cargo
fi
[ -x "$cargo" ] || die "cargo not found (install Rust: https://rustup.rs)"
echo "== building (release)"
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    sudo -u "$SUDO_USER" -- "$cargo" build --release --workspace --bins
else
    "$cargo" build --release --workspace --bins
fi
BIN=$ROOT/target/release
CTL="$BIN/tap-ctl --socket $SOCKET"

# --- broker ---------------------------------------------------------------
BROKER_PID=
MINOR=
LOG=$(mktemp -d /tmp/tapjail-demo.XXXXXX)/broker.log
cleanup() {
    trap - INT TERM EXIT
    echo
    if [ -n "$MINOR" ]; then
        node=$(readlink -f "/dev/tapjail/tapdev$MINOR" 2>/dev/null || true)
        if [ -n "$node" ]; then
            # Unmount what the demo device is mounted on rather than pull it
            # out from under a filesystem.
            { findmnt -rn -S "$node" -o TARGET 2>/dev/null || true; } | while read -r m; do
                echo "== unmounting $m"
                umount "$m" || true
            done
        fi
        echo "== tap-ctl destroy -m $MINOR"
        $CTL destroy -m "$MINOR" || true
    fi
    if [ -n "$BROKER_PID" ]; then
        # SIGINT: take every disk down (SIGTERM would leave them served
        # for the next tap-broker to adopt).
        echo "== stopping tap-broker ($BROKER_PID)"
        kill -INT "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
    fi
    echo "== done; the image stays at $IMAGE"
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

if $CTL list >/dev/null 2>&1; then
    echo "== using the tap-broker already serving $SOCKET"
else
    echo "== starting tap-broker (embedded default policy; log: $LOG)"
    "$BIN/tap-broker" >"$LOG" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 100); do
        $CTL list >/dev/null 2>&1 && break
        kill -0 "$BROKER_PID" 2>/dev/null || { cat "$LOG"; die "tap-broker exited"; }
        sleep 0.1
    done
    $CTL list >/dev/null 2>&1 || { cat "$LOG"; die "tap-broker did not start"; }
    grep -m1 "serving" "$LOG" | sed 's/^/   /'
fi

# --- image and device -----------------------------------------------------
mkdir -p "$IMAGE_DIR"
if [ -e "$IMAGE" ]; then
    echo "== reusing $IMAGE"
else
    echo "== tap-ctl vhd create -n $IMAGE -s $SIZE_MIB"
    "$BIN/tap-ctl" vhd create -n "$IMAGE" -s "$SIZE_MIB"
fi
echo "== tap-ctl create -a vhd:$IMAGE"
DEV=$($CTL create -a "vhd:$IMAGE")
MINOR=${DEV##*tapdev}
echo "   $DEV -> $(readlink "$DEV")"
echo "== tap-ctl list"
$CTL list
echo "== tap-ctl stats -m $MINOR"
$CTL stats -m "$MINOR"

# --- use it ---------------------------------------------------------------
# A filesystem on the device, a file written through it, the device
# remounted and the file read back: the data went through the confined
# worker into the VHD and came back out.
MNT=$(mktemp -d /tmp/tapjail-demo-mnt.XXXXXX)
if ! blkid "$DEV" >/dev/null 2>&1; then
    echo "== mkfs.ext4 $DEV"
    mkfs.ext4 -q "$DEV"
fi
mount "$DEV" "$MNT"
head -c 8M /dev/urandom >"$MNT/demo.bin"
WROTE=$(sha256sum <"$MNT/demo.bin" | cut -d' ' -f1)
umount "$MNT"
mount "$DEV" "$MNT"
READ=$(sha256sum <"$MNT/demo.bin" | cut -d' ' -f1)
umount "$MNT"
rmdir "$MNT"
[ "$WROTE" = "$READ" ] || die "8 MiB written through $DEV read back different"
echo "== wrote 8 MiB through $DEV on ext4, remounted, read back identical ($READ)"
echo "== tap-ctl stats -m $MINOR (after the I/O)"
$CTL stats -m "$MINOR"
echo "== tap-ctl vhd query -n $IMAGE"
"$BIN/tap-ctl" vhd query -n "$IMAGE"

if [ ! -t 0 ] || [ "${DEMO_HOLD:-1}" = 0 ]; then
    # Not interactive (or asked not to wait): take it down now.
    exit 0
fi
echo
cat <<EOF
$DEV is a real block device served by a confined tapdisk worker.
From a second terminal, for example:

    sudo mkfs.ext4 $DEV
    sudo mkdir -p /mnt/tapjail-demo
    sudo mount $DEV /mnt/tapjail-demo
    echo hello | sudo tee /mnt/tapjail-demo/hello
    sudo umount /mnt/tapjail-demo

Press Ctrl-C here to take the device down.
EOF
while true; do sleep 1; done
