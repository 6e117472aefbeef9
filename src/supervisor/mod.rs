//! The supervisor: the systemd main process. It owns the output, runs the engine in worker
//! processes with a pre-warmed standby, and survives any worker crash without an audible trace.
//!
//! ```text
//!  Supervisor::start
//!    monitor thread (RT)   epoll over worker pidfds + worker events + a heartbeat timer;
//!                          failover, spare rebuild, shared-memory reclaim   (monitor.rs)
//!    output thread (RT)    paced device loop, plays block `pos` from any ring that holds a
//!                          valid one, preferring the active worker's          (output/)
//!    housekeeping thread   manifest audit, CPU usage                          (housekeeping.rs)
//!    Control               stamps and broadcasts changes                      (control.rs)
//! ```
//!
//! The monitor and the output thread share the [`SlotTable`]: a fixed array of pointers to the
//! workers' rings. The output thread only loads those pointers; the monitor frees a ring only
//! after the output thread has finished two more periods (an epoch-based grace period), so the
//! output thread never locks.

mod events;
mod housekeeping;
mod live;
mod metrics;
mod monitor;
mod spawn;
mod start;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::control::{Control, ControlCore};
use crate::metrics::MetricsSnapshot;
use crate::playback::Playback;
use crate::shm::registry::{Registry, ShmError};
use crate::shm::ring::RingGeometry;
use crate::sys::EventFd;
use metrics::Metrics;

pub use crate::playback::MAX_SLOTS;

pub use events::SpawnError;

/// The segment ids of worker `id` in table slot `slot`: its audio ring and its control ring.
pub(crate) fn segment_ids(slot: usize, id: u64) -> [String; 2] {
    [format!("ring-{slot}-g{id}"), format!("ctl-{slot}-g{id}")]
}

pub use crate::shm::control::CONTROL_CAPACITY;

/// State shared by all threads of the supervisor.
pub(crate) struct Shared {
    pub config: Config,
    pub geo: RingGeometry,
    /// What the output thread may touch: the slot table, the position, its counters.
    pub play: Arc<Playback>,
    /// Heartbeat ticks the monitor has handled (the watchdog's proof that it is alive).
    pub monitor_ticks: AtomicU64,
    /// The output as opened at start.
    pub device: std::sync::OnceLock<OutputInfo>,
    /// The primary has rendered its whole lookahead once (start-up gate for the output).
    pub primed: AtomicBool,
    pub metrics: Metrics,
    pub control: Arc<ControlCore>,
    pub shm: crate::sys::PiMutex<ShmBook>,
    /// The registry changed: housekeeping rewrites the manifest (never the monitor: no manifest
    /// I/O on the real-time thread).
    pub manifest_dirty: EventFd,
    /// Why the monitor could not start the first workers (read by `Supervisor::start`).
    pub start_failure: Mutex<Option<SpawnError>>,
    pub started: Instant,
    /// Priorities and restart intensity, as last (re)loaded.
    pub live: live::Live,
    pub osc: crate::metrics::OscCounters,
}

impl Shared {
    /// The output's clock now: (the first block the output has not begun to take, the frame
    /// being played now, interpolated within its block).
    pub(crate) fn output_now(&self) -> (u64, u64) {
        self.play.position.now(&self.play.settings)
    }

    /// Every metric now, from where each is kept: the supervisor's counters, the output's
    /// (playback) and control's. One line per metric (the struct literal makes a new metric
    /// declared in metrics/declare.rs impossible to forget here).
    #[allow(clippy::too_many_lines)] // one line per metric, by design (see above)
    fn snapshot(&self) -> MetricsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (sup, out, ctl) = (&self.metrics, &self.play.counters, &self.control.counters);
        let (detection, failover, rebuild) = sup.distributions();
        let latency = self.control.latency_summary();
        let device = self.device.get();
        let cold_start_underruns = r(&out.cold_start_underruns);
        MetricsSnapshot {
            crash_count: r(&sup.crash_count),
            replacements: r(&sup.replacements),
            spare_ready: sup.spare_ready.load(Ordering::Relaxed),
            standby_on_other_cpu: sup.standby_on_other_cpu.load(Ordering::Relaxed),
            shm_leaks: r(&sup.shm_leaks),
            shm_segments: r(&sup.shm_segments),
            stale_segments_reclaimed: r(&sup.stale_segments_reclaimed),
            hang_kills: r(&sup.hang_kills),
            faulty_kills: r(&sup.faulty_kills),
            state_resyncs: r(&sup.state_resyncs),
            throttled_spawns: r(&sup.throttled_spawns),
            spawn_failures: r(&sup.spawn_failures),
            mlock_failures: r(&sup.mlock_failures),
            events_dropped: r(&sup.events_dropped),
            detection_time_ms: detection,
            failover_time_ms: failover,
            rebuild_time_ms: rebuild,
            underruns: cold_start_underruns + r(&out.other_underruns),
            cold_starts: r(&sup.cold_starts),
            cold_start_underruns,
            frames_played: r(&out.frames_played),
            device_xruns: r(&out.device_xruns),
            device_losses: r(&out.device_losses),
            stale_blocks: r(&out.stale_blocks),
            stream_discontinuities: r(&out.discontinuities),
            output_divergences: r(&out.divergences),
            device: device.map(|d| d.name.clone()).unwrap_or_default(),
            period_frames: device.map_or(0, |d| d.period_frames),
            buffer_frames: device.map_or(0, |d| d.buffer_frames),
            output_latency_ms: r(&out.output_latency_frames) as f64 * 1000.0 / self.config.sample_rate as f64,
            output_wake_late_us: out.output_wake_late_us.summary(),
            control_received: r(&ctl.received),
            // Every sequence number up to the last one played is in the stream, less the
            // coalesced and quarantined ones (read under the control lock).
            control_applied: self.control.applied(&out.played_seq),
            control_coalesced: r(&ctl.coalesced),
            control_rejected: r(&ctl.rejected),
            control_busy: r(&ctl.busy),
            osc_received: r(&self.osc.received),
            osc_rejected: r(&self.osc.rejected),
            osc_dropped: r(&self.osc.dropped),
            osc_replies: r(&self.osc.replies),
            control_quarantined: r(&sup.control_quarantined),
            control_undelivered: r(&ctl.undelivered),
            control_late: r(&sup.control_late),
            control_rewinds: r(&sup.control_rewinds),
            control_rewritten_blocks: r(&sup.control_rewritten_blocks),
            control_rewrites_refused: r(&sup.control_rewrites_refused),
            control_rewinds_failed: r(&sup.control_rewinds_failed),
            worker_resyncs: r(&sup.worker_resyncs),
            control_latency_p95_samples: latency.p95 as u64,
            control_latency_p99_samples: latency.p99 as u64,
            primary_pid: sup.primary_pid.load(Ordering::Relaxed),
            spare_pid: sup.spare_pid.load(Ordering::Relaxed),
            reserve_pid: sup.reserve_pid.load(Ordering::Relaxed),
            realtime: out.realtime.load(Ordering::Relaxed)
                && sup.monitor_realtime.load(Ordering::Relaxed)
                && sup.worker_realtime.load(Ordering::Relaxed),
            worker_sandboxed: sup.worker_sandboxed.load(Ordering::Relaxed),
            cpu_percent: f64::from_bits(sup.cpu_percent.load(Ordering::Relaxed)),
            sample_rate: self.config.sample_rate,
            block_frames: self.config.block_frames,
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

pub use crate::output::OutputInfo;

/// The registry plus what the monitor holds: segment id -> CLOCK_MONOTONIC ns at which its
/// owner died (None while it lives). Audits compare the directory against both.
pub(crate) struct ShmBook {
    pub registry: Option<Registry>,
    pub held: std::collections::HashMap<String, Option<u64>>,
}

/// Something the supervisor did, for the library user (tests, benchmarks, the D-Bus layer).
#[derive(Debug, Clone)]
pub enum Event {
    /// A worker died (or was killed as hung). `detected_ns` is CLOCK_MONOTONIC.
    WorkerDied { pid: u32, role: &'static str, status: String, detected_ns: u64 },
    /// A hung worker was declared dead and killed: no progress for `stalled_us`.
    HangDetected { pid: u32, detected_ns: u64, stalled_us: u64, why: &'static str },
    /// The standby took over: it holds the next block the output needs.
    Failover { old_pid: u32, new_pid: u32, detected_ns: u64, failover_ns: u64 },
    /// A replacement worker is ready for its role (a new spare, or a cold-started primary):
    /// it replaces worker `replaces_pid`, whose death was detected at `detected_ns`. Every
    /// death of a primary, spare or reserve is answered by exactly one of these.
    Replaced { pid: u32, role: &'static str, replaces_pid: u32, detected_ns: u64, ready_ns: u64 },
    /// A new reserve worker is ready (started, mapped, locked, idle). `after_death_of`: the
    /// worker whose death (and the takeover it caused) this reserve refills the pool after;
    /// None for the reserve started with the supervisor.
    ReserveReady { pid: u32, after_death_of: Option<u32>, spawned_ns: u64, ready_ns: u64 },
    /// A worker was refused SCHED_FIFO (reported once per supervisor).
    RealtimeRefused { pid: u32 },
    /// A dead worker's segments were unlinked and dropped from the manifest.
    Reclaimed { pid: u32, segments: Vec<String> },
    /// Change `seq` (to `value`) killed `deaths` workers that applied it: withdrawn from every
    /// worker; the stream keeps `kept`.
    Quarantined { seq: u64, value: f64, deaths: u32, kept: f64 },
}

/// The lifecycle state, as D-Bus reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Workers starting, the output not yet playing.
    Starting,
    /// Playing, with the configured standby ready: a crash now is inaudible.
    Running,
    /// Playing, but without a ready standby (rebuilding, or a crash loop being throttled):
    /// a crash now would be audible.
    Degraded,
    Stopping,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Degraded => "degraded",
            State::Stopping => "stopping",
        }
    }
}

/// A cheap, cloneable view of a running supervisor for other threads (the D-Bus service):
/// control, metrics, state and events, without ownership.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Event>>>>,
}

impl Handle {
    /// The OSC server's counters (it counts; snapshots read them).
    pub fn osc_counters(&self) -> &crate::metrics::OscCounters {
        &self.shared.osc
    }

    /// Waits until what D-Bus shows (state, primary, spare, frequency, gain) may have
    /// changed, or an event was published, or `timeout` passed.
    pub fn wait_for_change(&self, timeout: Duration) {
        self.shared.play.changed.wait(Some(timeout));
    }

    /// Wakes [`Handle::wait_for_change`] (e.g. the D-Bus side is stopping).
    pub fn note_change(&self) {
        self.shared.play.changed.notify();
    }

    pub fn control(&self) -> Control {
        Control { core: self.shared.control.clone() }
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.snapshot()
    }

    pub fn metrics_spare_ready(&self) -> bool {
        self.shared.metrics.spare_ready.load(Ordering::Acquire)
    }

    pub fn primary_pid(&self) -> u32 {
        self.shared.metrics.primary_pid.load(Ordering::Relaxed)
    }

    /// New real-time priorities for the output, monitor and render threads, applied to the
    /// running ones now and to those started later. Returns what the kernel refused, one line
    /// each.
    pub fn set_priorities(&self, output: i32, monitor: i32, render: i32) -> Vec<String> {
        let m = &self.shared.metrics;
        let workers = [&m.primary_pid, &m.spare_pid, &m.reserve_pid].map(|p| p.load(Ordering::Relaxed));
        self.shared.live.set_priorities(&self.shared.play, output, monitor, render, &workers)
    }

    /// A new restart intensity: more than `max_restarts` worker deaths within `window_s`
    /// seconds throttle new workers (from the next spawn on).
    pub fn set_restart_intensity(&self, max_restarts: u32, window_s: u32) {
        self.shared.live.set_restart_intensity(max_restarts, window_s);
    }

    pub fn state(&self) -> State {
        let sh = &self.shared;
        if !sh.play.running.load(Ordering::Acquire) {
            State::Stopping
        } else if !sh.primed.load(Ordering::Acquire) {
            State::Starting
        } else if sh.play.degraded.load(Ordering::Acquire)
            || sh.metrics.primary_pid.load(Ordering::Relaxed) == 0
            || (sh.config.standby != crate::config::StandbyMode::None
                && !sh.metrics.spare_ready.load(Ordering::Acquire))
        {
            State::Degraded
        } else {
            State::Running
        }
    }

    /// Every event from now on. The receiver is dropped from the list once it is dropped.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    /// The output position in frames.
    pub fn position_frames(&self) -> u64 {
        self.shared.play.position.blocks() * self.shared.config.block_frames as u64
    }

    /// Whole seconds since start.
    pub fn uptime_s(&self) -> u64 {
        self.shared.started.elapsed().as_secs()
    }

    /// Heartbeat ticks handled by the monitor thread so far.
    pub fn monitor_ticks(&self) -> u64 {
        self.shared.monitor_ticks.load(Ordering::Relaxed)
    }

    /// The frame the output is playing now (interpolated within its block).
    pub fn frame_now(&self) -> u64 {
        self.shared.output_now().1
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }
}

/// Why the supervisor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Shm(#[from] ShmError),
    #[error("cannot open output: {0}")]
    Output(#[from] crate::output::OutputError),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot set up the monitor: {0}")]
    Monitor(std::io::Error),
    #[error("the first worker did not become ready within {0:?}: {1}")]
    NotReady(Duration, String),
    #[error("cannot start the first workers: {0}")]
    Spawn(SpawnError),
}

impl StartError {
    /// The shm file system is full (ENOSPC, or a quota): worth waiting for, not fatal.
    pub fn is_no_space(&self) -> bool {
        let errno = match self {
            StartError::Shm(e) => e.op_errno().1,
            StartError::Spawn(SpawnError::Io { errno, .. }) => *errno,
            _ => 0,
        };
        matches!(errno, libc::ENOSPC | libc::EDQUOT)
    }
}

/// A running supervisor. Dropping it shuts everything down (like [`Supervisor::shutdown`]).
pub struct Supervisor {
    shared: Arc<Shared>,
    stop: Arc<EventFd>,
    monitor: Option<JoinHandle<()>>,
    output: Option<JoinHandle<()>>,
    housekeeping: Option<JoinHandle<()>>,
    events: Option<JoinHandle<()>>,
    wav: Option<crate::output::wav::WavRecorder>,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Event>>>>,
    shm_dir: PathBuf,
    /// The PM QoS request, held while running (see --cpu-latency-qos-us).
    _cpu_latency: Option<std::fs::File>,
}

/// Small stacks for our threads: start-up's mlockall(MCL_CURRENT) locks every page of the
/// stacks that exist then.
const THREAD_STACK: usize = 256 * 1024;

impl Supervisor {
    /// A handle to change frequency and gain.
    pub fn control(&self) -> Control {
        Control { core: self.shared.control.clone() }
    }

    /// Every metric, now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.snapshot()
    }

    /// Every event from now on (see [`Handle::subscribe`]).
    pub fn subscribe(&self) -> Receiver<Event> {
        self.handle().subscribe()
    }

    /// A view for other threads.
    pub fn handle(&self) -> Handle {
        Handle { shared: self.shared.clone(), subscribers: self.subscribers.clone() }
    }

    pub fn state(&self) -> State {
        self.handle().state()
    }

    /// The output position in frames.
    pub fn position_frames(&self) -> u64 {
        self.shared.play.position.blocks() * self.shared.config.block_frames as u64
    }

    pub fn shm_dir(&self) -> &Path {
        &self.shm_dir
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Stops the output, stops the workers (SIGTERM, then SIGKILL after a timeout), unlinks
    /// every segment and the manifest, and finishes the WAV file.
    ///
    /// # Errors
    /// Only the WAV file's final write can fail; everything else is best effort and logged.
    pub fn shutdown(mut self) -> Result<(), crate::output::wav::WavError> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> Result<(), crate::output::wav::WavError> {
        self.shared.play.running.store(false, Ordering::Release);
        self.shared.control.stop();
        if let Some(h) = self.output.take() {
            let _ = h.join();
        }
        self.stop.notify();
        // The event thread ends when the monitor has dropped its sender.
        for h in [self.monitor.take(), self.housekeeping.take(), self.events.take()].into_iter().flatten() {
            let _ = h.join();
        }
        {
            let mut book = self.shared.shm.lock();
            if let Some(reg) = book.registry.take() {
                if let Err(e) = reg.remove_all() {
                    tracing::warn!("cleaning up {}: {e}", self.shm_dir.display());
                }
            }
        }
        match self.wav.take() {
            Some(w) => w.finish().map(|_| ()),
            None => Ok(()),
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if self.monitor.is_some() || self.output.is_some() {
            let _ = self.stop_all();
        }
    }
}
