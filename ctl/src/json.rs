//! `--json` documents of the lifecycle replies that blktap prints as bare
//! values (a device path, a pid, a number): one JSON object each, with
//! the keys each command's `--json` help lists. `list` and `stats` build
//! their own documents in `lifecycle`.

use serde_json::{json, Value};
use tapjail_common::proto::Reply;
use tapjail_common::qos::{IoLimits, Knob};

/// The document for `reply`, or `None` where the command prints no data
/// of its own (or builds its document elsewhere).
pub fn reply(reply: &Reply) -> Option<String> {
    let v = match reply {
        Reply::Allocated { minor, device } => json!({ "minor": minor.get(), "device": device }),
        Reply::Created { minor, pid, device } => {
            json!({ "minor": minor.get(), "pid": pid, "device": device })
        }
        Reply::Spawned { pid } => json!({ "pid": pid }),
        Reply::Throttled(limits) => limits_json(limits),
        Reply::Major { major } => json!({ "major": major }),
        Reply::Snapshotted(done) => {
            json!({ "child": done.child, "chain": done.chain, "stall_us": done.stall_us })
        }
        Reply::Coalesced(done) => json!({
            "direction": done.direction.as_str(),
            "chain": done.chain,
            "copied_bytes": done.copied_bytes,
            "stall_us": done.stall_us,
            "restarts": done.restarts,
        }),
        _ => return None,
    };
    Some(v.to_string())
}

/// `{"read_iops": {"per_sec": N, "burst": N} | null, "write_iops": ...,
/// "read_bps": ..., "write_bps": ...}`: null is no limit (`off`).
pub fn limits_json(limits: &IoLimits) -> Value {
    let mut m = serde_json::Map::new();
    for k in Knob::ALL {
        let v = limits.get(k).map_or(
            Value::Null,
            |r| json!({ "per_sec": r.per_sec, "burst": r.burst }),
        );
        m.insert(k.name().to_string(), v);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::qos::Rate;
    use tapjail_common::Minor;

    fn parse(r: &Reply) -> Value {
        serde_json::from_str(&reply(r).expect("a document")).unwrap()
    }

    #[test]
    fn json_replies_carry_what_the_plain_output_prints() {
        let m = Minor::new(7).unwrap();
        let v = parse(&Reply::Created {
            minor: m,
            pid: 42,
            device: "/dev/tapjail/tapdev7".into(),
        });
        assert_eq!(v["minor"], 7);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["device"], "/dev/tapjail/tapdev7");
        let v = parse(&Reply::Allocated {
            minor: m,
            device: "/dev/tapjail/tapdev7".into(),
        });
        assert_eq!(v, json!({"minor": 7, "device": "/dev/tapjail/tapdev7"}));
        assert_eq!(parse(&Reply::Spawned { pid: 9 }), json!({"pid": 9}));
        assert_eq!(parse(&Reply::Major { major: 259 }), json!({"major": 259}));
        assert!(reply(&Reply::Ok).is_none());
    }

    #[test]
    fn json_limits_give_every_knob_null_when_off() {
        let mut l = IoLimits::default();
        l.set(
            Knob::WriteBps,
            Some(Rate {
                per_sec: 1 << 20,
                burst: 4096,
            }),
        );
        let v = parse(&Reply::Throttled(l));
        assert_eq!(v["write_bps"], json!({"per_sec": 1048576, "burst": 4096}));
        for k in ["read_iops", "write_iops", "read_bps"] {
            assert!(v[k].is_null(), "{k}: {v}");
        }
    }
}
