//! Failover benchmark: kill cycles at 48 kHz with 64-frame blocks, timed from the kill.
//!
//! `cargo bench --bench failover` (AW_BENCH_CYCLES=N to change the default of 500 per mode).
//! Prints, for hot standby, warm standby and no standby (a worker started cold after each
//! kill: what a plain restart-on-failure supervisor gives), the distribution in microseconds
//! of detection (kill -> pidfd readable), failover (kill -> the new primary holds the next
//! block the output needs), rebuild (kill -> a new spare ready) and, with a reserve worker,
//! refill (kill -> the new reserve ready: the pool is whole again), plus underruns and the
//! number of events slower than 10 ms. AW_BENCH_MODES=hot,hot-qos,hot-noreserve,warm,none,storm selects; the storm row
//! (a kill every 20-50 ms at random roles and pairs) lasts AW_BENCH_STORM_SECONDS (60).

use std::time::Duration;

use audiowarden::metrics::percentile;
use audiowarden::sys::now_ns;
use audiowarden::{Config, Event, OutputSpec, StandbyMode, Supervisor};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/plot.rs"]
mod plot;

struct Run {
    refill: Vec<f64>,
    detection: Vec<f64>,
    failover: Vec<f64>,
    rebuild: Vec<f64>,
    underruns: u64,
    /// Deaths of workers that were not killed by the benchmark (a hang declared by the
    /// heartbeat, a worker that failed on its own): each one is a finding, printed.
    other_deaths: u64,
    realtime: bool,
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
    let mut watch = common::Watch::new(&sup);
    std::thread::sleep(Duration::from_millis(200));
    let u0 = sup.metrics().underruns;
    let c0 = sup.metrics().crash_count;
    let mut r = Run {
        refill: vec![],
        detection: vec![],
        failover: vec![],
        rebuild: vec![],
        underruns: 0,
        other_deaths: 0,
        realtime: sup.metrics().realtime,
    };
    for _ in 0..cycles {
        let victim = sup.metrics().primary_pid;
        let t_kill = now_ns();
        // SAFETY: kill(2) on the primary worker this supervisor spawned.
        unsafe { libc::kill(victim as i32, libc::SIGKILL) };
        // Each wait matches this kill's own event (by the victim's pid), whatever the order
        // they arrive in and whatever else happens meanwhile.
        let detected = watch.died(victim);
        let failover = watch.wait("the failover", Duration::from_secs(5), |e| match *e {
            Event::Failover { old_pid, failover_ns, .. } if old_pid == victim => Some(failover_ns),
            _ => None,
        });
        let rebuilt = watch.wait("the rebuild", Duration::from_secs(5), |e| match *e {
            Event::Replaced { replaces_pid, ready_ns, .. } if replaces_pid == victim => Some(ready_ns),
            _ => None,
        });
        let us = |t: u64| t.saturating_sub(t_kill) as f64 / 1e3;
        if reserve_workers > 0 {
            // The pool is whole again once the reserve started after this kill is ready.
            let refilled = watch.wait("the refill", Duration::from_secs(5), |e| match *e {
                Event::ReserveReady { after_death_of, ready_ns, .. } if after_death_of == Some(victim) => {
                    Some(ready_ns)
                }
                _ => None,
            });
            r.refill.push(us(refilled));
        }
        r.detection.push(us(detected));
        r.failover.push(us(failover));
        r.rebuild.push(us(rebuilt));
        // Let the stream settle between kills (the dead ring drains in 8 blocks).
        std::thread::sleep(Duration::from_millis(15));
    }
    let m = sup.metrics();
    r.underruns = m.underruns - u0;
    r.other_deaths = (m.crash_count - c0).saturating_sub(cycles as u64);
    sup.shutdown().ok();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The kill storm row: SIGKILLs every 20-50 ms at random roles and pairs (see
/// tests/common/storm.rs) for AW_BENCH_STORM_SECONDS (60), the restart intensity raised;
/// times from each worker's kill.
fn storm_row(secs: u64) {
    let dir = format!("/dev/shm/aw-bench-storm-{}", std::process::id());
    let cfg = Config {
        shm_dir: dir.clone().into(),
        output: OutputSpec::Virtual,
        max_restarts: 1_000_000,
        worker_exe: Some(env!("CARGO_BIN_EXE_audiowardend").into()),
        ..Config::default()
    };
    let sup = Supervisor::start(cfg).expect("start supervisor");
    let all = sup.subscribe();
    let deaths = sup.subscribe();
    std::thread::sleep(Duration::from_millis(200));
    let m0 = sup.metrics();
    let probe = common::stall::StallProbe::start();
    let (mut died, mut duplicate) = (std::collections::HashSet::new(), 0);
    let s = common::storm::storm(&sup, &deaths, &mut died, &mut duplicate, secs);
    let stalls = probe.stop();
    std::thread::sleep(Duration::from_millis(500));
    let m = sup.metrics();
    sup.shutdown().ok();
    let _ = std::fs::remove_dir_all(&dir);
    let since = |pid: u32, t: u64| s.killed_at.get(&pid).map(|&k| t.saturating_sub(k) as f64 / 1e3);
    let (mut detection, mut failover, mut rebuild) = (vec![], vec![], vec![]);
    for e in all.try_iter() {
        match e {
            Event::WorkerDied { pid, detected_ns, .. } => detection.extend(since(pid, detected_ns)),
            Event::Failover { old_pid, failover_ns, .. } => failover.extend(since(old_pid, failover_ns)),
            Event::Replaced { replaces_pid, ready_ns, .. } => rebuild.extend(since(replaces_pid, ready_ns)),
            _ => {}
        }
    }
    let d = |a: u64, b: u64| a - b;
    println!(
        "kill storm, {secs} s, a kill every 20-50 ms: {} kills ({}), {} workers killed; crashes {}, cold starts {}, underruns {} ({} during cold starts), hang kills {}, throttled {} (realtime: {})",
        s.kills,
        common::storm::PATTERNS.iter().map(|p| p.0).zip(s.by_pattern).map(|(n, k)| format!("{n} {k}")).collect::<Vec<_>>().join(", "),
        s.killed.len(),
        d(m.crash_count, m0.crash_count),
        d(m.cold_starts, m0.cold_starts),
        d(m.underruns, m0.underruns),
        d(m.cold_start_underruns, m0.cold_start_underruns),
        d(m.hang_kills, m0.hang_kills),
        d(m.throttled_spawns, m0.throttled_spawns),
        m.realtime
    );
    println!("  {}", stalls.summary());
    row("detection", &mut detection);
    row("failover", &mut failover);
    row("rebuild", &mut rebuild);
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
    println!(
        "failover benchmark: {cycles} SIGKILLs of the primary per mode, 48 kHz, 64-frame blocks, 8 blocks lookahead"
    );
    println!("times in microseconds from the kill");
    println!("baseline: kill -> pidfd readable of a small idle process, same thread");
    row("pidfd", &mut pidfd_baseline(cycles.min(300)));
    // AW_BENCH_MODES=hot,hot-qos,hot-noreserve,warm,none,storm (default: all).
    let modes = std::env::var("AW_BENCH_MODES").unwrap_or_else(|_| "hot,hot-qos,hot-noreserve,warm,none,storm".into());
    let all = [
        ("hot", "hot standby + reserve (the default)", StandbyMode::Hot, 1, None),
        ("hot-qos", "hot standby + reserve, --cpu-latency-qos-us 0", StandbyMode::Hot, 1, Some(0)),
        ("hot-noreserve", "hot standby, no reserve", StandbyMode::Hot, 0, None),
        ("warm", "warm standby + reserve", StandbyMode::Warm, 1, None),
        ("none", "no standby (cold restart baseline)", StandbyMode::None, 0, None),
    ];
    if modes.split(',').any(|m| m == "storm") {
        let secs = std::env::var("AW_BENCH_STORM_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
        storm_row(secs);
    }
    let mut runs: Vec<(&str, Run)> = Vec::new();
    for (key, name, mode, reserve, qos) in all {
        if !modes.split(',').any(|m| m == key) {
            continue;
        }
        let mut r = run(mode, reserve, qos, cycles);
        println!("{name}: underruns {} (realtime: {})", r.underruns, r.realtime);
        if r.other_deaths > 0 {
            println!(
                "  !! {} worker deaths the benchmark did not cause (hangs declared, failed workers)",
                r.other_deaths
            );
        }
        row("detection", &mut r.detection);
        row("failover", &mut r.failover);
        row("rebuild", &mut r.rebuild);
        if !r.refill.is_empty() {
            row("refill", &mut r.refill);
        }
        runs.push((key, r));
    }
    figure(&runs, cycles);
}

/// docs/figures/failover.svg (with AW_FIGURES_DIR=docs/figures): the hot standby's
/// distributions beside the cold restart's, from this run.
fn figure(runs: &[(&str, Run)], cycles: usize) {
    let find = |k: &str| runs.iter().find(|(key, _)| *key == k).map(|(_, r)| r);
    let (Some(hot), Some(cold)) = (find("hot"), find("none")) else {
        println!("(figure: needs the modes hot and none)");
        return;
    };
    fn c<'a>(label: &str, values: &'a [f64], colour: plotters::style::RGBColor, dashed: bool) -> plot::Curve<'a> {
        plot::Curve { label: label.into(), values, colour, dashed }
    }
    let curves = [
        c("hot standby: detection (pidfd seen)", &hot.detection, plotters::style::RGBColor(31, 119, 180), false),
        c("hot standby: failover (next block held)", &hot.failover, plotters::style::RGBColor(44, 160, 44), false),
        c("hot standby: rebuild (a new standby ready)", &hot.rebuild, plotters::style::RGBColor(148, 103, 189), false),
        c("no standby (a cold restart): failover", &cold.failover, plotters::style::RGBColor(214, 39, 40), true),
    ];
    let path = plot::figures_dir().join("failover.svg");
    let title = format!("{cycles} SIGKILLs of the primary worker per mode (48 kHz, 64-frame blocks)");
    // The lookahead: 8 blocks of 64 frames at 48 kHz.
    match plot::cdf(&path, &title, &curves, 8.0 * 64.0 / 48_000.0 * 1e6) {
        Ok(()) => println!("figure: {}", path.display()),
        Err(e) => println!("figure {}: {e}", path.display()),
    }
}
