#!/usr/bin/env bash
# Control-plane speed (issue 14, item 4): how long create, destroy and list
# take with N disks already attached, idle and under I/O load, where
# create's time goes, and whether anything leaks.
#
#   sudo bench/control-plane.sh [N] [SAMPLES]    (default 1000 and 100;
#        env: BUILD=debug|release (default debug), TAPDISK=other worker,
#        LOAD_JOBS=fio jobs for the load phase (default 4), FILLS=rounds of
#        filling N and destroying all, each followed by the census (default 1),
#        SPAWN=fork to start workers with fork+exec, the old path, as a
#        baseline for the vfork-style spawn; OPENER=off to fork each image
#        open helper from the broker, the old path, as a baseline for the
#        image opener; ROOT_NS=own to have each worker build its own empty
#        root, the old path, as a baseline for the shared namespace;
#        OPEN_AHEAD=off to open the leaf after the worker started, the old
#        path; STATE_ON=disk for state_dir and device_dir on the disk
#        rather than on a tmpfs as /run/tapjail and /dev/tapjail are;
#        LANE_RT=off to run the spawn lane at the normal priority, the old
#        way; CGROUPS=off|required for that policy `cgroups` value rather
#        than "auto": workers in per-tenant cgroups where cgroup v2 is, as
#        in nestvm; START_WEIGHT=off to start a new disk's cgroup at
#        cpu.weight 100, not 10000, the old way)
#
# One tap-broker (frontend fuse: FUSE + loop, which this host has) with
# TAPJAIL_PHASES=1, so every request logs a `tap-broker: phases` line with
# the time of each of its steps and every worker a `tapdisk: phases` line
# with its confinement steps. The script:
#   1. attaches N disks (1 MiB raw images, one file each);
#   2. idle: SAMPLES times create one more disk, read sector 0 through its
#      block device (create -> usable), destroy it; and SAMPLES `list`s;
#   3. load: fio 4 KiB random read/write at depth 16 on LOAD_JOBS of the N
#      disks (both CPUs busy), then the same create/destroy samples;
#   4. destroys all N and compares a leak census (the soak's counters:
#      broker fds, threads, RSS, workers, zombies, FUSE mounts, FUSE loop
#      devices, minor records, device links) with the one taken before 1.
# It prints p50/p90/p99/max of each, the load average at each stage, the
# median of every create and destroy phase, and the targets met or not.
set -euo pipefail

N=${1:-1000}
SAMPLES=${2:-100}
BUILD=${BUILD:-debug}
LOAD_JOBS=${LOAD_JOBS:-4}
FILLS=${FILLS:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "bench: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE mounts)"
for tool in fio python3; do
    command -v "$tool" >/dev/null || die "$tool not installed (apt-get install fio python3)"
done
[ "$N" -ge "$LOAD_JOBS" ] || die "N ($N) must be at least LOAD_JOBS ($LOAD_JOBS)"

PROFILE=()
[ "$BUILD" = release ] && PROFILE=(--release)
cargo build --quiet "${PROFILE[@]}" -p tapjail-broker -p tapjail-worker -p tapjail-ctl --bins \
    --manifest-path "$ROOT/Cargo.toml"
BIN=$ROOT/target/$BUILD
TAPDISK=${TAPDISK:-$BIN/tapdisk}

# Limits 1000 disks meet: each disk holds about 10 of the broker's fds
# (the broker raises its soft limit to the hard one) and each worker runs
# about 14 threads; say which limit is too low rather than let a create
# fail half-way.
need_fds=$((N * 12 + 1024))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need_fds" ]; then
    die "hard fd limit $(ulimit -Hn) < $need_fds needed for $N disks: raise it (limits.conf, LimitNOFILE=)"
fi
pid_max=$(cat /proc/sys/kernel/pid_max)
[ "$pid_max" -gt $((N * 20)) ] || die "kernel.pid_max $pid_max is too low for $N workers (each runs ~14 threads): sysctl kernel.pid_max=$((N * 40))"
threads_max=$(cat /proc/sys/kernel/threads-max)
[ "$threads_max" -gt $((N * 20)) ] || die "kernel.threads-max $threads_max is too low for $N workers: sysctl kernel.threads-max=$((N * 40))"
[ -e /dev/loop-control ] || die "/dev/loop-control missing (modprobe loop)"
# (loop.max_loop only sets how many exist at boot: LOOP_CTL_GET_FREE adds more.)

WORK=$(mktemp -d /var/tmp/tapjail-bench-ctlplane.XXXXXX)
chmod 755 "$WORK"
BROKER_PID=
# The socket, state_dir and device_dir live where the defaults put them:
# /run/tapjail and /dev/tapjail, tmpfs and devtmpfs on any systemd host
# (this VM's /run is on its ext4 root: one made here). The audit log stays
# on the disk, as /var/log/tapjail. STATE_ON=disk puts them under $WORK on
# the disk instead (state records then cost an ext4 create, write and
# unlink each, about 1 ms apiece here after the audit's fdatasync).
RT=$WORK/rt
mkdir -p "$RT"
if [ "${STATE_ON:-tmpfs}" = tmpfs ]; then
    mount -t tmpfs -o mode=755,size=64m tapjail-bench-rt "$RT" || die "cannot mount a tmpfs on $RT"
fi
CTL=("$BIN/tap-ctl" --socket "$RT/broker.sock")
cleanup() {
    set +e
    [ -n "$BROKER_PID" ] && { kill -INT "$BROKER_PID"; wait "$BROKER_PID"; } 2>/dev/null
    mountpoint -q "$RT" && umount "$RT"
    rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/images"
cat >"$WORK/policy.toml" <<EOF
socket = "$RT/broker.sock"
audit_log = "$WORK/log/audit.jsonl"
state_dir = "$RT/state"
device_dir = "$RT/dev"
worker_uids = [392000, $((392000 + N + 64))]
tapdisk = "$TAPDISK"
frontend = "fuse"
cgroups = "${CGROUPS:-auto}"

[[tenant]]
name = "ops"
uids = [0]
image_roots = ["$WORK/images"]
writable = true
max_disks = $((N + 16))
admin = true
EOF
for i in $(seq 0 $((N + 1))); do truncate -s 1M "$WORK/images/d$i.raw"; done
TAPJAIL_SPAWN=${SPAWN:-} TAPJAIL_OPENER=${OPENER:-} TAPJAIL_ROOT_NS=${ROOT_NS:-} \
    TAPJAIL_OPEN_AHEAD=${OPEN_AHEAD:-} TAPJAIL_LANE_RT=${LANE_RT:-} \
    TAPJAIL_START_WEIGHT=${START_WEIGHT:-} TAPJAIL_PHASES=1 "$BIN/tap-broker" --config "$WORK/policy.toml" >"$WORK/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 100); do "${CTL[@]}" list >/dev/null 2>&1 && break; sleep 0.1; done
"${CTL[@]}" list >/dev/null || { cat "$WORK/broker.log"; die "broker did not start"; }

python3 - "$WORK" "$BROKER_PID" "$N" "$SAMPLES" "$LOAD_JOBS" "$FILLS" "${CTL[@]}" <<'EOF'
import os, re, statistics, subprocess, sys, time
work, broker, n, samples, load_jobs, fills = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7])
ctl = sys.argv[7:]
log = f"{work}/broker.log"
spare = f"{work}/images/d{n}.raw"

def tapctl(*args):
    r = subprocess.run(ctl + list(args), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench: tap-ctl {' '.join(args)}: {r.stderr.strip()}\n--- broker log tail:\n"
                 + "".join(open(log).readlines()[-30:]))
    return r.stdout.strip()

def loadavg():
    return open("/proc/loadavg").read().split()[0]

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]

def row(name, xs):
    return (f"{name:34} {statistics.median(xs):8.1f} {pct(xs, 90):8.1f} {pct(xs, 99):8.1f} "
            f"{max(xs):8.1f}  (n={len(xs)})")

def census():
    def count(path):
        try:
            return len(os.listdir(path))
        except OSError:
            return 0
    kids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            rest = st.rsplit(")", 1)[1].split()
            if int(rest[1]) == broker:
                kids.append(rest[0])
    loops = 0
    for b in os.listdir("/sys/block"):
        try:
            loops += b.startswith("loop") and open(f"/sys/block/{b}/loop/backing_file").read().strip() == "/disk"
        except OSError:
            pass
    mounts = open(f"/proc/{broker}/mountinfo").read().splitlines()
    rss = next(int(l.split()[1]) for l in open(f"/proc/{broker}/status") if l.startswith("VmRSS:"))
    return {
        "broker_fds": count(f"/proc/{broker}/fd"),
        "broker_threads": count(f"/proc/{broker}/task"),
        "workers": sum(1 for s in kids if s != "Z"),
        "zombies": sum(1 for s in kids if s == "Z"),
        "fuse_mounts": sum(1 for m in mounts if " fuse" in m),
        "fuse_loops": loops,
        "minor_records": count(f"{work}/rt/state/minors"),
        "worker_records": count(f"{work}/rt/state/workers"),
        "device_links": count(f"{work}/rt/dev"),
        "rss_kib": rss,
    }

def create_usable(path):
    """create -> a read of sector 0 through the new block device succeeds."""
    t0 = time.perf_counter()
    dev = tapctl("create", "-a", f"aio:{path}")
    fd = os.open(dev, os.O_RDONLY)
    try:
        assert len(os.pread(fd, 512, 0)) == 512
    finally:
        os.close(fd)
    t1 = time.perf_counter()
    minor = re.search(r"(\d+)$", dev).group(1)
    return (t1 - t0) * 1e3, minor

def destroy(minor):
    t0 = time.perf_counter()
    tapctl("destroy", "-m", minor)
    return (time.perf_counter() - t0) * 1e3

def cycles(k):
    c, d = [], []
    for _ in range(k):
        ms, minor = create_usable(spare)
        c.append(ms)
        d.append(destroy(minor))
    return c, d

def log_mark():
    return os.path.getsize(log)

def phase_lines(start, op):
    with open(log) as f:
        f.seek(start)
        text = f.read()
    rows = []
    for line in text.splitlines():
        m = re.search(r"phases op=" + op + r"( .*)$", line)
        if m:
            rows.append({k: int(v) / 1000 for k, v in re.findall(r" (\w+)_us=(\d+)", m.group(1))})
    return rows

def phase_table(title, rows):
    if not rows:
        return
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
    print(f"{title} (median ms of {len(rows)}, largest first):")
    for k in sorted(keys, key=lambda k: -med[k]):
        if k != "total":
            print(f"  {k:24} {med[k]:8.2f}")
    if "total" in med:
        print(f"  {'total (in the broker)':24} {med['total']:8.2f}")

# Warm-up (lazily made broker state), then the before census.
cycles(3)
before = census()

print(f"control plane: fuse + loop, {n} disks attached, {samples} samples each, "
      f"spawn {os.environ.get('SPAWN') or 'vfork'}, "
      f"image opener {os.environ.get('OPENER') or 'on'}, "
      f"worker root {os.environ.get('ROOT_NS') or 'shared'}, "
      f"leaf opened {'after the worker' if os.environ.get('OPEN_AHEAD') == 'off' else 'while the worker starts'}, "
      f"state on {os.environ.get('STATE_ON') or 'tmpfs'}, "
      f"cgroups {os.environ.get('CGROUPS') or 'auto'}, "
      f"start weight {os.environ.get('START_WEIGHT') or 'on'}, "
      f"load average {loadavg()} at start")
t0 = time.perf_counter()
fill = []
for i in range(n):
    ms, _ = create_usable(f"{work}/images/d{i}.raw")
    fill.append(ms)
print(f"attached {n} disks in {time.perf_counter() - t0:.1f} s "
      f"(create->usable while filling: p50 {statistics.median(fill):.1f} ms, "
      f"first 10 {statistics.median(fill[:10]):.1f}, last 10 {statistics.median(fill[-10:]):.1f})")
devs = [l.split()[0] for l in tapctl("list").splitlines()]

mark = log_mark()
la_idle = loadavg()
idle_c, idle_d = cycles(samples)
idle_phases = phase_lines(mark, "create")
destroy_phases = phase_lines(mark, "destroy")
lists = []
for _ in range(samples):
    t = time.perf_counter()
    out = tapctl("list")
    lists.append((time.perf_counter() - t) * 1e3)
shown = len(out.splitlines())
assert shown == n, f"list shows {shown} disks, expected {n}"

# Load: fio on LOAD_JOBS attached disks, both CPUs busy.
minors = sorted(int(m.group(1)) for m in re.finditer(r"minor=(\d+)", out))[:load_jobs]
fios = [subprocess.Popen(["fio", "--name=load", f"--filename={work}/rt/dev/tapdev{m}",
                          "--ioengine=libaio", "--direct=1", "--rw=randrw", "--bs=4k",
                          "--iodepth=16", "--runtime=3600", "--time_based",
                          "--output=/dev/null"]) for m in minors]
time.sleep(2)  # fio at full speed before the samples start
la_before_load = loadavg()
mark = log_mark()
load_c, load_d = cycles(samples)
load_phases = phase_lines(mark, "create")
la_load = loadavg()
for p in fios:
    p.terminate()
for p in fios:
    p.wait()

t0 = time.perf_counter()
for line in tapctl("list").splitlines():
    destroy(re.search(r"minor=(\d+)", line).group(1))
teardown_s = time.perf_counter() - t0
time.sleep(1)  # the supervisor reaps the last workers
after = census()

print(f"\n{'(ms)':34} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
print(row(f"create->usable, idle (load {la_idle})", idle_c))
print(row("destroy, idle", idle_d))
print(row(f"list ({n} disks)", lists))
print(row(f"create->usable, fio load ({la_load})", load_c))
print(row("destroy, fio load", load_d))
print(f"destroying all {n}: {teardown_s:.1f} s")
print()
phase_table("create phases, idle", idle_phases)
phase_table("create phases, fio load", load_phases)
phase_table("destroy phases, idle", destroy_phases)
conf = phase_lines(0, "confine")
phase_table("worker confinement steps (all workers)", conf)
print()
ci, cl = statistics.median(idle_c), statistics.median(load_c)
targets = [
    ("create median <= 15 ms", ci <= 15, f"{ci:.1f}"),
    ("create p99 <= 40 ms", pct(idle_c, 99) <= 40, f"{pct(idle_c, 99):.1f}"),
    ("destroy median <= 10 ms", statistics.median(idle_d) <= 10, f"{statistics.median(idle_d):.1f}"),
    ("list <= 50 ms (p99)", pct(lists, 99) <= 50, f"{pct(lists, 99):.1f}"),
    ("create under load <= 3x idle median", cl <= 3 * ci, f"{cl / ci:.2f}x"),
]
for name, ok, got in targets:
    print(f"target {name:38} {'met' if ok else 'NOT met':8} ({got})")
print(f"\nleak census (before filling -> after destroying all):")
leaks = []
for k in before:
    grew = after[k] - before[k]
    # RSS is judged between later fills (below): the first peak leaves
    # memory with the allocator that the next fills reuse.
    bad = k != "rss_kib" and grew > 0
    leaks += [k] if bad else []
    print(f"  {k:16} {before[k]:8} -> {after[k]:8}{'   LEAK' if bad else ''}")
print("nothing left behind" if not leaks else f"LEFT BEHIND: {', '.join(leaks)}")
if fills < 2:
    print("(broker RSS after one fill includes what the allocator keeps: FILLS=3 tells a leak)")
# More fills tell a leak (grows every round) from memory the allocator
# kept after the first peak (grows once).
last = after
for r in range(2, fills + 1):
    for i in range(n):
        create_usable(f"{work}/images/d{i}.raw")
    for line in tapctl("list").splitlines():
        destroy(re.search(r"minor=(\d+)", line).group(1))
    time.sleep(1)
    c = census()
    print(f"after fill {r}: " + " ".join(f"{k}={c[k]}" for k in c))
    if r == fills:
        grew = c["rss_kib"] - last["rss_kib"]
        print(f"broker RSS over the last fill: {grew:+} KiB "
              f"({'a leak' if grew > 512 else 'no leak'}: the bound is the soak's 512 KiB)")
    last = c
EOF
