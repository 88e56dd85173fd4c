//! Logs: `tracing`, as text or JSON lines (LOG_FORMAT), level from RUST_LOG (default `info`).
//!
//! What is logged never holds the Authorization header, tokens, passwords, SECRET_KEY,
//! password hashes or URLs with credentials: requests are logged by route template, and
//! settings by name only.

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::settings::LogFormat;

/// A subscriber writing to `writer` in `format`.
pub fn subscriber<W>(format: &LogFormat, filter: EnvFilter, writer: W) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(false);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// Installs the process-wide subscriber, to stderr.
pub fn init(format: &LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second init (tests) keeps the first subscriber.
    let _ = tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr));
}
