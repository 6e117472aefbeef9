//! The per-worker audio ring: single producer (the worker's render loop), single consumer (the
//! supervisor's output thread), in one shared-memory segment.
//!
//! ```text
//! header (cache-line separated fields)          slots[block % slots]
//!   geometry (written once by the supervisor)     EngineState at the end of the block
//!   command + handoff   supervisor -> worker      block_frames * 2 f32 samples
//!   read_index          output thread -> worker
//!   write_index         worker -> supervisor (also the heartbeat)
//!   status              worker -> supervisor
//! ```
//!
//! Block numbers are global stream positions (block `b` holds frames `b*B .. (b+1)*B`), so
//! every worker's ring agrees on what block `b` is, and any ring holding a valid block `b` can
//! be played for it: that is what makes failover a ring switch.
//!
//! Ordering: the worker fills a slot, then publishes it with a Release store of `write_index`;
//! the reader's Acquire load of `write_index` makes the slot's contents visible. The reader
//! publishes consumption with a Release store of `read_index`; the worker's Acquire load of it
//! lets it reuse those slots. A slot is only rewritten once `read_index` has passed it.

use std::cell::UnsafeCell;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{cache_align, Mapping, LAYOUT_VERSION, MAGIC_AUDIO};
use crate::engine::{EngineState, CHANNELS};

/// Command modes (low byte of `command`; the rest is a generation counter so a worker notices
/// every new command even if the mode is the same).
pub const MODE_IDLE: u64 = 0;
pub const MODE_RUN: u64 = 1;

/// The role a worker is told (for its process name only: it renders the same either way).
pub const ROLE_NONE: u32 = 0;
pub const ROLE_PRIMARY: u32 = 1;
pub const ROLE_SPARE: u32 = 2;
pub const ROLE_RESERVE: u32 = 3;

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Handoff {
    base: u64,
    state: EngineState,
}

#[repr(C)]
struct Status {
    ready: AtomicU32,
    realtime: AtomicU32,
    pid: AtomicU32,
    sandboxed: AtomicU32,
    late: AtomicU64,
    duplicates: AtomicU64,
}

/// Written once by the supervisor before the worker exists; read by the worker at attach.
/// Only ever accessed through raw pointers (a faulty worker could scribble on it).
#[repr(C)]
struct Geometry {
    magic: u64,
    version: u32,
    block_frames: u32,
    slots: u32,
    slot_stride: u32,
    sample_rate: u32,
    channels: u32,
}

/// The fields both processes touch while running: all atomics or UnsafeCell.
#[repr(C)]
struct Live {
    command: Line<AtomicU64>,
    handoff: Line<UnsafeCell<Handoff>>,
    read_index: Line<AtomicU64>,
    write_index: Line<AtomicU64>,
    status: Line<Status>,
    /// Supervisor -> worker: ROLE_*, shown in the worker's process name.
    role: Line<AtomicU32>,
}

#[repr(C)]
struct Header {
    geometry: Line<Geometry>,
    live: Live,
}

const STATE_BYTES: usize = std::mem::size_of::<EngineState>();

/// Geometry of a ring. The supervisor keeps its own copy and never re-reads it from shared
/// memory, which a worker could have scribbled over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    pub block_frames: u32,
    pub slots: u32,
    pub sample_rate: u32,
}

impl RingGeometry {
    fn slot_stride(&self) -> usize {
        cache_align(STATE_BYTES + self.block_frames as usize * CHANNELS * 4)
    }

    fn header_size() -> usize {
        cache_align(std::mem::size_of::<Header>())
    }

    /// Bytes the segment needs.
    pub fn segment_size(&self) -> u64 {
        (Self::header_size() + self.slots as usize * self.slot_stride()) as u64
    }

    pub fn samples_per_block(&self) -> usize {
        self.block_frames as usize * CHANNELS
    }
}

/// A mapped audio ring.
pub struct AudioRing {
    map: Mapping,
    geo: RingGeometry,
    /// The supervisor's mapping is pinned (mlock granted at create).
    locked: bool,
}

// SAFETY: all shared fields are atomics or are accessed through raw pointers under the
// SPSC protocol described in the module docs; the mapping itself is process-wide.
unsafe impl Send for AudioRing {}
// SAFETY: as above; `&AudioRing` methods never hand out references to non-atomic shared data.
unsafe impl Sync for AudioRing {}

impl AudioRing {
    /// Supervisor side: maps a freshly created (zeroed) segment and writes its header.
    pub fn create(file: &File, geo: RingGeometry) -> io::Result<AudioRing> {
        let map = Mapping::new(file)?;
        if (map.len() as u64) < geo.segment_size() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "segment smaller than the ring layout"));
        }
        let mut ring = AudioRing { map, geo, locked: false };
        // SAFETY: the mapping is at least header-sized (checked above), page-aligned, and no
        // worker has it yet, so these plain writes race with nobody.
        unsafe {
            let h = std::ptr::addr_of_mut!((*ring.map.ptr().cast::<Header>()).geometry.0);
            (*h).block_frames = geo.block_frames;
            (*h).slots = geo.slots;
            (*h).slot_stride = geo.slot_stride() as u32;
            (*h).sample_rate = geo.sample_rate;
            (*h).channels = CHANNELS as u32;
            (*h).version = LAYOUT_VERSION;
            (*h).magic = MAGIC_AUDIO;
        }
        // The output thread reads it every period: it must never page-fault. A refusal is the
        // caller's to report (counted), not fatal.
        ring.locked = ring.map.lock().is_ok();
        Ok(ring)
    }

    /// Was the supervisor's mapping pinned in memory at create?
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Worker side: maps an inherited segment and validates its header.
    pub fn attach(file: &File) -> io::Result<AudioRing> {
        let map = Mapping::new(file)?;
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        if map.len() < RingGeometry::header_size() {
            return Err(bad("audio ring segment too small"));
        }
        // SAFETY: the mapping holds at least a header; the supervisor wrote it before exec
        // and nobody writes it since. Raw-pointer reads, no reference to shared memory.
        let (magic, version, geo, stride, channels) = unsafe {
            let h = std::ptr::addr_of!((*map.ptr().cast::<Header>()).geometry.0);
            (
                (*h).magic,
                (*h).version,
                RingGeometry { block_frames: (*h).block_frames, slots: (*h).slots, sample_rate: (*h).sample_rate },
                (*h).slot_stride,
                (*h).channels,
            )
        };
        if magic != MAGIC_AUDIO || version != LAYOUT_VERSION {
            return Err(bad("not an audiowarden audio ring of this version"));
        }
        if channels as usize != CHANNELS
            || geo.block_frames == 0
            || geo.slots == 0
            || stride as usize != geo.slot_stride()
            || (map.len() as u64) < geo.segment_size()
        {
            return Err(bad("audio ring geometry does not match its segment"));
        }
        Ok(AudioRing { map, geo, locked: false })
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geo
    }

    fn header(&self) -> &Live {
        // SAFETY: the mapping is at least header-sized and lives as long as `self`; the
        // reference covers only the `Live` part, whose fields are all atomics or UnsafeCell,
        // so concurrent writes by the worker are permitted.
        unsafe { &(*self.map.ptr().cast::<Header>()).live }
    }

    fn slot_ptr(&self, block: u64) -> *mut u8 {
        let i = (block % self.geo.slots as u64) as usize;
        // SAFETY: i < slots, and the mapping holds header + slots * stride bytes (checked at
        // create/attach), so the offset stays inside the mapping.
        unsafe { self.map.ptr().add(RingGeometry::header_size() + i * self.geo.slot_stride()) }
    }

    /// Pins the whole ring in memory (faulting it in).
    pub fn lock(&self) -> io::Result<()> {
        self.map.lock()
    }

    // ---- indices -------------------------------------------------------------------------

    /// One past the newest committed block (Acquire: the slots below it are readable).
    pub fn write_index(&self) -> u64 {
        self.header().write_index.0.load(Ordering::Acquire)
    }

    pub fn read_index(&self) -> u64 {
        self.header().read_index.0.load(Ordering::Acquire)
    }

    /// Output thread: everything below `index` has been consumed.
    pub fn set_read_index(&self, index: u64) {
        self.header().read_index.0.store(index, Ordering::Release);
    }

    /// Worker: how many more blocks it may commit right now (by the read index in the ring).
    pub fn space(&self) -> u64 {
        self.read_index().saturating_add(self.geo.slots as u64).saturating_sub(self.write_index())
    }

    /// Supervisor: how many more blocks the worker may commit when the output is at block
    /// `read` (the supervisor's own position: the read index in the ring is worker-writable).
    pub fn space_at(&self, read: u64) -> u64 {
        read.saturating_add(self.geo.slots as u64).saturating_sub(self.write_index())
    }

    // ---- commands (supervisor -> worker) -----------------------------------------------------

    /// Supervisor: start (or restart) rendering at block `base` from `state`. Call only while
    /// the worker is idle or freshly spawned, never while it renders.
    pub fn command_run(&self, base: u64, state: &EngineState, read_index: u64) {
        let h = self.header();
        // SAFETY: the worker reads the handoff only after observing the new command below
        // (Acquire pairs with this Release), and it is idle now, so nobody reads concurrently.
        unsafe { std::ptr::write_volatile(h.handoff.0.get(), Handoff { base, state: *state }) };
        h.write_index.0.store(base, Ordering::Relaxed);
        // May be a period stale (the output thread advances it concurrently): that only
        // delays the worker's first render by a period; the output rewrites it every period.
        h.read_index.0.store(read_index, Ordering::Relaxed);
        let gen = (h.command.0.load(Ordering::Relaxed) >> 8) + 1;
        h.command.0.store((gen << 8) | MODE_RUN, Ordering::Release);
    }

    /// Supervisor: tells the worker its role (ROLE_*); it renames itself at its next wake-up.
    pub fn set_role(&self, role: u32) {
        self.header().role.0.store(role, Ordering::Relaxed);
    }

    /// Worker: the role it was last told (untrusted on the other side: a name, nothing more).
    pub fn role(&self) -> u32 {
        self.header().role.0.load(Ordering::Relaxed)
    }

    /// Worker: the current command word (generation << 8 | mode).
    pub fn command(&self) -> u64 {
        self.header().command.0.load(Ordering::Acquire)
    }

    /// Worker: the handoff written with the last run command.
    pub fn handoff(&self) -> (u64, EngineState) {
        // SAFETY: read after an Acquire load of `command` that saw the supervisor's Release;
        // the supervisor does not write the handoff while we run.
        let h = unsafe { std::ptr::read_volatile(self.header().handoff.0.get()) };
        (h.base, h.state)
    }

    // ---- producer (worker) -------------------------------------------------------------

    /// Worker: renders block `block` into its slot through `render` and publishes it.
    /// The caller guarantees `block == write_index()` and `space() > 0`.
    pub fn produce(&self, block: u64, render: impl FnOnce(&mut [f32]) -> EngineState) {
        let slot = self.slot_ptr(block);
        // SAFETY: the slot of `block` is not readable by the consumer (write_index <= block)
        // and was already consumed (space > 0), so we are its only user; it holds
        // STATE_BYTES + samples_per_block f32s, f32-aligned (stride and header are 64-aligned).
        let samples = unsafe {
            std::slice::from_raw_parts_mut(slot.add(STATE_BYTES).cast::<f32>(), self.geo.samples_per_block())
        };
        let state = render(samples);
        // SAFETY: as above; EngineState is plain data and the slot start is 64-aligned.
        unsafe { std::ptr::write_volatile(slot.cast::<EngineState>(), state) };
        // Release: publishes the samples and the state written above.
        self.header().write_index.0.store(block + 1, Ordering::Release);
    }

    /// TEST-ONLY (the worker's fault switch): overwrites the samples of published block
    /// `block` with full-scale noise, leaving its state as it was: a stray write into memory
    /// the output may be about to play.
    pub fn test_scribble_samples(&self, block: u64) {
        let slot = self.slot_ptr(block);
        for i in 0..self.geo.samples_per_block() {
            let v = if i % 2 == 0 { 1.0f32 } else { -1.0 };
            // SAFETY: i < samples_per_block, inside the slot (see produce). The consumer may
            // be copying these samples now: it validates its copy against the checksum.
            unsafe { std::ptr::write_volatile(slot.add(STATE_BYTES).cast::<f32>().add(i), v) };
        }
    }

    /// TEST-ONLY (the worker's fault switch): the mapping, for a worker that tries to punch a
    /// hole into it.
    pub fn test_mapping(&self) -> (*mut u8, usize) {
        (self.map.ptr(), self.map.len())
    }

    /// Worker: status fields the supervisor reads.
    pub fn set_status(&self, pid: u32, realtime: bool, sandboxed: bool) {
        let s = &self.header().status.0;
        s.pid.store(pid, Ordering::Relaxed);
        s.realtime.store(realtime as u32, Ordering::Relaxed);
        s.sandboxed.store(sandboxed as u32, Ordering::Relaxed);
        s.ready.store(1, Ordering::Release);
    }

    /// The worker runs under its seccomp filter (untrusted: reported, never relied on).
    pub fn worker_sandboxed(&self) -> bool {
        self.header().status.0.sandboxed.load(Ordering::Relaxed) == 1
    }

    pub fn set_control_stats(&self, late: u64, duplicates: u64) {
        let s = &self.header().status.0;
        s.late.store(late, Ordering::Relaxed);
        s.duplicates.store(duplicates, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.header().status.0.ready.load(Ordering::Acquire) == 1
    }

    pub fn worker_realtime(&self) -> bool {
        self.header().status.0.realtime.load(Ordering::Relaxed) == 1
    }

    /// (late, duplicates) as last reported by the worker (untrusted: counters only).
    pub fn control_stats(&self) -> (u64, u64) {
        let s = &self.header().status.0;
        (s.late.load(Ordering::Relaxed), s.duplicates.load(Ordering::Relaxed))
    }

    // ---- consumer (supervisor) ---------------------------------------------------------

    /// Is `block` inside the window of committed, not yet recyclable blocks for write index
    /// `w` (untrusted: any value)? Written so that no value of `w` can overflow.
    fn in_window(&self, block: u64, w: u64) -> bool {
        block < w && w - block <= self.geo.slots as u64
    }

    /// Reads the state committed with `block`, if the ring holds a valid block `block`.
    /// Untrusted memory: the state must carry the expected frame and pass its checksum.
    pub fn committed_state(&self, block: u64) -> Option<EngineState> {
        if !self.in_window(block, self.write_index()) {
            return None;
        }
        // SAFETY: the slot lies inside the mapping; a volatile read of plain data from memory
        // another process may be writing yields some bit pattern, which we validate below.
        let state = unsafe { std::ptr::read_volatile(self.slot_ptr(block).cast::<EngineState>()) };
        let expected_end = block.checked_add(1)?.checked_mul(self.geo.block_frames as u64)?;
        if state.frame != expected_end || !state.is_valid(self.geo.sample_rate) {
            return None;
        }
        // The writer may recycle a slot once read_index has passed it, and writes the state
        // last, so a recycled slot shows another frame or fails the checksum (rejected above);
        // the window re-check catches a recycle that completed while we read. (The output
        // thread reads only block == read_index, which is never recycled under it.)
        self.in_window(block, self.write_index()).then_some(state)
    }

    /// Output thread: copies block `block` into `out` if this ring holds a valid one.
    /// Real-time safe: no allocation, no lock, no syscall. The copy must match the samples'
    /// checksum sealed in the block's state (a stray write into a published block is
    /// rejected, never played), and samples are sanitised (NaN to 0, clamped to [-1, 1]) so
    /// nothing a dying worker leaves can reach the speaker as noise.
    pub fn read_block(&self, block: u64, out: &mut [f32]) -> Option<EngineState> {
        let state = self.committed_state(block)?;
        let n = self.geo.samples_per_block();
        let out = out.get_mut(..n)?;
        let src = self.slot_ptr(block);
        // SAFETY: the slot holds samples_per_block f32s after the state (see produce), and
        // `out` holds exactly that many; a concurrent write by the worker can only change the
        // values copied, which the checksum below catches.
        unsafe { std::ptr::copy_nonoverlapping(src.add(STATE_BYTES).cast::<f32>(), out.as_mut_ptr(), n) };
        if crate::engine::samples_check(out) != state.samples_check {
            return None;
        }
        for s in out.iter_mut() {
            *s = if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) };
        }
        // The state is re-validated after the copy: a torn block is rejected as a whole.
        (self.committed_state(block) == Some(state)).then_some(state)
    }

    /// Supervisor: some block the ring holds from `from` on (committed, inside its window) is
    /// not valid: a bad state, or samples that no longer match their sealed checksum (the
    /// worker corrupted a block it had published). Reads the samples in place, no copy. The
    /// caller must make sure no slot looked at could be recycled meanwhile (the output had not
    /// passed `from` before and after the call, as for the output thread itself), or a
    /// recycled slot reads as invalid. Real-time safe (loads and arithmetic only).
    pub fn holds_any_invalid(&self, from: u64) -> bool {
        let w = self.write_index();
        (from..w.min(from.saturating_add(self.geo.slots as u64))).any(|b| self.holds_invalid(b))
    }

    /// Supervisor: the ring holds block `block` (committed, inside its window) and it is not
    /// valid (see [`AudioRing::holds_any_invalid`] for the caller's duty).
    pub fn holds_invalid(&self, block: u64) -> bool {
        if !self.in_window(block, self.write_index()) {
            return false;
        }
        self.committed_state(block).is_none_or(|state| !self.samples_intact(block, &state))
    }

    /// Do block `block`'s samples still match the checksum sealed in its `state`? Reads them
    /// in place (volatile: worker-writable memory), no copy, no allocation.
    fn samples_intact(&self, block: u64, state: &EngineState) -> bool {
        let samples = self.slot_ptr(block).wrapping_add(STATE_BYTES).cast::<f32>();
        let mut chunk = [0.0f32; 64];
        let mut h = crate::engine::SamplesCheck::new();
        let n = self.geo.samples_per_block();
        let mut i = 0;
        while i < n {
            let k = (n - i).min(chunk.len());
            for (j, c) in chunk[..k].iter_mut().enumerate() {
                // SAFETY: i + j < samples_per_block, inside the slot (see produce); a volatile
                // read of worker-writable memory yields some bit pattern, checked below.
                *c = unsafe { std::ptr::read_volatile(samples.add(i + j)) };
            }
            h.add(&chunk[..k]);
            i += k;
        }
        h.finish() == state.samples_check
    }

    /// Where a successor continues when this ring's worker died with the output at block
    /// `pos`: the end of the unbroken run of valid blocks starting at `pos` (so no garbage
    /// block is ever skipped over, which would leave a hole no ring can fill), but not past
    /// block `limit`, or, if the ring holds nothing at `pos`, its newest valid state. (A
    /// successor that starts before the end renders the rest again, bit-identical: it can
    /// start at once, where a full ring's end is a whole ring ahead, with no room for it until
    /// the output moves on.)
    pub fn handoff_state(&self, pos: u64, limit: u64) -> Option<(u64, EngineState)> {
        let w = self.write_index();
        if self.in_window(pos, w) {
            let mut end = None;
            // A block whose samples no longer match their checksum cannot be played either:
            // the run ends before it, so that a successor renders it again.
            for b in pos..w.min(limit.max(pos)) {
                match self.committed_state(b).filter(|s| self.samples_intact(b, s)) {
                    Some(s) => end = Some((b + 1, s)),
                    None => break,
                }
            }
            // Block `pos` itself is bad: continue from the end of the block before it.
            return end.or_else(|| pos.checked_sub(1).and_then(|p| self.committed_state(p)).map(|s| (pos, s)));
        }
        self.last_valid_state(0)
    }

    /// Does the ring hold any valid committed block at or after block `from` (something the
    /// output may still need)?
    pub fn holds_valid_from(&self, from: u64) -> bool {
        self.last_valid_state(from).is_some()
    }

    /// The newest valid committed state at or after block `min_block`, walking back over
    /// garbage: what a standby continues from when this ring's worker died.
    pub fn last_valid_state(&self, min_block: u64) -> Option<(u64, EngineState)> {
        let w = self.write_index();
        let lo = w.saturating_sub(self.geo.slots as u64).max(min_block);
        (lo..w).rev().find_map(|b| self.committed_state(b).map(|s| (b + 1, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ramp_frames, Engine};

    fn ring() -> (tempfile::NamedTempFile, AudioRing, RingGeometry) {
        let geo = RingGeometry { block_frames: 64, slots: 4, sample_rate: 48_000 };
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(geo.segment_size()).unwrap();
        let r = AudioRing::create(f.as_file(), geo).unwrap();
        (f, r, geo)
    }

    /// Renders blocks `0..n` into the ring through `w`, corrupting the state of block `bad`.
    fn fill(w: &AudioRing, n: u64, bad: Option<u64>) {
        let mut e = Engine::new(48_000, EngineState::initial(440.0, 0.5, ramp_frames(48_000)));
        for b in 0..n {
            assert!(w.space() > 0);
            w.produce(b, |s| {
                e.render(s);
                let mut st = *e.state();
                if Some(b) == bad {
                    st.check ^= 1;
                }
                st
            });
        }
    }

    #[test]
    fn produce_then_read_round_trips_and_respects_space() {
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, None);
        assert_eq!(w.space(), 0);
        let mut out = vec![0.0; geo.samples_per_block()];
        let st = r.read_block(0, &mut out).unwrap();
        assert_eq!(st.frame, 64);
        assert!(r.read_block(4, &mut out).is_none());
        r.set_read_index(1);
        assert_eq!(w.space(), 1);
        assert_eq!(r.last_valid_state(0).unwrap().0, 4);
        assert_eq!(r.handoff_state(1, u64::MAX).unwrap().0, 4);
    }

    #[test]
    fn handoff_stops_before_a_garbage_block() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, Some(2)); // block 2 is garbage
                              // Newest valid is block 3, but a successor must continue after block 1.
        assert_eq!(r.last_valid_state(0).unwrap().0, 4);
        assert_eq!(r.handoff_state(0, u64::MAX).unwrap().0, 2);
        assert_eq!(r.handoff_state(2, u64::MAX).unwrap().0, 2, "pos itself bad: continue from pos-1's end");
    }

    #[test]
    fn handoff_stops_at_the_limit_with_the_state_committed_there() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, None);
        let (base, state) = r.handoff_state(0, 2).unwrap();
        assert_eq!(base, 2, "a successor continues at the limit, not at the run's end (4)");
        assert_eq!(state.frame, r.committed_state(1).unwrap().frame, "with the state at the end of block 1");
        assert_eq!(r.handoff_state(0, 9).unwrap().0, 4, "a limit past the run changes nothing");
    }

    #[test]
    fn garbage_is_rejected() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        w.produce(0, |s| {
            s.fill(f32::NAN);
            let mut st = EngineState::initial(440.0, 0.5, 240);
            st.frame = 64;
            st.freq = -1.0; // out of range
            st.seal();
            st
        });
        assert!(r.committed_state(0).is_none());
        // A write index far beyond the window is garbage too.
        r.header().write_index.0.store(1 << 40, Ordering::Release);
        assert!(r.committed_state(3).is_none());
        assert!(r.last_valid_state(0).is_none());
    }

    /// A worker started ahead of the output (command_run at a base beyond the output's
    /// position) holds nothing at the position yet, but its blocks further on must stay
    /// playable: the ring still holds valid blocks from there.
    #[test]
    fn a_ring_started_ahead_of_the_output_still_holds_what_comes_later() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        let mut e = Engine::new(48_000, EngineState::initial(440.0, 0.5, ramp_frames(48_000)));
        let mut scratch = vec![0.0; 128];
        for _ in 0..10 {
            e.render(&mut scratch); // the state at the end of block 9
        }
        r.command_run(10, e.state(), 8);
        for b in 10..12 {
            w.produce(b, |s| {
                e.render(s);
                *e.state()
            });
        }
        assert!(r.committed_state(8).is_none(), "nothing at the output's position");
        assert!(r.holds_valid_from(8), "but blocks 10 and 11 are still to play");
        assert!(r.holds_valid_from(11));
        assert!(!r.holds_valid_from(12), "drained once the output is past them");
    }

    /// Indices a broken worker can write, at the edges of u64: nothing the supervisor
    /// computes from them may overflow (this test panics in a debug build if it does; CI runs
    /// the unit tests in one).
    #[test]
    fn garbage_indices_never_overflow() {
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, None);
        let mut out = vec![0.0; geo.samples_per_block()];
        for write in [u64::MAX, u64::MAX - 1, u64::MAX - 3, 1 << 63, 0] {
            for read in [u64::MAX, u64::MAX - 2, 0, 3] {
                r.header().write_index.0.store(write, Ordering::Release);
                r.header().read_index.0.store(read, Ordering::Release);
                for pos in [0, 3, u64::MAX - 4, u64::MAX - 1, u64::MAX] {
                    let _ = r.committed_state(pos);
                    let _ = r.read_block(pos, &mut out);
                    let _ = r.handoff_state(pos, u64::MAX);
                    let _ = r.last_valid_state(pos);
                    let _ = r.holds_invalid(pos);
                    let _ = r.space_at(pos);
                }
                let _ = w.space();
            }
        }
        // Whatever the worker wrote, the supervisor's own position decides the room.
        r.header().write_index.0.store(4, Ordering::Release);
        r.header().read_index.0.store(u64::MAX, Ordering::Release);
        assert_eq!(r.space_at(2), 2);
        assert_eq!(r.space_at(0), 0);
    }

    /// A stray write into a published block's samples (its state intact) makes the block
    /// invalid: never played, and a successor renders it again.
    #[test]
    fn a_stray_write_into_published_samples_is_caught() {
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, None);
        let mut out = vec![0.0; geo.samples_per_block()];
        assert!(r.read_block(2, &mut out).is_some() && !r.holds_invalid(2));
        w.test_scribble_samples(2);
        assert!(r.committed_state(2).is_some(), "the state alone still checks out");
        assert!(r.read_block(2, &mut out).is_none(), "scribbled samples must not play");
        assert!(r.holds_invalid(2));
        assert!(!r.holds_invalid(1) && !r.holds_invalid(3));
        assert_eq!(r.handoff_state(0, u64::MAX).unwrap().0, 2, "the run of playable blocks ends before block 2");
    }

    #[test]
    fn attach_rejects_foreign_segments() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        assert!(AudioRing::attach(f.as_file()).is_err());
    }
}
