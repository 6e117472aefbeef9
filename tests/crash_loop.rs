//! A crash loop (replacement workers that die at once) is throttled by the restart intensity
//! with an exponential backoff, and the audio keeps playing from the surviving primary.

mod common;

use std::time::Duration;

use audiowarden::{OutputSpec, StandbyMode, Supervisor};
use common::*;

#[test]
fn crash_looping_spares_are_throttled_and_audio_keeps_playing() {
    let shm = ShmDir::new("crashloop");
    let dir = tempfile::tempdir().unwrap();
    let script = crash_loop_worker(dir.path());
    let mut cfg = config(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.25);
    cfg.worker_exe = Some(script);
    cfg.max_restarts = 5;
    cfg.restart_window_s = 60;
    let sup = Supervisor::start(cfg).expect("start");
    std::thread::sleep(Duration::from_millis(200));
    let victim = sup.metrics().primary_pid;
    signal(victim, libc::SIGKILL);
    // The spare takes over, the reserve becomes the spare; every new reserve now dies at once.
    std::thread::sleep(Duration::from_secs(3));
    let m = sup.metrics();
    let played_before = m.frames_played;
    std::thread::sleep(Duration::from_millis(200));
    let m2 = sup.metrics();
    sup.shutdown().unwrap();
    assert_ne!(m.primary_pid, victim, "the spare took over");
    assert!(m.throttled_spawns > 0, "no backoff: {m:?}");
    // Unthrottled, a spare dying at start-up every few ms gives hundreds of deaths in 3 s;
    // with 5 allowed and a backoff doubling from 100 ms, a handful.
    assert!(m.crash_count >= 6 && m.crash_count <= 15, "crash_count {}", m.crash_count);
    assert!(m.spare_ready, "the reserve should have become the spare");
    assert_eq!(m.reserve_pid, 0, "no reserve survives the crash loop");
    assert_eq!(m2.underruns, 0, "the primary kept playing");
    assert!(m2.frames_played > played_before);
}
