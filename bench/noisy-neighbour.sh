#!/usr/bin/env bash
# Noisy neighbour (issue 14): does tenant A's write storm hurt tenant B's
# read latency, and do I/O limits stop it? One run, one table.
#
#   sudo bench/noisy-neighbour.sh   (env: RUNTIME=10 REPEAT=3 SIZE_MIB=256
#                                    A_IOPS=400 BUILD=release|debug,
#                                    TAPDISK=other worker)
#
# One tap-broker (frontend fuse: FUSE + loop, which this host has), two
# tenants. A has 4 disks, B has 1 (raw images, filled first). B runs fio
# 4 KiB random reads at depth 1 (libaio, O_DIRECT) for RUNTIME seconds,
# three ways:
#   alone         nothing else runs
#   A, no limits  A runs 4 KiB random writes at depth 32 on its 4 disks
#   A, limited    the same, after `tap-ctl throttle --tenant a
#                 --write-iops A_IOPS` (A's 4 disks share that budget)
# The three take turns, REPEAT rounds (the host is shared and noisy); it
# prints the medians of B's p50 and p99 completion latency for each, the
# p99 spread (min..max), the ratio of each median p99 to B alone (target
# with limits: within 2x), and A's IOPS.
# cgroup v2 io.weight (the cgroup work of issue 14) is used where the host
# has cgroup v2 with the io controller; the script says whether it does.
set -euo pipefail

RUNTIME=${RUNTIME:-10}
REPEAT=${REPEAT:-3}
SIZE_MIB=${SIZE_MIB:-256}
A_IOPS=${A_IOPS:-400}
BUILD=${BUILD:-release}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B_UID=39901

die() { echo "bench: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE mounts)"
for tool in fio setpriv python3; do
    command -v "$tool" >/dev/null || die "$tool not installed (apt-get install fio util-linux python3)"
done

if [ "$BUILD" = release ]; then
    cargo build --quiet --release -p tapjail-broker -p tapjail-worker -p tapjail-ctl --bins \
        --manifest-path "$ROOT/Cargo.toml"
    BIN=$ROOT/target/release
else
    cargo build --quiet -p tapjail-broker -p tapjail-worker -p tapjail-ctl --bins \
        --manifest-path "$ROOT/Cargo.toml"
    BIN=$ROOT/target/debug
fi
TAPDISK=${TAPDISK:-$BIN/tapdisk}

WORK=$(mktemp -d /var/tmp/tapjail-bench-noisy.XXXXXX)
chmod 755 "$WORK"
BROKER_PID= A_PIDS=()
CTL=("$BIN/tap-ctl" --socket "$WORK/run/broker.sock")
cleanup() {
    set +e
    for p in "${A_PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for m in $("${CTL[@]}" list 2>/dev/null | sed -n 's/.*minor=\([0-9]*\).*/\1/p'); do
        "${CTL[@]}" destroy -m "$m" >/dev/null 2>&1
    done
    [ -n "$BROKER_PID" ] && { kill -INT "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

# cgroup v2 with io.weight here? (This VM's cgroups are v1 and the
# machine's: the script never touches them.)
if [ "$(stat -fc %T /sys/fs/cgroup 2>/dev/null)" = cgroup2fs ] \
    && grep -qw io /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
    CGROUPS="cgroup v2 with io controller present (workers' io.weight applies if the broker sets it)"
else
    CGROUPS="no cgroup v2 io controller on this host (cgroups here are v1): limits only; io.weight is measured inside nestvm"
fi

mkdir -p "$WORK/images/a" "$WORK/images/b"
chown "$B_UID:$B_UID" "$WORK/images/b"
cat >"$WORK/policy.toml" <<EOF
socket = "$WORK/run/broker.sock"
audit_log = "$WORK/log/audit.jsonl"
state_dir = "$WORK/state"
device_dir = "$WORK/dev"
worker_uids = [391000, 391049]
tapdisk = "$TAPDISK"
frontend = "fuse"

[[tenant]]
name = "a"
uids = [0]
image_roots = ["$WORK/images/a"]
writable = true
max_disks = 8
admin = true

[[tenant]]
name = "b"
uids = [$B_UID]
image_roots = ["$WORK/images/b"]
writable = true
max_disks = 2
EOF
"$BIN/tap-broker" --config "$WORK/policy.toml" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 100); do "${CTL[@]}" list >/dev/null 2>&1 && break; sleep 0.1; done

A_DEVS=()
for i in 1 2 3 4; do
    truncate -s "${SIZE_MIB}M" "$WORK/images/a/a$i.raw"
    dev=$("${CTL[@]}" create -a "aio:$WORK/images/a/a$i.raw") || { cat "$WORK/broker.log"; die "create a$i failed"; }
    A_DEVS+=("$dev")
done
setpriv --reuid=$B_UID --regid=$B_UID --clear-groups truncate -s "${SIZE_MIB}M" "$WORK/images/b/b.raw"
B_DEV=$(setpriv --reuid=$B_UID --regid=$B_UID --clear-groups "${CTL[@]}" create -a "aio:$WORK/images/b/b.raw") \
    || { cat "$WORK/broker.log"; die "create b failed"; }

for d in "${A_DEVS[@]}" "$B_DEV"; do
    fio --name=fill --filename="$d" --ioengine=libaio --direct=1 --rw=write --bs=1M \
        --iodepth=8 --size="${SIZE_MIB}M" --output=/dev/null
done

# b_run OUT: B's QD1 random reads, fio JSON into OUT.
b_run() {
    fio --name=b --filename="$B_DEV" --ioengine=libaio --direct=1 --rw=randread --bs=4k \
        --iodepth=1 --runtime="$RUNTIME" --time_based --output-format=json --output="$1"
}
# a_start: A's QD32 random writes on its 4 disks, for longer than B runs.
a_start() {
    A_PIDS=()
    local i=0
    for d in "${A_DEVS[@]}"; do
        i=$((i + 1))
        fio --name="a$i" --filename="$d" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
            --iodepth=32 --runtime=$((RUNTIME + 4)) --time_based --output-format=json \
            --output="$WORK/a-$1-$i.json" &
        A_PIDS+=($!)
    done
    sleep 2 # A at full speed before B starts
}
a_wait() { for p in "${A_PIDS[@]}"; do wait "$p"; done; A_PIDS=(); }

for r in $(seq "$REPEAT"); do
    b_run "$WORK/b-alone-$r.json"
    a_start "open-$r"
    b_run "$WORK/b-open-$r.json"
    a_wait
    "${CTL[@]}" throttle --tenant a --write-iops "$A_IOPS" >/dev/null
    a_start "limited-$r"
    b_run "$WORK/b-limited-$r.json"
    a_wait
    [ "$r" = "$REPEAT" ] && LIMITED_STATS=$("${CTL[@]}" stats -m "${A_DEVS[0]##*tapdev}")
    "${CTL[@]}" throttle --tenant a --write-iops off >/dev/null
done

python3 - "$WORK" "$RUNTIME" "$REPEAT" "$A_IOPS" "$CGROUPS" "$LIMITED_STATS" <<'EOF'
import json, statistics, sys
work, runtime, repeat, a_iops, cgroups, stats = sys.argv[1:7]
rounds = range(1, int(repeat) + 1)
def b(name):
    out = []
    for r in rounds:
        j = json.load(open(f"{work}/b-{name}-{r}.json"))["jobs"][0]["read"]
        p = j["clat_ns"]["percentile"]
        out.append((j["iops"], p["50.000000"] / 1000, p["99.000000"] / 1000))
    med = lambda i: statistics.median(x[i] for x in out)
    return med(0), med(1), med(2), min(x[2] for x in out), max(x[2] for x in out)
def a(name):
    tot = [sum(json.load(open(f"{work}/a-{name}-{r}-{i}.json"))["jobs"][0]["write"]["iops"]
               for i in range(1, 5)) for r in rounds]
    return statistics.median(tot)
alone = b("alone")
rows = [("B alone", alone, None), ("B next to A, no limits", b("open"), a("open")),
        (f"B next to A, A limited to {a_iops} write IOPS", b("limited"), a("limited"))]
print(f"noisy neighbour: fuse + loop, 4 KiB, B QD1 randread, A 4 x QD32 randwrite, "
      f"{runtime} s each, median of {repeat} rounds")
print(f"cgroups: {cgroups}")
print(f"{'scenario':44} {'B IOPS':>7} {'p50 us':>7} {'p99 us':>7} {'p99 min..max':>14} "
      f"{'p99/alone':>9} {'A IOPS':>7}")
for name, (iops, p50, p99, lo, hi), aiops in rows:
    spread = f"{lo:.0f}..{hi:.0f}"
    print(f"{name:44} {iops:7.0f} {p50:7.0f} {p99:7.0f} {spread:>14} {p99 / alone[2]:9.2f} "
          f"{'-' if aiops is None else f'{aiops:.0f}':>7}")
th = json.loads(stats).get("throttle", {})
print(f"A disk 1 throttle (last limited round): paced {th.get('paced')} "
      f"delayed {th.get('delayed')} delay_us {th.get('delay_us')}")
limited = rows[2][1][2] / alone[2]
print(f"target (B p99 with limits within 2x of alone): {'met' if limited <= 2 else 'NOT met'} "
      f"({limited:.2f}x)")
EOF
