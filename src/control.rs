//! Control: validates a change, stamps it with a sequence number and the frame at which it
//! takes effect, keeps it in a bounded history, and writes it to every running worker's
//! control ring. Primary and hot standby therefore apply it at the same sample; a worker that
//! starts from a handed-over state gets every later message replayed, and the engine drops
//! what it has already applied, so nothing is lost or applied twice across a failover.
//!
//! This is the supervisor's internal control module; the public entry point is the D-Bus API.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::engine::{ControlKind, ControlMsg, EngineState};
use crate::shm::control::ControlRing;
use crate::supervisor::{Shared, WorkerShm};

/// Messages kept for replay. Only messages not yet covered by every live state are ever
/// needed (a few lookahead periods' worth); the bound keeps memory flat under a flood.
const HISTORY: usize = 16_384;

/// Blocks between the end of the workers' lookahead and a change's stamped frame.
pub const STAMP_MARGIN_BLOCKS: u64 = 4;

/// A rejected control value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("frequency must be a finite number of Hz with 0 < f < {nyquist} (the Nyquist frequency at {sample_rate} Hz), got {value}")]
    InvalidFrequency { value: f64, nyquist: f64, sample_rate: u32 },
    #[error("gain must be a finite linear gain with 0 <= g <= 1, got {value}")]
    InvalidGain { value: f64 },
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// A worker's control ring is full of changes not yet due (a flood of calls with long
    /// blocks): refused rather than queued, since a worker that misses a change would have
    /// to be replaced. Retrying after a block succeeds.
    #[error("busy: {pending} changes are already waiting for their frame; retry shortly")]
    Busy { pending: u64 },
}

pub fn validate_frequency(hz: f64, sample_rate: u32) -> Result<(), ControlError> {
    let nyquist = sample_rate as f64 / 2.0;
    if hz.is_finite() && hz > 0.0 && hz < nyquist {
        Ok(())
    } else {
        Err(ControlError::InvalidFrequency { value: hz, nyquist, sample_rate })
    }
}

pub fn validate_gain(g: f64) -> Result<(), ControlError> {
    if g.is_finite() && (0.0..=1.0).contains(&g) {
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
}

/// The supervisor's control core, shared by the control entry points and the monitor.
pub(crate) struct ControlCore {
    /// Shared with the monitor (RT) when it starts a worker: priority inheritance.
    state: crate::sys::PiMutex<ControlState>,
}

impl ControlCore {
    pub(crate) fn new(frequency: f64, gain: f64) -> ControlCore {
        ControlCore {
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
            }),
        }
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
        target.shm.ring.command_run(base, &state, read_index);
        target.shm.running.store(true, std::sync::atomic::Ordering::Relaxed);
        for m in st.history.iter().filter(|m| m.seq > state.last_seq) {
            if !target.ctl.push(*m) {
                target.shm.diverged.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
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
    /// under the lock, so a concurrent submit cannot prune past it) minus the coalesced ones
    /// up to it.
    pub(crate) fn applied(&self, played_seq: &std::sync::atomic::AtomicU64) -> u64 {
        let mut st = self.lock();
        let played = played_seq.load(Ordering::Acquire);
        st.prune_coalesced(played);
        played.saturating_sub(st.coalesced_played)
    }

    /// Current targets (the last accepted values).
    pub(crate) fn params(&self) -> (f64, f64) {
        let st = self.lock();
        (st.frequency, st.gain)
    }
}

impl ControlState {
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
    pub(crate) shared: Arc<Shared>,
}

impl Control {
    /// Sets the tone frequency. The change glides phase-continuously over 5 ms from its
    /// stamped frame.
    ///
    /// # Errors
    /// [`ControlError::InvalidFrequency`] (naming the valid range) for NaN, infinite, <= 0 or
    /// >= Nyquist; nothing changes.
    pub fn set_frequency(&self, hz: f64) -> Result<Stamp, ControlError> {
        if let Err(e) = validate_frequency(hz, self.shared.config.sample_rate) {
            self.shared.metrics.control_rejected.fetch_add(1, Ordering::Relaxed);
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
            self.shared.metrics.control_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        self.submit(ControlKind::SetGain, gain)
    }

    /// The last accepted frequency (what the stream plays once its ramp is done).
    pub fn frequency(&self) -> f64 {
        self.shared.control.params().0
    }

    pub fn gain(&self) -> f64 {
        self.shared.control.params().1
    }

    /// The stamp of the most recently accepted change, whoever sent it (`latency_frames` 0).
    pub fn last_stamp(&self) -> Option<Stamp> {
        self.shared.control.lock().last_stamp
    }

    fn submit(&self, kind: ControlKind, value: f64) -> Result<Stamp, ControlError> {
        let sh = &self.shared;
        let bf = sh.config.block_frames as u64;
        let mut st = sh.control.lock();
        if st.stopping {
            return Err(ControlError::ShuttingDown);
        }
        // Backpressure. Changes accepted but not yet heard are bounded by a control ring's
        // capacity, so that replaying them into a new worker's empty ring always fits; and no
        // ring may be full (only the workers free room, so room seen here under the lock is
        // still there at the push below).
        let in_flight = (st.next_seq - 1).saturating_sub(sh.metrics.played_seq.load(Ordering::Relaxed));
        if in_flight >= crate::supervisor::CONTROL_CAPACITY as u64 || st.targets.iter().any(|t| t.ctl.is_full()) {
            sh.metrics.control_busy.fetch_add(1, Ordering::Relaxed);
            return Err(ControlError::Busy { pending: in_flight });
        }
        // Stamp beyond anything a worker may have rendered: workers stay within `lookahead`
        // blocks of the output position; STAMP_MARGIN_BLOCKS more absorb the time until the
        // message is in every ring (this thread may be preempted; workers count a late one).
        let (pos, now_frame) = sh.output_now();
        let apply_at = (pos + sh.config.lookahead_blocks as u64 + STAMP_MARGIN_BLOCKS) * bf;
        let seq = st.next_seq;
        st.next_seq += 1;
        let msg = ControlMsg::new(seq, apply_at, kind, value);
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(msg);
        for t in &st.targets {
            if !t.ctl.push(msg) {
                // Its stream would now differ from the others': the monitor replaces it.
                sh.metrics.control_undelivered.fetch_add(1, Ordering::Relaxed);
                t.shm.diverged.store(true, Ordering::Relaxed);
            }
            t.shm.wake.notify();
        }
        match kind {
            ControlKind::SetFrequency => st.frequency = value,
            ControlKind::SetGain => st.gain = value,
        }
        let k = kind as usize % 2;
        if st.last_apply_at[k] == Some(apply_at) {
            // The previous message of this kind (seq - 1 or earlier) is superseded.
            let played = sh.metrics.played_seq.load(Ordering::Relaxed);
            st.prune_coalesced(played);
            if st.coalesced_in_flight.len() == HISTORY {
                // Cannot happen while the output plays; keep the bound anyway.
                st.coalesced_in_flight.pop_front();
                st.coalesced_played += 1;
            }
            let prev = st.history.iter().rev().skip(1).find(|m| m.kind == kind as u32).map_or(0, |m| m.seq);
            let at = st.coalesced_in_flight.partition_point(|&s| s < prev);
            st.coalesced_in_flight.insert(at, prev);
            sh.metrics.control_coalesced.fetch_add(1, Ordering::Relaxed);
        }
        st.last_apply_at[k] = Some(apply_at);
        let stamp = Stamp { seq, apply_at, latency_frames: 0, msg };
        st.last_stamp = Some(stamp);
        drop(st);
        sh.metrics.control_received.fetch_add(1, Ordering::Relaxed);
        // Latency from the frame playing at the call to the first affected frame.
        let latency_frames = apply_at.saturating_sub(now_frame);
        sh.metrics.record(|w| w.control_latency_samples.push(latency_frames as f64));
        Ok(Stamp { latency_frames, ..stamp })
    }
}
