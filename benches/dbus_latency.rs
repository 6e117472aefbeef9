//! D-Bus call to first affected sample.
//!
//! `cargo bench --bench dbus_latency` (AW_BENCH_CALLS=N, default 1000 per mode). Starts a
//! private dbus-daemon (system-bus configuration, the project's policy), the supervisor and
//! its D-Bus service in this process, and a client connection. For each SetFrequency call it
//! measures, from just before the call is sent:
//!   - the reply (the change is queued in every worker), in µs;
//!   - the first affected sample: the stamped frame minus the output's frame at the call,
//!     in samples, and the wall-clock time until the block holding that frame went to the
//!     output (observed by polling the output position), in µs.
//!
//! Baseline, in the same run: the same change through the in-process `Control` handle (no
//! D-Bus), and a D-Bus round trip that changes nothing (Peer.Ping).
//! Calls are spaced by a random 1-3 ms so they land at every phase of a block.
//! AW_BENCH_QOS=0 runs it with --cpu-latency-qos-us 0.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use audiowarden::metrics::percentile;
use audiowarden::sys::now_ns;
use audiowarden::{Config, Handle, OutputSpec, Supervisor};

struct Sample {
    reply_us: f64,
    samples: f64,
    first_sample_us: f64,
}

/// Waits until the block holding `frame` has been handed to the output; returns when.
fn wait_played(h: &Handle, frame: u64) -> u64 {
    let bf = h.config().block_frames as u64;
    let block = frame / bf;
    while h.position_frames() / bf <= block {
        std::thread::sleep(Duration::from_micros(20));
    }
    now_ns()
}

fn measure(h: &Handle, calls: usize, rng: &mut common::Rng, mut send: impl FnMut(f64)) -> Vec<Sample> {
    let sr = h.config().sample_rate as f64;
    let mut out = Vec::with_capacity(calls);
    for i in 0..calls {
        std::thread::sleep(rng.range_ms(1, 3));
        let hz = 400.0 + (i % 200) as f64;
        let f0 = h.frame_now();
        let t0 = now_ns();
        send(hz);
        let t1 = now_ns();
        let stamp = h.control().last_stamp().expect("a stamp");
        assert_eq!(stamp.msg.value, hz, "the stamp is this call's");
        let played = wait_played(h, stamp.apply_at);
        // Where in its block the stamped frame sits (it plays that much after the block starts).
        let bf = h.config().block_frames as u64;
        let offset_ns = (stamp.apply_at % bf) as f64 * 1e9 / sr;
        out.push(Sample {
            reply_us: (t1 - t0) as f64 / 1e3,
            samples: stamp.apply_at.saturating_sub(f0) as f64,
            first_sample_us: (played as f64 + offset_ns - t0 as f64) / 1e3,
        });
    }
    out
}

fn row(name: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<44} p50 {:>9.1}  p95 {:>9.1}  p99 {:>9.1}  max {:>9.1}",
        percentile(v, 50.0),
        percentile(v, 95.0),
        percentile(v, 99.0),
        percentile(v, 100.0)
    );
}

fn report(mode: &str, s: &[Sample]) {
    let mut reply: Vec<f64> = s.iter().map(|x| x.reply_us).collect();
    let mut samples: Vec<f64> = s.iter().map(|x| x.samples).collect();
    let mut us: Vec<f64> = s.iter().map(|x| x.first_sample_us).collect();
    row(&format!("{mode}: call -> return (µs)"), &mut reply);
    row(&format!("{mode}: call -> first affected sample (samples)"), &mut samples);
    row(&format!("{mode}: call -> first affected sample (µs)"), &mut us);
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let calls: usize = std::env::var("AW_BENCH_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let bus = common::bus::PrivateBus::start();
    // Set before the service thread (which reads it) exists.
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", &bus.address);
    let shm = common::ShmDir::new("bench-dbus");
    // AW_BENCH_QOS=0 holds a PM QoS CPU latency request (--cpu-latency-qos-us 0) during the run.
    let qos = std::env::var("AW_BENCH_QOS").ok().and_then(|v| v.parse().ok());
    let cfg = Config {
        shm_dir: shm.0.clone(),
        output: OutputSpec::Virtual,
        cpu_latency_qos_us: qos,
        worker_exe: Some(env!("CARGO_BIN_EXE_audiowardend").into()),
        ..Config::default()
    };
    let sup = Supervisor::start(cfg).expect("start supervisor");
    let h = sup.handle();
    let service = audiowarden::dbus::service::Service::start(h.clone(), None).expect("D-Bus service");
    let conn = bus.connection();
    let proxy = common::bus::proxy(&conn);
    common::wait_until("the service on the bus", Duration::from_secs(5), || proxy.state().is_ok_and(|s| s == "running"));
    let peer = zbus::blocking::fdo::PeerProxy::builder(&conn)
        .destination(audiowarden::dbus::BUS_NAME)
        .unwrap()
        .path(audiowarden::dbus::OBJECT_PATH)
        .unwrap()
        .build()
        .unwrap();
    let mut rng = common::Rng::new();
    let c = sup.control();

    println!(
        "D-Bus call -> first affected sample: {calls} calls per mode, {} Hz, {} frames per block, {} blocks lookahead; realtime {}; cpu latency request {qos:?}",
        h.config().sample_rate,
        h.config().block_frames,
        h.config().lookahead_blocks,
        sup.metrics().realtime
    );
    // Baselines spaced like the calls below (idle gaps cost wake-ups on this VM).
    let mut round_trip = |f: &mut dyn FnMut()| -> Vec<f64> {
        (0..calls)
            .map(|_| {
                std::thread::sleep(rng.range_ms(1, 3));
                let t0 = now_ns();
                f();
                (now_ns() - t0) as f64 / 1e3
            })
            .collect()
    };
    row("baseline: D-Bus Peer.Ping round trip (µs)", &mut round_trip(&mut || peer.ping().expect("Ping")));
    row("baseline: D-Bus Get(Frequency) round trip (µs)", &mut round_trip(&mut || {
        proxy.frequency().expect("Get");
    }));
    let base = measure(&h, calls, &mut rng, |hz| {
        c.set_frequency(hz).expect("set_frequency");
    });
    report("in-process", &base);
    let dbus = measure(&h, calls, &mut rng, |hz| proxy.set_frequency(hz).expect("SetFrequency"));
    report("D-Bus", &dbus);
    let m = sup.metrics();
    println!("underruns {}, control_late {}, control_received {}", m.underruns, m.control_late, m.control_received);
    drop(service);
    sup.shutdown().expect("shutdown");
}
