//! The committed corpora stay small enough to live in the repository and
//! replay in CI: at most 600 files and 1 MiB per target, and one for each
//! target.

const TARGETS: [&str; 7] = [
    "mirror_server",
    "open_read",
    "write_repair",
    "fuse_request",
    "nbd_client",
    "control_frames",
    "policy_toml",
];

#[test]
fn committed_corpora_are_bounded() {
    for t in TARGETS {
        let c = tapjail_fuzz::committed_corpus(t);
        let bytes: usize = c.iter().map(Vec::len).sum();
        assert!(!c.is_empty(), "corpora/{t} is missing");
        assert!(c.len() <= 600, "corpora/{t}: {} files", c.len());
        assert!(bytes <= 1 << 20, "corpora/{t}: {bytes} bytes");
    }
}
