//! The monitor thread: one epoll set over every worker's pidfd (death) and event fd (ready,
//! first block, caught up), a heartbeat timer, and the stop fd. It decides every failover,
//! builds spares, and reclaims the shared memory of dead workers once drained.
//!
//! Roles: one `Primary` (its slot is the table's active one), at most one `Spare`, at most one
//! `Reserve` (idle, promoted to spare when the spare takes over, so recovery never waits for an
//! exec), and dead workers `Draining` (their committed blocks stay playable) until the output
//! has passed them.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use super::spawn::{spawn_worker, WorkerFds};
use super::{Event, Shared, WorkerShm, CONTROL_CAPACITY, MAX_SLOTS};
use crate::config::StandbyMode;
use crate::control::Target;
use crate::engine::{ramp_frames, EngineState};
use crate::shm::control::{self, ControlRing};
use crate::shm::registry::SegmentKind;
use crate::shm::ring::AudioRing;
use crate::sys::{self, Epoll, EventFd, TimerFd};

const TOKEN_STOP: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const KIND_EXIT: u64 = 1 << 60;
const KIND_EVENT: u64 = 2 << 60;
const KIND_MASK: u64 = 0xf << 60;

/// How long shutdown waits for workers to exit after SIGTERM before SIGKILL.
const TERM_TIMEOUT: Duration = Duration::from_millis(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Primary,
    Spare,
    /// Started and idle, one step behind the spare (see `--reserve-workers`).
    Reserve,
    Draining,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Spare => "spare",
            Role::Reserve => "reserve",
            Role::Draining => "draining",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Exec'd, not yet mapped and locked.
    Spawning,
    /// Ready and idle (a warm spare).
    Idle,
    /// Rendering from `base`.
    Running { base: u64 },
    Dead,
}

struct Worker {
    id: u64,
    slot: usize,
    pid: u32,
    pidfd: OwnedFd,
    shm: Arc<WorkerShm>,
    ctl: Arc<ControlRing>,
    /// Worker -> supervisor notifications.
    event: EventFd,
    segments: [String; 2],
    role: Role,
    phase: Phase,
    /// For a primary started cold or promoted before it was ready: where to start.
    start_from: Option<(u64, EngineState)>,
    /// Set if this worker replaces a dead one: that death's detection time.
    replaces: Option<u64>,
    /// Ready for its role has been reported.
    ready_reported: bool,
    // Heartbeat.
    hb_write: u64,
    hb_stalled_since: Option<u64>,
    /// (time, CPU time) of a runnable worker at its heartbeat timeout, to tell spinning from
    /// starved on the next tick.
    hb_probe: Option<(u64, u64)>,
    hang_detected_ns: Option<u64>,
    dead_since: Option<u64>,
    spawned_ns: u64,
}

/// A failover in progress: done once the new primary holds block `need`.
struct PendingFailover {
    detected_ns: u64,
    old_pid: u32,
    new_id: u64,
    need: u64,
}

/// A dead worker's ring, unpublished, waiting for the output thread's grace period.
struct Retired {
    pid: u32,
    shm: Arc<WorkerShm>,
    segments: [String; 2],
    epoch: u64,
}

pub(crate) struct Monitor {
    sh: Arc<Shared>,
    _stop: Arc<EventFd>,
    events: Sender<Event>,
    /// A worker's RT refusal is logged once, not once per worker.
    rt_refusal_reported: bool,
    epoll: Epoll,
    timer: TimerFd,
    workers: Vec<Worker>,
    retired: Vec<Retired>,
    failovers: Vec<PendingFailover>,
    next_id: u64,
    exe: std::path::PathBuf,
    block_ns: u64,
    last_tick_ns: u64,
    /// A replacement primary whose spawn failed: (handoff, detection time), retried.
    pending_primary: Option<((u64, EngineState), u64)>,
    /// A spare whose spawn failed (with what it replaces), retried.
    spare_retry: Option<Option<u64>>,
    /// A reserve whose spawn failed or was throttled, retried.
    reserve_retry: Option<Option<u64>>,
    /// No spawn before this instant (a failed spawn, or the crash-loop backoff).
    spawn_not_before: u64,
    /// Recent worker deaths (restart intensity window).
    deaths: std::collections::VecDeque<u64>,
    backoff_ns: u64,
}

/// Minimum interval between retries of a failed spawn, and the first crash-loop backoff.
const RETRY_NS: u64 = 100_000_000;
/// Longest crash-loop backoff.
const MAX_BACKOFF_NS: u64 = 5_000_000_000;

impl Monitor {
    pub(crate) fn new(sh: Arc<Shared>, stop: Arc<EventFd>, events: Sender<Event>) -> std::io::Result<Monitor> {
        let epoll = Epoll::new()?;
        let block_ns = sh.config.block_ns();
        let timer = TimerFd::periodic(Duration::from_nanos(block_ns))?;
        epoll.add(stop.raw(), TOKEN_STOP)?;
        epoll.add(timer.raw(), TOKEN_TIMER)?;
        let exe = sh.config.worker_exe.clone().unwrap_or_else(|| "/proc/self/exe".into());
        Ok(Monitor {
            sh,
            _stop: stop,
            events,
            rt_refusal_reported: false,
            epoll,
            timer,
            workers: Vec::new(),
            retired: Vec::new(),
            failovers: Vec::new(),
            next_id: 1,
            exe,
            block_ns,
            last_tick_ns: sys::now_ns(),
            pending_primary: None,
            spare_retry: None,
            reserve_retry: None,
            spawn_not_before: 0,
            deaths: std::collections::VecDeque::new(),
            backoff_ns: RETRY_NS,
        })
    }

    pub(crate) fn run(mut self) {
        self.sh.live.monitor_tid.store(sys::gettid(), Ordering::SeqCst);
        match sys::set_fifo(self.sh.live.monitor_priority.load(Ordering::SeqCst)) {
            Ok(()) => self.sh.metrics.monitor_realtime.store(true, Ordering::Relaxed),
            Err(e) => tracing::warn!(THREAD = "monitor", "monitor thread: SCHED_FIFO refused ({e}); running without real-time priority"),
        }
        let (f, g) = (self.sh.config.frequency, self.sh.config.gain);
        let initial = EngineState::initial(f, g, ramp_frames(self.sh.config.sample_rate));
        if let Err(e) = self.spawn(Role::Primary, Some((0, initial)), None) {
            tracing::error!("cannot start the primary worker: {e}");
            return;
        }
        if self.sh.config.standby != StandbyMode::None {
            if let Err(e) = self.spawn(Role::Spare, None, None) {
                tracing::error!("cannot start the standby worker: {e}");
            }
            self.ensure_reserve(None);
        }
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            let n = self.epoll.wait(&mut evs, -1);
            let now = sys::now_ns();
            for ev in &evs[..n] {
                let token = ev.u64;
                match token {
                    TOKEN_STOP => {
                        self.shutdown();
                        return;
                    }
                    TOKEN_TIMER => {
                        self.timer.drain();
                        self.tick(now);
                        // Liveness for the systemd watchdog: this loop is turning.
                        self.sh.monitor_ticks.fetch_add(1, Ordering::Relaxed);
                    }
                    t if t & KIND_MASK == KIND_EXIT => self.on_exit(t & !KIND_MASK, now),
                    t if t & KIND_MASK == KIND_EVENT => self.on_event(t & !KIND_MASK),
                    _ => {}
                }
            }
        }
    }

    fn find(&self, role: Role) -> Option<usize> {
        self.workers.iter().position(|w| w.role == role && w.phase != Phase::Dead)
    }

    fn pos(&self) -> u64 {
        self.sh.position.load(Ordering::Acquire)
    }

    // ---- spawning --------------------------------------------------------------------

    fn free_slot(&self) -> Option<usize> {
        (0..MAX_SLOTS).find(|&s| self.sh.table.is_free(s) && !self.workers.iter().any(|w| w.slot == s))
    }

    fn spawn(&mut self, role: Role, start_from: Option<(u64, EngineState)>, replaces: Option<u64>) -> Result<(), String> {
        let slot = self.free_slot().ok_or("no free worker slot")?;
        let id = self.next_id;
        self.next_id += 1;
        let ring_id = format!("ring-{slot}-g{id}");
        let ctl_id = format!("ctl-{slot}-g{id}");
        let owner = format!("worker-{id} (spawning)");
        let (ring_file, ctl_file) = {
            let mut book = self.sh.shm.lock();
            let reg = book.registry.as_mut().ok_or("shutting down")?;
            let rf = reg
                .create(&ring_id, self.sh.geo.segment_size(), SegmentKind::AudioRing, &owner)
                .map_err(|e| e.to_string())?;
            let cf = match reg.create(&ctl_id, control::segment_size(CONTROL_CAPACITY), SegmentKind::ControlRing, &owner) {
                Ok(f) => f,
                Err(e) => {
                    let _ = reg.release(&ring_id);
                    return Err(e.to_string());
                }
            };
            book.held.insert(ring_id.clone(), None);
            book.held.insert(ctl_id.clone(), None);
            (rf, cf)
        };
        let result = self.spawn_with(id, slot, role, &ring_file, &ctl_file, [ring_id.clone(), ctl_id.clone()], start_from, replaces);
        if result.is_err() {
            self.release_segments(&[ring_id, ctl_id]);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_with(
        &mut self,
        id: u64,
        slot: usize,
        role: Role,
        ring_file: &File,
        ctl_file: &File,
        segments: [String; 2],
        start_from: Option<(u64, EngineState)>,
        replaces: Option<u64>,
    ) -> Result<(), String> {
        let ring = AudioRing::create(ring_file, self.sh.geo).map_err(|e| format!("map audio ring: {e}"))?;
        let ctl = Arc::new(ControlRing::create(ctl_file, CONTROL_CAPACITY).map_err(|e| format!("map control ring: {e}"))?);
        let wake = EventFd::new(true).map_err(|e| e.to_string())?;
        let event = EventFd::new(true).map_err(|e| e.to_string())?;
        let shm = Arc::new(WorkerShm {
            ring,
            wake,
            running: std::sync::atomic::AtomicBool::new(false),
            diverged: std::sync::atomic::AtomicBool::new(false),
        });
        let fds = WorkerFds { ring: ring_file, ctl: ctl_file, wake: shm.wake.raw(), event: event.raw() };
        let t_spawn = sys::now_ns();
        let pid = spawn_worker(&self.exe, &fds, self.sh.live.render_priority.load(Ordering::Relaxed)).map_err(|e| format!("spawn {}: {e}", self.exe.display()))?;
        let pidfd = match sys::pidfd_open(pid as i32) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: kill(2) on the pid we just spawned and have not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return Err(format!("pidfd_open({pid}): {e}"));
            }
        };
        self.epoll.add(pidfd.as_raw_fd(), KIND_EXIT | id).map_err(|e| e.to_string())?;
        self.epoll.add(event.raw(), KIND_EVENT | id).map_err(|e| e.to_string())?;
        {
            let mut book = self.sh.shm.lock();
            if let Some(reg) = book.registry.as_mut() {
                for s in &segments {
                    let _ = reg.set_owner(s, &format!("worker-{id} (pid {pid})"));
                }
            }
        }
        self.sh.table.set(slot, &shm);
        match role {
            Role::Primary => {
                self.sh.table.set_active(slot);
                self.sh.metrics.primary_pid.store(pid, Ordering::Relaxed);
            }
            Role::Spare => self.sh.metrics.spare_pid.store(pid, Ordering::Relaxed),
            Role::Reserve => self.sh.metrics.reserve_pid.store(pid, Ordering::Relaxed),
            Role::Draining => {}
        }
        tracing::debug!(pid, slot, role = role.name(), "spawned worker-{id}");
        self.workers.push(Worker {
            id,
            slot,
            pid,
            pidfd,
            shm,
            ctl,
            event,
            segments,
            role,
            phase: Phase::Spawning,
            start_from,
            replaces,
            ready_reported: false,
            hb_write: 0,
            hb_stalled_since: None,
            hb_probe: None,
            hang_detected_ns: None,
            dead_since: None,
            spawned_ns: t_spawn,
        });
        Ok(())
    }

    /// Starts a worker rendering: from `from` if given, else (a hot spare) from the primary's
    /// newest committed state, read under the control lock so no message slips between.
    /// Returns false (and leaves the worker idle) when there is nothing to follow yet.
    fn activate(&mut self, idx: usize, from: Option<(u64, EngineState)>) -> bool {
        let pos = self.pos();
        let primary = self.find(Role::Primary).map(|i| (self.workers[i].shm.clone(), self.workers[i].start_from));
        let w = &self.workers[idx];
        let target = Target { worker_id: w.id, ctl: w.ctl.clone(), shm: w.shm.clone() };
        let started = self.sh.control.start_worker(
            target,
            || from.or_else(|| primary.as_ref().and_then(|(p, start)| p.ring.last_valid_state(0).or(*start))),
            pos,
        );
        let Some((base, _)) = started else { return false };
        let w = &mut self.workers[idx];
        w.phase = Phase::Running { base };
        w.hb_write = base;
        w.hb_stalled_since = None;
        w.hb_probe = None;
        true
    }

    // ---- events ------------------------------------------------------------------------

    fn on_event(&mut self, id: u64) {
        let Some(i) = self.workers.iter().position(|w| w.id == id) else { return };
        self.workers[i].event.drain();
        self.advance(i);
    }

    /// Moves worker `i` along its life cycle as far as its ring says it can go.
    fn advance(&mut self, i: usize) {
        let now = sys::now_ns();
        if self.workers[i].phase == Phase::Spawning && self.workers[i].shm.ring.is_ready() {
            self.workers[i].phase = Phase::Idle;
            tracing::debug!(pid = self.workers[i].pid, "worker-{} ready {} µs after spawn", self.workers[i].id, (now - self.workers[i].spawned_ns) / 1000);
            if self.workers[i].shm.ring.worker_realtime() {
                self.sh.metrics.worker_realtime.store(true, Ordering::Relaxed);
            } else {
                if self.workers[i].role == Role::Primary {
                    self.sh.metrics.worker_realtime.store(false, Ordering::Relaxed);
                }
                if !self.rt_refusal_reported {
                    self.rt_refusal_reported = true;
                    let _ = self.events.send(Event::RealtimeRefused { pid: self.workers[i].pid });
                }
            }
        }
        let w = &self.workers[i];
        match (w.role, w.phase) {
            (Role::Primary, Phase::Idle) => {
                let from = self.workers[i].start_from;
                self.activate(i, from);
            }
            (Role::Spare, Phase::Idle) if self.sh.config.standby == StandbyMode::Hot => {
                self.activate(i, None);
            }
            (Role::Spare, Phase::Idle) | (Role::Reserve, Phase::Idle) => self.report_ready(i, now),
            _ => {}
        }
        let w = &mut self.workers[i];
        if let Phase::Running { base } = w.phase {
            let write = w.shm.ring.write_index();
            if write > base && w.role == Role::Primary {
                // Its own ring now says where it is; the start state is history.
                w.start_from = None;
                if w.shm.ring.space() == 0 {
                    self.sh.primed.store(true, Ordering::Release);
                }
            }
            match w.role {
                Role::Primary if write > base => self.report_ready(i, now),
                // A hot spare is ready once it has caught up: its ring is as full as it may be.
                Role::Spare if w.shm.ring.space() == 0 => self.report_ready(i, now),
                _ => {}
            }
        }
        self.check_failovers(now);
    }

    fn report_ready(&mut self, i: usize, now: u64) {
        let w = &mut self.workers[i];
        if w.ready_reported {
            return;
        }
        w.ready_reported = true;
        if w.role == Role::Spare {
            self.sh.metrics.spare_ready.store(true, Ordering::Release);
        }
        if w.role == Role::Reserve {
            let _ = self.events.send(Event::ReserveReady { pid: w.pid, spawned_ns: w.spawned_ns, ready_ns: now });
        }
        if let Some(detected) = w.replaces.take() {
            let ms = (now - detected) as f64 / 1e6;
            self.sh.metrics.replacements.fetch_add(1, Ordering::Relaxed);
            self.sh.metrics.record(|m| m.rebuild_ms.push(ms));
            let _ = self.events.send(Event::Replaced { pid: w.pid, role: w.role.name(), detected_ns: detected, ready_ns: now });
        }
    }

    fn check_failovers(&mut self, now: u64) {
        let mut done = Vec::new();
        for (k, f) in self.failovers.iter().enumerate() {
            let Some(w) = self.workers.iter().find(|w| w.id == f.new_id) else {
                if f.new_id < self.next_id {
                    done.push(k); // the new primary died too; its own failover is tracked
                }
                continue; // not started yet (crash-loop backoff or a failed spawn)
            };
            let running = matches!(w.phase, Phase::Running { .. });
            if running && (w.shm.ring.write_index() > f.need || self.pos() > f.need) {
                let ms = (now - f.detected_ns) as f64 / 1e6;
                self.sh.metrics.record(|m| m.failover_ms.push(ms));
                let _ = self.events.send(Event::Failover { old_pid: f.old_pid, new_pid: w.pid, detected_ns: f.detected_ns, failover_ns: now });
                done.push(k);
            }
        }
        for k in done.into_iter().rev() {
            self.failovers.remove(k);
        }
    }

    // ---- death -------------------------------------------------------------------------

    fn on_exit(&mut self, id: u64, now: u64) {
        let Some(i) = self.workers.iter().position(|w| w.id == id) else { return };
        let status = sys::pidfd_reap(&self.workers[i].pidfd).map(|s| s.to_string()).unwrap_or_else(|e| format!("unknown ({e})"));
        let w = &mut self.workers[i];
        let detected = w.hang_detected_ns.unwrap_or(now);
        self.epoll.remove(w.pidfd.as_raw_fd());
        self.epoll.remove(w.event.raw());
        let role = w.role;
        let pid = w.pid;
        w.phase = Phase::Dead;
        w.role = Role::Draining;
        w.dead_since = Some(now);
        w.shm.running.store(false, Ordering::Relaxed);
        self.sh.metrics.crash_count.fetch_add(1, Ordering::Relaxed);
        self.deaths.push_back(now);

        // Take over first; bookkeeping, logging and the rebuild come after. The worker that
        // replaces this one (and counts as its replacement) is the new spare, unless the
        // primary had to be started cold, which then is the replacement itself.
        let spare_replaces = match role {
            Role::Primary => self.replace_primary(i, detected).then_some(detected),
            Role::Spare => {
                self.sh.metrics.spare_ready.store(false, Ordering::Release);
                self.sh.metrics.spare_pid.store(0, Ordering::Relaxed);
                Some(detected)
            }
            Role::Reserve => {
                self.sh.metrics.reserve_pid.store(0, Ordering::Relaxed);
                None
            }
            Role::Draining => None,
        };
        self.sh.control.remove_target(id);
        {
            let mut book = self.sh.shm.lock();
            for s in &self.workers[i].segments {
                book.held.insert(s.clone(), Some(now));
            }
        }
        self.sh.metrics.record(|m| m.detection_ms.push((now - detected) as f64 / 1e6));
        let _ = self.events.send(Event::WorkerDied { pid, role: role.name(), status, detected_ns: detected });
        match role {
            Role::Primary | Role::Spare => self.ensure_spare(spare_replaces),
            Role::Reserve => self.ensure_reserve(Some(detected)),
            Role::Draining => {}
        }
    }

    /// Promotes the spare (returns true) or starts a primary cold (false).
    fn replace_primary(&mut self, dead: usize, detected: u64) -> bool {
        let old_pid = self.workers[dead].pid;
        let pos = self.pos();
        // Where the stream continues: the end of the dead primary's unbroken run of valid
        // committed blocks from the output position, else where it was told to start.
        let handoff = self.workers[dead].shm.ring.handoff_state(pos).or(self.workers[dead].start_from).unwrap_or_else(|| {
            // Nothing valid anywhere: resync from the control targets at the output position
            // (an audible discontinuity, counted).
            self.sh.metrics.state_resyncs.fetch_add(1, Ordering::Relaxed);
            let (f, g) = self.sh.control.params();
            let mut s = EngineState::initial(f, g, ramp_frames(self.sh.config.sample_rate));
            s.frame = pos * self.sh.geo.block_frames as u64;
            s.seal();
            (pos, s)
        });
        // The block the new primary must hold for the takeover to be complete: a hot standby
        // already renders the same stream, so the very next block the output needs; anyone
        // else continues where the dead primary's committed blocks end.
        // The spare takes over; if there is none (it died too), the reserve does, like a
        // warm standby.
        let spare = self.find(Role::Spare).or_else(|| self.find(Role::Reserve));
        let hot = spare.is_some_and(|s| matches!(self.workers[s].phase, Phase::Running { .. }));
        let need = if hot { pos } else { handoff.0.max(pos) };
        let (new_id, promoted) = match spare {
            Some(s) => {
                let w = &mut self.workers[s];
                if w.role == Role::Reserve {
                    self.sh.metrics.reserve_pid.store(0, Ordering::Relaxed);
                } else {
                    self.sh.metrics.spare_pid.store(0, Ordering::Relaxed);
                    self.sh.metrics.spare_ready.store(false, Ordering::Release);
                }
                w.role = Role::Primary;
                self.sh.table.set_active(w.slot);
                self.sh.metrics.primary_pid.store(w.pid, Ordering::Relaxed);
                match w.phase {
                    // Hot: already rendering the same stream; the table switch is the takeover.
                    Phase::Running { .. } => {}
                    // Warm: continue from the dead primary's state (kept as start_from in
                    // case it dies before its first commit).
                    Phase::Idle => {
                        w.start_from = Some(handoff);
                        self.activate(s, Some(handoff));
                    }
                    // Still starting: it will start from there once ready.
                    _ => w.start_from = Some(handoff),
                }
                (self.workers[s].id, true)
            }
            None => {
                let id = self.next_id;
                if !self.spawn_allowed(sys::now_ns()) {
                    // Crash loop: silence plays (counted as underruns) until the backoff ends.
                    self.pending_primary = Some((handoff, detected));
                } else if let Err(e) = self.spawn(Role::Primary, Some(handoff), Some(detected)) {
                    tracing::error!("cannot start a replacement primary: {e}");
                    self.pending_primary = Some((handoff, detected));
                    self.spawn_not_before = sys::now_ns() + RETRY_NS;
                }
                (id, false)
            }
        };
        self.failovers.push(PendingFailover { detected_ns: detected, old_pid, new_id, need });
        self.check_failovers(sys::now_ns());
        promoted
    }

    /// May a worker be started now? False during a failed spawn's retry delay or while the
    /// restart intensity is exceeded (then the backoff doubles, up to MAX_BACKOFF_NS).
    fn spawn_allowed(&mut self, now: u64) -> bool {
        if now < self.spawn_not_before {
            return false;
        }
        let max_restarts = self.sh.live.max_restarts.load(Ordering::Relaxed);
        let window_s = self.sh.live.restart_window_s.load(Ordering::Relaxed);
        let window = window_s as u64 * 1_000_000_000;
        while self.deaths.front().is_some_and(|&d| now.saturating_sub(d) > window) {
            self.deaths.pop_front();
        }
        if self.deaths.len() > max_restarts as usize {
            self.sh.metrics.throttled_spawns.fetch_add(1, Ordering::Relaxed);
            self.spawn_not_before = now + self.backoff_ns;
            tracing::warn!(
                "{} worker deaths within {} s (limit {}): next worker start in {} ms",
                self.deaths.len(),
                window_s,
                max_restarts,
                self.backoff_ns / 1_000_000
            );
            self.backoff_ns = (self.backoff_ns * 2).min(MAX_BACKOFF_NS);
            return false;
        }
        if self.deaths.len() <= max_restarts as usize / 2 {
            self.backoff_ns = RETRY_NS;
        }
        true
    }

    fn ensure_spare(&mut self, replaces: Option<u64>) {
        if self.sh.config.standby == StandbyMode::None || self.find(Role::Spare).is_some() {
            return;
        }
        if let Some(r) = self.find(Role::Reserve) {
            // The reserve is already exec'd, mapped and locked: it becomes the spare now (a hot
            // spare is started from the primary's state by `advance`), a new reserve follows.
            let w = &mut self.workers[r];
            w.role = Role::Spare;
            w.replaces = replaces;
            w.ready_reported = false;
            self.sh.metrics.spare_pid.store(w.pid, Ordering::Relaxed);
            self.sh.metrics.reserve_pid.store(0, Ordering::Relaxed);
            self.advance(r);
            self.ensure_reserve(None);
            return;
        }
        if !self.try_spawn(Role::Spare, replaces) {
            self.spare_retry = Some(replaces);
        }
    }

    /// Spawns an idle worker for `role` if the restart intensity allows it now. False (the
    /// caller remembers to retry) when throttled or when the spawn failed.
    fn try_spawn(&mut self, role: Role, replaces: Option<u64>) -> bool {
        if !self.spawn_allowed(sys::now_ns()) {
            return false;
        }
        match self.spawn(role, None, replaces) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("cannot start a {} worker: {e}", role.name());
                self.spawn_not_before = sys::now_ns() + RETRY_NS;
                false
            }
        }
    }

    /// Starts a reserve worker if the configuration wants one and there is none.
    fn ensure_reserve(&mut self, replaces: Option<u64>) {
        if self.sh.config.standby == StandbyMode::None
            || self.sh.config.reserve_workers == 0
            || self.find(Role::Reserve).is_some()
        {
            return;
        }
        if !self.try_spawn(Role::Reserve, replaces) {
            self.reserve_retry = Some(replaces);
        }
    }

    /// Retries spawns that failed (no free slot, exec failure, shm full), at most once per
    /// RETRY_NS, so a persistent failure neither spins nor gives up.
    fn retry_spawns(&mut self, now: u64) {
        if let Some((handoff, detected)) = self.pending_primary {
            if self.find(Role::Primary).is_some() {
                self.pending_primary = None;
            } else if self.spawn_allowed(now) {
                let id = self.next_id;
                match self.spawn(Role::Primary, Some(handoff), Some(detected)) {
                    Ok(()) => {
                        self.pending_primary = None;
                        for f in self.failovers.iter_mut().filter(|f| f.detected_ns == detected) {
                            f.new_id = id;
                        }
                    }
                    Err(e) => {
                        tracing::error!("retrying the replacement primary: {e}");
                        self.spawn_not_before = now + RETRY_NS;
                    }
                }
            }
        }
        if self.pending_primary.is_none() && now >= self.spawn_not_before {
            if let Some(replaces) = self.spare_retry.take() {
                self.ensure_spare(replaces);
            }
        }
        if self.pending_primary.is_none() && self.spare_retry.is_none() && now >= self.spawn_not_before {
            if let Some(replaces) = self.reserve_retry.take() {
                self.ensure_reserve(replaces);
            }
        }
    }

    // ---- the heartbeat tick ----------------------------------------------------------------

    fn tick(&mut self, now: u64) {
        // A late tick means this (RT) thread was stalled too: the heartbeat evidence of that
        // interval is unreliable, so every stall clock restarts.
        let late_tick = now.saturating_sub(self.last_tick_ns) > 2 * self.block_ns;
        self.last_tick_ns = now;
        let output_running = self.sh.epoch.load(Ordering::Acquire) > 0;
        let mut killed_this_tick = false;
        for i in 0..self.workers.len() {
            self.advance(i);
            let w = &mut self.workers[i];
            if !matches!(w.phase, Phase::Running { .. }) || w.hang_detected_ns.is_some() || !output_running {
                continue;
            }
            if w.shm.diverged.load(Ordering::Relaxed) {
                w.hang_detected_ns = Some(now);
                tracing::warn!(WORKER_PID = w.pid, "worker {} missed a control message; replacing it", w.pid);
                let _ = sys::pidfd_send_signal(&w.pidfd, libc::SIGKILL);
                continue;
            }
            // Without real-time priority a healthy worker can be kept off the CPU for a while:
            // give it half the lookahead instead of the configured timeout.
            let blocks = if w.shm.ring.worker_realtime() {
                self.sh.config.hang_timeout_blocks as u64
            } else {
                (self.sh.config.hang_timeout_blocks as u64).max(self.sh.geo.slots as u64 / 2)
            };
            let write = w.shm.ring.write_index();
            if write != w.hb_write || late_tick {
                w.hb_write = write;
                w.hb_stalled_since = None;
                w.hb_probe = None;
            } else if w.shm.ring.space() > 0 {
                // Room to render, yet no progress: the clock starts now.
                let since = *w.hb_stalled_since.get_or_insert(now);
                let stalled = now - since;
                if stalled < blocks * self.block_ns || killed_this_tick {
                    continue;
                }
                // Timed out. Ask the scheduler what the worker is doing before killing it:
                // stopped, or asleep with work to do, is hung; runnable is either spinning
                // (hung) or waiting for a CPU (starved, not its fault): one more tick tells,
                // by whether it got CPU time. Starvation is tolerated up to half the lookahead,
                // after which the audio is at risk and it is replaced anyway.
                let verdict = match sys::sched_probe(w.pid) {
                    Some(p) if p.state == 'R' => match w.hb_probe {
                        None => {
                            w.hb_probe = Some((now, p.exec_ns));
                            None
                        }
                        Some((t0, exec0)) => {
                            let spinning = p.exec_ns.saturating_sub(exec0) * 2 >= now - t0;
                            let hard_limit = stalled >= (self.sh.geo.slots as u64 / 2).max(blocks + 1) * self.block_ns;
                            (spinning || hard_limit).then_some(if spinning { "spinning without progress" } else { "starved of CPU too long" })
                        }
                    },
                    Some(p) if p.state == 'T' || p.state == 't' => Some("stopped"),
                    Some(_) => Some("blocked with work to do"),
                    None => None, // already gone: its pidfd will tell
                };
                if let Some(why) = verdict {
                    killed_this_tick = true;
                    w.hang_detected_ns = Some(now);
                    self.sh.metrics.hang_kills.fetch_add(1, Ordering::Relaxed);
                    let _ = sys::pidfd_send_signal(&w.pidfd, libc::SIGKILL);
                    let _ = self.events.send(Event::HangDetected { pid: w.pid, detected_ns: now, stalled_us: stalled / 1000, why });
                }
            }
        }
        let late = self.workers.iter().filter(|w| w.phase != Phase::Dead).map(|w| w.shm.ring.control_stats().0).max().unwrap_or(0);
        self.sh.metrics.control_late.fetch_max(late, Ordering::Relaxed);
        self.retry_spawns(now);
        self.reclaim(now);
    }

    /// Dead workers whose blocks the output has passed leave the table; after the grace
    /// period their segments are unlinked and dropped from the manifest.
    fn reclaim(&mut self, now: u64) {
        let pos = self.pos();
        let epoch = self.sh.epoch.load(Ordering::SeqCst);
        let mut k = 0;
        while k < self.workers.len() {
            let w = &self.workers[k];
            // Drained: the output has passed its blocks, or it holds nothing playable at `pos`
            // (the successor was handed the state before any garbage, so nothing is lost).
            let drained = w.shm.ring.write_index() <= pos || w.shm.ring.committed_state(pos).is_none();
            let stale = w.dead_since.is_some_and(|d| now - d > 1_000_000_000);
            if w.phase == Phase::Dead && (drained || stale) {
                let w = self.workers.remove(k);
                self.sh.table.clear(w.slot);
                self.retired.push(Retired { pid: w.pid, shm: w.shm, segments: w.segments, epoch: self.sh.epoch.load(Ordering::SeqCst) });
            } else {
                k += 1;
            }
        }
        let mut j = 0;
        while j < self.retired.len() {
            // Freed only after the output thread completed two more periods (shutdown frees
            // the rest, after the output thread has been joined).
            if epoch >= self.retired[j].epoch + 2 {
                let r = self.retired.remove(j);
                drop(r.shm);
                self.release_segments(&r.segments);
                let _ = self.events.send(Event::Reclaimed { pid: r.pid, segments: r.segments.to_vec() });
            } else {
                j += 1;
            }
        }
    }

    fn release_segments(&self, segments: &[String]) {
        {
            let mut book = self.sh.shm.lock();
            for s in segments {
                book.held.remove(s);
                if let Some(reg) = book.registry.as_mut() {
                    if let Err(e) = reg.release(s) {
                        tracing::warn!(SEGMENT = %s, "cannot release segment {s}: {e}");
                    }
                }
            }
        }
    }

    // ---- shutdown ----------------------------------------------------------------------

    fn shutdown(&mut self) {
        // The stop fd stays readable: housekeeping polls it too.
        for w in &self.workers {
            if w.phase != Phase::Dead {
                let _ = sys::pidfd_send_signal(&w.pidfd, libc::SIGTERM);
            }
        }
        let deadline = sys::now_ns() + TERM_TIMEOUT.as_nanos() as u64;
        for w in &mut self.workers {
            if w.phase == Phase::Dead {
                continue;
            }
            let mut pfd = libc::pollfd { fd: w.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let left_ms = (deadline.saturating_sub(sys::now_ns()) / 1_000_000) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, left_ms) };
            if r <= 0 {
                tracing::warn!(WORKER_PID = w.pid, "worker {} ignored SIGTERM; killing it", w.pid);
                let _ = sys::pidfd_send_signal(&w.pidfd, libc::SIGKILL);
            }
            let _ = sys::pidfd_reap(&w.pidfd);
            w.phase = Phase::Dead;
        }
        for w in &self.workers {
            self.sh.table.clear(w.slot);
        }
        let segs: Vec<String> = self.workers.iter().flat_map(|w| w.segments.clone()).chain(self.retired.iter().flat_map(|r| r.segments.clone())).collect();
        self.workers.clear();
        self.retired.clear();
        self.release_segments(&segs);
        self.sh.metrics.spare_ready.store(false, Ordering::Relaxed);
    }
}
