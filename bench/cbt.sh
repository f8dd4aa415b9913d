#!/usr/bin/env bash
# Changed-block tracking's cost on the write path: the same 4 KiB writes
# (each followed by a flush) on a raw image with and without a tracked
# bitmap, whose log is made durable (pwrite + fdatasync) before a write
# that dirties a new 64 KiB block; and a rewrite of blocks already marked.
#
#   bench/cbt.sh [THREADS] [ROUNDS]   (defaults: 8, 3; PROFILE=dev to skip the release build)
#
# Runs in a directory on the disk /tmp is on (not tmpfs: fdatasync must cost
# what it costs). Prints writes/s and the ratio cbt/plain per pattern.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${PROFILE:-release}
WORK=$(mktemp -d /tmp/tapjail-cbt-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
if [ "$PROFILE" = release ]; then
  cargo run --quiet --release -p tapjail-worker --example cbt_bench --manifest-path "$ROOT/Cargo.toml" -- "$WORK" "${1:-8}" "${2:-3}"
else
  cargo run --quiet -p tapjail-worker --example cbt_bench --manifest-path "$ROOT/Cargo.toml" -- "$WORK" "${1:-8}" "${2:-3}"
fi
