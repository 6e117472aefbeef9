//! The output stage through cpal (`--output cpal:DEVICE`): cpal owns the device and calls us
//! back for samples; the callback plays the engine's blocks through the same [`Player`] as the
//! paced loop. cpal's callback sizes need not match our blocks, so the last block is kept and
//! consumed across callbacks.
//!
//! Audio thread code (the callback): after the stream is built nothing allocates, locks or
//! logs; the callback asks for SCHED_FIFO on its first call and reports through atomics.
//! cpal's xrun errors count into `device_xruns`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::cpal::traits::{DeviceTrait, HostTrait, StreamTrait};

use super::{Buffers, Player};
use crate::supervisor::Shared;
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

    /// Plays until the supervisor stops. Returns an error if the stream cannot be built.
    pub(crate) fn run(self, sh: Arc<Shared>, buffers: Buffers) -> Result<(), String> {
        let config = ::cpal::StreamConfig {
            channels: 2,
            sample_rate: sh.config.sample_rate,
            buffer_size: ::cpal::BufferSize::Fixed(sh.config.block_frames),
        };
        let mut player = Player::new(sh.clone(), buffers);
        // The block being consumed, and how much of it is left.
        let mut current = vec![0.0f32; sh.geo.samples_per_block()];
        let mut used = current.len();
        let mut first = true;
        let cb_sh = sh.clone();
        let err_sh = sh.clone();
        let stream = self
            .device
            .build_output_stream(
                config,
                move |data: &mut [f32], _: &::cpal::OutputCallbackInfo| {
                    if first {
                        first = false;
                        cb_sh.live.output_tid.store(sys::gettid(), Ordering::Relaxed);
                        let ok = sys::set_fifo(cb_sh.live.output_priority.load(Ordering::Relaxed)).is_ok();
                        cb_sh.metrics.output_realtime.store(ok, Ordering::Relaxed);
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
                },
                move |e: ::cpal::Error| {
                    if e.kind() == ::cpal::ErrorKind::Xrun {
                        err_sh.metrics.device_xruns.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // The stream is broken (device gone, invalidated): nothing plays, say so.
                        err_sh.metrics.device_losses.fetch_add(1, Ordering::Relaxed);
                        err_sh.output_degraded.store(true, Ordering::Release);
                    }
                },
                None,
            )
            .map_err(|e| format!("cpal: cannot build the output stream on {}: {e}", self.name))?;
        stream.play().map_err(|e| format!("cpal: cannot start {}: {e}", self.name))?;
        while sh.running.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(stream);
        Ok(())
    }
}
