//! Crash-tolerant WAV recorder fed from the real-time output thread.
//!
//! The output thread owns a [`WavTap`] and hands it every frame it plays; a normal-priority
//! writer thread, owned by the [`WavRecorder`], drains the tap's ring into the file.
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
//! The file is a `WAVE_FORMAT_IEEE_FLOAT` (tag 3) WAV of 32-bit little-endian floats:
//! `RIFF` header, an 18-byte `fmt ` chunk (`cbSize` 0), a `fact` chunk (frames per channel, which
//! the spec requires for non-PCM formats) and the `data` chunk. The size fields are rewritten at
//! least once a second while recording, always *after* the data they describe has been handed to
//! the kernel, so if the process is killed the file is still a valid WAV covering everything up
//! to the last refresh; the reader ([`read_f32_wav`]) ignores the unreferenced samples after it.
//! Periodic refreshes are not fsynced (a killed process loses nothing that reached the page
//! cache); [`WavRecorder::finish`] fsyncs once at the end.
//!
//! # Size limit
//!
//! The WAV size fields are 32-bit, so a file holds at most ~4 GiB of samples (about 3.1 hours of
//! 48 kHz stereo). Frames beyond that are counted as dropped rather than corrupting the header.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `WAVE_FORMAT_IEEE_FLOAT`.
const FORMAT_IEEE_FLOAT: u16 = 3;
/// `WAVE_FORMAT_EXTENSIBLE`; accepted by the reader when its sub-format is IEEE float.
const FORMAT_EXTENSIBLE: u16 = 0xFFFE;
const BYTES_PER_SAMPLE: u16 = 4;
/// RIFF header (12) + `fmt ` chunk (8 + 18) + `fact` chunk (8 + 4) + `data` chunk header (8).
const HEADER_LEN: usize = 58;
/// How often the writer thread wakes to drain the ring. The ring must hold more than this much
/// audio or frames get dropped even with a fast disk.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);
/// Half the promised once-a-second refresh, so a slow drain iteration cannot push it past 1 s.
const HEADER_REFRESH_INTERVAL: Duration = Duration::from_millis(500);

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
        move |source| WavError::Io {
            path: path.to_path_buf(),
            source,
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
    let format = Format::new(sample_rate, channels)?;
    if capacity_frames == 0 {
        return Err(WavError::Format(
            "ring capacity must be at least one frame".into(),
        ));
    }
    let capacity = capacity_frames
        .checked_mul(usize::from(channels))
        .ok_or_else(|| {
            WavError::Format(format!(
                "ring capacity of {capacity_frames} frames overflows"
            ))
        })?;
    let max_frames = max_frames.unwrap_or(u64::MAX).min(format.max_frames());

    let file = File::create(path).map_err(WavError::io(path))?;
    let mut out = BufWriter::new(file);
    // Written up front so even a recorder killed before its first refresh leaves a valid WAV.
    out.write_all(&format.header(0))
        .map_err(WavError::io(path))?;

    let (producer, consumer) = rtrb::RingBuffer::new(capacity);
    let dropped = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = Writer {
        path: path.to_path_buf(),
        out,
        consumer,
        format,
        frames: 0,
        max_frames,
        limit_warned: false,
        dropped: Arc::clone(&dropped),
        stop: Arc::clone(&stop),
    };
    let join = std::thread::Builder::new()
        .name("wav-writer".into())
        .spawn(move || writer.run())
        .map_err(WavError::io(path))?;

    let tap = WavTap {
        producer,
        dropped: Arc::clone(&dropped),
        channels: usize::from(channels),
    };
    let recorder = WavRecorder {
        join: Some(join),
        stop,
        dropped,
    };
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
        debug_assert_eq!(
            interleaved.len() % self.channels,
            0,
            "WavTap::push given a partial frame"
        );
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

/// State of the writer thread (normal priority: it may block on the disk).
struct Writer {
    path: PathBuf,
    out: BufWriter<File>,
    consumer: rtrb::Consumer<f32>,
    format: Format,
    /// Frames written to `out` so far.
    frames: u64,
    max_frames: u64,
    limit_warned: bool,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Writer {
    fn run(mut self) -> Result<u64, WavError> {
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
        self.refresh_header()?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(WavError::io(&self.path))?;
        Ok(self.frames)
    }

    /// Moves every whole frame in the ring into the BufWriter.
    fn drain(&mut self) -> Result<(), WavError> {
        let channels = self.format.channels as usize;
        let available = self.consumer.slots();
        let samples = available - available % channels;
        let Ok(chunk) = self.consumer.read_chunk(samples) else {
            // Cannot happen: never more than `slots()` is requested.
            return Ok(());
        };
        if chunk.is_empty() {
            return Ok(());
        }
        let frames = (samples / channels) as u64;
        let room = self.max_frames - self.frames;
        let keep_frames = frames.min(room);
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
            self.dropped
                .fetch_add(frames - keep_frames, Ordering::Relaxed);
        }
        let keep = keep_frames as usize * channels;
        let (a, b) = chunk.as_slices();
        let result = a
            .iter()
            .chain(b)
            .take(keep)
            .try_for_each(|s| self.out.write_all(&s.to_le_bytes()));
        // Free the slots even on error: the tap must never wait on a broken disk.
        chunk.commit_all();
        result.map_err(WavError::io(&self.path))?;
        self.frames += keep_frames;
        Ok(())
    }

    /// Makes the on-disk header describe exactly the samples already handed to the kernel.
    fn refresh_header(&mut self) -> Result<(), WavError> {
        // Data first, header second: a kill in between leaves a header that undercounts (safe),
        // never one that points past the end of the written data.
        self.out.flush().map_err(WavError::io(&self.path))?;
        // Positional write instead of seek/rewrite/seek-back: the file offset stays at the end,
        // so there is no window where a failure leaves the BufWriter writing into the header.
        self.out
            .get_ref()
            .write_all_at(&self.format.header(self.frames), 0)
            .map_err(WavError::io(&self.path))
    }
}

/// Stream parameters, validated once so the header arithmetic below cannot overflow.
#[derive(Clone, Copy)]
struct Format {
    sample_rate: u32,
    channels: u16,
    /// Bytes per frame.
    block_align: u16,
}

impl Format {
    fn new(sample_rate: u32, channels: u16) -> Result<Self, WavError> {
        if sample_rate == 0 {
            return Err(WavError::Format("sample rate must be positive".into()));
        }
        let block_align = channels
            .checked_mul(BYTES_PER_SAMPLE)
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                WavError::Format(format!(
                    "channel count {channels} out of range 1..={}",
                    u16::MAX / BYTES_PER_SAMPLE
                ))
            })?;
        if sample_rate.checked_mul(u32::from(block_align)).is_none() {
            return Err(WavError::Format(format!(
                "byte rate of {sample_rate} Hz x {channels} channels overflows the header"
            )));
        }
        Ok(Format {
            sample_rate,
            channels,
            block_align,
        })
    }

    /// Most frames whose byte count still fits the 32-bit RIFF size field.
    fn max_frames(&self) -> u64 {
        u64::from(u32::MAX - (HEADER_LEN as u32 - 8)) / u64::from(self.block_align)
    }

    /// The complete 58-byte header for a file holding `frames` frames.
    fn header(&self, frames: u64) -> [u8; HEADER_LEN] {
        // `frames <= max_frames()` is enforced by the writer, so these fit in u32.
        let data_bytes = (frames * u64::from(self.block_align)) as u32;
        let mut h = [0u8; HEADER_LEN];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            h[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(b"RIFF");
        put(&(HEADER_LEN as u32 - 8 + data_bytes).to_le_bytes());
        put(b"WAVE");
        put(b"fmt ");
        put(&18u32.to_le_bytes());
        put(&FORMAT_IEEE_FLOAT.to_le_bytes());
        put(&self.channels.to_le_bytes());
        put(&self.sample_rate.to_le_bytes());
        put(&(self.sample_rate * u32::from(self.block_align)).to_le_bytes());
        put(&self.block_align.to_le_bytes());
        put(&(BYTES_PER_SAMPLE * 8).to_le_bytes());
        put(&0u16.to_le_bytes()); // cbSize: no extension
        put(b"fact");
        put(&4u32.to_le_bytes());
        put(&(frames as u32).to_le_bytes());
        put(b"data");
        put(&data_bytes.to_le_bytes());
        debug_assert_eq!(at, HEADER_LEN);
        h
    }
}

/// A decoded 32-bit float WAV file.
#[derive(Debug, Clone, PartialEq)]
pub struct WavData {
    pub sample_rate: u32,
    pub channels: u16,
    /// Interleaved samples, `frames * channels` long.
    pub samples: Vec<f32>,
}

/// Reads a 32-bit IEEE float WAV (format tag 3, or `WAVE_FORMAT_EXTENSIBLE` with a float
/// sub-format). Loads the whole file; meant for tests and tools, not for the audio path.
///
/// Walks the RIFF chunks properly: unknown chunks are skipped (with their pad byte), only the
/// `data` chunk's declared size is read, and bytes after it are ignored, which is what a
/// recorder killed between header refreshes leaves behind.
///
/// # Errors
///
/// [`WavError::Io`] if the file cannot be read, [`WavError::Format`] if it is not a RIFF/WAVE
/// file, is not 32-bit float, or its `data` chunk runs past the end of the file.
pub fn read_f32_wav(path: &Path) -> Result<WavData, WavError> {
    let bytes = std::fs::read(path).map_err(WavError::io(path))?;
    parse_f32_wav(&bytes).map_err(|msg| WavError::Format(format!("{}: {msg}", path.display())))
}

fn parse_f32_wav(bytes: &[u8]) -> Result<WavData, String> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err("not a RIFF/WAVE file".into());
    }
    // The RIFF size is not used to bound the walk: streaming writers leave it 0 or stale, and
    // the data chunk's own size is what the recorder keeps accurate.
    let mut fmt: Option<(u32, u16)> = None;
    let mut data: Option<&[u8]> = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let size = u32_at(bytes, at + 4) as usize;
        let body_start = at + 8;
        let body = bytes
            .get(body_start..body_start.saturating_add(size))
            .ok_or_else(|| {
                format!(
                    "chunk {:?} at offset {at} declares {size} bytes but only {} remain",
                    String::from_utf8_lossy(id),
                    bytes.len() - body_start
                )
            })?;
        match id {
            b"fmt " => fmt = Some(parse_fmt(body)?),
            b"data" => data = Some(body),
            _ => {}
        }
        if fmt.is_some() && data.is_some() {
            // Stop here: what follows may be samples written after the last header refresh.
            break;
        }
        // Chunks are word-aligned: an odd-sized body is followed by a pad byte.
        at = body_start + size + (size & 1);
    }
    let (sample_rate, channels) = fmt.ok_or("no fmt chunk")?;
    let data = data.ok_or("no data chunk")?;
    let frame_bytes = usize::from(channels) * usize::from(BYTES_PER_SAMPLE);
    if data.len() % frame_bytes != 0 {
        return Err(format!(
            "data chunk of {} bytes is not a whole number of {frame_bytes}-byte frames",
            data.len()
        ));
    }
    let samples = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(WavData {
        sample_rate,
        channels,
        samples,
    })
}

/// Returns (sample rate, channels) of a 32-bit float `fmt ` chunk body.
fn parse_fmt(body: &[u8]) -> Result<(u32, u16), String> {
    if body.len() < 16 {
        return Err(format!(
            "fmt chunk of {} bytes, need at least 16",
            body.len()
        ));
    }
    let mut tag = u16_at(body, 0);
    let channels = u16_at(body, 2);
    let sample_rate = u32_at(body, 4);
    let block_align = u16_at(body, 12);
    let bits = u16_at(body, 14);
    if tag == FORMAT_EXTENSIBLE {
        // The sub-format GUID (offset 24) starts with the plain format tag.
        if body.len() < 40 {
            return Err("WAVE_FORMAT_EXTENSIBLE fmt chunk too short".into());
        }
        tag = u16_at(body, 24);
    }
    if tag != FORMAT_IEEE_FLOAT || bits != 32 {
        return Err(format!(
            "format tag {tag} with {bits} bits per sample; only 32-bit IEEE float (tag 3) is supported"
        ));
    }
    if channels == 0 || sample_rate == 0 {
        return Err(format!("{channels} channels at {sample_rate} Hz"));
    }
    if u32::from(block_align) != u32::from(channels) * 4 {
        return Err(format!(
            "block align {block_align} does not match {channels} channels of 4 bytes"
        ));
    }
    Ok((sample_rate, channels))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offset of the `data` chunk's size field in the header the recorder writes.
    const DATA_SIZE_OFFSET: usize = 54;

    /// A deterministic, non-trivial signal, including values whose bits must survive exactly.
    fn signal(frames: usize, channels: usize) -> Vec<f32> {
        (0..frames * channels)
            .map(|i| match i % 7 {
                0 => -0.0,
                1 => f32::MIN_POSITIVE,
                2 => f32::MAX,
                _ => (i as f32 * 0.001).sin(),
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|s| s.to_bits()).collect()
    }

    #[test]
    fn round_trip_is_bit_exact_and_header_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt.wav");
        // A ring smaller than the signal and not a multiple of the block size, so reads wrap.
        let (mut tap, rec) = start(&path, 48_000, 2, 3000).unwrap();
        let input = signal(10_000, 2);
        for block in input.chunks(256 * 2) {
            // Test-only back-pressure, so the result does not depend on scheduling.
            while tap.producer.slots() < block.len() {
                std::thread::sleep(Duration::from_millis(1));
            }
            tap.push(block);
        }
        assert_eq!(rec.dropped_frames(), 0);
        assert_eq!(rec.finish().unwrap(), 10_000);

        let wav = read_f32_wav(&path).unwrap();
        assert_eq!((wav.sample_rate, wav.channels), (48_000, 2));
        assert_eq!(bits(&wav.samples), bits(&input));

        let raw = std::fs::read(&path).unwrap();
        let data_bytes = 10_000 * 2 * 4;
        assert_eq!(raw.len(), HEADER_LEN + data_bytes);
        assert_eq!(u32_at(&raw, 4) as usize, raw.len() - 8, "RIFF size");
        assert_eq!(&raw[12..16], b"fmt ");
        assert_eq!(u32_at(&raw, 16), 18, "fmt chunk size");
        assert_eq!(u16_at(&raw, 20), 3, "format tag");
        assert_eq!(u32_at(&raw, 28), 48_000 * 8, "byte rate");
        assert_eq!(u16_at(&raw, 36), 0, "cbSize");
        assert_eq!(&raw[38..42], b"fact");
        assert_eq!(u32_at(&raw, 46), 10_000, "fact frames");
        assert_eq!(u32_at(&raw, DATA_SIZE_OFFSET) as usize, data_bytes);
    }

    #[test]
    fn header_is_refreshed_while_recording() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("live.wav");
        let (mut tap, rec) = start(&path, 44_100, 1, 8192).unwrap();
        let input = signal(3000, 1);
        tap.push(&input);
        std::thread::sleep(Duration::from_millis(1200));

        // The recorder is still alive: this is what a kill at this point would leave.
        let wav = read_f32_wav(&path).unwrap();
        assert_eq!(bits(&wav.samples), bits(&input));
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(u32_at(&raw, 46), 3000, "fact frames");

        assert_eq!(rec.finish().unwrap(), 3000);
    }

    #[test]
    fn full_ring_counts_dropped_frames_without_blocking() {
        // A tap with nobody draining it: fully deterministic.
        let (producer, mut consumer) = rtrb::RingBuffer::new(8 * 2);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut tap = WavTap {
            producer,
            dropped: Arc::clone(&dropped),
            channels: 2,
        };
        tap.push(&[1.0; 6 * 2]);
        tap.push(&[2.0; 6 * 2]); // only 2 frames of room left: all-or-nothing
        assert_eq!(dropped.load(Ordering::Relaxed), 6);
        tap.push(&[3.0; 2 * 2]); // exactly fills the ring
        assert_eq!(dropped.load(Ordering::Relaxed), 6);
        tap.push(&[4.0; 2]);
        assert_eq!(dropped.load(Ordering::Relaxed), 7);

        let mut got = vec![0.0; consumer.slots()];
        consumer.pop_entire_slice(&mut got).unwrap();
        let mut want = vec![1.0; 12];
        want.extend([3.0; 4]);
        assert_eq!(got, want, "no partial block may enter the ring");
    }

    #[test]
    fn recorder_reports_drops_and_keeps_what_fit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drop.wav");
        let (mut tap, rec) = start(&path, 48_000, 2, 8).unwrap();
        tap.push(&[0.5; 10 * 2]); // larger than the whole ring
        tap.push(&[0.25; 4 * 2]);
        assert_eq!(rec.dropped_frames(), 10);
        assert_eq!(rec.finish().unwrap(), 4);
        assert_eq!(read_f32_wav(&path).unwrap().samples, vec![0.25; 8]);
    }

    #[test]
    fn size_limit_drops_instead_of_overflowing_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limit.wav");
        let (mut tap, rec) = start_with_limit(&path, 8000, 1, 64, Some(5)).unwrap();
        tap.push(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert_eq!(rec.finish().unwrap(), 5);
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(
            read_f32_wav(&path).unwrap().samples,
            vec![1.0, 2.0, 3.0, 4.0, 5.0]
        );
    }

    #[test]
    fn drop_without_finish_still_writes_final_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped.wav");
        let (mut tap, rec) = start(&path, 48_000, 1, 1024).unwrap();
        tap.push(&[0.125; 100]);
        drop(rec);
        assert_eq!(read_f32_wav(&path).unwrap().samples, vec![0.125; 100]);
    }

    #[test]
    fn start_rejects_bad_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.wav");
        for (rate, ch, cap) in [
            (0, 2, 16),
            (48_000, 0, 16),
            (48_000, u16::MAX, 16),
            (48_000, 2, 0),
        ] {
            assert!(matches!(
                start(&path, rate, ch, cap),
                Err(WavError::Format(_))
            ));
        }
        let err = start(&dir.path().join("no/such/dir.wav"), 48_000, 2, 16)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no/such/dir.wav"), "{err}");
    }

    /// Builds a WAV by hand: fmt body, then arbitrary extra chunks before `data`.
    fn handmade(fmt: &[u8], extra: &[(&[u8; 4], &[u8])], data: &[u8], trailing: &[u8]) -> Vec<u8> {
        let mut v = b"RIFF\0\0\0\0WAVE".to_vec();
        let chunk = |id: &[u8; 4], body: &[u8], v: &mut Vec<u8>| {
            v.extend_from_slice(id);
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(body);
            if body.len() % 2 == 1 {
                v.push(0);
            }
        };
        chunk(b"fmt ", fmt, &mut v);
        for (id, body) in extra {
            chunk(id, body, &mut v);
        }
        chunk(b"data", data, &mut v);
        v.extend_from_slice(trailing);
        v
    }

    fn float_fmt(channels: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(3u16.to_le_bytes());
        f.extend(channels.to_le_bytes());
        f.extend(22_050u32.to_le_bytes());
        f.extend((22_050 * 4 * u32::from(channels)).to_le_bytes());
        f.extend((4 * channels).to_le_bytes());
        f.extend(32u16.to_le_bytes());
        f
    }

    #[test]
    fn reader_skips_unknown_chunks_and_ignores_trailing_bytes() {
        let data: Vec<u8> = [0.5f32, -0.5]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        // An odd-sized LIST chunk exercises the pad byte; the trailing bytes mimic samples
        // written after the last refresh of a killed recorder (and are not a valid chunk).
        let bytes = handmade(&float_fmt(2), &[(b"LIST", b"odd")], &data, &[0xAB; 7]);
        let wav = parse_f32_wav(&bytes).unwrap();
        assert_eq!((wav.sample_rate, wav.channels), (22_050, 2));
        assert_eq!(wav.samples, vec![0.5, -0.5]);
    }

    #[test]
    fn reader_rejects_bad_files_with_useful_messages() {
        let pcm = {
            let mut f = float_fmt(1);
            f[0] = 1; // PCM
            f[14] = 16;
            f
        };
        let cases: [(Vec<u8>, &str); 4] = [
            (b"RIFX....WAVE".to_vec(), "not a RIFF/WAVE"),
            (handmade(&pcm, &[], &[0; 2], &[]), "only 32-bit IEEE float"),
            (handmade(&float_fmt(2), &[], &[0; 4], &[]), "whole number"),
            (
                {
                    let mut b = handmade(&float_fmt(1), &[], &[0; 8], &[]);
                    b.truncate(b.len() - 4);
                    b
                },
                "only 4 remain",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse_f32_wav(&bytes).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.wav");
        let err = read_f32_wav(&missing).unwrap_err();
        assert!(matches!(err, WavError::Io { .. }));
        assert!(err.to_string().contains("missing.wav"), "{err}");
    }
}
