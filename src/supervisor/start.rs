//! Starting the supervisor, step by step: the shm registry and the shared state, the output,
//! the event and monitor threads, the wait for the first workers, the output thread, the
//! memory lock, housekeeping.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{events, housekeeping, live, monitor, Metrics, Shared, ShmBook, StartError, Supervisor, THREAD_STACK};
use crate::config::{Config, StandbyMode};
use crate::control::{ControlCore, StampTiming};
use crate::output;
use crate::playback::{Playback, PlaybackSettings};
use crate::shm::registry::Registry;
use crate::shm::ring::RingGeometry;
use crate::sys::EventFd;

/// How long the first workers may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

impl Supervisor {
    /// Starts the supervisor: sweeps the shm dir, spawns the primary and the standby, waits
    /// until the primary has rendered its lookahead and the standby is ready, then starts the
    /// output.
    ///
    /// # Errors
    /// Invalid configuration, an shm dir in use, not writable or full, an output that cannot
    /// be opened, or workers that never become ready.
    pub fn start(config: Config) -> Result<Supervisor, StartError> {
        Supervisor::start_with(config, None)
    }

    /// [`Supervisor::start`], with a subscription to every event from the very first spawn
    /// on ([`Supervisor::subscribe`] after `start` misses what happened while it ran, e.g. a
    /// worker that died before the output started).
    ///
    /// # Errors
    /// As [`Supervisor::start`].
    pub fn start_subscribed(config: Config) -> Result<(Supervisor, mpsc::Receiver<super::Event>), StartError> {
        let (tx, rx) = mpsc::channel();
        Ok((Supervisor::start_with(config, Some(tx))?, rx))
    }

    fn start_with(config: Config, first: Option<mpsc::Sender<super::Event>>) -> Result<Supervisor, StartError> {
        config.validate()?;
        // Workers run under our uid: without this one could write into our memory through
        // /proc/PID/mem (their seccomp filter refuses ptrace, not that).
        crate::sys::set_undumpable();
        let shared = Shared::open(config)?;
        let opened = output::open(&shared.config.output, &shared.play.settings)?;
        let _ = shared.device.set(opened.info.clone());
        let mut sup = Supervisor::new(shared.clone(), opened.recorder)?;
        if let Some(tx) = first {
            sup.subscribers.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        }
        sup.start_monitor()?;
        sup.wait_until_ready()?;
        sup.start_output(opened.sink)?;
        lock_memory(&shared);
        sup.start_housekeeping()?;
        let c = &shared.config;
        tracing::info!(
            primary_pid = shared.metrics.primary_pid.load(Ordering::Relaxed),
            spare_pid = shared.metrics.spare_pid.load(Ordering::Relaxed),
            "playing {} Hz at gain {} ({} Hz, {} frames per block, {} blocks lookahead, {:?} standby)",
            c.frequency,
            c.gain,
            c.sample_rate,
            c.block_frames,
            c.lookahead_blocks,
            c.standby
        );
        Ok(sup)
    }

    fn new(shared: Arc<Shared>, wav: Option<output::wav::WavRecorder>) -> Result<Supervisor, StartError> {
        let shm_dir = shared.config.shm_dir.clone();
        Ok(Supervisor {
            _cpu_latency: hold_cpu_latency(shared.config.cpu_latency_qos_us),
            stop: Arc::new(EventFd::new(true).map_err(StartError::Monitor)?),
            shared,
            monitor: None,
            output: None,
            housekeeping: None,
            events: None,
            wav,
            subscribers: Arc::new(Mutex::new(Vec::new())),
            shm_dir,
        })
    }

    /// The event thread, then the monitor thread (which spawns the first workers).
    fn start_monitor(&mut self) -> Result<(), StartError> {
        let (reporter, event_thread) =
            events::channel(&self.shared, self.subscribers.clone()).map_err(StartError::Monitor)?;
        let spawn = std::thread::Builder::new().name("aw-events".into()).spawn(move || event_thread.run());
        self.events = Some(spawn.map_err(StartError::Thread)?);
        let mon =
            monitor::Monitor::new(self.shared.clone(), self.stop.clone(), reporter).map_err(StartError::Monitor)?;
        let spawn =
            std::thread::Builder::new().name("aw-monitor".into()).stack_size(THREAD_STACK).spawn(move || mon.run());
        self.monitor = Some(spawn.map_err(StartError::Thread)?);
        Ok(())
    }

    /// Waits for the primary to fill its lookahead (and the standby to be ready) before the
    /// output starts pulling, so the first period already finds a block.
    fn wait_until_ready(&self) -> Result<(), StartError> {
        let sh = &self.shared;
        let t0 = Instant::now();
        loop {
            let filled = sh.primed.load(Ordering::Acquire);
            let spare_ok = sh.config.standby == StandbyMode::None || sh.metrics.spare_ready.load(Ordering::Acquire);
            if filled && spare_ok {
                return Ok(());
            }
            // The monitor's own verdict first, read after seeing it finished (it stores the
            // failure before it returns).
            let finished = self.monitor.as_ref().is_some_and(|h| h.is_finished());
            if let Some(e) = *sh.start_failure.lock().unwrap_or_else(|p| p.into_inner()) {
                return Err(StartError::Spawn(e));
            }
            if t0.elapsed() > READY_TIMEOUT || finished {
                let why = if filled { "the standby never became ready" } else { "the primary never rendered" };
                return Err(StartError::NotReady(READY_TIMEOUT, why.into()));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The output thread, playing into `sink`; what it says about its start (a refused
    /// SCHED_FIFO) is logged here.
    fn start_output(&mut self, sink: output::Sink) -> Result<(), StartError> {
        let play = self.shared.play.clone();
        // The output thread's buffers, allocated here so that start-up's mlockall pins them.
        let buffers = output::Buffers::new(self.shared.geo.samples_per_block());
        let (tx, rx) = mpsc::channel();
        let spawn = std::thread::Builder::new()
            .name("aw-output".into())
            .stack_size(THREAD_STACK)
            .spawn(move || output::run(play, sink, buffers, tx));
        self.output = Some(spawn.map_err(StartError::Thread)?);
        if let Ok(Err(e)) = rx.recv_timeout(Duration::from_secs(1)) {
            tracing::warn!(THREAD = "output", "{e}");
        }
        Ok(())
    }

    fn start_housekeeping(&mut self) -> Result<(), StartError> {
        let (sh, stop) = (self.shared.clone(), self.stop.clone());
        let spawn =
            std::thread::Builder::new().name("aw-housekeeping".into()).spawn(move || housekeeping::run(sh, stop));
        self.housekeeping = Some(spawn.map_err(StartError::Thread)?);
        Ok(())
    }
}

impl Shared {
    /// Opens (and sweeps) the shm registry and builds the state every thread shares.
    fn open(config: Config) -> Result<Arc<Shared>, StartError> {
        let geo = RingGeometry {
            block_frames: config.block_frames,
            slots: config.ring_blocks(),
            sample_rate: config.sample_rate,
        };
        let (registry, sweep) = Registry::open(&config.shm_dir)?;
        let metrics = Metrics::default();
        if !sweep.files.is_empty() {
            tracing::warn!(
                STALE_SEGMENTS = sweep.files.len(),
                SEGMENT = %sweep.files.join(","),
                BYTES = sweep.bytes,
                SHM_DIR = %config.shm_dir.display(),
                "reclaimed {} stale shared-memory segments ({} bytes) left by a previous instance",
                sweep.files.len(),
                sweep.bytes
            );
            metrics.stale_segments_reclaimed.store(sweep.files.len() as u64, Ordering::Relaxed);
        }
        let settings = PlaybackSettings {
            block_frames: config.block_frames,
            sample_rate: config.sample_rate,
            device_periods: config.device_periods,
            samples_per_block: geo.samples_per_block(),
            batch_blocks: config.render_batch_blocks(),
            periods_per_wake: config.periods_per_wake(),
            lookahead_blocks: config.lookahead_blocks as u64,
            suspect_free_slots: config.render_batch_blocks() as u64 + 1,
            // A block before the monitor's verdict for those (half the ring), to probe first.
            suspect_free_slots_nort: config.render_batch_blocks() as u64
                + (config.hang_timeout_blocks.max(config.ring_blocks() / 2) as u64).saturating_sub(1).max(1),
            test_stall_ms: config.test_fault_output_stall_ms,
            test_pause: config.test_fault_output_pause,
        };
        let play = Arc::new(Playback::new(settings, config.output_priority).map_err(StartError::Thread)?);
        let timing = StampTiming {
            sample_rate: config.sample_rate,
            block_frames: config.block_frames,
            lookahead_blocks: config.ring_blocks(),
            periods_per_wake: config.periods_per_wake(),
            stamp: config.control_stamp,
        };
        Ok(Arc::new(Shared {
            geo,
            play: play.clone(),
            monitor_ticks: AtomicU64::new(0),
            device: std::sync::OnceLock::new(),
            primed: AtomicBool::new(false),
            metrics,
            control: Arc::new(ControlCore::new(config.frequency, config.gain, timing, play)),
            shm: crate::sys::PiMutex::new(ShmBook { registry: Some(registry), held: Default::default() }),
            manifest_dirty: EventFd::new(true).map_err(StartError::Monitor)?,
            start_failure: Mutex::new(None),
            started: Instant::now(),
            live: live::Live::new(&config),
            osc: crate::metrics::OscCounters::default(),
            config,
        }))
    }
}

/// The PM QoS request (--cpu-latency-qos-us), held while running.
fn hold_cpu_latency(us: Option<u32>) -> Option<std::fs::File> {
    us.and_then(|us| match crate::sys::cpu_latency_request(us) {
        Ok(f) => {
            tracing::info!("holding a CPU wake-up latency request of {us} µs (/dev/cpu_dma_latency)");
            Some(f)
        }
        Err(e) => {
            tracing::warn!("cannot hold a CPU latency request ({e}); idle CPUs may wake up slowly");
            None
        }
    })
}

/// Locks what exists now (code, the threads' stacks and buffers, the rings, the monitor's
/// pre-sized tables). Not MCL_FUTURE: that would pin every allocator arena and thread stack in
/// full; what the audio path reads that is made later (a new worker's rings and their
/// bookkeeping) is mlocked one by one, and a refusal counted.
fn lock_memory(sh: &Shared) {
    if let Err(e) = crate::sys::mlockall() {
        sh.metrics.mlock_failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("mlockall refused ({e}); audio memory may be paged out under pressure");
    }
}
