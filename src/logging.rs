//! Log output set-up: JSON lines by default, plain text on request.
//!
//! The level filter comes from `RUST_LOG` (default `info`). Log lines never
//! carry a ticket, a token or the `/ws` query string: tickets are logged by
//! their hashed id, and no request URI is logged.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only help a terminal; in a file or a pipe they are noise.
    let colours = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(colours)
        .with_target(false);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A subscriber already installed (by an embedding program) stays in place.
    let _ = result;
}
