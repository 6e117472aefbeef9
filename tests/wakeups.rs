//! What the service costs at idle is mostly its wake-ups (issue 13): the virtual clock wakes
//! once every 2 periods, the output wakes each worker once a batch (4 blocks at the defaults)
//! instead of after every block, the monitor's timer ticks every 64 blocks when all is well (the
//! output wakes it when a worker needs judging), the reserve sleeps, and the D-Bus bridge sleeps until
//! something changes instead of polling. Counted on the real daemon from the kernel's
//! per-thread voluntary context switches (each one sleep ended by one wake-up), against the
//! blocks played in the same window.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::bus::{get_u64, proxy, Daemon, PrivateBus};
use common::wait_until;

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Voluntary context switches of every thread of `pid`, by thread name (workers by role).
fn wakeups(pid: u32, into: &mut BTreeMap<String, u64>) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
    for t in tasks.flatten() {
        let base = t.path();
        let (Some(comm), Some(status)) =
            (read(&format!("{}/comm", base.display())), read(&format!("{}/status", base.display())))
        else {
            continue;
        };
        let n: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        // `aw3.12 primary` -> `primary`.
        let name = match comm.trim().split_once(' ') {
            Some((id, role)) if id.starts_with("aw") => role.to_owned(),
            _ => comm.trim().to_owned(),
        };
        *into.entry(name).or_default() += n;
    }
}

fn census(pids: &[u32]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for &p in pids {
        wakeups(p, &mut m);
    }
    m
}

#[test]
fn the_output_wakes_every_2_periods_workers_once_a_batch_and_nothing_polls() {
    let bus = PrivateBus::start();
    let d = Daemon::start(&bus, "wakeups", &[]);
    let conn = bus.connection();
    let p = proxy(&conn);
    let mut m = p.get_metrics().unwrap();
    wait_until("spare and reserve ready", Duration::from_secs(5), || {
        m = p.get_metrics().unwrap();
        get_u64(&m, "reserve_pid") != 0 && get_u64(&m, "spare_pid") != 0
    });
    std::thread::sleep(Duration::from_millis(500)); // the reserve's start-up is not idle
    let pids = [
        d.pid(),
        get_u64(&m, "primary_pid") as u32,
        get_u64(&m, "spare_pid") as u32,
        get_u64(&m, "reserve_pid") as u32,
    ];
    let played0 = get_u64(&p.get_metrics().unwrap(), "frames_played");
    let before = census(&pids);
    std::thread::sleep(Duration::from_secs(3));
    let after = census(&pids);
    let m1 = p.get_metrics().unwrap();
    let blocks = (get_u64(&m1, "frames_played") - played0) / 64;
    assert!(blocks > 2000, "played only {blocks} blocks in 3 s");
    assert_eq!(get_u64(&m1, "crash_count"), get_u64(&m, "crash_count"), "a worker was replaced meanwhile");
    let woke = |name: &str| after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0);
    let report = format!(
        "{blocks} blocks; wake-ups: {:?}",
        after.keys().map(|k| (k.as_str(), woke(k))).filter(|(_, n)| *n > 0).collect::<Vec<_>>()
    );
    eprintln!("{report}");
    // The virtual clock wakes once every 2 periods and plays 2 blocks (every period before).
    assert!(woke("aw-output") <= blocks / 2 + blocks / 20 + 10, "{report}");
    // Each rendering worker: once a batch of 4 (every block before), plus slack for the two
    // GetMetrics calls' edges and a late wake-up's catch-up.
    for role in ["primary", "spare"] {
        assert!(woke(role) <= blocks / 4 + blocks / 20 + 10, "{role} woke too often: {report}");
        assert!(woke(role) >= blocks / 8, "{role} did not render: {report}");
    }
    assert!(woke("reserve") <= 5, "the idle reserve woke: {report}");
    // The monitor's timer, all being well: every 64 blocks (every block before); the output
    // wakes it only for a worker that looks hung, and none does here.
    assert!(woke("aw-monitor") <= blocks / 32 + 10, "{report}");
    // Nothing changed on the bus: the bridge sleeps (it woke 20 times a second before); its
    // bus check every 2 s is all.
    // (Each check is two sleeps: the wait, and the reply's.)
    assert!(woke("aw-dbus") <= 8, "the D-Bus bridge polls: {report}");
    let total: u64 = after.keys().map(|k| woke(k)).sum();
    // 1/2 (output) + 1/64 (monitor) + 2 x 1/4 (workers): about 1 (4 before).
    assert!(total * 100 <= blocks * 110, "more than 1.1 wake-ups a block: {report}");
}
