#!/usr/bin/env bash
# Local interop check of tapjail against blktap's own tools, built from
# source (xapi-project/blktap). Not part of CI, and the tools stay out of
# the repo: build them somewhere else and point BLKTAP_BUILD at the tree.
#
#   sudo tests/interop/blktap-tools.sh     (env: BLKTAP_BUILD=/work/blktap-build
#                                           PROFILE=debug|release)
#
# Building blktap (Debian 12): apt-get install libaio-dev uuid-dev libssl-dev
# autoconf automake libtool; in the tree: echo 4.0.0 > VERSION (the file was
# removed upstream, configure.ac still reads it); autoreconf -fi;
# ./configure; make -C lvm, vhd/lib, vhd, cbt, drivers/crypto, then
# make -C drivers libblockcrypto.la (vhd-util key dlopen()s it), all with
# CFLAGS="-g -O2 -Wno-error" (gcc 12 warns in include/util.h). No Xen
# header is needed for these.
#
# What it checks, each side reading what the other wrote:
#  1. blktap -> tapjail, encryption: an image made by `vhd-util create` and
#     keyed by `vhd-util key -s`, sectors written by blktap's own libvhd and
#     AES-XTS code (tests/interop/blktap_crypt_io.c, compiled here against
#     the build tree), read through a tapjail device after `open -E`.
#  2. tapjail -> blktap, encryption: an image made and keyed by
#     `tap-ctl vhd create` / `vhd key -s`, written through a tapjail device
#     after `open -E`, passes `vhd-util check` and `vhd-util key -c`, and
#     blktap's code decrypts the same bytes. Also a 32-byte key.
#  3. CBT: a log made by `cbt-util create` (+ `cbt-util set -c UUID`, as
#     SM does), tracked into by `tap-ctl open -C`, read back by
#     `cbt-util get -b` (the blocks written, no others) and `get -c` (the
#     header SM wrote, intact); and a log tapjail made (`tap-ctl cbt start`)
#     read by `cbt-util get -s/-b`.
# Prints one line per check and exits non-zero on the first failure.
set -euo pipefail

BLKTAP=${BLKTAP_BUILD:-/work/blktap-build}
PROFILE=${PROFILE:-debug}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VHD_UTIL=$BLKTAP/vhd/vhd-util
CBT_UTIL=$BLKTAP/cbt/cbt-util

skip() { echo "interop: skipped: $*"; exit 0; }
die() { echo "interop: FAILED: $*" >&2; exit 1; }
ok() { echo "interop: ok: $*"; }

[ -x "$VHD_UTIL" ] && [ -x "$CBT_UTIL" ] ||
    skip "blktap's vhd-util/cbt-util not built under $BLKTAP (set BLKTAP_BUILD; see this script's header)"
[ -f "$BLKTAP/vhd/lib/.libs/libvhd.a" ] && [ -f "$BLKTAP/drivers/.libs/libblockcrypto.so.0" ] ||
    skip "$BLKTAP has no built vhd/lib/.libs/libvhd.a or drivers/.libs/libblockcrypto.so.0"
# vhd-util key dlopen()s blktap's libblockcrypto.so.0.
export LD_LIBRARY_PATH=$BLKTAP/drivers/.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
[ "$(id -u)" = 0 ] || skip "needs root (FUSE mounts, loop devices)"
for tool in gcc python3 blockdev; do
    command -v "$tool" >/dev/null || skip "$tool not installed"
done

if [ "$PROFILE" = release ]; then
    cargo build --quiet --release --workspace --bins --manifest-path "$ROOT/Cargo.toml"
else
    cargo build --quiet --workspace --bins --manifest-path "$ROOT/Cargo.toml"
fi
BIN=$ROOT/target/$PROFILE

WORK=$(mktemp -d /var/tmp/tapjail-interop.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/images"
BROKER_PID=
CTL="$BIN/tap-ctl --socket $WORK/run/broker.sock"
cleanup() {
    set +e
    for m in $($CTL list 2>/dev/null | sed -n 's/.*minor=\([0-9]*\).*/\1/p'); do
        $CTL destroy -m "$m" >/dev/null 2>&1
    done
    [ -n "$BROKER_PID" ] && { kill -TERM "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

BCIO=$WORK/blktap_crypt_io
gcc -O1 -D_GNU_SOURCE -I"$BLKTAP/include" -I"$BLKTAP/drivers" -o "$BCIO" \
    "$ROOT/tests/interop/blktap_crypt_io.c" "$BLKTAP/drivers/crypto/xts_aes.c" \
    "$BLKTAP/vhd/lib/.libs/libvhd.a" "$BLKTAP/lvm/.libs/liblvmutil.a" -luuid -lcrypto ||
    die "compiling blktap_crypt_io.c against $BLKTAP"

cat >"$WORK/policy.toml" <<EOT
socket = "$WORK/run/broker.sock"
audit_log = "$WORK/log/audit.jsonl"
state_dir = "$WORK/state"
device_dir = "$WORK/dev"
worker_uids = [392000, 392009]
tapdisk = "$BIN/tapdisk"
frontend = "fuse"

[[tenant]]
name = "interop"
uids = [0]
image_roots = ["$WORK/images"]
writable = true
max_disks = 4
admin = true
EOT
"$BIN/tap-broker" --config "$WORK/policy.toml" 2>"$WORK/broker.log" &
BROKER_PID=$!
for _ in $(seq 100); do [ -S "$WORK/run/broker.sock" ] && break; sleep 0.1; done
[ -S "$WORK/run/broker.sock" ] || die "tap-broker did not start: $(cat "$WORK/broker.log")"

I=$WORK/images
# pattern SALT SECTORS: SECTORS*512 bytes, each sector distinct.
pattern() {
    python3 -c 'import sys,struct
salt, n = int(sys.argv[1]), int(sys.argv[2])
sys.stdout.buffer.write(b"".join(struct.pack("<Q", s ^ salt) * 64 for s in range(n)))' "$1" "$2"
}
# key BYTES FILE: a random key. vhd-util key takes a key only from a file
# named IMAGE-BASENAME,aes-xts-plain,BITS.key (BITS 512 or 256).
key() { mkdir -p "$(dirname "$2")"; head -c "$1" /dev/urandom >"$2"; }
# open_dev IMAGE STDIN [open flags]: allocate+spawn+attach+open, SM's
# order, with STDIN on open's stdin (the key for -E); prints the device.
open_dev() {
    local img=$1 input=$2
    shift 2
    local dev pid minor
    dev=$($CTL allocate)
    minor=${dev##*tapdev}
    pid=$($CTL spawn)
    $CTL attach -p "$pid" -m "$minor"
    $CTL open -p "$pid" -m "$minor" -a "vhd:$img" "$@" <"$input" >/dev/null
    echo "$dev"
}
close_dev() {
    local minor=${1##*tapdev}
    $CTL destroy -m "$minor" >/dev/null
}
# dev_read DEV SECTOR COUNT > bytes (past the page cache)
dev_read() {
    blockdev --flushbufs "$1"
    dd if="$1" bs=512 skip="$2" count="$3" iflag=direct status=none
}
dev_write() { dd of="$1" bs=512 seek="$2" oflag=direct conv=notrunc,fsync status=none; }
same() { cmp -s "$1" "$2" || die "$3: $(cmp "$1" "$2" 2>&1 | head -1)"; }

echo "interop: blktap $(git --git-dir="$BLKTAP/.git" rev-parse --short HEAD 2>/dev/null || echo "tree $BLKTAP")," \
    "vhd-util $VHD_UTIL, cbt-util $CBT_UTIL; tapjail $(git -C "$ROOT" rev-parse --short HEAD) ($PROFILE)"

# 1. blktap -> tapjail (64-byte key, AES-256-XTS).
K64="$WORK/keys/b,aes-xts-plain,512.key"
key 64 "$K64"
"$VHD_UTIL" create -n "$I/b.vhd" -s 16
"$VHD_UTIL" key -s -n "$I/b.vhd" -k "$K64"
pattern 11 128 >"$WORK/a"
pattern 12 8 >"$WORK/a2"
"$BCIO" write "$I/b.vhd" "$K64" 0 128 <"$WORK/a"
"$BCIO" write "$I/b.vhd" "$K64" 8192 8 <"$WORK/a2"
"$VHD_UTIL" check -n "$I/b.vhd" >/dev/null || die "vhd-util check of blktap's own image"
python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); p=open(sys.argv[2],"rb").read(); sys.exit(1 if p[:512] in d else 0)' "$I/b.vhd" "$WORK/a" ||
    die "blktap's image holds plaintext (the helper did not encrypt)"
"$BIN/tap-ctl" vhd key -c -n "$I/b.vhd" -k "$K64" >/dev/null ||
    die "tap-ctl vhd key -c rejects vhd-util key -s's keyhash"
ok "tap-ctl vhd key -c accepts the keyhash vhd-util key -s wrote"
DEV=$(open_dev "$I/b.vhd" "$K64" -E)
dev_read "$DEV" 0 128 >"$WORK/a.back"
same "$WORK/a" "$WORK/a.back" "sectors 0..128 blktap encrypted read otherwise through tapjail"
dev_read "$DEV" 8192 8 >"$WORK/a2.back"
same "$WORK/a2" "$WORK/a2.back" "sectors 8192..8200 blktap encrypted read otherwise through tapjail"
dev_read "$DEV" 4096 8 | cmp -s - <(head -c 4096 /dev/zero) || die "an unwritten range is not zero through tapjail"
ok "vhd-util-made image, sectors encrypted by blktap's libvhd + xts_aes: identical through tapjail open -E (AES-256-XTS)"
# ... and tapjail writes into blktap's image, blktap reads them.
pattern 13 16 >"$WORK/b"
dev_write "$DEV" 20000 <"$WORK/b"
close_dev "$DEV"
"$VHD_UTIL" check -n "$I/b.vhd" >/dev/null || die "vhd-util check after tapjail wrote into blktap's image"
"$BCIO" read "$I/b.vhd" "$K64" 20000 16 >"$WORK/b.back"
same "$WORK/b" "$WORK/b.back" "what tapjail wrote into blktap's image decrypts otherwise with blktap's code"
"$BCIO" read "$I/b.vhd" "$K64" 0 128 >"$WORK/a.back2"
same "$WORK/a" "$WORK/a.back2" "blktap's own sectors changed after tapjail served the image"
ok "tapjail's writes into the vhd-util image: vhd-util check clean, blktap's code decrypts them"

# 2. tapjail -> blktap (32-byte key, AES-128-XTS).
K32="$WORK/keys/t,aes-xts-plain,256.key"
key 32 "$K32"
"$BIN/tap-ctl" vhd create -n "$I/t.vhd" -s 16 >/dev/null
"$BIN/tap-ctl" vhd key -s -n "$I/t.vhd" -k "$K32" >/dev/null
"$VHD_UTIL" key -c -n "$I/t.vhd" -k "$K32" >/dev/null 2>&1 ||
    die "vhd-util key -c rejects tap-ctl vhd key -s's keyhash"
KWRONG="$WORK/wrong/t,aes-xts-plain,256.key"
key 32 "$KWRONG"
if "$VHD_UTIL" key -c -n "$I/t.vhd" -k "$KWRONG" >/dev/null 2>&1; then
    die "vhd-util key -c accepts a wrong key (the check proves nothing)"
fi
ok "vhd-util key -c accepts the keyhash tap-ctl vhd key -s wrote, and refuses a wrong key"
pattern 21 300 >"$WORK/c"
pattern 22 3 >"$WORK/c2"
DEV=$(open_dev "$I/t.vhd" "$K32" -E)
dev_write "$DEV" 0 <"$WORK/c"
dev_write "$DEV" 16381 <"$WORK/c2" # straddles the 2 MiB block boundary (sector 16384)
close_dev "$DEV"
"$VHD_UTIL" check -n "$I/t.vhd" || die "vhd-util check of tapjail's encrypted image"
"$VHD_UTIL" read -n "$I/t.vhd" -p >/dev/null || die "vhd-util read -p of tapjail's image"
"$BCIO" read "$I/t.vhd" "$K32" 0 300 >"$WORK/c.back"
same "$WORK/c" "$WORK/c.back" "tapjail's sectors 0..300 decrypt otherwise with blktap's code"
"$BCIO" read "$I/t.vhd" "$K32" 16381 3 >"$WORK/c2.back"
same "$WORK/c2" "$WORK/c2.back" "tapjail's sectors 16381..16384 (two blocks) decrypt otherwise"
"$BCIO" read "$I/t.vhd" "$KWRONG" 0 1 >/dev/null 2>&1 && die "blktap's code took a wrong key"
ok "tapjail-made encrypted image: vhd-util check clean, blktap's libvhd + xts_aes decrypt what tapjail wrote (AES-128-XTS)"

# 3. CBT: SM's log, tracked into by tapjail, read by cbt-util.
"$BIN/tap-ctl" vhd create -n "$I/cbt.vhd" -s 16 >/dev/null
SIZE=$((16 << 20))
"$CBT_UTIL" create -n "$I/cbt.cbtlog" -s "$SIZE"
CHILD=$(python3 -c 'import uuid; print(uuid.uuid4())')
"$CBT_UTIL" set -n "$I/cbt.cbtlog" -c "$CHILD"
DEV=$(open_dev "$I/cbt.vhd" /dev/null -C "$I/cbt.cbtlog")
# 64 KiB blocks 0, 3 (two sectors), 4..5 (a 128 KiB write from 4), 200, 255.
pattern 31 1 | dev_write "$DEV" 0
pattern 32 2 | dev_write "$DEV" $((3 * 128 + 7))
pattern 33 256 | dev_write "$DEV" $((4 * 128))
pattern 34 1 | dev_write "$DEV" $((200 * 128 + 127))
pattern 35 1 | dev_write "$DEV" $((255 * 128 + 127))
close_dev "$DEV"
GOT=$("$CBT_UTIL" get -n "$I/cbt.cbtlog" -b | python3 -c 'import sys
b = sys.stdin.buffer.read()
print(" ".join(str(n) for n in range(len(b) * 8) if b[n // 8] >> (n % 8) & 1))')
[ "$GOT" = "0 3 4 5 200 255" ] || die "cbt-util get -b of tapjail's -C log: blocks [$GOT], want [0 3 4 5 200 255]"
[ "$("$CBT_UTIL" get -n "$I/cbt.cbtlog" -c)" = "$CHILD" ] || die "cbt-util get -c: the child UUID SM set is gone"
[ "$("$CBT_UTIL" get -n "$I/cbt.cbtlog" -s)" = "$SIZE" ] || die "cbt-util get -s changed"
ok "cbt-util get -b reads tapjail's open -C tracking: blocks $GOT (exactly those written); get -c/-s: SM's header intact"

# A log tapjail made itself (tap-ctl cbt start), read by cbt-util.
"$BIN/tap-ctl" vhd create -n "$I/own.vhd" -s 8 >/dev/null
D=$($CTL create -a "vhd:$I/own.vhd")
M=${D##*tapdev}
$CTL cbt start -m "$M" --name bk >/dev/null
pattern 41 1 | dev_write "$D" $((17 * 128))
$CTL destroy -m "$M" >/dev/null
LOG=$(ls "$I"/own.vhd.bk.cbt 2>/dev/null || ls "$I"/*.bk.cbt)
[ "$("$CBT_UTIL" get -n "$LOG" -s)" = "$((8 << 20))" ] || die "cbt-util get -s of tapjail's own log"
GOT=$("$CBT_UTIL" get -n "$LOG" -b | python3 -c 'import sys
b = sys.stdin.buffer.read()
print(" ".join(str(n) for n in range(len(b) * 8) if b[n // 8] >> (n % 8) & 1))')
[ "$GOT" = "17" ] || die "cbt-util get -b of tapjail's own log: [$GOT], want [17]"
ok "cbt-util get -s/-b read a log tapjail created (tap-ctl cbt start): size $((8 << 20)), block 17"
echo "interop: all checks passed"
