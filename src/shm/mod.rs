//! Shared memory between the supervisor and its workers: one file per segment in the shm
//! directory, tracked by the [`registry`] and its `manifest.json`, mapped as an
//! [`audio ring`](ring) or a [`control ring`](control).
//!
//! All raw-pointer access to shared memory of the crate lives in this module, behind safe
//! types. A worker can die, or go wrong, at any instruction, so everything the supervisor reads
//! from a worker's memory is bounds-checked before use.

#![allow(unsafe_code)]

pub mod control;
pub mod registry;
pub mod ring;

use std::fs::File;
use std::io;

use memmap2::MmapRaw;

/// Magic number at the start of every segment ("AWARDEN" + kind byte).
pub const MAGIC_AUDIO: u64 = 0x4157_4152_4445_4e01;
pub const MAGIC_CONTROL: u64 = 0x4157_4152_4445_4e02;
/// Bumped whenever a layout changes: a worker from another build refuses to attach.
pub const LAYOUT_VERSION: u32 = 6;

/// A shared, read-write mapping of a whole segment file, unmapped on drop.
pub(crate) struct Mapping {
    map: MmapRaw,
}

impl Mapping {
    pub(crate) fn new(file: &File) -> io::Result<Mapping> {
        let map = MmapRaw::map_raw(file)?;
        Ok(Mapping { map })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Faults in and pins the whole mapping (the audio path must never page-fault).
    pub(crate) fn lock(&self) -> io::Result<()> {
        crate::sys::mlock(self.ptr(), self.len())
    }
}

/// Rounds `n` up to a multiple of 64 (a cache line) so atomics written by different processes
/// never share a line.
pub(crate) const fn cache_align(n: usize) -> usize {
    (n + 63) & !63
}
