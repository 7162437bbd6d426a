//! Logging setup: logfmt or JSON lines on stderr, at `--log.level`.
//!
//! Our own crates log at the chosen level; dependencies (hyper, h2, ...) are held to `warn` so
//! `--log.level debug` shows what aistack does, not every socket event.

use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{LogFormat, LogLevel};

impl From<LogLevel> for LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Error => LevelFilter::ERROR,
        }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`.
pub fn init(level: LogLevel, format: LogFormat) {
    let level = LevelFilter::from(level);
    let filter = Targets::new()
        .with_target("aistack_common", level)
        .with_target("aistack_exporter", level)
        .with_target("aistack_actioner", level)
        .with_target("tower_http", level)
        .with_default(level.min(LevelFilter::WARN));
    let output = match format {
        LogFormat::Logfmt => tracing_logfmt::builder()
            .with_span_name(false)
            .with_span_path(false)
            .layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .try_init();
}
