//! Reloading the configuration (SIGHUP and the D-Bus Reload method) applies what it says it
//! applies: frequency and gain are heard, priorities move the running threads and workers,
//! the restart intensity throttles; what cannot change live is reported and left alone; a bad
//! file changes nothing and the audio keeps playing.

mod common;

use std::path::Path;
use std::time::Duration;

use audiowarden::reload::Reloader;
use audiowarden::Supervisor;
use common::bus::{get_u64, proxy, Daemon, PrivateBus};
use common::*;

fn rt_expected() -> bool {
    std::env::var_os("AW_EXPECT_NO_RT").is_none()
}

/// The kernel ids of the daemon's threads named `name`.
fn threads_named(pid: u32, name: &str) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (comm.trim() == name).then(|| e.file_name().to_string_lossy().parse().ok()).flatten()
        })
        .collect()
}

fn fifo(tid: i32) -> i32 {
    audiowarden::sys::fifo_priority_of(tid).unwrap_or_else(|e| panic!("thread {tid}: {e}"))
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[test]
fn reload_over_dbus_and_sighup_applies_what_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audiowarden.toml");
    write(&file, "frequency = 440.0\ngain = 0.25\n");
    let bus = PrivateBus::start();
    let file_arg = file.to_str().unwrap();
    let d = Daemon::start(&bus, "reload", &["--config", file_arg]);
    let conn = bus.connection();
    let p = proxy(&conn);
    assert_eq!(p.frequency().unwrap(), 440.0);

    // A client's change is not undone by a reload that does not touch the frequency.
    p.set_frequency(523.0).unwrap();
    write(
        &file,
        "frequency = 440.0\ngain = 0.5\noutput-priority = 85\nmonitor-priority = 76\nrender-priority = 71\n\
         max-restarts = 50\nsample-rate = 44100\n",
    );
    let (applied, needs_restart, refused) = p.reload().expect("Reload");
    assert_eq!(applied, ["gain", "output-priority", "monitor-priority", "render-priority", "max-restarts"]);
    assert_eq!(needs_restart, ["sample-rate"]);
    assert_eq!(p.gain().unwrap(), 0.5, "gain applied");
    assert_eq!(p.frequency().unwrap(), 523.0, "the client's frequency stays");
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "sample_rate"), 48_000, "the sample rate needs a restart");

    // The priorities moved: the running output and monitor threads, and every worker.
    let workers: Vec<u32> =
        ["primary_pid", "spare_pid", "reserve_pid"].iter().map(|k| get_u64(&m, k) as u32).filter(|&p| p != 0).collect();
    assert!(workers.len() >= 2, "{m:?}");
    let output = threads_named(d.pid(), "aw-output");
    let monitor = threads_named(d.pid(), "aw-monitor");
    assert_eq!((output.len(), monitor.len()), (1, 1));
    if rt_expected() {
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(fifo(output[0]), 85);
        assert_eq!(fifo(monitor[0]), 76);
        for w in &workers {
            assert_eq!(fifo(*w as i32), 71, "worker {w}");
        }
    } else {
        // No RT budget: every thread's refusal is reported, none is real-time.
        assert_eq!(refused.len(), 2 + workers.len(), "{refused:?}");
        assert!(refused.iter().all(|r| r.contains("refused")), "{refused:?}");
        assert_eq!(fifo(output[0]), 0);
    }

    // Nothing changed since: nothing applied, sample-rate still pending.
    let (applied, needs_restart, _) = p.reload().unwrap();
    assert!(applied.is_empty(), "{applied:?}");
    assert_eq!(needs_restart, ["sample-rate"]);

    // SIGHUP does the same (systemctl reload sends it), and clients hear of the new frequency
    // (PropertiesChanged, followed by a caching proxy).
    let cached = audiowarden::dbus::Engine1ProxyBlocking::new(&conn).unwrap();
    assert_eq!(cached.frequency().unwrap(), 523.0);
    let rx = common::bus::follow(cached.receive_frequency_changed());
    write(&file, "frequency = 330.0\ngain = 0.5\noutput-priority = 85\nmonitor-priority = 76\nrender-priority = 71\nmax-restarts = 50\n");
    signal(d.pid(), libc::SIGHUP);
    wait_until("the frequency reloaded by SIGHUP", Duration::from_secs(5), || p.frequency().unwrap() == 330.0);
    let heard = std::iter::from_fn(|| rx.recv_timeout(Duration::from_secs(2)).ok()).find(|&v| v == 330.0);
    assert_eq!(heard, Some(330.0), "no PropertiesChanged(Frequency) with the reloaded value");
    wait_until("the reload logged", Duration::from_secs(5), || {
        d.log_text().contains("configuration reloaded: applied frequency 440 -> 330")
    });

    // A bad file: an error naming its line and key, nothing applied, still playing.
    write(&file, "frequency = 220.0\ngain = 2.0\n");
    let err = p.reload().expect_err("a bad file must be refused").to_string();
    assert!(err.contains("InvalidFileContent") && err.contains(":2:") && err.contains("gain"), "{err}");
    signal(d.pid(), libc::SIGHUP);
    wait_until("the refused SIGHUP reload logged", Duration::from_secs(5), || {
        d.log_text().contains("configuration not reloaded")
    });
    assert_eq!((p.frequency().unwrap(), p.gain().unwrap()), (330.0, 0.5), "a bad file changes nothing");
    if rt_expected() {
        assert_eq!(fifo(output[0]), 85, "a bad file changes nothing");
    }
    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "underruns"), 0);
    assert_eq!(p.state().unwrap(), "running");
}

/// The restart intensity is read at every spawn: lowering it by a reload throttles a crash
/// loop that the start-up limit let run.
#[test]
fn reloaded_restart_intensity_throttles_a_crash_loop() {
    let shm = ShmDir::new("reload-intensity");
    let dir = tempfile::tempdir().unwrap();
    let script = crash_loop_worker(dir.path());
    let file = dir.path().join("audiowarden.toml");
    write(&file, "max-restarts = 1000000\nrestart-window-s = 60\n");
    let args: Vec<std::ffi::OsString> = ["audiowardend", "--output", "virtual", "--config"]
        .iter()
        .map(Into::into)
        .chain([
            file.clone().into_os_string(),
            "--shm-dir".into(),
            shm.0.clone().into_os_string(),
            "--worker-exe".into(),
            script.into_os_string(),
        ])
        .collect();
    let cfg = audiowarden::config_file::load(args.clone()).expect("config");
    let sup = Supervisor::start(cfg.clone()).expect("start");
    let mut reloader = Reloader::new(args, cfg, sup.handle());
    std::thread::sleep(Duration::from_millis(200));
    signal(sup.metrics().primary_pid, libc::SIGKILL);
    // Every new reserve now dies at once; a million restarts are allowed.
    wait_until("a crash loop", Duration::from_secs(5), || sup.metrics().crash_count > 20);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sup.metrics().throttled_spawns, 0, "not throttled under the start-up limit");

    write(&file, "max-restarts = 5\nrestart-window-s = 60\n");
    let report = reloader.reload().expect("reload");
    assert_eq!(report.applied.iter().map(|c| c.key).collect::<Vec<_>>(), ["max-restarts"]);
    wait_until("the crash loop throttled", Duration::from_secs(5), || sup.metrics().throttled_spawns > 0);
    let m = sup.metrics();
    sup.shutdown().unwrap();
    assert_eq!(m.underruns, 0, "the primary kept playing");
}
