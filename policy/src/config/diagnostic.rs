//! Problems found in a policy file, with their line and column, and the
//! [`Checker`] that collects them while the file is built.

use crate::path::{normalize_absolute, PathError};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// One problem in a policy file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based; 0 when the problem has no place (e.g. a missing key).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.message
            )
        }
    }
}

/// Every problem found in a policy file (at least one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyError {
    /// One line per problem, each prefixed with `origin:LINE:COL:`, as
    /// compilers print them.
    pub fn render(&self, origin: &str) -> String {
        let mut out = String::new();
        for d in &self.diagnostics {
            if d.line == 0 {
                out.push_str(&format!("{origin}: {}\n", d.message));
            } else {
                out.push_str(&format!(
                    "{origin}:{}:{}: {}\n",
                    d.line, d.column, d.message
                ));
            }
        }
        out
    }
}

/// Warnings as `origin:LINE:COL: warning: message` lines.
pub fn render_warnings(warnings: &[Diagnostic], origin: &str) -> String {
    let mut out = String::new();
    for d in warnings {
        out.push_str(&format!(
            "{origin}:{}:{}: warning: {}\n",
            d.line, d.column, d.message
        ));
    }
    out
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for d in &self.diagnostics {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Accumulates diagnostics against the source text (for line numbers).
pub(crate) struct Checker<'a> {
    pub(super) text: &'a str,
    pub(super) diags: Vec<Diagnostic>,
}

impl<'a> Checker<'a> {
    pub(crate) fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.diags.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    pub(super) fn nowhere(&mut self, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            line: 0,
            column: 0,
            message: message.into(),
        });
    }

    pub(crate) fn abs_path(
        &mut self,
        key: &str,
        v: Option<Spanned<String>>,
        default: &str,
    ) -> PathBuf {
        match v {
            None => PathBuf::from(default),
            Some(s) => {
                let span = s.span();
                match normalize_absolute(Path::new(s.get_ref())) {
                    Ok(p) => p,
                    Err(e) => {
                        self.at(span, format!("{key}: {}", path_problem(s.get_ref(), &e)));
                        PathBuf::from(default)
                    }
                }
            }
        }
    }

    pub(crate) fn int_in<T: TryFrom<i64> + Copy>(
        &mut self,
        key: &str,
        v: &Spanned<i64>,
        lo: i64,
        hi: i64,
        fallback: T,
    ) -> T {
        let n = *v.get_ref();
        if n < lo || n > hi {
            self.at(
                v.span(),
                format!("{key} = {n} is out of range ({lo}..={hi})"),
            );
            return fallback;
        }
        T::try_from(n).unwrap_or(fallback)
    }
}

pub(super) fn path_problem(path: &str, e: &PathError) -> String {
    format!("{path:?}: {e}")
}

/// 1-based line and column of byte `offset` in `text`.
pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = text
        .get(line_start..offset)
        .map_or(offset - line_start, |s| s.chars().count())
        + 1;
    (line, column)
}
