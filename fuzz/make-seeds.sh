#!/usr/bin/env bash
# Regenerate the small seed images (dynamic, fixed, differencing) with
# tap-ctl. The seeds are committed so the replay test needs no tools.
set -euo pipefail
cd "$(dirname "$0")"
T=../target/debug/tap-ctl
cargo build -q --manifest-path ../Cargo.toml -p tapjail-ctl
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
$T vhd create -n "$tmp/dyn.vhd" -s 1 --block-size 65536
printf 'hello fuzz' | $T vhd write -n "$tmp/dyn.vhd" -o 70000
$T vhd create -n "$tmp/fixed.vhd" -s 1 --fixed
$T vhd snapshot -n "$tmp/diff.vhd" -p "$tmp/dyn.vhd" --block-size 65536
printf 'child' | $T vhd write -n "$tmp/diff.vhd" -o 5
cp "$tmp/dyn.vhd" "$tmp/diff.vhd" seeds/
# A 1 MiB fixed image is mostly zeroes: shrink it to 8 KiB of data by
# rewriting the footer's sizes (creator tap uses current_size).
python3 - "$tmp/fixed.vhd" seeds/fixed.vhd <<'PY'
import struct, sys
b = open(sys.argv[1], 'rb').read()
f = bytearray(b[-512:])
f[40:48] = struct.pack('>Q', 8192)
f[48:56] = struct.pack('>Q', 8192)
f[64:68] = b'\0\0\0\0'
f[64:68] = struct.pack('>I', (~sum(f)) & 0xffffffff)
data = bytearray(8192); data[100:110] = b'fixed seed'
open(sys.argv[2], 'wb').write(bytes(data) + bytes(f))
PY
ls -la seeds
