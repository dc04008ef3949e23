//! Logging on `tracing`: levels, a filter (`log.level`, or `RUST_LOG` when set), and two
//! formats: `text` for people and `json` (one object per line) for log shippers. Lines about a
//! release carry its digest (the `release` span, or a `digest` field), lines of a rollout step
//! the step.
//!
//! Under systemd (`JOURNAL_STREAM` set) the text format leaves the time out: the journal stamps
//! every line itself.

use crate::config::{LogConfig, LogFormat};
use tracing_subscriber::EnvFilter;

/// Installs the process's subscriber (once; later calls change nothing). Logs go to stderr.
pub fn init(config: &LogConfig) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ => EnvFilter::new(config.level.as_str()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match config.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().with_ansi(false).try_init()
        }
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
