//! The writer thread (normal priority: it may block on the disk): drains the tap's ring into
//! a hound `WavWriter` and refreshes the header at least once a second.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::WavError;

/// Bytes before the samples in hound's 32-bit float header (`WAVE_FORMAT_EXTENSIBLE`):
/// RIFF (12) + `fmt ` (8 + 40) + `data` chunk header (8).
pub(super) const HEADER_LEN: u64 = 68;
/// How often the writer thread wakes to drain the ring. The ring must hold more than this much
/// audio or frames get dropped even with a fast disk.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Half the promised once-a-second refresh, so a slow drain iteration cannot push it past 1 s.
const HEADER_REFRESH_INTERVAL: Duration = Duration::from_millis(500);

pub(super) struct Writer {
    path: PathBuf,
    out: hound::WavWriter<BufWriter<File>>,
    /// The same open file, for the final fsync (hound does not give its writer back).
    file: File,
    consumer: rtrb::Consumer<f32>,
    channels: usize,
    /// Frames handed to `out` so far.
    frames: u64,
    max_frames: u64,
    limit_warned: bool,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    /// Creates the file with a valid empty header (flushed at once, so even a recorder killed
    /// before its first refresh leaves a valid WAV).
    pub(super) fn create(
        path: &Path,
        sample_rate: u32,
        channels: u16,
        consumer: rtrb::Consumer<f32>,
        max_frames: Option<u64>,
        dropped: &Arc<AtomicU64>,
        stop: &Arc<AtomicBool>,
    ) -> Result<Writer, WavError> {
        let spec =
            hound::WavSpec { channels, sample_rate, bits_per_sample: 32, sample_format: hound::SampleFormat::Float };
        let file = File::create(path).map_err(WavError::io(path))?;
        let sync = file.try_clone().map_err(WavError::io(path))?;
        let mut out = hound::WavWriter::new(BufWriter::new(file), spec).map_err(WavError::hound(path))?;
        out.flush().map_err(WavError::hound(path))?;
        // The RIFF size field (32-bit) counts the header after its first 8 bytes too.
        let format_limit = (u64::from(u32::MAX) - (HEADER_LEN - 8)) / (4 * u64::from(channels));
        Ok(Writer {
            path: path.to_path_buf(),
            out,
            file: sync,
            consumer,
            channels: usize::from(channels),
            frames: 0,
            max_frames: max_frames.unwrap_or(u64::MAX).min(format_limit),
            limit_warned: false,
            dropped: Arc::clone(dropped),
            stop: Arc::clone(stop),
        })
    }

    pub(super) fn run(mut self) -> Result<u64, WavError> {
        let mut last_refresh = Instant::now();
        let mut refreshed_frames = 0;
        loop {
            // Read the flag before draining, so the last drain sees everything pushed before
            // `finish` was called.
            let stopping = self.stop.load(Ordering::Acquire);
            self.drain()?;
            if stopping {
                break;
            }
            if last_refresh.elapsed() >= HEADER_REFRESH_INTERVAL {
                if self.frames != refreshed_frames {
                    self.refresh_header()?;
                    refreshed_frames = self.frames;
                }
                last_refresh = Instant::now();
            }
            std::thread::park_timeout(DRAIN_INTERVAL);
        }
        self.out.finalize().map_err(WavError::hound(&self.path))?;
        self.file.sync_all().map_err(WavError::io(&self.path))?;
        Ok(self.frames)
    }

    /// Moves every whole frame in the ring into the WAV writer.
    fn drain(&mut self) -> Result<(), WavError> {
        let available = self.consumer.slots();
        let samples = available - available % self.channels;
        let Ok(chunk) = self.consumer.read_chunk(samples) else {
            // Cannot happen: never more than `slots()` is requested.
            return Ok(());
        };
        if chunk.is_empty() {
            return Ok(());
        }
        let frames = (samples / self.channels) as u64;
        let keep_frames = frames.min(self.max_frames - self.frames);
        if keep_frames < frames {
            if !self.limit_warned {
                // Once: this thread may log, but not 100 times a second.
                tracing::warn!(
                    path = %self.path.display(),
                    "WAV size limit of {} frames reached, dropping the rest",
                    self.max_frames
                );
                self.limit_warned = true;
            }
            self.dropped.fetch_add(frames - keep_frames, Ordering::Relaxed);
        }
        let keep = keep_frames as usize * self.channels;
        let (a, b) = chunk.as_slices();
        let out = &mut self.out;
        let result = a.iter().chain(b).take(keep).try_for_each(|&s| out.write_sample(s));
        // Free the slots even on error: the tap must never wait on a broken disk.
        chunk.commit_all();
        result.map_err(WavError::hound(&self.path))?;
        self.frames += keep_frames;
        Ok(())
    }

    /// Makes the on-disk header describe exactly the samples already handed to the kernel.
    /// hound's flush writes the buffered samples out first (seeking a `BufWriter` flushes it),
    /// then the size fields: a kill in between leaves a header that undercounts (safe), never
    /// one that points past the end of the written data.
    fn refresh_header(&mut self) -> Result<(), WavError> {
        self.out.flush().map_err(WavError::hound(&self.path))
    }
}
