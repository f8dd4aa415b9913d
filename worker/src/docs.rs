//! tapdisk(8) is written by hand, as tapdisk parses its arguments by hand
//! ([`crate::parse`]). These tests keep the page and the parser in step:
//! every flag the parser matches on is documented, and every flag the page
//! documents is accepted.

use std::path::Path;

/// Internal flags the page leaves out on purpose.
const HIDDEN: &[&str] = &["--selftest-escape"];

fn page() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/man/tapdisk.8");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The flags `parse` matches on: the string patterns of its match arms.
fn parser_flags() -> Vec<String> {
    let src = include_str!("main.rs");
    let body = &src[src.find("fn parse(").expect("parse is in main.rs")..];
    let body = &body[..body.find("\n}\n").expect("parse ends")];
    let mut flags = Vec::new();
    for line in body.lines().filter(|l| l.contains("=>")) {
        let arms = line.split("=>").next().unwrap_or("");
        for part in arms.split('"').skip(1).step_by(2) {
            if part.starts_with('-') {
                flags.push(part.to_string());
            }
        }
    }
    flags
}

/// The flags the page's OPTIONS section documents (roff's `\-` unescaped).
fn page_flags(page: &str) -> Vec<String> {
    let options = &page[page.find(".SH OPTIONS").expect("an OPTIONS section")..];
    let options = &options[..options[1..].find(".SH").map_or(options.len(), |i| i + 1)];
    options
        .lines()
        .filter(|l| l.starts_with(".B"))
        .flat_map(|l| {
            l.replace("\\-", "-")
                .split(|c: char| c.is_whitespace() || "\",".contains(c))
                .filter(|w| w.starts_with('-'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_parser_flag_is_documented() {
    let documented = page_flags(&page());
    let flags = parser_flags();
    assert!(flags.len() >= 12, "found only {flags:?} in parse()");
    let missing: Vec<_> = flags
        .iter()
        .filter(|f| !HIDDEN.contains(&f.as_str()) && !documented.contains(f))
        .collect();
    assert!(missing.is_empty(), "tapdisk.8 lacks {missing:?}");
}

#[test]
fn every_documented_flag_is_accepted() {
    for flag in page_flags(&page()) {
        // With a value the flag may need; an unknown flag is refused
        // whatever follows it.
        let err = crate::parse([flag.clone(), "1".into()].into_iter()).err();
        let unknown = format!("unknown argument {flag:?}");
        assert_ne!(err.as_deref(), Some(unknown.as_str()), "{flag}");
        assert!(parser_flags().contains(&flag), "{flag} is not in parse()");
    }
}

#[test]
fn the_page_renders_without_groff_warnings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/man/tapdisk.8");
    let out = std::process::Command::new("groff")
        .args(["-man", "-ww", "-z", "-t"])
        .arg(&path)
        .output()
        .expect("groff runs (apt-get install groff-base)");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}
