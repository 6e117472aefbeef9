//! The README's waveform figure: what a listener hears around a kill, recorded by a real JACK
//! client (`jack_rec`) on the paced test device (jackd dummy, tests/support/with-jackd.sh).
//!
//! `cargo bench --bench waveform` (root: jackd at SCHED_FIFO, the systemd harness) writes
//! waveform.svg to $AW_FIGURES_DIR (`docs/figures` for the README's) or target/figures:
//!
//! 1. audiowarden, its primary worker SIGKILLed: `audiowardend --output alsa:awrec`;
//! 2. audiowarden's supervisor SIGKILLed under the real systemd manager (the shipped unit,
//!    Restart=on-failure): what any plain restart gives, the gap and the phase reset.
//!
//! Both play 220 Hz at gain 0.5 into `awrec`, whose JACK ports are connected to jack_rec's
//! inputs: the recording runs on JACK's clock across the player's deaths and restarts.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/plot.rs"]
mod plot;

use common::bus::{get_u64, proxy, Daemon, PrivateBus};
use common::jack::JackServer;
use common::systemd::{self, SystemdHarness, UNIT};

const RATE: u32 = 48_000;
const TONE: &[&str] = &["--frequency", "220", "--gain", "0.5"];

fn main() {
    // `cargo test` runs bench targets with --bench absent; only run when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let jack = JackServer::start();
    let worker = worker_kill(&jack);
    let supervisor = supervisor_kill(&jack);
    let path = plot::figures_dir().join("waveform.svg");
    let title = "220 Hz through a paced ALSA device, recorded by a JACK client across a SIGKILL";
    match plot::waveforms(&path, title, &[worker, supervisor]) {
        Ok(()) => println!("figure: {}", path.display()),
        Err(e) => panic!("figure {}: {e}", path.display()),
    }
}

/// `jack_rec` recording both channels of `awrec` for `secs`.
struct Recorder {
    child: Child,
    path: PathBuf,
}

impl Recorder {
    fn start(jack: &JackServer, name: &str, secs: u32) -> Recorder {
        let path = jack.dir.path().join(name);
        // Its inputs also take the dummy backend's capture ports (silence): jack_rec wants a
        // port to connect at start, and the player connects itself to jackrec:input1/2.
        let child = Command::new("jack_rec")
            .envs(jack.env())
            .args(["-f", path.to_str().unwrap(), "-d", &secs.to_string(), "-b", "32"])
            .args(["system:capture_1", "system:capture_2"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("jack_rec (jackd2)");
        let t0 = Instant::now();
        while !ports(jack).contains("jackrec:input2") {
            assert!(t0.elapsed() < Duration::from_secs(5), "jack_rec did not register its ports");
            std::thread::sleep(Duration::from_millis(20));
        }
        Recorder { child, path }
    }

    /// Waits for the end of the recording; channel 1 as -1..1.
    fn finish(mut self) -> Vec<f32> {
        let status = self.child.wait().expect("wait for jack_rec");
        assert!(status.success(), "jack_rec: {status}");
        let mut reader = hound::WavReader::open(&self.path).expect("jack_rec's file");
        let spec = reader.spec();
        assert_eq!((spec.sample_rate, spec.channels, spec.bits_per_sample), (RATE, 2, 32), "{spec:?}");
        let all: Vec<i32> = reader.samples::<i32>().map(|s| s.expect("sample")).collect();
        all.chunks_exact(2).map(|f| f[0] as f32 / 2_147_483_648.0).collect()
    }
}

fn ports(jack: &JackServer) -> String {
    let out = Command::new("jack_lsp").envs(jack.env()).output().expect("jack_lsp");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first sample at or after `from` whose magnitude exceeds a quantisation step.
fn first_sound(s: &[f32], from: usize) -> Option<usize> {
    s[from..].iter().position(|x| x.abs() > 1e-6).map(|i| i + from)
}

/// The first run of at least `len` silent samples at or after `from`: (start, end).
fn first_silence(s: &[f32], from: usize, len: usize) -> Option<(usize, usize)> {
    let start = (from..s.len()).find(|&i| s[i..].iter().take(len).all(|x| x.abs() <= 1e-6) && i + len <= s.len())?;
    let end = first_sound(s, start).unwrap_or(s.len());
    Some((start, end))
}

/// The primary worker SIGKILLed while audiowardend plays: the recording around it.
fn worker_kill(jack: &JackServer) -> plot::Capture {
    let rec = Recorder::start(jack, "worker-kill.wav", 5);
    let bus = PrivateBus::start();
    let mut args = vec!["--output", "alsa:awrec"];
    args.extend_from_slice(TONE);
    let mut d = Daemon::start_with_env(&bus, "fig-worker", &args, &jack.env());
    let conn = bus.connection();
    let p = proxy(&conn);
    std::thread::sleep(Duration::from_millis(1500));
    let written = |p: &audiowarden::dbus::Engine1ProxyBlocking<'_>| get_u64(&p.get_metrics().unwrap(), "frames_played");
    let victim = get_u64(&p.get_metrics().unwrap(), "primary_pid") as u32;
    let before = written(&p);
    common::signal(victim, libc::SIGKILL);
    let after = written(&p);
    common::wait_until("rebuilt", Duration::from_secs(5), || get_u64(&p.get_metrics().unwrap(), "replacements") == 1);
    std::thread::sleep(Duration::from_millis(1000));
    let m = p.get_metrics().unwrap();
    assert!(d.stop().success());
    let samples = rec.finish();
    let (underruns, xruns) = (get_u64(&m, "underruns"), get_u64(&m, "device_xruns"));
    println!("worker kill: primary {victim} SIGKILLed at stream frame {before}..{after}; underruns {underruns}, device xruns {xruns}");
    // Stream frame 0 is the first sample played: the tone starts at phase 0, so its first
    // non-zero sample is stream frame 1.
    let onset = first_sound(&samples, 0).expect("the recording has the tone") - 1;
    let (k0, k1) = (onset + before as usize, onset + after as usize);
    let window = (RATE as usize * 7) / 10;
    plot::Capture {
        title: format!("audiowarden, primary worker {victim} SIGKILLed: {underruns} underruns"),
        rate: RATE,
        overview: (k0.saturating_sub(window / 2), (k0 + window / 2).min(samples.len())),
        marks: vec![(k0, k1, "the output's position when the SIGKILL was sent".into())],
        zooms: vec![(k0 + 240, 720, "close up around the kill".into())],
        samples,
        origin: k0,
        origin_name: "ms from the SIGKILL".into(),
    }
}

/// The supervisor SIGKILLed under the systemd manager (the shipped unit, Restart=on-failure).
fn supervisor_kill(jack: &JackServer) -> plot::Capture {
    let h = SystemdHarness::start();
    let shm = common::ShmDir::new("fig-sd");
    // The unit hides /tmp (PrivateTmp): the ALSA configuration goes where it can read it.
    let conf = jack.dir.path().join("alsa/asoundrc");
    let out = h.run(&["install", "-D", "-m", "0644", conf.to_str().unwrap(), "/run/aw-bin/alsa/asoundrc"]);
    assert!(out.status.success(), "copy the ALSA configuration: {}", String::from_utf8_lossy(&out.stderr));
    let env: Vec<String> = jack
        .env()
        .into_iter()
        .map(|(k, v)| if k == "XDG_CONFIG_HOME" { format!("{k}=/run/aw-bin") } else { format!("{k}={v}") })
        .collect();
    let args = format!("--output alsa:awrec {}", TONE.join(" "));
    systemd::install(&h, shm.0.to_str().unwrap(), &args, &format!("Environment={}", env.join(" ")));
    let rec = Recorder::start(jack, "supervisor-kill.wav", 5);
    systemd::start(&h);
    std::thread::sleep(Duration::from_millis(1500));
    let main_pid = h.show(UNIT, "MainPID");
    assert!(h.kill(main_pid.parse().unwrap(), "KILL"), "kill the supervisor");
    let t0 = Instant::now();
    while h.show(UNIT, "NRestarts") != "1" || h.show(UNIT, "ActiveState") != "active" {
        assert!(t0.elapsed() < Duration::from_secs(5), "not restarted:\n{}", h.journal(&["-n", "30"]));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(h.systemctl(&["stop", UNIT]).status.success());
    let samples = rec.finish();
    let onset = first_sound(&samples, 0).expect("the recording has the tone");
    // The gap: the first stretch of more than 20 ms of silence after the tone started.
    let (cut, back) = first_silence(&samples, onset, RATE as usize / 50).expect("a gap");
    assert!(back < samples.len(), "the tone never came back");
    let gap_ms = (back - cut) as f64 * 1000.0 / f64::from(RATE);
    println!("supervisor kill: silent for {gap_ms:.0} ms, then the restarted instance from phase 0");
    let window = (RATE as usize * 7) / 10;
    let mid = (cut + back) / 2;
    plot::Capture {
        title: format!("supervisor SIGKILLed, systemd restarts it: {gap_ms:.0} ms of silence"),
        rate: RATE,
        overview: (mid.saturating_sub(window / 2).min(cut.saturating_sub(4800)), (mid + window / 2).max(back + 4800)),
        marks: vec![],
        zooms: vec![
            (cut, 240, "the kill: cut off mid-cycle (a click)".into()),
            (back + 120, 240, "the restart: a new stream at phase 0".into()),
        ],
        samples,
        origin: cut,
        origin_name: "ms from the cut (the SIGKILL)".into(),
    }
}
