#!/usr/bin/env bash
# Run one libFuzzer target at the lowest priority for SECONDS of wall time
# and log the CPU time it got (the README's table counts CPU time: on a
# shared machine, wall time overstates it).
#
#   fuzz/run.sh TARGET SECONDS [extra libFuzzer flags]
#
# The working corpus is corpus/TARGET (start it with the seed-corpus bin);
# crashes land in artifacts/TARGET; the log in logs/TARGET.log.
#
# libFuzzer's -timeout is wall-clock time. At nice 19 next to compiling
# engineers a unit can wait tens of seconds for a CPU: twice an nbd_client
# unit "timed out" after 30 s that then ran in 0.08 s, 200 times in a row.
# So the limit is 120 s (FUZZ_TIMEOUT): a real hang still ends the run.
set -euo pipefail
cd "$(dirname "$0")"
target=$1 secs=$2
shift 2
mkdir -p "corpus/$target" "artifacts/$target" logs
# A dictionary of the input's keywords, where one exists.
dict=()
[ -f "dicts/$target.dict" ] && dict=(-dict="dicts/$target.dict")
log=logs/$target.log
echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) $target ${secs}s" >>"$log"
set +e
nice -n 19 /usr/bin/time -f "cpu_seconds %U user %S sys, wall %e" -a -o "$log" \
  cargo +nightly fuzz run --features libfuzzer "$target" "corpus/$target" -- \
  -max_total_time="$secs" -timeout="${FUZZ_TIMEOUT:-120}" -rss_limit_mb=2048 \
  -artifact_prefix="artifacts/$target/" -print_final_stats=1 "${dict[@]}" "$@" \
  >>"$log" 2>&1
rc=$?
echo "== exit $rc" >>"$log"
exit $rc
