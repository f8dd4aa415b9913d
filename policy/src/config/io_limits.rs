//! A tenant's I/O limit tables, `disk_io` (each of its disks) and
//! `tenant_io` (all of them together):
//!
//! ```toml
//! [[tenant]]
//! name = "web"
//! disk_io = { write_iops = 500, write_iops_burst = 50, read_bps = 104857600 }
//! tenant_io = { write_bps = 209715200 }
//! ```
//!
//! Keys: `read_iops`, `write_iops`, `read_bps`, `write_bps`, each with an
//! optional `_burst` (default: a tenth of a second of the rate, as qemu's
//! throttle groups; see `tapjail_common::qos`).

use super::Checker;
use serde::Deserialize;
use tapjail_common::qos::{IoLimits, Knob, Rate};
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIo {
    read_iops: Option<Spanned<i64>>,
    read_iops_burst: Option<Spanned<i64>>,
    write_iops: Option<Spanned<i64>>,
    write_iops_burst: Option<Spanned<i64>>,
    read_bps: Option<Spanned<i64>>,
    read_bps_burst: Option<Spanned<i64>>,
    write_bps: Option<Spanned<i64>>,
    write_bps_burst: Option<Spanned<i64>>,
}

impl RawIo {
    fn pair(&self, k: Knob) -> (&Option<Spanned<i64>>, &Option<Spanned<i64>>) {
        match k {
            Knob::ReadIops => (&self.read_iops, &self.read_iops_burst),
            Knob::WriteIops => (&self.write_iops, &self.write_iops_burst),
            Knob::ReadBps => (&self.read_bps, &self.read_bps_burst),
            Knob::WriteBps => (&self.write_bps, &self.write_bps_burst),
        }
    }
}

/// Check `raw` (the table named `table` of tenant `tenant`) into limits;
/// problems are reported at their line and the knob is left unlimited.
pub(super) fn build(
    c: &mut Checker<'_>,
    tenant: &str,
    table: &str,
    raw: Option<RawIo>,
) -> IoLimits {
    let mut out = IoLimits::default();
    let Some(raw) = raw else {
        return out;
    };
    for k in Knob::ALL {
        let (rate, burst) = raw.pair(k);
        let Some(rate) = rate else {
            if let Some(b) = burst {
                c.at(
                    b.span(),
                    format!(
                        "{table}.{}_burst of tenant {tenant:?} needs {table}.{}",
                        k.name(),
                        k.name()
                    ),
                );
            }
            continue;
        };
        let per_sec = u64::try_from(*rate.get_ref()).unwrap_or(0);
        let burst_v = match burst {
            Some(b) => u64::try_from(*b.get_ref()).unwrap_or(0),
            None => Rate::default_burst(per_sec),
        };
        let r = Rate {
            per_sec,
            burst: burst_v,
        };
        match r.check(k) {
            Ok(()) => out.set(k, Some(r)),
            Err(e) => {
                let span = match burst {
                    Some(b) if per_sec != 0 && e.contains("_burst") => b.span(),
                    _ => rate.span(),
                };
                c.at(span, format!("{table} of tenant {tenant:?}: {e}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::Policy;
    use tapjail_common::qos::Rate;

    const HEAD: &str =
        "worker_uids = [300000, 300999]\n[[tenant]]\nname = \"web\"\nuids = [1000]\n";

    #[test]
    fn io_tables_parse_with_default_and_given_bursts() {
        let p = Policy::parse(&format!(
            "{HEAD}disk_io = {{ write_iops = 500, write_iops_burst = 50, read_bps = 1000000 }}\n\
             tenant_io = {{ write_bps = 2097152 }}\n"
        ))
        .unwrap();
        let t = &p.tenants[0];
        assert_eq!(
            t.disk_io.write_iops,
            Some(Rate {
                per_sec: 500,
                burst: 50
            })
        );
        assert_eq!(
            t.disk_io.read_bps,
            Some(Rate {
                per_sec: 1_000_000,
                burst: 100_000
            })
        );
        assert_eq!(t.disk_io.read_iops, None);
        assert_eq!(t.tenant_io.write_bps.unwrap().per_sec, 2 << 20);
    }

    #[test]
    fn bad_io_values_are_rejected_with_their_line() {
        for (body, line, says) in [
            (
                "disk_io = { write_iops = 0 }",
                5,
                "write_iops = 0 is out of range",
            ),
            (
                "disk_io = { read_iops = 10, read_iops_burst = 100000 }",
                5,
                "read_iops_burst",
            ),
            (
                "tenant_io = { write_bps_burst = 5 }",
                5,
                "needs tenant_io.write_bps",
            ),
            (
                "tenant_io = { write_bps = -1 }",
                5,
                "write_bps = 0 is out of range",
            ),
            ("disk_io = { writes = 5 }", 5, "unknown field"),
        ] {
            let e = Policy::parse(&format!("{HEAD}{body}\n")).unwrap_err();
            let d = &e.diagnostics[0];
            assert_eq!(d.line, line, "{body}: {d:?}");
            assert!(d.message.contains(says), "{body}: {}", d.message);
        }
    }
}
