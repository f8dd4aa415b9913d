//! tapjail-policy(5) is written by hand; this keeps it honest. The keys the
//! parser knows are asked of the parser itself: a file with an unknown key
//! is refused with the list of keys expected there. Every one of them must
//! be documented in the page (on a `.B`/`.BR` line), at the top level, in a
//! `[[tenant]]` table and in an `image_roots` entry. A new nested table
//! needs its probe added to `PROBES`.

use std::path::Path;
use tapjail_policy::Policy;

/// Where a key can appear, as a document with an unknown key there.
const PROBES: &[(&str, &str)] = &[
    ("top level", "zz_unknown_key = 1\n"),
    (
        "[[tenant]]",
        "[[tenant]]\nname = \"a\"\nzz_unknown_key = 1\n",
    ),
    (
        "disk_io",
        "[[tenant]]\nname = \"a\"\ndisk_io = { zz_unknown_key = 1 }\n",
    ),
    (
        "tenant_io",
        "[[tenant]]\nname = \"a\"\ntenant_io = { zz_unknown_key = 1 }\n",
    ),
    (
        "mirror",
        "[[tenant]]\nname = \"a\"\nmirror = { zz_unknown_key = 1 }\n",
    ),
    (
        "image_roots entry",
        "[[tenant]]\nname = \"a\"\nimage_roots = [{ path = \"/x\", zz_unknown_key = 1 }]\n",
    ),
];

/// The keys the parser expected, out of its "unknown field" error.
fn known_keys(doc: &str) -> Vec<String> {
    let err = Policy::parse(doc).expect_err("an unknown key is refused");
    let text = err.render("probe");
    let (_, expected) = text
        .split_once("expected")
        .unwrap_or_else(|| panic!("no key list in {text:?}"));
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!keys.is_empty(), "no keys in {text:?}");
    keys
}

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/man/tapjail-policy.5");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The words of the page's `.B`/`.BR`/`.BI` lines (the keys' headings).
fn documented(page: &str) -> Vec<String> {
    page.lines()
        .filter(|l| l.starts_with(".B"))
        .flat_map(|l| {
            l.split(|c: char| c.is_whitespace() || "\",[]{}=".contains(c))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_key_the_parser_knows_is_in_the_page() {
    let page = page();
    let words = documented(&page);
    let mut missing = Vec::new();
    let mut total = 0;
    for (where_, doc) in PROBES {
        for key in known_keys(doc) {
            total += 1;
            if !words.contains(&key) {
                missing.push(format!("{key} ({where_})"));
            }
        }
    }
    assert!(total >= 45, "only {total} keys found: the probes broke");
    assert!(
        missing.is_empty(),
        "dist/man/tapjail-policy.5 does not document: {}",
        missing.join(", ")
    );
}

#[test]
fn the_check_notices_an_undocumented_key() {
    // The same check against a page without `share_parent`'s heading.
    let page: String = page()
        .lines()
        .filter(|l| !l.contains("share_parent"))
        .map(|l| format!("{l}\n"))
        .collect();
    let keys = known_keys(PROBES[1].1);
    assert!(keys.iter().any(|k| k == "share_parent"), "{keys:?}");
    assert!(!documented(&page).contains(&"share_parent".to_string()));
}

#[test]
fn the_page_renders_without_groff_warnings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/man/tapjail-policy.5");
    let out = std::process::Command::new("groff")
        .args(["-man", "-ww", "-z", "-t"])
        .arg(&path)
        .output()
        .expect("groff runs (apt-get install groff-base)");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
