# Shared by the benches that compare two tapjail disks in one run
# (mirror.sh, crypt.sh, read-cache.sh): checks, the build, a one-tenant
# policy, the broker, SM's attach sequence, fio figures, and the
# alternating A/B comparison with medians and their ratio. Sourced, never
# run; the caller sets ROOT (the repository) before sourcing.

die() { echo "bench: $*" >&2; exit 2; }

# need TOOL... -- as root, with every TOOL installed (the message names
# the Debian packages to install).
need() {
    [ "$(id -u)" = 0 ] || die "run as root (loop devices, FUSE mounts)"
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null ||
            die "$tool not installed (apt-get install fio qemu-utils python3 e2fsprogs)"
    done
}

# bench_build PROFILE -- build every binary and set BIN to their directory.
bench_build() {
    local profile=(--release)
    [ "$1" = release ] || profile=()
    cargo build --quiet "${profile[@]}" --workspace --bins --manifest-path "$ROOT/Cargo.toml"
    BIN=$ROOT/target/$1
}

# bench_policy WORK UID_LO UID_HI MAX_DISKS ROOT... -- write WORK/policy.toml
# (FUSE frontend, one writable admin tenant "bench" for uid 0 with the
# image roots ROOT...) and set CTL. Callers append tenant keys with >>.
bench_policy() {
    local work=$1 lo=$2 hi=$3 max=$4 roots
    shift 4
    roots=$(printf '"%s", ' "$@")
    cat >"$work/policy.toml" <<EOT
socket = "$work/run/broker.sock"
audit_log = "$work/log/audit.jsonl"
state_dir = "$work/state"
device_dir = "$work/dev"
worker_uids = [$lo, $hi]
tapdisk = "$BIN/tapdisk"
frontend = "fuse"

[[tenant]]
name = "bench"
uids = [0]
image_roots = [${roots%, }]
writable = true
max_disks = $max
admin = true
EOT
    CTL="$BIN/tap-ctl --socket $work/run/broker.sock"
}

# bench_broker WORK -- start tap-broker on WORK/policy.toml (log in
# WORK/broker.log), set BROKER_PID, and wait until it answers.
bench_broker() {
    "$BIN/tap-broker" --config "$1/policy.toml" >"$1/broker.log" 2>&1 &
    BROKER_PID=$!
    for _ in $(seq 100); do $CTL list >/dev/null 2>&1 && return; sleep 0.1; done
    cat "$1/broker.log" >&2
    die "tap-broker did not answer"
}

# attach TYPE:IMAGE [OPEN FLAGS...] -- SM's sequence (allocate, spawn,
# attach, open); prints the device path. stdin goes to `open` (-E's key).
attach() {
    local img=$1 dev minor pid
    shift
    dev=$($CTL allocate)
    minor=${dev##*tapdev}
    pid=$($CTL spawn)
    $CTL attach -p "$pid" -m "$minor" >/dev/null
    $CTL open -p "$pid" -m "$minor" -a "$img" "$@" >/dev/null ||
        { cat "$WORK/broker.log" >&2; die "open $img failed"; }
    echo "$dev"
}

# fio_job JOB DEV -- one fio run of RUNTIME seconds (libaio, O_DIRECT);
# prints IOPS for the 4 KiB jobs, MB/s for the 1 MiB ones.
#   rr4k rw4k: random read/write, 4 KiB, depth 32 (rr4k16: depth 16)
#   sr1m sw1m: sequential read/write, 1 MiB, depth 8
fio_job() {
    local job=$1 dev=$2 rw bs depth key out
    case $job in
        rr4k) rw=randread bs=4k depth=32 key=read ;;
        rr4k16) rw=randread bs=4k depth=16 key=read ;;
        rw4k) rw=randwrite bs=4k depth=32 key=write ;;
        sr1m) rw=read bs=1M depth=8 key=read ;;
        sw1m) rw=write bs=1M depth=8 key=write ;;
        *) die "fio_job: unknown job $job" ;;
    esac
    out=$(fio --name=b --filename="$dev" --ioengine=libaio --direct=1 --rw=$rw --bs=$bs \
        --iodepth=$depth --time_based --runtime="$RUNTIME" --output-format=json)
    case $bs in
        4k) python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0][sys.argv[1]]["iops"])' $key <<<"$out" ;;
        *) python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["jobs"][0][sys.argv[1]]["bw_bytes"]/1e6))' $key <<<"$out" ;;
    esac
}

median() { python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.argv[1:]]; print("%s (%s-%s)" % (s.median(v), min(v), max(v)))' "$@"; }
ratio() { python3 -c 'import sys,statistics as s; a=[float(x) for x in sys.argv[2:2+int(sys.argv[1])]]; b=[float(x) for x in sys.argv[2+int(sys.argv[1]):]]; print("%.2f" % (s.median(b)/s.median(a)))' "$@"; }

# compare LABEL UNIT NAME_A DEV_A NAME_B DEV_B RATIO_NAME RUN [ARG...] --
# REPEAT rounds of `RUN DEV ARG...`, the two disks taking turns (a b,
# b a, ...) so that drift on this shared machine falls on both; prints
# each side's median and spread and the ratio b/a of the medians.
compare() {
    local label=$1 unit=$2 na=$3 da=$4 nb=$5 db=$6 rname=$7 i
    shift 7
    local a=() b=()
    for i in $(seq "$REPEAT"); do
        if [ $((i % 2)) = 1 ]; then a+=("$("$@" "$da")"); b+=("$("$@" "$db")");
        else b+=("$("$@" "$db")"); a+=("$("$@" "$da")"); fi
    done
    echo "$label ($unit): $na $(median "${a[@]}")  $nb $(median "${b[@]}")  $rname $(ratio "${#a[@]}" "${a[@]}" "${b[@]}")"
}
