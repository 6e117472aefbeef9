//! The virtual clock behaves like a sound card with a buffer of `--device-periods` blocks: an
//! output thread that wakes up later than that buffer is one xrun (counted apart from
//! `underruns`), the clock resyncs to now and playback continues where it was; it never
//! bursts through the missed periods, which would outrun the workers and read as engine
//! underruns. (The test-only pause makes the output thread sleep 200 ms once: the buffer is
//! 4 x 64 frames, 5.3 ms.)

mod common;

use std::time::Duration;

use audiowarden::{OutputSpec, StandbyMode, Supervisor};
use common::*;

fn paused_output(output: OutputSpec, tag: &str) -> audiowarden::MetricsSnapshot {
    let shm = ShmDir::new(tag);
    let mut cfg = config(&shm, output, StandbyMode::Hot, 1000.0, 0.5);
    cfg.test_fault_output_pause = Some((300, 200));
    let sup = Supervisor::start(cfg).expect("start");
    std::thread::sleep(Duration::from_millis(900));
    let m = sup.metrics();
    sup.shutdown().expect("shutdown");
    // The pause is one xrun. The machine may stall the output thread beyond the 5.3 ms buffer
    // on its own too (a VM here: TESTING.md), and each such wake-up is one more: every xrun
    // is a wake-up later than 4 ms (the histogram's bound below the buffer), never more.
    let h = &m.output_wake_late_us;
    let i = audiowarden::metrics::histogram::EXPORTED_BOUNDS_US.iter().position(|&b| b == 4095).unwrap();
    let late_wakeups = h.count - h.cumulative[i];
    assert!(m.device_xruns >= 1, "the late wake-up of the output thread is an xrun: {m:?}");
    assert!(m.device_xruns <= late_wakeups, "an xrun per late wake-up, no more ({late_wakeups}): {m:?}");
    assert_eq!(m.underruns, 0, "the engine was never late; the output thread was: {m:?}");
    assert!(m.output_wake_late_us.max >= 150_000, "the pause shows as a late wake-up: {m:?}");
    assert_eq!(m.crash_count, 0, "{m:?}");
    m
}

#[test]
fn a_late_output_thread_on_the_virtual_clock_is_one_xrun() {
    let m = paused_output(OutputSpec::Virtual, "vclock-virtual");
    // Resynced, not catching up: about 0.9 s minus the 0.2 s pause was played, not 0.9 s.
    let played_s = m.frames_played as f64 / 48_000.0;
    assert!(played_s < 0.85, "played {played_s:.3} s in 0.9 s: the missed periods were played through");
}

#[test]
fn a_late_output_thread_on_wav_is_one_xrun_and_the_recording_continues_exactly() {
    let wav = temp_wav("vclock-wav");
    let shm = ShmDir::new("vclock-wav-ref");
    let cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), StandbyMode::Hot, 1000.0, 0.5);
    paused_output(OutputSpec::Wav(wav.path.clone()), "vclock-wav");
    // What was played is the uninterrupted stream: the xrun lost time, not samples.
    assert_matches_reference(&wav.path, &cfg, &[], false);
}
