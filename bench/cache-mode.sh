# Sourced by the benchmarks: which cache mode each side REALLY ran with, read
# from the kernel (not from the flags we passed), and a loud line when it is
# not the mode the comparison asked for. Numbers from a side that fell back to
# the page cache are not comparable with a direct side; say so, never silently.

# fd_mode PID FILE -> "direct" or "buffered" (every fd PID holds on FILE), or
# "not-open" when PID has no fd on FILE.
fd_mode() {
  local pid=$1 want fd target flags mode=not-open
  want=$(readlink -f "$2")
  [ -r /proc/"$pid"/fd ] && ls /proc/"$pid"/fd >/dev/null 2>&1 ||
    { echo "unknown(cannot read /proc/$pid/fd: run as root)"; return; }
  for fd in /proc/"$pid"/fd/*; do
    target=$(readlink "$fd" 2>/dev/null) || continue
    [ "$target" = "$want" ] || continue
    flags=$(sed -n 's/^flags:[[:space:]]*//p' /proc/"$pid"/fdinfo/"${fd##*/}" 2>/dev/null) || continue
    [ -n "$flags" ] || continue
    if (( 8#$flags & 8#40000 )); then
      [ "$mode" = buffered ] || mode=direct
    else
      mode=buffered
    fi
  done
  echo "$mode"
}

# loop_mode /dev/loopN -> "direct" or "buffered" (the loop's own I/O to its
# backing file, /sys/block/loopN/loop/dio).
loop_mode() {
  local name
  name=$(basename "$(readlink -f "$1")")
  case "$(cat /sys/block/"$name"/loop/dio 2>/dev/null)" in
    1) echo direct ;;
    0) echo buffered ;;
    *) echo unknown ;;
  esac
}

# cache_report LABEL WANT GOT: one line on stderr and in $CACHE_REPORT; a
# mismatch is a WARNING that is repeated with the results (CACHE_FELL_BACK=1).
CACHE_REPORT=${CACHE_REPORT:-}
CACHE_FELL_BACK=${CACHE_FELL_BACK:-0}
cache_report() {
  local label=$1 want=$2 got=$3 line
  if [ "$want" = "$got" ]; then
    line="cache: $label ran $got"
  else
    line="cache: WARNING: $label ran $got, not $want: its figures are not comparable"
    CACHE_FELL_BACK=1
  fi
  echo "bench: $line" >&2
  CACHE_REPORT+="$line"$'\n'
}

# cache_summary: repeat the report under the results, loudly if anything
# fell back.
cache_summary() {
  printf '%s' "$CACHE_REPORT"
  if [ "$CACHE_FELL_BACK" = 1 ]; then
    echo "WARNING: at least one side did not run with the cache mode asked for (see above)"
  fi
}

# worker_pid TAP_CTL_COMMAND... MINOR -> the tapdisk pid serving MINOR.
worker_pid() {
  local minor=${*: -1}
  "${@:1:$#-1}" list --json | python3 -c '
import json, sys
m = int(sys.argv[1])
print(next(r["pid"] for r in json.load(sys.stdin) if r["minor"] == m))' "$minor"
}
