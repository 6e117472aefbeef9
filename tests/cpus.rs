//! The standby is only a second copy of the stream if it runs on another CPU. Left to the
//! scheduler, a primary and a hot spare woken at different phases stay on the CPU they last ran
//! on, mostly the same one, and a stall of that CPU (a long non-preemptible kernel section:
//! 20-45 ms under memory pressure on these VMs) holds up both: tests/memory.rs heard underruns
//! in 6 runs of 8 that way. So the monitor pins the primary and the standby (hot or warm) to
//! different CPUs, keeps a promoted spare where it is (nothing moves in a takeover) and puts
//! each new standby on the CPU the primary does not use. Read back from the kernel
//! (/proc/PID/status), through kills of the primary and of the spare.

mod common;

use std::time::Duration;

use audiowarden::{OutputSpec, StandbyMode, Supervisor};
use common::*;

/// The CPUs worker `pid` may run on, as the kernel says (Cpus_allowed_list, e.g. "1" or "0-1").
fn allowed(pid: u32) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("worker status");
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("Cpus_allowed_list").trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The one CPU each of primary and standby is pinned to, once the monitor placed them.
fn placed(sup: &Supervisor) -> (u32, usize, u32, usize) {
    let mut last = None;
    for _ in 0..200 {
        let m = sup.metrics();
        if m.primary_pid != 0 && m.spare_pid != 0 && m.spare_ready && m.standby_on_other_cpu {
            let (p, s) = (allowed(m.primary_pid), allowed(m.spare_pid));
            if p.len() == 1 && s.len() == 1 {
                return (m.primary_pid, p[0], m.spare_pid, s[0]);
            }
            last = Some((p, s));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("primary and standby never pinned apart: {last:?}; {:?}", sup.metrics());
}

fn pinned_apart_through_kills(standby: StandbyMode, tag: &str) {
    let shm = ShmDir::new(tag);
    let cfg = config(&shm, OutputSpec::Virtual, standby, 440.0, 0.25);
    let sup = Supervisor::start(cfg).expect("start");
    if !sup.metrics().realtime {
        eprintln!("no real-time scheduling: workers are left to the scheduler's balancing; skipped");
        sup.shutdown().unwrap();
        return;
    }
    let mut watch = Watch::new(&sup);
    let (primary, p_cpu, spare, s_cpu) = placed(&sup);
    assert_ne!(p_cpu, s_cpu);
    let reserve = sup.metrics().reserve_pid;
    assert!(allowed(reserve).len() > 1, "the reserve is not pinned until it is the standby");

    // The primary dies: the spare takes over where it is, the new standby goes to the CPU the
    // dead primary had.
    signal(primary, libc::SIGKILL);
    assert_eq!(watch.failover(primary), spare);
    watch.replaced(primary);
    let (p2, p2_cpu, s2, s2_cpu) = placed(&sup);
    assert_eq!((p2, p2_cpu), (spare, s_cpu), "the promoted spare stays on its CPU");
    assert_eq!(s2_cpu, p_cpu, "the new standby runs where the primary does not");

    // The spare dies: its replacement goes where the primary is not.
    signal(s2, libc::SIGKILL);
    watch.died(s2);
    watch.replaced(s2);
    let (p3, p3_cpu, s3, s3_cpu) = placed(&sup);
    assert_eq!((p3, p3_cpu), (p2, p2_cpu), "a spare's death moves nothing");
    assert!(s3 != s2 && s3_cpu != p3_cpu);
    let m = sup.metrics();
    sup.shutdown().unwrap();
    assert_eq!(m.underruns, 0, "{m:?}");
}

#[test]
fn primary_and_standby_run_on_different_cpus_through_kills() {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("one CPU: nothing to pin apart; skipped");
        return;
    }
    pinned_apart_through_kills(StandbyMode::Hot, "cpus-hot");
    pinned_apart_through_kills(StandbyMode::Warm, "cpus-warm");
}
