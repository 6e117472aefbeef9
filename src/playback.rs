//! The playback state: everything the output thread (and cpal's callback, and the virtual
//! clock standing in for a lost device) may touch, in one type, [`Playback`]. It holds atomics
//! and the lock-free slot table only: no lock is reachable from it, so "the output thread takes
//! no lock" is a property of the types, not a convention. The output stage (`output/`) depends
//! on this module and on nothing of the supervisor's.
//!
//! Who writes what: the monitor publishes the workers' rings in the [`SlotTable`] and reads
//! the position; the output thread advances the [`Position`], bumps the epoch, keeps the state
//! of the block it played last ([`StateCell`]) and counts what it saw ([`OutputCounters`]).
//!
//! The slot table is a fixed array of pointers to the workers' rings. The output thread only
//! loads those pointers; the monitor frees a ring only after the output thread has finished
//! two more periods (an epoch-based grace period), so the output thread never locks. This is
//! the one module outside `sys` and `shm` that may use `unsafe` (to dereference those
//! pointers).

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::engine::EngineState;
use crate::metrics::histogram::AtomicHistogram;
use crate::shm::ring::AudioRing;
use crate::sys::EventFd;

/// Ring slots in the table: primary, spare, reserve, a spare being built and dead rings still
/// draining.
pub const MAX_SLOTS: usize = 8;

/// What the output thread may touch of a worker: its audio ring and its wake-up.
pub struct WorkerShm {
    pub ring: AudioRing,
    pub wake: EventFd,
    /// The worker renders (the output wakes only those).
    pub running: AtomicBool,
    /// A control message could not be delivered to it, or it kept rendering another stream
    /// than the one played however often it was resynced: the monitor replaces it.
    pub diverged: AtomicBool,
    /// Blocks in a row whose frozen version here differed from the one played (output
    /// thread only).
    pub differing: AtomicU32,
    /// The output wakes it after playing block `n` only when `n % batch == wake_phase`
    /// (see [`PlaybackSettings::batch_blocks`]); the monitor staggers primary and spare.
    pub wake_phase: AtomicU32,
}

/// Lock-free table of the rings the output thread plays from.
pub struct SlotTable {
    cells: [AtomicPtr<WorkerShm>; MAX_SLOTS],
    /// Slot of the primary: tried first.
    active: AtomicUsize,
}

impl SlotTable {
    pub(crate) fn new() -> SlotTable {
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

/// One [`EngineState`] written by one thread (the output thread, wait-free) and read by
/// others (a seqlock: readers retry while a write is in progress).
#[derive(Default)]
pub struct StateCell {
    seq: AtomicU64,
    words: [AtomicU64; STATE_WORDS],
}

const STATE_WORDS: usize = std::mem::size_of::<EngineState>() / 8;
// EngineState is all u64/f64 fields: it is exactly its words.
const _: () = assert!(std::mem::size_of::<EngineState>() == STATE_WORDS * 8);

impl StateCell {
    /// Writer (one thread only). Real-time safe: atomic stores.
    pub(crate) fn store(&self, s: &EngineState) {
        let words = state_words(s);
        self.seq.fetch_add(1, Ordering::AcqRel);
        for (cell, w) in self.words.iter().zip(words) {
            cell.store(w, Ordering::Release);
        }
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// The last state stored, if any (None before the first store).
    pub(crate) fn load(&self) -> Option<EngineState> {
        loop {
            let s0 = self.seq.load(Ordering::Acquire);
            let words: [u64; STATE_WORDS] = std::array::from_fn(|i| self.words[i].load(Ordering::Acquire));
            if s0 % 2 == 0 && self.seq.load(Ordering::Acquire) == s0 {
                return (s0 > 0).then(|| state_from_words(words));
            }
            std::thread::yield_now();
        }
    }
}

fn state_words(s: &EngineState) -> [u64; STATE_WORDS] {
    [
        s.frame,
        s.phase.to_bits(),
        s.freq.to_bits(),
        s.freq_target.to_bits(),
        s.freq_ramp_left,
        s.gain.to_bits(),
        s.gain_target.to_bits(),
        s.gain_ramp_left,
        s.last_seq,
        s.samples_check,
        s.check,
    ]
}

fn state_from_words(w: [u64; STATE_WORDS]) -> EngineState {
    EngineState {
        frame: w[0],
        phase: f64::from_bits(w[1]),
        freq: f64::from_bits(w[2]),
        freq_target: f64::from_bits(w[3]),
        freq_ramp_left: w[4],
        gain: f64::from_bits(w[5]),
        gain_target: f64::from_bits(w[6]),
        gain_ramp_left: w[7],
        last_seq: w[8],
        samples_check: w[9],
        check: w[10],
    }
}

/// The output's clock: blocks played so far, and when the last one started playing, updated
/// together by the output thread (a seqlock: readers retry, the writer never waits).
#[derive(Default)]
pub struct Position {
    /// Blocks played so far (the next block to play).
    blocks: AtomicU64,
    /// CLOCK_MONOTONIC at which the last played block (`blocks - 1`) started playing.
    last_period_ns: AtomicU64,
    /// The first block after those the wake-up in progress (or the last one) takes: a
    /// change stamped before it would be heard late.
    wake_end: AtomicU64,
    /// Odd while the output thread updates the two.
    seq: AtomicU64,
}

impl Position {
    fn starting_now() -> Position {
        Position { last_period_ns: AtomicU64::new(crate::sys::now_ns()), ..Position::default() }
    }

    /// Blocks played so far (the next block the output needs).
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// Output thread: a wake-up begins at block `pos` and takes `blocks` blocks (announced
    /// before it takes the first). Real-time safe.
    pub(crate) fn begin_wake(&self, pos: u64, blocks: u64) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.wake_end.store(pos.saturating_add(blocks), Ordering::Release);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// Output thread: block `pos` is about to be taken; announces it if the wake-up in
    /// progress did not. Real-time safe.
    pub(crate) fn cover(&self, pos: u64) {
        if self.wake_end.load(Ordering::Relaxed) <= pos {
            self.begin_wake(pos, 1);
        }
    }

    /// Output thread: block `to - 1` started playing at `started_ns`. Real-time safe.
    pub(crate) fn advance(&self, to: u64, started_ns: u64) {
        self.seq.fetch_add(1, Ordering::AcqRel);
        self.last_period_ns.store(started_ns, Ordering::Release);
        self.blocks.store(to, Ordering::Release);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// (the first block the output has not begun to take, the frame being played now,
    /// interpolated from the start of the last block handed over).
    pub fn now(&self, s: &PlaybackSettings) -> (u64, u64) {
        let (pos, started, wake_end) = loop {
            let s0 = self.seq.load(Ordering::Acquire);
            let pos = self.blocks.load(Ordering::Acquire);
            let started = self.last_period_ns.load(Ordering::Acquire);
            let wake_end = self.wake_end.load(Ordering::Acquire);
            if s0 % 2 == 0 && self.seq.load(Ordering::Acquire) == s0 {
                break (pos, started, wake_end);
            }
            // The writer is mid-update (a few instructions); if it was preempted there, let
            // it run rather than spin against it.
            std::thread::yield_now();
        };
        // The later blocks of a wake-up are handed over together with its first but start
        // playing a block apart: the last one's start may still be ahead (then an earlier
        // block plays now). Past its end, the output is late: the frame waits at that end.
        let bf = s.block_frames as i128;
        let since = (crate::sys::now_ns() as i128 - started as i128).min(s.block_ns() as i128);
        let into = since * s.sample_rate as i128 / 1_000_000_000;
        let frame = (pos.saturating_sub(1) as i128 * bf + into).max(0);
        (pos.max(wake_end), frame as u64)
    }
}

/// The stamps of the control messages, for the output's freshness check: which sequence
/// number a block must know to hold every change stamped inside it. Control publishes each
/// message's (seq, frame) under its lock (one writer); the output thread alone advances the
/// cursor over them as it plays; the monitor may look ahead without advancing. Stamps grow
/// with the sequence number (control stamps from a position that never goes back), so "the
/// newest sequence stamped before frame F" is a prefix of the log. Wait-free on every side.
pub struct StampLog {
    /// Entry `seq % STAMPS`: (seq, stamped frame).
    entries: Box<[(AtomicU64, AtomicU64)]>,
    /// The newest sequence number published.
    published: AtomicU64,
    /// The output's cursor: every entry below it is stamped before the end of a played block.
    cursor: AtomicU64,
    /// The newest sequence number stamped before the end of the block played last.
    required: AtomicU64,
}

/// Entries kept: control never has more messages in flight than a control ring holds
/// (`CONTROL_CAPACITY`), so an entry is rewritten only after the output passed it.
pub const STAMPS: usize = crate::shm::control::CONTROL_CAPACITY as usize;

impl StampLog {
    fn new() -> StampLog {
        StampLog {
            entries: (0..STAMPS).map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect(),
            published: AtomicU64::new(0),
            cursor: AtomicU64::new(1),
            required: AtomicU64::new(0),
        }
    }

    /// Control (under its lock): message `seq` (the next sequence number) takes effect at
    /// `frame`.
    pub(crate) fn publish(&self, seq: u64, frame: u64) {
        let e = &self.entries[(seq % STAMPS as u64) as usize];
        e.1.store(frame, Ordering::Relaxed);
        e.0.store(seq, Ordering::Relaxed);
        self.published.store(seq, Ordering::Release);
    }

    /// The newest sequence number stamped before `end` (0: none) counting from the cursor,
    /// and the cursor after it.
    fn scan(&self, end: u64) -> (u64, u64) {
        let published = self.published.load(Ordering::Acquire);
        // Cursor first (Acquire, pairing with `advance`): the `required` read after it is at
        // least as new, never the one from before the cursor moved.
        let mut cursor = self.cursor.load(Ordering::Acquire);
        let mut required = self.required.load(Ordering::Relaxed);
        // At most a log's worth per call, whatever `published` says (entries overwritten
        // because a lying worker defeated control's backpressure are skipped, never walked
        // without end in one period).
        let published = published.min(cursor.saturating_add(STAMPS as u64));
        while cursor <= published {
            let e = &self.entries[(cursor % STAMPS as u64) as usize];
            let (seq, frame) = (e.0.load(Ordering::Relaxed), e.1.load(Ordering::Relaxed));
            // An entry already rewritten (only a lying worker's played state lets control run
            // that far ahead): skip it rather than stall the check.
            if seq == cursor && frame >= end {
                break;
            }
            if seq == cursor {
                required = seq;
            }
            cursor += 1;
        }
        (required, cursor)
    }

    /// Output thread, for the block ending at frame `end` (blocks in order): the newest
    /// sequence number it must know. Real-time safe (atomics, a bounded walk).
    pub(crate) fn advance(&self, end: u64) -> u64 {
        let (required, cursor) = self.scan(end);
        self.required.store(required, Ordering::Relaxed);
        self.cursor.store(cursor, Ordering::Release);
        required
    }

    /// Anyone: whether block `block` (of `block_frames`), rendered knowing every sequence
    /// up to `known_seq`, holds every change stamped inside it (or before).
    pub fn is_fresh(&self, block: u64, block_frames: u64, known_seq: u64) -> bool {
        known_seq >= self.required_before(block.saturating_add(1).saturating_mul(block_frames))
    }

    /// Anyone: the same for a block ending at `end` at or after the block played next,
    /// without moving the output's cursor.
    pub fn required_before(&self, end: u64) -> u64 {
        self.scan(end).0
    }
}

/// What the output thread counts (atomics only: it is their only writer, apart from the cpal
/// error callback).
#[derive(Default)]
pub struct OutputCounters {
    /// Periods in which the output was on time and no ring held the block it needed, while
    /// no cold start was in progress (each is a defect, or a machine stall).
    pub other_underruns: AtomicU64,
    /// The same while a takeover with no ready standby or reserve was in progress. Each
    /// underrun bumps exactly one of the two, so any snapshot's `underruns` (their sum) and
    /// `cold_start_underruns` agree on how many were the cold start's.
    pub cold_start_underruns: AtomicU64,
    pub frames_played: AtomicU64,
    /// Xruns of the device's own buffer (the output thread was late), recovered.
    pub device_xruns: AtomicU64,
    /// Times the device went away (then reopened with backoff).
    pub device_losses: AtomicU64,
    /// Frames queued in the device after the last write.
    pub output_latency_frames: AtomicU64,
    /// How late it woke up for each block, µs (virtual clock: after the period's deadline;
    /// device: for how long the device had room for the block before the wake-up).
    pub output_wake_late_us: AtomicHistogram,
    /// Sequence number of the last control message in the played stream.
    pub played_seq: AtomicU64,
    /// Blocks played that lacked a change stamped inside them: no ring had one that did
    /// (its workers could not render the change in time). The change is heard late.
    pub stale_blocks: AtomicU64,
    /// Blocks played that do not continue the block played before them: no ring had one
    /// that did (a resync after every copy of the stream was lost).
    pub discontinuities: AtomicU64,
    /// Rings marked diverged by the output: their block at the position differed from the
    /// one played (their monitor replaces them).
    pub divergences: AtomicU64,
    /// The playing thread got SCHED_FIFO.
    pub realtime: AtomicBool,
}

/// The settings the output stage needs (copied from the configuration at start).
#[derive(Debug, Clone)]
pub struct PlaybackSettings {
    pub block_frames: u32,
    pub sample_rate: u32,
    /// The output buffer in blocks (ALSA's, and the virtual clock's xrun threshold).
    pub device_periods: u32,
    /// Interleaved samples per block.
    pub samples_per_block: usize,
    /// Blocks a worker renders per wake-up (`Config::render_batch_blocks`).
    pub batch_blocks: u32,
    /// The workers' rings, in blocks (`--lookahead-blocks`).
    pub lookahead_blocks: u64,
    /// Periods the virtual clock plays per wake-up (`Config::periods_per_wake`).
    pub periods_per_wake: u32,
    /// A running ring with this many slots free (a batch and a block) has not committed for a
    /// block since its batch fell due: the output wakes the monitor to look at it (to probe it
    /// at once, and to judge it after `--hang-timeout-blocks`).
    pub suspect_free_slots: u64,
    /// The same for a worker without real-time priority: the monitor judges those only after
    /// half the ring (see the heartbeat), so the output does not wake it before.
    pub suspect_free_slots_nort: u64,
    /// TEST ONLY (--test-fault-output-stall-ms).
    pub test_stall_ms: Option<u64>,
    /// TEST ONLY (--test-fault-output-pause): (at ms, for ms).
    pub test_pause: Option<(u64, u64)>,
}

impl PlaybackSettings {
    /// One block period in ns.
    pub fn block_ns(&self) -> u64 {
        self.block_frames as u64 * 1_000_000_000 / self.sample_rate.max(1) as u64
    }
}

/// Everything the output thread may touch (see the module docs).
pub struct Playback {
    pub settings: PlaybackSettings,
    pub table: SlotTable,
    pub position: Position,
    /// Output periods completed: the grace-period clock for freeing rings.
    pub epoch: AtomicU64,
    /// Cleared to stop the output thread.
    pub running: AtomicBool,
    /// The device went away and is being reopened (the virtual clock plays meanwhile).
    pub degraded: AtomicBool,
    /// The engine state at the end of the block played last: where a successor continues if
    /// no ring holds a playable block at the position.
    pub played_state: StateCell,
    /// Every message's stamp, for the freshness check.
    pub stamps: StampLog,
    /// Takeovers in progress with no standby or reserve ready (underruns meanwhile count as
    /// `cold_start_underruns` too).
    pub cold_takeovers_pending: AtomicU32,
    pub counters: OutputCounters,
    /// SCHED_FIFO priority of the playing thread, and its kernel id once it runs (a reload
    /// moves it).
    pub priority: AtomicI32,
    pub tid: AtomicI32,
    /// Notified whenever what D-Bus shows may have changed (the state, the primary, the
    /// spare, a value): the bridge waits on it instead of polling.
    pub changed: EventFd,
    /// Notified by the output thread when a worker looks hung or one of its blocks no longer
    /// checks out: the monitor looks at once, so its own timer can be slow.
    pub suspect: EventFd,
}

impl Playback {
    /// # Errors
    /// No eventfd could be made (out of file descriptors).
    pub fn new(settings: PlaybackSettings, priority: i32) -> std::io::Result<Playback> {
        Ok(Playback {
            settings,
            table: SlotTable::new(),
            position: Position::starting_now(),
            epoch: AtomicU64::new(0),
            running: AtomicBool::new(true),
            degraded: AtomicBool::new(false),
            played_state: StateCell::default(),
            stamps: StampLog::new(),
            cold_takeovers_pending: AtomicU32::new(0),
            counters: OutputCounters::default(),
            priority: AtomicI32::new(priority),
            tid: AtomicI32::new(0),
            changed: EventFd::new(true)?,
            suspect: EventFd::new(true)?,
        })
    }

    /// The device was lost (`true`) or is back: the state changes, and D-Bus is told.
    /// Real-time safe (a store and an eventfd write).
    pub(crate) fn set_degraded(&self, degraded: bool) {
        if self.degraded.swap(degraded, Ordering::AcqRel) != degraded {
            self.changed.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output learns which sequence a block must know from the stamps alone, and the
    /// monitor's look ahead neither moves the cursor nor sees less than the output did.
    #[test]
    fn the_stamp_log_names_the_newest_change_stamped_before_a_blocks_end() {
        let log = StampLog::new();
        assert_eq!(log.advance(64), 0, "nothing stamped");
        for (seq, frame) in [(1, 100), (2, 200), (3, 200), (4, 300)] {
            log.publish(seq, frame);
        }
        assert_eq!(log.advance(128), 1, "block 1 (frames 64..128) must know seq 1");
        assert_eq!(log.required_before(256), 3, "a look ahead: seq 2 and 3 end before 256");
        assert_eq!(log.required_before(64), 1, "never less than the output has passed");
        assert_eq!(log.advance(192), 1);
        assert_eq!(log.advance(256), 3);
        assert_eq!(log.advance(320), 4);
        assert_eq!(log.advance(10_000), 4, "nothing newer");
        // Control a whole log ahead (only a lying worker defeats its backpressure): the
        // entries overwritten or never written are skipped, in one bounded walk.
        log.publish(5 + STAMPS as u64, 400);
        assert_eq!(log.advance(10_000), 5 + STAMPS as u64);
    }
}
