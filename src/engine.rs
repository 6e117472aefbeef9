//! The audio engine: a stereo sine oscillator with smoothed frequency and gain.
//!
//! Determinism is the whole point. The output at a frame depends only on the [`EngineState`] at
//! the start of its block and on the control messages due since, so a standby handed the state
//! at the end of the primary's last committed block continues bit-exactly (same binary, IEEE
//! arithmetic without contraction, the same libm `sin`). The same code renders the crash-free
//! reference in the tests.
//!
//! Runs on the worker's render thread: after [`Engine::new`] nothing here allocates, locks,
//! logs or blocks.

/// Stereo, interleaved.
pub const CHANNELS: usize = 2;

/// Capacity of the engine's queue of received but not yet due control messages.
pub const PENDING_CAPACITY: usize = 1024;

/// The frequencies the engine plays: finite, 0 < f < Nyquist. The one definition of the range:
/// control, the configuration and D-Bus validate with it, and a state read from a worker's
/// memory is checked against it.
pub fn frequency_ok(hz: f64, sample_rate: u32) -> bool {
    hz.is_finite() && hz > 0.0 && hz < sample_rate as f64 / 2.0
}

/// The linear gains the engine plays: finite, 0 <= g <= 1.
pub fn gain_ok(g: f64) -> bool {
    g.is_finite() && (0.0..=1.0).contains(&g)
}

/// Why `value` is not a frequency the engine plays, naming the range.
pub fn frequency_range_message(value: f64, sample_rate: u32) -> String {
    let nyquist = sample_rate as f64 / 2.0;
    format!("frequency must be a finite number of Hz with 0 < f < {nyquist} (the Nyquist frequency at {sample_rate} Hz), got {value}")
}

/// Why `value` is not a gain the engine plays, naming the range.
pub fn gain_range_message(value: f64) -> String {
    format!("gain must be a finite linear gain with 0 <= g <= 1, got {value}")
}

/// Engine state at a block boundary, as committed with every block into the audio ring
/// (shared memory, hence `repr(C)` and only plain numbers).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineState {
    /// Index of the next frame to render (= frames rendered since the stream began).
    pub frame: u64,
    /// Oscillator phase in cycles, in [0, 1).
    pub phase: f64,
    pub freq: f64,
    pub freq_target: f64,
    /// Frames left in the current frequency glide.
    pub freq_ramp_left: u64,
    pub gain: f64,
    pub gain_target: f64,
    pub gain_ramp_left: u64,
    /// Sequence number of the last control message applied (0: none).
    pub last_seq: u64,
    /// Checksum of the block's samples ([`samples_check`]): a stray write into a published
    /// block (a worker's memory corruption) makes the block invalid instead of audible.
    pub samples_check: u64,
    /// Checksum over the fields above: a torn or garbage state from a dying worker fails it.
    pub check: u64,
}

/// FNV-1a over the bits of every sample: what [`EngineState::samples_check`] holds for the
/// block rendered into `samples`. Cheap (one multiply per sample) and no allocation: it runs
/// in the render loop and on the output thread.
pub fn samples_check(samples: &[f32]) -> u64 {
    let mut h = SamplesCheck::new();
    h.add(samples);
    h.finish()
}

/// [`samples_check`] computed piecewise (over a block read in parts).
pub struct SamplesCheck(u64);

impl SamplesCheck {
    pub fn new() -> SamplesCheck {
        SamplesCheck(0xcbf2_9ce4_8422_2325)
    }

    pub fn add(&mut self, samples: &[f32]) {
        for s in samples {
            self.0 ^= s.to_bits() as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for SamplesCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineState {
    /// The state at frame 0: the tone fades in over one ramp so the stream starts without a click.
    pub fn initial(freq: f64, gain: f64, ramp_frames: u64) -> EngineState {
        let mut s = EngineState {
            frame: 0,
            phase: 0.0,
            freq,
            freq_target: freq,
            freq_ramp_left: 0,
            gain: 0.0,
            gain_target: gain,
            gain_ramp_left: ramp_frames,
            last_seq: 0,
            samples_check: 0,
            check: 0,
        };
        s.seal();
        s
    }

    fn checksum(&self) -> u64 {
        // FNV-1a over the raw bits: cheap, and any torn write changes it.
        let words = [
            self.frame,
            self.phase.to_bits(),
            self.freq.to_bits(),
            self.freq_target.to_bits(),
            self.freq_ramp_left,
            self.gain.to_bits(),
            self.gain_target.to_bits(),
            self.gain_ramp_left,
            self.last_seq,
            self.samples_check,
        ];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for w in words {
            h ^= w;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }

    /// Stores the checksum; call after the last change, before publishing.
    pub fn seal(&mut self) {
        self.check = self.checksum();
    }

    /// True if this state is internally consistent and within the ranges the engine can produce.
    /// Anything read from a worker's memory goes through this before it is trusted.
    pub fn is_valid(&self, sample_rate: u32) -> bool {
        let freq_ok = |f: f64| frequency_ok(f, sample_rate);
        self.check == self.checksum()
            && self.phase.is_finite()
            && (0.0..1.0).contains(&self.phase)
            && freq_ok(self.freq)
            && freq_ok(self.freq_target)
            && gain_ok(self.gain)
            && gain_ok(self.gain_target)
            && self.freq_ramp_left <= sample_rate as u64
            && self.gain_ramp_left <= sample_rate as u64
    }
}

/// What a control message changes.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    SetFrequency = 1,
    SetGain = 2,
    /// Not a change: withdraws the pending change whose sequence number is `value` (a change
    /// quarantined because the workers that applied it died). Unsequenced (`seq` 0), taken at
    /// once when received, never replayed.
    Cancel = 3,
}

/// One control message, as it travels through a worker's control ring (shared memory).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ControlMsg {
    /// Dense, starting at 1: message n is the n-th change the supervisor accepted.
    pub seq: u64,
    /// The frame at which it takes effect (the first affected sample).
    pub apply_at: u64,
    /// A [`ControlKind`] as u32 (kept raw so garbage cannot form an invalid enum).
    pub kind: u32,
    pub _pad: u32,
    pub value: f64,
}

impl ControlMsg {
    pub fn new(seq: u64, apply_at: u64, kind: ControlKind, value: f64) -> ControlMsg {
        ControlMsg { seq, apply_at, kind: kind as u32, _pad: 0, value }
    }
}

/// Counters the engine keeps about control messages (read by the worker, exported in its ring).
#[derive(Debug, Clone, Copy, Default)]
pub struct ControlStats {
    /// Applied after their stamped frame (should stay 0: it means the stamp margin was too small).
    /// Each message counts once, however often a rewind applies it again.
    pub late: u64,
    /// The newest message counted in `late`.
    pub late_seq: u64,
    /// Dropped because their sequence number was already applied (replays after a handoff).
    pub duplicates: u64,
    /// Withdrawn by a cancel (quarantined changes).
    pub cancelled: u64,
}

/// The oscillator plus its queue of pending control messages (and, when kept, the log of
/// applied ones that [`Engine::rewind`] needs).
pub struct Engine {
    state: EngineState,
    sample_rate: f64,
    ramp_frames: u64,
    pending: Box<[ControlMsg]>,
    pending_head: usize,
    pending_len: usize,
    applied: AppliedLog,
    pub stats: ControlStats,
}

/// Why [`Engine::rewind`] refused (and left the engine as it was).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewindError {
    /// The state is later than the engine's (frame or last applied message).
    Ahead,
    /// A message applied after the state is no longer kept (forgotten as played, dropped from
    /// a full log, or no log kept at all): rendering again would leave it out.
    Forgotten { needed_after: u64, kept_after: u64 },
    /// The pending queue has no room for the messages that would be queued again.
    QueueFull,
}

/// The control messages the engine applied, oldest first, each with the frame it took effect
/// at, kept until [`Engine::forget_played`] says the output has played past them. Empty (and
/// unallocated) unless [`Engine::keep_applied`] was called.
struct AppliedLog {
    msgs: Box<[(u64, ControlMsg)]>,
    head: usize,
    len: usize,
    /// The newest sequence number no longer kept (0: none dropped).
    forgotten_seq: u64,
}

impl AppliedLog {
    fn push(&mut self, frame: u64, m: ControlMsg) {
        let cap = self.msgs.len();
        if cap == 0 {
            self.forgotten_seq = m.seq;
            return;
        }
        if self.len == cap {
            self.forget_oldest();
        }
        self.msgs[(self.head + self.len) % cap] = (frame, m);
        self.len += 1;
    }

    fn forget_oldest(&mut self) {
        self.forgotten_seq = self.msgs[self.head].1.seq;
        self.head = (self.head + 1) % self.msgs.len();
        self.len -= 1;
    }

    fn newest(&self) -> Option<ControlMsg> {
        (self.len > 0).then(|| self.msgs[(self.head + self.len - 1) % self.msgs.len()].1)
    }

    fn pop_newest(&mut self) {
        self.len -= 1;
    }
}

/// Length of the frequency glide and the gain ramp: 5 ms, long enough to be click-free,
/// short enough to feel immediate.
pub fn ramp_frames(sample_rate: u32) -> u64 {
    (sample_rate / 200).max(1) as u64
}

impl Engine {
    /// Allocates the pending queue; nothing allocates after this.
    pub fn new(sample_rate: u32, state: EngineState) -> Engine {
        Engine {
            state,
            sample_rate: sample_rate as f64,
            ramp_frames: ramp_frames(sample_rate),
            pending: vec![ControlMsg::new(0, 0, ControlKind::SetGain, 0.0); PENDING_CAPACITY].into_boxed_slice(),
            pending_head: 0,
            pending_len: 0,
            applied: AppliedLog { msgs: Box::new([]), head: 0, len: 0, forgotten_seq: 0 },
            stats: ControlStats::default(),
        }
    }

    /// Keeps the last `capacity` applied messages, so that [`Engine::rewind`] can render
    /// again from an earlier block's state. Allocates: call it before rendering starts (the
    /// workers do, for [`crate::worker`]'s rewrites).
    pub fn keep_applied(&mut self, capacity: usize) {
        let empty = (0, ControlMsg::new(0, 0, ControlKind::SetGain, 0.0));
        self.applied = AppliedLog {
            msgs: vec![empty; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
            forgotten_seq: self.state.last_seq,
        };
    }

    /// The output has played every frame before `frame`: no rewind will go back before it, so
    /// the messages applied before it need not be kept.
    pub fn forget_played(&mut self, frame: u64) {
        let log = &mut self.applied;
        while log.len > 0 && log.msgs[log.head].0 < frame {
            log.forget_oldest();
        }
    }

    /// Continues from `to`, another engine's state at a frame this one has reached (the
    /// stream the output played instead of this engine's): messages this engine applied
    /// that `to` lacks are queued again (they apply at once: late), and pending ones `to`
    /// already holds are dropped. No allocation.
    ///
    /// # Errors
    /// [`RewindError`]; the engine is then unchanged.
    pub fn resync(&mut self, to: EngineState) -> Result<(), RewindError> {
        if to.last_seq <= self.state.last_seq {
            return self.rewind(to);
        }
        if to.frame > self.state.frame {
            return Err(RewindError::Ahead);
        }
        // `to` holds every message this engine applied, and some it has still pending: those
        // go into the log as applied at `to`, so that going back to an earlier state of this
        // engine (a rewrite refused further on) queues them again instead of losing them.
        self.state = to;
        while let Some(m) = self.front() {
            if m.seq > to.last_seq {
                break;
            }
            self.pop();
            self.applied.push(to.frame, m);
        }
        Ok(())
    }

    /// Goes back to `to`, the state at the start of an earlier block this engine rendered
    /// (as committed with it), and queues again the messages applied since, so that the next
    /// renders repeat that block and the following ones bit-exactly, or differ only by
    /// messages enqueued after the rewind. No allocation: it may run in the render loop.
    ///
    /// # Errors
    /// [`RewindError`]; the engine is then unchanged.
    pub fn rewind(&mut self, to: EngineState) -> Result<(), RewindError> {
        if to.frame > self.state.frame || to.last_seq > self.state.last_seq {
            return Err(RewindError::Ahead);
        }
        // The log keeps a suffix of what was applied: complete back to `to` unless something
        // newer than `to` was dropped from it.
        if self.applied.forgotten_seq > to.last_seq {
            return Err(RewindError::Forgotten { needed_after: to.last_seq, kept_after: self.applied.forgotten_seq });
        }
        let again = (0..self.applied.len)
            .map(|k| self.applied.msgs[(self.applied.head + k) % self.applied.msgs.len()].1.seq)
            .filter(|&seq| seq > to.last_seq)
            .count();
        if self.pending_len + again > self.pending.len() {
            return Err(RewindError::QueueFull);
        }
        // Newest first onto the front of the queue: it stays in sequence order.
        while let Some(m) = self.applied.newest().filter(|m| m.seq > to.last_seq) {
            self.applied.pop_newest();
            let cap = self.pending.len();
            self.pending_head = (self.pending_head + cap - 1) % cap;
            self.pending[self.pending_head] = m;
            self.pending_len += 1;
        }
        self.state = to;
        Ok(())
    }

    /// Pins the pending-message queue in memory (the render loop touches it every block).
    pub fn lock_memory(&self) {
        let bytes = std::mem::size_of_val(&*self.pending);
        let _ = crate::sys::mlock(self.pending.as_ptr().cast(), bytes);
        if !self.applied.msgs.is_empty() {
            let bytes = std::mem::size_of_val(&*self.applied.msgs);
            let _ = crate::sys::mlock(self.applied.msgs.as_ptr().cast(), bytes);
        }
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// Replaces the state (a standby taking over) and drops pending messages it already covers.
    pub fn set_state(&mut self, state: EngineState) {
        self.state = state;
        // What this engine applied before is not in the new state's history.
        self.applied.len = 0;
        self.applied.forgotten_seq = state.last_seq;
        while let Some(m) = self.front() {
            if m.seq > self.state.last_seq {
                break;
            }
            self.pop();
        }
    }

    /// True if another message fits in the pending queue.
    pub fn can_accept(&self) -> bool {
        self.pending_len < self.pending.len()
    }

    /// Queues a message received from the control ring. Messages already applied (a replay
    /// after a handoff) are dropped here, so nothing is applied twice. Returns false when full.
    /// A [`ControlKind::Cancel`] removes the pending message it names instead.
    pub fn enqueue(&mut self, msg: ControlMsg) -> bool {
        if msg.kind == ControlKind::Cancel as u32 {
            self.cancel(msg.value as u64);
            return true;
        }
        let newest = if self.pending_len > 0 {
            self.pending[(self.pending_head + self.pending_len - 1) % self.pending.len()].seq
        } else {
            self.state.last_seq
        };
        if msg.seq <= newest {
            self.stats.duplicates += 1;
            return true;
        }
        if !self.can_accept() {
            return false;
        }
        let i = (self.pending_head + self.pending_len) % self.pending.len();
        self.pending[i] = msg;
        self.pending_len += 1;
        true
    }

    /// Drops the pending message with sequence number `seq`, if it is queued.
    fn cancel(&mut self, seq: u64) {
        let cap = self.pending.len();
        let Some(k) = (0..self.pending_len).find(|&k| self.pending[(self.pending_head + k) % cap].seq == seq) else {
            return;
        };
        for j in k..self.pending_len - 1 {
            self.pending[(self.pending_head + j) % cap] = self.pending[(self.pending_head + j + 1) % cap];
        }
        self.pending_len -= 1;
        self.stats.cancelled += 1;
    }

    /// The pending messages due before frame `end` (those the next block up to `end` applies).
    pub fn due_before(&self, end: u64) -> impl Iterator<Item = &ControlMsg> {
        let cap = self.pending.len();
        (0..self.pending_len)
            .map(move |k| &self.pending[(self.pending_head + k) % cap])
            .take_while(move |m| m.apply_at < end)
    }

    /// The frame the first pending message is stamped for, if any is pending.
    pub fn next_due(&self) -> Option<u64> {
        self.front().map(|m| m.apply_at)
    }

    fn front(&self) -> Option<ControlMsg> {
        (self.pending_len > 0).then(|| self.pending[self.pending_head])
    }

    fn pop(&mut self) {
        self.pending_head = (self.pending_head + 1) % self.pending.len();
        self.pending_len -= 1;
    }

    fn apply(&mut self, m: ControlMsg) {
        let s = &mut self.state;
        if m.kind == ControlKind::SetFrequency as u32 {
            s.freq_target = m.value;
            s.freq_ramp_left = self.ramp_frames;
        } else if m.kind == ControlKind::SetGain as u32 {
            s.gain_target = m.value;
            s.gain_ramp_left = self.ramp_frames;
        }
        s.last_seq = m.seq;
    }

    /// Renders `out.len() / CHANNELS` frames, applying each pending message exactly at its
    /// stamped frame, and seals the state at the end of the block.
    pub fn render(&mut self, out: &mut [f32]) {
        let step = 1.0 / self.sample_rate;
        for frame in out.chunks_exact_mut(CHANNELS) {
            while let Some(m) = self.front() {
                if m.apply_at > self.state.frame {
                    break;
                }
                if m.apply_at < self.state.frame && m.seq > self.stats.late_seq {
                    self.stats.late += 1;
                    self.stats.late_seq = m.seq;
                }
                self.pop();
                self.apply(m);
                self.applied.push(self.state.frame, m);
            }
            let s = &mut self.state;
            if s.freq_ramp_left > 0 {
                s.freq += (s.freq_target - s.freq) / s.freq_ramp_left as f64;
                s.freq_ramp_left -= 1;
            }
            if s.gain_ramp_left > 0 {
                s.gain += (s.gain_target - s.gain) / s.gain_ramp_left as f64;
                s.gain_ramp_left -= 1;
            }
            let v = ((s.phase * std::f64::consts::TAU).sin() * s.gain) as f32;
            frame[0] = v;
            frame[1] = v;
            s.phase += s.freq * step;
            if s.phase >= 1.0 {
                s.phase -= 1.0;
            }
            s.frame += 1;
        }
        self.state.samples_check = samples_check(out);
        self.state.seal();
    }
}

/// Renders `frames` frames from the initial state with `msgs` applied at their stamps: the
/// crash-free reference the tests compare a captured stream with.
pub fn render_reference(
    sample_rate: u32,
    freq: f64,
    gain: f64,
    msgs: &[ControlMsg],
    frames: usize,
    block: usize,
) -> Vec<f32> {
    let mut e = Engine::new(sample_rate, EngineState::initial(freq, gain, ramp_frames(sample_rate)));
    let mut out = vec![0.0f32; frames * CHANNELS];
    let mut next = 0;
    for chunk in out.chunks_mut(block * CHANNELS) {
        // Deliver messages the way a worker sees them: before the block they fall in.
        let block_end = e.state().frame + (chunk.len() / CHANNELS) as u64;
        while next < msgs.len() && msgs[next].apply_at < block_end && e.can_accept() {
            e.enqueue(msgs[next]);
            next += 1;
        }
        e.render(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rendering_matches_continuous_rendering_bit_exactly() {
        let sr = 48_000;
        let msgs = [
            ControlMsg::new(1, 1000, ControlKind::SetFrequency, 880.0),
            ControlMsg::new(2, 1500, ControlKind::SetGain, 0.1),
        ];
        let reference = render_reference(sr, 440.0, 0.5, &msgs, 4096, 64);

        // Hand the state over at every block boundary to a fresh engine, as a standby would.
        let mut out = Vec::new();
        let mut state = EngineState::initial(440.0, 0.5, ramp_frames(sr));
        let mut next = 0;
        for _ in 0..64 {
            let mut e = Engine::new(sr, state);
            for m in &msgs[next..] {
                if m.seq > state.last_seq {
                    e.enqueue(*m);
                }
            }
            let mut block = [0.0f32; 128];
            e.render(&mut block);
            state = *e.state();
            assert!(state.is_valid(sr));
            next = msgs.iter().take_while(|m| m.seq <= state.last_seq).count();
            out.extend_from_slice(&block);
        }
        assert_eq!(out.len(), reference.len());
        assert!(out.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn message_applies_at_its_stamped_frame_and_once() {
        let sr = 48_000;
        let mut e = Engine::new(sr, EngineState::initial(440.0, 0.5, ramp_frames(sr)));
        let m = ControlMsg::new(1, 100, ControlKind::SetGain, 0.0);
        assert!(e.enqueue(m));
        assert!(e.enqueue(m)); // duplicate: dropped
        assert_eq!(e.stats.duplicates, 1);
        let mut block = [0.0f32; 2 * 100]; // frames 0..=99
        e.render(&mut block);
        assert_eq!(e.state().last_seq, 0);
        let mut one = [0.0f32; 2];
        e.render(&mut one);
        assert_eq!(e.state().last_seq, 1);
        assert_eq!(e.stats.late, 0);
    }

    #[test]
    fn a_cancel_withdraws_the_pending_change_it_names() {
        let sr = 48_000;
        let mut e = Engine::new(sr, EngineState::initial(440.0, 0.5, ramp_frames(sr)));
        assert!(e.enqueue(ControlMsg::new(1, 10, ControlKind::SetFrequency, 880.0)));
        assert!(e.enqueue(ControlMsg::new(2, 20, ControlKind::SetGain, 0.1)));
        assert!(e.enqueue(ControlMsg::new(3, 30, ControlKind::SetFrequency, 660.0)));
        assert_eq!(e.due_before(25).map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(e.enqueue(ControlMsg::new(0, 0, ControlKind::Cancel, 2.0)));
        assert_eq!(e.stats.cancelled, 1);
        let mut block = [0.0f32; 2 * 64];
        e.render(&mut block);
        assert_eq!(e.state().last_seq, 3, "1 and 3 applied");
        assert_eq!(e.state().gain_target, 0.5, "the cancelled gain change never applied");
        assert_eq!(e.state().freq_target, 660.0);
    }

    #[test]
    fn garbage_state_is_rejected() {
        let sr = 48_000;
        let mut s = EngineState::initial(440.0, 0.5, ramp_frames(sr));
        assert!(s.is_valid(sr));
        s.freq = f64::NAN;
        assert!(!s.is_valid(sr));
        let mut s = EngineState::initial(440.0, 0.5, ramp_frames(sr));
        s.frame += 1; // torn: checksum no longer matches
        assert!(!s.is_valid(sr));
    }

    #[test]
    fn gain_ramp_has_no_jump() {
        let sr = 48_000;
        let msgs = [ControlMsg::new(1, 480, ControlKind::SetGain, 1.0)];
        let out = render_reference(sr, 1000.0, 0.0, &msgs, 2048, 64);
        // A 1 kHz sine moves at most 2*pi*1000/48000 ~ 0.131 per sample at full scale.
        let max_step = out.chunks(2).zip(out.chunks(2).skip(1)).map(|(a, b)| (a[0] - b[0]).abs()).fold(0.0, f32::max);
        assert!(max_step < 0.14, "click: step {max_step}");
    }

    /// Renders `blocks` blocks of `block` frames into `out` from block `first` on, recording
    /// the state each block started from in `starts`.
    fn render_blocks(
        e: &mut Engine,
        out: &mut [f32],
        starts: &mut [EngineState],
        first: usize,
        blocks: usize,
        block: usize,
    ) {
        for b in first..first + blocks {
            starts[b] = *e.state();
            e.render(&mut out[b * block * CHANNELS..(b + 1) * block * CHANNELS]);
        }
    }

    fn bits_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn a_rewind_renders_the_same_blocks_again_bit_exactly() {
        let (sr, block, blocks) = (48_000, 64, 64);
        let msgs = [
            ControlMsg::new(1, 1000, ControlKind::SetFrequency, 880.0),
            ControlMsg::new(2, 1500, ControlKind::SetGain, 0.1),
            ControlMsg::new(3, 2100, ControlKind::SetFrequency, 330.0),
        ];
        let reference = render_reference(sr, 440.0, 0.5, &msgs, blocks * block, block);
        let mut e = Engine::new(sr, EngineState::initial(440.0, 0.5, ramp_frames(sr)));
        e.keep_applied(16);
        msgs.iter().for_each(|m| assert!(e.enqueue(*m)));
        let mut out = vec![0.0f32; blocks * block * CHANNELS];
        let mut starts = vec![*e.state(); blocks];
        render_blocks(&mut e, &mut out, &mut starts, 0, 40, block);
        assert_eq!(e.state().last_seq, 3);
        // Back before all three messages, between the first two, and after the last, each
        // time rendering on to the end: what plays is the straight render.
        for back_to in [10, 20, 35, 30] {
            let mut again = out.clone();
            again[back_to * block * CHANNELS..].fill(f32::NAN);
            e.rewind(starts[back_to]).unwrap();
            assert_eq!(e.state(), &starts[back_to]);
            render_blocks(&mut e, &mut again, &mut starts, back_to, blocks - back_to, block);
            assert!(bits_equal(&again, &reference), "rewound to block {back_to}: not bit-exact");
            out = again;
        }
        assert_eq!(e.stats.late, 0);
    }

    /// What a rewind is for: a change stamped inside blocks already rendered (not yet played)
    /// sounds exactly as if it had been known before they were rendered.
    #[test]
    fn a_change_for_an_already_rendered_block_is_rendered_in_by_a_rewind() {
        let (sr, block, blocks) = (48_000, 64, 64);
        let m1 = ControlMsg::new(1, 1000, ControlKind::SetFrequency, 880.0);
        let m2 = ControlMsg::new(2, 1200, ControlKind::SetGain, 0.2);
        let reference = render_reference(sr, 440.0, 0.5, &[m1, m2], blocks * block, block);
        let mut e = Engine::new(sr, EngineState::initial(440.0, 0.5, ramp_frames(sr)));
        e.keep_applied(16);
        assert!(e.enqueue(m1));
        let mut out = vec![0.0f32; blocks * block * CHANNELS];
        let mut starts = vec![*e.state(); blocks];
        render_blocks(&mut e, &mut out, &mut starts, 0, 32, block);
        // The output has played up to block 16; m2 arrives for frame 1200 (block 18).
        e.forget_played(16 * block as u64);
        let b = (m2.apply_at / block as u64) as usize;
        e.rewind(starts[b]).unwrap();
        assert!(e.enqueue(m2));
        render_blocks(&mut e, &mut out, &mut starts, b, blocks - b, block);
        assert!(bits_equal(&out, &reference), "the rewound stream is not the straight render with m2 known");
        assert_eq!((e.state().last_seq, e.stats.late), (2, 0));
    }

    #[test]
    fn a_rewind_that_would_lose_a_message_is_refused_and_changes_nothing() {
        let (sr, block) = (48_000, 64);
        let m1 = ControlMsg::new(1, 100, ControlKind::SetFrequency, 880.0);
        let start = EngineState::initial(440.0, 0.5, ramp_frames(sr));
        let mut buf = [0.0f32; 64 * CHANNELS];
        // No log kept: a rewind across an applied message would drop it.
        let mut e = Engine::new(sr, start);
        assert!(e.enqueue(m1));
        let after_first = {
            e.render(&mut buf);
            *e.state()
        };
        e.render(&mut buf);
        e.render(&mut buf);
        let now = *e.state();
        assert_eq!(now.last_seq, 1);
        assert_eq!(e.rewind(start), Err(RewindError::Forgotten { needed_after: 0, kept_after: 1 }));
        assert_eq!(e.state(), &now);
        // ... but back to a block after it is fine, and so is a state that is not earlier.
        assert_eq!(e.rewind(now), Ok(()));
        let later = {
            let mut f = Engine::new(sr, now);
            f.render(&mut buf);
            *f.state()
        };
        assert_eq!(e.rewind(later), Err(RewindError::Ahead));
        // With a log, what the output has played is forgotten, and no rewind may go before it.
        let mut e = Engine::new(sr, start);
        e.keep_applied(4);
        assert!(e.enqueue(m1));
        e.render(&mut buf);
        e.render(&mut buf);
        e.render(&mut buf);
        assert_eq!(e.rewind(after_first), Ok(()), "m1 (frame 100, block 1) is still kept");
        e.render(&mut buf);
        e.render(&mut buf);
        e.forget_played(2 * block as u64);
        assert!(matches!(e.rewind(after_first), Err(RewindError::Forgotten { .. })));
        // A full pending queue cannot take the applied messages back.
        let mut e = Engine::new(sr, start);
        e.keep_applied(4);
        assert!(e.enqueue(m1));
        e.render(&mut buf);
        e.render(&mut buf);
        for seq in 2..=PENDING_CAPACITY as u64 + 1 {
            assert!(e.enqueue(ControlMsg::new(seq, 1 << 40, ControlKind::SetGain, 0.1)));
        }
        assert!(!e.can_accept());
        let before = *e.state();
        assert_eq!(e.rewind(start), Err(RewindError::QueueFull));
        assert_eq!(e.state(), &before);
    }
}
