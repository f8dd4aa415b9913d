//! `TAPJAIL_LOG` / `RUST_LOG` to an `EnvFilter`, never failing: a filter
//! that does not parse is named in a warning and the default is used, so a
//! typo in a unit file costs the operator some lines, not the daemon.

use tracing_subscriber::EnvFilter;

/// What is shown when neither variable is set (or the one set is bad).
pub const DEFAULT_FILTER: &str = "info";

/// The filter chosen, its text, and why the asked one was not taken.
#[derive(Debug)]
pub struct FilterChoice {
    pub filter: EnvFilter,
    /// The directives in force, as a worker is given them.
    pub text: String,
    pub warning: Option<String>,
}

/// `tapjail_log` if set, else `rust_log`, else [`DEFAULT_FILTER`]. An empty
/// value counts as unset (as `RUST_LOG=` does for env_logger).
pub fn parse_filter(tapjail_log: Option<&str>, rust_log: Option<&str>) -> FilterChoice {
    let set = |v: Option<&str>| {
        v.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (name, asked) = match (set(tapjail_log), set(rust_log)) {
        (Some(v), _) => (super::FILTER_ENV, v),
        (None, Some(v)) => (super::RUST_LOG_ENV, v),
        (None, None) => return default_choice(None),
    };
    match EnvFilter::builder().parse(&asked) {
        Ok(filter) => FilterChoice {
            filter,
            text: asked,
            warning: None,
        },
        Err(e) => {
            // Debug-quoted: a control character in the variable stays visible.
            let shown: String = asked.chars().take(200).collect();
            default_choice(Some(format!(
                "{name}={shown:?} is not a log filter ({e}); using {DEFAULT_FILTER:?}. \
                 Write LEVEL or TARGET=LEVEL[,...] with LEVEL one of \
                 error, warn, info, debug, trace, off (e.g. {name}=tap_broker=debug,info)"
            )))
        }
    }
}

fn default_choice(warning: Option<String>) -> FilterChoice {
    FilterChoice {
        filter: EnvFilter::new(DEFAULT_FILTER),
        text: DEFAULT_FILTER.to_owned(),
        warning,
    }
}
