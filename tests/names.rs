//! Workers are recognisable in `top`, `ps -e` and `pstree`: their process name is
//! `aw<slot>.<generation> <role>` (the slot and generation of their segments, ring-SLOT-gGEN),
//! and it follows their role when a failover changes it. The supervisor's threads keep their
//! names.

mod common;

use std::process::Command;
use std::time::Duration;

use audiowarden::shm::registry::Manifest;
use audiowarden::{OutputSpec, StandbyMode, Supervisor};
use common::*;

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim_end().to_owned()
}

/// What `ps -e` shows for `pid`.
fn ps_name(pid: u32) -> String {
    let out = Command::new("ps").args(["-o", "comm=", "-p", &pid.to_string()]).output().expect("ps");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The name worker `pid` must have as `role`, from its segment in the manifest
/// (`ring-SLOT-gGEN`, owner `worker-GEN (pid PID)`); None until the manifest lists it (the
/// housekeeping thread writes it just after the change).
fn expected_name(shm: &ShmDir, pid: u32, role: &str) -> Option<String> {
    let text = std::fs::read_to_string(shm.0.join("manifest.json")).ok()?;
    let m: Manifest = serde_json::from_str(&text).ok()?;
    let owner = format!("(pid {pid})");
    let ring = m.allocations.iter().find(|a| a.id.starts_with("ring-") && a.owner.ends_with(&owner))?;
    let (slot, generation) = ring.id["ring-".len()..].split_once("-g")?;
    Some(format!("aw{slot}.{generation} {role}"))
}

fn wait_named(shm: &ShmDir, pid: u32, role: &str) {
    let mut want = None;
    wait_until(&format!("worker {pid} named as its {role} (is {:?})", comm(pid)), Duration::from_secs(2), || {
        want = expected_name(shm, pid, role);
        want.as_deref() == Some(comm(pid).as_str())
    });
    assert_eq!(Some(ps_name(pid)), want, "ps -e shows the same name");
}

#[test]
fn workers_are_named_by_slot_generation_and_role() {
    let shm = ShmDir::new("names");
    let cfg = config(&shm, OutputSpec::Virtual, StandbyMode::Hot, 440.0, 0.25);
    let sup = Supervisor::start(cfg).expect("start");
    let mut watch = Watch::new(&sup);
    wait_until("the first reserve", Duration::from_secs(2), || sup.metrics().reserve_pid != 0);
    let m = sup.metrics();
    wait_named(&shm, m.primary_pid, "primary");
    wait_named(&shm, m.spare_pid, "spare");
    wait_named(&shm, m.reserve_pid, "reserve");

    // A kill moves every role along: the spare is now the primary, the reserve the spare,
    // and each takes its new name.
    let after = kill_primary_and_wait_rebuilt(&sup, &mut watch, m.primary_pid);
    assert_eq!((after.primary_pid, after.spare_pid), (m.spare_pid, m.reserve_pid));
    wait_named(&shm, after.primary_pid, "primary");
    wait_named(&shm, after.spare_pid, "spare");
    watch.reserve_after(m.primary_pid);
    wait_named(&shm, sup.metrics().reserve_pid, "reserve");

    // The supervisor (this process) keeps its threads' names.
    let threads: Vec<String> =
        std::fs::read_dir("/proc/self/task").unwrap().map(|t| comm_of_task(&t.unwrap().path())).collect();
    for name in ["aw-output", "aw-monitor", "aw-events", "aw-housekeeping"] {
        assert!(threads.iter().any(|t| t == name), "no thread {name}: {threads:?}");
    }
    sup.shutdown().unwrap();
}

fn comm_of_task(task: &std::path::Path) -> String {
    std::fs::read_to_string(task.join("comm")).unwrap_or_default().trim_end().to_owned()
}
