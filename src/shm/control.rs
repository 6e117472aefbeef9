//! The per-worker control ring: single producer (the supervisor, under its control lock),
//! single consumer (the worker's render loop), carrying [`ControlMsg`]s in shared memory.
//! The wake-up travels separately, through an eventfd inherited at exec.
//!
//! Ordering: the producer writes an entry, then publishes it with a Release store of `head`;
//! the consumer's Acquire load of `head` makes it readable. The consumer frees entries with a
//! Release store of `tail`; the producer's Acquire load of `tail` lets it reuse them. The
//! producer never trusts `tail` (worker-written) beyond a bounds check.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{cache_align, Mapping, LAYOUT_VERSION, MAGIC_CONTROL};
use crate::engine::ControlMsg;

#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    capacity: u32,
    head: Line<AtomicU64>,
    tail: Line<AtomicU64>,
}

/// Control ring capacity per worker: changes accepted but not yet applied, at most (with
/// 4096-frame blocks a change waits about a second for its frame).
pub const CONTROL_CAPACITY: u32 = 4096;

fn header_size() -> usize {
    cache_align(std::mem::size_of::<Header>())
}

/// Bytes a control ring of `capacity` entries needs.
pub fn segment_size(capacity: u32) -> u64 {
    (header_size() + capacity as usize * std::mem::size_of::<ControlMsg>()) as u64
}

/// A mapped control ring.
pub struct ControlRing {
    map: Mapping,
    capacity: u32,
    /// The mapping is pinned (mlock granted at create).
    locked: bool,
}

// SAFETY: head/tail are atomics; entries are accessed only under the SPSC protocol above.
unsafe impl Send for ControlRing {}
// SAFETY: as above. The producer side is only used under the supervisor's control lock.
unsafe impl Sync for ControlRing {}

impl ControlRing {
    /// Supervisor side: maps a freshly created (zeroed) segment and writes its header.
    pub fn create(file: &File, capacity: u32) -> io::Result<ControlRing> {
        let map = Mapping::new(file)?;
        if capacity == 0 || (map.len() as u64) < segment_size(capacity) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "segment smaller than the control ring"));
        }
        // SAFETY: the mapping is large enough (checked) and not yet shared with any worker.
        unsafe {
            let h = map.ptr().cast::<Header>();
            (*h).capacity = capacity;
            (*h).version = LAYOUT_VERSION;
            (*h).magic = MAGIC_CONTROL;
        }
        let locked = map.lock().is_ok();
        Ok(ControlRing { map, capacity, locked })
    }

    /// Was the supervisor's mapping pinned in memory at create?
    pub fn locked(&self) -> bool {
        self.locked
    }

    /// Worker side: maps an inherited segment and validates its header.
    pub fn attach(file: &File) -> io::Result<ControlRing> {
        let map = Mapping::new(file)?;
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
        if map.len() < header_size() {
            return Err(bad("control ring segment too small"));
        }
        // SAFETY: at least a header is mapped; the supervisor wrote it before exec.
        let (magic, version, capacity) = unsafe {
            let h = map.ptr().cast::<Header>();
            ((*h).magic, (*h).version, (*h).capacity)
        };
        if magic != MAGIC_CONTROL || version != LAYOUT_VERSION {
            return Err(bad("not an audiowarden control ring of this version"));
        }
        if capacity == 0 || (map.len() as u64) < segment_size(capacity) {
            return Err(bad("control ring capacity does not match its segment"));
        }
        Ok(ControlRing { map, capacity, locked: false })
    }

    fn header(&self) -> &Header {
        // SAFETY: at least a header is mapped for the lifetime of self; shared fields are atomic.
        unsafe { &*self.map.ptr().cast::<Header>() }
    }

    fn entry(&self, index: u64) -> *mut ControlMsg {
        let i = (index % self.capacity as u64) as usize;
        // SAFETY: i < capacity and the mapping holds header + capacity entries (checked).
        unsafe { self.map.ptr().add(header_size()).cast::<ControlMsg>().add(i) }
    }

    pub fn lock(&self) -> io::Result<()> {
        self.map.lock()
    }

    /// Producer: appends `msg`. Returns false if the ring is full, or if the consumer's `tail`
    /// is garbage (a broken worker): the message is then not delivered to this worker.
    pub fn push(&self, msg: ControlMsg) -> bool {
        let h = self.header();
        let head = h.head.0.load(Ordering::Relaxed);
        let tail = h.tail.0.load(Ordering::Acquire);
        if tail > head || head - tail >= self.capacity as u64 {
            return false;
        }
        // SAFETY: the entry at `head` is free (head - tail < capacity) and only we write it.
        unsafe { std::ptr::write_volatile(self.entry(head), msg) };
        // Release: publishes the entry written above.
        h.head.0.store(head + 1, Ordering::Release);
        true
    }

    /// Producer: no room for another message (the worker has not taken the earlier ones yet).
    /// A garbage `tail` is not "full": `push` then reports the worker as broken.
    pub fn is_full(&self) -> bool {
        let h = self.header();
        let (head, tail) = (h.head.0.load(Ordering::Relaxed), h.tail.0.load(Ordering::Acquire));
        tail <= head && head - tail >= self.capacity as u64
    }

    /// Consumer: takes the oldest message, if any. Real-time safe.
    pub fn pop(&self) -> Option<ControlMsg> {
        let h = self.header();
        let tail = h.tail.0.load(Ordering::Relaxed);
        let head = h.head.0.load(Ordering::Acquire);
        if tail >= head {
            return None;
        }
        // SAFETY: head > tail, so the entry was published by the producer's Release store,
        // which our Acquire load of head synchronised with; the producer won't reuse it
        // before we advance tail.
        let msg = unsafe { std::ptr::read_volatile(self.entry(tail)) };
        // Release: the entry may now be reused.
        h.tail.0.store(tail + 1, Ordering::Release);
        Some(msg)
    }

    /// Consumer: the oldest message without taking it.
    pub fn peek(&self) -> Option<ControlMsg> {
        let h = self.header();
        let tail = h.tail.0.load(Ordering::Relaxed);
        let head = h.head.0.load(Ordering::Acquire);
        // SAFETY: as in pop.
        (tail < head).then(|| unsafe { std::ptr::read_volatile(self.entry(tail)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ControlKind;

    #[test]
    fn fifo_and_full() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(segment_size(4)).unwrap();
        let p = ControlRing::create(f.as_file(), 4).unwrap();
        let c = ControlRing::attach(f.as_file()).unwrap();
        for i in 1..=4 {
            assert!(p.push(ControlMsg::new(i, i * 10, ControlKind::SetGain, 0.5)));
        }
        assert!(!p.push(ControlMsg::new(5, 50, ControlKind::SetGain, 0.5)));
        assert_eq!(c.peek().unwrap().seq, 1);
        assert_eq!(c.pop().unwrap().seq, 1);
        assert!(p.push(ControlMsg::new(5, 50, ControlKind::SetGain, 0.5)));
        let seqs: Vec<u64> = std::iter::from_fn(|| c.pop()).map(|m| m.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4, 5]);
    }

    #[test]
    fn garbage_tail_refuses_push() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(segment_size(4)).unwrap();
        let p = ControlRing::create(f.as_file(), 4).unwrap();
        p.header().tail.0.store(99, Ordering::Release);
        assert!(!p.push(ControlMsg::new(1, 0, ControlKind::SetGain, 0.5)));
    }
}
