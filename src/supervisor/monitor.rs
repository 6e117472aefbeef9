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
use std::sync::Arc;
use std::time::Duration;

use super::events::{Ending, Report, Reporter, SpawnError, WorkerView};
use super::spawn::{spawn_worker, WorkerFds};
use super::{segment_ids, Shared, CONTROL_CAPACITY};
use crate::config::StandbyMode;
use crate::control::Target;
use crate::engine::{ramp_frames, EngineState};
use crate::playback::{WorkerShm, MAX_SLOTS};
use crate::shm::control::{self, ControlRing};
use crate::shm::registry::SegmentKind;
use crate::shm::ring::{AudioRing, Committed, ROLE_PRIMARY, ROLE_RESERVE, ROLE_SPARE};
use crate::sys::{self, Epoll, EventFd, TimerFd};

const TOKEN_STOP: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_SUSPECT: u64 = 3;
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

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Spawning => "spawning",
            Phase::Idle => "idle",
            Phase::Running { .. } => "running",
            Phase::Dead => "dead",
        }
    }
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

/// Tells worker `w` its role (for its process name) and wakes it to take it.
fn tell_role(w: &Worker) {
    let code = match w.role {
        Role::Primary => ROLE_PRIMARY,
        Role::Spare => ROLE_SPARE,
        Role::Reserve => ROLE_RESERVE,
        Role::Draining => return,
    };
    w.shm.ring.set_role(code);
    w.shm.wake.notify();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Exec'd, not yet mapped and locked.
    Spawning,
    /// Ready and idle (a warm spare).
    Idle,
    /// Rendering from `base`.
    Running {
        base: u64,
    },
    Dead,
}

/// A worker's death, as the workers started because of it refer to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Death {
    pid: u32,
    detected_ns: u64,
}

/// Why a worker was started: what its readiness answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Start-up, or a reserve refilling the pool on its own.
    Initial,
    /// It replaces this dead worker (counted in `replacements` once ready for its role).
    Replaces(Death),
    /// A reserve refilling the pool after the takeover that followed this worker's death
    /// promoted the previous reserve (not a replacement: nothing of that role died).
    Refills(u32),
}

impl Cause {
    /// The dead worker this start answers, if any.
    fn after_death_of(self) -> Option<u32> {
        match self {
            Cause::Initial => None,
            Cause::Replaces(d) => Some(d.pid),
            Cause::Refills(pid) => Some(pid),
        }
    }
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
    /// Where its current run started (any role): what it was about to apply if it dies before
    /// its first commit, for the poison check.
    run_start: Option<(u64, EngineState)>,
    /// Why it was started; a replacement is reported (once) when it is ready for its role.
    cause: Cause,
    /// Ready for its role has been reported.
    ready_reported: bool,
    // Heartbeat.
    hb_write: u64,
    /// What the heartbeat learned of its current stall.
    hb: HbState,
    hang_detected_ns: Option<u64>,
    /// Why the monitor killed it, if it did (a hang verdict, "never ready", "corrupt",
    /// "diverged").
    killed_for: Option<&'static str>,
    dead_since: Option<u64>,
    spawned_ns: u64,
    /// The CPU its render thread is pinned to (a primary or a standby; see `place_on_cpus`),
    /// or `Err` once the kernel refused (never asked again).
    cpu: Option<Result<usize, ()>>,
}

/// The first block of `w`'s ring that does not check out, among those it holds from the output
/// position on (every tick: a stray write into a block published long ago is caught while the
/// output is still blocks away from it; at most a lookahead of blocks, a few µs). A block
/// counts only if the output had not passed it after the look (else its slot may have been
/// recycled meanwhile, which reads as invalid).
fn first_corrupt_block(sh: &Shared, w: &Worker) -> Option<u64> {
    // Only blocks it rendered count: those below its run's base were never in its ring.
    let Phase::Running { base } = w.phase else { return None };
    let p = sh.play.position.blocks();
    let from = p.max(base);
    let written = w.shm.ring.write_index();
    let bad = (from..written.min(from.saturating_add(sh.geo.slots as u64))).find(|&b| w.shm.ring.holds_invalid(b));
    bad.filter(|&b| sh.play.position.blocks() <= b)
}

/// The read index at which the output woke a worker whose ring (of `slots`) is committed up
/// to `write`: `batch` slots were free from `due` on, and it is woken at the first read index
/// from there that is its phase (a worker just started fills its ring wherever the output is,
/// so its first batch may fall due before its phase comes).
fn woken_at(write: u64, batch: u64, slots: u64, phase: u64) -> u64 {
    let due = write.saturating_add(batch).saturating_sub(slots);
    due + (phase % batch + batch - due % batch) % batch
}

/// What the heartbeat learned of a worker's current stall (reset when it commits).
#[derive(Debug, Default, Clone, Copy)]
struct HbState {
    /// (time, CPU time) of it runnable, to tell spinning from starved at the verdict.
    probe: Option<(u64, u64)>,
    /// When it was found asleep with its batch overdue and woken once more, to be sure it
    /// was told (judged hung only if it still sleeps half a block later).
    nudged: Option<u64>,
    /// When a look first found it stalled: real time counts too, since the position stands
    /// still while the output has nothing to play (a hung worker that is the only source).
    since: Option<u64>,
}

/// Why the monitor kills a worker.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Not ready this long after its spawn.
    NeverReady { waited_us: u64 },
    /// A control message could not be delivered to it: its stream would differ.
    Diverged,
    /// A block it published does not check out.
    Corrupt { block: u64 },
    /// The heartbeat's verdict.
    Hung { why: &'static str, stalled_us: u64 },
}

/// A failover in progress: done once the new primary holds block `need`.
struct PendingFailover {
    detected_ns: u64,
    old_pid: u32,
    /// The new primary (None while a cold start has not been spawned yet: throttled, or
    /// failing).
    new_id: Option<u64>,
    need: u64,
    /// No standby or reserve was ready: the new primary had to be started (or was still
    /// starting). Underruns meanwhile are counted apart (`cold_start_underruns`).
    cold: bool,
}

/// A dead worker's ring, unpublished, waiting for the output thread's grace period.
struct Retired {
    pid: u32,
    slot: usize,
    id: u64,
    shm: Arc<WorkerShm>,
    epoch: u64,
}

pub(crate) struct Monitor {
    sh: Arc<Shared>,
    _stop: Arc<EventFd>,
    events: Reporter,
    /// A worker's RT refusal is logged once, not once per worker.
    rt_refusal_reported: bool,
    /// Likewise a worker running without its seccomp sandbox, and an mlock refused.
    sandbox_refusal_reported: bool,
    mlock_refusal_reported: bool,
    epoll: Epoll,
    timer: TimerFd,
    workers: Vec<Worker>,
    retired: Vec<Retired>,
    failovers: Vec<PendingFailover>,
    next_id: u64,
    exe: std::path::PathBuf,
    block_ns: u64,
    /// The timer's period now (busy or idle), and when the monitor last looked.
    tick_ns: u64,
    /// The period in force at the last look: a look later than twice that was delayed.
    last_tick_period_ns: u64,
    last_tick_ns: u64,
    /// A replacement primary whose spawn failed: (handoff, the death it replaces), retried.
    pending_primary: Option<((u64, EngineState), Death)>,
    /// A spare whose spawn failed (with why it is started), retried.
    spare_retry: Option<Cause>,
    /// A reserve whose spawn failed or was throttled, retried.
    reserve_retry: Option<Cause>,
    /// No spawn before this instant: the crash-loop backoff (restart intensity exceeded).
    brake_until: u64,
    /// No retry of a failed spawn before these instants: [a primary, a standby or reserve].
    /// Apart, so that a failing reserve never holds back the cold start of a primary.
    retry_at: [u64; 2],
    /// Recent worker deaths (restart intensity window).
    deaths: std::collections::VecDeque<u64>,
    backoff_ns: u64,
    /// Spawns failing since (reported once per episode).
    trouble: Option<SpawnTrouble>,
    /// Underruns outside cold starts already reported.
    underruns_explained: u64,
    /// The CPUs the monitor may use (its affinity at start): where primary and standby go.
    cpus: Vec<usize>,
}

/// Minimum interval between retries of a failed spawn, and the first crash-loop backoff.
const RETRY_NS: u64 = 100_000_000;
/// Longest interval between retries of a failing spawn (a full shm file system).
const MAX_RETRY_NS: u64 = 2_000_000_000;
/// A worker that is not ready this long after its spawn (mapped, locked, reporting) is stuck in
/// its start-up: killed and started again. A start takes about 2 ms; 2 s leaves room for a
/// machine paging the binary in under memory pressure.
const READY_TIMEOUT_NS: u64 = 2_000_000_000;

/// Signals a worker dies of by itself (a bug), as opposed to a SIGKILL from outside.
const CRASH_SIGNALS: [i32; 7] =
    [libc::SIGABRT, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGSYS, libc::SIGTRAP];

/// Deaths remembered for the restart intensity, at most.
const MAX_DEATHS_KEPT: usize = 4096;

/// Which retry delay a role's failed spawn waits for: 0 a primary, 1 the others.
fn retry_class(role: Role) -> usize {
    usize::from(role != Role::Primary)
}

/// A run of failing spawns (e.g. a full shm file system): reported once, retried with backoff.
struct SpawnTrouble {
    first_ns: u64,
    failures: u32,
    delay_ns: u64,
}
/// Longest crash-loop backoff.
const MAX_BACKOFF_NS: u64 = 5_000_000_000;

impl Monitor {
    pub(crate) fn new(sh: Arc<Shared>, stop: Arc<EventFd>, events: Reporter) -> std::io::Result<Monitor> {
        let epoll = Epoll::new()?;
        let block_ns = sh.config.block_ns();
        // Not every block (the monitor's own wake-up is a cost paid all day): the output
        // thread wakes it through `suspect` when a worker needs judging; the timer is fast
        // only while something is in flight (see `pace`).
        let tick_ns = sh.config.monitor_busy_tick_ns();
        let timer = TimerFd::periodic(Duration::from_nanos(tick_ns))?;
        epoll.add(stop.raw(), TOKEN_STOP)?;
        epoll.add(timer.raw(), TOKEN_TIMER)?;
        epoll.add(sh.play.suspect.raw(), TOKEN_SUSPECT)?;
        let exe = sh.config.worker_exe.clone().unwrap_or_else(|| "/proc/self/exe".into());
        Ok(Monitor {
            sh,
            _stop: stop,
            events,
            rt_refusal_reported: false,
            sandbox_refusal_reported: false,
            mlock_refusal_reported: false,
            epoll,
            timer,
            // Sized for every slot up front: allocated before start-up's mlockall, so the
            // takeover path never touches memory that was not locked then (nor reallocates).
            workers: Vec::with_capacity(MAX_SLOTS),
            retired: Vec::with_capacity(MAX_SLOTS),
            failovers: Vec::with_capacity(MAX_SLOTS),
            next_id: 1,
            exe,
            block_ns,
            tick_ns,
            last_tick_period_ns: tick_ns,
            last_tick_ns: sys::now_ns(),
            pending_primary: None,
            spare_retry: None,
            reserve_retry: None,
            brake_until: 0,
            retry_at: [0; 2],
            // Full size up front (32 KiB): pushed to on the death path, never reallocated there.
            deaths: std::collections::VecDeque::with_capacity(MAX_DEATHS_KEPT),
            backoff_ns: RETRY_NS,
            trouble: None,
            underruns_explained: 0,
            cpus: sys::allowed_cpus(),
        })
    }

    pub(crate) fn run(mut self) {
        self.sh.live.monitor_tid.store(sys::gettid(), Ordering::SeqCst);
        match sys::set_fifo(self.sh.live.monitor_priority.load(Ordering::SeqCst)) {
            Ok(()) => self.sh.metrics.monitor_realtime.store(true, Ordering::Relaxed),
            Err(e) => {
                self.events.report(Report::MonitorRealtimeRefused { errno: e.raw_os_error().unwrap_or(libc::EPERM) })
            }
        }
        let (f, g) = (self.sh.config.frequency, self.sh.config.gain);
        let initial = EngineState::initial(f, g, ramp_frames(self.sh.config.sample_rate));
        // Start-up: a failure here is the start's to report (it waits for these workers).
        if let Err(e) = self.spawn(Role::Primary, Some((0, initial)), Cause::Initial) {
            *self.sh.start_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            return;
        }
        if self.sh.config.standby != StandbyMode::None {
            if let Err(e) = self.spawn(Role::Spare, None, Cause::Initial) {
                *self.sh.start_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                self.shutdown(); // the primary is running: stop it, release its segments
                return;
            }
            self.ensure_reserve(Cause::Initial);
        }
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        loop {
            let n = self.epoll.wait(&mut evs, -1);
            let now = sys::now_ns();
            let shown = self.shown();
            for ev in &evs[..n] {
                let token = ev.u64;
                match token {
                    TOKEN_STOP => {
                        self.shutdown();
                        return;
                    }
                    TOKEN_TIMER | TOKEN_SUSPECT => {
                        self.timer.drain();
                        self.sh.play.suspect.drain();
                        self.tick(now);
                        // Liveness for the systemd watchdog: this loop is turning.
                        self.sh.monitor_ticks.fetch_add(1, Ordering::Relaxed);
                    }
                    t if t & KIND_MASK == KIND_EXIT => self.on_exit(t & !KIND_MASK, now),
                    t if t & KIND_MASK == KIND_EVENT => self.on_event(t & !KIND_MASK),
                    _ => {}
                }
            }
            if self.shown() != shown {
                self.sh.play.changed.notify();
            }
            self.place_on_cpus();
            self.pace();
        }
    }

    /// Keeps the primary and the standby on different CPUs. Left to the scheduler, workers
    /// woken at different phases stay on the CPU they last ran on, which is mostly the same
    /// one: a stall of that CPU (a long non-preemptible kernel section on this kind of VM, 20-45
    /// ms under memory pressure) then holds up both, and the standby's copy of the stream is no
    /// help. Pinned apart, one CPU's stall leaves the other's ring filling. A worker keeps its
    /// CPU for life (a promoted spare stays where it was, so nothing moves in a takeover); the
    /// reserve is not pinned until it becomes the standby, a worker without real-time priority
    /// never. Only syscalls when a pin changes.
    fn place_on_cpus(&mut self) {
        if self.cpus.len() < 2 {
            return;
        }
        let live = |w: &Worker, role: Role| w.role == role && matches!(w.phase, Phase::Idle | Phase::Running { .. });
        let primary = self.workers.iter().position(|w| live(w, Role::Primary));
        let spare = self.workers.iter().position(|w| live(w, Role::Spare));
        let pinned = |ws: &[Worker], i: Option<usize>| i.and_then(|i| ws[i].cpu.and_then(Result::ok));
        // The primary first (at start-up it is alone), then the standby away from it.
        for (me, other) in [(primary, spare), (spare, primary)] {
            let Some(i) = me else { continue };
            if !self.workers[i].shm.ring.worker_realtime() {
                continue; // without real-time priority, CFS's balancing is worth more than a pin
            }
            let theirs = pinned(&self.workers, other);
            match self.workers[i].cpu {
                Some(Err(())) => continue, // refused: left to the scheduler
                Some(Ok(c)) if Some(c) != theirs => continue,
                _ => {}
            }
            let Some(&cpu) = self.cpus.iter().find(|&&c| Some(c) != theirs) else { continue };
            let w = &mut self.workers[i];
            w.cpu = Some(sys::pin_to_cpu(w.pid as i32, cpu).map(|()| cpu).map_err(|_| ()));
        }
        let (p, s) = (pinned(&self.workers, primary), pinned(&self.workers, spare));
        self.sh.metrics.standby_on_other_cpu.store(p.is_some() && s.is_some() && p != s, Ordering::Relaxed);
    }

    /// The timer runs fast while something is in flight that the ticks move along (a worker
    /// starting, a dead ring to reclaim, a retry, a cold takeover), slow when all is well.
    fn pace(&mut self) {
        let busy = self.pending_primary.is_some()
            || self.spare_retry.is_some()
            || self.reserve_retry.is_some()
            || self.sh.play.cold_takeovers_pending.load(Ordering::Relaxed) > 0
            || self.workers.iter().any(|w| {
                matches!(w.phase, Phase::Spawning | Phase::Dead) || w.role == Role::Draining || !w.ready_reported
            });
        let want = if busy { self.sh.config.monitor_busy_tick_ns() } else { self.sh.config.monitor_idle_tick_ns() };
        if want != self.tick_ns && self.timer.set_period(Duration::from_nanos(want)).is_ok() {
            self.tick_ns = want;
        }
    }

    /// What of the monitor's D-Bus shows: (primed, primary, spare ready).
    fn shown(&self) -> (bool, u32, bool) {
        let m = &self.sh.metrics;
        (
            self.sh.primed.load(Ordering::Relaxed),
            m.primary_pid.load(Ordering::Relaxed),
            m.spare_ready.load(Ordering::Relaxed),
        )
    }

    fn find(&self, role: Role) -> Option<usize> {
        self.workers.iter().position(|w| w.role == role && w.phase != Phase::Dead)
    }

    fn pos(&self) -> u64 {
        self.sh.play.position.blocks()
    }

    // ---- spawning --------------------------------------------------------------------

    fn free_slot(&self) -> Option<usize> {
        (0..MAX_SLOTS).find(|&s| self.sh.play.table.is_free(s) && !self.workers.iter().any(|w| w.slot == s))
    }

    /// Starts a worker for `role`: creates and maps its segments, execs it, and watches its
    /// pidfd and event fd. On any error nothing is left behind (segments released, process
    /// killed).
    fn spawn(&mut self, role: Role, start_from: Option<(u64, EngineState)>, cause: Cause) -> Result<(), SpawnError> {
        let slot = self.free_slot().ok_or(SpawnError::NoFreeSlot)?;
        // Taken for good only once the spawn worked: a failed one leaves nothing behind (its
        // segments are released), and a pending failover waits for the id that really runs.
        let id = self.next_id;
        let segments = segment_ids(slot, id);
        let (ring_file, ctl_file) = self.create_segments(&segments, id)?;
        let started = self.map_and_exec(slot, id, &ring_file, &ctl_file);
        let (shm, ctl, event, pid, pidfd, spawned_ns) = match started {
            Ok(w) => w,
            Err(e) => {
                self.release_segments(slot, id);
                return Err(e);
            }
        };
        {
            let mut book = self.sh.shm.lock();
            if let Some(reg) = book.registry.as_mut() {
                for s in &segments {
                    let _ = reg.set_owner(s, &format!("worker-{id} (pid {pid})"));
                }
            }
        }
        self.sh.manifest_dirty.notify();
        self.sh.play.table.set(slot, &shm);
        match role {
            Role::Primary => {
                self.sh.play.table.set_active(slot);
                self.sh.metrics.primary_pid.store(pid, Ordering::Relaxed);
            }
            Role::Spare => self.sh.metrics.spare_pid.store(pid, Ordering::Relaxed),
            Role::Reserve => self.sh.metrics.reserve_pid.store(pid, Ordering::Relaxed),
            Role::Draining => {}
        }
        self.next_id += 1;
        self.events.report(Report::Spawned { pid, slot, id, role: role.name() });
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
            run_start: None,
            cause,
            ready_reported: false,
            hb_write: 0,
            hb: HbState::default(),
            hang_detected_ns: None,
            killed_for: None,
            dead_since: None,
            spawned_ns,
            cpu: None,
        });
        if let Some(w) = self.workers.last() {
            tell_role(w);
        }
        Ok(())
    }

    /// Creates worker `id`'s two segment files (their pages reserved: a full file system is
    /// an error here, never a fault later) and registers them.
    fn create_segments(&mut self, segments: &[String; 2], id: u64) -> Result<(File, File), SpawnError> {
        let owner = format!("worker-{id} (spawning)");
        let mut book = self.sh.shm.lock();
        let reg = book.registry.as_mut().ok_or(SpawnError::ShuttingDown)?;
        let ring = reg
            .create(&segments[0], self.sh.geo.segment_size(), SegmentKind::AudioRing, &owner)
            .map_err(|e| SpawnError::shm(&e))?;
        let ctl =
            match reg.create(&segments[1], control::segment_size(CONTROL_CAPACITY), SegmentKind::ControlRing, &owner) {
                Ok(f) => f,
                Err(e) => {
                    let _ = reg.release(&segments[0]);
                    return Err(SpawnError::shm(&e));
                }
            };
        book.held.insert(segments[0].clone(), None);
        book.held.insert(segments[1].clone(), None);
        Ok((ring, ctl))
    }

    /// Maps the segments, execs the worker and watches it. On error the process (if any) is
    /// killed and reaped; the caller releases the segments.
    #[allow(clippy::type_complexity)]
    fn map_and_exec(
        &mut self,
        slot: usize,
        id: u64,
        ring_file: &File,
        ctl_file: &File,
    ) -> Result<(Arc<WorkerShm>, Arc<ControlRing>, EventFd, u32, OwnedFd, u64), SpawnError> {
        let ring = AudioRing::create(ring_file, self.sh.geo).map_err(|e| SpawnError::io("map audio ring", &e))?;
        let ctl =
            ControlRing::create(ctl_file, CONTROL_CAPACITY).map_err(|e| SpawnError::io("map control ring", &e))?;
        let mut locked = ring.locked() && ctl.locked();
        let ctl = Arc::new(ctl);
        let wake = EventFd::new(true).map_err(|e| SpawnError::io("eventfd", &e))?;
        let event = EventFd::new(true).map_err(|e| SpawnError::io("eventfd", &e))?;
        let shm = Arc::new(WorkerShm {
            ring,
            wake,
            running: std::sync::atomic::AtomicBool::new(false),
            diverged: std::sync::atomic::AtomicBool::new(false),
            differing: std::sync::atomic::AtomicU32::new(0),
            wake_phase: std::sync::atomic::AtomicU32::new(0),
        });
        // The output thread and the takeover path read these objects (made after start-up's
        // mlockall, which pinned only what existed then): pinned too.
        locked &= sys::mlock_value(&*shm).is_ok() && sys::mlock_value(&*ctl).is_ok();
        if !locked {
            self.sh.metrics.mlock_failures.fetch_add(1, Ordering::Relaxed);
            if !self.mlock_refusal_reported {
                self.mlock_refusal_reported = true;
                self.events.report(Report::MlockRefused { id });
            }
        }
        let fds = WorkerFds { ring: ring_file, ctl: ctl_file, wake: shm.wake.raw(), event: event.raw(), slot, id };
        let t_spawn = sys::now_ns();
        let pid = spawn_worker(&self.exe, &fds, self.sh.live.render_priority.load(Ordering::Relaxed))
            .map_err(|e| SpawnError::io("exec the worker", &e))?;
        let pidfd = match sys::pidfd_open(pid as i32) {
            Ok(fd) => fd,
            Err(e) => {
                sys::kill_and_reap(pid as i32);
                return Err(SpawnError::io("pidfd_open", &e));
            }
        };
        let watched = self
            .epoll
            .add(pidfd.as_raw_fd(), KIND_EXIT | id)
            .and_then(|()| self.epoll.add(event.raw(), KIND_EVENT | id));
        if let Err(e) = watched {
            self.epoll.remove(pidfd.as_raw_fd());
            let _ = sys::pidfd_send_signal(&pidfd, libc::SIGKILL);
            let _ = sys::pidfd_reap(&pidfd);
            return Err(SpawnError::io("epoll_ctl", &e));
        }
        Ok((shm, ctl, event, pid, pidfd, t_spawn))
    }

    /// Starts a worker rendering: from `from` if given, else (a hot spare) from the primary's
    /// newest committed state, read under the control lock so no message slips between.
    /// Returns false (and leaves the worker idle) when there is nothing to follow yet.
    fn activate(&mut self, idx: usize, from: Option<(u64, EngineState)>) -> bool {
        let pos = self.pos();
        let primary = self.find(Role::Primary).map(|i| (self.workers[i].shm.clone(), self.workers[i].start_from));
        let w = &self.workers[idx];
        let target = Target { worker_id: w.id, ctl: w.ctl.clone(), shm: w.shm.clone() };
        // With rewind stamping a spare follows the stream from the state played last: a change
        // is never stamped before the block after it, so the spare renders every change at
        // its stamp, as the primary does; any later block could already lie past a change the
        // primary is rendering again. Otherwise (and before anything played) the primary's
        // newest block that holds every change stamped inside it, so the spare is caught up at
        // once, or its start if it has rendered nothing.
        let (bf, stamps) = (self.sh.geo.block_frames as u64, &self.sh.play.stamps);
        let fresh = |b: u64, c: &Committed| stamps.is_fresh(b, bf, c.meta.known_seq);
        let rewind = self.sh.config.control_stamp == crate::config::ControlStamp::Rewind;
        let played = || {
            let s = self.sh.play.played_state.load().filter(|s| rewind && s.frame % bf == 0)?;
            Some((s.frame / bf, s))
        };
        let follow = |p: &WorkerShm, start: Option<(u64, EngineState)>| {
            played()
                .or_else(|| p.ring.last_state_where(0, fresh))
                .or_else(|| start.filter(|_| p.ring.last_valid_state(0).is_none()))
        };
        let started = self.sh.control.start_worker(
            target,
            || from.or_else(|| primary.as_ref().and_then(|(p, start)| follow(p, *start))),
            pos,
        );
        let Some((base, _)) = started else { return false };
        self.stagger(idx);
        let w = &mut self.workers[idx];
        w.run_start = started;
        w.phase = Phase::Running { base };
        w.hb_write = base;
        w.hb = HbState::default();
        true
    }

    /// Gives worker `idx` the wake-up phase half a batch away from the other rendering
    /// worker's (primary and hot spare are woken in different periods, never both in one, and
    /// while one of them waits for its batch the other's ring is half a batch fuller). With no
    /// other (start-up, a warm or cold takeover) it is woken after the very next block: a
    /// primary that starts where the dead one's full ring ends must not wait a batch for room.
    fn stagger(&self, idx: usize) {
        let batch = self.sh.play.settings.batch_blocks.max(1);
        let other = self.workers.iter().enumerate().find(|&(i, w)| {
            i != idx && matches!(w.role, Role::Primary | Role::Spare) && matches!(w.phase, Phase::Running { .. })
        });
        let next = ((self.pos() + 1) % batch as u64) as u32;
        let phase = other.map_or(next, |(_, w)| (w.shm.wake_phase.load(Ordering::Relaxed) + batch / 2) % batch);
        self.workers[idx].shm.wake_phase.store(phase, Ordering::Relaxed);
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
            let w = &self.workers[i];
            self.events.report(Report::Ready {
                pid: w.pid,
                id: w.id,
                after_us: now.saturating_sub(w.spawned_ns) / 1000,
            });
            if self.workers[i].shm.ring.worker_realtime() {
                self.sh.metrics.worker_realtime.store(true, Ordering::Relaxed);
            } else {
                if self.workers[i].role == Role::Primary {
                    self.sh.metrics.worker_realtime.store(false, Ordering::Relaxed);
                }
                if !self.rt_refusal_reported {
                    self.rt_refusal_reported = true;
                    self.events.report(Report::RealtimeRefused { pid: self.workers[i].pid });
                }
            }
            let sandboxed = self.workers[i].shm.ring.worker_sandboxed();
            if !sandboxed {
                self.sh.metrics.worker_sandboxed.store(false, Ordering::Relaxed);
            }
            if !sandboxed && !self.sandbox_refusal_reported {
                self.sandbox_refusal_reported = true;
                self.events.report(Report::SandboxRefused { pid: self.workers[i].pid });
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
            // Room by the supervisor's own position (the ring's read index is worker-writable).
            let room = w.shm.ring.space_at(self.sh.play.position.blocks());
            // As full as a ring gets: it renders a batch at a time, so between two wake-ups
            // up to a batch of it is free.
            let full = room <= self.sh.play.settings.batch_blocks as u64;
            if write > base && w.role == Role::Primary {
                // Its own ring now says where it is; the start state is history.
                w.start_from = None;
                if full {
                    self.sh.primed.store(true, Ordering::Release);
                }
            }
            match w.role {
                Role::Primary if write > base => self.report_ready(i, now),
                // A hot spare is ready once it has caught up: its ring is as full as it may be
                // (started at the primary's newest block, it may have had nothing to render).
                Role::Spare if full => self.report_ready(i, now),
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
            let after_death_of = w.cause.after_death_of();
            self.events.report(Report::ReserveReady {
                pid: w.pid,
                after_death_of,
                spawned_ns: w.spawned_ns,
                ready_ns: now,
            });
        }
        if let Cause::Replaces(death) = std::mem::replace(&mut w.cause, Cause::Initial) {
            self.sh.metrics.replacements.fetch_add(1, Ordering::Relaxed);
            self.events.report(Report::Replaced {
                pid: w.pid,
                role: w.role.name(),
                replaces_pid: death.pid,
                detected_ns: death.detected_ns,
                ready_ns: now,
            });
        }
    }

    /// Reports the failovers that are complete. On the takeover path: no allocation.
    fn check_failovers(&mut self, now: u64) {
        let pos = self.pos();
        let mut k = 0;
        while k < self.failovers.len() {
            let f = &self.failovers[k];
            let done = match f.new_id.map(|id| (id, self.workers.iter().find(|w| w.id == id))) {
                // Not started yet (crash-loop backoff or a failed spawn).
                None => false,
                // The new primary died too: its own failover is tracked.
                Some((_, None)) => true,
                Some((_, Some(w))) => {
                    let running = matches!(w.phase, Phase::Running { .. });
                    let holds = running && (w.shm.ring.write_index() > f.need || pos > f.need);
                    if holds {
                        self.events.report(Report::Failover {
                            old_pid: f.old_pid,
                            new_pid: w.pid,
                            detected_ns: f.detected_ns,
                            failover_ns: now,
                        });
                    }
                    holds
                }
            };
            if done {
                if self.failovers.swap_remove(k).cold {
                    self.sh.play.cold_takeovers_pending.fetch_sub(1, Ordering::AcqRel);
                }
            } else {
                k += 1;
            }
        }
    }

    // ---- death -------------------------------------------------------------------------

    fn on_exit(&mut self, id: u64, now: u64) {
        let Some(i) = self.workers.iter().position(|w| w.id == id) else { return };
        let ending = match sys::pidfd_reap(&self.workers[i].pidfd) {
            Ok(s) => Ending::Status(s),
            Err(e) => Ending::Unknown(e.raw_os_error().unwrap_or(libc::EIO)),
        };
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
        self.note_death(now);

        // A change that killed it must not be handed to its successor: the poison check comes
        // just before the takeover (it costs nothing for a kill from outside, a few µs under
        // the control lock otherwise).
        self.check_poison(i, ending);
        // Take over first; bookkeeping, logging and the rebuild come after. The worker that
        // replaces this one (and counts as its replacement) is the new spare, unless the
        // primary had to be started cold, which then is the replacement itself.
        let death = Death { pid, detected_ns: detected };
        let spare_cause = match role {
            Role::Primary if self.replace_primary(i, death) => Cause::Replaces(death),
            Role::Primary => Cause::Initial,
            Role::Spare => {
                self.sh.metrics.spare_ready.store(false, Ordering::Release);
                self.sh.metrics.spare_pid.store(0, Ordering::Relaxed);
                Cause::Replaces(death)
            }
            Role::Reserve => {
                self.sh.metrics.reserve_pid.store(0, Ordering::Relaxed);
                Cause::Initial
            }
            Role::Draining => Cause::Initial,
        };
        self.sh.control.remove_target(id);
        {
            let mut book = self.sh.shm.lock();
            for s in &self.workers[i].segments {
                book.held.insert(s.clone(), Some(now));
            }
        }
        self.events.report(Report::Died { pid, role: role.name(), ending, detected_ns: detected, handled_ns: now });
        match role {
            Role::Primary | Role::Spare => self.ensure_spare(spare_cause),
            Role::Reserve => self.ensure_reserve(Cause::Replaces(death)),
            Role::Draining => {}
        }
    }

    /// A worker that died of something in it (not killed from outside) names the change it
    /// was about to apply; two such deaths at one change quarantine it (see
    /// ControlCore::note_fatal), so a change that kills every worker that applies it cannot
    /// become a crash loop and then silence.
    fn check_poison(&mut self, i: usize, ending: Ending) {
        let w = &self.workers[i];
        let crashed = matches!(ending, Ending::Status(sys::ExitStatus::Signaled(sig)) if CRASH_SIGNALS.contains(&sig));
        // Spinning (an endless loop) or corrupting its blocks is the worker's own doing; being
        // stopped, starved or blocked may well not be (a SIGSTOP, a busy machine).
        let from_inside = crashed || matches!(w.killed_for, Some("spinning without progress" | "corrupt"));
        if !from_inside {
            return;
        }
        // Where it was: the block after its newest valid one (or where its run started, if it
        // committed none: a successor that dies at its first block names the change too, or
        // that death would not count and the change would go on being replayed).
        let Some((block, state)) = w.shm.ring.last_valid_state(0).or(w.run_start).or(w.start_from) else { return };
        if let Some(q) = self.sh.control.note_fatal(&state, block, self.sh.geo.block_frames as u64) {
            self.sh.metrics.control_quarantined.fetch_add(1, Ordering::Relaxed);
            self.events.report(Report::Quarantined {
                seq: q.msg.seq,
                kind: q.msg.kind,
                value: q.msg.value,
                deaths: q.deaths,
                kept: q.kept,
            });
        }
    }

    /// Promotes the spare (returns true) or starts a primary cold (false).
    fn replace_primary(&mut self, dead: usize, death: Death) -> bool {
        let pos = self.pos();
        // The spare takes over; if there is none (it died too), the reserve does, like a
        // warm standby.
        let spare = self.find(Role::Spare).or_else(|| self.find(Role::Reserve));
        let idle = spare.is_some_and(|s| self.workers[s].phase == Phase::Idle);
        let handoff = self.handoff_state(dead, pos, idle);
        let hot = spare.is_some_and(|s| matches!(self.workers[s].phase, Phase::Running { .. }));
        let cold = spare.is_none_or(|s| self.workers[s].phase == Phase::Spawning);
        if cold {
            self.sh.metrics.cold_starts.fetch_add(1, Ordering::Relaxed);
            self.sh.play.cold_takeovers_pending.fetch_add(1, Ordering::AcqRel);
        }
        // The block the new primary must hold for the takeover to be complete: a hot standby
        // already renders the same stream, so the very next block the output needs; anyone
        // else continues where the dead primary's committed blocks end.
        let need = if hot { pos } else { handoff.0.max(pos) };
        let new_id = match spare {
            Some(s) => Some(self.promote(s, handoff)),
            None => self.start_cold_primary(handoff, death),
        };
        let (detected_ns, old_pid) = (death.detected_ns, death.pid);
        self.failovers.push(PendingFailover { detected_ns, old_pid, new_id, need, cold });
        self.check_failovers(sys::now_ns());
        spare.is_some()
    }

    /// Where the stream continues after primary `dead`: the end of its unbroken run of valid
    /// committed blocks from the output position `pos`, else where it was told to start.
    /// (Its own blocks first: they reach furthest. If it holds nothing playable from `pos`
    /// on, the state at the end of the block played last continues exactly at `pos`.) For
    /// an `idle` successor (a warm standby, the reserve), which starts rendering at once, at
    /// most a batch short of a full ring ahead of `pos`: it then has room for a batch at once
    /// and the takeover is complete with its first block, instead of waiting for the output
    /// to free a slot; it renders the dead ring's last blocks again, bit-identical (the output
    /// plays whichever ring holds a block). A worker still to be spawned starts where the run
    /// ends: by the time it runs the output has moved on, and a cold start long after (a full
    /// /dev/shm) must resume exactly there.
    fn handoff_state(&self, dead: usize, pos: u64, idle: bool) -> (u64, EngineState) {
        let bf = self.sh.geo.block_frames as u64;
        let played =
            self.sh.play.played_state.load().filter(|s| Some(s.frame) == pos.checked_mul(bf)).map(|s| (pos, s));
        let batch = u64::from(self.sh.play.settings.batch_blocks.max(1));
        let limit =
            if idle { pos.saturating_add((self.sh.geo.slots as u64).saturating_sub(batch).max(1)) } else { u64::MAX };
        // Only blocks that hold every change stamped inside them and continue what was played
        // (a stale or diverged block never becomes a handoff state).
        let stamps = &self.sh.play.stamps;
        let after = played.map(|(_, s)| s.check);
        let usable = |b: u64, c: &Committed| {
            stamps.is_fresh(b, bf, c.meta.known_seq)
                && (b != pos || after.is_none_or(|check| c.meta.start_check == check))
        };
        let own = self.workers[dead].shm.ring.handoff_state(pos, limit, usable);
        // At `pos` itself, what was played is the truth (the dead ring's block before it may
        // be another ring's version). With rewind stamping it comes first: a change may be
        // stamped at any block the output has not begun to take, so a successor starting
        // later could not render it at its stamp (the dead ring's blocks still play while the
        // successor catches up).
        let rewind = self.sh.config.control_stamp == crate::config::ControlStamp::Rewind;
        let later = own.filter(|&(base, _)| base > pos && !rewind);
        let fallback = later.or(played).or(own).or(self.workers[dead].start_from);
        fallback.unwrap_or_else(|| {
            // Nothing valid anywhere: resync from the control targets at the output position
            // (an audible discontinuity, counted).
            self.sh.metrics.state_resyncs.fetch_add(1, Ordering::Relaxed);
            let (f, g) = self.sh.control.params();
            let mut s = EngineState::initial(f, g, ramp_frames(self.sh.config.sample_rate));
            s.frame = pos * bf;
            s.seal();
            (pos, s)
        })
    }

    /// Makes worker `s` (the spare, or the reserve) the primary, continuing from `handoff`
    /// unless it already renders the stream. Returns its id.
    fn promote(&mut self, s: usize, handoff: (u64, EngineState)) -> u64 {
        let w = &mut self.workers[s];
        if w.role == Role::Reserve {
            self.sh.metrics.reserve_pid.store(0, Ordering::Relaxed);
        } else {
            self.sh.metrics.spare_pid.store(0, Ordering::Relaxed);
            self.sh.metrics.spare_ready.store(false, Ordering::Release);
        }
        w.role = Role::Primary;
        tell_role(w);
        self.sh.play.table.set_active(w.slot);
        self.sh.metrics.primary_pid.store(w.pid, Ordering::Relaxed);
        match w.phase {
            // Hot: already rendering the same stream; the table switch is the takeover.
            Phase::Running { .. } => {}
            // Warm: continue from the dead primary's state (kept as start_from in case it
            // dies before its first commit).
            Phase::Idle => {
                w.start_from = Some(handoff);
                self.activate(s, Some(handoff));
            }
            // Still starting: it will start from there once ready.
            _ => w.start_from = Some(handoff),
        }
        self.workers[s].id
    }

    /// No spare: a primary is started from `handoff`, unless the restart intensity or a
    /// failing spawn holds it back (then silence plays, counted as underruns, and it is
    /// started later). Returns the new primary's id if it was spawned.
    fn start_cold_primary(&mut self, handoff: (u64, EngineState), death: Death) -> Option<u64> {
        let id = self.next_id;
        if !self.spawn_allowed(sys::now_ns(), Role::Primary) {
            self.pending_primary = Some((handoff, death));
            return None;
        }
        match self.spawn(Role::Primary, Some(handoff), Cause::Replaces(death)) {
            Ok(()) => {
                self.spawn_worked(Role::Primary, sys::now_ns());
                Some(id)
            }
            Err(e) => {
                self.pending_primary = Some((handoff, death));
                self.spawn_failed(Role::Primary, e, sys::now_ns());
                None
            }
        }
    }

    /// Remembers a death for the restart intensity. Only the newest `max_restarts + 1` can
    /// matter, so the list stays bounded whatever the limit and however fast workers die.
    fn note_death(&mut self, now: u64) {
        let keep = (self.sh.live.max_restarts.load(Ordering::Relaxed) as usize).saturating_add(1).min(MAX_DEATHS_KEPT);
        while self.deaths.len() >= keep {
            self.deaths.pop_front();
        }
        self.deaths.push_back(now);
    }

    /// A spawn failed: the first failure of an episode is reported, the retries back off
    /// (RETRY_NS doubling to MAX_RETRY_NS; a primary, whose absence is silence, at most
    /// RETRY_NS) and are only counted. No free slot is transient (rings still draining, gone
    /// within a few periods): retried at the next tick, no episode.
    fn spawn_failed(&mut self, role: Role, error: SpawnError, now: u64) {
        self.sh.metrics.spawn_failures.fetch_add(1, Ordering::Relaxed);
        let class = retry_class(role);
        if error == SpawnError::NoFreeSlot {
            self.retry_at[class] = now + self.block_ns;
            return;
        }
        let t = self.trouble.get_or_insert(SpawnTrouble { first_ns: now, failures: 0, delay_ns: RETRY_NS / 2 });
        t.failures += 1;
        t.delay_ns = (t.delay_ns * 2).min(MAX_RETRY_NS);
        let delay = if class == 0 { t.delay_ns.min(RETRY_NS) } else { t.delay_ns };
        self.retry_at[class] = now + delay;
        if t.failures == 1 {
            self.events.report(Report::SpawnFailing { role: role.name(), error });
        }
    }

    /// A spawn worked: ends a failure episode, if one was running.
    fn spawn_worked(&mut self, role: Role, now: u64) {
        if let Some(t) = self.trouble.take() {
            self.events.report(Report::SpawnRecovered {
                role: role.name(),
                failures: t.failures,
                ms: now.saturating_sub(t.first_ns) / 1_000_000,
            });
        }
    }

    /// May a worker for `role` be started now? False during a failed spawn's retry delay
    /// (of its class) or while the restart intensity is exceeded (then the backoff doubles,
    /// up to MAX_BACKOFF_NS).
    fn spawn_allowed(&mut self, now: u64, role: Role) -> bool {
        if now < self.brake_until || now < self.retry_at[retry_class(role)] {
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
            self.brake_until = now + self.backoff_ns;
            let deaths = self.deaths.len().min(u32::MAX as usize) as u32;
            self.events.report(Report::Throttled {
                deaths,
                window_s,
                limit: max_restarts,
                backoff_ms: self.backoff_ns / 1_000_000,
            });
            self.backoff_ns = (self.backoff_ns * 2).min(MAX_BACKOFF_NS);
            return false;
        }
        if self.deaths.len() <= max_restarts as usize / 2 {
            self.backoff_ns = RETRY_NS;
        }
        true
    }

    /// Makes sure a spare exists or is coming; `cause`: the death it replaces, if any.
    fn ensure_spare(&mut self, cause: Cause) {
        if self.sh.config.standby == StandbyMode::None || self.find(Role::Spare).is_some() {
            return;
        }
        if let Some(r) = self.find(Role::Reserve) {
            // The reserve is already exec'd, mapped and locked: it becomes the spare now (a hot
            // spare is started from the primary's state by `advance`), a new reserve follows.
            // If the reserve was itself still to report a replacement (of a dead reserve), the
            // new reserve reports it instead, so every death gets its replacement counted.
            let w = &mut self.workers[r];
            w.role = Role::Spare;
            tell_role(w);
            let reserve_cause = std::mem::replace(&mut w.cause, cause);
            w.ready_reported = false;
            self.sh.metrics.spare_pid.store(w.pid, Ordering::Relaxed);
            self.sh.metrics.reserve_pid.store(0, Ordering::Relaxed);
            self.advance(r);
            let next = match (reserve_cause, cause) {
                (Cause::Replaces(d), _) => Cause::Replaces(d),
                (_, Cause::Replaces(d)) => Cause::Refills(d.pid),
                (_, c) => c,
            };
            self.ensure_reserve(next);
            return;
        }
        if !self.try_spawn(Role::Spare, cause) {
            self.spare_retry = Some(cause);
        }
    }

    /// Spawns an idle worker for `role` if the restart intensity allows it now. False (the
    /// caller remembers to retry) when throttled or when the spawn failed.
    fn try_spawn(&mut self, role: Role, cause: Cause) -> bool {
        if !self.spawn_allowed(sys::now_ns(), role) {
            return false;
        }
        match self.spawn(role, None, cause) {
            Ok(()) => {
                self.spawn_worked(role, sys::now_ns());
                true
            }
            Err(e) => {
                self.spawn_failed(role, e, sys::now_ns());
                false
            }
        }
    }

    /// Starts a reserve worker if the configuration wants one and there is none.
    fn ensure_reserve(&mut self, cause: Cause) {
        if self.sh.config.standby == StandbyMode::None
            || self.sh.config.reserve_workers == 0
            || self.find(Role::Reserve).is_some()
        {
            return;
        }
        if !self.try_spawn(Role::Reserve, cause) {
            self.reserve_retry = Some(cause);
        }
    }

    /// An underrun while no cold start was in progress should not happen (a standby or a
    /// reserve was ready): it is reported with the table as it stands, once per burst, for
    /// the post-mortem (a test then fails on it, unless the machine itself stalled).
    fn explain_underruns(&mut self) {
        let play = &self.sh.play;
        let outside = play.counters.other_underruns.load(Ordering::Relaxed);
        if outside > self.underruns_explained {
            if play.cold_takeovers_pending.load(Ordering::Acquire) == 0 {
                let mut workers = [WorkerView::default(); MAX_SLOTS];
                for (v, w) in workers.iter_mut().zip(&self.workers) {
                    let base = if let Phase::Running { base } = w.phase { base } else { u64::MAX };
                    *v = WorkerView {
                        pid: w.pid,
                        role: w.role.name(),
                        phase: w.phase.name(),
                        base,
                        write: w.shm.ring.write_index(),
                    };
                }
                let pos = play.position.blocks();
                self.events.report(Report::UnexplainedUnderruns {
                    underruns: outside - self.underruns_explained,
                    pos,
                    workers,
                });
            }
            self.underruns_explained = outside;
        }
    }

    /// Retries spawns that failed (no free slot, exec failure, shm full), at most once per
    /// RETRY_NS, so a persistent failure neither spins nor gives up.
    fn retry_spawns(&mut self, now: u64) {
        if let Some((handoff, death)) = self.pending_primary {
            if self.find(Role::Primary).is_some() {
                self.pending_primary = None;
            } else if self.spawn_allowed(now, Role::Primary) {
                let id = self.next_id;
                match self.spawn(Role::Primary, Some(handoff), Cause::Replaces(death)) {
                    Ok(()) => {
                        self.pending_primary = None;
                        self.spawn_worked(Role::Primary, now);
                        for f in self
                            .failovers
                            .iter_mut()
                            .filter(|f| f.detected_ns == death.detected_ns && f.new_id.is_none())
                        {
                            f.new_id = Some(id);
                        }
                    }
                    Err(e) => self.spawn_failed(Role::Primary, e, now),
                }
            }
        }
        let others_may = now >= self.brake_until && now >= self.retry_at[1];
        if self.pending_primary.is_none() && others_may {
            if let Some(cause) = self.spare_retry.take() {
                self.ensure_spare(cause);
            }
        }
        if self.pending_primary.is_none() && self.spare_retry.is_none() && others_may {
            if let Some(cause) = self.reserve_retry.take() {
                self.ensure_reserve(cause);
            }
        }
    }

    // ---- the heartbeat tick ----------------------------------------------------------------

    fn tick(&mut self, now: u64) {
        // A late tick means this (RT) thread was stalled too: the heartbeat evidence of that
        // interval is unreliable, so every stall clock restarts.
        let late_tick = now.saturating_sub(self.last_tick_ns) > 2 * self.last_tick_period_ns;
        self.last_tick_ns = now;
        self.last_tick_period_ns = self.tick_ns;
        let output_running = self.sh.play.epoch.load(Ordering::Acquire) > 0;
        let mut killed_this_tick = false;
        for i in 0..self.workers.len() {
            self.advance(i);
            if let Some(kill) = self.check(i, now, output_running, late_tick, killed_this_tick) {
                killed_this_tick |= matches!(kill, Kill::Hung { .. });
                self.kill(i, now, kill);
            }
        }
        let live = || self.workers.iter().filter(|w| w.phase != Phase::Dead);
        let late = live().map(|w| w.shm.ring.control_stats().0).max().unwrap_or(0);
        let m = &self.sh.metrics;
        m.control_late.fetch_max(late, Ordering::Relaxed);
        for w in live() {
            let r = w.shm.ring.rewind_stats();
            m.control_rewinds.fetch_max(r.rewinds, Ordering::Relaxed);
            m.control_rewritten_blocks.fetch_max(r.rewritten, Ordering::Relaxed);
            m.control_rewrites_refused.fetch_max(r.refused, Ordering::Relaxed);
            m.control_rewinds_failed.fetch_max(r.failed, Ordering::Relaxed);
            m.worker_resyncs.fetch_max(r.resyncs, Ordering::Relaxed);
        }
        self.explain_underruns();
        self.retry_spawns(now);
        self.reclaim(now);
    }

    /// What, if anything, worker `i` must be killed for now.
    fn check(
        &mut self,
        i: usize,
        now: u64,
        output_running: bool,
        late_tick: bool,
        killed_this_tick: bool,
    ) -> Option<Kill> {
        let w = &self.workers[i];
        if w.hang_detected_ns.is_some() {
            return None;
        }
        // A worker that never gets ready (stuck in its start-up) would hold its role, and
        // the state at degraded, forever: killed, and its role started again.
        let waited = now.saturating_sub(w.spawned_ns);
        if w.phase == Phase::Spawning && waited > READY_TIMEOUT_NS {
            return Some(Kill::NeverReady { waited_us: waited / 1000 });
        }
        if !matches!(w.phase, Phase::Running { .. }) || !output_running {
            return None;
        }
        if w.shm.diverged.load(Ordering::Relaxed) {
            return Some(Kill::Diverged);
        }
        // A block it published that does not check out (its memory is corrupt): it can
        // never deliver that block, and with no other ring holding it the output would
        // wait for it forever. Replace it from its last valid block, before the output
        // gets there.
        if let Some(block) = first_corrupt_block(&self.sh, w) {
            return Some(Kill::Corrupt { block });
        }
        self.heartbeat(i, now, late_tick, killed_this_tick)
    }

    /// The heartbeat: a running worker whose committed-block count stands still while a
    /// batch of its ring is free (it was woken to fill it) is hung, once the scheduler says it
    /// is not merely waiting for a CPU. The stall is counted in output blocks since the batch
    /// fell due, from the ring and the position alone, so it does not matter how seldom the
    /// monitor looks: the output thread wakes it when a stall is long enough to judge.
    fn heartbeat(&mut self, i: usize, now: u64, late_tick: bool, killed_this_tick: bool) -> Option<Kill> {
        let (block_ns, slots) = (self.block_ns, self.sh.geo.slots as u64);
        let pos = self.sh.play.position.blocks();
        let w = &mut self.workers[i];
        // Without real-time priority a healthy worker can be kept off the CPU for a while:
        // give it half the lookahead instead of the configured timeout.
        let timeout_blocks = self.sh.config.hang_timeout_blocks as u64;
        let blocks = if w.shm.ring.worker_realtime() { timeout_blocks } else { timeout_blocks.max(slots / 2) };
        let write = w.shm.ring.write_index();
        // A late look means this (RT) thread was stalled too, and so maybe the worker: the
        // evidence of that interval is unreliable; the next look judges.
        if write != w.hb_write || late_tick {
            w.hb_write = write;
            w.hb = HbState::default();
            return None;
        }
        let batch = self.sh.play.settings.batch_blocks.max(1) as u64;
        let woken = woken_at(write, batch, slots, w.shm.wake_phase.load(Ordering::Relaxed) as u64);
        let mut stalled_blocks = pos.saturating_sub(woken);
        if stalled_blocks == 0 || killed_this_tick {
            return None;
        }
        // The position stops while nothing is playable (this worker may be the only source):
        // the stall then goes on in real time, from the first look that saw it.
        let since = *w.hb.since.get_or_insert(now);
        stalled_blocks = stalled_blocks.max(1 + (now - since) / block_ns);
        let stalled = stalled_blocks * block_ns;
        let probe = sys::sched_probe(w.pid);
        if stalled_blocks < blocks {
            // Not yet judged: a runnable worker's CPU time now, so that the verdict at the
            // timeout can tell spinning from starved over real time.
            if let (Some(p), None) = (&probe, w.hb.probe) {
                if p.state == 'R' {
                    w.hb.probe = Some((now, p.exec_ns));
                }
            }
            return None;
        }
        // Timed out. Ask the scheduler what the worker is doing before killing it: stopped, or
        // asleep with work to do, is hung; runnable is either spinning (hung) or waiting for a
        // CPU (starved, not its fault): a later look tells, by whether it got CPU time over at
        // least a block period of real time (the output can pass several blocks in a burst:
        // a device's prefill, the virtual clock catching up; those are no time to judge by).
        // Starvation is tolerated up to half the lookahead, after which the audio is at risk
        // and it is replaced anyway.
        let why = match probe {
            Some(p) if p.state == 'R' => match w.hb.probe {
                None => {
                    w.hb.probe = Some((now, p.exec_ns));
                    None
                }
                Some((t0, _)) if now - t0 < block_ns / 2 => None,
                Some((t0, exec0)) => {
                    let spinning = p.exec_ns.saturating_sub(exec0) * 2 >= now - t0;
                    let hard_limit = stalled_blocks >= (slots / 2).max(blocks + 1);
                    (spinning || hard_limit).then_some(if spinning {
                        "spinning without progress"
                    } else {
                        "starved of CPU too long"
                    })
                }
            },
            Some(p) if p.state == 'T' || p.state == 't' => Some("stopped"),
            // Asleep: woken once more first, in case the wake-up it slept through was never
            // sent (it costs half a block; a worker really blocked stays asleep).
            Some(_) => match w.hb.nudged {
                None => {
                    w.shm.wake.notify();
                    w.hb.nudged = Some(now);
                    None
                }
                Some(t) if now - t < block_ns / 2 => None,
                Some(_) => Some("blocked with work to do"),
            },
            None => None, // already gone: its pidfd will tell
        };
        why.map(|why| Kill::Hung { why, stalled_us: stalled / 1000 })
    }

    /// Kills worker `i` for `kill` (its pidfd then reports the death, handled as any other),
    /// counts and reports why.
    fn kill(&mut self, i: usize, now: u64, kill: Kill) {
        let w = &mut self.workers[i];
        w.hang_detected_ns = Some(now);
        let _ = sys::pidfd_send_signal(&w.pidfd, libc::SIGKILL);
        let (pid, m) = (w.pid, &self.sh.metrics);
        let report = match kill {
            Kill::NeverReady { waited_us } => {
                w.killed_for = Some("never ready");
                m.hang_kills.fetch_add(1, Ordering::Relaxed);
                Report::Hang { pid, detected_ns: now, stalled_us: waited_us, why: "never became ready" }
            }
            Kill::Diverged => {
                w.killed_for = Some("diverged");
                Report::Faulty {
                    pid,
                    why: "no longer renders the stream played (a control message it missed or rendered late)",
                    block: w.shm.ring.write_index(),
                }
            }
            Kill::Corrupt { block } => {
                w.killed_for = Some("corrupt");
                m.faulty_kills.fetch_add(1, Ordering::Relaxed);
                Report::Faulty { pid, why: "published a block that does not check out", block }
            }
            Kill::Hung { why, stalled_us } => {
                w.killed_for = Some(why);
                m.hang_kills.fetch_add(1, Ordering::Relaxed);
                Report::Hang { pid, detected_ns: now, stalled_us, why }
            }
        };
        self.events.report(report);
    }

    /// Dead workers whose blocks the output has passed leave the table; after the grace
    /// period their segments are unlinked and dropped from the manifest.
    fn reclaim(&mut self, now: u64) {
        let pos = self.pos();
        let epoch = self.sh.play.epoch.load(Ordering::SeqCst);
        let mut k = 0;
        while k < self.workers.len() {
            let w = &self.workers[k];
            // Drained: it holds no valid block at or after `pos` any more. Not "nothing valid
            // at `pos`": a worker started from a state ahead of the output (a warm takeover
            // continuing where a dead ring's blocks end) holds nothing at `pos` yet, and its
            // blocks further on may be the only copy of them (a hot spare started from its
            // newest state holds only what comes after): retiring it early left a hole no ring
            // could fill, silence until the next takeover re-rendered from the played state.
            let drained = !w.shm.ring.holds_valid_from(pos);
            let stale = w.dead_since.is_some_and(|d| now - d > 1_000_000_000);
            if w.phase == Phase::Dead && (drained || stale) {
                let w = self.workers.remove(k);
                self.sh.play.table.clear(w.slot);
                self.retired.push(Retired {
                    pid: w.pid,
                    slot: w.slot,
                    id: w.id,
                    shm: w.shm,
                    epoch: self.sh.play.epoch.load(Ordering::SeqCst),
                });
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
                if self.release_segments(r.slot, r.id) {
                    self.events.report(Report::Reclaimed { pid: r.pid, slot: r.slot, id: r.id });
                }
            } else {
                j += 1;
            }
        }
    }

    /// Unlinks worker `id`'s segments and forgets them (the manifest is rewritten later, by
    /// housekeeping: no manifest I/O on this thread). False if an unlink failed (reported).
    fn release_segments(&mut self, slot: usize, id: u64) -> bool {
        let mut failed = None;
        {
            let mut book = self.sh.shm.lock();
            for s in &segment_ids(slot, id) {
                book.held.remove(s);
                if let Some(reg) = book.registry.as_mut() {
                    if let Err(e) = reg.release(s) {
                        failed = Some(e.op_errno().1);
                    }
                }
            }
        }
        self.sh.manifest_dirty.notify();
        if let Some(errno) = failed {
            self.events.report(Report::ReleaseFailed { slot, id, errno });
        }
        failed.is_none()
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
        for i in 0..self.workers.len() {
            let w = &mut self.workers[i];
            if w.phase == Phase::Dead {
                continue;
            }
            let left = Duration::from_nanos(deadline.saturating_sub(sys::now_ns()));
            if !sys::pidfd_wait_exit(&w.pidfd, left) {
                self.events.report(Report::IgnoredTerm { pid: w.pid });
                let _ = sys::pidfd_send_signal(&w.pidfd, libc::SIGKILL);
            }
            let _ = sys::pidfd_reap(&w.pidfd);
            w.phase = Phase::Dead;
        }
        for w in &self.workers {
            self.sh.play.table.clear(w.slot);
        }
        let owners: Vec<(usize, u64)> =
            self.workers.iter().map(|w| (w.slot, w.id)).chain(self.retired.iter().map(|r| (r.slot, r.id))).collect();
        self.workers.clear();
        self.retired.clear();
        for (slot, id) in owners {
            self.release_segments(slot, id);
        }
        self.sh.metrics.spare_ready.store(false, Ordering::Relaxed);
    }
}
