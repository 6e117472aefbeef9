//! ALSA playback for the output thread: interleaved writes, float or S16, period = block.
//!
//! Audio thread code. [`AlsaOut::open`] allocates and negotiates; after it, [`AlsaOut::wait_room`]
//! and [`AlsaOut::write`] only call into alsa-lib's transfer path (no allocation, no logging):
//! the device paces the thread (it blocks in `snd_pcm_wait` until a block fits). An xrun
//! (EPIPE) is recovered with `snd_pcm_prepare` and reported to the caller, which counts it; a
//! device that is gone (ENODEV, EBADFD, ESTRPIPE) is reported as such and the caller reopens
//! it with backoff.

use alsa::pcm::{Access, Format, HwParams, State, PCM};
use alsa::{Direction, ValueOr};

/// What the device agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The ALSA PCM name as given (`default`, `hw:0,0`, `plug:jack`, ...).
    pub name: String,
    pub rate: u32,
    /// `FLOAT_LE` or `S16_LE`.
    pub format: &'static str,
    pub period_frames: u32,
    pub buffer_frames: u32,
}

/// Why a device could not be opened or configured.
#[derive(Debug, thiserror::Error)]
#[error("ALSA device {name:?}: {what}: {source}")]
pub struct OpenError {
    pub name: String,
    pub what: &'static str,
    #[source]
    pub source: alsa::Error,
}

/// What went wrong on the audio path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceError {
    /// An underrun of the device's buffer (EPIPE): recovered, count it, keep writing.
    Xrun,
    /// The device went away or was suspended; reopen it.
    Gone(i32),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SampleFormat {
    F32,
    S16,
}

pub struct AlsaOut {
    pcm: PCM,
    format: SampleFormat,
    channels: usize,
    /// Conversion buffer for S16 devices (allocated at open).
    s16: Vec<i16>,
    pub info: DeviceInfo,
    /// How long a running device may make no room before it is declared gone (ms).
    stall_ms: u32,
    /// Room (frames) a wait for room waits for: `per_wake` periods.
    avail_min: usize,
}

const CHANNELS: u32 = 2;

/// A running device that makes no room for a block within this time is declared gone: 500 ms,
/// or four periods when they are longer (4096 frames at 8 kHz is 512 ms a period).
fn stall_ms(block_frames: u32, rate: u32) -> u32 {
    (4 * block_frames as u64 * 1000 / rate.max(1) as u64).max(500) as u32
}

impl AlsaOut {
    /// Opens `name` for playback at `rate` Hz, stereo, float (S16 if the device refuses
    /// float), with periods of `block_frames` and a buffer of `periods` periods, and sets the
    /// software parameters so that playback starts once the buffer is full and the thread
    /// wakes up once `per_wake` periods fit (it then writes them one after the other: a
    /// wake-up per period is what a service that plays all day pays for).
    ///
    /// # Errors
    /// The device cannot be opened, or refuses the rate, channels, access or formats.
    pub fn open(name: &str, rate: u32, block_frames: u32, periods: u32, per_wake: u32) -> Result<AlsaOut, OpenError> {
        with_alsa_messages_logged(|| AlsaOut::open_here(name, rate, block_frames, periods, per_wake))
    }

    fn open_here(name: &str, rate: u32, block_frames: u32, periods: u32, per_wake: u32) -> Result<AlsaOut, OpenError> {
        let err = |what| move |source| OpenError { name: name.to_owned(), what, source };
        // Non-blocking: a blocking open of a device another program holds waits until it is
        // released (the kernel's open_wait), which would wedge start-up or, on a reopen, the
        // output thread and its virtual clock. Busy is EBUSY now, retried with backoff. Writes
        // stay paced: `write` is only called once `wait_room` found room, and waits on EAGAIN.
        let pcm = PCM::new(name, Direction::Playback, true).map_err(err("open"))?;
        let format;
        let (period, buffer);
        let avail_min;
        {
            let hw = HwParams::any(&pcm).map_err(err("hw params"))?;
            hw.set_access(Access::RWInterleaved).map_err(err("interleaved access"))?;
            hw.set_channels(CHANNELS).map_err(err("2 channels"))?;
            hw.set_rate_resample(true).map_err(err("resampling"))?;
            hw.set_rate(rate, ValueOr::Nearest).map_err(err("sample rate"))?;
            format = if hw.test_format(Format::float()).is_ok() {
                hw.set_format(Format::float()).map_err(err("float format"))?;
                SampleFormat::F32
            } else {
                hw.set_format(Format::s16()).map_err(err("S16 format"))?;
                SampleFormat::S16
            };
            hw.set_period_size_near(block_frames as alsa::pcm::Frames, ValueOr::Nearest).map_err(err("period size"))?;
            hw.set_buffer_size_near((block_frames * periods) as alsa::pcm::Frames).map_err(err("buffer size"))?;
            pcm.hw_params(&hw).map_err(err("applying hw params"))?;
        }
        {
            let cur = pcm.hw_params_current().map_err(err("reading hw params"))?;
            period = cur.get_period_size().map_err(err("period size"))?;
            buffer = cur.get_buffer_size().map_err(err("buffer size"))?;
        }
        {
            let sw = pcm.sw_params_current().map_err(err("sw params"))?;
            // Start once the buffer is full (the prefill), wake up when `per_wake` blocks fit
            // (at most half the buffer: the rest is the margin for a late wake-up).
            sw.set_start_threshold(buffer - buffer % block_frames as alsa::pcm::Frames)
                .map_err(err("start threshold"))?;
            let per_wake =
                (per_wake as alsa::pcm::Frames).clamp(1, (buffer / block_frames as alsa::pcm::Frames / 2).max(1));
            avail_min = block_frames as alsa::pcm::Frames * per_wake;
            sw.set_avail_min(avail_min).map_err(err("avail min"))?;
            pcm.sw_params(&sw).map_err(err("applying sw params"))?;
        }
        let got_rate = pcm.hw_params_current().and_then(|h| h.get_rate()).map_err(err("rate"))?;
        Ok(AlsaOut {
            pcm,
            format,
            channels: CHANNELS as usize,
            s16: vec![0; (block_frames * CHANNELS) as usize],
            stall_ms: stall_ms(block_frames, rate),
            avail_min: avail_min as usize,
            info: DeviceInfo {
                name: name.to_owned(),
                rate: got_rate,
                format: if format == SampleFormat::F32 { "FLOAT_LE" } else { "S16_LE" },
                period_frames: period as u32,
                buffer_frames: buffer as u32,
            },
        })
    }

    /// Blocks until `frames` frames fit in the device buffer (the device's clock paces the
    /// output thread here). If it had to sleep, returns the room found on waking up beyond
    /// what it waited for: how late the wake-up was, in frames (None: there was room at once,
    /// as for the later blocks of a wake-up, or it is prefilling).
    pub fn wait_room(&mut self, frames: usize) -> Result<Option<usize>, DeviceError> {
        let mut waited = false;
        loop {
            match self.pcm.avail_update() {
                // Lateness is measured only where the thread slept: beyond the room it waited
                // for (the later blocks of a wake-up find theirs without waiting).
                Ok(n) if n as usize >= frames && self.pcm.state() == State::Running => {
                    return Ok(waited.then(|| (n as usize).saturating_sub(self.avail_min.max(frames))));
                }
                Ok(n) if n as usize >= frames => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(self.classify(e)),
            }
            if self.pcm.state() != State::Running {
                // Prefilling (not started yet): there is room by definition of the threshold.
                return Ok(None);
            }
            waited = true;
            match self.pcm.wait(Some(self.stall_ms)) {
                Ok(true) => {}
                // A running device that makes no room for this long has stopped (a JACK
                // server that went away leaves its clients waiting forever, without an error).
                Ok(false) => return Err(DeviceError::Gone(libc::ETIMEDOUT)),
                Err(e) => return Err(self.classify(e)),
            }
        }
    }

    /// Writes one interleaved stereo block (converted to S16 if the device wants that).
    pub fn write(&mut self, block: &[f32]) -> Result<(), DeviceError> {
        let frames = block.len() / self.channels;
        if self.format == SampleFormat::S16 {
            for (d, s) in self.s16[..block.len()].iter_mut().zip(block) {
                *d = f32_to_s16(*s);
            }
        }
        let mut done = 0;
        // EAGAIN retries: a device whose wait reports room that its write then refuses, again
        // and again, is broken; this thread must not spin on it at FIFO priority.
        let mut refused = 0;
        while done < frames {
            let r = match self.format {
                // A byte view of the samples (bytemuck: a checked, free cast). Not io_f32(): it
                // checks the format by reading the hw params, which allocates.
                SampleFormat::F32 => self.pcm.io_bytes().writei(bytemuck::cast_slice(&block[done * self.channels..])),
                SampleFormat::S16 => {
                    self.pcm.io_bytes().writei(bytemuck::cast_slice(&self.s16[done * self.channels..block.len()]))
                }
            };
            match r {
                Ok(n) => done += n,
                // The device took less than `wait_room` promised (a plugin's own pacing):
                // wait for room like `wait_room` does.
                Err(e) if e.errno() == libc::EAGAIN && refused < 8 => match self.pcm.wait(Some(self.stall_ms)) {
                    Ok(true) => refused += 1,
                    Ok(false) => return Err(DeviceError::Gone(libc::ETIMEDOUT)),
                    Err(e) => return Err(self.classify(e)),
                },
                Err(e) => return Err(self.classify(e)),
            }
        }
        Ok(())
    }

    /// Disposes of a device declared gone with `errno`. One that stalled (ETIMEDOUT: a JACK
    /// server that went away) is leaked, not closed: closing a JACK client whose server is gone
    /// crashes libjack later (seen here). Bounded by the number of losses.
    pub fn close_after_loss(self, errno: i32) {
        if errno == libc::ETIMEDOUT {
            std::mem::forget(self);
        }
    }

    /// Frames queued in the device (its output latency), if it can tell.
    pub fn delay_frames(&self) -> Option<i64> {
        self.pcm.delay().ok()
    }

    /// Recovers from an xrun in place; anything else means the device is gone.
    fn classify(&mut self, e: alsa::Error) -> DeviceError {
        let errno = e.errno();
        if errno == libc::EPIPE && self.pcm.prepare().is_ok() {
            DeviceError::Xrun
        } else {
            DeviceError::Gone(errno)
        }
    }
}

/// The S16 sample nearest to `x` (clamped to [-1, 1]; samples are sanitised before this).
pub fn f32_to_s16(x: f32) -> i16 {
    (x.clamp(-1.0, 1.0) * 32767.0).round() as i16
}

/// ALSA PCMs that can play, as `(--output value, description)`.
/// Runs `f`, which calls alsa-lib on this thread, with alsa-lib's own messages (printed to
/// stderr by default: eight lines of "ALSA lib confmisc.c:855:(parse_card) cannot find card
/// '0'" on a machine without a card) caught in a buffer (the alsa crate's per-thread error
/// handler) and logged at debug level, so that the daemon's own lines come first. Never on
/// the output thread (it does not log).
pub fn with_alsa_messages_logged<T>(f: impl FnOnce() -> T) -> T {
    let Ok(buffer) = ::alsa::Output::local_error_handler() else { return f() };
    let result = f();
    let text = buffer.borrow().to_string();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        tracing::debug!("alsa-lib: {line}");
    }
    result
}

pub fn list_outputs() -> Vec<(String, String)> {
    with_alsa_messages_logged(list_outputs_here)
}

fn list_outputs_here() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(hints) = alsa::device_name::HintIter::new_str(None, "pcm") {
        for h in hints {
            if h.direction == Some(Direction::Capture) {
                continue;
            }
            if let Some(name) = h.name {
                let desc = h.desc.unwrap_or_default().replace('\n', " ");
                out.push((format!("alsa:{name}"), desc));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s16_conversion_rounds_and_clamps() {
        assert_eq!(f32_to_s16(0.0), 0);
        assert_eq!(f32_to_s16(1.0), 32767);
        assert_eq!(f32_to_s16(-1.0), -32767);
        assert_eq!(f32_to_s16(2.0), 32767);
        assert_eq!(f32_to_s16(0.5), 16384);
    }

    #[test]
    fn the_null_device_opens_with_block_sized_periods() {
        // alsa-lib's own configuration always defines `null`.
        let out = AlsaOut::open("null", 48_000, 64, 4, 2).expect("open the null PCM");
        assert_eq!(out.info.rate, 48_000);
        assert!(out.info.period_frames > 0 && out.info.buffer_frames >= out.info.period_frames);
    }
}
