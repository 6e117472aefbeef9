//! Kill storms: a SIGKILL every 20-50 ms for 60 s, each at a random role or set of roles
//! (the primary, the spare, the reserve, primary and spare together, all three), whether or
//! not the last kill has been recovered from. With the restart intensity raised (this
//! measures recovery, not the brake): every kill is counted exactly once, nothing leaks
//! (directory = manifest = live workers; the supervisor's fds and resident memory flat), and
//! the audio never runs dry while a standby or reserve was ready: any underrun happened during
//! a cold start (no ready worker left, counted in `cold_starts`, its silence in
//! `cold_start_underruns`), or while the stall probe saw the machine itself stall longer than
//! the lookahead. At the default restart intensity the brake engages, and that is counted.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use audiowarden::shm::registry::Manifest;
use audiowarden::{MetricsSnapshot, OutputSpec, StandbyMode, Supervisor};
use common::stall::StallProbe;
use common::storm::{drain_deaths, storm, PATTERNS};
use common::*;

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// Waits until the pool is whole again and the dead workers' segments are reclaimed and
/// audited.
fn settle(sup: &Supervisor) -> MetricsSnapshot {
    wait_until("the pool whole again", Duration::from_secs(15), || {
        let m = sup.metrics();
        sup.state() == audiowarden::State::Running && m.reserve_pid != 0 && m.shm_segments == 6
    });
    std::thread::sleep(Duration::from_millis(2500)); // drained, reclaimed, audited
    sup.metrics()
}

fn assert_no_leaks(sup: &Supervisor, shm: &ShmDir, m: &MetricsSnapshot) {
    assert_eq!(m.shm_leaks, 0, "{m:?}");
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(shm.0.join("manifest.json")).unwrap()).unwrap();
    let listed: BTreeSet<String> = manifest.allocations.iter().map(|a| a.id.clone()).collect();
    let files: BTreeSet<String> = std::fs::read_dir(&shm.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json" && n != ".lock")
        .collect();
    assert_eq!(files, listed, "directory vs manifest");
    assert_eq!(listed.len(), 6, "three live workers, two segments each: {listed:?}");
    let live = [m.primary_pid, m.spare_pid, m.reserve_pid];
    for a in &manifest.allocations {
        assert!(
            live.iter().any(|p| a.owner.contains(&format!("pid {p})"))),
            "{} owned by {}, not by a live worker {live:?}",
            a.id,
            a.owner
        );
    }
    assert_eq!(sup.state(), audiowarden::State::Running);
}

#[test]
fn a_sixty_second_kill_storm_over_every_role_leaves_nothing_behind() {
    let shm = ShmDir::new("storm");
    let mut cfg = config_quiet(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.25);
    cfg.max_restarts = 1_000_000; // recovery, not the brake
    let secs = std::env::var("AW_STORM_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let sup = Supervisor::start(cfg).expect("start");
    let rx = sup.subscribe();
    let (mut died, mut duplicate) = (HashSet::new(), 0);
    // The baseline of the leak checks, once everything runs (a short storm first, so that the
    // allocator has seen every kind of event).
    storm(&sup, &rx, &mut died, &mut duplicate, 2);
    settle(&sup);
    let fds_before = stable_fds(&shm.0);
    let rss_before = vm_rss_kib();
    let m0 = sup.metrics();
    let probe = StallProbe::start();
    let s = storm(&sup, &rx, &mut died, &mut duplicate, secs);
    let stalls = probe.stop();
    let m = settle(&sup);
    drain_deaths(&rx, &mut died, &mut duplicate);
    eprintln!(
        "storm: {} kills in {secs} s ({:?} by pattern), {} workers killed; crashes {}, cold starts {}, underruns {} ({} during cold starts), hang kills {}; {}",
        s.kills,
        PATTERNS.iter().map(|p| p.0).zip(s.by_pattern).collect::<Vec<_>>(),
        s.killed.len(),
        m.crash_count - m0.crash_count,
        m.cold_starts - m0.cold_starts,
        m.underruns - m0.underruns,
        m.cold_start_underruns - m0.cold_start_underruns,
        m.hang_kills - m0.hang_kills,
        stalls.summary()
    );
    // Every kill counted once: each killed worker's death reported exactly once, and nothing
    // else died (with real-time scheduling: without it a starved worker may be declared hung).
    assert_eq!(duplicate, 0, "a death reported twice");
    let missing: Vec<_> = s.killed.iter().filter(|p| !died.contains(p)).collect();
    assert!(missing.is_empty(), "killed but never reported dead: {missing:?}");
    // Nothing else died, but for workers the heartbeat declared hung (a vCPU of this VM
    // stalled longer than half the lookahead under one of them): counted, and reported above.
    let (deaths, hangs) = (m.crash_count - m0.crash_count, m.hang_kills - m0.hang_kills);
    assert!(
        deaths >= s.killed.len() as u64 && deaths - s.killed.len() as u64 <= hangs,
        "{} killed, {deaths} deaths, {hangs} hang kills: {m:?}",
        s.killed.len()
    );
    if m.realtime {
        // Silence only while no standby or reserve was ready, or while the machine itself
        // stalled longer than the lookahead (10.7 ms).
        let outside_cold = (m.underruns - m0.underruns) - (m.cold_start_underruns - m0.cold_start_underruns);
        let lookahead_ns = 8 * 64 * 1_000_000_000 / 48_000;
        assert!(
            outside_cold == 0 || stalls.max_late_ns > lookahead_ns,
            "{outside_cold} underruns with a ready standby or reserve ({})",
            stalls.summary()
        );
    }
    assert_eq!(m.throttled_spawns, 0, "the raised intensity never throttles: {m:?}");
    assert_no_leaks(&sup, &shm, &m);
    assert_eq!(stable_fds(&shm.0), fds_before, "the supervisor's fds changed over the storm");
    let rss_after = vm_rss_kib();
    assert!(rss_after <= rss_before + 2048, "resident memory grew from {rss_before} to {rss_after} KiB over the storm");
    sup.shutdown().unwrap();
    assert_shm_dir_emptied(&shm.0);
}

/// The same storm at the default restart intensity (100 deaths in 10 s): the brake engages,
/// is counted, and once the storm is over everything is rebuilt.
#[test]
fn a_kill_storm_at_the_default_restart_intensity_is_throttled_and_counted() {
    let shm = ShmDir::new("storm-brake");
    let cfg = config_quiet(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.25);
    let sup = Supervisor::start(cfg).expect("start");
    let rx = sup.subscribe();
    let (mut died, mut duplicate) = (HashSet::new(), 0);
    let s = storm(&sup, &rx, &mut died, &mut duplicate, 8);
    let m = sup.metrics();
    eprintln!(
        "storm at the defaults: {} kills; throttled spawns {}, cold starts {}, underruns {}",
        s.kills, m.throttled_spawns, m.cold_starts, m.underruns
    );
    assert!(m.throttled_spawns > 0, "more than 100 deaths in 10 s must engage the brake: {m:?}");
    // The brake holds back new workers (up to 5 s); then the pool is rebuilt.
    let m = settle(&sup);
    drain_deaths(&rx, &mut died, &mut duplicate);
    assert_eq!(duplicate, 0);
    assert!(s.killed.iter().all(|p| died.contains(p)), "every kill counted");
    assert_no_leaks(&sup, &shm, &m);
    sup.shutdown().unwrap();
}
