//! Every metric, declared once: its name, what kind it is, its unit, its D-Bus type and its
//! meaning. The snapshot type ([`MetricsSnapshot`]), the list of every metric ([`METRICS`]),
//! the D-Bus dictionary and its list of keys (`dbus::metrics_dict`, `dbus::metric_keys`) and
//! the reference docs/metrics.md (checked by a test) all come from this table. Adding a metric
//! is a line here, the atomic that records it, and the line that copies it into the snapshot
//! (`supervisor::Shared::snapshot`, which the compiler makes you write: a struct literal).

use serde::Serialize;

use super::histogram::HistogramSummary;
use super::window::Summary;

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows.
    Counter,
    /// A value now (it may go down).
    Gauge,
    /// A rolling distribution of durations or sizes: last value, p50, p95, p99, max, count.
    Distribution,
    /// A histogram of every value since start: p50, p99, max.
    Histogram,
    /// A string or a flag that describes the service.
    Info,
}

/// One declared metric.
#[derive(Debug, Clone, Copy)]
pub struct Decl {
    pub name: &'static str,
    pub kind: Kind,
    /// Unit of the value ("" for a plain count).
    pub unit: &'static str,
    /// D-Bus signature of its value in GetMetrics (`u` counts of events and pids, `t` sample
    /// and message counts, `d` times and percentages, `b` flags, `s` strings; distributions
    /// are `d` with a `u` count).
    pub dbus: &'static str,
    pub doc: &'static str,
}

/// A metric's value, borrowed from a snapshot.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    U64(u64),
    U32(u32),
    F64(f64),
    Bool(bool),
    Str(&'a str),
    Dist(&'a Summary),
    Hist(&'a HistogramSummary),
}

impl<'a> From<&'a u64> for Value<'a> {
    fn from(v: &'a u64) -> Self {
        Value::U64(*v)
    }
}
impl<'a> From<&'a u32> for Value<'a> {
    fn from(v: &'a u32) -> Self {
        Value::U32(*v)
    }
}
impl<'a> From<&'a f64> for Value<'a> {
    fn from(v: &'a f64) -> Self {
        Value::F64(*v)
    }
}
impl<'a> From<&'a bool> for Value<'a> {
    fn from(v: &'a bool) -> Self {
        Value::Bool(*v)
    }
}
impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Str(v)
    }
}
impl<'a> From<&'a Summary> for Value<'a> {
    fn from(v: &'a Summary) -> Self {
        Value::Dist(v)
    }
}
impl<'a> From<&'a HistogramSummary> for Value<'a> {
    fn from(v: &'a HistogramSummary) -> Self {
        Value::Hist(v)
    }
}

macro_rules! declare_metrics {
    ($( $(#[doc = $doc:literal])+ $name:ident: $ty:ty, $kind:ident, $unit:literal, $dbus:literal; )*) => {
        /// Every metric at one moment, for tests, logs, D-Bus and `audiowardenctl`
        /// (declared once, in metrics/declare.rs).
        #[derive(Debug, Clone, Default, Serialize)]
        pub struct MetricsSnapshot {
            $( $(#[doc = $doc])+ pub $name: $ty, )*
        }

        /// Every metric, in the order declared.
        pub const METRICS: &[Decl] = &[
            $( Decl { name: stringify!($name), kind: Kind::$kind, unit: $unit, dbus: $dbus, doc: concat!($($doc),+) }, )*
        ];

        impl MetricsSnapshot {
            /// Each metric with its value, in the order declared.
            pub fn each<'a>(&'a self, mut f: impl FnMut(&'static Decl, Value<'a>)) {
                let mut decls = METRICS.iter();
                $( f(decls.next().expect("one declaration per field"), Value::from(&self.$name)); )*
            }
        }
    };
}

declare_metrics! {
    /// Worker deaths (of any cause).
    crash_count: u64, Counter, "", "u";
    /// Replacement workers that became ready for their role (a new spare, or a cold-started primary).
    replacements: u64, Counter, "", "u";
    /// A standby is ready (hot: caught up with the primary): a crash now is inaudible.
    spare_ready: bool, Gauge, "", "b";
    /// The primary and the standby are pinned to different CPUs, so that a stall of one CPU (a long non-preemptible kernel section there) cannot hold up both (false with one CPU, or if the kernel refused).
    standby_on_other_cpu: bool, Gauge, "", "b";
    /// What the last audit of the shm dir found that should not be there (unknown, missing or orphaned segments).
    shm_leaks: u64, Gauge, "", "u";
    /// Segments in the manifest at the last audit.
    shm_segments: u64, Gauge, "", "u";
    /// Segments a previous instance left, swept at start-up.
    stale_segments_reclaimed: u64, Counter, "", "u";
    /// Workers declared hung by the heartbeat (or never ready) and killed.
    hang_kills: u64, Counter, "", "u";
    /// Workers killed for a published block that no longer checks out (state or samples' checksum: a stray write into its memory); replaced from the last valid block.
    faulty_kills: u64, Counter, "", "u";
    /// Takeovers with no valid state anywhere (should stay 0: an audible resync).
    state_resyncs: u64, Counter, "", "u";
    /// Worker starts postponed by the restart intensity (crash loop).
    throttled_spawns: u64, Counter, "", "u";
    /// Worker starts that failed (e.g. no space for their segments), each retry counted; one log line per episode.
    spawn_failures: u64, Counter, "", "u";
    /// Memory the audio path reads that could not be locked (mlock refused).
    mlock_failures: u64, Counter, "", "u";
    /// Monitor reports dropped from a full event queue (should stay 0).
    events_dropped: u64, Counter, "", "u";
    /// Detection: a hang declared or a pidfd seen, to its handling.
    detection_time_ms: Summary, Distribution, "ms", "d";
    /// Failover: detection to the new primary holding the next block the output needs.
    failover_time_ms: Summary, Distribution, "ms", "d";
    /// Rebuild: detection to a replacement ready.
    rebuild_time_ms: Summary, Distribution, "ms", "d";
    /// Periods in which the output was on time and no ring held a valid block.
    underruns: u64, Counter, "", "t";
    /// Takeovers with no standby or reserve ready (a worker started cold).
    cold_starts: u64, Counter, "", "u";
    /// The underruns during cold starts (included in `underruns`: any other underrun is a defect, or a machine stall).
    cold_start_underruns: u64, Counter, "", "t";
    /// Frames played.
    frames_played: u64, Counter, "frames", "t";
    /// Xruns of the output's buffer (the output thread was late): recovered, and counted apart from `underruns`.
    device_xruns: u64, Counter, "", "t";
    /// Times the device went away (then reopened with backoff).
    device_losses: u64, Counter, "", "t";
    /// Blocks played that lacked a change stamped inside them, because no ring had one that did (the change is heard late: should stay 0).
    stale_blocks: u64, Counter, "", "t";
    /// Blocks played that did not continue the block before them, because no ring had one that did (a resync: should stay 0).
    stream_discontinuities: u64, Counter, "", "t";
    /// Blocks of a rendering worker that differed from the one played at the output position (its worker is told to continue from the one played, and replaced if it keeps differing).
    output_divergences: u64, Counter, "", "u";
    /// The output (`virtual`, `wav:PATH`, `alsa:PCM`, `cpal:DEVICE`).
    device: String, Info, "", "s";
    /// The device's period, frames.
    period_frames: u32, Info, "frames", "u";
    /// The device's buffer, frames (0 for the virtual clock).
    buffer_frames: u32, Info, "frames", "u";
    /// Frames queued in the device after the last write, as time.
    output_latency_ms: f64, Gauge, "ms", "d";
    /// How late the output thread woke up for each block (virtual clock: after the deadline; device: for how long it already had room).
    output_wake_late_us: HistogramSummary, Histogram, "us", "u";
    /// Accepted changes.
    control_received: u64, Counter, "", "t";
    /// Accepted changes heard in the played stream (once everything has played, received = applied + coalesced + quarantined).
    control_applied: u64, Counter, "", "t";
    /// Changes superseded by a later one of the same kind stamped for the same frame (never heard on their own).
    control_coalesced: u64, Counter, "", "t";
    /// Refused values.
    control_rejected: u64, Counter, "", "t";
    /// OSC messages received (each message of a bundle counts; a datagram that is not OSC counts once).
    osc_received: u64, Counter, "", "t";
    /// OSC messages that changed nothing because they were malformed or invalid (not OSC, unknown address, wrong argument count or type, a value out of range).
    osc_rejected: u64, Counter, "", "t";
    /// Valid OSC changes dropped because a worker's control ring was full (Busy: UDP has no back channel).
    osc_dropped: u64, Counter, "", "t";
    /// Answers sent to /engine/status queries.
    osc_replies: u64, Counter, "", "t";
    /// Changes refused as busy because a worker's control ring was full of changes still waiting for their frame (backpressure; retrying after a block succeeds).
    control_busy: u64, Counter, "", "t";
    /// Changes withdrawn because the workers that applied them died (twice at the same change).
    control_quarantined: u64, Counter, "", "t";
    /// Deliveries that found a worker's control ring full (that worker is replaced: should stay 0).
    control_undelivered: u64, Counter, "", "t";
    /// Most changes a worker applied after their stamped frame (should stay 0).
    control_late: u64, Gauge, "", "t";
    /// Most times a worker rendered blocks it had committed again, for a change stamped inside them (`--control-stamp rewind`: about one per change).
    control_rewinds: u64, Gauge, "", "t";
    /// Most blocks a worker replaced by a new version in those rewinds.
    control_rewritten_blocks: u64, Gauge, "blocks", "t";
    /// Most block rewrites of a worker that the output refused because it had already taken the block (the change is then heard from the next block, in every ring alike).
    control_rewrites_refused: u64, Gauge, "", "t";
    /// Most rewinds or resyncs a worker could not make (a state or change no longer known): the change is heard late (should stay 0).
    control_rewinds_failed: u64, Gauge, "", "t";
    /// Most times a worker continued from the block the output played instead of its own (it had rendered a change late, or lacked one).
    worker_resyncs: u64, Gauge, "", "t";
    /// Call to first affected sample, p95.
    control_latency_p95_samples: u64, Gauge, "samples", "u";
    /// Call to first affected sample, p99.
    control_latency_p99_samples: u64, Gauge, "samples", "u";
    /// The primary worker (0: none).
    primary_pid: u32, Gauge, "pid", "u";
    /// The standby worker (0: none).
    spare_pid: u32, Gauge, "pid", "u";
    /// The reserve worker (0: none).
    reserve_pid: u32, Gauge, "pid", "u";
    /// The output, monitor and render threads all got SCHED_FIFO.
    realtime: bool, Info, "", "b";
    /// Every worker runs under its seccomp filter.
    worker_sandboxed: bool, Info, "", "b";
    /// CPU used by the supervisor and its workers, percent of one core.
    cpu_percent: f64, Gauge, "percent", "d";
    /// The stream's sample rate.
    sample_rate: u32, Info, "Hz", "u";
    /// Frames per block (one output period).
    block_frames: u32, Info, "frames", "u";
    /// Time since start.
    uptime_s: f64, Gauge, "s", "d";
}

/// A distribution's count key: `detection_time_ms` counts as `detection_count`.
pub fn count_key(name: &str) -> String {
    format!("{}_count", name.trim_end_matches("_time_ms"))
}

/// docs/metrics.md: the reference table of every metric, rendered from the declarations (a
/// test keeps the file current: `AW_REGENERATE=1 cargo test --lib metrics_reference` rewrites
/// it).
pub fn reference_markdown() -> String {
    let mut s = String::from(
        "# Metrics\n\n\
         Generated from `src/metrics/declare.rs` (`AW_REGENERATE=1 cargo test --lib metrics_reference`).\n\
         Read them with `GetMetrics` over D-Bus, `audiowardenctl metrics [--json]`, or\n\
         `Supervisor::metrics()` in-process. A distribution `x_time_ms` is its last value with\n\
         `_p50`, `_p95`, `_p99`, `_max` over the last 1024 events and a count `x_count` ever; a\n\
         histogram `x_us` is `_p50`, `_p99` and `_max` since start (bucket bounds within 25 %, the\n\
         max exact).\n\n\
         | metric | kind | unit | D-Bus | meaning |\n|---|---|---|---|---|\n",
    );
    for d in METRICS {
        let kind = match d.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Distribution => "distribution",
            Kind::Histogram => "histogram",
            Kind::Info => "info",
        };
        s.push_str(&format!("| `{}` | {kind} | {} | `{}` | {} |\n", d.name, d.unit, d.dbus, d.doc.trim()));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");
        let want = reference_markdown();
        if std::env::var_os("AW_REGENERATE").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(have, want, "docs/metrics.md is stale: AW_REGENERATE=1 cargo test --lib metrics_reference");
    }

    #[test]
    fn each_visits_every_declared_metric_in_order() {
        let mut names = Vec::new();
        MetricsSnapshot::default().each(|d, _| names.push(d.name));
        assert_eq!(names, METRICS.iter().map(|d| d.name).collect::<Vec<_>>());
    }
}
