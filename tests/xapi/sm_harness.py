#!/usr/bin/env python3
"""XAPI's storage manager against tapjail: the tap-ctl calls SM makes, in
SM's orders, parsed by SM's rules (a port written for these tests of the
parsing in xapi-project/sm drivers/blktap2.py, class TapCtl; not SM's code).

Run by tests/tests/xapi_sm.rs against a real tap-broker (FUSE + loop) as
root. Environment:
  SM_TAPCTL         tap-ctl (TAPJAIL_SOCKET names the broker's socket)
  SM_DEVDIR         the broker's device_dir (blktap: /dev/xen/blktap-2)
  SM_IMAGES         an image root of the tenant root acts as
  SM_FOREIGN_MINOR  a minor another tenant serves read-only
  SM_MIRROR         a unix socket of an NBD server (16 MiB export) in a
                    directory the tenant's `mirror` key grants
  SM_MIRROR_DENIED  a unix socket of an NBD server it does not grant
Every failed expectation raises; the exit status is 0 only if all held.
"""

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

TAPCTL = os.environ["SM_TAPCTL"]
DEV_BASEDIR = os.environ["SM_DEVDIR"]
IMAGES = os.environ["SM_IMAGES"]
FOREIGN_MINOR = int(os.environ["SM_FOREIGN_MINOR"])
MIRROR = "nbd:" + os.environ["SM_MIRROR"]
MIRROR_DENIED = "nbd:" + os.environ["SM_MIRROR_DENIED"]
O_DIRECT = 0o40000


class CommandFailure(Exception):
    def __init__(self, cmd, **info):
        super().__init__(cmd, info)
        self.cmd = cmd
        self.info = info

    @property
    def status(self):
        return self.info.get("status", 0)

    @property
    def errmsg(self):
        return self.info.get("errmsg", "")

    def __str__(self):
        return "%s failed: %s" % (" ".join(self.cmd), self.info)


class TapCtl:
    """SM's TapCtl: one tap-ctl process per call, one stdout line read."""

    def __init__(self, cmd, p):
        self.cmd = cmd
        self._p = p

    @classmethod
    def _call(cls, args, input=None, text_mode=True):
        cmd = [TAPCTL] + [str(x) for x in args]
        log("$ tap-ctl " + " ".join(cmd[1:]))
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, close_fds=True,
                             universal_newlines=text_mode)
        if input:
            p.stdin.write(input)
            p.stdin.close()
        return cls(cmd, p)

    def _errmsg(self):
        err = self._p.stderr.read()
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        return "; ".join(line.rstrip() for line in err.splitlines())

    def _wait(self):
        status = self._p.wait()
        if status == 0:
            return
        info = {"errmsg": self._errmsg(), "pid": self._p.pid}
        if status < 0:
            info["signal"] = -status
        else:
            info["status"] = status
        raise CommandFailure(self.cmd, **info)

    @classmethod
    def _pread(cls, args, input=None, text_mode=True):
        tapctl = cls._call(args, input=input, text_mode=text_mode)
        output = tapctl._p.stdout.readline()
        if isinstance(output, bytes):
            output = output.decode()
        output = output.rstrip()
        tapctl._wait()
        return output

    @staticmethod
    def _maybe(opt, parm):
        return [opt, parm] if parm is not None else []

    @classmethod
    def list(cls, minor=None, pid=None, _type=None, path=None):
        args = ["list"]
        args += cls._maybe("-m", minor)
        args += cls._maybe("-p", pid)
        args += cls._maybe("-t", _type)
        args += cls._maybe("-f", path)
        tapctl = cls._call(args)
        rows = []
        for line in tapctl._p.stdout:
            row = {}
            for field in line.rstrip().split(" ", 3):
                bits = field.split("=")
                if len(bits) == 2:
                    key, val = bits
                    if key in ("pid", "minor"):
                        row[key] = int(val, 10)
                    elif key in ("state",):
                        row[key] = int(val, 0x10)
                    else:
                        row[key] = val
                else:
                    raise AssertionError("unexpected tap-ctl list output: %r" % field)
            rows.append(row)
        tapctl._wait()
        return rows

    @classmethod
    def allocate(cls, devpath=None):
        return cls._pread(["allocate"] + cls._maybe("-d", devpath))

    @classmethod
    def free(cls, minor):
        cls._pread(["free", "-m", minor])

    @classmethod
    def spawn(cls):
        return int(cls._pread(["spawn"]))

    @classmethod
    def attach(cls, pid, minor):
        cls._pread(["attach", "-p", pid, "-m", minor])

    @classmethod
    def detach(cls, pid, minor):
        cls._pread(["detach", "-p", pid, "-m", minor])

    @classmethod
    def open(cls, pid, minor, _type, _file, options):
        args = ["open", "-p", pid, "-m", minor, "-a", "%s:%s" % (_type, _file)]
        text_mode = True
        input = None
        if options.get("rdonly"):
            args.append("-R")
        if options.get("lcache"):
            args.append("-r")
        if options.get("existing_prt") is not None:
            args.append("-e")
            args.append(str(options["existing_prt"]))
        if options.get("secondary"):
            args.append("-2")
            args.append(options["secondary"])
        if options.get("standby"):
            args.append("-s")
        if options.get("timeout"):
            args.append("-t")
            args.append(str(options["timeout"]))
        if not options.get("o_direct", True):
            args.append("-D")
        if options.get("cbtlog"):
            args.extend(["-C", options["cbtlog"]])
        if options.get("key_hash"):
            input = options["key"]
            text_mode = False
            args.append("-E")
        cls._pread(args, input=input, text_mode=text_mode)

    @classmethod
    def close(cls, pid, minor, force=False):
        args = ["close", "-p", pid, "-m", minor, "-t", "120"]
        if force:
            args += ["-f"]
        cls._pread(args)

    @classmethod
    def pause(cls, pid, minor):
        cls._pread(["pause", "-p", pid, "-m", minor])

    @classmethod
    def unpause(cls, pid, minor, _type=None, _file=None, mirror=None, cbtlog=None):
        args = ["unpause", "-p", pid, "-m", minor]
        if mirror:
            args.extend(["-2", mirror])
        if _type and _file:
            args += ["-a", "%s:%s" % (_type, _file)]
        if cbtlog:
            args.extend(["-c", cbtlog])
        cls._pread(args)

    @classmethod
    def stats(cls, pid, minor):
        return cls._pread(["stats", "-p", pid, "-m", minor])

    @classmethod
    def major(cls):
        return int(cls._pread(["major"]))


PAUSED = 0x20


class Tapdisk:
    """SM's Tapdisk: rows with every field, and the launch order."""

    def __init__(self, pid, minor, _type, path, state):
        self.pid, self.minor, self.type, self.path, self.state = pid, minor, _type, path, state

    @classmethod
    def list(cls, **args):
        out = []
        for row in TapCtl.list(**args):
            a = {"pid": None, "minor": None, "state": None, "_type": None, "path": None}
            for key, val in row.items():
                if key in a:
                    a[key] = val
            if "args" in row:
                _type, path = row["args"].split(":", 1)
                assert _type in ("aio", "vhd"), row
                a["_type"], a["path"] = _type, path
            if None in a.values():
                continue
            out.append(Tapdisk(**a))
        return out

    @classmethod
    def find(cls, **args):
        found = cls.list(**args)
        assert len(found) <= 1, "not unique: %r" % [vars(t) for t in found]
        return found[0] if found else None

    @classmethod
    def find_by_path(cls, path):
        """SM's Tapdisk.find_by_path: `list -f PATH`, one row or none."""
        return cls.find(path=path)

    @classmethod
    def from_minor(cls, minor):
        t = cls.find(minor=minor)
        if t is None:
            raise AssertionError("no such tapdisk (minor=%d)" % minor)
        return t

    @classmethod
    def launch_on_tap(cls, minor, path, _type, options):
        assert cls.find(path=path) is None, "%s already running" % path
        pid = TapCtl.spawn()
        try:
            TapCtl.attach(pid, minor)
            try:
                TapCtl.open(pid, minor, _type, path, options)
                try:
                    return cls.from_minor(minor)
                except BaseException:
                    TapCtl.close(pid, minor)
                    raise
            except BaseException:
                TapCtl.detach(pid, minor)
                raise
        except BaseException:
            try:
                os.kill(pid, signal.SIGTERM)  # SM's TapCtl.shutdown
                os.waitpid(pid, 0)
            except OSError:
                pass
            raise

    def shutdown(self, force=False):
        TapCtl.close(self.pid, self.minor, force)
        TapCtl.detach(self.pid, self.minor)
        TapCtl.free(self.minor)

    def devpath(self):
        return "%s/tapdev%d" % (DEV_BASEDIR, self.minor)


def parse_minor(devpath):
    m = re.search(r"%s/tapdev(\d+)$" % re.escape(DEV_BASEDIR), devpath)
    if not m:
        raise AssertionError("malformed tap device: %r" % devpath)
    return int(m.group(1))


def activate(path, _type, options):
    """SM's VDI._tap_activate: allocate, launch, free on failure."""
    minor = parse_minor(TapCtl.allocate())
    try:
        return Tapdisk.launch_on_tap(minor, path, _type, options)
    except BaseException:
        TapCtl.free(minor)
        raise


def setup_cache(gold, vdi, cache_dir, scratch_mode):
    """SM's VDI._setup_cache (drivers/blktap2.py): the read cache of the
    VDI's parent (gold) and the VM's local leaf, a child of that cache,
    opened with the VDI itself as secondary: `-r -e A -2 vhd:VDI`, or in
    scratch mode `-e A -2 vhd:VDI -s`."""
    read_cache_path = os.path.join(cache_dir, os.path.basename(gold) + "cache")
    if not os.path.exists(read_cache_path):
        vhd("snapshot", "-n", read_cache_path, "-p", gold)
    local_leaf_path = os.path.join(cache_dir, os.path.basename(vdi) + "cache")
    if os.path.exists(local_leaf_path):
        os.unlink(local_leaf_path)
    vhd("snapshot", "-n", local_leaf_path, "-p", read_cache_path)
    prt_tapdisk = Tapdisk.find_by_path(read_cache_path)
    if not prt_tapdisk:
        prt_tapdisk = activate(read_cache_path, "vhd", {"rdonly": False, "lcache": True})
    secondary = "vhd:%s" % vdi
    leaf_tapdisk = Tapdisk.find_by_path(local_leaf_path)
    if not leaf_tapdisk:
        leaf_tapdisk = activate(local_leaf_path, "vhd", {
            "rdonly": False,
            "lcache": not scratch_mode,
            "existing_prt": prt_tapdisk.minor,
            "secondary": secondary,
            "standby": scratch_mode,
        })
    return prt_tapdisk, leaf_tapdisk, read_cache_path, local_leaf_path


def vhd_read(path, offset, n):
    return subprocess.run([TAPCTL, "vhd", "read", "-q", "-n", path, "-o", str(offset), "-l", str(n)],
                          check=True, stdout=subprocess.PIPE).stdout


def list_json(minor):
    """The one `tap-ctl list --json -m MINOR` row."""
    rows = json.loads(subprocess.check_output([TAPCTL, "list", "--json", "-m", str(minor)]))
    assert len(rows) == 1, rows
    return rows[0]


def log(msg):
    print(msg, flush=True)


CBT_BLOCK = 64 * 1024


def cbt_create(path, size):
    """cbt-util create, from blktap's cbt-util.h: struct cbt_log_metadata
    (parent, child UUIDs, int consistent, u64 size; x86 layout) + bitmap."""
    bitmap = (size + CBT_BLOCK - 1) // CBT_BLOCK
    with open(path, "wb") as f:
        f.write(struct.pack("<16s16si4xQ", b"\0" * 16, b"\0" * 16, 0, size))
        f.write(b"\0" * ((bitmap + 7) // 8))


def cbt_dirty(path):
    """The blocks a CBT log marks (bit n % 8 of byte n / 8)."""
    with open(path, "rb") as f:
        data = f.read()
    _, _, consistent, size = struct.unpack("<16s16si4xQ", data[:48])
    bits = data[48:]
    return [n for n in range((size + CBT_BLOCK - 1) // CBT_BLOCK) if bits[n // 8] >> (n % 8) & 1]


def dev_size(t):
    fd = os.open(t.devpath(), os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def write_dev(t, offset, data):
    fd = os.open(t.devpath(), os.O_WRONLY | os.O_DSYNC)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def vhd(*args):
    subprocess.run([TAPCTL, "vhd"] + list(args), check=True, stdout=subprocess.DEVNULL)


PATTERN = bytes((i * 7 + 3) % 251 for i in range(1 << 20))


def read_dev(t, n=len(PATTERN)):
    with open(t.devpath(), "rb", buffering=0) as f:
        return f.read(n)


def image_fd_flags(pid, path):
    """fdinfo flags of every fd `pid` holds on `path` (same inode)."""
    want = os.stat(path)
    flags = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            st = os.stat("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino):
            continue
        with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
            for line in f:
                if line.startswith("flags:"):
                    flags.append(int(line.split()[1], 8))
    assert flags, "tapdisk %d holds no fd on %s" % (pid, path)
    return flags


def expect_failure(what, status, words, fn):
    try:
        fn()
    except CommandFailure as e:
        assert e.status == status, "%s: status %d, want %d (%s)" % (what, e.status, status, e.errmsg)
        for w in words:
            assert w in e.errmsg, "%s: %r does not say %r" % (what, e.errmsg, w)
        log("  refused as expected: status %d: %s" % (e.status, e.errmsg))
        return e
    raise AssertionError("%s succeeded" % what)


def main():
    gold = os.path.join(IMAGES, "gold.vhd")
    vhd("create", "-n", gold, "-s", "16")

    # Attach the gold image writable, plain options: fill it through the
    # device, then detach as SM does.
    t = activate(gold, "vhd", {})
    assert (t.type, t.path, t.state) == ("vhd", gold, 0), vars(t)
    with open(t.devpath(), "r+b", buffering=0) as f:
        f.write(PATTERN)
        os.fsync(f.fileno())
    st = json.loads(TapCtl.stats(t.pid, t.minor))
    assert st["name"] == "vhd:" + gold and st["images"][0]["name"] == gold, st
    assert st["images"][0]["hits"][1] > 0, st
    major = TapCtl.major()
    assert major == os.major(os.stat(t.devpath()).st_rdev), (major, t.devpath())
    t.shutdown()
    assert Tapdisk.find(path=gold) is None

    # The gold master read-only, bounded open (-R -t 30).
    g = activate(gold, "vhd", {"rdonly": True, "timeout": 30})
    assert read_dev(g) == PATTERN

    # Two clones sharing the gold's open chain (-e): one also without
    # O_DIRECT (-D), one with it.
    clones = []
    for name, o_direct in (("clone1.vhd", False), ("clone2.vhd", True)):
        path = os.path.join(IMAGES, name)
        vhd("snapshot", "-n", path, "-p", gold)
        c = activate(path, "vhd", {"existing_prt": g.minor, "o_direct": o_direct, "timeout": 30})
        assert read_dev(c) == PATTERN, name
        leaf_direct = all(f & O_DIRECT for f in image_fd_flags(c.pid, path))
        assert leaf_direct == o_direct, (name, image_fd_flags(c.pid, path))
        parent = image_fd_flags(c.pid, gold)
        assert not any(f & O_DIRECT for f in parent), "shared parent must be buffered: %r" % parent
        clones.append((c, path))

    # open -C: a VDI with CBT enabled; its writes are marked in the log.
    cbt_vdi = os.path.join(IMAGES, "cbt.vhd")
    vhd("create", "-n", cbt_vdi, "-s", "16")
    cbt_log = os.path.join(IMAGES, "cbt.cbtlog")
    cbt_create(cbt_log, 16 << 20)
    ct = activate(cbt_vdi, "vhd", {"cbtlog": cbt_log, "timeout": 30})
    write_dev(ct, 0, PATTERN[:4096])
    write_dev(ct, 3 * CBT_BLOCK + 512, PATTERN[:2 * CBT_BLOCK])
    assert cbt_dirty(cbt_log) == [0, 3, 4, 5], cbt_dirty(cbt_log)
    ct.shutdown()

    # An encrypted VDI: SM pipes the key to `open -E` on stdin (the bytes
    # of SM_KEY, which the Rust side greps every log for afterwards).
    key = bytes((i * 13 + 5) % 256 for i in range(64))
    keyfile = os.path.join(IMAGES, "enc.key")
    with open(keyfile, "wb") as f:
        f.write(key)
    enc = os.path.join(IMAGES, "enc.vhd")
    vhd("create", "-n", enc, "-s", "16")
    vhd("key", "-s", "-n", enc, "-k", keyfile)
    os.unlink(keyfile)
    e = activate(enc, "vhd", {"key_hash": "ab" * 32, "key": key, "timeout": 30})
    with open(e.devpath(), "r+b", buffering=0) as f:
        f.write(PATTERN)
        os.fsync(f.fileno())
    e.shutdown()
    with open(enc, "rb") as f:
        assert PATTERN[:4096] not in f.read(), "plaintext in the encrypted image"
    e = activate(enc, "vhd", {"key_hash": "ab" * 32, "key": key})
    assert read_dev(e) == PATTERN, "encrypted VDI reads back differently"
    e.shutdown()
    expect_failure("open -E with a wrong key", 1, ["does not match"],
                   lambda: activate(enc, "vhd", {"key_hash": "ab" * 32, "key": bytes(64)}))
    expect_failure("open of an encrypted VDI without -E", 1, ["encrypted", "-E"],
                   lambda: activate(enc, "vhd", {}))
    plain = os.path.join(IMAGES, "plain.vhd")
    vhd("create", "-n", plain, "-s", "16")
    expect_failure("open -E of a plain VDI", 1, ["no keyhash"],
                   lambda: activate(plain, "vhd", {"key_hash": "ab" * 32, "key": key}))

    # IntelliCache as SM's _setup_cache sets it up: a local read cache of
    # the gold image (PARENT.vhdcache, `vhd-util snapshot` of it) in the
    # SR's cache directory, opened with -r and writable (lcache, rdonly
    # False). Reads fill it; a second attach reads it all from the cache.
    cache_dir = os.path.join(IMAGES, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    rc_path = os.path.join(cache_dir, "gold.vhdcache")
    vhd("snapshot", "-n", rc_path, "-p", gold)
    for attach in (1, 2):
        rc = activate(rc_path, "vhd", {"lcache": True, "rdonly": False, "timeout": 30})
        assert read_dev(rc) == PATTERN, "read cache attach %d" % attach
        st = json.loads(TapCtl.stats(rc.pid, rc.minor))
        assert st["images"][0]["name"] == rc_path and st["images"][1]["name"] == gold, st
        cache = st["read_cache"]
        if attach == 1:
            # (a readahead past the pattern may still be in flight)
            assert cache["misses"] >= len(PATTERN) // 512 <= cache["filled"], st
        else:
            assert cache["misses"] == 0 and cache["hits"] >= len(PATTERN) // 512, st
        try:
            write_dev(rc, 0, b"x" * 512)
            raise AssertionError("a write to a read cache's device succeeded")
        except OSError as e:
            assert e.errno in (errno.EPERM, errno.EROFS), e
        if attach == 1:
            # SM's next step: the VM's local leaf, a child of the cache,
            # opened with -e on the cache minor; its parent reads go
            # through the cache (filled above), none to the gold.
            local_leaf = os.path.join(IMAGES, "local-leaf.vhd")
            vhd("snapshot", "-n", local_leaf, "-p", rc_path)
            leaf = activate(local_leaf, "vhd", {"existing_prt": rc.minor, "timeout": 30})
            assert read_dev(leaf) == PATTERN, "the leaf reads through the cache"
            st = json.loads(TapCtl.stats(leaf.pid, leaf.minor))
            assert st["images"][1]["name"] == rc_path, st
            assert st["images"][1]["hits"][0] >= len(PATTERN) // 512, st
            assert st["images"][2]["hits"][0] == 0, st
            leaf.shutdown()
        rc.shutdown()
    outside = os.path.join(IMAGES, "outside.vhdcache")
    vhd("snapshot", "-n", outside, "-p", gold)
    expect_failure("open -r outside the read_cache_root", 1, ["read_cache_root"],
                   lambda: activate(outside, "vhd", {"lcache": True}))

    # IntelliCache's leaf call exactly as SM's _setup_cache makes it. The
    # VM's VDI on the shared SR is a child of gold; in normal mode it holds
    # an earlier 4 KiB write (a scratch VM's VDI is reset, so empty). The
    # local leaf is a child of gold's cache.
    for scratch_mode in (False, True):
        earlier = bytes(4096) if scratch_mode else PATTERN[:4096][::-1]
        vdi = os.path.join(IMAGES, "vm-scratch.vhd" if scratch_mode else "vm.vhd")
        vhd("snapshot", "-n", vdi, "-p", gold)
        if not scratch_mode:
            subprocess.run([TAPCTL, "vhd", "write", "-n", vdi, "-o", str(2 << 20)],
                           input=earlier, check=True, stdout=subprocess.DEVNULL)
        prt, leaf, rc_file, leaf_file = setup_cache(gold, vdi, cache_dir, scratch_mode)
        assert Tapdisk.find_by_path(leaf_file).minor == leaf.minor
        mode = "standby" if scratch_mode else "mirror"
        st = json.loads(TapCtl.stats(leaf.pid, leaf.minor))
        m = st["mirror"]
        assert (m["uri"], m["mode"]) == ("vhd:" + vdi, mode), st
        assert m["state"] == ("standby" if scratch_mode else "mirroring"), st
        assert st["nbd_mirror_failed"] == 0, st
        assert read_dev(leaf) == PATTERN, "gold through the cache"
        with open(leaf.devpath(), "rb", buffering=0) as f:
            f.seek(2 << 20)
            # Mirror mode reads the VDI below the leaf.
            assert f.read(4096) == earlier, mode
        jm = list_json(leaf.minor)["mirror"]
        assert (jm["uri"], jm["mode"]) == ("vhd:" + vdi, mode), jm
        guest = PATTERN[:8192][::-1]
        write_dev(leaf, 4 << 20, guest)
        rc_before = open(rc_file, "rb").read()
        leaf.shutdown()
        # SM's teardown: the leaf first, then the cache minor.
        Tapdisk.from_minor(prt.minor).shutdown()
        assert open(rc_file, "rb").read() == rc_before, "the leaf never writes the cache"
        # The VDI has the guest's write in mirror mode, nothing new in
        # scratch (standby) mode, and its earlier write either way.
        assert vhd_read(vdi, 4 << 20, 8192) == (bytes(8192) if scratch_mode else guest), mode
        assert vhd_read(vdi, 2 << 20, 4096) == earlier
        vhd("check", "-n", vdi)
        log("  IntelliCache leaf call (%s mode) behaved as blktap's" % mode)
    assert all(r.get("args", "").find(".vhdcache") < 0 for r in TapCtl.list()), TapCtl.list()

    # Error paths, each backed out as SM backs out: detach, kill, free.
    minor_before = parse_minor(TapCtl.allocate())
    TapCtl.free(minor_before)
    extra = os.path.join(IMAGES, "extra.vhd")
    vhd("snapshot", "-n", extra, "-p", gold)
    assert TapCtl.list(minor=minor_before) == []
    for opts in ({"secondary": MIRROR_DENIED}, {"secondary": MIRROR_DENIED, "standby": True}):
        expect_failure("open -2 of a secondary the policy does not grant", 1,
                       ["may not mirror", MIRROR_DENIED], lambda: activate(extra, "vhd", opts))
    assert TapCtl.list(minor=minor_before) == []

    other = os.path.join(IMAGES, "other.vhd")
    vhd("create", "-n", other, "-s", "16")
    not_a_clone = os.path.join(IMAGES, "not-a-clone.vhd")
    vhd("snapshot", "-n", not_a_clone, "-p", other)
    expect_failure("open -e of an image whose parent is not the shared leaf", 1,
                   ["is not the file minor %d serves" % g.minor],
                   lambda: activate(not_a_clone, "vhd", {"existing_prt": g.minor}))
    failing = [
        ({"existing_prt": FOREIGN_MINOR}, 1, ["does not belong"]),
        ({"existing_prt": clones[0][0].minor}, 1, ["writable"]),
        ({"existing_prt": 16383}, 1, ["not allocated"]),
    ]
    for opts, status, words in failing:
        expect_failure("open %r" % opts, status, words, lambda: activate(extra, "vhd", opts))
    expect_failure("open of a missing image", 1, ["missing.vhd"],
                   lambda: activate(os.path.join(IMAGES, "missing.vhd"), "vhd", {}))
    # Nothing of the failed attaches is left: every row is one of ours (or
    # the other tenant's, which root, an admin, lists too).
    rows = TapCtl.list()
    ours = {g.minor, FOREIGN_MINOR} | {c.minor for c, _ in clones}
    assert {r.get("minor") for r in rows} == ours, rows
    assert all("pid" in r and "args" in r for r in rows), rows

    # Pause, snapshot the leaf as SM does, unpause on the new leaf. The
    # flags not built are refused while paused and leave it paused.
    c, path = clones[0]
    TapCtl.pause(c.pid, c.minor)
    assert Tapdisk.from_minor(c.minor).state & PAUSED
    new_leaf = os.path.join(IMAGES, "clone1-2.vhd")
    vhd("snapshot", "-n", new_leaf, "-p", path)
    expect_failure("unpause -2 of a malformed URI", 1, ["nbd:/path/to/socket"],
                   lambda: TapCtl.unpause(c.pid, c.minor, "vhd", new_leaf, mirror="nbd:x"))
    assert Tapdisk.from_minor(c.minor).state & PAUSED
    # unpause -c: XAPI enables CBT on a running VDI with a log cbt-util made.
    cbtlog = os.path.join(IMAGES, "clone1.cbtlog")
    cbt_create(cbtlog, dev_size(c))
    TapCtl.unpause(c.pid, c.minor, "vhd", new_leaf, cbtlog=cbtlog)
    t = Tapdisk.from_minor(c.minor)
    assert (t.path, t.state) == (new_leaf, 0), vars(t)
    assert read_dev(t) == PATTERN
    assert cbt_dirty(cbtlog) == [], "a fresh log marks nothing"
    write_dev(t, 10 * CBT_BLOCK, PATTERN[:4096])
    assert cbt_dirty(cbtlog) == [10], cbt_dirty(cbtlog)
    assert not any(f & O_DIRECT for f in image_fd_flags(t.pid, new_leaf)), "-D kept over unpause"

    # Storage migration as XAPI drives it through SM: pause, unpause -2
    # (mirror every write to the destination's NBD server), poll stats
    # for nbd_mirror_failed while the data goes over, then pause and
    # unpause -2 again to serve from the destination.
    c2, path2 = clones[1]
    TapCtl.pause(c2.pid, c2.minor)
    TapCtl.unpause(c2.pid, c2.minor, "vhd", path2, mirror=MIRROR)
    with open(Tapdisk.from_minor(c2.minor).devpath(), "r+b", buffering=0) as f:
        f.seek(1 << 20)
        f.write(PATTERN[:4096][::-1])
        os.fsync(f.fileno())
    deadline = time.monotonic() + 120
    while True:
        st = json.loads(TapCtl.stats(c2.pid, c2.minor))
        assert st["nbd_mirror_failed"] == 0, st
        if st["mirror"]["state"] == "synced":
            break
        assert time.monotonic() < deadline, "mirror never in sync: %r" % st
        time.sleep(0.1)
    # `list --json` shows the mirror too (SM's key=value rows, parsed
    # strictly above by Tapdisk.from_minor, stay blktap's four fields).
    m = list_json(c2.minor)["mirror"]
    assert (m["uri"], m["mode"], m["state"]) == (MIRROR, "mirror", "synced"), m
    assert m["copied"] == m["total"] == dev_size(c2), (m, dev_size(c2))
    assert list_json(clones[0][0].minor)["mirror"] is None
    TapCtl.pause(c2.pid, c2.minor)
    TapCtl.unpause(c2.pid, c2.minor, "vhd", path2, mirror=MIRROR)
    t2 = Tapdisk.from_minor(c2.minor)
    assert t2.state == 0, vars(t2)
    assert list_json(c2.minor)["mirror"] is None, "the switch ends the mirror"
    st = json.loads(TapCtl.stats(t2.pid, t2.minor))
    assert st["images"][0]["name"] == MIRROR and st["images"][0]["driver"]["name"] == "nbd", st
    assert read_dev(t2, 1 << 20) == PATTERN[:1 << 20]
    with open(t2.devpath(), "rb", buffering=0) as f:
        f.seek(1 << 20)
        assert f.read(4096) == PATTERN[:4096][::-1]

    # allocate -d: our form and blktap's.
    m = parse_minor(TapCtl.allocate(DEV_BASEDIR + "/tapdev77"))
    assert m == 77
    assert parse_minor(TapCtl.allocate("/dev/xen/blktap-2/tapdev78")) == 78
    expect_failure("allocate -d /dev/sda", 1, ["/dev/sda"], lambda: TapCtl.allocate("/dev/sda"))
    expect_failure("allocate -d of a held minor", 1, ["77"],
                   lambda: TapCtl.allocate(DEV_BASEDIR + "/tapdev77"))
    TapCtl.free(77)
    TapCtl.free(78)

    # Detach everything as SM does: close -t 120, detach, free.
    for c, _ in clones:
        Tapdisk.from_minor(c.minor).shutdown()
    g.shutdown()
    assert [r["minor"] for r in TapCtl.list()] == [FOREIGN_MINOR], TapCtl.list()
    log("SM harness: all calls behaved as SM expects")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line for the Rust test's message
        log("SM harness FAILED: %s: %s" % (type(e).__name__, e))
        raise
