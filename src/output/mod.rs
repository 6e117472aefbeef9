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
use crate::playback::{Playback, PlaybackSettings};
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
    Paced { player: Player::new(sh.clone(), buffers), clock: VirtualClock::new(&sh), target, sh }.run();
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
                    }
                    Some(sys::now_ns())
                }
                Err(alsa::DeviceError::Xrun) => {
                    sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
                    Some(sys::now_ns())
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
    block: Vec<f32>,
    silence: Vec<f32>,
    /// Test-only fault (--test-fault-output-pause): (when, for how long), CLOCK_MONOTONIC ns.
    pause: Option<(u64, u64)>,
}

impl Player {
    pub(crate) fn new(sh: Arc<Playback>, buffers: Buffers) -> Player {
        let t0 = sys::now_ns();
        let pause = sh.settings.test_pause.map(|(at, dur)| (t0 + at * 1_000_000, dur * 1_000_000));
        Player { sh, block: buffers.block, silence: buffers.silence, pause }
    }

    /// Without the test-only pause fault (a player made after start-up, for a device lost and
    /// rebuilt, must not pause again).
    pub(crate) fn without_test_fault(mut self) -> Player {
        self.pause = None;
        self
    }

    /// Copies block `pos` from the first ring (the active one first) that holds a valid one.
    /// It freezes the block in every ring before copying it from one: from here on no worker
    /// can replace it (a rewrite fails), so the copy is never torn and every ring's block
    /// `pos` is the one its worker continues from.
    fn take(sh: &Playback, block: &mut [f32], pos: u64) -> Option<EngineState> {
        sh.table.for_each(|w| {
            w.ring.freeze(pos);
            true
        });
        let mut played = None;
        sh.table.for_each(|w| {
            played = w.ring.read_block(pos, block);
            played.is_none()
        });
        played
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
        let played = Player::take(sh, &mut self.block, pos);
        match played {
            Some(state) => {
                // Position and its start time change together for readers (a seqlock).
                sh.position.advance(pos + 1, now);
                sh.counters.frames_played.fetch_add(bf, Ordering::Relaxed);
                sh.counters.played_seq.store(state.last_seq, Ordering::Relaxed);
                sh.played_state.store(&state);
                // Free the slot in every ring; wake each writer once a batch of its slots is
                // free (at its phase), not after every block: one wake-up per batch.
                let batch = sh.settings.batch_blocks.max(1) as u64;
                let (mut suspect, mut first) = (false, true);
                sh.table.for_each(|w| {
                    w.ring.set_read_index(pos + 1);
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
                        // Any block the active ring (visited first: the one played) holds no
                        // longer checks out (a stray write into published memory): the monitor
                        // replaces its worker before the output gets there. Every held block,
                        // every period, since a block checked once could be hit after its check;
                        // the other rings' blocks are played only if the active one lacks one,
                        // and the monitor's own scan looks at them.
                        suspect |= first && w.ring.holds_any_invalid(pos + 1);
                        first = false;
                    }
                    true
                });
                if suspect {
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
