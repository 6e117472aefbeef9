//! Metrics: every one declared once ([`declare`]: name, kind, unit, D-Bus type, meaning; the
//! snapshot type comes from there), and the two recorders the threads use: the wait-free
//! [`histogram::AtomicHistogram`] (the output thread's) and [`window::RollingWindow`]s behind
//! a lock (the event thread's and the control thread's, never a real-time thread's). The
//! counters themselves live with the threads that own them (`playback`, `control`,
//! `supervisor`); the supervisor copies them into a [`MetricsSnapshot`].

pub mod declare;
pub mod exposition;
pub mod histogram;
pub mod window;

pub use declare::{count_key, Decl, Kind, MetricsSnapshot, Value, METRICS};
pub use window::{percentile, RollingWindow, Summary};

/// A distribution over the rolling window: last value, percentiles, max, count ever.
pub type Dist = Summary;

/// The OSC server's counters (bumped by its thread, copied into snapshots by the supervisor).
#[derive(Debug, Default)]
pub struct OscCounters {
    pub received: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
    pub replies: std::sync::atomic::AtomicU64,
}
