//! Control: validates a change, stamps it with a sequence number and the frame at which it
//! takes effect, keeps it in a bounded history, and writes it to every running worker's
//! control ring. Primary and hot standby therefore apply it at the same sample; a worker that
//! starts from a handed-over state gets every later message replayed, and the engine drops
//! what it has already applied, so nothing is lost or applied twice across a failover.
//!
//! This is the supervisor's internal control module; the public entry point is the D-Bus API.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::ControlStamp;
use crate::engine::{ControlKind, ControlMsg, EngineState};
use crate::metrics::RollingWindow;
use crate::playback::{Playback, WorkerShm};
use crate::shm::control::ControlRing;

/// Messages kept for replay. Only messages not yet covered by every live state are ever
/// needed (a few lookahead periods' worth); the bound keeps memory flat under a flood.
const HISTORY: usize = 16_384;

/// `--control-stamp lookahead`: blocks between the end of the workers' rings and a change's
/// stamped frame.
pub const STAMP_MARGIN_BLOCKS: u64 = 4;

/// `--control-stamp rewind`: the least time between a stamp and the output's taking of the
/// stamped block. It covers the push into every control ring, the workers' wake-up (SCHED_FIFO:
/// tens of µs, p99 under 0.3 ms on the 2-core VM) and the rewrite of the first block (a few
/// µs); a worker later than that is the case the output's freshness check catches (the
/// change is then heard a block late in every ring, counted as `stale_blocks`).
pub const STAMP_GUARD_US: u64 = 500;

/// A rejected control value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("{}", crate::engine::frequency_range_message(*value, *sample_rate))]
    InvalidFrequency { value: f64, nyquist: f64, sample_rate: u32 },
    #[error("{}", crate::engine::gain_range_message(*value))]
    InvalidGain { value: f64 },
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A worker's control ring is full of changes not yet due (a flood of calls with long
    /// blocks): refused rather than queued, since a worker that misses a change would have
    /// to be replaced. Retrying after a block succeeds.
    #[error("busy: {pending} changes are already waiting for their frame; retry shortly")]
    Busy { pending: u64 },
}

/// A frequency the engine can play (the range is the engine's, [`crate::engine::frequency_ok`]).
pub fn validate_frequency(hz: f64, sample_rate: u32) -> Result<(), ControlError> {
    if crate::engine::frequency_ok(hz, sample_rate) {
        Ok(())
    } else {
        Err(ControlError::InvalidFrequency { value: hz, nyquist: sample_rate as f64 / 2.0, sample_rate })
    }
}

/// A gain the engine can play ([`crate::engine::gain_ok`]).
pub fn validate_gain(g: f64) -> Result<(), ControlError> {
    if crate::engine::gain_ok(g) {
        Ok(())
    } else {
        Err(ControlError::InvalidGain { value: g })
    }
}

/// What an accepted change was stamped with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stamp {
    pub seq: u64,
    /// First affected frame.
    pub apply_at: u64,
    /// Frames between the output position at the call and `apply_at`.
    pub latency_frames: u64,
    pub msg: ControlMsg,
}

pub(crate) struct Target {
    pub worker_id: u64,
    pub ctl: Arc<ControlRing>,
    pub shm: Arc<WorkerShm>,
}

pub(crate) struct ControlState {
    next_seq: u64,
    history: VecDeque<ControlMsg>,
    targets: Vec<Target>,
    frequency: f64,
    gain: f64,
    stopping: bool,
    /// Per kind: the stamped frame of the last message.
    last_apply_at: [Option<u64>; 2],
    /// Messages superseded by a later one of the same kind stamped for the same frame (the
    /// engine applies both at that frame, so only the later one is ever heard), not yet
    /// passed by the output. Bounded by the messages in flight.
    coalesced_in_flight: VecDeque<u64>,
    /// Coalesced messages the output has passed.
    coalesced_played: u64,
    last_stamp: Option<Stamp>,
    /// Changes the workers that applied them died of (see [`ControlCore::note_fatal`]):
    /// sequence numbers, withdrawn from every worker and from the history. Bounded by
    /// QUARANTINE_KEPT; older ones only count in `quarantined_old`.
    quarantined: VecDeque<u64>,
    quarantined_old: u64,
    /// Recent fatal deaths by the change their worker was about to apply: (seq, deaths).
    suspects: [(u64, u32); SUSPECTS],
}

/// Deaths at the same change after which it is quarantined: two workers (a primary and its
/// hot standby, or a worker and its successor) dying as they apply it is the change, not them.
pub const QUARANTINE_AFTER: u32 = 2;
const SUSPECTS: usize = 8;
const QUARANTINE_KEPT: usize = 1024;

/// A change quarantined: what the log and the metrics say about it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quarantine {
    pub msg: ControlMsg,
    pub deaths: u32,
    /// The value of that kind in force without it.
    pub kept: f64,
}

/// What control counts (lock-free; read by the metrics snapshot).
#[derive(Default)]
pub struct ControlCounters {
    pub received: AtomicU64,
    /// Superseded by a later one of the same kind stamped for the same frame.
    pub coalesced: AtomicU64,
    pub rejected: AtomicU64,
    /// Refused because a worker's control ring was full (see [`ControlError::Busy`]).
    pub busy: AtomicU64,
    /// Deliveries that found a worker's control ring full (that worker is replaced).
    pub undelivered: AtomicU64,
}

/// How changes are stamped: the stream's timing.
#[derive(Debug, Clone, Copy)]
pub struct StampTiming {
    pub sample_rate: u32,
    pub block_frames: u32,
    /// The most blocks a worker may have rendered ahead of the output: its ring
    /// (`--lookahead-blocks` plus a batch, `Config::ring_blocks`).
    pub lookahead_blocks: u32,
    /// Blocks the output takes per wake-up (`Config::periods_per_wake`).
    pub periods_per_wake: u32,
    pub stamp: ControlStamp,
}

impl StampTiming {
    /// The first frame a change made now affects: `pos` is the next block the output takes
    /// (the first of its next wake-up), `now_frame` the frame it plays now.
    ///
    /// `Rewind`: block `pos` is taken when `now_frame` reaches its start (the output takes a
    /// wake-up's blocks together), the blocks of the wake-up after it `periods_per_wake`
    /// blocks later, and so on. The stamp is the first block of the first wake-up at least
    /// [`STAMP_GUARD_US`] away: a change is heard between the guard and the guard plus one
    /// wake-up after the call. Workers that already hold that block render it again.
    pub fn first_frame(&self, pos: u64, now_frame: u64) -> u64 {
        let bf = self.block_frames as u64;
        match self.stamp {
            ControlStamp::Lookahead => (pos + self.lookahead_blocks as u64 + STAMP_MARGIN_BLOCKS) * bf,
            ControlStamp::Rewind => {
                let guard = STAMP_GUARD_US * self.sample_rate as u64 / 1_000_000;
                let wake = self.periods_per_wake.max(1) as u64 * bf;
                let ahead = (pos * bf).saturating_sub(now_frame);
                pos * bf + guard.saturating_sub(ahead).div_ceil(wake) * wake
            }
        }
    }
}

/// The control core, shared by the control entry points ([`Control`]) and the monitor (which
/// starts and retires the workers it broadcasts to). It reads the output position from the
/// playback state; it knows nothing of the supervisor.
pub(crate) struct ControlCore {
    /// Shared with the monitor (RT) when it starts a worker: priority inheritance.
    state: crate::sys::PiMutex<ControlState>,
    pub(crate) counters: ControlCounters,
    /// Call to first affected sample, in samples (a locking recorder: the control thread's).
    latency: crate::sys::PiMutex<RollingWindow>,
    play: Arc<Playback>,
    timing: StampTiming,
}

impl ControlCore {
    pub(crate) fn new(frequency: f64, gain: f64, timing: StampTiming, play: Arc<Playback>) -> ControlCore {
        ControlCore {
            counters: ControlCounters::default(),
            latency: crate::sys::PiMutex::new(RollingWindow::new(1024)),
            play,
            timing,
            state: crate::sys::PiMutex::new(ControlState {
                next_seq: 1,
                history: VecDeque::with_capacity(HISTORY),
                targets: Vec::new(),
                frequency,
                gain,
                stopping: false,
                last_apply_at: [None; 2],
                coalesced_in_flight: VecDeque::with_capacity(HISTORY),
                coalesced_played: 0,
                last_stamp: None,
                quarantined: VecDeque::with_capacity(QUARANTINE_KEPT),
                quarantined_old: 0,
                suspects: [(0, 0); SUSPECTS],
            }),
        }
    }

    /// The distribution of call-to-first-affected-sample latencies (a copy, sorted outside
    /// the lock).
    pub(crate) fn latency_summary(&self) -> crate::metrics::Summary {
        let copy = self.latency.lock().clone();
        copy.summary()
    }

    fn lock(&self) -> crate::sys::PiGuard<'_, ControlState> {
        self.state.lock()
    }

    /// Starts `target`'s worker rendering from a state chosen under the control lock, replays
    /// every later message into its control ring and adds it to the broadcast list. No
    /// message can be stamped between the state read and the registration.
    /// Returns None (and starts nothing) if `choose` has no state to offer.
    pub(crate) fn start_worker(
        &self,
        target: Target,
        choose: impl FnOnce() -> Option<(u64, EngineState)>,
        read_index: u64,
    ) -> Option<(u64, EngineState)> {
        let mut st = self.lock();
        let (base, state) = choose()?;
        // The replay first: once the command is out (or the output sees it running and wakes
        // it) the worker may render, and every message up to `known` must be in its ring by
        // then, since its blocks will say they know them.
        for m in st.history.iter().filter(|m| m.seq > state.last_seq) {
            if !target.ctl.push(*m) {
                target.shm.diverged.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let known = st.next_seq - 1;
        target.shm.ring.command_run(base, &state, known, read_index);
        target.shm.running.store(true, std::sync::atomic::Ordering::Relaxed);
        target.shm.wake.notify();
        st.targets.retain(|t| t.worker_id != target.worker_id);
        st.targets.push(target);
        Some((base, state))
    }

    pub(crate) fn remove_target(&self, worker_id: u64) {
        self.lock().targets.retain(|t| t.worker_id != worker_id);
    }

    pub(crate) fn stop(&self) {
        let mut st = self.lock();
        st.stopping = true;
        st.targets.clear();
    }

    /// Changes heard in the played stream: the sequence number of the last one played (read
    /// under the lock, so a concurrent submit cannot prune past it) minus the coalesced and
    /// the quarantined ones up to it.
    pub(crate) fn applied(&self, played_seq: &std::sync::atomic::AtomicU64) -> u64 {
        let mut st = self.lock();
        let played = played_seq.load(Ordering::Acquire);
        st.prune_coalesced(played);
        let quarantined = st.quarantined_old + st.quarantined.iter().filter(|&&q| q <= played).count() as u64;
        played.saturating_sub(st.coalesced_played).saturating_sub(quarantined)
    }

    /// A worker died of something in it (a crash signal, or hung or corrupt and killed by the
    /// monitor; not a SIGKILL from outside) while rendering block `block`, its last valid
    /// state `state`. The first change it was about to apply there is the suspect; once
    /// [`QUARANTINE_AFTER`] such deaths name the same change, it is quarantined: withdrawn
    /// from every running worker (a cancel through its control ring) and from the history
    /// (no replay), and the value of its kind goes back to what it was without it. Returns
    /// the quarantine, if this death made one.
    pub(crate) fn note_fatal(&self, state: &EngineState, block: u64, block_frames: u64) -> Option<Quarantine> {
        let mut st = self.lock();
        let end = block.checked_add(1)?.checked_mul(block_frames)?;
        let suspect = *st.history.iter().find(|m| m.seq > state.last_seq && m.apply_at < end)?;
        if st.quarantined.contains(&suspect.seq) {
            return None;
        }
        let slot = match st.suspects.iter().position(|&(s, _)| s == suspect.seq) {
            Some(i) => i,
            None => {
                let i = (0..SUSPECTS).min_by_key(|&i| (st.suspects[i].1 != 0, st.suspects[i].0)).unwrap_or(0);
                st.suspects[i] = (suspect.seq, 0);
                i
            }
        };
        st.suspects[slot].1 += 1;
        let deaths = st.suspects[slot].1;
        if deaths < QUARANTINE_AFTER {
            return None;
        }
        st.suspects[slot] = (0, 0);
        Some(st.quarantine(suspect, deaths, state))
    }

    /// Current targets (the last accepted values).
    pub(crate) fn params(&self) -> (f64, f64) {
        let st = self.lock();
        (st.frequency, st.gain)
    }
}

impl ControlState {
    fn quarantine(&mut self, msg: ControlMsg, deaths: u32, before: &EngineState) -> Quarantine {
        self.history.retain(|m| m.seq != msg.seq);
        if self.quarantined.len() == QUARANTINE_KEPT {
            self.quarantined.pop_front();
            self.quarantined_old += 1;
        }
        self.quarantined.push_back(msg.seq);
        let cancel = ControlMsg::new(0, 0, ControlKind::Cancel, msg.seq as f64);
        for t in &self.targets {
            if !t.ctl.push(cancel) {
                t.shm.diverged.store(true, Ordering::Relaxed);
            }
            t.shm.wake.notify();
        }
        // The value of its kind in force without it: the newest other change of that kind
        // still queued, else what the dead worker's stream was heading for before it.
        let newest_other = self.history.iter().rev().find(|m| m.kind == msg.kind).map(|m| m.value);
        let kept = if msg.kind == ControlKind::SetFrequency as u32 {
            let v = newest_other.unwrap_or(before.freq_target);
            self.frequency = v;
            v
        } else {
            let v = newest_other.unwrap_or(before.gain_target);
            self.gain = v;
            v
        };
        Quarantine { msg, deaths, kept }
    }

    fn prune_coalesced(&mut self, played_seq: u64) {
        while self.coalesced_in_flight.front().is_some_and(|&s| s <= played_seq) {
            self.coalesced_in_flight.pop_front();
            self.coalesced_played += 1;
        }
    }
}

/// A handle to change the engine's parameters. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct Control {
    pub(crate) core: Arc<ControlCore>,
}

impl Control {
    /// Sets the tone frequency. The change glides phase-continuously over 5 ms from its
    /// stamped frame.
    ///
    /// # Errors
    /// [`ControlError::InvalidFrequency`] (naming the valid range) for NaN, infinite, <= 0 or
    /// >= Nyquist; nothing changes.
    pub fn set_frequency(&self, hz: f64) -> Result<Stamp, ControlError> {
        if let Err(e) = validate_frequency(hz, self.core.timing.sample_rate) {
            self.core.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.submit(ControlKind::SetFrequency, hz)
    }

    /// Sets the linear gain; ramps over 5 ms from its stamped frame.
    ///
    /// # Errors
    /// [`ControlError::InvalidGain`] (naming the valid range) for NaN, infinite, < 0 or > 1.
    pub fn set_gain(&self, gain: f64) -> Result<Stamp, ControlError> {
        if let Err(e) = validate_gain(gain) {
            self.core.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.submit(ControlKind::SetGain, gain)
    }

    /// The last accepted frequency (what the stream plays once its ramp is done).
    pub fn frequency(&self) -> f64 {
        self.core.params().0
    }

    pub fn gain(&self) -> f64 {
        self.core.params().1
    }

    /// The stamp of the most recently accepted change, whoever sent it (`latency_frames` 0).
    pub fn last_stamp(&self) -> Option<Stamp> {
        self.core.lock().last_stamp
    }

    fn submit(&self, kind: ControlKind, value: f64) -> Result<Stamp, ControlError> {
        let core = &*self.core;
        let played_seq = &core.play.counters.played_seq;
        let mut st = core.lock();
        if st.stopping {
            return Err(ControlError::ShuttingDown);
        }
        // Backpressure. Changes accepted but not yet heard are bounded by a control ring's
        // capacity, so that replaying them into a new worker's empty ring always fits; and no
        // ring may be full (only the workers free room, so room seen here under the lock is
        // still there at the push below).
        let in_flight = (st.next_seq - 1).saturating_sub(played_seq.load(Ordering::Relaxed));
        if in_flight >= crate::shm::control::CONTROL_CAPACITY as u64 || st.targets.iter().any(|t| t.ctl.is_full()) {
            core.counters.busy.fetch_add(1, Ordering::Relaxed);
            return Err(ControlError::Busy { pending: in_flight });
        }
        // Stamps never go back (the output's stamp log and the engine's sequence order rely
        // on it), even if the frame estimate does across a resync of the clock.
        let (pos, now_frame) = core.play.position.now(&core.play.settings);
        let floor = st.last_stamp.map_or(0, |s| s.apply_at);
        let apply_at = core.timing.first_frame(pos, now_frame).max(floor);
        let seq = st.next_seq;
        st.next_seq += 1;
        let msg = ControlMsg::new(seq, apply_at, kind, value);
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(msg);
        // Before any worker has it: the output's freshness check must never miss a change
        // a worker already renders.
        core.play.stamps.publish(seq, apply_at);
        for t in &st.targets {
            if !t.ctl.push(msg) {
                // Its stream would now differ from the others': the monitor replaces it.
                core.counters.undelivered.fetch_add(1, Ordering::Relaxed);
                t.shm.diverged.store(true, Ordering::Relaxed);
            }
            t.shm.wake.notify();
        }
        match kind {
            ControlKind::SetFrequency => st.frequency = value,
            ControlKind::SetGain => st.gain = value,
            ControlKind::Cancel => {}
        }
        core.play.changed.notify();
        let k = kind as usize % 2;
        if st.last_apply_at[k] == Some(apply_at) {
            // The previous message of this kind (seq - 1 or earlier) is superseded.
            let played = played_seq.load(Ordering::Relaxed);
            st.prune_coalesced(played);
            if st.coalesced_in_flight.len() == HISTORY {
                // Cannot happen while the output plays; keep the bound anyway.
                st.coalesced_in_flight.pop_front();
                st.coalesced_played += 1;
            }
            let prev = st.history.iter().rev().skip(1).find(|m| m.kind == kind as u32).map_or(0, |m| m.seq);
            let at = st.coalesced_in_flight.partition_point(|&s| s < prev);
            st.coalesced_in_flight.insert(at, prev);
            core.counters.coalesced.fetch_add(1, Ordering::Relaxed);
        }
        st.last_apply_at[k] = Some(apply_at);
        let stamp = Stamp { seq, apply_at, latency_frames: 0, msg };
        st.last_stamp = Some(stamp);
        drop(st);
        core.counters.received.fetch_add(1, Ordering::Relaxed);
        // Latency from the frame playing at the call to the first affected frame.
        let latency_frames = apply_at.saturating_sub(now_frame);
        core.latency.lock().push(latency_frames as f64);
        Ok(Stamp { latency_frames, ..stamp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(stamp: ControlStamp, periods_per_wake: u32) -> StampTiming {
        StampTiming { sample_rate: 48_000, block_frames: 64, lookahead_blocks: 12, periods_per_wake, stamp }
    }

    /// The rewind stamp is the first block of the first wake-up at least the guard (24 frames
    /// at 48 kHz) away, wherever in a wake-up the call lands; the lookahead stamp is beyond the
    /// ring.
    #[test]
    fn a_rewind_stamp_is_the_first_wake_up_past_the_guard() {
        let guard = STAMP_GUARD_US * 48_000 / 1_000_000;
        assert_eq!(guard, 24);
        let one = timing(ControlStamp::Rewind, 1);
        // The output takes block 10 when the frame playing reaches 640.
        assert_eq!(one.first_frame(10, 576), 640, "a whole block ahead");
        assert_eq!(one.first_frame(10, 640 - 24), 640, "exactly the guard ahead");
        assert_eq!(one.first_frame(10, 640 - 23), 704, "inside the guard: the wake-up after");
        assert_eq!(one.first_frame(10, 640), 704, "the output is late: the next");
        let two = timing(ControlStamp::Rewind, 2);
        // Blocks 10 and 11 are taken together when the frame reaches 640, 12 and 13 at 768.
        assert_eq!(two.first_frame(10, 512), 640);
        assert_eq!(two.first_frame(10, 630), 768, "never block 11: it goes with block 10");
        for (pos, now) in [(10, 512), (10, 600), (10, 639), (11, 700), (12, 767)] {
            for t in [one, two] {
                let at = t.first_frame(pos, now);
                let wake = t.periods_per_wake as u64 * 64;
                assert!(at % 64 == 0 && at >= pos * 64, "{at}: a block the output has not taken");
                assert!(at - now >= guard && at - now < guard + wake + 64, "{pos} {now}: {at}");
            }
        }
        let old = timing(ControlStamp::Lookahead, 2);
        assert_eq!(old.first_frame(10, 600), (10 + 12 + STAMP_MARGIN_BLOCKS) * 64);
    }
}
