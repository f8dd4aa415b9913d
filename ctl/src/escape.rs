//! Text from others, made safe to print on a terminal.
//!
//! Image paths in `list` are chosen by tenants, parent names in `vhd
//! query` by whoever wrote the image, and the broker's error messages can
//! quote either. Printed raw, an `ESC` sequence in a file name could move
//! an admin's cursor, rewrite earlier lines or retitle the terminal, and a
//! newline could forge a whole `list` row; bidirectional overrides could
//! make `/srv/alice/gpj.vhd` display as another name. Such characters
//! are shown escaped instead, `\x1b` style; a backslash is doubled so an
//! escape can't be confused with a name that spells one out. JSON output
//! needs none of this (serde escapes control characters).

use std::fmt::Write;

/// Unicode format characters that reorder or hide text (bidi embeddings,
/// overrides and isolates, marks): harmless bytes, misleading display.
fn misleading(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// `text` with control and display-reordering characters escaped:
/// `\x1b`, `\n` → `\x0a`, `\u{202e}`; `\` → `\\`. Everything else,
/// non-ASCII letters included, is kept.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() && u32::from(c) < 0x100 {
            let _ = write!(out, "\\x{:02x}", u32::from(c));
        } else if c.is_control() || misleading(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_control_characters_become_hex_escapes() {
        assert_eq!(
            escape("/srv/a/\x1b]0;pwned\x07x"),
            "/srv/a/\\x1b]0;pwned\\x07x"
        );
        assert_eq!(
            escape("a\nb\rc\td\x7f\u{9b}"),
            "a\\x0ab\\x0dc\\x09d\\x7f\\x9b"
        );
        assert_eq!(escape("/srv/a/\u{202e}dhv.exe"), "/srv/a/\\u{202e}dhv.exe");
    }

    #[test]
    fn escape_keeps_ordinary_text_and_doubles_backslashes() {
        assert_eq!(
            escape("/srv/a/ünï cödé 日本.vhd"),
            "/srv/a/ünï cödé 日本.vhd"
        );
        assert_eq!(escape("a\\x1b"), "a\\\\x1b");
    }
}
