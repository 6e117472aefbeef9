//! Crash-tolerant WAV recorder fed from the real-time output thread.
//!
//! The output thread owns a [`WavTap`] and hands it every frame it plays; a normal-priority
//! writer thread ([`writer`]), owned by the [`WavRecorder`], drains the tap's ring into the
//! file. The file format is [`hound`]'s; only the tap and the writer thread are ours.
//!
//! # Real-time guarantees
//!
//! [`WavTap::push`] never allocates, locks, logs or blocks: it copies the samples into a
//! pre-allocated `rtrb` ring in a single chunk write, or, if the ring lacks room, pushes nothing
//! and bumps an atomic drop counter. A slow or stalled disk therefore costs recorded frames,
//! never audio. All allocation happens in [`start`].
//!
//! # File format and crash tolerance
//!
//! 32-bit little-endian IEEE float samples, as hound writes them (`WAVE_FORMAT_EXTENSIBLE`
//! with the IEEE float sub-format). The size fields are rewritten (hound's
//! `WavWriter::flush`) at least once a second while recording, always *after* the data they
//! describe has been handed to the kernel, so if the process is killed the file is still a
//! valid WAV covering everything up to the last refresh; readers ignore the unreferenced
//! samples after it ([`read_f32_wav`]). Periodic refreshes are not fsynced (a killed process
//! loses nothing that reached the page cache); [`WavRecorder::finish`] fsyncs once at the end.
//!
//! # Size limit
//!
//! The WAV size fields are 32-bit, so a file holds at most ~4 GiB of samples (about 3.1 hours of
//! 48 kHz stereo). Frames beyond that are counted as dropped rather than corrupting the header.

mod read;
#[cfg(test)]
mod tests;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use read::{read_f32_wav, WavData};

/// Errors of the WAV recorder and reader.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    /// Creating, writing, syncing or reading the file failed.
    #[error("WAV file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Invalid recorder parameters, or a file that is not a 32-bit float WAV.
    #[error("WAV format: {0}")]
    Format(String),
}

impl WavError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> WavError + '_ {
        move |source| WavError::Io { path: path.to_path_buf(), source }
    }

    /// A hound error about the file at `path`: I/O stays I/O, the rest is the format's.
    fn hound(path: &Path) -> impl FnOnce(hound::Error) -> WavError + '_ {
        move |e| match e {
            hound::Error::IoError(source) => WavError::Io { path: path.to_path_buf(), source },
            other => WavError::Format(format!("{}: {other}", path.display())),
        }
    }
}

/// Producer half, owned by the real-time output thread.
pub struct WavTap {
    producer: rtrb::Producer<f32>,
    dropped: Arc<AtomicU64>,
    channels: usize,
}

/// Owns the writer thread; finish it (or drop it) to close the file.
pub struct WavRecorder {
    /// `None` once `finish` has joined the thread, so `Drop` knows there is nothing left to do.
    join: Option<JoinHandle<Result<u64, WavError>>>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

/// Creates (truncating) the WAV file at `path`, writes a valid empty header and starts the
/// writer thread.
///
/// `capacity_frames` sizes the ring between the tap and the writer thread: it must cover the
/// longest disk stall you want to ride out (it is allocated here, once).
///
/// # Errors
///
/// [`WavError::Format`] for zero or out-of-range parameters, [`WavError::Io`] if the file cannot
/// be created or the thread cannot be spawned.
pub fn start(
    path: &Path,
    sample_rate: u32,
    channels: u16,
    capacity_frames: usize,
) -> Result<(WavTap, WavRecorder), WavError> {
    start_with_limit(path, sample_rate, channels, capacity_frames, None)
}

/// [`start`] with an optional lower frame limit, so tests can exercise the size limit without
/// writing 4 GiB.
fn start_with_limit(
    path: &Path,
    sample_rate: u32,
    channels: u16,
    capacity_frames: usize,
    max_frames: Option<u64>,
) -> Result<(WavTap, WavRecorder), WavError> {
    if sample_rate == 0 {
        return Err(WavError::Format("sample rate must be positive".into()));
    }
    if channels == 0 || channels > u16::MAX / 4 {
        return Err(WavError::Format(format!("channel count {channels} out of range 1..={}", u16::MAX / 4)));
    }
    if capacity_frames == 0 {
        return Err(WavError::Format("ring capacity must be at least one frame".into()));
    }
    let capacity = capacity_frames
        .checked_mul(usize::from(channels))
        .ok_or_else(|| WavError::Format(format!("ring capacity of {capacity_frames} frames overflows")))?;
    let (producer, consumer) = rtrb::RingBuffer::new(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer::Writer::create(path, sample_rate, channels, consumer, max_frames, &dropped, &stop)?;
    let join = std::thread::Builder::new()
        .name("wav-writer".into())
        .spawn(move || writer.run())
        .map_err(WavError::io(path))?;
    let tap = WavTap { producer, dropped: Arc::clone(&dropped), channels: usize::from(channels) };
    let recorder = WavRecorder { join: Some(join), stop, dropped };
    Ok((tap, recorder))
}

impl WavTap {
    /// Queues interleaved samples (`frames * channels` long) for the writer thread.
    ///
    /// Real-time safe: one chunk write into the pre-allocated ring, no allocation, lock, log or
    /// syscall. If the ring lacks room for the whole block, nothing is pushed and the block's
    /// frame count is added to the drop counter, so the file never contains half a block.
    /// A trailing partial frame (a caller bug) is ignored so the ring stays frame-aligned.
    pub fn push(&mut self, interleaved: &[f32]) {
        let frames = interleaved.len() / self.channels;
        debug_assert_eq!(interleaved.len() % self.channels, 0, "WavTap::push given a partial frame");
        if frames == 0 {
            return;
        }
        let whole = &interleaved[..frames * self.channels];
        if self.producer.push_entire_slice(whole).is_err() {
            // Relaxed: a statistic, it orders nothing else.
            self.dropped.fetch_add(frames as u64, Ordering::Relaxed);
        }
    }
}

impl WavRecorder {
    /// Frames lost so far: ring full, or beyond the format's size limit.
    pub fn dropped_frames(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops the writer thread: it drains what is in the ring, writes the final header, fsyncs
    /// and exits. Returns the number of frames in the file.
    ///
    /// Frames pushed after this call starts may or may not be recorded.
    ///
    /// # Errors
    ///
    /// The first I/O error the writer thread hit. It stops writing at that point; the file stays
    /// a valid WAV covering the data up to the last header refresh, and later frames are counted
    /// as dropped once the ring fills.
    ///
    /// # Panics
    ///
    /// Re-raises a panic of the writer thread.
    pub fn finish(mut self) -> Result<u64, WavError> {
        match self.stop_and_join() {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            // Unreachable: `join` is only taken here and in `Drop`, and both consume `self`.
            None => Ok(0),
        }
    }

    fn stop_and_join(&mut self) -> Option<std::thread::Result<Result<u64, WavError>>> {
        let join = self.join.take()?;
        // Release here, Acquire in `Writer::run`: the flag publishes nothing else (the ring
        // orders the samples itself), it only has to be seen before the writer's next drain.
        self.stop.store(true, Ordering::Release);
        // Wake it from its 10 ms nap so finishing is prompt.
        join.thread().unpark();
        Some(join.join())
    }
}

impl Drop for WavRecorder {
    /// Best effort when `finish` was not called: the writer still drains, writes the final
    /// header and fsyncs; errors can only be logged.
    fn drop(&mut self) {
        match self.stop_and_join() {
            Some(Ok(Err(e))) => tracing::warn!("WAV recorder dropped without finish: {e}"),
            Some(Err(_)) => tracing::warn!("WAV writer thread panicked"),
            Some(Ok(Ok(_))) | None => {}
        }
    }
}
