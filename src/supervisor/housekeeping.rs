//! Housekeeping, once a second: audit the shm dir against the manifest and the segments the
//! monitor holds (`shm_leaks`), and measure the CPU used by the supervisor and its workers.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::sys::{self, EventFd};

/// A segment whose owner died is expected to be reclaimed within this time (it drains in a
/// few block periods); one held longer is a leak.
const DRAIN_LIMIT_NS: u64 = 2_000_000_000;

pub(crate) fn run(sh: Arc<Shared>, stop: Arc<EventFd>) {
    let mut reported: HashSet<String> = HashSet::new();
    let mut last_ticks: Option<(u64, u64)> = None;
    let hz = sys::ticks_per_second();
    while sh.running.load(Ordering::Acquire) {
        audit(&sh, &mut reported);
        cpu(&sh, &mut last_ticks, hz);
        // The stop fd is also the monitor's: poll it without consuming the wake-up.
        let mut pfd = libc::pollfd { fd: stop.raw(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, Duration::from_secs(1).as_millis() as i32) };
    }
}

fn audit(sh: &Shared, reported: &mut HashSet<String>) {
    let mut book = sh.shm.lock();
    let now = sys::now_ns();
    let held = std::mem::take(&mut book.held);
    let is_live = |id: &str| match held.get(id) {
        Some(None) => true,
        Some(Some(dead_since)) => now.saturating_sub(*dead_since) < DRAIN_LIMIT_NS,
        None => false,
    };
    let report = match book.registry.as_mut() {
        Some(reg) => {
            sh.metrics.shm_segments.store(reg.allocations().len() as u64, Ordering::Relaxed);
            reg.audit(&is_live)
        }
        None => return,
    };
    book.held = held;
    drop(book);
    match report {
        Ok(r) => {
            sh.metrics.shm_leaks.store(r.leaked() as u64, Ordering::Relaxed);
            for id in r.unknown_files.iter().chain(&r.missing_files).chain(&r.orphaned) {
                if reported.insert(id.clone()) {
                    tracing::warn!(SEGMENT = %id, "shm audit: segment {id} should not be there (unknown, missing or without a live owner)");
                }
            }
        }
        Err(e) => tracing::warn!("shm audit failed: {e}"),
    }
}

/// CPU percent of one core used by the supervisor and its live workers since the last call.
fn cpu(sh: &Shared, last: &mut Option<(u64, u64)>, hz: u64) {
    let m = &sh.metrics;
    let pids = [std::process::id(), m.primary_pid.load(Ordering::Relaxed), m.spare_pid.load(Ordering::Relaxed), m.reserve_pid.load(Ordering::Relaxed)];
    let ticks: u64 = pids.iter().filter(|&&p| p != 0).filter_map(|&p| sys::cpu_ticks(p)).sum();
    let now = sys::now_ns();
    if let Some((t0, n0)) = *last {
        let wall_s = (now - n0) as f64 / 1e9;
        if wall_s > 0.0 {
            let pct = ticks.saturating_sub(t0) as f64 / hz as f64 / wall_s * 100.0;
            sh.metrics.set_cpu_percent(pct);
        }
    }
    *last = Some((ticks, now));
}
