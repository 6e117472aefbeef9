//! Output benchmark: CPU use of the daemon and its workers while playing (48 kHz stereo,
//! 64-frame blocks, hot standby with a reserve), and the output thread's wake-up lateness
//! (p50/p99/max), on the virtual clock and on the paced ALSA device (jackd dummy + ALSA's JACK
//! plugin), with real-time scheduling and without it (the daemon in a cpu cgroup with no RT
//! budget). Lateness is how long after its deadline the output thread woke up (virtual), or for
//! how long the device already had room for the block (ALSA).
//!
//! `cargo bench --bench output` (AW_BENCH_SECONDS per mode, default 10).

#[path = "../tests/common/mod.rs"]
mod common;

use common::cgroup::NoRt;

use std::time::Duration;

use common::bus::{get_u64, proxy, Daemon, PrivateBus};
use common::jack::JackServer;

fn f64_metric(m: &std::collections::HashMap<String, zbus::zvariant::OwnedValue>, k: &str) -> f64 {
    match &**m.get(k).expect(k) {
        zbus::zvariant::Value::F64(x) => *x,
        v => panic!("{k} is {v:?}"),
    }
}

fn run(bus: &PrivateBus, name: &str, output: &str, env: &[(String, String)], cgroup: Option<&NoRt>, seconds: u64) {
    let mut d = Daemon::start_in(bus, "bench-output", &["--output", output], env, cgroup.map(|c| c.path.as_path()));
    let conn = bus.connection();
    let p = proxy(&conn);
    std::thread::sleep(Duration::from_secs(2));
    let mut cpu = Vec::new();
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        cpu.push(f64_metric(&p.get_metrics().unwrap(), "cpu_percent"));
    }
    let m = p.get_metrics().unwrap();
    cpu.sort_by(f64::total_cmp);
    let mean = cpu.iter().sum::<f64>() / cpu.len() as f64;
    println!(
        "{name:<34} realtime {:<5} cpu mean {mean:5.1} % (max {:5.1})  wake-up late p50 {:>5} µs  p99 {:>5} µs  max {:>6} µs  xruns {} underruns {}",
        matches!(&**m.get("realtime").unwrap(), zbus::zvariant::Value::Bool(true)),
        cpu.last().unwrap(),
        get_u64(&m, "output_wake_late_us_p50"),
        get_u64(&m, "output_wake_late_us_p99"),
        get_u64(&m, "output_wake_late_us_max"),
        get_u64(&m, "device_xruns"),
        get_u64(&m, "underruns"),
    );
    assert!(d.stop().success());
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("AW_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let bus = PrivateBus::start();
    let jack = JackServer::start();
    let env = jack.env();
    println!("output benchmark: 48 kHz stereo, 64-frame blocks, hot standby + reserve, {seconds} s per mode; cpu = percent of one core, supervisor + workers");
    run(&bus, "virtual, RT", "virtual", &[], None, seconds);
    run(&bus, "alsa:awcapture (jackd dummy), RT", "alsa:awcapture", &env, None, seconds);
    match NoRt::new("bench") {
        Some(cg) => {
            run(&bus, "virtual, no RT", "virtual", &[], Some(&cg), seconds);
            run(&bus, "alsa:awcapture (jackd dummy), no RT", "alsa:awcapture", &env, Some(&cg), seconds);
        }
        None => println!("(no-RT modes skipped: cannot create a cpu cgroup here)"),
    }
}
