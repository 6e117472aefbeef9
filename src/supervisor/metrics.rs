//! The supervisor's own counters and distributions (the output's live in
//! [`crate::playback::OutputCounters`], control's in [`crate::control::ControlCounters`]):
//! atomics for everything any thread bumps, and the rolling windows of detection, failover and
//! rebuild times, which only the event thread records into (a locking recorder, never on a
//! real-time thread).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::metrics::RollingWindow;

/// Samples kept per distribution.
const WINDOW: usize = 1024;

/// Live metrics, shared by every thread of the supervisor.
pub struct Metrics {
    pub crash_count: AtomicU64,
    pub replacements: AtomicU64,
    pub spare_ready: AtomicBool,
    pub standby_on_other_cpu: AtomicBool,
    pub shm_leaks: AtomicU64,
    /// Segments in the manifest at the last audit.
    pub shm_segments: AtomicU64,
    pub stale_segments_reclaimed: AtomicU64,
    pub hang_kills: AtomicU64,
    /// Workers killed for a fault the supervisor saw in their memory (a published block that
    /// no longer checks out).
    pub faulty_kills: AtomicU64,
    pub state_resyncs: AtomicU64,
    /// Worker starts postponed by the restart intensity limit (crash loop backoff).
    pub throttled_spawns: AtomicU64,
    /// Worker starts that failed (e.g. no space for their segments), each retry counted.
    pub spawn_failures: AtomicU64,
    /// Memory the audio path touches that could not be locked (mlock refused).
    pub mlock_failures: AtomicU64,
    /// Monitor reports dropped because the event queue was full (never expected).
    pub events_dropped: AtomicU64,
    /// Takeovers for which no standby or reserve was ready (a worker started cold).
    pub cold_starts: AtomicU64,
    /// Changes withdrawn because the workers that applied them died (see control.rs).
    pub control_quarantined: AtomicU64,
    /// Highest count of messages a worker applied after their stamped frame (should stay 0).
    pub control_late: AtomicU64,
    /// Highest of a worker's [`crate::shm::ring::RewindStats`], field by field.
    pub control_rewinds: AtomicU64,
    pub control_rewritten_blocks: AtomicU64,
    pub control_rewrites_refused: AtomicU64,
    pub control_rewinds_failed: AtomicU64,
    pub worker_resyncs: AtomicU64,
    pub primary_pid: AtomicU32,
    pub spare_pid: AtomicU32,
    pub reserve_pid: AtomicU32,
    pub monitor_realtime: AtomicBool,
    pub worker_realtime: AtomicBool,
    /// Workers run under their seccomp filter (false, for good, once one ran without it).
    pub worker_sandboxed: AtomicBool,
    /// f64 bits.
    pub cpu_percent: AtomicU64,
    /// Recorded by the event thread, read by snapshots.
    windows: crate::sys::PiMutex<Windows>,
}

pub(crate) struct Windows {
    pub detection_ms: RollingWindow,
    pub failover_ms: RollingWindow,
    pub rebuild_ms: RollingWindow,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            crash_count: AtomicU64::new(0),
            replacements: AtomicU64::new(0),
            spare_ready: AtomicBool::new(false),
            standby_on_other_cpu: AtomicBool::new(false),
            shm_leaks: AtomicU64::new(0),
            shm_segments: AtomicU64::new(0),
            stale_segments_reclaimed: AtomicU64::new(0),
            hang_kills: AtomicU64::new(0),
            faulty_kills: AtomicU64::new(0),
            state_resyncs: AtomicU64::new(0),
            throttled_spawns: AtomicU64::new(0),
            spawn_failures: AtomicU64::new(0),
            mlock_failures: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            cold_starts: AtomicU64::new(0),
            control_quarantined: AtomicU64::new(0),
            control_late: AtomicU64::new(0),
            control_rewinds: AtomicU64::new(0),
            control_rewritten_blocks: AtomicU64::new(0),
            control_rewrites_refused: AtomicU64::new(0),
            control_rewinds_failed: AtomicU64::new(0),
            worker_resyncs: AtomicU64::new(0),
            primary_pid: AtomicU32::new(0),
            spare_pid: AtomicU32::new(0),
            reserve_pid: AtomicU32::new(0),
            monitor_realtime: AtomicBool::new(false),
            worker_realtime: AtomicBool::new(false),
            worker_sandboxed: AtomicBool::new(true),
            cpu_percent: AtomicU64::new(0),
            windows: crate::sys::PiMutex::new(Windows {
                detection_ms: RollingWindow::new(WINDOW),
                failover_ms: RollingWindow::new(WINDOW),
                rebuild_ms: RollingWindow::new(WINDOW),
            }),
        }
    }
}

impl Metrics {
    /// Records into the distributions. Takes a lock: the event thread's, never an audio
    /// thread's (the output thread and the monitor only touch atomics).
    pub(crate) fn record_locked(&self, f: impl FnOnce(&mut Windows)) {
        f(&mut self.windows.lock());
    }

    /// (detection, failover, rebuild) now: copied under the lock, summarised outside it.
    pub(crate) fn distributions(&self) -> (crate::metrics::Summary, crate::metrics::Summary, crate::metrics::Summary) {
        let (det, fo, rb) = {
            let w = self.windows.lock();
            (w.detection_ms.clone(), w.failover_ms.clone(), w.rebuild_ms.clone())
        };
        (det.summary(), fo.summary(), rb.summary())
    }

    pub(crate) fn set_cpu_percent(&self, v: f64) {
        self.cpu_percent.store(v.to_bits(), Ordering::Relaxed);
    }
}
