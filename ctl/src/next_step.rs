//! What to do next, for a refusal from tap-broker whose message says only
//! what went wrong ("minor 7 is not allocated"). The broker's message is
//! kept as it is; a hint is added after it, chosen by the kind of error
//! and the words the broker used, unless the message already gives one.

use crate::client::Refused;
use tapjail_common::proto::ErrorKind;

/// Words that show a message already says what to do.
const HAS_HINT: &[&str] = &[
    "tap-ctl ", "; give ", "; use ", "; try ", "first", "instead",
];

/// The next step for a refusal of `kind` saying `message`, if one helps.
pub fn hint(kind: ErrorKind, message: &str) -> Option<&'static str> {
    if HAS_HINT.iter().any(|w| message.contains(w)) {
        return None;
    }
    let has = |w: &str| message.contains(w);
    Some(match kind {
        ErrorKind::NotFound if has("image file") => {
            "check the path: it must name an existing regular file beneath one of your \
             image roots"
        }
        ErrorKind::NotFound => "`tap-ctl list` shows the minors and tapdisks you can use",
        ErrorKind::Denied if has("image roots") => {
            "use a file beneath one of those roots (image_roots of your tenant in the policy)"
        }
        ErrorKind::Denied if has("does not belong") => {
            "`tap-ctl list` shows your own disks; another tenant's cannot be used"
        }
        ErrorKind::Denied => {
            "the broker's policy decides this (see tapjail-policy(5)): ask its administrator"
        }
        ErrorKind::Busy if has("already open") => {
            "close that disk first (`tap-ctl destroy -m MINOR`) or use another file"
        }
        ErrorKind::Busy => "`tap-ctl list` shows each minor's state",
        ErrorKind::TimedOut => {
            "the tapdisk may be stuck: try again with a longer -t, or close it with -f"
        }
        ErrorKind::Failed if has("not a VHD footer") => {
            "if the file is a raw disk image, open it as aio:PATH instead; for a VHD, \
             `tap-ctl vhd check -n PATH` lists what is wrong"
        }
        ErrorKind::Failed if has("corrupt image") => {
            "`tap-ctl vhd check -n PATH` lists the problems, `tap-ctl vhd repair -n PATH` \
             fixes footers and batmaps"
        }
        ErrorKind::Failed => "tap-broker's log says more (journalctl -u tap-broker)",
        ErrorKind::Invalid | ErrorKind::Version | ErrorKind::Unsupported => return None,
    })
}

/// `e` with the next step added, if it is a refusal that lacks one. The
/// error stays a [`Refused`] (its kind decides the exit code).
pub fn add(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<Refused>() {
        Ok(r) => match hint(r.kind, &r.message) {
            Some(h) => Refused {
                kind: r.kind,
                message: format!("{}; {h}", r.message),
            }
            .into(),
            None => r.into(),
        },
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_get_a_next_step_once() {
        let e = add(Refused {
            kind: ErrorKind::NotFound,
            message: "minor 77 is not allocated".into(),
        }
        .into());
        let r = e.downcast_ref::<Refused>().expect("still a refusal");
        assert_eq!(r.kind, ErrorKind::NotFound);
        assert!(r
            .message
            .starts_with("minor 77 is not allocated; `tap-ctl list`"));
        // A message with its own next step is left alone.
        let m = "minor 3 is attached: run tap-ctl destroy -m 3 first";
        assert_eq!(hint(ErrorKind::Busy, m), None);
        assert_eq!(hint(ErrorKind::Invalid, "bad"), None);
    }
}
