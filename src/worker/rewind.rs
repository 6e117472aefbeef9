//! Rendering committed blocks again (issue 15): a control message stamped inside blocks the
//! worker has already committed is heard at its stamp, not a ring later. The worker goes back
//! to the state at the start of the first of those blocks the output has not taken yet, and
//! rewrites its ring from there ([`AudioRing::rewrite`]). A block the output froze meanwhile
//! keeps its old version; the worker continues from that version, and the change applies at
//! the start of the next block (counted late by the engine), as in every other ring.
//!
//! One catch-up per wake-up, after the drain: a flood of changes costs at most one rewrite of
//! the ring per period, not one per message. Audio-thread code: after [`Rewinder::new`] no
//! allocation, no lock, no log.

use crate::engine::{Engine, EngineState};
use crate::shm::ring::{AudioRing, BlockMeta, RewindStats, RewriteRefused};

/// Played blocks whose applied messages are kept for a resync: the blocks of an output
/// wake-up (at most 2) and one more.
const RESYNC_KEPT_BLOCKS: u64 = 4;

/// The worker's memory of its current run: the state at the end of every block it has
/// committed and still holds, so that it can start any of them again.
pub struct Rewinder {
    /// The state at the end of block `b` in `ends[b % len]`: the version the ring holds (a
    /// refused rewrite leaves the old one). One more than the ring's slots: the state before
    /// the oldest block held is needed too.
    ends: Box<[EngineState]>,
    scratch: Box<[f32]>,
    block_frames: u64,
    /// The first block of the run, and the state it started from (the handoff).
    run_base: u64,
    run_start: EngineState,
    /// The output's newest resync request taken.
    seen_resync: u64,
    pub stats: RewindStats,
}

impl Rewinder {
    /// Allocates everything it will touch (call before the render loop).
    pub fn new(ring: &AudioRing) -> Rewinder {
        let geo = ring.geometry();
        let zero = EngineState::initial(440.0, 0.0, 1);
        Rewinder {
            ends: vec![zero; geo.slots as usize + 1].into_boxed_slice(),
            scratch: vec![0.0; geo.samples_per_block()].into_boxed_slice(),
            block_frames: geo.block_frames as u64,
            run_base: 0,
            run_start: zero,
            seen_resync: 0,
            stats: RewindStats::default(),
        }
    }

    /// A run starts at block `base` from `state` (the supervisor's handoff).
    pub fn start_run(&mut self, base: u64, state: EngineState) {
        self.run_base = base;
        self.run_start = state;
    }

    /// A run commanded by the supervisor: a resync the output asked of an earlier run is
    /// not for this one.
    pub fn start_new_run(&mut self, ring: &AudioRing, base: u64, state: EngineState) {
        let _ = ring.take_resync(&mut self.seen_resync);
        self.start_run(base, state);
    }

    /// After the drain: continues from the block the output played if it asked to (see
    /// [`Rewinder::resync`]), then renders again what a change stamped inside the ring
    /// affects ([`Rewinder::catch_up`]).
    pub fn follow(&mut self, ring: &AudioRing, engine: &mut Engine, next_block: u64, known_seq: u64) {
        if let Some(played) = ring.take_resync(&mut self.seen_resync) {
            self.resync(ring, engine, played, next_block, known_seq);
        }
        self.catch_up(ring, engine, next_block, known_seq);
    }

    /// Block `block` was committed, ending in `state`.
    pub fn committed(&mut self, block: u64, state: EngineState) {
        let len = self.ends.len() as u64;
        self.ends[(block % len) as usize] = state;
    }

    /// The state block `block` starts from in this run, if still known.
    fn start_of(&self, block: u64, next_block: u64) -> Option<EngineState> {
        if block == self.run_base {
            return Some(self.run_start);
        }
        let len = self.ends.len() as u64;
        let before = block.checked_sub(1)?;
        (block > self.run_base && next_block - before <= len).then(|| self.ends[(before % len) as usize])
    }

    /// After the drain: if a pending message is stamped before the end of what the ring
    /// holds, renders the ring again from the first block it affects that the output can
    /// still take, up to `next_block` (exclusive: the next block to commit). The engine ends
    /// where it was, at the end of block `next_block - 1`, now with the message applied.
    /// `known_seq`: the newest control sequence received, which every rewritten block carries.
    pub fn catch_up(&mut self, ring: &AudioRing, engine: &mut Engine, next_block: u64, known_seq: u64) {
        let Some(due) = engine.next_due() else { return };
        if due >= engine.state().frame {
            return; // in order: the next block renders it
        }
        // The output has played everything before its read index (and may be copying that
        // block now: then the rewrite of it is refused, and the next one takes the change).
        let first = (due / self.block_frames).max(ring.read_index()).max(self.run_base);
        if first >= next_block {
            return; // nothing left to rewrite: the next block applies it, late
        }
        let Some(start) = self.start_of(first, next_block) else {
            self.stats.failed += 1;
            return;
        };
        if engine.rewind(start).is_err() {
            self.stats.failed += 1;
            return;
        }
        self.stats.rewinds += 1;
        self.rewrite(ring, engine, first, next_block, known_seq);
    }

    /// The output played another ring's block `base - 1`, which ended in `state`, instead of
    /// this ring's: continues from there, rendering again every block it holds from `base`
    /// (what it applied that the played stream lacks is applied again, late; the blocks the
    /// output takes before the rewrite reaches them differ again, and are resynced again).
    pub fn resync(
        &mut self,
        ring: &AudioRing,
        engine: &mut Engine,
        at: (u64, EngineState),
        next_block: u64,
        known_seq: u64,
    ) {
        let (base, state) = at;
        let frame_ok = base.checked_mul(self.block_frames) == Some(state.frame);
        if ring.is_frozen(base) {
            // Too late for this one: the output takes (or took) block `base` as this ring has
            // it, and asks again from the next block if it differs.
            return;
        }
        if !frame_ok || base < self.run_base || base > next_block || engine.resync(state).is_err() {
            self.stats.failed += 1;
            return;
        }
        self.stats.resyncs += 1;
        self.start_run(base, state);
        self.rewrite(ring, engine, base, next_block, known_seq);
    }

    /// Renders blocks `first..next_block` again from the engine's state (the start of
    /// `first`), each in place of the version the ring holds unless the output froze it.
    fn rewrite(&mut self, ring: &AudioRing, engine: &mut Engine, first: u64, next_block: u64, known_seq: u64) {
        for block in first..next_block {
            let meta = BlockMeta { known_seq, start_check: engine.state().check };
            let done = ring.rewrite(block, meta, |samples| {
                engine.render(samples);
                *engine.state()
            });
            match done {
                Ok(()) => {
                    self.committed(block, *engine.state());
                    self.stats.rewritten += 1;
                }
                Err(refused) => {
                    self.stats.refused += 1;
                    if refused == RewriteRefused::Frozen {
                        // Not rendered: render it aside, so the engine is at its end.
                        engine.render(&mut self.scratch);
                    }
                    // The ring keeps its old version: continue from that one. Cannot fail:
                    // it is no later than the engine, and it re-queues only messages this
                    // catch-up took from the queue after the first rewind made room for them.
                    let kept = self.ends[(block % self.ends.len() as u64) as usize];
                    if engine.rewind(kept).is_err() {
                        self.stats.failed += 1;
                        return;
                    }
                }
            }
        }
    }

    /// The output has played every block before `read_index`: messages applied before the
    /// last few of them are no longer needed (a resync continues from the end of one of the
    /// blocks of the output's last wake-up, and queues again what this ring applied there).
    pub fn forget_played(&self, engine: &mut Engine, read_index: u64) {
        engine.forget_played(read_index.saturating_sub(RESYNC_KEPT_BLOCKS).saturating_mul(self.block_frames));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ramp_frames, ControlKind, ControlMsg, PENDING_CAPACITY};
    use crate::shm::ring::RingGeometry;

    const BF: u64 = 64;

    struct Rig {
        _file: tempfile::NamedTempFile,
        output: AudioRing,
        worker: AudioRing,
        engine: Engine,
        rewinder: Rewinder,
        next_block: u64,
        known_seq: u64,
        played: Vec<f32>,
        played_check: Option<u64>,
    }

    fn start() -> EngineState {
        EngineState::initial(440.0, 0.5, ramp_frames(48_000))
    }

    impl Rig {
        fn new() -> Rig {
            let geo = RingGeometry { block_frames: BF as u32, slots: 8, sample_rate: 48_000 };
            let file = tempfile::NamedTempFile::new().unwrap();
            file.as_file().set_len(geo.segment_size()).unwrap();
            let output = AudioRing::create(file.as_file(), geo).unwrap();
            let worker = AudioRing::attach(file.as_file()).unwrap();
            let mut engine = Engine::new(48_000, start());
            engine.keep_applied(PENDING_CAPACITY);
            let mut rewinder = Rewinder::new(&worker);
            rewinder.start_run(0, start());
            Rig {
                _file: file,
                output,
                worker,
                engine,
                rewinder,
                next_block: 0,
                known_seq: 0,
                played: Vec::new(),
                played_check: None,
            }
        }

        /// One wake-up of the worker, as the render loop does it: forget, catch up, fill.
        fn wake(&mut self, msgs: &[ControlMsg]) {
            for &m in msgs {
                assert!(self.engine.enqueue(m));
            }
            self.rewinder.forget_played(&mut self.engine, self.worker.read_index());
            self.known_seq = self.known_seq.max(msgs.iter().map(|m| m.seq).max().unwrap_or(0));
            self.rewinder.follow(&self.worker, &mut self.engine, self.next_block, self.known_seq);
            while self.worker.space() > 0 {
                let engine = &mut self.engine;
                let meta = BlockMeta { known_seq: self.known_seq, start_check: engine.state().check };
                self.worker.produce(self.next_block, meta, |s| {
                    engine.render(s);
                    *engine.state()
                });
                self.rewinder.committed(self.next_block, *self.engine.state());
                self.next_block += 1;
            }
        }

        /// The output takes its next `n` blocks (freezing each, as it does), waking the worker
        /// when the ring runs dry.
        fn play(&mut self, n: u64) {
            let mut out = vec![0.0; 128];
            for _ in 0..n {
                let pos = self.output.read_index();
                if self.worker.write_index() <= pos {
                    self.wake(&[]);
                }
                self.output.freeze(pos);
                let block = self.output.read_block(pos, &mut out).expect("a playable block");
                // Rewritten or not, every block continues the one played before it.
                if let Some(prev) = self.played_check {
                    assert_eq!(block.meta.start_check, prev, "block {pos} continues the stream");
                }
                self.played_check = Some(block.state.check);
                self.played.extend_from_slice(&out);
                self.output.set_read_index(pos + 1);
            }
        }
    }

    /// What the output must have played: a straight render with each message at `heard_at`.
    fn reference(blocks: u64, msgs: &[(ControlMsg, u64)]) -> Vec<f32> {
        let mut e = Engine::new(48_000, start());
        for &(m, heard_at) in msgs {
            assert!(e.enqueue(ControlMsg { apply_at: heard_at, ..m }));
        }
        let mut out = vec![0.0; (blocks * BF * 2) as usize];
        for block in out.chunks_mut((BF * 2) as usize) {
            e.render(block);
        }
        out
    }

    #[test]
    fn a_change_stamped_inside_committed_blocks_is_heard_at_its_stamp() {
        let mut rig = Rig::new();
        rig.wake(&[]);
        rig.play(3);
        // Stamped 17 frames into block 5: committed (the ring holds 3..11), not yet played.
        let m = ControlMsg::new(1, 5 * BF + 17, ControlKind::SetFrequency, 880.0);
        rig.wake(&[m]);
        assert_eq!(rig.rewinder.stats, RewindStats { rewinds: 1, rewritten: 3, refused: 0, failed: 0, resyncs: 0 });
        rig.play(20);
        assert_eq!(rig.played, reference(23, &[(m, 5 * BF + 17)]), "bit-exact, applied at its frame");
        assert_eq!(rig.engine.stats.late, 0);
    }

    /// The output froze block 3 (it is copying it) when the change for block 3 arrives: block
    /// 3 plays as it was, and the change is heard from the start of block 4, in this ring as
    /// it would be in every other.
    #[test]
    fn a_change_for_a_block_the_output_froze_is_heard_from_the_next_one() {
        let mut rig = Rig::new();
        rig.wake(&[]);
        rig.play(3);
        rig.output.freeze(3);
        let m = ControlMsg::new(1, 3 * BF + 40, ControlKind::SetGain, 0.25);
        rig.wake(&[m]);
        assert_eq!(rig.rewinder.stats, RewindStats { rewinds: 1, rewritten: 4, refused: 1, failed: 0, resyncs: 0 });
        assert_eq!(rig.engine.stats.late, 1);
        rig.play(20);
        assert_eq!(rig.played, reference(23, &[(m, 4 * BF)]));
    }

    /// Changes over several wake-ups, one stamped before anything the output still holds (it
    /// is heard at the read index), and a flood of 300 in one wake-up: one catch-up each.
    #[test]
    fn changes_over_many_wakeups_play_as_a_reference_render_and_a_flood_is_one_catch_up() {
        let mut rig = Rig::new();
        let mut expected = Vec::new();
        rig.wake(&[]);
        rig.play(2);
        let a = ControlMsg::new(1, 4 * BF + 3, ControlKind::SetFrequency, 660.0);
        rig.wake(&[a]);
        expected.push((a, 4 * BF + 3));
        rig.play(5);
        // Stamped in block 1, long played: heard from block 7, the first the output can take.
        let b = ControlMsg::new(2, BF + 5, ControlKind::SetGain, 0.1);
        rig.wake(&[b]);
        expected.push((b, 7 * BF));
        rig.play(1);
        let flood: Vec<ControlMsg> = (0..300)
            .map(|k| ControlMsg::new(3 + k, 9 * BF + k * 3, ControlKind::SetFrequency, 300.0 + k as f64))
            .collect();
        rig.wake(&flood);
        expected.extend(flood.iter().map(|&m| (m, m.apply_at)));
        assert_eq!(rig.rewinder.stats.rewinds, 3, "one catch-up per wake-up, the flood included");
        assert_eq!(rig.rewinder.stats.failed, 0);
        rig.play(30);
        assert_eq!(rig.played, reference(38, &expected));
        assert_eq!(rig.engine.stats.late, 1, "only the change for a played block");
    }

    /// A run started from a handoff at block 40: a change stamped before the run's base is
    /// rendered from the handoff state, never from a state of another run.
    #[test]
    fn a_catch_up_never_goes_back_before_its_run() {
        let mut rig = Rig::new();
        // A straight render to block 40 stands for the predecessor's stream.
        let mut before = Engine::new(48_000, start());
        let mut scratch = vec![0.0; 128];
        for _ in 0..40 {
            before.render(&mut scratch);
        }
        rig.engine.set_state(*before.state());
        rig.rewinder.start_run(40, *before.state());
        rig.output.command_run(40, before.state(), 0, 40);
        rig.next_block = 40;
        rig.wake(&[]);
        let m = ControlMsg::new(1, 30 * BF, ControlKind::SetGain, 0.2);
        rig.wake(&[m]);
        assert_eq!(rig.rewinder.stats, RewindStats { rewinds: 1, rewritten: 8, refused: 0, failed: 0, resyncs: 0 });
        rig.play(8);
        let full = reference(48, &[(m, 40 * BF)]);
        assert_eq!(rig.played, full[(40 * BF * 2) as usize..]);
    }

    /// The output played another ring's block 5, which lacked a change this worker had
    /// rendered at its stamp inside it (the other worker was too late for it). Told to
    /// continue from the block played, this worker renders its ring again from block 6: the
    /// stream stays the one played, with the change heard late, at the start of block 6, as
    /// the other worker (whose rewrite of block 5 was refused) renders it too.
    #[test]
    fn a_resync_continues_from_the_block_played_instead() {
        let mut rig = Rig::new();
        rig.wake(&[]);
        rig.play(3);
        let m = ControlMsg::new(1, 5 * BF + 17, ControlKind::SetFrequency, 880.0);
        rig.wake(&[m]);
        rig.play(2);
        // Block 5 from the other ring: the stream without the change.
        let mut other = Engine::new(48_000, start());
        let mut block = vec![0.0; (BF * 2) as usize];
        for _ in 0..6 {
            other.render(&mut block);
        }
        rig.output.freeze(5);
        assert_ne!(rig.output.peek(5).unwrap().state.check, other.state().check, "this ring's block 5 differs");
        rig.played.extend_from_slice(&block);
        rig.played_check = Some(other.state().check);
        rig.output.set_read_index(6);
        rig.output.request_resync(6, other.state());
        rig.wake(&[]);
        assert_eq!(rig.rewinder.stats.resyncs, 1);
        assert_eq!(rig.rewinder.stats.failed, 0);
        rig.play(12);
        assert_eq!(rig.played, reference(18, &[(m, 6 * BF)]), "the played stream, the change from block 6");
        // An old request is not taken twice.
        rig.wake(&[]);
        assert_eq!(rig.rewinder.stats.resyncs, 1);
    }
}
