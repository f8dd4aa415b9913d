//! The NBD frontend against real clients (qemu-io, qemu-img) and against a
//! hand-rolled client for exact error codes and hostile input. Every test
//! runs its own standalone `tapdisk --nbd` on an image in a fresh temp dir.

mod support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use support::*;

const MIB: usize = 1 << 20;

#[test]
fn qemu_io_writes_and_reads_back_through_the_export() {
    if !require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 16 * MIB, 0);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let (ok, out) = qemu_io(
        &srv.url(),
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4095k 2k", // crosses 4 KiB boundaries, unaligned to them
            "flush",
            "read -P 0xab 0 1M",
            "read -P 0xcd 4095k 2k",
            "read -P 0 8M 1M",
        ],
    );
    assert!(ok, "{out}\n{}", srv.log());
    drop(srv);
    // The data reached the file itself.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[..MIB].iter().all(|&b| b == 0xab));
    assert!(bytes[4095 * 1024..4097 * 1024].iter().all(|&b| b == 0xcd));
}

#[test]
fn discard_and_write_zeroes_then_read_gives_zeroes() {
    if !require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 8 * MIB, 0x5a);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let (ok, out) = qemu_io(
        &srv.url(),
        &[
            "discard 1M 1M",
            "read -P 0 1M 1M",
            "write -z 4M 64k",
            "read -P 0 4M 64k",
            "read -P 0x5a 0 1M",
            "read -P 0x5a 2M 2M",
        ],
    );
    assert!(ok, "{out}\n{}", srv.log());
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 4 * MIB, 7);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &["-R"]);
    let mut c = Client::connect(&srv.socket, false, false);
    assert_ne!(c.flags & 2, 0, "READ_ONLY transmission flag");
    c.request(CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]);
    let r = c.read_reply(0).unwrap();
    assert_eq!((r.handle, r.error), (1, 1), "EPERM");
    c.request(CMD_TRIM, 0, 2, 0, 4096, &[]);
    assert_eq!(c.read_reply(0).unwrap().error, 1);
    // The connection is still usable and the data unchanged.
    c.request(CMD_READ, 0, 3, 0, 512, &[]);
    let r = c.read_reply(512).unwrap();
    assert_eq!(r.error, 0);
    assert!(r.data.iter().all(|&b| b == 7));
    if require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        let (ok, _) = qemu_io(&srv.url(), &["write -P 1 0 4k"]);
        assert!(!ok, "qemu-io must not be able to write a read-only export");
    }
    drop(srv);
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 7));
}

#[test]
fn several_concurrent_clients_each_see_their_own_writes() {
    if !require(
        have("qemu-io"),
        "qemu-io is not installed (apt install qemu-utils)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 16 * MIB, 0);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let url = srv.url();
    // Four at once, or as many as the server's memory budget admits (the
    // server refuses more, by design; 8 MiB of RLIMIT_MEMLOCK in a debug
    // build is at the edge of four).
    let n = u8::try_from(srv.max_clients().min(4)).unwrap();
    assert!(n >= 2, "the server takes {n} client(s) at once");
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let pat = format!("0x{:02x}", 0x10 + i);
                let off = format!("{}M", 2 * usize::from(i));
                let write = format!("aio_write -P {pat} {off} 2M");
                let read = format!("read -P {pat} {off} 2M");
                // Several requests in flight per connection (aio_write), and
                // up to four connections at once.
                qemu_io(&url, &[&write, "aio_flush", &read])
            })
        })
        .collect();
    for c in clients {
        let (ok, out) = c.join().unwrap();
        assert!(ok, "{out}");
    }
    let bytes = std::fs::read(&img).unwrap();
    for i in 0..usize::from(n) {
        let range = &bytes[2 * i * MIB..(2 * i + 2) * MIB];
        assert!(range.iter().all(|&b| b == 0x10 + i as u8), "client {i}");
    }
}

#[test]
fn structured_reads_and_block_status_follow_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 2 * MIB, 3);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let mut c = Client::connect(&srv.socket, true, true);
    assert_eq!(c.size, 2 * MIB as u64);
    // Several requests in flight on one connection; replies may come in
    // any order, matched by handle.
    for h in 0..8u64 {
        c.request(CMD_READ, 0, 100 + h, h * 4096, 4096, &[]);
    }
    let mut seen = Vec::new();
    for _ in 0..8 {
        let r = c.read_reply(0).unwrap();
        assert_eq!(r.error, 0);
        assert_eq!(r.data.len(), 4096);
        assert!(r.data.iter().all(|&b| b == 3));
        seen.push(r.handle);
    }
    seen.sort();
    assert_eq!(seen, (100..108).collect::<Vec<_>>());
    // A read past the end is an error chunk (EINVAL), not a hang-up.
    c.request(CMD_READ, 0, 9, 2 * MIB as u64, 512, &[]);
    let r = c.read_reply(0).unwrap();
    assert_eq!(r.error, 22);
    c.request(CMD_BLOCK_STATUS, 0, 10, 0, MIB as u32, &[]);
    let r = c.read_reply(0).unwrap();
    assert_eq!(r.error, 0);
    let (kind, payload) = &r.chunks[0];
    assert_eq!(*kind, 5, "BLOCK_STATUS chunk");
    assert_eq!(&payload[..4], &1u32.to_be_bytes(), "base:allocation id");
    let len = u32::from_be_bytes(payload[4..8].try_into().unwrap());
    assert!(len > 0 && len <= MIB as u32);
    c.request(CMD_FLUSH, 0, 11, 0, 0, &[]);
    assert_eq!(c.read_reply(0).unwrap().error, 0);
    c.request(CMD_DISC, 0, 12, 0, 0, &[]);
    assert!(closed_by_server(&mut c.s));
}

/// Connect and send `bytes` raw; return the stream.
fn raw_connect(srv: &Standalone, bytes: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(&srv.socket).unwrap();
    let _ = s.write_all(bytes);
    s
}

#[test]
fn hostile_clients_are_dropped_while_a_good_client_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 4 * MIB, 9);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let mut good = Client::connect(&srv.socket, true, false);
    let mut check_good = |h: u64| {
        good.request(CMD_READ, 0, h, 0, 4096, &[]);
        let r = good.read_reply(0).unwrap();
        assert_eq!((r.handle, r.error), (h, 0));
        assert!(r.data.iter().all(|&b| b == 9));
    };
    check_good(1);

    // 1. Garbage instead of client flags.
    let mut s = raw_connect(&srv, b"GET / HTTP/1.1\r\n\r\n");
    assert!(
        closed_by_server(&mut s),
        "garbage handshake must be dropped"
    );
    check_good(2);

    // 2. An option claiming 4 GiB of data.
    let mut h = Vec::new();
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    let mut s = raw_connect(&srv, &h);
    assert!(closed_by_server(&mut s), "oversized option must be dropped");
    check_good(3);

    // 3. In transmission: a write announcing a 4 GiB payload.
    let mut bad = Client::connect(&srv.socket, true, false);
    bad.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[]);
    assert!(
        closed_by_server(&mut bad.s),
        "oversized write must be dropped"
    );
    check_good(4);

    // 4. In transmission: an unknown command gets EINVAL, a bad magic a hang-up.
    let mut bad = Client::connect(&srv.socket, true, false);
    bad.request(0x77, 0, 5, 0, 0, &[]);
    assert_eq!(bad.read_reply(0).unwrap().error, 22);
    bad.s.write_all(&[0xde; 28]).unwrap();
    assert!(
        closed_by_server(&mut bad.s),
        "bad request magic must be dropped"
    );
    check_good(5);

    // 5. A pile of connections that never speak do not stop the good client.
    let idle: Vec<_> = (0..3)
        .map(|_| UnixStream::connect(&srv.socket).unwrap())
        .collect();
    check_good(6);
    drop(idle);

    // The worker survived all of it.
    let pid = srv.worker_pid();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(srv.log().contains("dropped"), "{}", srv.log());
}

/// A full server queues a further client instead of refusing it (as
/// qemu-nbd does at its connection limit): the client is served as soon as
/// one of the others leaves. Refusing raced with a client that had just
/// been hung up on but whose thread had not ended yet.
#[test]
fn client_beyond_the_limit_waits_for_a_slot_instead_of_being_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 4 * MIB, 7);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let max = srv.max_clients();
    let mut full: Vec<Client> = (0..max)
        .map(|_| Client::connect(&srv.socket, true, false))
        .collect();
    let socket = srv.socket.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect(&socket, true, false);
        tx.send(()).unwrap();
        c.request(CMD_READ, 0, 9, 0, 4096, &[]);
        let r = c.read_reply(0).unwrap();
        (r.handle, r.error, r.data.iter().all(|&b| b == 7))
    });
    // Every slot is taken: the waiter has not had its greeting. Each
    // connected client still works meanwhile.
    for (h, c) in full.iter_mut().enumerate() {
        c.request(CMD_READ, 0, h as u64, 0, 4096, &[]);
        assert_eq!(c.read_reply(0).unwrap().error, 0);
    }
    assert!(
        rx.try_recv().is_err(),
        "a client beyond the limit of {max} was served while all were connected"
    );
    drop(full.pop());
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the waiting client is served once a slot frees");
    assert_eq!(waiter.join().unwrap(), (9, 0, true));
}

#[test]
fn standalone_worker_is_confined_and_monitor_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", MIB, 0);
    let mut srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    let st = proc_status(srv.worker_pid());
    assert_eq!(st["Seccomp"], "2");
    assert_eq!(st["NoNewPrivs"], "1");
    assert_eq!(st["CapEff"], "0000000000000000");
    if require(
        is_root(),
        "root: only a worker started as root drops to nobody",
    ) {
        assert!(st["Uid"].starts_with("65534"), "{}", st["Uid"]);
    }
    assert!(srv.stop().success(), "{}", srv.log());
    assert!(!srv.socket.exists(), "socket removed on exit");
}

#[test]
fn client_that_stops_reading_does_not_stall_others_and_gets_every_reply_later() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.img", 16 * MIB, 0x3c);
    let srv = Standalone::start(dir.path(), &format!("aio:{}", img.display()), &[]);
    // Client A asks for far more than the socket buffers hold, then stops
    // reading: its replies back up on the server.
    let mut a = Client::connect(&srv.socket, true, false);
    const N: u64 = 64;
    // The smallest maximum block size the worker advertises, whatever its
    // memlock room (a larger read is refused with a short error reply,
    // which would never fill the socket).
    const LEN: u32 = 64 * 1024;
    for h in 0..N {
        a.request(CMD_READ, 0, h, (h % 128) * u64::from(LEN), LEN, &[]);
    }
    // The backed-up replies go to the connection's writer thread: wait
    // for it to exist (the event), not for a time.
    let pid = srv.worker_pid();
    let comms = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .collect()
    };
    let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !comms().iter().any(|c| c == "nbd-tx") {
        assert!(
            std::time::Instant::now() < limit,
            "no nbd-tx writer thread: {:?}",
            comms()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Client B is served meanwhile.
    let mut b = Client::connect(&srv.socket, false, false);
    for h in 0..16 {
        b.request(CMD_READ, 0, h, h * 4096, 4096, &[]);
        let r = b.read_reply(4096).unwrap();
        assert_eq!((r.handle, r.error), (h, 0));
        assert!(r.data.iter().all(|&x| x == 0x3c));
    }
    // A finally reads: every reply arrives whole, none interleaved.
    let mut seen = vec![false; N as usize];
    for _ in 0..N {
        let r = a.read_reply(0).unwrap();
        assert_eq!(r.error, 0);
        assert_eq!(r.data.len(), LEN as usize);
        assert!(r.data.iter().all(|&x| x == 0x3c));
        assert!(!seen[r.handle as usize], "duplicate reply {}", r.handle);
        seen[r.handle as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
}
