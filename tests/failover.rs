//! Crash-proof audio: SIGKILL or SIGSTOP workers while a tone plays through `wav:`, and check
//! that what was played equals the crash-free reference render, sample for sample.

mod common;

use std::time::Duration;

use audiowarden::{OutputSpec, StandbyMode, Supervisor};
use common::*;

fn three_random_kills(standby: StandbyMode, tag: &str) {
    let shm = ShmDir::new(tag);
    let wav = temp_wav(tag);
    let cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), standby, 1000.0, 0.5);
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut watch = Watch::new(&sup);
    let mut rng = Rng::new();
    for _ in 1..=3 {
        std::thread::sleep(rng.range_ms(100, 500));
        let victim = sup.metrics().primary_pid;
        kill_primary_and_wait_rebuilt(&sup, &mut watch, victim);
    }
    std::thread::sleep(Duration::from_millis(200));
    let m = sup.metrics();
    sup.shutdown().expect("shutdown");
    assert_eq!(m.crash_count, 3);
    assert_eq!(m.replacements, 3);
    assert_eq!(m.underruns, 0, "underruns during failover: {m:?}");
    assert_eq!(m.failover_time_ms.count, 3);
    assert_matches_reference(&wav.path, &cfg, &[], false);
    assert_shm_dir_emptied(&shm.0);
}

#[test]
fn hot_standby_three_kills_are_inaudible() {
    three_random_kills(StandbyMode::Hot, "kill3-hot");
}

#[test]
fn warm_standby_three_kills_are_inaudible() {
    three_random_kills(StandbyMode::Warm, "kill3-warm");
}

/// A frequency change issued within a block period of a kill is applied exactly once, at its
/// stamped frame, whichever worker renders that frame.
fn change_around_kill(standby: StandbyMode, tag: &str) {
    let shm = ShmDir::new(tag);
    let wav = temp_wav(tag);
    let cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), standby, 1000.0, 0.5);
    let (m, msgs) = changes_around_kills(&cfg);
    assert_eq!(m.crash_count, 2);
    assert_eq!(m.underruns, 0);
    assert_eq!(m.control_received, 3);
    assert_eq!(m.control_applied, 3, "last applied sequence number");
    assert_eq!(m.control_late, 0);
    // Every block played knew every change stamped inside it and continued the one before,
    // and no ring had to be replaced for rendering another stream.
    assert_eq!((m.stale_blocks, m.stream_discontinuities, m.output_divergences), (0, 0, 0), "{m:?}");
    assert_matches_reference(&wav.path, &cfg, &msgs, false);
}

#[test]
fn hot_standby_change_at_kill_applies_once_at_its_frame() {
    change_around_kill(StandbyMode::Hot, "chg-hot");
}

#[test]
fn warm_standby_change_at_kill_applies_once_at_its_frame() {
    change_around_kill(StandbyMode::Warm, "chg-warm");
}

#[test]
fn stopped_primary_is_detected_killed_and_replaced() {
    let shm = ShmDir::new("sigstop");
    let wav = temp_wav("sigstop");
    let cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), StandbyMode::Hot, 1000.0, 0.5);
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut watch = Watch::new(&sup);
    std::thread::sleep(Duration::from_millis(300));
    let victim = sup.metrics().primary_pid;
    signal(victim, libc::SIGSTOP);
    let hang = watch.wait("the hang of the stopped primary", Duration::from_secs(5), |e| match e {
        audiowarden::Event::HangDetected { pid, why, .. } if *pid == victim => Some(*why),
        _ => None,
    });
    assert_eq!(hang, "stopped");
    let m = wait_rebuilt_after(&sup, &mut watch, victim);
    std::thread::sleep(Duration::from_millis(200));
    let m2 = sup.metrics();
    sup.shutdown().expect("shutdown");
    assert_eq!(m.hang_kills, 1);
    assert_eq!(m.crash_count, 1);
    assert_ne!(m.primary_pid, victim);
    assert!(!std::path::Path::new(&format!("/proc/{victim}")).exists(), "hung worker still exists");
    assert_eq!(m2.underruns, 0);
    assert_matches_reference(&wav.path, &cfg, &[], false);
}

/// Primary and spare SIGKILLed together. With a reserve, it takes over like a warm standby;
/// without one, a worker is started cold. Either way both are rebuilt and the stream resumes
/// exactly where it stopped (any underruns are counted and are the only difference).
fn both_killed(reserve_workers: u32, tag: &str) {
    let shm = ShmDir::new(tag);
    let wav = temp_wav(tag);
    let mut cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), StandbyMode::Hot, 1000.0, 0.5);
    cfg.reserve_workers = reserve_workers;
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut watch = Watch::new(&sup);
    std::thread::sleep(Duration::from_millis(300));
    let m0 = sup.metrics();
    signal(m0.primary_pid, libc::SIGKILL);
    signal(m0.spare_pid, libc::SIGKILL);
    // Whichever death the monitor handles first, each is answered by one replacement (the
    // takeover from the primary may be overtaken by the spare's death, so it is not awaited).
    for victim in [m0.primary_pid, m0.spare_pid] {
        watch.died(victim);
        watch.replaced(victim);
    }
    let m = sup.metrics();
    std::thread::sleep(Duration::from_millis(300));
    let m2 = sup.metrics();
    sup.shutdown().expect("shutdown");
    assert_eq!(m.crash_count, 2);
    assert_eq!(m.replacements, 2);
    assert!(m2.spare_ready || m.spare_ready);
    assert_ne!(m2.primary_pid, m0.primary_pid);
    assert_ne!(m2.primary_pid, m0.spare_pid);
    assert!(m2.frames_played > m.frames_played, "audio did not resume");
    // The stream paused (underruns, counted) and resumed exactly where it stopped.
    let skipped = assert_matches_reference(&wav.path, &cfg, &[], true);
    assert_eq!(skipped as u64, m2.underruns, "silent blocks in the capture vs underruns counted");
    eprintln!("both killed ({tag}): {} underruns", m2.underruns);
}

#[test]
fn primary_and_spare_killed_together_reserve_takes_over() {
    both_killed(1, "both-reserve");
}

#[test]
fn primary_and_spare_killed_together_cold_start_without_reserve() {
    both_killed(0, "both-cold");
}

/// A worker started ahead of the output (the reserve taking over like a warm standby, from
/// where the dead primary's blocks end) killed before the output gets there, with a hot spare
/// started from its newest block: the blocks between exist only in the dead worker's ring,
/// which must stay playable until the output has passed them (it once was retired at once,
/// because it held nothing at the output's position yet: a hole, silence until a later
/// takeover re-rendered from the played state). Repeated at several delays; bit-exact.
#[test]
fn a_worker_killed_before_the_output_reaches_its_first_block_leaves_no_hole() {
    let shm = ShmDir::new("ahead");
    let wav = temp_wav("ahead");
    let mut cfg = config(&shm, OutputSpec::Wav(wav.path.clone()), StandbyMode::Hot, 1000.0, 0.5);
    cfg.max_restarts = 1_000_000;
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut watch = Watch::new(&sup);
    std::thread::sleep(Duration::from_millis(200));
    for k in 0..24u64 {
        let m = sup.metrics();
        // Primary and spare together: the reserve takes over from the end of the primary's run.
        signal(m.primary_pid, libc::SIGKILL);
        signal(m.spare_pid, libc::SIGKILL);
        watch.died(m.primary_pid);
        watch.died(m.spare_pid);
        // Once a new spare runs hot behind it, kill the new primary while the output is still
        // playing the dead primary's blocks (its lookahead is 10.7 ms).
        std::thread::sleep(Duration::from_micros(2_500 + 250 * (k % 12)));
        let primary = sup.metrics().primary_pid;
        signal(primary, libc::SIGKILL);
        watch.died(primary);
        wait_until("the pool whole again", Duration::from_secs(5), || {
            let m = sup.metrics();
            m.spare_ready && m.reserve_pid != 0 && m.primary_pid != primary
        });
        std::thread::sleep(Duration::from_millis(30));
    }
    let m = sup.metrics();
    sup.shutdown().expect("shutdown");
    let outside_cold = m.underruns - m.cold_start_underruns;
    eprintln!(
        "killed ahead of the output 24 times: {} underruns, {} during cold starts",
        m.underruns, m.cold_start_underruns
    );
    if m.realtime {
        assert_eq!(outside_cold, 0, "silence with a ready standby: {m:?}");
    }
    let skipped = assert_matches_reference(&wav.path, &cfg, &[], true);
    assert_eq!(skipped as u64, m.underruns, "silent blocks vs underruns");
}
