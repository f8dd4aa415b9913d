//! Per-direction throttle lanes on the FUSE frontend (NBD's and ublk's
//! are in `qos` and `qos_ublk`): every request comes off one `/dev/fuse`
//! queue, so without lanes the serving threads all sleep on delayed
//! writes and a read with tokens to spare waits behind them.

use crate::*;
use std::process::{Command, Stdio};

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn dd(args: &[String]) -> Command {
    let mut c = Command::new("dd");
    c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// The serving threads and spare lane buffers the worker planned: it
/// says when memory made them fewer than 16 and 32.
fn plan(log: &str) -> (u64, u64) {
    let Some(at) = log.find(" of 16 serving threads and ") else {
        return (16, 32);
    };
    let num_before = |end: usize| -> u64 {
        let head = log[..end].trim_end();
        head[head
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |i| i + 1)..]
            .parse()
            .unwrap_or_else(|_| panic!("no number before {end} in:\n{log}"))
    };
    let threads = num_before(at);
    let rest = &log[at..];
    assert!(
        rest.contains("throttle lanes: on"),
        "no throttle lanes:\n{log}"
    );
    let spares_at = at + rest.find(" write slots").expect("write slots named");
    (threads, num_before(spares_at))
}

#[test]
fn qos_fuse_delayed_writes_do_not_hold_up_reads() {
    let h = Harness::start(Options {
        frontend: "fuse",
        ..Options::default()
    });
    let img = h.raw_image(ROOT.name, "lanes.img", 1 << 20);
    let dev = h
        .ok(&ROOT, &["create", "-a", &format!("aio:{}", img.display())])
        .trim()
        .to_string();
    let minor = dev.rsplit("tapdev").next().unwrap().to_string();
    let (threads, spares) = plan(&h.broker_log());
    // Every delayed write fits in the lane's slots (one more, the first,
    // goes through on the burst). The pacer and the slots took at most
    // two serving threads' worth of memory, so without lanes the worker
    // would have had at most `threads + 2` threads, all asleep on writes,
    // and the read would have waited for at least 4 of them, one a second.
    let writes = spares + 1;
    assert!(
        writes > threads + 2 + 4,
        "{threads} serving threads, {spares} write slots: too few slots to tell"
    );
    h.ok(&ROOT, &["throttle", "-m", &minor, "--write-iops", "1:1"]);
    let mut writers: Vec<_> = (0..writes)
        .map(|i| {
            dd(&[
                "if=/dev/zero".into(),
                format!("of={dev}"),
                "bs=4096".into(),
                "count=1".into(),
                format!("seek={i}"),
                "oflag=direct".into(),
                "conv=notrunc".into(),
            ])
            .spawn()
            .expect("dd")
        })
        .collect();
    let stats = || -> serde_json::Value {
        serde_json::from_str(&h.ok(&ROOT, &["stats", "-m", &minor])).unwrap()
    };
    assert!(
        eventually(std::time::Duration::from_secs(60), || u(
            &stats()["throttle"]["paced"][1]
        ) >= writes),
        "the writes did not all reach the throttle: {}",
        stats()
    );
    // A direct read of a slot nobody writes.
    let read = dd(&[
        format!("if={dev}"),
        "of=/dev/null".into(),
        "bs=4096".into(),
        "count=1".into(),
        "skip=200".into(),
        "iflag=direct".into(),
    ])
    .status()
    .unwrap();
    assert!(read.success(), "{}", h.broker_log());
    let after = stats();
    let written = u(&after["secs"][1]) / 8;
    assert!(
        written < 4,
        "the read waited for {written} of {writes} delayed writes \
         ({threads} serving threads): {after}"
    );
    // Let the rest through: every write completes.
    h.ok(&ROOT, &["throttle", "-m", &minor, "--write-iops", "off"]);
    for w in &mut writers {
        assert!(w.wait().unwrap().success());
    }
}
