//! What the monitor has to say, and the event thread that says it.
//!
//! The monitor is a real-time thread whose takeover path must not allocate, lock, log or
//! block. So it only pushes small, copyable [`Report`]s into a pre-allocated wait-free queue
//! (rtrb) and wakes the event thread through an eventfd. The event thread (ordinary
//! priority) records the distributions (detection, failover and rebuild times: a lock), logs
//! each report once with its structured fields, and hands the public [`Event`]s to every
//! subscriber (tests, the D-Bus bridge). A full queue drops the report and counts it
//! (`events_dropped`); it never blocks the monitor.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{segment_ids, Event, Shared};
use crate::sys::{EventFd, ExitStatus};

/// Reports the queue holds (about 0.5 MB, allocated and locked at start): far more than a kill
/// storm produces between two wake-ups of the event thread.
const CAPACITY: usize = 1024;

/// Why a worker could not be started (copyable: it travels in a [`Report`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpawnError {
    #[error("no free worker slot")]
    NoFreeSlot,
    #[error("shutting down")]
    ShuttingDown,
    /// `op` failed with `errno` (ENOSPC: the shm file system is full).
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Io { op: &'static str, errno: i32 },
}

impl SpawnError {
    pub(crate) fn io(op: &'static str, e: &std::io::Error) -> SpawnError {
        SpawnError::Io { op, errno: e.raw_os_error().unwrap_or(libc::EIO) }
    }

    pub(crate) fn shm(e: &crate::shm::registry::ShmError) -> SpawnError {
        let (op, errno) = e.op_errno();
        SpawnError::Io { op, errno }
    }
}

/// How a dead worker ended, as far as the monitor could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    Status(ExitStatus),
    /// waitid failed with this errno.
    Unknown(i32),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Status(s) => s.fmt(f),
            Ending::Unknown(errno) => {
                write!(f, "ended, status unknown ({})", std::io::Error::from_raw_os_error(*errno))
            }
        }
    }
}

/// One thing the monitor did or saw. Plain data: pushing it allocates nothing. (One variant
/// is much larger than the others; boxing it would allocate on the monitor thread, and the
/// queue's slots are allocated once anyway.)
#[derive(Debug, Clone, Copy)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Report {
    Died {
        pid: u32,
        role: &'static str,
        ending: Ending,
        detected_ns: u64,
        handled_ns: u64,
    },
    Hang {
        pid: u32,
        detected_ns: u64,
        stalled_us: u64,
        why: &'static str,
    },
    /// Killed for what the monitor saw in its memory or its control ring.
    Faulty {
        pid: u32,
        why: &'static str,
        block: u64,
    },
    Failover {
        old_pid: u32,
        new_pid: u32,
        detected_ns: u64,
        failover_ns: u64,
    },
    Replaced {
        pid: u32,
        role: &'static str,
        replaces_pid: u32,
        detected_ns: u64,
        ready_ns: u64,
    },
    ReserveReady {
        pid: u32,
        after_death_of: Option<u32>,
        spawned_ns: u64,
        ready_ns: u64,
    },
    RealtimeRefused {
        pid: u32,
    },
    SandboxRefused {
        pid: u32,
    },
    /// The memory of worker `id` the audio path reads could not all be locked (reported once;
    /// every refusal counts in mlock_failures).
    MlockRefused {
        id: u64,
    },
    Reclaimed {
        pid: u32,
        slot: usize,
        id: u64,
    },
    Spawned {
        pid: u32,
        slot: usize,
        id: u64,
        role: &'static str,
    },
    Ready {
        pid: u32,
        id: u64,
        after_us: u64,
    },
    /// The first failure of a spawn episode (later retries are counted, not reported).
    SpawnFailing {
        role: &'static str,
        error: SpawnError,
    },
    /// Spawning works again after `failures` failed attempts over `ms` milliseconds.
    SpawnRecovered {
        role: &'static str,
        failures: u32,
        ms: u64,
    },
    Throttled {
        deaths: u32,
        window_s: u32,
        limit: u32,
        backoff_ms: u64,
    },
    MonitorRealtimeRefused {
        errno: i32,
    },
    /// A dead worker's segments could not be unlinked (they stay listed; the audit counts them).
    ReleaseFailed {
        slot: usize,
        id: u64,
        errno: i32,
    },
    /// A worker ignored SIGTERM at shutdown and was killed.
    IgnoredTerm {
        pid: u32,
    },
    /// Underruns while no cold start was in progress: the table as it stood.
    UnexplainedUnderruns {
        underruns: u64,
        pos: u64,
        workers: [WorkerView; crate::playback::MAX_SLOTS],
    },
    /// Change `seq` killed `deaths` workers that applied it: withdrawn everywhere; `kept`
    /// is the value of its kind in force without it.
    Quarantined {
        seq: u64,
        kind: u32,
        value: f64,
        deaths: u32,
        kept: f64,
    },
}

/// One worker as the monitor saw it (for the post-mortem of an unexplained underrun).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WorkerView {
    pub pid: u32,
    pub role: &'static str,
    pub phase: &'static str,
    /// Its run's base block (u64::MAX if not running).
    pub base: u64,
    pub write: u64,
}

/// The monitor's end of the queue. Real-time safe: a wait-free push and an eventfd write.
pub(crate) struct Reporter {
    /// Taken (dropped) by `Drop` before the last wake-up, so that the event thread, woken,
    /// sees the queue abandoned: a wake-up before the drop could find it still open and go
    /// back to sleep for its whole timeout (a 1 s stop).
    queue: Option<rtrb::Producer<Report>>,
    wake: Arc<EventFd>,
    sh: Arc<Shared>,
}

impl Reporter {
    pub(crate) fn report(&mut self, r: Report) {
        if self.queue.as_mut().is_none_or(|q| q.push(r).is_err()) {
            self.sh.metrics.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.wake.notify();
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        // The event thread drains what is left and ends.
        drop(self.queue.take());
        self.wake.notify();
    }
}

/// The event thread's end.
pub(crate) struct EventThread {
    queue: rtrb::Consumer<Report>,
    wake: Arc<EventFd>,
    sh: Arc<Shared>,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Event>>>>,
}

/// A queue from the monitor to a new event thread.
pub(crate) fn channel(
    sh: &Arc<Shared>,
    subscribers: Arc<Mutex<Vec<mpsc::Sender<Event>>>>,
) -> std::io::Result<(Reporter, EventThread)> {
    let (producer, consumer) = rtrb::RingBuffer::new(CAPACITY);
    let wake = Arc::new(EventFd::new(true)?);
    Ok((
        Reporter { queue: Some(producer), wake: wake.clone(), sh: sh.clone() },
        EventThread { queue: consumer, wake, sh: sh.clone(), subscribers },
    ))
}

impl EventThread {
    /// Runs until the monitor's reporter is gone and every report is handled.
    pub(crate) fn run(mut self) {
        loop {
            self.wake.wait(Some(Duration::from_secs(1)));
            while let Ok(r) = self.queue.pop() {
                self.handle(r);
            }
            if self.queue.is_abandoned() && self.queue.is_empty() {
                return;
            }
        }
    }

    fn handle(&mut self, r: Report) {
        self.record_distributions_locked(&r);
        log(&r);
        if let Some(ev) = public(&r) {
            let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
            subs.retain(|tx| tx.send(ev.clone()).is_ok());
            self.sh.play.changed.notify();
        }
    }

    /// The distributions GetMetrics reports (a lock: here, never on the monitor).
    fn record_distributions_locked(&self, r: &Report) {
        let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
        match *r {
            Report::Died { detected_ns, handled_ns, .. } => {
                self.sh.metrics.record_locked(|m| m.detection_ms.push(ms(detected_ns, handled_ns)))
            }
            Report::Failover { detected_ns, failover_ns, .. } => {
                self.sh.metrics.record_locked(|m| m.failover_ms.push(ms(detected_ns, failover_ns)))
            }
            Report::Replaced { detected_ns, ready_ns, .. } => {
                self.sh.metrics.record_locked(|m| m.rebuild_ms.push(ms(detected_ns, ready_ns)))
            }
            _ => {}
        }
    }
}

/// The public event a report stands for, if it is one.
fn public(r: &Report) -> Option<Event> {
    Some(match *r {
        Report::Died { pid, role, ending, detected_ns, .. } => {
            Event::WorkerDied { pid, role, status: ending.to_string(), detected_ns }
        }
        Report::Hang { pid, detected_ns, stalled_us, why } => Event::HangDetected { pid, detected_ns, stalled_us, why },
        Report::Failover { old_pid, new_pid, detected_ns, failover_ns } => {
            Event::Failover { old_pid, new_pid, detected_ns, failover_ns }
        }
        Report::Replaced { pid, role, replaces_pid, detected_ns, ready_ns } => {
            Event::Replaced { pid, role, replaces_pid, detected_ns, ready_ns }
        }
        Report::ReserveReady { pid, after_death_of, spawned_ns, ready_ns } => {
            Event::ReserveReady { pid, after_death_of, spawned_ns, ready_ns }
        }
        Report::RealtimeRefused { pid } => Event::RealtimeRefused { pid },
        Report::Reclaimed { pid, slot, id } => Event::Reclaimed { pid, segments: segment_ids(slot, id).to_vec() },
        Report::Quarantined { seq, value, deaths, kept, .. } => Event::Quarantined { seq, value, deaths, kept },
        _ => return None,
    })
}

/// Logs a report once, with structured fields (journald keeps them as fields).
#[allow(clippy::too_many_lines, reason = "one arm per report: the table of log lines reads best whole")]
fn log(r: &Report) {
    match *r {
        Report::Died { pid, role, ending, .. } => tracing::warn!(WORKER_PID = pid, ROLE = role, STATUS = %ending, "worker {pid} ({role}) {ending}"),
        Report::Hang { pid, stalled_us, why, .. } => tracing::warn!(
            WORKER_PID = pid,
            STALL_US = stalled_us,
            "worker {pid} made no progress for {stalled_us} µs ({why}): declared hung, killed"
        ),
        Report::Faulty { pid, why, block } => tracing::warn!(WORKER_PID = pid, BLOCK = block, "worker {pid} {why} (block {block}): replacing it"),
        Report::Failover { old_pid, new_pid, detected_ns, failover_ns } => {
            let us = failover_ns.saturating_sub(detected_ns) / 1000;
            tracing::info!(
                WORKER_PID = old_pid,
                NEW_PID = new_pid,
                FAILOVER_US = us,
                "failover: worker {new_pid} took over from {old_pid} in {:.3} ms",
                us as f64 / 1000.0
            )
        }
        Report::Replaced { pid, role, detected_ns, ready_ns, .. } => {
            let us = ready_ns.saturating_sub(detected_ns) / 1000;
            tracing::info!(NEW_PID = pid, ROLE = role, REBUILD_US = us, "rebuilt: worker {pid} ready as {role} in {:.3} ms", us as f64 / 1000.0)
        }
        Report::ReserveReady { pid, spawned_ns, ready_ns, .. } => {
            tracing::debug!(NEW_PID = pid, "reserve worker {pid} ready {} µs after spawn", ready_ns.saturating_sub(spawned_ns) / 1000)
        }
        Report::RealtimeRefused { pid } => tracing::warn!(
            WORKER_PID = pid,
            THREAD = "render",
            "worker {pid}: SCHED_FIFO refused; rendering without real-time priority (realtime=false)"
        ),
        Report::SandboxRefused { pid } => tracing::warn!(
            WORKER_PID = pid,
            "worker {pid} runs without its seccomp sandbox (refused: see its own line); a worker that shrinks its \
             segment could then fault the supervisor (worker_sandboxed=false)"
        ),
        Report::MlockRefused { id } => tracing::warn!(
            "mlock refused for worker-{id}'s rings (RLIMIT_MEMLOCK?): the audio path may page-fault under memory \
             pressure (counted in mlock_failures; logged once)"
        ),
        Report::Reclaimed { pid, slot, id } => {
            let list = segment_ids(slot, id).join(",");
            tracing::info!(WORKER_PID = pid, SEGMENT = %list, "reclaimed the segments of worker {pid}: {list}")
        }
        Report::Spawned { pid, slot, id, role } => tracing::debug!(pid, slot, role, "spawned worker-{id}"),
        Report::Ready { pid, id, after_us } => tracing::debug!(pid, "worker-{id} ready {after_us} µs after spawn"),
        Report::SpawnFailing { role, error } => tracing::error!(
            ROLE = role,
            "cannot start a {role} worker: {error}; playing on with what runs, retrying with backoff (logged again when it works)"
        ),
        Report::SpawnRecovered { role, failures, ms } => {
            tracing::info!(ROLE = role, "workers start again ({role}) after {failures} failed attempts over {ms} ms")
        }
        Report::Throttled { deaths, window_s, limit, backoff_ms } => {
            tracing::warn!("{deaths} worker deaths within {window_s} s (limit {limit}): next worker start in {backoff_ms} ms")
        }
        Report::MonitorRealtimeRefused { errno } => tracing::warn!(
            THREAD = "monitor",
            "monitor thread: SCHED_FIFO refused ({}); running without real-time priority",
            std::io::Error::from_raw_os_error(errno)
        ),
        Report::ReleaseFailed { slot, id, errno } => {
            let list = segment_ids(slot, id).join(",");
            tracing::warn!(SEGMENT = %list, "cannot release segments {list}: {}", std::io::Error::from_raw_os_error(errno))
        }
        Report::IgnoredTerm { pid } => tracing::warn!(WORKER_PID = pid, "worker {pid} ignored SIGTERM; killing it"),
        Report::UnexplainedUnderruns { underruns, pos, ref workers } => log_unexplained_underruns(underruns, pos, workers),
        Report::Quarantined { seq, kind, value, deaths, kept } => log_quarantine(seq, kind, value, deaths, kept),
    }
}

/// The table as the monitor saw it when underruns happened that nothing explains.
fn log_unexplained_underruns(underruns: u64, pos: u64, workers: &[WorkerView]) {
    let table: Vec<String> = workers
        .iter()
        .filter(|w| w.pid != 0)
        .map(|w| {
            let base = if w.base == u64::MAX { "-".to_owned() } else { w.base.to_string() };
            format!("{} {} {} base {base} write {}", w.pid, w.role, w.phase, w.write)
        })
        .collect();
    tracing::warn!(
        UNDERRUNS = underruns,
        "{underruns} underruns with no cold start in progress, at block {pos}; workers: {}",
        table.join("; ")
    )
}

/// A control change that killed the workers which applied it.
fn log_quarantine(seq: u64, kind: u32, value: f64, deaths: u32, kept: f64) {
    let what = if kind == crate::engine::ControlKind::SetFrequency as u32 { "SetFrequency" } else { "SetGain" };
    tracing::error!(
        SEQ = seq,
        METHOD = what,
        VALUE = value,
        "change #{seq} ({what} {value}) killed {deaths} workers that applied it: quarantined, \
         withdrawn from every worker; the stream keeps {kept}"
    )
}
