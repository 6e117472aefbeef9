//! The ALSA output on a real, paced ALSA device without hardware: jackd's dummy backend
//! behind ALSA's JACK plugin, with alsa-lib's `file` plugin in front recording exactly what
//! the daemon wrote (tests/support/with-jackd.sh).

mod common;

use std::time::Duration;

use audiowarden::engine::{render_reference, CHANNELS};
use common::bus::{get_bool, get_u64, proxy, Daemon, PrivateBus};
use common::jack::JackServer;
use common::{wait_until, Rng};

fn expect_rt() -> bool {
    std::env::var_os("AW_EXPECT_NO_RT").is_none()
}

fn device_metric(m: &std::collections::HashMap<String, zbus::zvariant::OwnedValue>) -> String {
    match &**m.get("device").expect("device") {
        zbus::zvariant::Value::Str(s) => s.to_string(),
        v => panic!("device is {v:?}"),
    }
}

/// The capture equals the crash-free reference render, sample for sample, from frame 0, once
/// the `underruns` silent blocks (an engine underrun writes one block of silence and the stream
/// resumes where it stopped; a 1 kHz tone never has a silent block) are taken out.
fn assert_capture_is_reference(jack: &JackServer, freq: f64, gain: f64, underruns: u64) -> usize {
    let paths = jack.capture_paths();
    assert_eq!(paths.len(), 1, "the daemon opened the device once: {paths:?}");
    let raw = JackServer::read_f32(&paths[0]);
    let block = 64 * CHANNELS;
    let mut got = Vec::with_capacity(raw.len());
    let mut silent = 0;
    for b in raw.chunks(block) {
        if b.len() == block && b.iter().all(|x| *x == 0.0) {
            silent += 1;
        } else {
            got.extend_from_slice(b);
        }
    }
    // Underruns between the last metrics read and the stop may add a few more without RT.
    assert!(
        silent == underruns || (!expect_rt() && silent > underruns),
        "{silent} silent blocks in the capture, {underruns} underruns counted"
    );
    let frames = got.len() / CHANNELS;
    assert!(frames > 48_000 * 2, "only {frames} frames captured");
    let want = render_reference(48_000, freq, gain, &[], frames, 64);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
        panic!("capture differs from the reference at sample {i} (frame {}): {} != {}", i / CHANNELS, got[i], want[i]);
    }
    frames
}

#[test]
fn three_kills_on_a_paced_alsa_device_are_inaudible() {
    three_kills_are_inaudible("alsa:awcapture");
}

/// The same through cpal (its ALSA host, on the same paced device).
#[test]
fn three_kills_through_cpal_are_inaudible() {
    three_kills_are_inaudible("cpal:awcapture");
}

/// 10 s of 1 kHz at gain 0.5 with three SIGKILLs of the primary at random moments.
fn three_kills_are_inaudible(output: &str) {
    let jack = JackServer::start();
    let bus = PrivateBus::start();
    let mut d = Daemon::start_with_env(
        &bus,
        "alsa-kills",
        &["--output", output, "--frequency", "1000", "--gain", "0.5"],
        &jack.env(),
    );
    let conn = bus.connection();
    let p = proxy(&conn);
    let m = p.get_metrics().unwrap();
    assert_eq!(device_metric(&m), output);
    assert_eq!(get_u64(&m, "period_frames"), 64);
    let mut rng = Rng::new();
    // The witness of machine stalls: a device buffer (4 periods, 5.3 ms) runs dry in a stall
    // of the whole machine whatever our priorities (TESTING.md: these VMs stall for several ms).
    let probe = common::stall::StallProbe::start();
    let t0 = std::time::Instant::now();
    for k in 1..=3 {
        std::thread::sleep(rng.range_ms(1500, 2500));
        let victim = get_u64(&p.get_metrics().unwrap(), "primary_pid") as u32;
        common::signal(victim, libc::SIGKILL);
        wait_until(&format!("rebuild {k}"), Duration::from_secs(5), || {
            let m = p.get_metrics().unwrap();
            get_u64(&m, "replacements") == k
                && get_bool(&m, "spare_ready")
                && get_u64(&m, "primary_pid") as u32 != victim
        });
    }
    std::thread::sleep(Duration::from_secs(10).saturating_sub(t0.elapsed()));
    let m = p.get_metrics().unwrap();
    let stalls = probe.stop();
    eprintln!("{output}: {}", stalls.summary());
    assert_eq!(get_u64(&m, "crash_count"), 3);
    if expect_rt() && get_bool(&m, "realtime") {
        assert_eq!(get_u64(&m, "underruns"), 0, "the engine always delivered");
        // A stall seen by the SCHED_FIFO 90 probe (above every thread of ours and jackd's) of
        // more than 3 ms (it sees a stall up to its 1 ms period short) can empty the buffer
        // once; an xrun with no such stall is ours.
        let machine_stalls = stalls.count_over(3_000_000);
        let xruns = get_u64(&m, "device_xruns");
        assert!(
            xruns <= machine_stalls,
            "with real-time scheduling the device ran dry {xruns} times, in {machine_stalls} machine stalls over 3 ms: {}",
            stalls.summary()
        );
    }
    assert!(d.stop().success());
    if output.starts_with("cpal:") && get_u64(&m, "device_xruns") > 0 {
        // Only possible without RT (asserted 0 above with it): cpal drops the period that hit
        // an xrun, so that stream has a gap by construction (see the stall test).
        eprintln!("{output}: {} device xruns without RT; bit-exactness not checked", get_u64(&m, "device_xruns"));
        return;
    }
    let frames = assert_capture_is_reference(&jack, 1000.0, 0.5, get_u64(&m, "underruns"));
    eprintln!("{output}: {frames} frames bit-exact through 3 kills; device_xruns {}", get_u64(&m, "device_xruns"));
}

#[test]
fn a_writer_stalled_past_the_buffer_is_an_xrun_and_recovers() {
    stalled_writer_is_an_xrun("alsa:awcapture");
}

#[test]
fn a_cpal_callback_stalled_past_the_buffer_is_an_xrun_and_recovers() {
    stalled_writer_is_an_xrun("cpal:awcapture");
}

fn stalled_writer_is_an_xrun(output: &str) {
    let jack = JackServer::start();
    let bus = PrivateBus::start();
    // 4 x 64 frames of buffer = 5.3 ms; the output thread (or cpal's callback) sleeps 200 ms
    // once.
    let mut d = Daemon::start_with_env(
        &bus,
        "alsa-xrun",
        &["--output", output, "--frequency", "1000", "--gain", "0.5", "--test-fault-output-pause", "1000:200"],
        &jack.env(),
    );
    let conn = bus.connection();
    let p = proxy(&conn);
    wait_until("an xrun", Duration::from_secs(5), || get_u64(&p.get_metrics().unwrap(), "device_xruns") >= 1);
    let played = get_u64(&p.get_metrics().unwrap(), "frames_played");
    std::thread::sleep(Duration::from_secs(2));
    let m = p.get_metrics().unwrap();
    assert!(get_u64(&m, "frames_played") >= played + 48_000, "audio resumed after the xrun");
    if expect_rt() && get_bool(&m, "realtime") {
        // Without RT, the burst of blocks the device takes right after the stall can outrun
        // workers that are not scheduled promptly (an engine underrun, counted as such).
        assert_eq!(get_u64(&m, "underruns"), 0);
    }
    assert_eq!(get_u64(&m, "crash_count"), 0);
    assert_eq!(p.state().unwrap(), "running");
    eprintln!("{output}: device_xruns {} after a 200 ms stall", get_u64(&m, "device_xruns"));
    assert!(d.stop().success());
    if output.starts_with("alsa:") {
        // Our writer writes the block again after recovering, so what reached the device is
        // still the reference stream, in order. (cpal drops the period that hit the xrun:
        // there the stream has a gap, as an xrun means.)
        assert_capture_is_reference(&jack, 1000.0, 0.5, get_u64(&m, "underruns"));
    }
}

#[test]
fn list_outputs_shows_every_alsa_playback_pcm_and_cpal_devices() {
    let jack = JackServer::start();
    let env = jack.env();
    let ours = std::process::Command::new(env!("CARGO_BIN_EXE_audiowardend"))
        .arg("--list-outputs")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(ours.status.success());
    let ours = String::from_utf8_lossy(&ours.stdout).into_owned();
    let aplay =
        std::process::Command::new("aplay").arg("-L").envs(env.iter().map(|(k, v)| (k, v))).output().expect("aplay -L");
    let names: Vec<String> = String::from_utf8_lossy(&aplay.stdout)
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace) && !l.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(names.iter().any(|n| n == "null"), "aplay -L: {names:?}");
    for n in &names {
        assert!(
            ours.lines().any(|l| l.split_whitespace().next() == Some(&format!("alsa:{n}"))),
            "alsa:{n} missing from --list-outputs:\n{ours}"
        );
    }
    assert!(ours.starts_with("virtual"));
    let ctl = std::process::Command::new(env!("CARGO_BIN_EXE_audiowardenctl"))
        .arg("outputs")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&ctl.stdout), ours, "audiowardenctl outputs == audiowardend --list-outputs");
    // cpal enumerates the same PCMs through its ALSA host.
    assert!(ours.lines().any(|l| l.starts_with("cpal:awcapture ")), "cpal:awcapture missing:\n{ours}");
}

/// The device goes away (its JACK server stops) and comes back: the state turns degraded while
/// the engine keeps going on the virtual clock, then running again once the device is
/// reopened, and the daemon plays into it again and stops cleanly.
#[test]
fn a_device_that_disappears_is_reopened_and_playing_resumes() {
    device_loss_and_return("alsa:awcapture", "alsa-gone");
}

/// The same through cpal: the stream stalls when its JACK server stops, is retired, and a new
/// one is built once the device is back.
#[test]
fn a_cpal_stream_whose_device_disappears_is_rebuilt_and_playing_resumes() {
    device_loss_and_return("cpal:awcapture", "cpal-gone");
}

fn device_loss_and_return(output: &str, tag: &str) {
    // A second server keeps JACK's shared registry in /dev/shm alive while ours restarts:
    // libjack in the daemon keeps the registry it mapped and cannot connect to a server that
    // registered in a new one.
    let _keeper = JackServer::start();
    let mut jack = JackServer::start();
    let bus = PrivateBus::start();
    let mut d = Daemon::start_with_env(&bus, tag, &["--output", output], &jack.env());
    let conn = bus.connection();
    let p = proxy(&conn);
    std::thread::sleep(Duration::from_millis(500));
    jack.stop().expect("stop jackd");
    wait_until("degraded", Duration::from_secs(5), || p.state().unwrap() == "degraded");
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "device_losses"), 1);
    let played = get_u64(&m, "frames_played");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        get_u64(&p.get_metrics().unwrap(), "frames_played") > played,
        "the engine keeps going on the virtual clock"
    );
    jack.restart();
    let t0 = std::time::Instant::now();
    while p.state().unwrap() != "running" {
        if t0.elapsed() > Duration::from_secs(6) {
            panic!("not running again:\n{}", d.log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "device_losses"), 1);
    assert_eq!(get_u64(&m, "crash_count"), 0);
    // It plays into the device again: a second recording grows.
    wait_until("a second recording", Duration::from_secs(5), || jack.capture_paths().len() == 2);
    wait_until("a second recording with sound", Duration::from_secs(5), || {
        JackServer::read_f32(&jack.capture_paths()[1]).len() > 48_000
    });
    let st = d.stop();
    assert!(st.success(), "{st}:\n{}", d.log_text());
}

/// A JACK server stopped (SIGSTOP) rather than gone: the device makes no room, is declared
/// lost, and reopening it blocks for as long as the server is stopped (ALSA's JACK plugin waits
/// for it forever). That open runs on a helper thread, never on the output thread: the virtual
/// clock plays on the whole time (the position advances in every 200 ms), and once the server
/// continues the reopened device takes over again.
#[test]
fn a_device_whose_reopen_blocks_does_not_stop_the_output() {
    let jack = JackServer::start();
    let bus = PrivateBus::start();
    let mut d = Daemon::start_with_env(&bus, "alsa-stopped", &["--output", "alsa:awcapture"], &jack.env());
    let conn = bus.connection();
    let p = proxy(&conn);
    std::thread::sleep(Duration::from_millis(500));
    common::signal(jack.jackd_pid, libc::SIGSTOP);
    let resume = Resume(jack.jackd_pid);
    wait_until("degraded", Duration::from_secs(5), || p.state().unwrap() == "degraded");
    // The reopen is now stuck in the helper: the output thread plays the virtual clock.
    let mut last = get_u64(&p.get_metrics().unwrap(), "frames_played");
    for k in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        let now = get_u64(&p.get_metrics().unwrap(), "frames_played");
        assert!(
            now >= last + 4_800,
            "the output stopped while a reopen blocked ({}th 200 ms: {} frames):\n{}",
            k + 1,
            now - last,
            d.log_text()
        );
        last = now;
    }
    drop(resume); // SIGCONT
    wait_until("running again", Duration::from_secs(10), || p.state().unwrap() == "running");
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "device_losses"), 1);
    assert_eq!(get_u64(&m, "crash_count"), 0);
    let st = d.stop();
    assert!(st.success(), "{st}:\n{}", d.log_text());
}

/// SIGCONT on drop (also when the test fails), so a stopped jackd never outlives it.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the jackd this test started.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// alsa-lib's own messages (it prints them to stderr: "ALSA lib pcm.c:2666:(snd_pcm_open_noupdate)
/// Unknown PCM ...", eight lines of "cannot find card '0'" for `default` on a machine without
/// a card) go into the daemon's log at debug level instead, so a new user sees the daemon's
/// own lines first.
#[test]
fn alsa_libs_own_messages_go_to_the_log_at_debug_level() {
    // The shm dir the daemon creates (and keeps, emptied) goes with this one.
    let dir = tempfile::tempdir().unwrap();
    let run = |log: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_audiowardend"))
            .args(["--output", "alsa:aw_no_such_pcm", "--osc-socket", "none", "--shm-dir"])
            .arg(dir.path().join("shm"))
            .env("AUDIOWARDEN_LOG", "stderr")
            .env("RUST_LOG", log)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run audiowardend")
    };
    let out = run("info");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "cannot start: {stderr}");
    assert!(!stderr.contains("ALSA lib"), "alsa-lib printed on its own:\n{stderr}");
    assert!(stderr.contains("aw_no_such_pcm"), "the daemon's own error names the device:\n{stderr}");
    let out = run("debug");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("alsa-lib:") && l.contains("Unknown PCM aw_no_such_pcm")),
        "alsa-lib's message is not in the log at debug level:\n{stderr}"
    );
    assert!(!stderr.contains("ALSA lib"), "{stderr}");
}
