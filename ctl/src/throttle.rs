//! `tap-ctl throttle`: an admin changes a disk's or a tenant's I/O limits
//! at runtime. Values are checked here for a quick, clear message, and
//! again by the broker.

use clap::Args;
use tapjail_common::proto::Request;
use tapjail_common::qos::{parse_setting, Knob, Rate, ThrottleTarget};
use tapjail_common::Minor;

/// Each value: `RATE`, `RATE:BURST` (counts take K, M, G, T suffixes, base
/// 1024) or `off`. Knobs not given keep their value.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["minor", "tenant"]))]
pub struct ThrottleArgs {
    /// This disk's own limits (overriding its tenant's per-disk default).
    #[arg(short = 'm', value_name = "MINOR")]
    pub minor: Option<Minor>,
    /// The limits all of this tenant's disks share.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,
    /// Read requests per second.
    #[arg(long, value_name = "RATE[:BURST]|off")]
    pub read_iops: Option<String>,
    /// Write requests per second.
    #[arg(long, value_name = "RATE[:BURST]|off")]
    pub write_iops: Option<String>,
    /// Bytes read per second.
    #[arg(long, value_name = "RATE[:BURST]|off")]
    pub read_bps: Option<String>,
    /// Bytes written per second.
    #[arg(long, value_name = "RATE[:BURST]|off")]
    pub write_bps: Option<String>,
    /// Print the limits in force as one JSON object: "read_iops",
    /// "write_iops", "read_bps", "write_bps", each {"per_sec": N,
    /// "burst": N} or null for no limit.
    #[arg(long)]
    pub json: bool,
}

impl ThrottleArgs {
    /// The request, or a message naming the flag that is wrong.
    pub fn request(self) -> Result<Request, String> {
        let target = match (self.minor, self.tenant) {
            (Some(m), None) => ThrottleTarget::Minor(m),
            (None, Some(t)) => ThrottleTarget::Tenant(t),
            _ => return Err("give either -m MINOR or --tenant TENANT".into()),
        };
        let mut changes: Vec<(Knob, Option<Rate>)> = Vec::new();
        for (knob, v) in [
            (Knob::ReadIops, self.read_iops),
            (Knob::WriteIops, self.write_iops),
            (Knob::ReadBps, self.read_bps),
            (Knob::WriteBps, self.write_bps),
        ] {
            if let Some(v) = v {
                let flag = format!("--{}", knob.name().replace('_', "-"));
                let r = parse_setting(knob, &v).map_err(|e| format!("{flag} {v}: {e}"))?;
                changes.push((knob, r));
            }
        }
        if changes.is_empty() {
            return Err(
                "nothing to change: give at least one of --read-iops, --write-iops, --read-bps, \
                 --write-bps (RATE, RATE:BURST or off)"
                    .into(),
            );
        }
        Ok(Request::Throttle { target, changes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(minor: Option<u64>, write_bps: Option<&str>) -> ThrottleArgs {
        ThrottleArgs {
            minor: minor.map(|m| Minor::new(m).unwrap()),
            tenant: minor.is_none().then(|| "web".to_string()),
            read_iops: None,
            write_iops: Some("off".into()),
            read_bps: None,
            write_bps: write_bps.map(str::to_string),
            json: false,
        }
    }

    #[test]
    fn throttle_args_become_one_change_per_flag() {
        let Request::Throttle { target, changes } =
            args(Some(3), Some("10M:1M")).request().unwrap()
        else {
            panic!()
        };
        assert_eq!(target, ThrottleTarget::Minor(Minor::new(3).unwrap()));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0], (Knob::WriteIops, None));
        assert_eq!(changes[1].1.unwrap().per_sec, 10 << 20);
        let Request::Throttle { target, .. } = args(None, None).request().unwrap() else {
            panic!()
        };
        assert_eq!(target, ThrottleTarget::Tenant("web".into()));
    }

    #[test]
    fn bad_throttle_values_name_the_flag() {
        let e = args(Some(3), Some("fast")).request().unwrap_err();
        assert!(e.starts_with("--write-bps fast:"), "{e}");
        let mut a = args(Some(3), None);
        a.write_iops = None;
        let e = a.request().unwrap_err();
        assert!(e.contains("nothing to change"), "{e}");
    }
}
