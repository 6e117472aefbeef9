//! The per-worker audio ring: single producer (the worker's render loop), single consumer (the
//! supervisor's output thread), in one shared-memory segment.
//!
//! ```text
//! header (cache-line separated fields)          slots[block % slots]
//!   geometry (written once by the supervisor)     tag: block, version, frozen
//!   command + handoff   supervisor -> worker      half 0: EngineState, BlockMeta, samples
//!   read_index          output thread -> worker   half 1: EngineState, BlockMeta, samples
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
//! lets it reuse those slots. A slot is recycled only once `read_index` has passed it.
//!
//! Rewrites (issue 15): a worker may replace a block it has committed, as long as the output
//! has not frozen it. The write index never moves backwards, so the heartbeat, the room
//! computation and batching do not see rewrites at all.
//! - The slot's tag says which block it holds, which version of it (a rewrite adds one; the
//!   version's parity is the half that holds it) and whether the output has frozen it.
//! - A rewrite renders into the other half and publishes it with a compare-and-swap of the
//!   tag, which fails once the slot is frozen. Until then the old version stays playable.
//! - The output freezes block `pos` (an atomic OR) in every rendering worker's ring before it
//!   copies one: from then on no worker can replace it. A ring that does not hold `pos` yet
//!   gets a frozen tombstone for it, so the block is born frozen when it comes. (A dead
//!   worker's ring is not frozen: tombstones would erase the blocks it still holds.)
//! - Every reader is a seqlock reader: it reads the tag, the half, and the tag again, and a
//!   change means "moved", never "invalid". The version (15 bits) keeps a slot rewritten
//!   twice under a slow reader (back in the same half) from reading as unchanged.
//!
//! Each version also says what its worker knew when it rendered it ([`BlockMeta`]): the
//! newest control sequence it had received, and the check of the state it started from. The
//! output plays a block that lacks a change stamped inside it only if no ring has a fresh one,
//! and prefers a block that continues what it played (see `output::Player`).

use std::cell::UnsafeCell;
use std::fs::File;
use std::io;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

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
    /// Every control message up to this sequence is in `state` or in the control ring.
    known_seq: u64,
}

#[repr(C)]
struct Status {
    ready: AtomicU32,
    realtime: AtomicU32,
    pid: AtomicU32,
    sandboxed: AtomicU32,
    late: AtomicU64,
    duplicates: AtomicU64,
    /// The worker's [`RewindStats`].
    rewinds: [AtomicU64; 5],
}

/// What a worker's rewrites of its ring did, since it started (reported in the ring's
/// status; untrusted: counters only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewindStats {
    /// Catch-ups: times the worker went back to render committed blocks again.
    pub rewinds: u64,
    /// Blocks replaced by a new version.
    pub rewritten: u64,
    /// Blocks whose rewrite was refused (the output had frozen them): they play as they were.
    pub refused: u64,
    /// Catch-ups or resyncs not possible (the start state or a message applied since is no
    /// longer known, or the pending queue had no room): the change applies late instead.
    pub failed: u64,
    /// Times it continued from the block the output played instead of its own.
    pub resyncs: u64,
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
    /// Output -> worker: continue from another ring's block (see [`AudioRing::request_resync`]).
    resync_seq: Line<AtomicU64>,
    resync: Line<UnsafeCell<Resync>>,
}

/// The block the output played instead of this ring's, and the state it ended in.
#[repr(C)]
#[derive(Clone, Copy)]
struct Resync {
    base: u64,
    state: EngineState,
}

#[repr(C)]
struct Header {
    geometry: Line<Geometry>,
    live: Live,
}

const STATE_BYTES: usize = std::mem::size_of::<EngineState>();
const META_BYTES: usize = std::mem::size_of::<SealedMeta>();

/// What a worker knew when it rendered a version of a block (issue 15): the output's
/// freshness and continuity checks read it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockMeta {
    /// The newest control sequence number the worker had received: every change stamped
    /// inside the block with a sequence up to this one is rendered in it.
    pub known_seq: u64,
    /// [`EngineState::check`] of the state the block started from: the block continues a
    /// stream whose previous block ended in that state.
    pub start_check: u64,
}

/// A [`BlockMeta`] as stored after its state, sealed to it (worker memory is untrusted: a
/// torn or garbage one fails the check).
#[repr(C)]
#[derive(Clone, Copy)]
struct SealedMeta {
    known_seq: u64,
    start_check: u64,
    check: u64,
}

impl SealedMeta {
    fn seal(meta: BlockMeta, state: &EngineState) -> SealedMeta {
        SealedMeta { known_seq: meta.known_seq, start_check: meta.start_check, check: meta_check(meta, state) }
    }

    fn open(self, state: &EngineState) -> Option<BlockMeta> {
        let meta = BlockMeta { known_seq: self.known_seq, start_check: self.start_check };
        (self.check == meta_check(meta, state)).then_some(meta)
    }
}

/// FNV-1a over the meta and the state's own check.
fn meta_check(meta: BlockMeta, state: &EngineState) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in [meta.known_seq, meta.start_check, state.check] {
        h ^= w;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A committed block as a reader found it: its end state and what its worker knew.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Committed {
    pub state: EngineState,
    pub meta: BlockMeta,
}

/// The first cache line of every slot holds its tag; the two halves follow.
const TAG_BYTES: usize = 64;
const FROZEN: u64 = 1;
const VERSION_MASK: u64 = (1 << 15) - 1;
const BLOCK_SHIFT: u32 = 16;
const BLOCK_MASK: u64 = (1 << (64 - BLOCK_SHIFT)) - 1;
/// How often the output retries freezing a slot whose tag keeps changing under it: a worker
/// changes a tag at most once per block it renders, so a tag that changes more often than
/// this belongs to a broken worker, whose block is then not played.
const FREEZE_TRIES: usize = 8;

/// A slot's tag word: `block (48 bits) << 16 | version (15 bits) << 1 | frozen`. Block
/// numbers are compared modulo 2^48 (at 64 frames and 48 kHz, that wraps after 186 000
/// years); the state's frame field tells the blocks apart exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag(u64);

impl Tag {
    fn new(block: u64, version: u64, frozen: bool) -> Tag {
        Tag(((block & BLOCK_MASK) << BLOCK_SHIFT) | ((version & VERSION_MASK) << 1) | frozen as u64)
    }

    fn names(self, block: u64) -> bool {
        self.0 >> BLOCK_SHIFT == block & BLOCK_MASK
    }

    fn version(self) -> u64 {
        (self.0 >> 1) & VERSION_MASK
    }

    /// The half holding this version.
    fn half(self) -> usize {
        (self.version() & 1) as usize
    }

    fn frozen(self) -> bool {
        self.0 & FROZEN != 0
    }

    /// The first version after this one that lives in `half`.
    fn next_version_in(self, half: usize) -> u64 {
        let v = self.version() + 1;
        v + ((v & 1) as usize != half) as u64
    }
}

/// What a look at a committed block found.
enum Found {
    Playable(Committed),
    Invalid,
    /// Rewritten or recycled while we looked: no verdict.
    Moved,
}

/// Why a rewrite did not replace a block (the old version stays, and plays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteRefused {
    /// The output had frozen the block (or the ring no longer holds it): nothing was rendered.
    Frozen,
    /// The output froze the block while the new version was being rendered: `render` ran, but
    /// its result was dropped.
    FrozenWhileRendering,
}

/// Geometry of a ring. The supervisor keeps its own copy and never re-reads it from shared
/// memory, which a worker could have scribbled over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingGeometry {
    pub block_frames: u32,
    pub slots: u32,
    pub sample_rate: u32,
}

impl RingGeometry {
    fn half_stride(&self) -> usize {
        cache_align(STATE_BYTES + META_BYTES + self.block_frames as usize * CHANNELS * 4)
    }

    fn slot_stride(&self) -> usize {
        TAG_BYTES + 2 * self.half_stride()
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

    /// The tag of block `block`'s slot.
    fn tag(&self, block: u64) -> &AtomicU64 {
        // SAFETY: the slot starts with TAG_BYTES bytes inside the mapping (see slot_ptr),
        // 64-aligned (header size and stride are multiples of 64), and lives as long as
        // `self`; an atomic may be shared with the other process.
        unsafe { &*self.slot_ptr(block).cast::<AtomicU64>() }
    }

    /// Start of half `half` (0 or 1) of block `block`'s slot: its state, then its samples.
    fn half_ptr(&self, block: u64, half: usize) -> *mut u8 {
        // Inside the slot: TAG_BYTES + 2 * half_stride is its stride (wrapping_add: no unsafe
        // needed to compute an address; the users' SAFETY comments cover the accesses).
        self.slot_ptr(block).wrapping_add(TAG_BYTES + (half & 1) * self.geo.half_stride())
    }

    fn meta_ptr(&self, block: u64, half: usize) -> *mut SealedMeta {
        self.half_ptr(block, half).wrapping_add(STATE_BYTES).cast::<SealedMeta>()
    }

    fn samples_ptr(&self, block: u64, half: usize) -> *mut f32 {
        self.half_ptr(block, half).wrapping_add(STATE_BYTES + META_BYTES).cast::<f32>()
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
    /// `known_seq`: every control message up to it is in `state` or already in its control ring.
    pub fn command_run(&self, base: u64, state: &EngineState, known_seq: u64, read_index: u64) {
        let h = self.header();
        // SAFETY: the worker reads the handoff only after observing the new command below
        // (Acquire pairs with this Release), and it is idle now, so nobody reads concurrently.
        unsafe { std::ptr::write_volatile(h.handoff.0.get(), Handoff { base, state: *state, known_seq }) };
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

    /// Output thread: this ring's frozen block `base - 1` differs from the one played (its
    /// worker rendered a change late, or missed one another ring had): its worker is to
    /// continue from the played `state` at block `base`, rendering again what it holds from
    /// there. A seqlock (odd while written); the output thread is the only writer. Real-time
    /// safe: a few stores.
    pub fn request_resync(&self, base: u64, state: &EngineState) {
        let h = self.header();
        // Worker memory: any value; wrapping, never an overflow.
        let seq = h.resync_seq.0.load(Ordering::Relaxed);
        h.resync_seq.0.store(seq | 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        // SAFETY: only the output thread writes here; a worker reading meanwhile sees an odd
        // or changed sequence number and ignores what it read.
        unsafe { std::ptr::write_volatile(h.resync.0.get(), Resync { base, state: *state }) };
        h.resync_seq.0.store((seq | 1).wrapping_add(1), Ordering::Release);
    }

    /// Worker: the newest resync request, if newer than `seen` (updated): (base, state).
    pub fn take_resync(&self, seen: &mut u64) -> Option<(u64, EngineState)> {
        let h = self.header();
        let s0 = h.resync_seq.0.load(Ordering::Acquire);
        if s0 == *seen || s0 % 2 == 1 {
            return None;
        }
        // SAFETY: a plain copy of a repr(C) struct of integers and floats; a torn copy is
        // discarded below (the sequence number changed), never used.
        let r = unsafe { std::ptr::read_volatile(h.resync.0.get()) };
        std::sync::atomic::fence(Ordering::Acquire);
        if h.resync_seq.0.load(Ordering::Relaxed) != s0 {
            return None; // being rewritten: the next wake-up reads the new one
        }
        *seen = s0;
        Some((r.base, r.state))
    }

    /// Worker: the handoff written with the last run command: (base, state, known_seq).
    pub fn handoff(&self) -> (u64, EngineState, u64) {
        // SAFETY: read after an Acquire load of `command` that saw the supervisor's Release;
        // the supervisor does not write the handoff while we run.
        let h = unsafe { std::ptr::read_volatile(self.header().handoff.0.get()) };
        (h.base, h.state, h.known_seq)
    }

    // ---- producer (worker) -------------------------------------------------------------

    /// Worker: renders block `block` into its slot through `render` and publishes it, with
    /// what the worker knew (`meta`). The caller guarantees `block == write_index()` and
    /// `space() > 0`.
    pub fn produce(&self, block: u64, meta: BlockMeta, render: impl FnOnce(&mut [f32]) -> EngineState) {
        let tag = self.tag(block);
        let before = Tag(tag.load(Ordering::Acquire));
        // A new block goes into half 0, unless the tag already names it: a tombstone (the
        // output froze the block before this ring had it) or this ring's earlier run. Then it
        // takes the other half, so that nobody reading the named version reads a torn one.
        let half = if before.names(block) { before.half() ^ 1 } else { 0 };
        self.render_into(block, half, meta, render);
        // Publish with a CAS: the output may tombstone the slot meanwhile, and a block the
        // output has frozen stays frozen. The output changes a tag at most once per block.
        let mut seen = before;
        loop {
            let next = if seen.names(block) {
                Tag::new(block, seen.next_version_in(half), seen.frozen())
            } else {
                Tag::new(block, half as u64, false)
            };
            match tag.compare_exchange(seen.0, next.0, Ordering::Release, Ordering::Acquire) {
                Ok(_) => break,
                Err(now) => seen = Tag(now),
            }
        }
        // Release: publishes the samples, the state and the tag written above.
        self.header().write_index.0.store(block + 1, Ordering::Release);
    }

    /// Worker: replaces committed block `block` with a new rendering through `render`, unless
    /// the output has frozen it. The old version stays playable until the new one is
    /// published, and a frozen block is never replaced (the output may be copying it).
    pub fn rewrite(
        &self,
        block: u64,
        meta: BlockMeta,
        render: impl FnOnce(&mut [f32]) -> EngineState,
    ) -> Result<(), RewriteRefused> {
        let tag = self.tag(block);
        let current = Tag(tag.load(Ordering::Acquire));
        if !current.names(block) || current.frozen() || !self.in_window(block, self.write_index()) {
            return Err(RewriteRefused::Frozen);
        }
        // Nobody reads the other half: readers follow the tag, which names this one.
        let half = current.half() ^ 1;
        self.render_into(block, half, meta, render);
        let next = Tag::new(block, current.version() + 1, false);
        tag.compare_exchange(current.0, next.0, Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
            .map_err(|_| RewriteRefused::FrozenWhileRendering)
    }

    /// Renders into half `half` of block `block`'s slot; the caller has made sure no reader
    /// follows a tag to that half (see produce and rewrite).
    fn render_into(&self, block: u64, half: usize, meta: BlockMeta, render: impl FnOnce(&mut [f32]) -> EngineState) {
        // A reader still in this half under an older version must see that version's tag
        // change if it sees any of the writes below (pairs with the fence in `unchanged`).
        fence(Ordering::Release);
        // SAFETY: the half holds STATE_BYTES + samples_per_block f32s inside the slot,
        // f32-aligned (stride, header and halves are 64-aligned); no reader follows a tag to
        // it (the caller's duty), so we are its only user.
        let samples =
            unsafe { std::slice::from_raw_parts_mut(self.samples_ptr(block, half), self.geo.samples_per_block()) };
        let state = render(samples);
        // SAFETY: as above; EngineState and SealedMeta are plain data, the half starts
        // 64-aligned and the meta follows the state (u64 fields, 8-aligned).
        unsafe {
            std::ptr::write_volatile(self.half_ptr(block, half).cast::<EngineState>(), state);
            std::ptr::write_volatile(self.meta_ptr(block, half), SealedMeta::seal(meta, &state));
        }
    }

    /// TEST-ONLY (the worker's fault switch): overwrites the samples of published block
    /// `block` with full-scale noise, leaving its state as it was: a stray write into memory
    /// the output may be about to play.
    pub fn test_scribble_samples(&self, block: u64) {
        let samples = self.samples_ptr(block, Tag(self.tag(block).load(Ordering::Acquire)).half());
        for i in 0..self.geo.samples_per_block() {
            let v = if i % 2 == 0 { 1.0f32 } else { -1.0 };
            // SAFETY: i < samples_per_block, inside the half (see render_into). The consumer
            // may be copying these samples now: it validates its copy against the checksum.
            unsafe { std::ptr::write_volatile(samples.add(i), v) };
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

    pub fn set_control_stats(&self, late: u64, duplicates: u64, r: &RewindStats) {
        let s = &self.header().status.0;
        s.late.store(late, Ordering::Relaxed);
        s.duplicates.store(duplicates, Ordering::Relaxed);
        for (to, v) in s.rewinds.iter().zip([r.rewinds, r.rewritten, r.refused, r.failed, r.resyncs]) {
            to.store(v, Ordering::Relaxed);
        }
    }

    /// The worker's rewind counters as last reported (untrusted: counters only).
    pub fn rewind_stats(&self) -> RewindStats {
        let v = self.header().status.0.rewinds.each_ref().map(|a| a.load(Ordering::Relaxed));
        RewindStats { rewinds: v[0], rewritten: v[1], refused: v[2], failed: v[3], resyncs: v[4] }
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

    /// A first look at block `block`: the tag of its slot, if it names the block, and the
    /// state of the half it names, if valid for the block (frame and checksum). The caller
    /// must then see the tag unchanged ([`AudioRing::unchanged`]) before it trusts what it read.
    /// Untrusted memory: any bit pattern is rejected or validated here.
    fn look(&self, block: u64) -> Option<(Tag, Committed)> {
        if !self.in_window(block, self.write_index()) {
            return None;
        }
        let tag = Tag(self.tag(block).load(Ordering::Acquire));
        if !tag.names(block) {
            return None;
        }
        // SAFETY: the half lies inside the mapping (see half_ptr); a volatile read of plain
        // data from memory another process may be writing yields some bit pattern, which we
        // validate below.
        let (state, sealed) = unsafe {
            (
                std::ptr::read_volatile(self.half_ptr(block, tag.half()).cast::<EngineState>()),
                std::ptr::read_volatile(self.meta_ptr(block, tag.half())),
            )
        };
        let expected_end = block.checked_add(1)?.checked_mul(self.geo.block_frames as u64)?;
        if state.frame != expected_end || !state.is_valid(self.geo.sample_rate) {
            return None;
        }
        Some((tag, Committed { state, meta: sealed.open(&state)? }))
    }

    /// After reading block `block` under `tag`: the slot still holds that version and the
    /// block is still inside the window, so what was read was not rewritten or recycled
    /// meanwhile (a seqlock reader's second look). A recycle still being written when we
    /// re-look is caught by the state's frame and the checksums, as before rewrites existed.
    fn unchanged(&self, block: u64, tag: Tag) -> bool {
        // The reads of the half happen before the tag's second load.
        fence(Ordering::Acquire);
        self.tag(block).load(Ordering::Relaxed) == tag.0 && self.in_window(block, self.write_index())
    }

    /// Block `block` as this ring holds it now: playable (a valid state, samples matching its
    /// checksum, all of one version), invalid, or moved (rewritten or recycled while we
    /// looked: no verdict). Reads the samples in place, no copy, no allocation.
    fn inspect(&self, block: u64) -> Found {
        let tag = Tag(self.tag(block).load(Ordering::Acquire));
        let found = self.look(block).filter(|&(t, c)| t == tag && self.samples_intact(block, t.half(), &c.state));
        if !self.unchanged(block, tag) {
            return Found::Moved;
        }
        found.map_or(Found::Invalid, |(_, c)| Found::Playable(c))
    }

    /// Reads the state committed with `block`, if the ring holds a valid block `block`.
    /// Untrusted memory: the state must carry the expected frame and pass its checksum.
    pub fn committed_state(&self, block: u64) -> Option<EngineState> {
        self.peek(block).map(|c| c.state)
    }

    /// Block `block`'s end state and meta, if the ring holds a valid one (its samples are
    /// not read: see [`AudioRing::read_block`] for the copy that checks them). Real-time safe.
    pub fn peek(&self, block: u64) -> Option<Committed> {
        let (tag, committed) = self.look(block)?;
        self.unchanged(block, tag).then_some(committed)
    }

    /// Output thread: freezes block `block` in this ring, so that no worker can replace it
    /// from now on. A ring that does not hold the block yet gets a frozen tombstone naming
    /// it, so the block is born frozen when it comes. Called for every ring before the output
    /// copies the block from one of them. Real-time safe: a few atomic operations.
    pub fn freeze(&self, block: u64) {
        let _ = self.freeze_tag(block);
    }

    /// Whether the output has frozen block `block` here (its version here is final).
    pub fn is_frozen(&self, block: u64) -> bool {
        let seen = Tag(self.tag(block).load(Ordering::Acquire));
        seen.frozen() && seen.names(block)
    }

    /// [`AudioRing::freeze`], returning the frozen tag (None: it kept changing, a broken
    /// worker).
    fn freeze_tag(&self, block: u64) -> Option<Tag> {
        let tag = self.tag(block);
        let mut seen = Tag(tag.load(Ordering::Acquire));
        for _ in 0..FREEZE_TRIES {
            if seen.frozen() && seen.names(block) {
                return Some(seen);
            }
            // The slot holds an older block (all played) or garbage: a tombstone replaces it.
            let next = if seen.names(block) { Tag(seen.0 | FROZEN) } else { Tag::new(block, 1, true) };
            match tag.compare_exchange(seen.0, next.0, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(next),
                Err(now) => seen = Tag(now),
            }
        }
        None
    }

    /// Output thread: freezes block `block` and copies it into `out` if this ring holds a
    /// valid one. Real-time safe: no allocation, no lock, no syscall. The copy must match the
    /// samples' checksum sealed in the block's state (a stray write into a published block is
    /// rejected, never played), and samples are sanitised (NaN to 0, clamped to [-1, 1]) so
    /// nothing a dying worker leaves can reach the speaker as noise.
    pub fn read_block(&self, block: u64, out: &mut [f32]) -> Option<Committed> {
        let n = self.geo.samples_per_block();
        let out = out.get_mut(..n)?;
        // Acquire: if the ring holds the block, its tag is visible (produce publishes it first).
        if !self.in_window(block, self.write_index()) {
            return None;
        }
        let frozen = self.freeze_tag(block)?;
        // A frozen tag never changes again, unless the worker is broken.
        let (tag, committed) = self.look(block).filter(|&(t, _)| t == frozen)?;
        // SAFETY: the half holds samples_per_block f32s after its state (see render_into),
        // and `out` holds exactly that many; a write by the worker can only change the values
        // copied, which the checksum below catches.
        unsafe { std::ptr::copy_nonoverlapping(self.samples_ptr(block, tag.half()), out.as_mut_ptr(), n) };
        if crate::engine::samples_check(out) != committed.state.samples_check || !self.unchanged(block, tag) {
            return None;
        }
        for s in out.iter_mut() {
            *s = if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) };
        }
        Some(committed)
    }

    /// Supervisor: some block the ring holds from `from` on (committed, inside its window) is
    /// not valid: a bad state, or samples that no longer match their sealed checksum (the
    /// worker corrupted a block it had published). A block rewritten while we looked is not
    /// counted. The caller must make sure no slot looked at could be recycled meanwhile (the
    /// output had not passed `from` before and after the call, as for the output thread
    /// itself). Real-time safe (loads and arithmetic only).
    pub fn holds_any_invalid(&self, from: u64) -> bool {
        let w = self.write_index();
        (from..w.min(from.saturating_add(self.geo.slots as u64))).any(|b| self.holds_invalid(b))
    }

    /// Supervisor: the ring holds block `block` (committed, inside its window) and it is not
    /// valid (see [`AudioRing::holds_any_invalid`] for the caller's duty).
    pub fn holds_invalid(&self, block: u64) -> bool {
        self.in_window(block, self.write_index()) && matches!(self.inspect(block), Found::Invalid)
    }

    /// Do block `block`'s samples in half `half` still match the checksum sealed in its
    /// `state`? Reads them in place (volatile: worker-writable memory), no copy.
    fn samples_intact(&self, block: u64, half: usize, state: &EngineState) -> bool {
        let samples = self.samples_ptr(block, half);
        let mut chunk = [0.0f32; 64];
        let mut h = crate::engine::SamplesCheck::new();
        let n = self.geo.samples_per_block();
        let mut i = 0;
        while i < n {
            let k = (n - i).min(chunk.len());
            for (j, c) in chunk[..k].iter_mut().enumerate() {
                // SAFETY: i + j < samples_per_block, inside the half (see render_into); a
                // volatile read of worker-writable memory yields some bit pattern, checked below.
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
    /// the output moves on.) The run also ends before a block `usable` refuses (one that
    /// lacks a change stamped inside it: a stale block never becomes a handoff state) and
    /// before one that does not continue the block before it.
    pub fn handoff_state(
        &self,
        pos: u64,
        limit: u64,
        usable: impl Fn(u64, &Committed) -> bool,
    ) -> Option<(u64, EngineState)> {
        let w = self.write_index();
        if self.in_window(pos, w) {
            let mut end: Option<(u64, EngineState)> = None;
            // A block whose samples no longer match their checksum cannot be played either:
            // the run ends before it, so that a successor renders it again.
            for b in pos..w.min(limit.max(pos)) {
                match self.inspect(b) {
                    Found::Playable(c)
                        if usable(b, &c) && end.is_none_or(|(_, prev)| prev.check == c.meta.start_check) =>
                    {
                        end = Some((b + 1, c.state))
                    }
                    _ => break,
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
        self.last_state_where(min_block, |_, _| true)
    }

    /// [`AudioRing::last_valid_state`] of the newest block `usable` accepts.
    pub fn last_state_where(
        &self,
        min_block: u64,
        usable: impl Fn(u64, &Committed) -> bool,
    ) -> Option<(u64, EngineState)> {
        let w = self.write_index();
        let lo = w.saturating_sub(self.geo.slots as u64).max(min_block);
        (lo..w).rev().find_map(|b| self.peek(b).filter(|c| usable(b, c)).map(|c| (b + 1, c.state)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ramp_frames, Engine};

    /// For blocks whose continuity a test does not look at.
    const NO_META: BlockMeta = BlockMeta { known_seq: 0, start_check: 0 };

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
            let meta = BlockMeta { known_seq: 0, start_check: e.state().check };
            w.produce(b, meta, |s| {
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
        assert_eq!(st.state.frame, 64);
        assert!(r.read_block(4, &mut out).is_none());
        r.set_read_index(1);
        assert_eq!(w.space(), 1);
        assert_eq!(r.last_valid_state(0).unwrap().0, 4);
        assert_eq!(r.handoff_state(1, u64::MAX, |_, _| true).unwrap().0, 4);
    }

    #[test]
    fn handoff_stops_before_a_garbage_block() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, Some(2)); // block 2 is garbage
                              // Newest valid is block 3, but a successor must continue after block 1.
        assert_eq!(r.last_valid_state(0).unwrap().0, 4);
        assert_eq!(r.handoff_state(0, u64::MAX, |_, _| true).unwrap().0, 2);
        assert_eq!(
            r.handoff_state(2, u64::MAX, |_, _| true).unwrap().0,
            2,
            "pos itself bad: continue from pos-1's end"
        );
    }

    #[test]
    fn handoff_stops_at_the_limit_with_the_state_committed_there() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        fill(&w, 4, None);
        let (base, state) = r.handoff_state(0, 2, |_, _| true).unwrap();
        assert_eq!(base, 2, "a successor continues at the limit, not at the run's end (4)");
        assert_eq!(state.frame, r.committed_state(1).unwrap().frame, "with the state at the end of block 1");
        assert_eq!(r.handoff_state(0, 9, |_, _| true).unwrap().0, 4, "a limit past the run changes nothing");
    }

    #[test]
    fn garbage_is_rejected() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        w.produce(0, NO_META, |s| {
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
        r.command_run(10, e.state(), 0, 8);
        for b in 10..12 {
            w.produce(b, NO_META, |s| {
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
                    let _ = r.handoff_state(pos, u64::MAX, |_, _| true);
                    let _ = r.last_valid_state(pos);
                    let _ = r.holds_invalid(pos);
                    let _ = r.space_at(pos);
                    r.freeze(pos);
                    let _ = w.rewrite(pos, NO_META, version_k(pos, 2));
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
        assert_eq!(
            r.handoff_state(0, u64::MAX, |_, _| true).unwrap().0,
            2,
            "the run of playable blocks ends before block 2"
        );
    }

    /// A block rendered as version `k` of block `block`: every sample is `k / 2^20`, and the
    /// state is valid for the block and sealed over those samples.
    fn version_k(block: u64, k: u32) -> impl FnOnce(&mut [f32]) -> EngineState {
        move |samples: &mut [f32]| {
            samples.fill(k as f32 / (1 << 20) as f32);
            let mut st = EngineState::initial(440.0, 0.5, 240);
            st.frame = block.wrapping_add(1).wrapping_mul(64);
            st.samples_check = crate::engine::samples_check(samples);
            st.seal();
            st
        }
    }

    /// Spins until `done`, failing the test (not hanging it) if the other thread died.
    fn spin_until(done: impl Fn() -> bool) {
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !done() {
            assert!(std::time::Instant::now() < give_up, "the other thread stopped");
            std::hint::spin_loop();
        }
    }

    /// Which version a played copy is (all its samples must agree: a torn copy fails here).
    fn version_of(out: &[f32]) -> u32 {
        let k = out[0] * (1 << 20) as f32;
        assert!(out.iter().all(|&s| s == out[0]), "a torn block was played");
        k as u32
    }

    #[test]
    fn a_rewrite_replaces_a_block_until_the_output_freezes_it() {
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        for b in 0..4 {
            w.produce(b, NO_META, version_k(b, 1));
        }
        assert_eq!(w.rewrite(2, NO_META, version_k(2, 2)), Ok(()));
        assert_eq!(w.rewrite(2, NO_META, version_k(2, 3)), Ok(()), "a second rewrite goes back to the first half");
        assert_eq!(w.write_index(), 4, "a rewrite never moves the write index");
        let mut out = vec![0.0; geo.samples_per_block()];
        r.read_block(2, &mut out).unwrap();
        assert_eq!(version_of(&out), 3, "the newest committed version plays");
        assert_eq!(
            w.rewrite(2, NO_META, version_k(2, 4)),
            Err(RewriteRefused::Frozen),
            "a block the output copied is final"
        );
        r.read_block(2, &mut out).unwrap();
        assert_eq!(version_of(&out), 3);
        // The other blocks are untouched, and still rewritable.
        assert_eq!(w.rewrite(3, NO_META, version_k(3, 5)), Ok(()));
        assert!(!r.holds_any_invalid(0));
    }

    #[test]
    fn the_old_version_stays_playable_while_its_rewrite_renders() {
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        for b in 0..4 {
            w.produce(b, chained(&w, b, 0), version_k(b, 1));
        }
        let mut out = vec![0.0; geo.samples_per_block()];
        // A monitor's look during the rewrite sees the old version, whole.
        let refused = w.rewrite(1, chained(&w, 1, 0), |samples| {
            assert!(!r.holds_invalid(1));
            assert_eq!(r.committed_state(1).unwrap().frame, 128);
            version_k(1, 2)(samples)
        });
        assert_eq!(refused, Ok(()));
        // The output freezes the block while its next rewrite renders: the old one plays and
        // the new one is dropped.
        let refused = w.rewrite(1, NO_META, |samples| {
            r.read_block(1, &mut out).unwrap();
            version_k(1, 3)(samples)
        });
        assert_eq!(refused, Err(RewriteRefused::FrozenWhileRendering));
        assert_eq!(version_of(&out), 2);
        r.read_block(1, &mut out).unwrap();
        assert_eq!(version_of(&out), 2, "the dropped version never shows");
        // Block 2 still continues version 1 of block 1 (its worker would rewrite it next).
        assert_eq!(r.handoff_state(1, u64::MAX, |_, _| true).unwrap().0, 2);
        w.rewrite(2, chained(&w, 2, 0), version_k(2, 2)).unwrap();
        w.rewrite(3, chained(&w, 3, 0), version_k(3, 2)).unwrap();
        assert_eq!(r.handoff_state(1, u64::MAX, |_, _| true).unwrap().0, 4);
    }

    /// The meta of a block `b` rendered after the version of block `b - 1` the ring holds.
    fn chained(w: &AudioRing, b: u64, known_seq: u64) -> BlockMeta {
        let start_check = b.checked_sub(1).and_then(|p| w.committed_state(p)).map_or(0, |s| s.check);
        BlockMeta { known_seq, start_check }
    }

    /// A handoff run is what the output could play in a row: it ends before a block that
    /// lacks a change stamped inside it (`usable` says which) and before one that does not
    /// continue the block before it; the meta itself is sealed to its block.
    #[test]
    fn a_handoff_run_ends_before_a_stale_or_discontinuous_block() {
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        for b in 0..4 {
            // Blocks 0 and 1 were rendered knowing seq 5, blocks 2 and 3 knowing seq 7.
            w.produce(b, chained(&w, b, if b < 2 { 5 } else { 7 }), version_k(b, 1));
        }
        assert_eq!(
            r.peek(2).unwrap().meta,
            BlockMeta { known_seq: 7, start_check: r.committed_state(1).unwrap().check }
        );
        assert_eq!(r.handoff_state(0, u64::MAX, |_, _| true).unwrap().0, 4);
        // Seq 6 is stamped inside block 1: blocks 0 (before it) and 2.. (knowing it) are fine.
        let needs_6_from_1 = |b: u64, c: &Committed| c.meta.known_seq >= if b >= 1 { 6 } else { 0 };
        assert_eq!(r.handoff_state(0, u64::MAX, needs_6_from_1).unwrap().0, 1, "block 1 is stale");
        // Block 2 rewritten from another state: block 3 no longer continues it.
        w.rewrite(2, BlockMeta { known_seq: 7, start_check: 12345 }, version_k(2, 2)).unwrap();
        assert_eq!(r.handoff_state(0, u64::MAX, |_, _| true).unwrap().0, 2, "block 2 does not continue block 1");
        assert_eq!(r.handoff_state(2, u64::MAX, |_, _| true).unwrap().0, 3, "block 3 does not continue block 2");
        // A meta that does not match its seal is garbage: the block is not valid.
        let sealed = r.meta_ptr(3, Tag(r.tag(3).load(Ordering::Acquire)).half());
        // SAFETY: the meta of block 3's current half, inside the mapping; no one else writes.
        unsafe { (*sealed).known_seq += 1 };
        assert!(r.peek(3).is_none() && r.holds_invalid(3));
    }

    /// The output looked for a block before this ring had it (a standby behind, a ring started
    /// ahead): the block is born frozen, and plays.
    #[test]
    fn a_block_frozen_before_the_ring_holds_it_is_born_frozen() {
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        for b in 0..4 {
            w.produce(b, NO_META, version_k(b, 1));
        }
        r.set_read_index(2);
        let mut out = vec![0.0; geo.samples_per_block()];
        // The output at block 4 freezes it in every ring, then finds none in this one (its
        // slot holds block 0).
        r.freeze(4);
        assert!(r.read_block(4, &mut out).is_none());
        r.freeze(5);
        w.produce(4, NO_META, version_k(4, 7));
        w.produce(5, NO_META, version_k(5, 8));
        assert_eq!(w.rewrite(4, NO_META, version_k(4, 9)), Err(RewriteRefused::Frozen), "born frozen");
        assert_eq!(w.rewrite(5, NO_META, version_k(5, 9)), Err(RewriteRefused::Frozen));
        r.read_block(4, &mut out).unwrap();
        assert_eq!(version_of(&out), 7);
        r.read_block(5, &mut out).unwrap();
        assert_eq!(version_of(&out), 8);
    }

    /// The race the freeze exists for, in two threads over two mappings (as between two
    /// processes): the worker rewrites block `b` as fast as it can while the output, after a
    /// random delay, freezes and copies it. The copy is never torn, it is exactly the last
    /// version whose rewrite succeeded, and no rewrite succeeds after the freeze.
    #[test]
    fn a_block_rewritten_under_the_output_plays_whole_and_exactly_the_last_version_committed() {
        use std::sync::atomic::AtomicBool;
        let (f, r, geo) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        let rounds = 3000u64;
        let (last_ok, round_done) = (AtomicU64::new(0), AtomicBool::new(false));
        let (mut refused_while_rendering, mut refused_frozen) = (0u64, 0u64);
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let (mut during, mut after) = (0, 0);
                for b in 0..rounds {
                    spin_until(|| w.space() > 0);
                    w.produce(b, NO_META, version_k(b, 1));
                    last_ok.store(1, Ordering::SeqCst);
                    let mut k = 2;
                    loop {
                        match w.rewrite(b, NO_META, version_k(b, k)) {
                            Ok(()) => {
                                assert!(k < 1 << 19, "block {b} was never frozen");
                                last_ok.store(k as u64, Ordering::SeqCst)
                            }
                            Err(e) => {
                                if e == RewriteRefused::FrozenWhileRendering {
                                    during += 1;
                                } else {
                                    after += 1;
                                }
                                // Frozen is final: every later attempt is refused too.
                                assert_eq!(w.rewrite(b, NO_META, version_k(b, k + 1)), Err(RewriteRefused::Frozen));
                                break;
                            }
                        }
                        k += 1;
                    }
                    round_done.store(true, Ordering::SeqCst);
                    spin_until(|| !round_done.load(Ordering::SeqCst));
                }
                (during, after)
            });
            let mut out = vec![0.0; geo.samples_per_block()];
            let mut seed = 0x2545_f491_4f6c_dd1du64;
            for b in 0..rounds {
                spin_until(|| r.write_index() > b);
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                for _ in 0..seed % 2000 {
                    std::hint::spin_loop();
                }
                let st = r.read_block(b, &mut out).expect("a block being rewritten still plays");
                assert_eq!(st.state.frame, (b + 1) * 64);
                let played = version_of(&out);
                spin_until(|| round_done.load(Ordering::SeqCst));
                assert_eq!(played as u64, last_ok.load(Ordering::SeqCst), "block {b}");
                r.set_read_index(b + 1);
                round_done.store(false, Ordering::SeqCst);
            }
            (refused_while_rendering, refused_frozen) = writer.join().unwrap();
        });
        // Every round ended in a refusal, and the freeze landed during a rewrite's render (the
        // race itself; a freeze between rewrites is the first test's case) in some of them.
        assert_eq!(refused_while_rendering + refused_frozen, rounds);
        assert!(refused_while_rendering > 0, "{refused_while_rendering} during, {refused_frozen} between");
    }

    /// The monitor's scan (no freeze) runs while the worker rewrites: a block in the middle
    /// of a rewrite, or rewritten twice under the look, is never taken for a corrupt one.
    #[test]
    fn a_scan_during_rewrites_never_sees_a_valid_block_as_corrupt() {
        use std::sync::atomic::AtomicBool;
        let (f, r, _) = ring();
        let w = AudioRing::attach(f.as_file()).unwrap();
        for b in 0..4 {
            w.produce(b, NO_META, version_k(b, 1));
        }
        let stop = AtomicBool::new(false);
        let (mut looks, mut playable, mut corrupt) = (0u64, 0u64, 0u64);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut k = 2;
                while !stop.load(Ordering::Relaxed) {
                    for b in 0..4 {
                        assert_eq!(w.rewrite(b, NO_META, version_k(b, k)), Ok(()));
                    }
                    k = k % 1000 + 2;
                }
            });
            let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
            while std::time::Instant::now() < until {
                for b in 0..4 {
                    corrupt += r.holds_invalid(b) as u64;
                    looks += 1;
                    playable += r.committed_state(b).is_some() as u64;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(corrupt, 0, "valid blocks read as corrupt during their rewrite ({looks} looks)");
        assert!(looks > 1000 && playable > 0, "{looks} looks, {playable} whole");
    }

    #[test]
    fn attach_rejects_foreign_segments() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        assert!(AudioRing::attach(f.as_file()).is_err());
    }
}
