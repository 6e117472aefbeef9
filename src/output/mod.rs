//! The output stage: an RT thread of the supervisor (never of a worker) that plays one block
//! per period.
//!
//! Audio thread. After start-up this loop allocates nothing, takes no lock, logs nothing and
//! blocks only in its wake-up: the absolute-time sleep of the virtual clock, or the ALSA
//! device's wait for room. What it has to say leaves through atomics (metrics) and the WAV
//! tap's wait-free ring. A device that went away is reopened (and the lost one closed) by a
//! helper thread of ordinary priority ([`reopen`]): an open can block for as long as it likes.
//!
//! Each period it plays block `pos` from the first ring that holds a valid one, the active
//! worker's first. Every ring agrees on what block `pos` is (see shm::ring), so a dead
//! primary's remaining blocks, a hot standby's, or a warm standby's after its first render
//! are interchangeable: failover is just which ring answers. No ring holding it is an
//! underrun: the period plays silence and `pos` stays, so the stream resumes where it left off.

pub mod alsa;
pub mod cpal;
mod reopen;
pub mod wav;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::config::OutputSpec;
use crate::engine::EngineState;
use crate::playback::{Playback, PlaybackSettings, WorkerShm};
use crate::shm::ring::Committed;
use crate::sys;

/// Where played blocks go, and what paces the output thread.
pub enum Sink {
    /// CLOCK_MONOTONIC paces; the blocks go nowhere.
    Virtual,
    /// CLOCK_MONOTONIC paces; the blocks go to a WAV file.
    Wav(wav::WavTap),
    /// The device paces (its buffer has room for a block) and plays.
    Alsa(alsa::AlsaOut),
    /// cpal owns the device and calls back for samples.
    Cpal(cpal::CpalOut),
}

/// The output in use, as GetMetrics and the start-up log report it.
#[derive(Debug, Clone)]
pub struct OutputInfo {
    /// `virtual`, `wav:PATH`, `alsa:PCM` or `cpal:DEVICE`.
    pub name: String,
    pub period_frames: u32,
    /// Device buffer (0 for the virtual clock, which has none).
    pub buffer_frames: u32,
}

/// Why an output could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error(transparent)]
    Alsa(#[from] alsa::OpenError),
    #[error(transparent)]
    Wav(#[from] wav::WavError),
    #[error("cpal device {name:?}: {why}")]
    Cpal { name: String, why: String },
    /// The device would not play at the stream's rate.
    #[error("{device} plays at {got} Hz, not {want} Hz")]
    Rate { device: String, got: u32, want: u32 },
}

/// Blocks in a row a rendering ring may differ from the one played, each time told to
/// continue from it, before its worker is replaced: a resync is done in one wake-up, and a
/// block or two the output takes meanwhile differ too (more: its worker does not resync).
const RESYNCS_BEFORE_REPLACING: u32 = 8;

/// An output opened for the output thread: where the blocks go, the WAV recorder's writer
/// (for `wav:`), and what it is.
pub struct Opened {
    pub sink: Sink,
    pub recorder: Option<wav::WavRecorder>,
    pub info: OutputInfo,
}

/// Opens the output `spec` names for a stream of `settings`. With `auto`, an ALSA `default`
/// that does not open means the virtual output (logged once, with why).
///
/// # Errors
/// The device or file cannot be opened, or a device will not play at the stream's rate.
pub fn open(spec: &OutputSpec, settings: &PlaybackSettings) -> Result<Opened, OutputError> {
    let open_alsa = |pcm: &str| {
        alsa::AlsaOut::open(
            pcm,
            settings.sample_rate,
            settings.block_frames,
            settings.device_periods,
            settings.periods_per_wake,
        )
    };
    let clocked = |name: String, sink: Sink, recorder| Opened {
        sink,
        recorder,
        info: OutputInfo { name, period_frames: settings.block_frames, buffer_frames: 0 },
    };
    let device = |pcm: &str, dev: alsa::AlsaOut| -> Result<Opened, OutputError> {
        let d = &dev.info;
        tracing::info!(
            DEVICE = %d.name,
            "ALSA device {}: {} Hz {}, period {} frames, buffer {} frames ({:.2} ms)",
            d.name, d.rate, d.format, d.period_frames, d.buffer_frames,
            d.buffer_frames as f64 * 1000.0 / d.rate as f64
        );
        if d.rate != settings.sample_rate {
            return Err(OutputError::Rate { device: d.name.clone(), got: d.rate, want: settings.sample_rate });
        }
        let info =
            OutputInfo { name: format!("alsa:{pcm}"), period_frames: d.period_frames, buffer_frames: d.buffer_frames };
        Ok(Opened { sink: Sink::Alsa(dev), recorder: None, info })
    };
    match spec {
        OutputSpec::Virtual => Ok(clocked("virtual".into(), Sink::Virtual, None)),
        OutputSpec::Wav(path) => {
            let (tap, rec) = wav::start(path, settings.sample_rate, 2, settings.sample_rate as usize)?;
            Ok(clocked(format!("wav:{}", path.display()), Sink::Wav(tap), Some(rec)))
        }
        OutputSpec::Alsa(pcm) => device(pcm, open_alsa(pcm)?),
        OutputSpec::Cpal(name) => {
            let dev = cpal::CpalOut::open(name).map_err(|why| OutputError::Cpal { name: name.clone(), why })?;
            Ok(clocked(format!("cpal:{name}"), Sink::Cpal(dev), None))
        }
        OutputSpec::Auto => match open_alsa("default") {
            Ok(dev) => device("default", dev),
            Err(e) => {
                tracing::warn!("--output auto: {e}; playing on the virtual output (no sound)");
                Ok(clocked("virtual".into(), Sink::Virtual, None))
            }
        },
    }
}

/// `outputs` as lines of at most 80 columns: the value, then its description (on a line of
/// its own, indented, when the value is long), cut to fit.
pub fn outputs_text() -> String {
    let mut text = String::new();
    for (value, desc) in outputs() {
        let (head, room) = if value.chars().count() <= 28 {
            (format!("{value:<29} "), 50)
        } else {
            (format!("{value}\n{:30}", ""), 50)
        };
        let desc: String =
            if desc.chars().count() > room { desc.chars().take(room - 1).chain(['…']).collect() } else { desc };
        text.push_str(&format!("{head}{desc}\n"));
    }
    text
}

/// Every --output value this machine offers, with a description.
pub fn outputs() -> Vec<(String, String)> {
    let mut v = vec![
        ("virtual".to_owned(), "paced like a sound card, no device".to_owned()),
        ("wav:PATH".to_owned(), "virtual, recording every played frame to PATH".to_owned()),
    ];
    v.extend(alsa::list_outputs());
    v.extend(cpal::list_outputs());
    v
}

/// The output thread's only memory besides its stack: allocated before the thread starts.
pub(crate) struct Buffers {
    block: Vec<f32>,
    silence: Vec<f32>,
}

impl Buffers {
    pub(crate) fn new(samples_per_block: usize) -> Buffers {
        Buffers { block: vec![0.0; samples_per_block], silence: vec![0.0; samples_per_block] }
    }

    /// New buffers pinned in memory, for a player made after start-up's mlockall (which pins
    /// only what existed then). Best effort, like mlockall.
    pub(crate) fn new_locked(samples_per_block: usize) -> Buffers {
        let b = Buffers::new(samples_per_block);
        for v in [&b.block, &b.silence] {
            let _ = sys::mlock(v.as_ptr().cast(), std::mem::size_of_val(&v[..]));
        }
        b
    }
}

/// Reopening a device that went away (ALSA) or rebuilding its stream (cpal): first retry
/// after this, doubling up to the max.
pub(crate) const REOPEN_FIRST_NS: u64 = 100_000_000;
pub(crate) const REOPEN_MAX_NS: u64 = 2_000_000_000;

/// CLOCK_MONOTONIC pacing, one block a period: period `n` ends at
/// `start + n * block_frames / sample_rate`, computed exactly so the clock never drifts.
///
/// It behaves like a sound card with a buffer of `--device-periods` blocks: a wake-up late by
/// less than the buffer catches up (the blocks it missed are played at once, as a device
/// would drain its buffer), one later than that is an xrun: the device ran dry, the clock
/// resyncs to now and playback continues from the same stream position. It never bursts
/// through more missed periods than the buffer holds (which would outrun the workers and
/// read as engine underruns).
///
/// Like a device with room for more than one period (timer-based scheduling, as PulseAudio
/// does), it wakes only once every `per_wake` periods and then plays that many blocks, the
/// later ones a period or more ahead of their time: a wake-up per period is what a service that
/// plays all day pays for, and the buffer allows it.
pub(crate) struct VirtualClock {
    start: u64,
    period: u64,
    block_frames: u128,
    rate: u128,
    /// How late a wake-up may be before it is an xrun: the device buffer.
    buffer_ns: u64,
    /// Periods played per wake-up.
    per_wake: u64,
}

/// One period of the virtual clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tick {
    /// When the block played now starts playing (the period's deadline, or now after an xrun).
    pub at: u64,
    /// How late the wake-up was, ns (before any resync).
    pub late_ns: u64,
    /// The wake-up was later than the buffer: the virtual device ran dry once.
    pub xrun: bool,
    /// This period began with a sleep (the others of a wake-up are played ahead).
    pub slept: bool,
}

impl VirtualClock {
    pub(crate) fn new(sh: &Playback) -> VirtualClock {
        let buffer_ns = sh.settings.block_ns().saturating_mul(sh.settings.device_periods.max(1) as u64);
        VirtualClock {
            start: sys::now_ns(),
            period: 0,
            block_frames: sh.settings.block_frames as u128,
            rate: sh.settings.sample_rate as u128,
            buffer_ns,
            per_wake: sh.settings.periods_per_wake.max(1) as u64,
        }
    }

    /// Starts counting periods again from `now` (a device was lost, or an xrun).
    pub(crate) fn restart(&mut self, now: u64) {
        (self.start, self.period) = (now, 0);
    }

    /// Sleeps until the current period ends, except for the later periods of a wake-up,
    /// which return at once. Real-time safe (an absolute clock_nanosleep).
    pub(crate) fn wait(&mut self) -> Tick {
        self.period += 1;
        let deadline = self.start + (self.period as u128 * self.block_frames * 1_000_000_000 / self.rate) as u64;
        if (self.period - 1) % self.per_wake != 0 {
            return Tick { at: deadline, late_ns: 0, xrun: false, slept: false };
        }
        sys::sleep_until_ns(deadline);
        let now = sys::now_ns();
        let late_ns = now.saturating_sub(deadline);
        if late_ns > self.buffer_ns {
            self.restart(now);
            return Tick { at: now, late_ns, xrun: true, slept: true };
        }
        Tick { at: deadline, late_ns, xrun: false, slept: true }
    }
}

/// The output thread's body. With the virtual clock, period `n` ends at
/// `start + n * block_frames / sample_rate`, computed exactly so the clock never drifts; with a
/// device, the device's clock paces. If the device goes away, the virtual clock takes over
/// (the engine keeps rendering, the stream position keeps advancing, the state is degraded)
/// and a helper thread reopens the device with backoff (see reopen.rs).
/// What start-up should know (a refused SCHED_FIFO, a stream that cannot be built) goes back
/// through `report` as a message to log (this thread never logs).
pub(crate) fn run(
    sh: Arc<Playback>,
    sink: Sink,
    buffers: Buffers,
    report: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let target = match sink {
        Sink::Cpal(c) => {
            // cpal's callback thread plays; it asks for SCHED_FIFO itself.
            let _ = report.send(Ok(()));
            if let Err(e) = c.run(sh, buffers) {
                let _ = report.send(Err(e));
            }
            return;
        }
        Sink::Virtual => Target::Virtual,
        Sink::Wav(tap) => Target::Wav(tap),
        Sink::Alsa(dev) => match alsa_reopener(&sh, &dev.info.name) {
            Ok(reopener) => Target::Alsa { dev: Some(dev), reopener: Some(reopener) },
            Err(e) => {
                let _ = report
                    .send(Err(format!("cannot start the device reopener thread ({e}): a lost device stays lost")));
                Target::Alsa { dev: Some(dev), reopener: None }
            }
        },
    };
    sh.tid.store(sys::gettid(), Ordering::SeqCst);
    let fifo = sys::set_fifo(sh.priority.load(Ordering::SeqCst));
    sh.counters.realtime.store(fifo.is_ok(), Ordering::Relaxed);
    let _ = report
        .send(fifo.map_err(|e| format!("output thread: SCHED_FIFO refused ({e}); playing without real-time priority")));
    drop(report);
    Paced { player: Player::new(sh.clone(), buffers), clock: VirtualClock::new(&sh), target, sh, device_at: 0 }.run();
}

/// Where the paced loop plays.
enum Target {
    Virtual,
    Wav(wav::WavTap),
    /// `dev` is None while the device is lost (the virtual clock paces, the reopener works).
    Alsa {
        dev: Option<alsa::AlsaOut>,
        reopener: Option<reopen::Reopener<alsa::AlsaOut>>,
    },
}

/// The helper that reopens ALSA device `name` at our rate (start-up checks the same) and
/// disposes of lost ones.
fn alsa_reopener(sh: &Playback, name: &str) -> std::io::Result<reopen::Reopener<alsa::AlsaOut>> {
    let s = &sh.settings;
    let (name, rate, bf, periods, per_wake) =
        (name.to_owned(), s.sample_rate, s.block_frames, s.device_periods, s.periods_per_wake);
    reopen::Reopener::start(
        "aw-reopen",
        move || match alsa::AlsaOut::open(&name, rate, bf, periods, per_wake) {
            Ok(dev) if dev.info.rate == rate => Ok(dev),
            _ => Err(()),
        },
        |dev: alsa::AlsaOut, errno| dev.close_after_loss(errno),
    )
}

/// The paced output loop: virtual clock, WAV tap or ALSA device. Audio thread (see the
/// module docs).
struct Paced {
    sh: Arc<Playback>,
    player: Player,
    clock: VirtualClock,
    target: Target,
    /// When the block handed to the device last starts playing, as the virtual clock counts
    /// it: the later blocks of a wake-up start a block apart, not all at the wake-up (the
    /// frame playing now, which control stamps from, is estimated from it).
    device_at: u64,
}

impl Paced {
    fn run(mut self) {
        // Test-only fault (--test-fault-output-stall-ms): alive, but never advancing again.
        let t0 = self.clock.start;
        let stall_at =
            self.sh.settings.test_stall_ms.map_or(u64::MAX, |ms| t0.saturating_add(ms.saturating_mul(1_000_000)));
        while self.sh.running.load(Ordering::Acquire) {
            // 1. Wait for the time (or the room) to play the next block.
            let Some(now) = self.wait() else { continue };
            if now >= stall_at {
                continue;
            }
            // A device reopened by the helper takes over from the virtual clock.
            if let Target::Alsa { dev: dev @ None, reopener: Some(r) } = &mut self.target {
                if let Some(d) = r.take() {
                    *dev = Some(d);
                    self.sh.set_degraded(false);
                    continue;
                }
            }
            // 2. Play block `pos` from any ring that holds it, or silence.
            self.play(now);
        }
    }

    /// Waits for the next period; the time the block plays at, or None if the device was
    /// lost meanwhile.
    fn wait(&mut self) -> Option<u64> {
        let sh = &*self.sh;
        if let Target::Alsa { dev: Some(dev), .. } = &mut self.target {
            let bf = sh.settings.block_frames as usize;
            return match dev.wait_room(bf) {
                Ok(late_frames) => {
                    if let Some(late) = late_frames {
                        let us = late as u64 * 1_000_000 / sh.settings.sample_rate as u64;
                        sh.counters.output_wake_late_us.record(us);
                        sh.position.begin_wake(sh.position.blocks(), sh.settings.periods_per_wake as u64);
                    }
                    // A wake-up's first block is taken now; its later ones (and the prefill)
                    // start a block after the one before.
                    let now = sys::now_ns();
                    let next = self.device_at.saturating_add(sh.settings.block_ns());
                    self.device_at = if late_frames.is_some() { now } else { now.max(next) };
                    Some(self.device_at)
                }
                Err(alsa::DeviceError::Xrun) => {
                    sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
                    sh.position.begin_wake(sh.position.blocks(), sh.settings.periods_per_wake as u64);
                    self.device_at = sys::now_ns();
                    Some(self.device_at)
                }
                Err(alsa::DeviceError::Gone(errno)) => {
                    self.lose_device(errno);
                    None
                }
            };
        }
        let tick = self.clock.wait();
        if tick.slept {
            sh.counters.output_wake_late_us.record(tick.late_ns / 1000);
            sh.position.begin_wake(sh.position.blocks(), self.clock.per_wake);
        }
        if tick.xrun {
            sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
        }
        Some(tick.at)
    }

    fn play(&mut self, now: u64) {
        let out = self.player.next(now);
        let sh = &*self.sh;
        let lost = match &mut self.target {
            Target::Virtual | Target::Alsa { dev: None, .. } => None,
            Target::Wav(tap) => {
                tap.push(out);
                None
            }
            Target::Alsa { dev: Some(dev), .. } => {
                let mut r = dev.write(out);
                if r == Err(alsa::DeviceError::Xrun) {
                    // Recovered (prepared): count it and write the block again.
                    sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
                    r = dev.write(out);
                }
                match r {
                    Ok(()) => {
                        if let Some(d) = dev.delay_frames() {
                            sh.counters.output_latency_frames.store(d.max(0) as u64, Ordering::Relaxed);
                        }
                        None
                    }
                    Err(alsa::DeviceError::Xrun) => {
                        sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                    Err(alsa::DeviceError::Gone(errno)) => Some(errno),
                }
            }
        };
        if let Some(errno) = lost {
            self.lose_device(errno);
        }
    }

    /// The device went away (`errno`; ETIMEDOUT: it stopped making room): the virtual clock
    /// takes over from now, the state is degraded, and the helper disposes of the device and
    /// opens a new one. Never closes or opens anything here.
    fn lose_device(&mut self, errno: i32) {
        let Target::Alsa { dev, reopener } = &mut self.target else { return };
        let Some(lost) = dev.take() else { return };
        match reopener {
            Some(r) => r.lost(lost, errno),
            None => std::mem::forget(lost),
        }
        self.clock.restart(sys::now_ns());
        self.sh.set_degraded(true);
        self.sh.counters.device_losses.fetch_add(1, Ordering::Relaxed);
    }
}

/// The output stage's work for one block, shared by the paced loop above and cpal's callback.
/// Audio-thread code: no allocation after [`Player::new`], no lock, no log.
pub(crate) struct Player {
    sh: Arc<Playback>,
    /// The block played last and its end state's check: the next one must continue it.
    last: Option<(u64, u64)>,
    block: Vec<f32>,
    silence: Vec<f32>,
    /// Test-only fault (--test-fault-output-pause): (when, for how long), CLOCK_MONOTONIC ns.
    pause: Option<(u64, u64)>,
}

impl Player {
    pub(crate) fn new(sh: Arc<Playback>, buffers: Buffers) -> Player {
        let t0 = sys::now_ns();
        let pause = sh.settings.test_pause.map(|(at, dur)| (t0 + at * 1_000_000, dur * 1_000_000));
        // A player made after a device loss continues what the one before it played.
        let bf = sh.settings.block_frames as u64;
        let last = sh.played_state.load().and_then(|s| Some((s.frame.checked_div(bf)?.checked_sub(1)?, s.check)));
        Player { sh, last, block: buffers.block, silence: buffers.silence, pause }
    }

    /// Without the test-only pause fault (a player made after start-up, for a device lost and
    /// rebuilt, must not pause again).
    pub(crate) fn without_test_fault(mut self) -> Player {
        self.pause = None;
        self
    }

    /// Copies block `pos` into `block` from the best ring that holds a valid one: a block that
    /// is fresh (it knows every change stamped inside it) and continues the block played before
    /// it, the active ring's first; failing that, the best there is (counted). Returns the block
    /// and the address of the ring it came from.
    ///
    /// It first freezes the block in every rendering worker's ring: from then on none of them
    /// can replace it (a rewrite fails), so the copy is never torn, and the block `pos` of
    /// each of those rings is the one its worker continues from. (A ring published in the
    /// table after this pass is not frozen at `pos`; it starts at or after `pos` from a state
    /// the monitor chose, and `read_block` freezes whatever ring it copies from.) A dead
    /// worker's ring is left as it is: it renders nothing more, and a tombstone would erase
    /// its oldest blocks, which the monitor reads after the death (where it was, for the
    /// poison check) however late it gets to it.
    fn take(sh: &Playback, block: &mut [f32], pos: u64, after: Option<u64>) -> Option<(Committed, *const WorkerShm)> {
        sh.table.for_each(|w| {
            if w.running.load(Ordering::Acquire) {
                w.ring.freeze(pos);
            }
            true
        });
        let end = (pos + 1).saturating_mul(sh.settings.block_frames as u64);
        let required = sh.stamps.advance(end);
        // The best-rated ring by a look at its state (no copy): the first one with the best
        // rating, stopping at a fresh and continuous block. Rings are told apart by address,
        // never by their place in the table, which the monitor may change between the passes.
        let rate = |c: &Committed| {
            let fresh = c.meta.known_seq >= required;
            let continuous = after.is_none_or(|check| c.meta.start_check == check);
            2 * continuous as u8 + fresh as u8
        };
        let mut best = None::<(u8, *const WorkerShm)>;
        sh.table.for_each(|w| {
            if let Some(c) = w.ring.peek(pos) {
                let r = rate(&c);
                if best.is_none_or(|(b, _)| r > b) {
                    best = Some((r, std::ptr::from_ref(w)));
                }
            }
            best.is_none_or(|(b, _)| b < 3)
        });
        let mut played = None;
        if let Some((_, at)) = best {
            sh.table.for_each(|w| {
                if std::ptr::eq(w, at) {
                    played = w.ring.read_block(pos, block).map(|c| (c, at));
                }
                played.is_none()
            });
        }
        if played.is_none() {
            // Its samples did not check out (or it moved): the first ring that plays at all.
            sh.table.for_each(|w| {
                played = w.ring.read_block(pos, block).map(|c| (c, std::ptr::from_ref(w)));
                played.is_none()
            });
        }
        if let Some((c, _)) = &played {
            if c.meta.known_seq < required {
                sh.counters.stale_blocks.fetch_add(1, Ordering::Relaxed);
            }
            if after.is_some_and(|check| c.meta.start_check != check) {
                sh.counters.discontinuities.fetch_add(1, Ordering::Relaxed);
            }
        }
        played
    }

    /// After block `pos` played (ending in `played`, copied from the ring at address `from`):
    /// frees its slot in every ring, marks the rings that no longer render the stream and
    /// wakes the writers. Returns whether the monitor should look now.
    fn release(sh: &Playback, pos: u64, played: &EngineState, from: *const WorkerShm) -> bool {
        // Free the slot in every ring; wake each writer once a batch of its slots is
        // free (at its phase), not after every block: one wake-up per batch.
        let batch = sh.settings.batch_blocks.max(1) as u64;
        let (mut suspect, mut first) = (false, true);
        sh.table.for_each(|w| {
            w.ring.set_read_index(pos + 1);
            // Another rendering ring whose frozen (final) block here differs from the one
            // played (its worker rendered a change late, or lacks one): its worker continues
            // from the block played. One that keeps differing is replaced. (A ring that
            // started rendering after the freeze may still render this block anew.)
            if std::ptr::eq(w, from) {
                w.differing.store(0, Ordering::Relaxed);
            } else if w.running.load(Ordering::Relaxed) && w.ring.is_frozen(pos) {
                match w.ring.peek(pos) {
                    Some(c) if c.state.check != played.check => {
                        sh.counters.divergences.fetch_add(1, Ordering::Relaxed);
                        w.ring.request_resync(pos + 1, played);
                        w.wake.notify();
                        if w.differing.fetch_add(1, Ordering::Relaxed).saturating_add(1) >= RESYNCS_BEFORE_REPLACING
                            && !w.diverged.swap(true, Ordering::Relaxed)
                        {
                            suspect = true;
                        }
                    }
                    Some(_) => w.differing.store(0, Ordering::Relaxed),
                    None => {}
                }
            }
            if w.running.load(Ordering::Relaxed) {
                if (pos + 1) % batch == w.wake_phase.load(Ordering::Relaxed) as u64 % batch {
                    // A standby's held blocks, checked once a batch (the active ring's
                    // are, below, every period): each block it publishes is still held
                    // at its next wake-up, so a stray write into one is seen while the
                    // monitor can still replace it, whatever the monitor's own pace.
                    suspect |= !first && w.ring.holds_any_invalid(pos + 1);
                    w.wake.notify();
                }
                // Overdue (a worker without real-time priority may be a few blocks
                // late on a busy machine: the monitor would only wait anyway).
                let overdue = if w.ring.worker_realtime() {
                    sh.settings.suspect_free_slots
                } else {
                    sh.settings.suspect_free_slots_nort
                };
                suspect |= w.ring.space_at(pos + 1) >= overdue;
                // Any block the active ring (visited first: the one played, unless it lacked
                // a fresh block) holds no longer checks out (a stray write into published memory): the monitor
                // replaces its worker before the output gets there. Every held block,
                // every period, since a block checked once could be hit after its check;
                // the other rings' blocks are played only if the active one lacks one,
                // and the monitor's own scan looks at them.
                suspect |= first && w.ring.holds_any_invalid(pos + 1);
                first = false;
            }
            true
        });
        suspect
    }

    /// Takes block `pos` from the first ring that holds a valid one (or silence: an underrun,
    /// and `pos` stays), advances the stream, frees the slot in every ring and wakes the
    /// writers. `now`: when this block starts playing (CLOCK_MONOTONIC).
    pub(crate) fn next(&mut self, now: u64) -> &[f32] {
        if let Some((at, dur)) = self.pause {
            if now >= at {
                // The writer stalls once, longer than the device buffer: an xrun.
                self.pause = None;
                sys::sleep_until_ns(now + dur);
            }
        }
        let sh = &*self.sh;
        let bf = sh.settings.block_frames as u64;
        let pos = sh.position.blocks();
        // A block taken outside an announced wake-up (a late wake-up's extra block, an xrun's
        // refill, a cpal callback) is announced on its own: no change is stamped into it.
        sh.position.cover(pos);
        // Continuity with the block played last, if that was the one before this one.
        let after = self.last.filter(|&(p, _)| p.checked_add(1) == Some(pos)).map(|(_, check)| check);
        let played = Player::take(sh, &mut self.block, pos, after);
        match played {
            Some((Committed { state, .. }, from)) => {
                self.last = Some((pos, state.check));
                // Position and its start time change together for readers (a seqlock).
                sh.position.advance(pos + 1, now);
                sh.counters.frames_played.fetch_add(bf, Ordering::Relaxed);
                sh.counters.played_seq.store(state.last_seq, Ordering::Relaxed);
                sh.played_state.store(&state);
                if Player::release(sh, pos, &state, from) {
                    sh.suspect.notify();
                }
            }
            None => {
                // Nothing playable at the position (a corrupt or missing block): the monitor
                // looks at once rather than at its next tick.
                sh.suspect.notify();
                if sh.cold_takeovers_pending.load(Ordering::Acquire) > 0 {
                    sh.counters.cold_start_underruns.fetch_add(1, Ordering::Relaxed);
                } else {
                    sh.counters.other_underruns.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Every reference into the table taken for this block is dead now (the block was
        // copied). SeqCst pairs with the monitor's SeqCst clear-then-read-epoch (SlotTable).
        sh.epoch.fetch_add(1, Ordering::SeqCst);
        if played.is_some() {
            &self.block
        } else {
            &self.silence
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ramp_frames, Engine};
    use crate::shm::ring::BlockMeta;
    use crate::shm::ring::{AudioRing, RingGeometry};
    use crate::sys::EventFd;
    use std::sync::atomic::{AtomicBool, AtomicU32};

    const SLOTS: u32 = 4;

    fn settings() -> PlaybackSettings {
        PlaybackSettings {
            block_frames: 64,
            sample_rate: 48_000,
            device_periods: 2,
            samples_per_block: 128,
            batch_blocks: 1,
            lookahead_blocks: SLOTS as u64,
            periods_per_wake: 1,
            suspect_free_slots: 2,
            suspect_free_slots_nort: 3,
            test_stall_ms: None,
            test_pause: None,
        }
    }

    /// A ring in the table, and the worker's view of it.
    fn worker(running: bool) -> (tempfile::NamedTempFile, Arc<WorkerShm>, AudioRing) {
        let geo = RingGeometry { block_frames: 64, slots: SLOTS, sample_rate: 48_000 };
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(geo.segment_size()).unwrap();
        let ring = AudioRing::create(file.as_file(), geo).unwrap();
        let view = AudioRing::attach(file.as_file()).unwrap();
        let shm = WorkerShm {
            ring,
            wake: EventFd::new(true).unwrap(),
            running: AtomicBool::new(running),
            diverged: AtomicBool::new(false),
            differing: AtomicU32::new(0),
            wake_phase: AtomicU32::new(0),
        };
        (file, Arc::new(shm), view)
    }

    /// Commits blocks `from..to` into `view`, rendered by `engine`.
    fn commit(view: &AudioRing, engine: &mut Engine, from: u64, to: u64) {
        commit_knowing(view, engine, from, to, 0);
    }

    fn commit_knowing(view: &AudioRing, engine: &mut Engine, from: u64, to: u64, known_seq: u64) {
        for b in from..to {
            let meta = BlockMeta { known_seq, start_check: engine.state().check };
            view.produce(b, meta, |s| {
                engine.render(s);
                *engine.state()
            });
        }
    }

    /// Renders `blocks` again into `view` (each must be committed and not frozen).
    fn rewrite_knowing(view: &AudioRing, engine: &mut Engine, blocks: std::ops::Range<u64>, known_seq: u64) {
        for b in blocks {
            let meta = BlockMeta { known_seq, start_check: engine.state().check };
            let done = view.rewrite(b, meta, |s| {
                engine.render(s);
                *engine.state()
            });
            assert_eq!(done, Ok(()), "block {b} rewritten");
        }
    }

    fn start() -> EngineState {
        EngineState::initial(440.0, 0.5, ramp_frames(48_000))
    }

    /// Primary (active) and hot standby, both rendering blocks 0..SLOTS of the same stream.
    struct Pair {
        play: Arc<Playback>,
        player: Player,
        rings: [(tempfile::NamedTempFile, Arc<WorkerShm>, AudioRing); 2],
    }

    impl Pair {
        fn new() -> Pair {
            let play = Arc::new(Playback::new(settings(), 0).unwrap());
            let rings = [worker(true), worker(true)];
            for (i, r) in rings.iter().enumerate() {
                play.table.set(i, &r.1);
                commit(&r.2, &mut Engine::new(48_000, start()), 0, SLOTS as u64);
            }
            play.table.set_active(0);
            let player = Player::new(play.clone(), Buffers::new(128)).without_test_fault();
            Pair { play, player, rings }
        }

        /// Plays one block; returns its end state's check.
        fn next(&mut self) -> u64 {
            self.player.next(sys::now_ns());
            self.play.played_state.load().expect("a block played").check
        }

        fn counters(&self) -> (u64, u64, u64, u64) {
            let c = &self.play.counters;
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            (get(&c.stale_blocks), get(&c.discontinuities), get(&c.divergences), get(&c.other_underruns))
        }

        fn diverged(&self, i: usize) -> bool {
            self.rings[i].1.diverged.load(Ordering::Relaxed)
        }

        /// The resync the output asked of ring `i`'s worker, if any: (base, the check of
        /// the state played before it).
        fn resync(&self, i: usize) -> Option<(u64, u64)> {
            self.rings[i].2.take_resync(&mut 0).map(|(base, s)| (base, s.check))
        }
    }

    /// A change stamped inside block 2 (seq 1) that only the standby rendered in time (it
    /// rewrote its blocks 2 and 3): the standby's fresh blocks play, the primary's stale one
    /// never does, and the primary, whose frozen block 2 is not the one played, is told to
    /// continue from the block played (the stream stays one), for each block that differs.
    #[test]
    fn a_block_that_lacks_a_change_plays_only_when_no_ring_has_it() {
        let mut p = Pair::new();
        let msg = crate::engine::ControlMsg::new(1, 2 * 64 + 10, crate::engine::ControlKind::SetGain, 0.1);
        p.play.stamps.publish(1, msg.apply_at);
        let mut reference = Engine::new(48_000, start());
        assert!(reference.enqueue(msg));
        let mut expected = [0u64; 4];
        for e in &mut expected {
            reference.render(&mut [0.0; 128]);
            *e = reference.state().check;
        }
        // The standby goes back to its block 2 and renders it, and 3, with the change.
        let mut standby = Engine::new(48_000, start());
        standby.set_state(p.rings[1].1.ring.committed_state(1).unwrap());
        assert!(standby.enqueue(msg));
        rewrite_knowing(&p.rings[1].2, &mut standby, 2..4, 1);
        assert_eq!([p.next(), p.next()], [expected[0], expected[1]], "before the change: the primary's");
        assert_eq!(p.next(), expected[2], "block 2: the standby's, with the change at its frame");
        assert_eq!(p.counters(), (0, 0, 1, 0), "nothing stale played; the primary's block 2 differed");
        assert_eq!(p.resync(0), Some((3, expected[2])), "the primary continues from the standby's block 2");
        assert_eq!(p.resync(1), None);
        assert!(!p.diverged(0) && !p.diverged(1), "a resync, not a replacement");
        assert_eq!(p.next(), expected[3], "block 3 continues the standby's block 2, not the primary's");
        assert_eq!(p.counters(), (0, 0, 2, 0), "its block 3 (not resynced yet here) differs too");
        assert_eq!(p.resync(0), Some((4, expected[3])));
    }

    /// A ring that keeps differing from what plays (its worker does not resync) is handed to
    /// the monitor after RESYNCS_BEFORE_REPLACING blocks; one that matches again starts over.
    #[test]
    fn a_ring_that_keeps_differing_is_replaced() {
        let mut p = Pair::new();
        let n = RESYNCS_BEFORE_REPLACING as u64;
        let mut other = Engine::new(48_000, EngineState::initial(880.0, 0.5, ramp_frames(48_000)));
        // The standby (not active) renders another stream from block 1 on.
        other.render(&mut [0.0; 128]);
        rewrite_knowing(&p.rings[1].2, &mut other, 1..SLOTS as u64, 0);
        let mut primary = Engine::new(48_000, start());
        primary.set_state(p.rings[0].1.ring.committed_state(SLOTS as u64 - 1).unwrap());
        for b in 0..=n {
            p.next();
            // Keep both rings one block ahead of the output.
            commit(&p.rings[0].2, &mut primary, SLOTS as u64 + b, SLOTS as u64 + b + 1);
            commit(&p.rings[1].2, &mut other, SLOTS as u64 + b, SLOTS as u64 + b + 1);
            assert_eq!(p.diverged(1), b >= n, "after block {b}");
        }
        assert!(!p.diverged(0));
        assert_eq!(p.counters().2, n, "each differing block counted");
    }

    /// Neither ring rendered the change in time: the active ring's block plays (counted
    /// stale), and neither ring is marked: they still agree on the stream.
    #[test]
    fn when_every_ring_lacks_a_change_the_active_one_plays_counted() {
        let mut p = Pair::new();
        p.play.stamps.publish(1, 64 + 3);
        p.next();
        p.next();
        assert_eq!(p.counters(), (1, 0, 0, 0));
        assert!(!p.diverged(0) && !p.diverged(1));
        // Every later block must know seq 1 too (it is stamped before their end), and none does.
        p.next();
        assert_eq!(p.counters(), (2, 0, 0, 0), "block 2 does not know seq 1 either");
    }

    /// The primary's blocks 1 and 2 were rendered from a state that is not the end of the
    /// block played before them: the standby's, which continues the stream, plays; once no
    /// ring has a continuous block, the best there is plays, counted.
    #[test]
    fn a_block_that_does_not_continue_what_played_is_passed_over() {
        let mut p = Pair::new();
        let mut other = Engine::new(48_000, EngineState::initial(880.0, 0.5, ramp_frames(48_000)));
        other.render(&mut [0.0; 128]);
        rewrite_knowing(&p.rings[0].2, &mut other, 1..3, 0);
        let first = p.next();
        let standby_1 = p.rings[1].1.ring.committed_state(1).unwrap().check;
        assert_eq!(p.next(), standby_1, "the standby's block 1 continues block 0");
        assert_eq!(p.counters(), (0, 0, 1, 0));
        assert_eq!(p.resync(0), Some((2, standby_1)));
        assert_ne!(first, standby_1);
        // The standby's ring is gone (as if its worker died): only the primary's block 2 is
        // left, which continues its own block 1, not the one played.
        p.rings[1].1.running.store(false, Ordering::Relaxed);
        p.play.table.clear(1);
        p.next();
        assert_eq!(p.counters(), (0, 1, 1, 0), "played, counted as a discontinuity");
    }

    /// Reviewer finding (ring layout 4): the output tombstoned the slot of every block it
    /// played in every ring, a dead worker's too, so a ring left behind lost its blocks one a
    /// period and, after a ring's worth, the monitor no longer found where the dead worker
    /// was (the poison check reads it after the death, late if the machine stalled).
    #[test]
    fn the_output_leaves_a_dead_workers_ring_as_it_was() {
        let play = Arc::new(Playback::new(settings(), 0).unwrap());
        let (_fa, live, live_view) = worker(true);
        let (_fd, dead, dead_view) = worker(false);
        play.table.set(0, &live);
        play.table.set(1, &dead);
        play.table.set_active(0);
        let start = EngineState::initial(440.0, 0.5, ramp_frames(48_000));
        let (mut a, mut d) = (Engine::new(48_000, start), Engine::new(48_000, start));
        commit(&dead_view, &mut d, 0, 3); // died after its third block
        let dead_end = dead.ring.last_valid_state(0).expect("the dead ring's newest block");
        let mut player = Player::new(play.clone(), Buffers::new(128)).without_test_fault();
        commit(&live_view, &mut a, 0, SLOTS as u64);
        for pos in 0..(4 * SLOTS as u64) {
            player.next(sys::now_ns());
            assert_eq!(play.position.blocks(), pos + 1, "block {pos} played from the live ring");
            commit(&live_view, &mut a, pos + SLOTS as u64, pos + SLOTS as u64 + 1);
        }
        let after = dead.ring.last_valid_state(0).expect("the dead ring still holds its blocks");
        assert_eq!((after.0, after.1.check), (dead_end.0, dead_end.1.check));
        assert_eq!(play.counters.other_underruns.load(Ordering::Relaxed), 0);
    }
}
