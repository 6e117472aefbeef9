//! The output stage through cpal (`--output cpal:DEVICE`): cpal owns the device and calls us
//! back for samples; the callback plays the engine's blocks through the same [`Player`] as the
//! paced loop. cpal's callback sizes need not match our blocks, so the last block is kept and
//! consumed across callbacks.
//!
//! Audio thread code (the callback): after the stream is built nothing allocates, locks or
//! logs; the callback asks for SCHED_FIFO on its first call and reports through atomics.
//! cpal's xrun errors count into `device_xruns`. A stream that breaks or stalls is retired and
//! rebuilt (see [`CpalOut::run`]); meanwhile this module's thread plays the virtual clock, on a
//! degraded path that may allocate (a new player and stream).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

use super::{Buffers, Player, VirtualClock, REOPEN_FIRST_NS, REOPEN_MAX_NS};
use crate::playback::Playback;
use crate::sys;

/// Finds an output device by its cpal id (on Linux the ALSA PCM name; `default`: the host's
/// default device).
fn find(name: &str) -> Result<::cpal::Device, String> {
    let host = ::cpal::default_host();
    if name == "default" {
        return host.default_output_device().ok_or_else(|| "cpal: no default output device".to_owned());
    }
    let devices = host.output_devices().map_err(|e| format!("cpal: cannot enumerate output devices: {e}"))?;
    for d in devices {
        if d.id().is_ok_and(|id| id.id() == name) {
            return Ok(d);
        }
    }
    Err(format!("cpal: no output device named {name:?} (see --list-outputs)"))
}

/// Output devices cpal enumerates, as `(--output value, description)`.
pub fn list_outputs() -> Vec<(String, String)> {
    let host = ::cpal::default_host();
    let Ok(devices) = host.output_devices() else { return Vec::new() };
    devices
        .filter_map(|d| {
            let id = d.id().ok()?;
            Some((format!("cpal:{}", id.id()), format!("through cpal ({}): {d}", host.id().name())))
        })
        .collect()
}

/// A stream that makes no callback for this long has stopped: 500 ms, or four blocks when
/// they are longer.
fn stall_ns(sh: &Playback) -> u64 {
    (4 * sh.settings.block_ns()).max(500_000_000)
}

/// Between one stream's callback and the output thread.
#[derive(Default)]
struct Link {
    /// Callbacks so far (the output thread's proof that the stream plays).
    callbacks: AtomicU64,
    /// cpal reported the stream broken.
    broken: AtomicBool,
    /// The stream was given up: its callback (if it ever runs again) plays silence and leaves
    /// the engine alone, since another player now advances it.
    retired: AtomicBool,
    /// The callback is running.
    inside: AtomicBool,
}

impl Link {
    /// After this returns, the callback will not touch the engine again.
    fn retire(&self, sh: &Playback) {
        self.retired.store(true, Ordering::SeqCst);
        // Its thread is no longer the output's (a reload must not reprioritise a thread id
        // that may be gone and reused).
        sh.tid.store(0, Ordering::SeqCst);
        while self.inside.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A cpal device, checked at start-up; the stream is built on the output thread.
pub struct CpalOut {
    device: ::cpal::Device,
    pub name: String,
}

impl CpalOut {
    /// # Errors
    /// No such device.
    pub fn open(name: &str) -> Result<CpalOut, String> {
        Ok(CpalOut { device: find(name)?, name: name.to_owned() })
    }

    /// Plays until the supervisor stops. Returns an error if the first stream cannot be built.
    ///
    /// A stream that breaks (cpal reports the device gone) or stalls (no callback for
    /// [`stall_ns`]: a JACK server that went away leaves its clients waiting, without an error)
    /// is retired; this thread then plays the virtual clock (the engine keeps going, the state is
    /// degraded) and builds a new stream with backoff, as the ALSA output reopens its device.
    pub(crate) fn run(self, sh: Arc<Playback>, buffers: Buffers) -> Result<(), String> {
        let mut link = Arc::new(Link::default());
        let mut stream = self.build(&sh, Player::new(sh.clone(), buffers), &link)?;
        let stall = stall_ns(&sh);
        let mut seen = (0, sys::now_ns());
        // Device lost: (next rebuild attempt, backoff), and the virtual clock playing meanwhile.
        let mut lost: Option<(u64, u64)> = None;
        let mut stand_in =
            Player::new(sh.clone(), Buffers::new_locked(sh.settings.samples_per_block)).without_test_fault();
        let mut clock = VirtualClock::new(&sh);
        while sh.running.load(Ordering::Acquire) {
            let Some((when, backoff)) = lost else {
                let before = sys::now_ns();
                std::thread::sleep(Duration::from_millis(20));
                let (calls, now) = (link.callbacks.load(Ordering::Relaxed), sys::now_ns());
                // Progress, or this thread itself was held up (the process stopped, frozen):
                // then the callback thread was too, and gets a fresh chance.
                if calls != seen.0 || now - before > stall / 2 {
                    seen = (calls, now);
                }
                let stalled = now.saturating_sub(seen.1) > stall;
                if stalled || link.broken.load(Ordering::Acquire) {
                    link.retire(&sh);
                    match stream.take() {
                        // Its callback thread is stuck in the device: closing it could crash
                        // the device library (seen with JACK for ALSA), so it is leaked.
                        Some(s) if stalled => std::mem::forget(s),
                        other => drop(other),
                    }
                    sh.set_degraded(true);
                    sh.counters.device_losses.fetch_add(1, Ordering::Relaxed);
                    lost = Some((now + REOPEN_FIRST_NS, REOPEN_FIRST_NS * 2));
                    clock.restart(now);
                }
                continue;
            };
            let tick = clock.wait();
            if tick.xrun {
                sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
            }
            let deadline = tick.at;
            stand_in.next(deadline);
            if deadline < when {
                continue;
            }
            let fresh = Arc::new(Link::default());
            let player =
                Player::new(sh.clone(), Buffers::new_locked(sh.settings.samples_per_block)).without_test_fault();
            match find(&self.name)
                .map(|device| CpalOut { device, name: self.name.clone() })
                .and_then(|c| c.build(&sh, player, &fresh))
            {
                Ok(s) => {
                    (stream, link, lost) = (s, fresh, None);
                    seen = (0, sys::now_ns());
                    sh.set_degraded(false);
                }
                Err(_) => lost = Some((deadline + backoff, (backoff * 2).min(REOPEN_MAX_NS))),
            }
        }
        link.retire(&sh);
        if lost.is_none() && sys::now_ns().saturating_sub(seen.1) > stall {
            // Stalled but not yet retired: closing it could hang in the device; leak it.
            std::mem::forget(stream);
        }
        Ok(())
    }

    /// Builds and starts a stream whose callback plays through `player` and reports to `link`.
    fn build(
        &self,
        sh: &Arc<Playback>,
        mut player: Player,
        link: &Arc<Link>,
    ) -> Result<Option<::cpal::Stream>, String> {
        let config = ::cpal::StreamConfig {
            channels: 2,
            sample_rate: sh.settings.sample_rate,
            buffer_size: ::cpal::BufferSize::Fixed(sh.settings.block_frames),
        };
        // The block being consumed, and how much of it is left.
        let mut current = vec![0.0f32; sh.settings.samples_per_block];
        // Pinned: a rebuilt stream's buffer is allocated after start-up's mlockall.
        let _ = sys::mlock(current.as_ptr().cast(), std::mem::size_of_val(&current[..]));
        let mut used = current.len();
        let mut first = true;
        let cb_sh = sh.clone();
        let err_sh = sh.clone();
        let cb_link = link.clone();
        let err_link = link.clone();
        let stream = self
            .device
            .build_output_stream(
                config,
                move |data: &mut [f32], _: &::cpal::OutputCallbackInfo| {
                    // Dekker with `Link::retire`: either we see `retired`, or it sees us inside.
                    cb_link.inside.store(true, Ordering::SeqCst);
                    if cb_link.retired.load(Ordering::SeqCst) {
                        data.fill(0.0);
                        cb_link.inside.store(false, Ordering::SeqCst);
                        return;
                    }
                    cb_link.callbacks.fetch_add(1, Ordering::Relaxed);
                    if first {
                        first = false;
                        cb_sh.tid.store(sys::gettid(), Ordering::SeqCst);
                        let ok = sys::set_fifo(cb_sh.priority.load(Ordering::SeqCst)).is_ok();
                        cb_sh.counters.realtime.store(ok, Ordering::Relaxed);
                    }
                    let mut i = 0;
                    while i < data.len() {
                        if used == current.len() {
                            current.copy_from_slice(player.next(sys::now_ns()));
                            used = 0;
                        }
                        let n = (data.len() - i).min(current.len() - used);
                        data[i..i + n].copy_from_slice(&current[used..used + n]);
                        i += n;
                        used += n;
                    }
                    cb_link.inside.store(false, Ordering::SeqCst);
                },
                move |e: ::cpal::Error| {
                    if e.kind() == ::cpal::ErrorKind::Xrun {
                        err_sh.counters.device_xruns.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // The stream is broken (device gone, invalidated): the output thread
                        // retires it and builds another.
                        err_link.broken.store(true, Ordering::Release);
                    }
                },
                None,
            )
            .map_err(|e| format!("cpal: cannot build the output stream on {}: {e}", self.name))?;
        stream.play().map_err(|e| format!("cpal: cannot start {}: {e}", self.name))?;
        Ok(Some(stream))
    }
}
