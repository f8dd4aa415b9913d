//! tap-broker's man page and completions, generated from [`crate::Args`]
//! and checked against the committed copies under `dist/`
//! (`dist/gen-docs` regenerates them), and where it finds tapdisk when
//! installed from the package.

use clap::CommandFactory;

#[test]
fn man_page_and_completions_match_the_cli() {
    let mut files = tapjail_docgen::man_pages(crate::Args::command(), "8");
    files.extend(tapjail_docgen::completions(crate::Args::command()));
    let page = String::from_utf8(files[0].bytes.clone()).unwrap();
    // The hidden internal flag stays out of the page.
    assert!(!page.contains("fd\\-holder"), "{page}");
    let dist = tapjail_docgen::dist_dir();
    tapjail_docgen::check_or_bless(&dist, &files).unwrap_or_else(|e| panic!("{e}"));
    tapjail_docgen::lint_pages(&dist, &files).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn tapdisk_is_found_next_to_the_broker_else_in_libexec() {
    let dir = tempfile::tempdir().unwrap();
    let broker = dir.path().join("tap-broker");
    assert_eq!(
        crate::default_tapdisk(&broker),
        std::path::Path::new("/usr/libexec/tapjail/tapdisk")
    );
    std::fs::write(dir.path().join("tapdisk"), b"").unwrap();
    assert_eq!(crate::default_tapdisk(&broker), dir.path().join("tapdisk"));
}
