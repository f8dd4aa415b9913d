//! I/O limits (QoS): what a disk or a tenant may read and write per
//! second, as policy, tap-ctl, the broker and the worker all name them.
//!
//! Four knobs, each a sustained rate with a burst, after qemu's throttle
//! groups (`iops-read`/`bps-write` and their `-max` bursts) and blktap's
//! valve (a byte-rate token bucket in front of the request queue). The
//! worker enforces them (`tapjail_worker::qos`); nothing here does I/O.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Highest IOPS limit accepted (far above any device; a typo guard).
pub const MAX_IOPS: u64 = 100_000_000;
/// Highest bytes-per-second limit accepted (1 TiB/s).
pub const MAX_BPS: u64 = 1 << 40;
/// A burst may hold at most this many seconds of the rate: a larger one
/// would let a disk run unthrottled for minutes, which is no limit.
pub const MAX_BURST_SECS: u64 = 60;

/// One of the four limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Knob {
    ReadIops,
    WriteIops,
    ReadBps,
    WriteBps,
}

impl Knob {
    pub const ALL: [Knob; 4] = [
        Knob::ReadIops,
        Knob::WriteIops,
        Knob::ReadBps,
        Knob::WriteBps,
    ];

    /// The policy key and tap-ctl flag stem (`write_iops`, `--write-iops`).
    pub fn name(self) -> &'static str {
        match self {
            Knob::ReadIops => "read_iops",
            Knob::WriteIops => "write_iops",
            Knob::ReadBps => "read_bps",
            Knob::WriteBps => "write_bps",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Knob::WriteIops | Knob::WriteBps)
    }

    pub fn is_bytes(self) -> bool {
        matches!(self, Knob::ReadBps | Knob::WriteBps)
    }

    fn max(self) -> u64 {
        if self.is_bytes() {
            MAX_BPS
        } else {
            MAX_IOPS
        }
    }
}

/// A sustained rate per second and a burst: up to `burst` units pass at
/// once after a quiet spell, then `per_sec` per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub per_sec: u64,
    pub burst: u64,
}

impl Rate {
    /// The burst when none is given: a tenth of a second of the rate (what
    /// qemu does for a throttle without `-max`), at least one unit.
    pub fn default_burst(per_sec: u64) -> u64 {
        (per_sec / 10).max(1)
    }

    /// `per_sec` with the default burst.
    pub fn with_default_burst(per_sec: u64) -> Rate {
        Rate {
            per_sec,
            burst: Rate::default_burst(per_sec),
        }
    }

    /// Check the values for `knob`; the message says what is wrong and
    /// what range is accepted.
    pub fn check(&self, knob: Knob) -> Result<(), String> {
        let max = knob.max();
        if self.per_sec == 0 || self.per_sec > max {
            return Err(format!(
                "{} = {} is out of range: give 1..={max} (or `off` for no limit)",
                knob.name(),
                self.per_sec
            ));
        }
        let most = self.per_sec.saturating_mul(MAX_BURST_SECS);
        if self.burst == 0 || self.burst > most {
            return Err(format!(
                "{}_burst = {} is out of range for a rate of {}/s: give 1..={most} \
                 (at most {MAX_BURST_SECS} s of the rate)",
                knob.name(),
                self.burst,
                self.per_sec
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.per_sec, self.burst)
    }
}

/// Parse a count with an optional binary suffix (`64K`, `10M`, `1G`).
pub fn parse_count(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if "KMGTkmgt".contains(c) => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => 1 << 40,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number (like 500, 64K, 10M or 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A runtime setting of one knob as tap-ctl takes it: `off`, `RATE` or
/// `RATE:BURST` (`--write-bps 10M:1M`). `None` means no limit.
pub fn parse_setting(knob: Knob, s: &str) -> Result<Option<Rate>, String> {
    if s.eq_ignore_ascii_case("off") || s == "0" {
        return Ok(None);
    }
    let (rate, burst) = match s.split_once(':') {
        Some((r, b)) => (parse_count(r)?, Some(parse_count(b)?)),
        None => (parse_count(s)?, None),
    };
    let r = Rate {
        per_sec: rate,
        burst: burst.unwrap_or_else(|| Rate::default_burst(rate)),
    };
    r.check(knob)?;
    Ok(Some(r))
}

/// The four limits of one scope (a disk, or a tenant's disks together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    pub read_iops: Option<Rate>,
    pub write_iops: Option<Rate>,
    pub read_bps: Option<Rate>,
    pub write_bps: Option<Rate>,
}

impl IoLimits {
    pub fn get(&self, knob: Knob) -> Option<Rate> {
        match knob {
            Knob::ReadIops => self.read_iops,
            Knob::WriteIops => self.write_iops,
            Knob::ReadBps => self.read_bps,
            Knob::WriteBps => self.write_bps,
        }
    }

    pub fn set(&mut self, knob: Knob, rate: Option<Rate>) {
        let slot = match knob {
            Knob::ReadIops => &mut self.read_iops,
            Knob::WriteIops => &mut self.write_iops,
            Knob::ReadBps => &mut self.read_bps,
            Knob::WriteBps => &mut self.write_bps,
        };
        *slot = rate;
    }

    pub fn is_unlimited(&self) -> bool {
        Knob::ALL.iter().all(|k| self.get(*k).is_none())
    }

    /// Check every set knob.
    pub fn check(&self) -> Result<(), String> {
        for k in Knob::ALL {
            if let Some(r) = self.get(k) {
                r.check(k)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for IoLimits {
    /// `read_iops=100:10 write_bps=off ...`, for audit lines and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for k in Knob::ALL {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            match self.get(k) {
                Some(r) => write!(f, "{}={r}", k.name())?,
                None => write!(f, "{}=off", k.name())?,
            }
        }
        Ok(())
    }
}

/// Whose limits a `tap-ctl throttle` changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThrottleTarget {
    /// One disk (overrides its tenant's per-disk default).
    Minor(crate::Minor),
    /// A tenant's disks all together.
    Tenant(String),
}

impl fmt::Display for ThrottleTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThrottleTarget::Minor(m) => write!(f, "minor {m}"),
            ThrottleTarget::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

/// The throttle's side of `tap-ctl stats`: the limits in force and how
/// much the worker held requests back. Pairs are `[read, write]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleStats {
    /// This disk's own limits.
    pub disk: IoLimits,
    /// Its tenant's limits, shared by all of the tenant's disks.
    pub tenant: IoLimits,
    /// Requests that went through a limited direction.
    pub paced: [u64; 2],
    /// Of those, requests that had to wait.
    pub delayed: [u64; 2],
    /// Total and longest wait, microseconds.
    pub delay_us: [u64; 2],
    pub max_delay_us: [u64; 2],
    /// When the first and the last paced request were let go
    /// (CLOCK_MONOTONIC, microseconds; 0: none yet). The bucket computes
    /// these from the rate, so `last - first` bounds what passed in
    /// between whatever the load on the host.
    pub first_release_us: [u64; 2],
    pub last_release_us: [u64; 2],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_suffixes_bursts_and_off() {
        assert_eq!(
            parse_setting(Knob::WriteBps, "10M:1M").unwrap(),
            Some(Rate {
                per_sec: 10 << 20,
                burst: 1 << 20
            })
        );
        assert_eq!(
            parse_setting(Knob::ReadIops, "100").unwrap(),
            Some(Rate {
                per_sec: 100,
                burst: 10
            })
        );
        assert_eq!(parse_setting(Knob::ReadIops, "off").unwrap(), None);
        assert_eq!(
            parse_setting(Knob::ReadIops, "3").unwrap().unwrap().burst,
            1
        );
    }

    #[test]
    fn bad_settings_say_what_and_which_range() {
        let e = parse_setting(Knob::ReadIops, "lots").unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
        let e = parse_setting(Knob::ReadIops, "200000000").unwrap_err();
        assert!(
            e.contains("read_iops") && e.contains("1..=100000000"),
            "{e}"
        );
        let e = parse_setting(Knob::WriteIops, "10:0").unwrap_err();
        assert!(e.contains("write_iops_burst"), "{e}");
        let e = parse_setting(Knob::WriteIops, "10:601").unwrap_err();
        assert!(e.contains("1..=600"), "{e}");
        let e = parse_setting(Knob::WriteBps, "5X").unwrap_err();
        assert!(e.contains("not a whole number"), "{e}");
        assert!(parse_setting(Knob::WriteBps, "99999999999T").is_err());
    }

    #[test]
    fn limits_display_every_knob() {
        let mut l = IoLimits::default();
        assert!(l.is_unlimited());
        l.set(Knob::WriteIops, Some(Rate::with_default_burst(50)));
        assert_eq!(
            l.to_string(),
            "read_iops=off write_iops=50:5 read_bps=off write_bps=off"
        );
        assert!(l.check().is_ok());
    }
}
