//! tap-ctl's man pages (`tap-ctl(8)`, one per subcommand) and its bash, zsh
//! and fish completions, generated from [`crate::Cli`] and checked against
//! the committed copies under `dist/` (`dist/gen-docs` regenerates them).

use clap::CommandFactory;

fn generated() -> Vec<tapjail_docgen::Generated> {
    let mut files = tapjail_docgen::man_pages(crate::Cli::command(), "8");
    files.extend(tapjail_docgen::completions(crate::Cli::command()));
    files
}

#[test]
fn man_pages_and_completions_match_the_cli() {
    let files = generated();
    // Every subcommand has its page: the lifecycle verbs and the tools.
    for page in [
        "tap-ctl.8",
        "tap-ctl-open.8",
        "tap-ctl-vhd-create.8",
        "tap-ctl-list.8",
    ] {
        assert!(
            files.iter().any(|f| f.path.ends_with(page)),
            "no {page} among {:?}",
            files.iter().map(|f| &f.path).collect::<Vec<_>>()
        );
    }
    let dist = tapjail_docgen::dist_dir();
    tapjail_docgen::check_or_bless(&dist, &files).unwrap_or_else(|e| panic!("{e}"));
    tapjail_docgen::lint_pages(&dist, &files).unwrap_or_else(|e| panic!("{e}"));
}

/// Every argument of `cmd` and its subcommands without a help text, as
/// `tap-ctl vhd create --name`.
fn undocumented(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    let here = format!("{path} {}", cmd.get_name());
    for a in cmd.get_arguments() {
        let id = a.get_id().as_str();
        if matches!(id, "help" | "version") || a.is_hide_set() || a.is_global_set() {
            continue;
        }
        if a.get_help().is_none() && a.get_long_help().is_none() {
            let flag = a
                .get_long()
                .map(|l| format!("--{l}"))
                .or(a.get_short().map(|s| format!("-{s}")))
                .unwrap_or_else(|| id.to_uppercase());
            out.push(format!("{} {flag}", here.trim()));
        }
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        undocumented(sub, &here, out);
    }
}

#[test]
fn every_option_has_a_doc_comment() {
    let mut missing = Vec::new();
    undocumented(&crate::Cli::command(), "", &mut missing);
    assert!(missing.is_empty(), "no help text:\n{}", missing.join("\n"));
}
