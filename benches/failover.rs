//! Failover benchmark: kill cycles at 48 kHz with 64-frame blocks, timed from the kill.
//!
//! `cargo bench --bench failover` (AW_BENCH_CYCLES=N to change the default of 500 per mode).
//! Prints, for hot standby, warm standby and no standby (a worker started cold after each
//! kill: what a plain restart-on-failure supervisor gives), the distribution in microseconds
//! of detection (kill -> pidfd readable), failover (kill -> the new primary holds the next
//! block the output needs), rebuild (kill -> a new spare ready) and, with a reserve worker,
//! refill (kill -> the new reserve ready: the pool is whole again), plus underruns and the
//! number of events slower than 10 ms. AW_BENCH_MODES=hot,hot-qos,hot-noreserve,warm,none selects.

use std::sync::mpsc::Receiver;
use std::time::Duration;

use audiowarden::metrics::percentile;
use audiowarden::sys::now_ns;
use audiowarden::{Config, Event, OutputSpec, StandbyMode, Supervisor};

struct Run {
    refill: Vec<f64>,
    detection: Vec<f64>,
    failover: Vec<f64>,
    rebuild: Vec<f64>,
    underruns: u64,
    realtime: bool,
}

fn wait_for<T>(rx: &Receiver<Event>, mut f: impl FnMut(&Event) -> Option<T>) -> T {
    loop {
        let e = rx.recv_timeout(Duration::from_secs(5)).expect("no event within 5 s");
        if let Some(v) = f(&e) {
            return v;
        }
    }
}

fn run(standby: StandbyMode, reserve_workers: u32, qos: Option<u32>, cycles: usize) -> Run {
    let dir = format!("/dev/shm/aw-bench-{}", std::process::id());
    let cfg = Config {
        shm_dir: dir.clone().into(),
        output: OutputSpec::Virtual,
        standby,
        max_restarts: 1_000_000, // hundreds of kills on purpose: no crash-loop backoff
        reserve_workers,
        cpu_latency_qos_us: qos,
        worker_exe: Some(env!("CARGO_BIN_EXE_audiowardend").into()),
        ..Config::default()
    };
    let sup = Supervisor::start(cfg).expect("start supervisor");
    let rx = sup.subscribe();
    std::thread::sleep(Duration::from_millis(200));
    let u0 = sup.metrics().underruns;
    let mut r = Run { refill: vec![], detection: vec![], failover: vec![], rebuild: vec![], underruns: 0, realtime: sup.metrics().realtime };
    for _ in 0..cycles {
        let victim = sup.metrics().primary_pid;
        let t_kill = now_ns();
        // SAFETY: kill(2) on the primary worker this supervisor spawned.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        let mut failover = None;
        let mut detected = None;
        let rebuilt = wait_for(&rx, |e| match *e {
            Event::WorkerDied { pid, detected_ns, .. } if pid == victim => {
                detected = Some(detected_ns);
                None
            }
            Event::Failover { old_pid, failover_ns, .. } if old_pid == victim => {
                failover = Some(failover_ns);
                None
            }
            Event::Replaced { ready_ns, .. } => Some(ready_ns),
            _ => None,
        });
        // The failover may be reported after the rebuild (a cold start): wait for it.
        let failover = failover.unwrap_or_else(|| {
            wait_for(&rx, |e| match *e {
                Event::Failover { old_pid, failover_ns, .. } if old_pid == victim => Some(failover_ns),
                _ => None,
            })
        });
        let us = |t: u64| t.saturating_sub(t_kill) as f64 / 1e3;
        if reserve_workers > 0 {
            // The pool is whole again once the new reserve is ready.
            let refilled = wait_for(&rx, |e| match *e {
                Event::ReserveReady { ready_ns, .. } if ready_ns > t_kill => Some(ready_ns),
                _ => None,
            });
            r.refill.push(us(refilled));
        }
        r.detection.push(us(detected.expect("death reported before replacement")));
        r.failover.push(us(failover));
        r.rebuild.push(us(rebuilt));
        // Let the stream settle between kills (the dead ring drains in 8 blocks).
        std::thread::sleep(Duration::from_millis(15));
    }
    r.underruns = sup.metrics().underruns - u0;
    sup.shutdown().ok();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The physical limit, measured in the same run: SIGKILL of a small idle process (`sleep`,
/// ~1 MiB resident) to its pidfd becoming readable, polled by the killing thread itself.
#[allow(clippy::zombie_processes)] // reaped through the pidfd (waitid P_PIDFD)
fn pidfd_baseline(n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let child = std::process::Command::new("sleep").arg("60").spawn().expect("spawn sleep");
        let pidfd = audiowarden::sys::pidfd_open(child.id() as i32).expect("pidfd_open");
        std::thread::sleep(Duration::from_millis(3));
        let t0 = now_ns();
        // SAFETY: kill(2) on the child we just spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 5000) };
        v.push((now_ns() - t0) as f64 / 1e3);
        let _ = audiowarden::sys::pidfd_reap(&pidfd);
    }
    v
}

fn row(name: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    let slow = v.iter().filter(|&&x| x > 10_000.0).count();
    println!(
        "  {name:<10} p50 {:>8.1}  p95 {:>8.1}  p99 {:>8.1}  max {:>9.1}  (>10 ms: {slow})",
        percentile(v, 50.0),
        percentile(v, 95.0),
        percentile(v, 99.0),
        percentile(v, 100.0)
    );
}

fn main() {
    // `cargo test` runs bench targets with --bench absent; only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let cycles: usize = std::env::var("AW_BENCH_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(500);
    println!("failover benchmark: {cycles} SIGKILLs of the primary per mode, 48 kHz, 64-frame blocks, 8 blocks lookahead");
    println!("times in microseconds from the kill");
    println!("baseline: kill -> pidfd readable of a small idle process, same thread");
    row("pidfd", &mut pidfd_baseline(cycles.min(300)));
    // AW_BENCH_MODES=hot,hot-qos,hot-noreserve,warm,none (default: all).
    let modes = std::env::var("AW_BENCH_MODES").unwrap_or_else(|_| "hot,hot-qos,hot-noreserve,warm,none".into());
    let all = [
        ("hot", "hot standby + reserve (the default)", StandbyMode::Hot, 1, None),
        ("hot-qos", "hot standby + reserve, --cpu-latency-qos-us 0", StandbyMode::Hot, 1, Some(0)),
        ("hot-noreserve", "hot standby, no reserve", StandbyMode::Hot, 0, None),
        ("warm", "warm standby + reserve", StandbyMode::Warm, 1, None),
        ("none", "no standby (cold restart baseline)", StandbyMode::None, 0, None),
    ];
    for (key, name, mode, reserve, qos) in all {
        if !modes.split(',').any(|m| m == key) {
            continue;
        }
        let mut r = run(mode, reserve, qos, cycles);
        println!("{name}: underruns {} (realtime: {})", r.underruns, r.realtime);
        row("detection", &mut r.detection);
        row("failover", &mut r.failover);
        row("rebuild", &mut r.rebuild);
        if !r.refill.is_empty() {
            row("refill", &mut r.refill);
        }
    }
}
