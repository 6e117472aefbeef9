//! 50 kill cycles: every crash is counted and replaced, the spare comes back each time, and
//! nothing leaks: no segment, no manifest entry, no file descriptor.
//! (Its own test binary, so the fd count of the process is this test's alone.)

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use audiowarden::shm::registry::Manifest;
use audiowarden::{OutputSpec, StandbyMode, Supervisor};
use common::*;

fn dir_entries(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn fifty_kill_cycles_leave_nothing_behind() {
    let shm = ShmDir::new("cycles");
    let cfg = config(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.25);
    let sup = Supervisor::start(cfg).expect("start");
    let mut watch = Watch::new(&sup);
    // Every worker's fds (pidfd, two eventfds) exist from its spawn on.
    wait_until("the first reserve", Duration::from_secs(2), || sup.metrics().reserve_pid != 0);
    let fds_before = stable_fds(&shm.0);
    for n in 1..=50u64 {
        let victim = sup.metrics().primary_pid;
        let m = kill_primary_and_wait_rebuilt(&sup, &mut watch, victim);
        // The pool is whole again (a new reserve after this kill), so the fd count compares.
        watch.reserve_after(victim);
        assert!(m.spare_ready, "spare not ready after rebuild {n}");
        assert_eq!(m.crash_count, n);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the last dead rings drain and an audit run.
    std::thread::sleep(Duration::from_millis(1300));
    let m = sup.metrics();
    assert_eq!(m.crash_count, 50);
    assert_eq!(m.replacements, 50);
    assert!(m.spare_ready);
    assert_eq!(m.shm_leaks, 0);
    assert_eq!(m.underruns, 0);
    assert_eq!(m.failover_time_ms.count, 50);
    assert_eq!(m.rebuild_time_ms.count, 50);

    // The dir holds exactly the live workers' segments, and the manifest lists exactly those.
    let manifest: Manifest =
        serde_json::from_str(&std::fs::read_to_string(shm.0.join("manifest.json")).unwrap()).unwrap();
    let listed: BTreeSet<String> = manifest.allocations.iter().map(|a| a.id.clone()).collect();
    let mut files = dir_entries(&shm.0);
    files.remove("manifest.json");
    files.remove(".lock");
    assert_eq!(files, listed, "directory vs manifest");
    // Three live workers (primary, spare, reserve), two segments each, owned by them.
    assert_eq!(listed.len(), 6, "{listed:?}");
    let live = [m.primary_pid, m.spare_pid, m.reserve_pid];
    assert!(live.iter().all(|&p| p != 0), "a role is vacant: {live:?}");
    for a in &manifest.allocations {
        let pid_ok = live.iter().any(|p| a.owner.contains(&format!("pid {p})")));
        assert!(pid_ok, "{} owned by {}, not by a live worker {live:?}", a.id, a.owner);
    }
    assert_eq!(manifest.stats.active_count, 6);
    assert_eq!(manifest.stats.leaked_count, 0);

    assert_eq!(stable_fds(&shm.0), fds_before, "the supervisor's fds changed over 50 cycles");
    sup.shutdown().unwrap();
    assert_shm_dir_emptied(&shm.0);
}
