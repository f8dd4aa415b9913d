#!/usr/bin/env bash
# Sum the CPU time and executions each target got in logs/ (run.sh's
# cpu_seconds lines and libFuzzer's final stats), as README table rows.
cd "$(dirname "$0")"
for log in logs/*.log; do
  t=$(basename "$log" .log)
  awk -v t="$t" '
    /^cpu_seconds/ { cpu += $2 + $4 }
    /^stat::number_of_executed_units:/ { runs += $2 }
    /ERROR|panicked/ { found++ }
    END { printf "| %s | %d | %d |\n", t, cpu, runs }' "$log"
done
