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
//! D-Bus), and a D-Bus round trip that changes nothing (Peer.Ping). And OSC beside it: the
//! same change as an `/engine/frequency` datagram over the AF_UNIX socket and over UDP, to the
//! daemon's own OSC thread (no answer: "call -> return" is until the change is stamped).
//! Calls are spaced by a random 1-3 ms so they land at every phase of a block.
//!
//! Then the stamping itself (issue 15), D-Bus only, a supervisor per row: `--control-stamp
//! rewind` (the default: the first wake-up at least 0.5 ms after the call, workers render
//! again what they hold) against `--control-stamp lookahead` (the old stamping, past every
//! block a worker may hold) at lookahead 8, 32 and 128 blocks, with what each supervisor
//! counted (underruns, blocks played without a change they should hold, divergences, changes
//! applied late). The lookahead rows at 32 and 128 blocks take a fifth of the calls (each
//! waits for the whole lookahead). AW_BENCH_QOS=0 runs it with --cpu-latency-qos-us 0.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use audiowarden::metrics::percentile;
use audiowarden::sys::now_ns;
use audiowarden::{Config, ControlStamp, Handle, OutputSpec, Supervisor};

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
        // Distinct from the previous call's (an OSC change is recognised by its value).
        let hz = 400.0 + (i % 200) as f64 + if i % 400 < 200 { 0.0 } else { 0.5 };
        let f0 = h.frame_now();
        let t0 = now_ns();
        send(hz);
        // A D-Bus or in-process call returns stamped; a datagram is stamped when the OSC
        // thread has read it.
        let stamp = loop {
            match h.control().last_stamp() {
                Some(s) if s.msg.value == hz => break s,
                _ if now_ns() - t0 > 5_000_000_000 => panic!("the change to {hz} Hz was never stamped"),
                _ => std::thread::sleep(Duration::from_micros(10)),
            }
        };
        let t1 = now_ns();
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
    let conn = bus.connection();
    let mut rng = common::Rng::new();
    let run = Run::start(cfg.clone(), &conn);
    let (sup, h, proxy) = (&run.sup, run.sup.handle(), run.proxy());
    println!(
        "D-Bus and OSC call -> first affected sample: {calls} calls per mode, {} Hz, {} frames per block, {} blocks lookahead, {} per wake-up, control stamp {:?}; realtime {}; cpu latency request {qos:?}",
        h.config().sample_rate,
        h.config().block_frames,
        h.config().lookahead_blocks,
        h.config().periods_per_wake(),
        h.config().control_stamp,
        sup.metrics().realtime
    );
    let peer = zbus::blocking::fdo::PeerProxy::builder(&conn)
        .destination(audiowarden::dbus::BUS_NAME)
        .unwrap()
        .path(audiowarden::dbus::OBJECT_PATH)
        .unwrap()
        .build()
        .unwrap();
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
    row(
        "baseline: D-Bus Get(Frequency) round trip (µs)",
        &mut round_trip(&mut || {
            proxy.frequency().expect("Get");
        }),
    );
    let c = sup.control();
    let base = measure(&h, calls, &mut rng, |hz| {
        c.set_frequency(hz).expect("set_frequency");
    });
    report("in-process", &base);
    let dbus = measure(&h, calls, &mut rng, |hz| proxy.set_frequency(hz).expect("SetFrequency"));
    report("D-Bus", &dbus);
    osc_rows(&h, calls, &mut rng);
    counted("defaults", &sup.metrics());
    run.stop();
    // The stamping, side by side: every row its own supervisor at that lookahead.
    for lookahead in [8, 32, 128] {
        for stamp in [ControlStamp::Rewind, ControlStamp::Lookahead] {
            let cfg = Config { lookahead_blocks: lookahead, control_stamp: stamp, ..cfg.clone() };
            let run = Run::start(cfg, &conn);
            let proxy = run.proxy();
            let n = if stamp == ControlStamp::Lookahead && lookahead > 8 { calls.div_ceil(5) } else { calls };
            let h = run.sup.handle();
            let s = measure(&h, n, &mut rng, |hz| proxy.set_frequency(hz).expect("SetFrequency"));
            let name =
                format!("D-Bus, stamp {}, lookahead {lookahead}, {n} calls", format!("{stamp:?}").to_lowercase());
            report(&name, &s);
            counted(&name, &run.sup.metrics());
            run.stop();
        }
    }
}

/// A supervisor and its D-Bus service on the private bus, running.
struct Run {
    sup: Supervisor,
    service: audiowarden::dbus::service::Service,
    conn: zbus::blocking::Connection,
}

impl Run {
    fn start(cfg: Config, conn: &zbus::blocking::Connection) -> Run {
        let sup = Supervisor::start(cfg).expect("start supervisor");
        let service = audiowarden::dbus::service::Service::start(sup.handle(), None, None).expect("D-Bus service");
        let run = Run { sup, service, conn: conn.clone() };
        let proxy = run.proxy();
        common::wait_until("the service on the bus", Duration::from_secs(5), || {
            proxy.state().is_ok_and(|s| s == "running")
        });
        run
    }

    fn proxy(&self) -> audiowarden::dbus::Engine1ProxyBlocking<'static> {
        common::bus::proxy(&self.conn)
    }

    fn stop(self) {
        drop(self.service);
        self.sup.shutdown().expect("shutdown");
    }
}

/// OSC: the daemon's OSC thread on an AF_UNIX socket and a UDP port of this run.
fn osc_rows(h: &Handle, calls: usize, rng: &mut common::Rng) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("osc.sock");
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let osc_cfg = Config {
        osc_socket: sock.display().to_string(),
        osc_listen: Some(format!("127.0.0.1:{port}")),
        ..h.config().clone()
    };
    let osc = audiowarden::osc::OscServer::start(h.clone(), audiowarden::osc::open(&osc_cfg, &[]))
        .expect("OSC")
        .expect("sockets");
    let datagram = |hz: f64| {
        let msg = rosc::OscMessage { addr: "/engine/frequency".into(), args: vec![rosc::OscType::Double(hz)] };
        rosc::encoder::encode(&rosc::OscPacket::Message(msg)).unwrap()
    };
    let unix = std::os::unix::net::UnixDatagram::unbound().unwrap();
    let osc_unix = measure(h, calls, rng, |hz| {
        unix.send_to(&datagram(hz), &sock).expect("send over AF_UNIX");
    });
    report("OSC AF_UNIX", &osc_unix);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let osc_udp = measure(h, calls, rng, |hz| {
        udp.send_to(&datagram(hz), ("127.0.0.1", port)).expect("send over UDP");
    });
    report("OSC UDP", &osc_udp);
    drop(osc);
}

/// What a run's supervisor counted: a change is meant to cost no underrun, and to be heard
/// at its stamp in every ring (a block played without it is `stale`).
fn counted(name: &str, m: &audiowarden::MetricsSnapshot) {
    println!(
        "{name}: underruns {}, stale_blocks {}, stream_discontinuities {}, output_divergences {}, worker_resyncs {}, crash_count {}, control_late {}, control_received {}, control_rewinds {} ({} blocks, {} refused, {} failed)",
        m.underruns,
        m.stale_blocks,
        m.stream_discontinuities,
        m.output_divergences,
        m.worker_resyncs,
        m.crash_count,
        m.control_late,
        m.control_received,
        m.control_rewinds,
        m.control_rewritten_blocks,
        m.control_rewrites_refused,
        m.control_rewinds_failed
    );
}
