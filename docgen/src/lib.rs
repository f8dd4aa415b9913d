//! Man pages and shell completions generated from the binaries' own clap
//! definitions, so that what `--help` says and what the package ships
//! cannot drift apart.
//!
//! The generated files are committed under `dist/` (the package is built
//! from them, without running anything at install time). Each binary has a
//! test that renders its pages afresh and compares them with the committed
//! copies ([`check_or_bless`]); with `TAPJAIL_BLESS=1` the test rewrites
//! them instead (`dist/gen-docs` does that for every binary).

use clap_complete::Shell;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

/// Set to `1` to rewrite the committed files instead of comparing.
pub const BLESS_ENV: &str = "TAPJAIL_BLESS";

/// One generated file: where it goes under `dist/`, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

/// The repository's `dist/` directory (this crate sits next to it).
pub fn dist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("docgen lives in the workspace")
        .join("dist")
}

/// A page for `cmd` and one per visible subcommand, recursively, named as
/// git names its pages (`tap-ctl-vhd-create.8`), in `man/`.
pub fn man_pages(cmd: clap::Command, section: &'static str) -> Vec<Generated> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Builds the display names of subcommands ("tap-ctl-open") and
    // propagates global options (--socket) into every subcommand's page.
    cmd.build();
    let mut out = Vec::new();
    collect(&cmd, section, &mut out);
    out
}

fn collect(cmd: &clap::Command, section: &'static str, out: &mut Vec<Generated>) {
    let title = cmd
        .get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string();
    let mut bytes = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .manual("tapjail")
        .source(concat!("tapjail ", env!("CARGO_PKG_VERSION")))
        .render(&mut bytes)
        .expect("rendering into memory cannot fail");
    out.push(Generated {
        path: PathBuf::from("man").join(format!("{title}.{section}")),
        bytes,
    });
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub, section, out);
    }
}

/// bash, zsh and fish completions, at the paths the package installs
/// them from (`completions/bash/tap-ctl`, `completions/zsh/_tap-ctl`,
/// `completions/fish/tap-ctl.fish`).
pub fn completions(cmd: clap::Command) -> Vec<Generated> {
    let name = cmd.get_name().to_string();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| {
            let mut cmd = cmd.clone();
            let mut bytes = Vec::new();
            clap_complete::generate(shell, &mut cmd, name.clone(), &mut bytes);
            let file = match shell {
                Shell::Zsh => format!("_{name}"),
                Shell::Fish => format!("{name}.fish"),
                _ => name.clone(),
            };
            Generated {
                path: PathBuf::from("completions")
                    .join(shell.to_string())
                    .join(file),
                bytes,
            }
        })
        .collect()
}

/// Compares `files` with their committed copies under `root`; with
/// `TAPJAIL_BLESS=1`, writes them instead. The error lists every stale or
/// missing file and says how to regenerate.
pub fn check_or_bless(root: &Path, files: &[Generated]) -> Result<(), String> {
    let bless = std::env::var(BLESS_ENV).is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for f in files {
        let path = root.join(&f.path);
        if bless {
            let dir = path.parent().expect("generated files sit in a directory");
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            std::fs::write(&path, &f.bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            continue;
        }
        match std::fs::read(&path) {
            Ok(old) if old == f.bytes => {}
            Ok(_) => stale.push(format!("{} is out of date", path.display())),
            Err(e) => stale.push(format!("{}: {e}", path.display())),
        }
    }
    if stale.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\nthe clap definitions changed: regenerate with `dist/gen-docs` and commit dist/",
            stale.join("\n")
        ))
    }
}

/// Renders a man page with groff's warnings on (`groff -man -ww -z`) and
/// returns what groff said; a clean page says nothing.
pub fn groff_warnings(page: &Path) -> Result<String, String> {
    let out = Process::new("groff")
        .args(["-man", "-ww", "-z", "-t"])
        .arg(page)
        .output()
        .map_err(|e| format!("cannot run groff (apt-get install groff-base): {e}"))?;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("groff failed on {}: {said}", page.display()));
    }
    Ok(said)
}

/// [`groff_warnings`] for every page of `files`, as one error naming each
/// page groff complained about.
pub fn lint_pages(root: &Path, files: &[Generated]) -> Result<(), String> {
    let mut bad = Vec::new();
    for f in files.iter().filter(|f| f.path.starts_with("man")) {
        let path = root.join(&f.path);
        let said = groff_warnings(&path)?;
        if !said.trim().is_empty() {
            bad.push(format!("{}:\n{said}", path.display()));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> clap::Command {
        clap::Command::new("toy")
            .about("A toy")
            .arg(clap::Arg::new("socket").long("socket").global(true))
            .subcommand(
                clap::Command::new("vhd")
                    .about("Images")
                    .subcommand(clap::Command::new("create").about("Make one")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_subcommand_with_global_options() {
        let pages = man_pages(toy(), "8");
        let names: Vec<_> = pages.iter().map(|p| p.path.clone()).collect();
        assert_eq!(
            names,
            ["man/toy.8", "man/toy-vhd.8", "man/toy-vhd-create.8"].map(PathBuf::from)
        );
        let create = String::from_utf8(pages[2].bytes.clone()).unwrap();
        assert!(create.contains("socket"), "{create}");
    }

    #[test]
    fn stale_and_missing_files_are_named() {
        let dir = tempfile_dir();
        let files = completions(toy());
        let err = check_or_bless(&dir, &files).unwrap_err();
        assert!(err.contains("completions/bash/toy"), "{err}");
        for f in &files {
            let p = dir.join(&f.path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, &f.bytes).unwrap();
        }
        check_or_bless(&dir, &files).unwrap();
        std::fs::write(dir.join("completions/zsh/_toy"), b"old").unwrap();
        let err = check_or_bless(&dir, &files).unwrap_err();
        assert!(err.contains("_toy is out of date"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn groff_reports_a_broken_page() {
        let dir = tempfile_dir();
        let page = dir.join("bad.8");
        std::fs::write(&page, ".TH BAD 8\n.SH NAME\nbad\n.BOGUSMACRO x\n").unwrap();
        let said = groff_warnings(&page).unwrap();
        assert!(said.contains("BOGUSMACRO"), "{said}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "docgen-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
