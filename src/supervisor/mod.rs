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

mod housekeeping;
mod live;
mod monitor;
mod spawn;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError, OutputSpec};
use crate::control::{Control, ControlCore};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::output::{self, Sink};
use crate::shm::registry::{Registry, ShmError};
use crate::shm::ring::{AudioRing, RingGeometry};
use crate::sys::EventFd;

/// Ring slots in the table: primary, spare, a spare being built and dead rings still draining.
pub const MAX_SLOTS: usize = 8;

/// Control ring capacity per worker.
pub const CONTROL_CAPACITY: u32 = 4096;

/// What the output thread may touch of a worker: its audio ring and its wake-up.
pub struct WorkerShm {
    pub ring: AudioRing,
    pub wake: EventFd,
    /// The worker renders (the output wakes only those).
    pub running: AtomicBool,
    /// A control message could not be delivered to it: its stream no longer matches the
    /// others', so the monitor replaces it.
    pub diverged: AtomicBool,
}

/// Lock-free table of the rings the output thread plays from.
pub(crate) struct SlotTable {
    cells: [AtomicPtr<WorkerShm>; MAX_SLOTS],
    /// Slot of the primary: tried first.
    active: AtomicUsize,
}

impl SlotTable {
    fn new() -> SlotTable {
        SlotTable { cells: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())), active: AtomicUsize::new(0) }
    }

    /// Monitor: publishes `shm` in `slot`. The caller keeps `shm` alive until `clear` plus a
    /// grace period of two output epochs.
    pub(crate) fn set(&self, slot: usize, shm: &Arc<WorkerShm>) {
        self.cells[slot].store(Arc::as_ptr(shm).cast_mut(), Ordering::Release);
    }

    pub(crate) fn clear(&self, slot: usize) {
        self.cells[slot].store(std::ptr::null_mut(), Ordering::SeqCst);
    }

    pub(crate) fn set_active(&self, slot: usize) {
        self.active.store(slot, Ordering::Release);
    }

    pub(crate) fn is_free(&self, slot: usize) -> bool {
        self.cells[slot].load(Ordering::Acquire).is_null()
    }

    /// Output thread: visits every published ring, the active one first.
    /// Real-time safe (atomic loads only).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&WorkerShm) -> bool) {
        let active = self.active.load(Ordering::Acquire) % MAX_SLOTS;
        for i in 0..MAX_SLOTS {
            let p = self.cells[(active + i) % MAX_SLOTS].load(Ordering::Acquire);
            if p.is_null() {
                continue;
            }
            // SAFETY: a published pointer stays valid until the monitor clears it and then
            // waits two output epochs (see module docs); this thread bumps the epoch only
            // after it has dropped every reference taken in the period.
            if !f(unsafe { &*p }) {
                return;
            }
        }
    }
}

/// State shared by all threads of the supervisor.
pub(crate) struct Shared {
    pub config: Config,
    pub geo: RingGeometry,
    pub table: SlotTable,
    /// Blocks played so far (the output position).
    pub position: AtomicU64,
    /// CLOCK_MONOTONIC at which the last played block (`position - 1`) started playing.
    pub last_period_ns: AtomicU64,
    /// Odd while the output thread updates `position` and `last_period_ns` together (a
    /// seqlock: readers retry, the output thread never waits).
    pub clock_seq: AtomicU64,
    /// Heartbeat ticks the monitor has handled (the watchdog's proof that it is alive).
    pub monitor_ticks: AtomicU64,
    /// The output device went away and is being reopened (the virtual clock plays meanwhile).
    pub output_degraded: AtomicBool,
    /// The output as opened at start.
    pub device: std::sync::OnceLock<OutputInfo>,
    /// Output periods completed: the grace-period clock for freeing rings.
    pub epoch: AtomicU64,
    pub running: AtomicBool,
    /// The primary has rendered its whole lookahead once (start-up gate for the output).
    pub primed: AtomicBool,
    pub metrics: Metrics,
    pub control: ControlCore,
    pub shm: crate::sys::PiMutex<ShmBook>,
    pub started: Instant,
    /// Priorities and restart intensity, as last (re)loaded.
    pub live: live::Live,
}

impl Shared {
    /// The output's clock now: (blocks played, the frame being played now, interpolated
    /// within its block).
    pub(crate) fn output_now(&self) -> (u64, u64) {
        let bf = self.config.block_frames as u64;
        let (pos, started) = loop {
            let s0 = self.clock_seq.load(Ordering::Acquire);
            let pos = self.position.load(Ordering::Acquire);
            let started = self.last_period_ns.load(Ordering::Acquire);
            if s0 % 2 == 0 && self.clock_seq.load(Ordering::Acquire) == s0 {
                break (pos, started);
            }
            // The writer is mid-update (a few instructions); if it was preempted there, let
            // it run rather than spin against it.
            std::thread::yield_now();
        };
        let since = crate::sys::now_ns().saturating_sub(started).min(self.config.block_ns());
        let frame = pos.saturating_sub(1) * bf + since * self.config.sample_rate as u64 / 1_000_000_000;
        (pos, frame)
    }

    fn snapshot(&self) -> MetricsSnapshot {
        let mut m = self.metrics.snapshot(self.config.sample_rate, self.started.elapsed().as_secs_f64());
        if let Some(d) = self.device.get() {
            m.device = d.name.clone();
            m.period_frames = d.period_frames;
            m.buffer_frames = d.buffer_frames;
        }
        m.control_applied = self.control.applied(&self.metrics.played_seq);
        m
    }
}

/// The output in use, as GetMetrics and the start-up log report it.
#[derive(Debug, Clone)]
pub struct OutputInfo {
    /// `virtual`, `wav:PATH` or `alsa:PCM`.
    pub name: String,
    pub period_frames: u32,
    /// Device buffer (0 for the virtual clock, which has none).
    pub buffer_frames: u32,
}

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
    /// A replacement worker is ready for its role (a new spare, or a cold-started primary).
    Replaced { pid: u32, role: &'static str, detected_ns: u64, ready_ns: u64 },
    /// A new reserve worker is ready (started, mapped, locked, idle).
    ReserveReady { pid: u32, spawned_ns: u64, ready_ns: u64 },
    /// A worker was refused SCHED_FIFO (reported once per supervisor).
    RealtimeRefused { pid: u32 },
    /// A dead worker's segments were unlinked and dropped from the manifest.
    Reclaimed { pid: u32, segments: Vec<String> },
}

impl Event {
    /// Logs the event once, with structured fields (journald keeps them as fields).
    fn log(&self) {
        match self {
            Event::WorkerDied { pid, role, status, .. } => {
                tracing::warn!(WORKER_PID = pid, ROLE = role, STATUS = %status, "worker {pid} ({role}) {status}")
            }
            Event::HangDetected { pid, stalled_us, why, .. } => tracing::warn!(
                WORKER_PID = pid,
                STALL_US = stalled_us,
                "worker {pid} made no progress for {stalled_us} µs ({why}): declared hung, killed"
            ),
            Event::Failover { old_pid, new_pid, detected_ns, failover_ns } => {
                let us = failover_ns.saturating_sub(*detected_ns) / 1000;
                tracing::info!(
                    WORKER_PID = old_pid,
                    NEW_PID = new_pid,
                    FAILOVER_US = us,
                    "failover: worker {new_pid} took over from {old_pid} in {:.3} ms",
                    us as f64 / 1000.0
                )
            }
            Event::Replaced { pid, role, detected_ns, ready_ns } => {
                let us = ready_ns.saturating_sub(*detected_ns) / 1000;
                tracing::info!(NEW_PID = pid, ROLE = role, REBUILD_US = us, "rebuilt: worker {pid} ready as {role} in {:.3} ms", us as f64 / 1000.0)
            }
            Event::ReserveReady { pid, spawned_ns, ready_ns } => {
                tracing::debug!(NEW_PID = pid, "reserve worker {pid} ready {} µs after spawn", ready_ns.saturating_sub(*spawned_ns) / 1000)
            }
            Event::RealtimeRefused { pid } => tracing::warn!(
                WORKER_PID = pid,
                THREAD = "render",
                "worker {pid}: SCHED_FIFO refused; rendering without real-time priority (realtime=false)"
            ),
            Event::Reclaimed { pid, segments } => {
                let list = segments.join(",");
                tracing::info!(WORKER_PID = pid, SEGMENT = %list, "reclaimed the segments of worker {pid}: {list}")
            }
        }
    }
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
    pub fn control(&self) -> Control {
        Control { shared: self.shared.clone() }
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
        self.shared.live.set_priorities(output, monitor, render, &workers)
    }

    /// A new restart intensity: more than `max_restarts` worker deaths within `window_s`
    /// seconds throttle new workers (from the next spawn on).
    pub fn set_restart_intensity(&self, max_restarts: u32, window_s: u32) {
        self.shared.live.set_restart_intensity(max_restarts, window_s);
    }

    pub fn state(&self) -> State {
        let sh = &self.shared;
        if !sh.running.load(Ordering::Acquire) {
            State::Stopping
        } else if !sh.primed.load(Ordering::Acquire) {
            State::Starting
        } else if sh.output_degraded.load(Ordering::Acquire)
            || sh.metrics.primary_pid.load(Ordering::Relaxed) == 0
            || (sh.config.standby != crate::config::StandbyMode::None && !sh.metrics.spare_ready.load(Ordering::Acquire))
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
        self.shared.position.load(Ordering::Acquire) * self.shared.config.block_frames as u64
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

/// The event thread: logs each event once and hands it to every subscriber, so the monitor
/// never blocks on a log sink or a slow reader.
fn run_events(rx: Receiver<Event>, subscribers: Arc<Mutex<Vec<mpsc::Sender<Event>>>>) {
    for ev in rx {
        ev.log();
        let mut subs = subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|tx| tx.send(ev.clone()).is_ok());
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
    Output(String),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot set up the monitor: {0}")]
    Monitor(std::io::Error),
    #[error("the first worker did not become ready within {0:?}: {1}")]
    NotReady(Duration, String),
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

/// Small stacks for our threads: with mlockall(MCL_FUTURE) every stack page is locked.
const THREAD_STACK: usize = 256 * 1024;

impl Supervisor {
    /// Starts the supervisor: sweeps the shm dir, spawns the primary and the standby, waits
    /// until the primary has rendered its lookahead and the standby is ready, then starts the
    /// output.
    ///
    /// # Errors
    /// Invalid configuration, an shm dir in use or not writable, an output that cannot be
    /// opened, or workers that never become ready.
    pub fn start(config: Config) -> Result<Supervisor, StartError> {
        config.validate()?;
        let geo = RingGeometry {
            block_frames: config.block_frames,
            slots: config.lookahead_blocks,
            sample_rate: config.sample_rate,
        };
        let (registry, sweep) = Registry::open(&config.shm_dir)?;
        let shm_dir = config.shm_dir.clone();
        let metrics = Metrics::default();
        if !sweep.files.is_empty() {
            tracing::warn!(
                STALE_SEGMENTS = sweep.files.len(),
                SEGMENT = %sweep.files.join(","),
                BYTES = sweep.bytes,
                SHM_DIR = %shm_dir.display(),
                "reclaimed {} stale shared-memory segments ({} bytes) left by a previous instance",
                sweep.files.len(),
                sweep.bytes
            );
            metrics.stale_segments_reclaimed.store(sweep.files.len() as u64, Ordering::Relaxed);
        }

        let shared = Arc::new(Shared {
            geo,
            table: SlotTable::new(),
            position: AtomicU64::new(0),
            last_period_ns: AtomicU64::new(crate::sys::now_ns()),
            clock_seq: AtomicU64::new(0),
            monitor_ticks: AtomicU64::new(0),
            output_degraded: AtomicBool::new(false),
            device: std::sync::OnceLock::new(),
            epoch: AtomicU64::new(0),
            running: AtomicBool::new(true),
            primed: AtomicBool::new(false),
            metrics,
            control: ControlCore::new(config.frequency, config.gain),
            shm: crate::sys::PiMutex::new(ShmBook { registry: Some(registry), held: Default::default() }),
            started: Instant::now(),
            live: live::Live::new(&config),
            config,
        });
        let stop = Arc::new(EventFd::new(true).map_err(StartError::Monitor)?);
        let (events_tx, events_rx) = mpsc::channel();

        let cfg = &shared.config;
        let open_alsa = |pcm: &str| output::alsa::AlsaOut::open(pcm, cfg.sample_rate, cfg.block_frames, cfg.device_periods);
        let virtual_info = |name: String| OutputInfo { name, period_frames: cfg.block_frames, buffer_frames: 0 };
        let (sink, wav, info) = match &cfg.output {
            OutputSpec::Virtual => (Sink::Virtual, None, virtual_info("virtual".into())),
            OutputSpec::Wav(path) => {
                let (tap, rec) = output::wav::start(path, cfg.sample_rate, 2, cfg.sample_rate as usize)
                    .map_err(|e| StartError::Output(e.to_string()))?;
                (Sink::Wav(tap), Some(rec), virtual_info(format!("wav:{}", path.display())))
            }
            OutputSpec::Alsa(pcm) => {
                let dev = open_alsa(pcm).map_err(|e| StartError::Output(e.to_string()))?;
                let info = OutputInfo { name: format!("alsa:{pcm}"), period_frames: dev.info.period_frames, buffer_frames: dev.info.buffer_frames };
                (Sink::Alsa(dev), None, info)
            }
            OutputSpec::Cpal(name) => {
                let dev = output::cpal::CpalOut::open(name).map_err(StartError::Output)?;
                let info = OutputInfo { name: format!("cpal:{name}"), period_frames: cfg.block_frames, buffer_frames: 0 };
                (Sink::Cpal(dev), None, info)
            }
            OutputSpec::Auto => match open_alsa("default") {
                Ok(dev) => {
                    let info = OutputInfo { name: "alsa:default".into(), period_frames: dev.info.period_frames, buffer_frames: dev.info.buffer_frames };
                    (Sink::Alsa(dev), None, info)
                }
                Err(e) => {
                    tracing::warn!("--output auto: {e}; playing on the virtual output (no sound)");
                    (Sink::Virtual, None, virtual_info("virtual".into()))
                }
            },
        };
        if let Sink::Alsa(dev) = &sink {
            let d = &dev.info;
            tracing::info!(
                DEVICE = %d.name,
                "ALSA device {}: {} Hz {}, period {} frames, buffer {} frames ({:.2} ms)",
                d.name,
                d.rate,
                d.format,
                d.period_frames,
                d.buffer_frames,
                d.buffer_frames as f64 * 1000.0 / d.rate as f64
            );
            if d.rate != cfg.sample_rate {
                return Err(StartError::Output(format!("{} plays at {} Hz, not {} Hz", d.name, d.rate, cfg.sample_rate)));
            }
        }
        let _ = shared.device.set(info);

        let cpu_latency = shared.config.cpu_latency_qos_us.and_then(|us| match crate::sys::cpu_latency_request(us) {
            Ok(f) => {
                tracing::info!("holding a CPU wake-up latency request of {us} µs (/dev/cpu_dma_latency)");
                Some(f)
            }
            Err(e) => {
                tracing::warn!("cannot hold a CPU latency request ({e}); idle CPUs may wake up slowly");
                None
            }
        });
        let mut sup = Supervisor {
            _cpu_latency: cpu_latency,
            shared: shared.clone(),
            stop: stop.clone(),
            monitor: None,
            output: None,
            housekeeping: None,
            events: None,
            wav,
            subscribers: Arc::new(Mutex::new(Vec::new())),
            shm_dir,
        };

        let subs = sup.subscribers.clone();
        sup.events = Some(
            std::thread::Builder::new()
                .name("aw-events".into())
                .spawn(move || run_events(events_rx, subs))
                .map_err(StartError::Thread)?,
        );
        let mon = monitor::Monitor::new(shared.clone(), stop.clone(), events_tx).map_err(StartError::Monitor)?;
        sup.monitor = Some(
            std::thread::Builder::new()
                .name("aw-monitor".into())
                .stack_size(THREAD_STACK)
                .spawn(move || mon.run())
                .map_err(StartError::Thread)?,
        );

        // Wait for the primary to fill its lookahead (and the standby to be ready) before the
        // output starts pulling, so the first period already finds a block.
        let timeout = Duration::from_secs(5);
        let t0 = Instant::now();
        loop {
            let filled = shared.primed.load(Ordering::Acquire);
            let spare_ok = shared.config.standby == crate::config::StandbyMode::None
                || shared.metrics.spare_ready.load(Ordering::Acquire);
            if filled && spare_ok {
                break;
            }
            if t0.elapsed() > timeout || sup.monitor.as_ref().is_some_and(|h| h.is_finished()) {
                let why = if filled { "the standby never became ready" } else { "the primary never rendered" };
                return Err(StartError::NotReady(timeout, why.into()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }

        let out_shared = shared.clone();
        // The output thread's buffers, allocated here so mlockall below pins them.
        let buffers = output::Buffers::new(shared.geo.samples_per_block());
        let (rt_tx, rt_rx) = mpsc::channel();
        sup.output = Some(
            std::thread::Builder::new()
                .name("aw-output".into())
                .stack_size(THREAD_STACK)
                .spawn(move || output::run(out_shared, sink, buffers, rt_tx))
                .map_err(StartError::Thread)?,
        );
        if let Ok(Err(e)) = rt_rx.recv_timeout(Duration::from_secs(1)) {
            tracing::warn!(THREAD = "output", "{e}");
        }
        // Lock what exists now (code, the threads' stacks and buffers, the rings). Not
        // MCL_FUTURE: that would pin every allocator arena and thread stack in full; rings
        // created later are mlocked one by one.
        if let Err(e) = crate::sys::mlockall() {
            tracing::warn!("mlockall refused ({e}); audio memory may be paged out under pressure");
        }
        let hk_shared = shared.clone();
        let hk_stop = stop.clone();
        sup.housekeeping = Some(
            std::thread::Builder::new()
                .name("aw-housekeeping".into())
                .spawn(move || housekeeping::run(hk_shared, hk_stop))
                .map_err(StartError::Thread)?,
        );
        tracing::info!(
            primary_pid = shared.metrics.primary_pid.load(Ordering::Relaxed),
            spare_pid = shared.metrics.spare_pid.load(Ordering::Relaxed),
            "playing {} Hz at gain {} ({} Hz, {} frames per block, {} blocks lookahead, {:?} standby)",
            shared.config.frequency,
            shared.config.gain,
            shared.config.sample_rate,
            shared.config.block_frames,
            shared.config.lookahead_blocks,
            shared.config.standby
        );
        Ok(sup)
    }

    /// A handle to change frequency and gain.
    pub fn control(&self) -> Control {
        Control { shared: self.shared.clone() }
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
        self.shared.position.load(Ordering::Acquire) * self.shared.config.block_frames as u64
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
        self.shared.running.store(false, Ordering::Release);
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
