#!/usr/bin/env bash
# Crash consistency at full size: every crash point of every workload,
# 12 reordered and 12 torn samples per point, CRASH_SEEDS seeds per
# workload (default 4). Prints per workload the recorded operations, the
# distinct crash states checked, how many were cut before a new file was
# complete and refused to open (allowed), how many `repair` fixed, how many
# read a known-tolerated sector (a fixed image's old footer in space a
# resize added) and how many failed; exits non-zero on any failure or
# under 10,000 states. The harness is `worker/image/tests/crash`; CI runs a
# small seeded sample of it as ordinary tests.
#
#   bench/crash.sh     CRASH_SEEDS=8 bench/crash.sh     CRASH_WORKLOADS=resize_diff,coalesce bench/crash.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test -q --release -p tapjail-image --test crash -- --ignored --nocapture --exact full_size
