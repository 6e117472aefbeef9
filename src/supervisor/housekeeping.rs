//! Housekeeping: writes the manifest whenever the registry changed (the only writer of
//! manifest.json, so the real-time monitor never waits on that I/O; the write happens outside
//! the shm lock), and once a second audits the shm dir against the manifest and the segments
//! the monitor holds (`shm_leaks`) and measures the CPU used by the supervisor and its workers.

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
    let mut manifest = ManifestWriter::default();
    let hz = sys::ticks_per_second();
    let mut next_audit = 0;
    let mut textfile = Textfile::default();
    while sh.play.running.load(Ordering::Acquire) {
        let now = sys::now_ns();
        if now >= next_audit {
            audit(&sh, &mut reported);
            cpu(&sh, &mut last_ticks, hz);
            textfile.write(&sh);
            next_audit = now + AUDIT_EVERY.as_nanos() as u64;
        }
        manifest.write_if_dirty(&sh);
        // The stop fd is also the monitor's: polled without consuming its wake-up.
        let left = Duration::from_nanos(next_audit.saturating_sub(sys::now_ns()));
        if sys::wait_readable(&[stop.raw(), sh.manifest_dirty.raw()], left) {
            sh.manifest_dirty.drain();
        }
    }
    manifest.write_if_dirty(&sh);
    // Stopped: no metrics of a service that is not running (node_exporter would go on
    // exporting the last ones).
    if let Some(p) = &sh.config.prometheus_textfile {
        let _ = std::fs::remove_file(p);
    }
}

const AUDIT_EVERY: Duration = Duration::from_secs(1);

/// `--prometheus-textfile`: the metrics for node_exporter's textfile collector, rewritten
/// once a second, atomically (a scrape never reads half a file). A failure is logged once per
/// episode, and when it works again.
#[derive(Default)]
struct Textfile {
    failing: bool,
}

impl Textfile {
    fn write(&mut self, sh: &Shared) {
        let Some(path) = &sh.config.prometheus_textfile else { return };
        let text = crate::metrics::exposition::text(&sh.snapshot());
        match write_atomically(path, text.as_bytes()) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("metrics written to {} again", path.display());
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                tracing::error!("cannot write the metrics to {}: {e} (retrying every second)", path.display());
            }
            Err(_) => {}
        }
    }
}

/// Writes `bytes` to a temporary file beside `path` (mode 0644: node_exporter runs as another
/// user) and renames it over `path`.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path.file_name().ok_or_else(|| std::io::Error::other("not a file name"))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    // A new file, never through a symlink someone planted under the predictable name (a
    // leftover of ours is removed first: removing a symlink removes the link only).
    let _ = std::fs::remove_file(&tmp);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            // The umask (the unit's 0077) must not make it unreadable to the collector.
            f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes the manifest outside the shm lock; a failure (ENOSPC) is logged once per episode
/// and retried at the next change or audit.
#[derive(Default)]
struct ManifestWriter {
    failing: bool,
}

impl ManifestWriter {
    fn write_if_dirty(&mut self, sh: &Shared) {
        let (json, dir) = {
            let mut book = sh.shm.lock();
            let Some(reg) = book.registry.as_mut() else { return };
            (reg.take_manifest(), reg.dir().to_path_buf())
        };
        let Some(json) = json else { return };
        match crate::shm::registry::write_manifest_file(&dir, &json) {
            Ok(()) if self.failing => {
                self.failing = false;
                tracing::info!("the manifest in {} is written again", dir.display());
            }
            Ok(()) => {}
            Err(e) => {
                if let Some(reg) = sh.shm.lock().registry.as_mut() {
                    reg.mark_dirty();
                }
                if !self.failing {
                    self.failing = true;
                    tracing::warn!("cannot write the manifest: {e}; the segments are unaffected, retrying");
                }
            }
        }
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
    let pids = [
        std::process::id(),
        m.primary_pid.load(Ordering::Relaxed),
        m.spare_pid.load(Ordering::Relaxed),
        m.reserve_pid.load(Ordering::Relaxed),
    ];
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
