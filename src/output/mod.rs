//! The output stage: an RT thread of the supervisor (never of a worker) that plays one block
//! per period.
//!
//! Audio thread. After start-up this loop allocates nothing, takes no lock, logs nothing and
//! blocks only in its wake-up: the absolute-time sleep of the virtual clock, or the ALSA
//! device's wait for room. What it has to say leaves through atomics (metrics) and the WAV
//! tap's wait-free ring. (One exception, on a degraded path: reopening an ALSA device that
//! went away allocates; nothing is playing then.)
//!
//! Each period it plays block `pos` from the first ring that holds a valid one, the active
//! worker's first. Every ring agrees on what block `pos` is (see shm::ring), so a dead
//! primary's remaining blocks, a hot standby's, or a warm standby's after its first render
//! are interchangeable: failover is just which ring answers. No ring holding it is an
//! underrun: the period plays silence and `pos` stays, so the stream resumes where it left off.

pub mod alsa;
pub mod cpal;
pub mod wav;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::supervisor::Shared;
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

/// `outputs` as lines of at most 80 columns: the value, then its description (on a line of
/// its own, indented, when the value is long), cut to fit.
pub fn outputs_text() -> String {
    let mut text = String::new();
    for (value, desc) in outputs() {
        let (head, room) = if value.chars().count() <= 28 { (format!("{value:<29} "), 50) } else { (format!("{value}\n{:30}", ""), 50) };
        let desc: String = if desc.chars().count() > room { desc.chars().take(room - 1).chain(['…']).collect() } else { desc };
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
pub(crate) struct VirtualClock {
    start: u64,
    period: u64,
    block_frames: u128,
    rate: u128,
}

impl VirtualClock {
    pub(crate) fn new(sh: &Shared) -> VirtualClock {
        VirtualClock { start: sys::now_ns(), period: 0, block_frames: sh.config.block_frames as u128, rate: sh.config.sample_rate as u128 }
    }

    /// Starts counting periods again from `now` (a device was lost).
    pub(crate) fn restart(&mut self, now: u64) {
        (self.start, self.period) = (now, 0);
    }

    /// Sleeps until the current period ends; returns that deadline (when the next block plays).
    pub(crate) fn wait(&mut self) -> u64 {
        self.period += 1;
        let deadline = self.start + (self.period as u128 * self.block_frames * 1_000_000_000 / self.rate) as u64;
        sys::sleep_until_ns(deadline);
        deadline
    }
}

/// The output thread's body. With the virtual clock, period `n` ends at
/// `start + n * block_frames / sample_rate`, computed exactly so the clock never drifts; with a
/// device, the device's clock paces. If the device goes away, the virtual clock takes over
/// (the engine keeps rendering, the stream position keeps advancing, the state is degraded)
/// and the device is reopened with backoff.
/// What start-up should know (a refused SCHED_FIFO, a stream that cannot be built) goes back
/// through `report` as a message to log (this thread never logs).
pub(crate) fn run(sh: Arc<Shared>, mut sink: Sink, buffers: Buffers, report: std::sync::mpsc::Sender<Result<(), String>>) {
    if let Sink::Cpal(c) = sink {
        // cpal's callback thread plays; it asks for SCHED_FIFO itself.
        let _ = report.send(Ok(()));
        if let Err(e) = c.run(sh, buffers) {
            let _ = report.send(Err(e));
        }
        return;
    }
    sh.live.output_tid.store(sys::gettid(), Ordering::SeqCst);
    let fifo = sys::set_fifo(sh.live.output_priority.load(Ordering::SeqCst));
    sh.metrics.output_realtime.store(fifo.is_ok(), Ordering::Relaxed);
    let _ = report.send(fifo.map_err(|e| format!("output thread: SCHED_FIFO refused ({e}); playing without real-time priority")));
    drop(report);
    let bf = sh.config.block_frames as u64;
    let sr = sh.config.sample_rate as u64;
    let mut player = Player::new(sh.clone(), buffers);
    let device_name = match &sink {
        Sink::Alsa(d) => Some(d.info.name.clone()),
        _ => None,
    };
    let mut clock = VirtualClock::new(&sh);
    // Device gone: (next reopen attempt, current backoff).
    let mut reopen: Option<(u64, u64)> = None;
    // Why the device was lost (errno; ETIMEDOUT: it stopped making room).
    let mut lost_errno = 0;
    // Test-only faults (--test-fault-output-stall-ms, --test-fault-output-pause).
    let t0 = clock.start;
    let stall_at = sh.config.test_fault_output_stall_ms.map_or(u64::MAX, |ms| t0.saturating_add(ms.saturating_mul(1_000_000)));

    while sh.running.load(Ordering::Acquire) {
        // 1. Wait for the time (or the room) to play the next block.
        let now = match &mut sink {
            Sink::Alsa(dev) if reopen.is_none() => match dev.wait_room(bf as usize) {
                Ok(late_frames) => {
                    sh.metrics.output_wake_late_us.record(late_frames as u64 * 1_000_000 / sr);
                    sys::now_ns()
                }
                Err(alsa::DeviceError::Xrun) => {
                    sh.metrics.device_xruns.fetch_add(1, Ordering::Relaxed);
                    sys::now_ns()
                }
                Err(alsa::DeviceError::Gone(errno)) => {
                    lost_errno = errno;
                    lose_device(&sh, &mut reopen, &mut clock);
                    continue;
                }
            },
            _ => {
                let deadline = clock.wait();
                sh.metrics.output_wake_late_us.record(sys::now_ns().saturating_sub(deadline) / 1000);
                deadline
            }
        };
        if now >= stall_at {
            continue; // wedged: alive, but the position never advances again
        }
        if let (Some((when, backoff)), Some(name)) = (reopen, &device_name) {
            if now >= when {
                match alsa::AlsaOut::open(name, sh.config.sample_rate, sh.config.block_frames, sh.config.device_periods) {
                    // The device must come back at our rate (start-up checks the same).
                    Ok(dev) if dev.info.rate == sh.config.sample_rate => {
                        if let Sink::Alsa(lost) = std::mem::replace(&mut sink, Sink::Alsa(dev)) {
                            lost.close_after_loss(lost_errno);
                        }
                        reopen = None;
                        sh.output_degraded.store(false, Ordering::Release);
                        continue;
                    }
                    Ok(_) | Err(_) => reopen = Some((now + backoff, (backoff * 2).min(REOPEN_MAX_NS))),
                }
            }
        }

        // 2. Play block `pos` from any ring that holds it, or silence.
        let out = player.next(now);
        match &mut sink {
            Sink::Virtual => {}
            Sink::Wav(tap) => tap.push(out),
            Sink::Alsa(_) if reopen.is_some() => {}
            Sink::Cpal(_) => unreachable!("cpal plays from its own callback"),
            Sink::Alsa(dev) => {
                let mut r = dev.write(out);
                if r == Err(alsa::DeviceError::Xrun) {
                    // Recovered (prepared): count it and write the block again.
                    sh.metrics.device_xruns.fetch_add(1, Ordering::Relaxed);
                    r = dev.write(out);
                }
                match r {
                    Ok(()) => {
                        if let Some(d) = dev.delay_frames() {
                            sh.metrics.output_latency_frames.store(d.max(0) as u64, Ordering::Relaxed);
                        }
                    }
                    Err(alsa::DeviceError::Xrun) => {
                        sh.metrics.device_xruns.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(alsa::DeviceError::Gone(errno)) => {
                        lost_errno = errno;
                        lose_device(&sh, &mut reopen, &mut clock)
                    }
                }
            }
        }
    }
}

/// The output stage's work for one block, shared by the paced loop above and cpal's callback.
/// Audio-thread code: no allocation after [`Player::new`], no lock, no log.
pub(crate) struct Player {
    sh: Arc<Shared>,
    block: Vec<f32>,
    silence: Vec<f32>,
    /// Test-only fault (--test-fault-output-pause): (when, for how long), CLOCK_MONOTONIC ns.
    pause: Option<(u64, u64)>,
}

impl Player {
    pub(crate) fn new(sh: Arc<Shared>, buffers: Buffers) -> Player {
        let t0 = sys::now_ns();
        let pause = sh.config.test_fault_output_pause.map(|(at, dur)| (t0 + at * 1_000_000, dur * 1_000_000));
        Player { sh, block: buffers.block, silence: buffers.silence, pause }
    }

    /// Without the test-only pause fault (a player made after start-up, for a device lost and
    /// rebuilt, must not pause again).
    pub(crate) fn without_test_fault(mut self) -> Player {
        self.pause = None;
        self
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
        let bf = sh.config.block_frames as u64;
        let pos = sh.position.load(Ordering::Relaxed);
        let mut played = None;
        let block = &mut self.block;
        sh.table.for_each(|w| {
            played = w.ring.read_block(pos, block);
            played.is_none()
        });
        match played {
            Some(state) => {
                // Seqlock write (see Shared::clock_seq): position and its start time change
                // together for readers.
                sh.clock_seq.fetch_add(1, Ordering::AcqRel);
                sh.last_period_ns.store(now, Ordering::Release);
                sh.position.store(pos + 1, Ordering::Release);
                sh.clock_seq.fetch_add(1, Ordering::Release);
                sh.metrics.frames_played.fetch_add(bf, Ordering::Relaxed);
                sh.metrics.played_seq.store(state.last_seq, Ordering::Relaxed);
                // Free the slot in every ring and wake the writers.
                sh.table.for_each(|w| {
                    w.ring.set_read_index(pos + 1);
                    if w.running.load(Ordering::Relaxed) {
                        w.wake.notify();
                    }
                    true
                });
            }
            None => {
                sh.metrics.underruns.fetch_add(1, Ordering::Relaxed);
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

/// The device went away: the virtual clock takes over from now, the state is degraded, and a
/// reopen is scheduled.
fn lose_device(sh: &Shared, reopen: &mut Option<(u64, u64)>, clock: &mut VirtualClock) {
    if reopen.is_none() {
        let now = sys::now_ns();
        *reopen = Some((now + REOPEN_FIRST_NS, REOPEN_FIRST_NS * 2));
        clock.restart(now);
        sh.output_degraded.store(true, Ordering::Release);
        sh.metrics.device_losses.fetch_add(1, Ordering::Relaxed);
    }
}
