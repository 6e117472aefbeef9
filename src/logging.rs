//! Logging: journald (structured fields, SYSLOG_IDENTIFIER=audiowardend) when the journal's
//! socket exists, else human-readable lines on stderr. `RUST_LOG` filters (default `info`).
//!
//! Only non-audio threads log. The output thread and the workers' render loops report
//! through atomics and the supervisor's event queue; the event thread logs for them.

use std::path::Path;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
pub const SYSLOG_IDENTIFIER: &str = "audiowardend";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journald,
    Stderr,
}

/// Installs the global subscriber (once per process). `AUDIOWARDEN_LOG=stderr` forces stderr.
pub fn init() -> Sink {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let want_journal =
        std::env::var("AUDIOWARDEN_LOG").map_or(true, |v| v != "stderr") && Path::new(JOURNAL_SOCKET).exists();
    let journald = want_journal.then(tracing_journald::layer).and_then(Result::ok);
    match journald {
        Some(layer) => {
            let layer = layer.with_syslog_identifier(SYSLOG_IDENTIFIER.into()).with_field_prefix(None);
            tracing_subscriber::registry().with(filter).with(layer).init();
            Sink::Journald
        }
        None => {
            use std::io::IsTerminal;
            let fmt = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal());
            tracing_subscriber::registry().with(filter).with(fmt).init();
            Sink::Stderr
        }
    }
}
