//! Metrics: counters and gauges in atomics (the output thread only ever touches these), and
//! duration distributions over rolling windows, fed by the monitor and control threads.

pub mod histogram;
pub mod window;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use serde::Serialize;

pub use window::{percentile, RollingWindow, Summary};

/// Samples kept per distribution.
const WINDOW: usize = 1024;

/// Live metrics, shared by every thread of the supervisor.
pub struct Metrics {
    pub crash_count: AtomicU64,
    pub replacements: AtomicU64,
    pub spare_ready: AtomicBool,
    pub shm_leaks: AtomicU64,
    /// Segments in the manifest at the last audit.
    pub shm_segments: AtomicU64,
    pub stale_segments_reclaimed: AtomicU64,
    pub hang_kills: AtomicU64,
    pub state_resyncs: AtomicU64,
    /// Worker starts postponed by the restart intensity limit (crash loop backoff).
    pub throttled_spawns: AtomicU64,
    /// Output thread: periods in which no ring held the block the output needed.
    pub underruns: AtomicU64,
    pub frames_played: AtomicU64,
    /// Output thread: xruns of the device's own buffer (the output thread was late), recovered.
    pub device_xruns: AtomicU64,
    /// Output thread: times the device went away (then reopened with backoff).
    pub device_losses: AtomicU64,
    /// Output thread: frames queued in the device after the last write.
    pub output_latency_frames: AtomicU64,
    /// Output thread: how late it woke up for each block, µs (virtual clock: after the period's
    /// deadline; device: for how long the device had room for the block before the wake-up).
    pub output_wake_late_us: histogram::AtomicHistogram,
    /// Output thread: sequence number of the last control message in the played stream.
    pub played_seq: AtomicU64,
    pub control_received: AtomicU64,
    /// Messages superseded by a later one stamped for the same frame (see control.rs).
    pub control_coalesced: AtomicU64,
    pub control_rejected: AtomicU64,
    /// Changes refused because a worker's control ring was full (see ControlError::Busy).
    pub control_busy: AtomicU64,
    /// Deliveries that found a worker's control ring full (the worker gets a replay later).
    pub control_undelivered: AtomicU64,
    /// Highest count of messages a worker applied after their stamped frame (should stay 0).
    pub control_late: AtomicU64,
    pub primary_pid: AtomicU32,
    pub spare_pid: AtomicU32,
    pub reserve_pid: AtomicU32,
    pub output_realtime: AtomicBool,
    pub monitor_realtime: AtomicBool,
    pub worker_realtime: AtomicBool,
    /// f64 bits.
    pub cpu_percent: AtomicU64,
    /// Shared by the monitor (RT) and readers: priority inheritance.
    pub(crate) windows: crate::sys::PiMutex<Windows>,
}

pub(crate) struct Windows {
    pub detection_ms: RollingWindow,
    pub failover_ms: RollingWindow,
    pub rebuild_ms: RollingWindow,
    pub control_latency_samples: RollingWindow,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            crash_count: AtomicU64::new(0),
            replacements: AtomicU64::new(0),
            spare_ready: AtomicBool::new(false),
            shm_leaks: AtomicU64::new(0),
            shm_segments: AtomicU64::new(0),
            stale_segments_reclaimed: AtomicU64::new(0),
            hang_kills: AtomicU64::new(0),
            state_resyncs: AtomicU64::new(0),
            throttled_spawns: AtomicU64::new(0),
            underruns: AtomicU64::new(0),
            frames_played: AtomicU64::new(0),
            device_xruns: AtomicU64::new(0),
            device_losses: AtomicU64::new(0),
            output_latency_frames: AtomicU64::new(0),
            output_wake_late_us: Default::default(),
            played_seq: AtomicU64::new(0),
            control_received: AtomicU64::new(0),
            control_coalesced: AtomicU64::new(0),
            control_rejected: AtomicU64::new(0),
            control_busy: AtomicU64::new(0),
            control_undelivered: AtomicU64::new(0),
            control_late: AtomicU64::new(0),
            primary_pid: AtomicU32::new(0),
            spare_pid: AtomicU32::new(0),
            reserve_pid: AtomicU32::new(0),
            output_realtime: AtomicBool::new(false),
            monitor_realtime: AtomicBool::new(false),
            worker_realtime: AtomicBool::new(false),
            cpu_percent: AtomicU64::new(0),
            windows: crate::sys::PiMutex::new(Windows {
                detection_ms: RollingWindow::new(WINDOW),
                failover_ms: RollingWindow::new(WINDOW),
                rebuild_ms: RollingWindow::new(WINDOW),
                control_latency_samples: RollingWindow::new(WINDOW),
            }),
        }
    }
}

/// A consistent-enough copy of every metric, for tests, logs and (later) D-Bus.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsSnapshot {
    pub crash_count: u64,
    pub replacements: u64,
    pub spare_ready: bool,
    pub shm_leaks: u64,
    pub shm_segments: u64,
    pub stale_segments_reclaimed: u64,
    pub hang_kills: u64,
    pub state_resyncs: u64,
    pub throttled_spawns: u64,
    pub detection_time_ms: Dist,
    pub failover_time_ms: Dist,
    pub rebuild_time_ms: Dist,
    pub underruns: u64,
    pub frames_played: u64,
    pub device_xruns: u64,
    pub device_losses: u64,
    /// The output device ("virtual", "wav:PATH" or the ALSA PCM name) and what it agreed to.
    pub device: String,
    pub period_frames: u32,
    pub buffer_frames: u32,
    pub output_latency_ms: f64,
    pub output_wake_late_us: histogram::HistogramSummary,
    pub control_received: u64,
    /// Accepted messages heard in the played stream (not counting coalesced ones).
    pub control_applied: u64,
    pub control_coalesced: u64,
    pub control_rejected: u64,
    pub control_busy: u64,
    pub control_undelivered: u64,
    pub control_late: u64,
    pub control_latency_p95_samples: u64,
    pub control_latency_p99_samples: u64,
    pub primary_pid: u32,
    pub spare_pid: u32,
    pub reserve_pid: u32,
    pub realtime: bool,
    pub cpu_percent: f64,
    pub sample_rate: u32,
    pub uptime_s: f64,
}

/// A distribution over the rolling window: last value, percentiles, max, count ever.
pub type Dist = Summary;

impl Metrics {
    pub(crate) fn record(&self, f: impl FnOnce(&mut Windows)) {
        f(&mut self.windows.lock());
    }

    pub(crate) fn set_cpu_percent(&self, v: f64) {
        self.cpu_percent.store(v.to_bits(), Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, sample_rate: u32, uptime_s: f64) -> MetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // Copy under the lock, sort outside it: the monitor (RT) records into these windows.
        let copies = Some(self.windows.lock()).map(|w| {
            (w.detection_ms.clone(), w.failover_ms.clone(), w.rebuild_ms.clone(), w.control_latency_samples.clone())
        });
        let (det, fo, rb, lat) = match copies {
            Some((a, b, c, d)) => (a.summary(), b.summary(), c.summary(), d.summary()),
            None => Default::default(),
        };
        MetricsSnapshot {
            crash_count: r(&self.crash_count),
            replacements: r(&self.replacements),
            spare_ready: self.spare_ready.load(Ordering::Relaxed),
            shm_leaks: r(&self.shm_leaks),
            shm_segments: r(&self.shm_segments),
            stale_segments_reclaimed: r(&self.stale_segments_reclaimed),
            hang_kills: r(&self.hang_kills),
            state_resyncs: r(&self.state_resyncs),
            throttled_spawns: r(&self.throttled_spawns),
            detection_time_ms: det,
            failover_time_ms: fo,
            rebuild_time_ms: rb,
            underruns: r(&self.underruns),
            frames_played: r(&self.frames_played),
            device_xruns: r(&self.device_xruns),
            device_losses: r(&self.device_losses),
            // Filled in by the supervisor, which knows the device.
            device: String::new(),
            period_frames: 0,
            buffer_frames: 0,
            output_latency_ms: r(&self.output_latency_frames) as f64 * 1000.0 / sample_rate as f64,
            output_wake_late_us: self.output_wake_late_us.summary(),
            control_received: r(&self.control_received),
            control_coalesced: r(&self.control_coalesced),
            // Every sequence number up to this one is in the stream; the supervisor
            // subtracts the coalesced ones.
            control_applied: r(&self.played_seq),
            control_rejected: r(&self.control_rejected),
            control_busy: r(&self.control_busy),
            control_undelivered: r(&self.control_undelivered),
            control_late: r(&self.control_late),
            control_latency_p95_samples: lat.p95 as u64,
            control_latency_p99_samples: lat.p99 as u64,
            primary_pid: self.primary_pid.load(Ordering::Relaxed),
            spare_pid: self.spare_pid.load(Ordering::Relaxed),
            reserve_pid: self.reserve_pid.load(Ordering::Relaxed),
            realtime: self.output_realtime.load(Ordering::Relaxed)
                && self.monitor_realtime.load(Ordering::Relaxed)
                && self.worker_realtime.load(Ordering::Relaxed),
            cpu_percent: f64::from_bits(self.cpu_percent.load(Ordering::Relaxed)),
            sample_rate,
            uptime_s,
        }
    }
}
