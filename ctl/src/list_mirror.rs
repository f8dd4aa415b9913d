//! The `-2` mirror state in `tap-ctl list` (`--json` and the terminal
//! table). The broker's rows say which minors mirror and where; the live
//! state (copying, synced, standby, failed-over, failed) is the worker's,
//! so it is read with one `stats` per mirroring row, only for these two
//! forms.
//!
//! SM's `key=value` form stays blktap's four fields: SM splits each line
//! with `split(' ', 3)` and drops a field that is not one `key=value`, so
//! any fifth field would corrupt (or, with a space in the path, lose) its
//! `args` (xapi-project/sm `drivers/blktap2.py`, `TapCtl.__list`).

use crate::client::Client;
use crate::escape::escape;
use serde::Serialize;
use tapjail_common::mirror::{MirrorRecord, MirrorStats};
use tapjail_common::proto::{ListEntry, Reply, Request};

/// One row's mirror as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MirrorView {
    pub uri: String,
    /// `mirror` or `standby`.
    pub mode: &'static str,
    /// `copying`, `synced`, `mirroring` (a file secondary), `standby`,
    /// `failed-over`, `failed`, or
    /// `unknown` when the worker could not be asked.
    pub state: &'static str,
    /// Bytes the background copy has brought over, of `total`.
    pub copied: u64,
    pub total: u64,
    /// Why it failed, or why the state is unknown.
    pub error: Option<String>,
}

impl MirrorView {
    /// The record, with the worker's stats when there are any.
    pub fn new(rec: &MirrorRecord, live: Result<Option<MirrorStats>, String>) -> MirrorView {
        let mut v = MirrorView {
            uri: rec.uri.clone(),
            mode: rec.mode.as_str(),
            state: "unknown",
            copied: 0,
            total: 0,
            error: None,
        };
        if let Some(why) = &rec.lost {
            v.state = "failed";
            v.error = Some(format!("not re-established: {why}"));
            return v;
        }
        match live {
            Ok(Some(m)) => {
                v.state = m.state.as_str();
                v.mode = m.mode.as_str();
                v.copied = m.copied;
                v.total = m.total;
                v.error = m.error;
            }
            Ok(None) => v.error = Some("the tapdisk reports no mirror".into()),
            Err(e) => v.error = Some(format!("stats: {e}")),
        }
        v
    }

    /// The terminal table's line under the row: the type column says
    /// `mirror`, then state, progress while copying, and the URI.
    pub fn tty_line(&self) -> String {
        let mut what = self.state.to_string();
        if self.state == "copying" && self.total > 0 {
            // Whole percent, rounded down: 100% only once copied.
            let pct = self.copied.saturating_mul(100) / self.total;
            what.push_str(&format!(" {pct}%"));
        }
        if self.mode == "standby" && self.state != "standby" {
            what.push_str(" (standby)");
        }
        let mut line = format!("{:>19}{:>10} {what} {}", "", "mirror", escape(&self.uri));
        if let Some(e) = &self.error {
            line.push_str(&format!(": {}", escape(e)));
        }
        line
    }
}

/// Each row's mirror (`None` for rows that mirror nothing), asking the
/// broker for the stats of the rows that do.
pub fn views(client: &Client, rows: &[ListEntry]) -> Vec<Option<MirrorView>> {
    rows.iter()
        .map(|r| {
            let rec = r.mirror.as_ref()?;
            let minor = r.minor?;
            let live = if rec.lost.is_some() {
                Ok(None)
            } else {
                match client.call(&Request::Stats { pid: r.pid, minor }) {
                    Ok(Reply::Stats(s)) => Ok(s.worker.mirror),
                    Ok(Reply::Error { message, .. }) => Err(message),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(e) => Err(crate::render(&e)),
                }
            };
            Some(MirrorView::new(rec, live))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapjail_common::mirror::{MirrorMode, MirrorState};

    fn rec(lost: Option<&str>) -> MirrorRecord {
        MirrorRecord {
            uri: "nbd:/run/sm/m.sock".into(),
            mode: MirrorMode::Mirror,
            lost: lost.map(str::to_string),
        }
    }

    fn live(state: MirrorState, copied: u64) -> MirrorStats {
        MirrorStats {
            uri: "nbd:/run/sm/m.sock".into(),
            mode: MirrorMode::Mirror,
            state,
            copied,
            total: 1000,
            mirrored_writes: 3,
            error: None,
        }
    }

    #[test]
    fn mirror_view_takes_the_workers_state_and_says_why_when_it_has_none() {
        let v = MirrorView::new(&rec(None), Ok(Some(live(MirrorState::Copying, 425))));
        assert_eq!((v.state, v.copied, v.total), ("copying", 425, 1000));
        assert_eq!(
            v.tty_line(),
            "                       mirror copying 42% nbd:/run/sm/m.sock"
        );
        let v = MirrorView::new(&rec(None), Ok(Some(live(MirrorState::Synced, 1000))));
        assert_eq!(v.state, "synced");
        let v = MirrorView::new(&rec(Some("connection refused")), Ok(None));
        assert_eq!(v.state, "failed");
        assert!(v.error.unwrap().contains("connection refused"));
        let v = MirrorView::new(&rec(None), Err("minor 3 is busy".into()));
        assert_eq!(v.state, "unknown");
        assert!(v.error.unwrap().contains("busy"));
    }

    /// SM's `TapCtl.__list` field rule: `split(' ', 3)`, each piece kept
    /// only if it is exactly one `key=value`.
    fn sm_parse(line: &str) -> Vec<(String, String)> {
        line.trim_end()
            .splitn(4, ' ')
            .filter_map(|f| {
                let bits: Vec<&str> = f.split('=').collect();
                (bits.len() == 2).then(|| (bits[0].to_string(), bits[1].to_string()))
            })
            .collect()
    }

    #[test]
    fn sms_key_value_rows_of_a_mirroring_disk_stay_blktaps_four_fields() {
        let row = ListEntry {
            pid: Some(7),
            minor: Some(tapjail_common::Minor::new(3).unwrap()),
            state: Some(tapjail_common::state::State(0)),
            image: Some(tapjail_common::proto::ImageSpec {
                kind: tapjail_common::proto::ImageKind::Vhd,
                path: "/srv/sr/a b.vhd".into(),
            }),
            read_only: false,
            frontend: None,
            device: None,
            restarts: 0,
            mirror: Some(rec(None)),
        };
        let line = crate::lifecycle::row_dict(&row);
        let keys: Vec<String> = sm_parse(&line).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["pid", "minor", "state", "args"], "{line}");
        assert!(sm_parse(&line).contains(&("args".into(), "vhd:/srv/sr/a b.vhd".into())));
        // Why the mirror is not a fifth field there: SM would lose args.
        let extended = format!("{line} mirror=synced");
        assert!(!sm_parse(&extended).iter().any(|(k, _)| k == "args"));
    }

    #[test]
    fn mirror_tty_line_escapes_what_others_chose() {
        let mut r = rec(None);
        r.uri = "nbd:/run/x\x1b[2J\n    6666    1    0        vhd /b".into();
        let v = MirrorView::new(&r, Err("e\x07".into()));
        let line = v.tty_line();
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
    }
}
