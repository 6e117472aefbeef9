//! The kill storm, shared by its test (tests/kill_storm.rs) and its benchmark row
//! (benches/failover.rs): a SIGKILL every 20-50 ms at a random role or set of roles, whether
//! or not the last kill has been recovered from.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use audiowarden::{Event, Supervisor};

use super::Rng;

/// What to kill: the roles of one kill.
pub const PATTERNS: [(&str, &[usize]); 5] =
    [("primary", &[0]), ("spare", &[1]), ("reserve", &[2]), ("primary+spare", &[0, 1]), ("all three", &[0, 1, 2])];

/// What a storm did.
pub struct Storm {
    /// Every worker signalled.
    pub killed: HashSet<u32>,
    /// When each was signalled (CLOCK_MONOTONIC ns).
    pub killed_at: HashMap<u32, u64>,
    /// Kills (one kill may take several workers).
    pub kills: u64,
    pub by_pattern: [u64; 5],
}

/// Every worker death reported so far (the event channel is drained as the storm goes, so
/// nothing piles up in this process either).
pub fn drain_deaths(rx: &Receiver<Event>, died: &mut HashSet<u32>, duplicate: &mut u64) {
    for e in rx.try_iter() {
        if let Event::WorkerDied { pid, .. } = e {
            if !died.insert(pid) {
                *duplicate += 1;
            }
        }
    }
}

pub fn storm(sup: &Supervisor, rx: &Receiver<Event>, died: &mut HashSet<u32>, duplicate: &mut u64, secs: u64) -> Storm {
    let mut rng = Rng::new();
    let mut s = Storm { killed: HashSet::new(), killed_at: HashMap::new(), kills: 0, by_pattern: [0; 5] };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(rng.range_ms(20, 50));
        let m = sup.metrics();
        let roles = [m.primary_pid, m.spare_pid, m.reserve_pid];
        let k = rng.range_ms(0, PATTERNS.len() as u64).as_millis() as usize;
        let mut any = false;
        for &r in PATTERNS[k].1 {
            let pid = roles[r];
            // A worker already killed but not yet replaced in the metrics is not killed twice.
            if pid == 0 || s.killed.contains(&pid) {
                continue;
            }
            let t = audiowarden::sys::now_ns();
            // SAFETY: kill(2) on a worker of this test's supervisor, read from its metrics a
            // moment ago: alive, or a zombie the monitor is about to reap (kill(2) accepts it
            // harmlessly). Its pid cannot have been reused that fast (pids count up to
            // pid_max before they wrap).
            if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                s.killed.insert(pid);
                s.killed_at.insert(pid, t);
                any = true;
            }
        }
        if any {
            s.kills += 1;
            s.by_pattern[k] += 1;
        }
        drain_deaths(rx, died, duplicate);
    }
    s
}
