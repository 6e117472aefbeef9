//! audiowardenctl against the live daemon on a private system bus, and without it.

mod common;

use std::process::Output;

use common::bus::{Daemon, PrivateBus};

fn ctl(bus: &PrivateBus, args: &[&str]) -> Output {
    bus.command(env!("CARGO_BIN_EXE_audiowardenctl")).args(args).output().expect("run audiowardenctl")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn status_set_and_metrics_against_the_live_daemon() {
    let bus = PrivateBus::start();
    let d = Daemon::start(&bus, "ctl", &["--frequency", "440", "--gain", "0.25"]);

    let o = ctl(&bus, &["status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.starts_with("audiowarden running"), "{out}");
    for label in ["tone", "workers", "control", "latency", "failovers", "rebuilds", "underruns", "shm", "realtime"] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(label)), "no {label} line in:\n{out}");
    }
    assert!(out.contains("440.0 Hz, gain 0.250"), "{out}");
    assert!(!out.contains('\x1b'), "no colour when stdout is not a terminal");
    assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");

    assert_eq!(ctl(&bus, &["set-frequency", "1000"]).status.code(), Some(0));
    assert_eq!(ctl(&bus, &["set-gain", "-6dB"]).status.code(), Some(0));

    let o = ctl(&bus, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status --json is JSON");
    assert_eq!(v["state"], "running");
    assert_eq!(v["frequency"], 1000.0);
    assert!((v["gain"].as_f64().unwrap() - 0.501187).abs() < 1e-5, "{}", v["gain"]);
    assert_eq!(v["metrics"]["control_received"], 2);
    assert_eq!(v["metrics"]["primary_pid"].as_u64().unwrap() as u32, {
        let m: serde_json::Value = serde_json::from_slice(&ctl(&bus, &["metrics", "--json"]).stdout).unwrap();
        m["primary_pid"].as_u64().unwrap() as u32
    });
    // watch: a fresh screen every second until interrupted.
    let w = bus
        .command(env!("CARGO_BIN_EXE_audiowardenctl"))
        .arg("watch")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    common::signal(w.id(), libc::SIGINT);
    let out = String::from_utf8_lossy(&w.wait_with_output().unwrap().stdout).into_owned();
    let screens = out.matches("audiowarden running").count();
    assert!((2..=4).contains(&screens), "{screens} status screens in 2.5 s:\n{out}");

    let (out, _) = text(&ctl(&bus, &["metrics"]));
    assert!(out.lines().any(|l| l.starts_with("crash_count ") && l.trim_end().ends_with(" 0")), "{out}");
    drop(d);
}

#[test]
fn exit_codes_bad_arguments_rejected_and_unreachable() {
    let bus = PrivateBus::start();
    let mut d = Daemon::start(&bus, "ctl-codes", &["--gain", "0.25"]);
    // 2: arguments that never reach the bus.
    for args in [&["set-gain", "loud"][..], &["set-frequency", "abc"], &["frobnicate"], &["set-gain"]] {
        assert_eq!(ctl(&bus, args).status.code(), Some(2), "{args:?}");
    }
    // 4: the service says no, with its reason.
    let o = ctl(&bus, &["set-gain", "2"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(text(&o).1.contains("0 <= g <= 1"), "{}", text(&o).1);
    let o = ctl(&bus, &["set-frequency", "--", "-5"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o).1);
    // 3: the daemon is down (the bus is up), then the bus is gone too. One line of hint.
    assert!(d.stop().success());
    let o = ctl(&bus, &["status"]);
    assert_eq!(o.status.code(), Some(3));
    let err = text(&o).1;
    assert!(err.contains("cannot reach org.audiowarden.Engine1") && err.contains("hint:"), "{err}");
    let o = bus
        .command(env!("CARGO_BIN_EXE_audiowardenctl"))
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/socket")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o).1);
}

#[test]
fn reload_prints_what_was_applied_and_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audiowarden.toml");
    std::fs::write(&file, "gain = 0.25\n").unwrap();
    let bus = PrivateBus::start();
    let _d = Daemon::start(&bus, "ctl-reload", &["--config", file.to_str().unwrap()]);

    std::fs::write(&file, "gain = 0.5\nblock-frames = 128\n").unwrap();
    let o = ctl(&bus, &["reload"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(out, "applied: gain\nneeds a restart: block-frames\n");

    // A bad file: rejected (exit 4) with the line, nothing changed.
    std::fs::write(&file, "gain = 0.5\nblock-frames = \"many\"\n").unwrap();
    let o = ctl(&bus, &["reload"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("audiowarden.toml:2:") && err.contains("block-frames") && err.contains("nothing was changed"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&ctl(&bus, &["status", "--json"]).stdout).unwrap();
    assert_eq!(v["gain"], 0.5);
}
