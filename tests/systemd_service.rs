//! The unit under a real systemd user manager, with journald and a private system bus, in
//! namespaces (tests/support/systemd-harness.sh). PIDs seen inside are namespace PIDs, so
//! signals, busctl and journalctl go through the harness.

mod common;

use std::time::{Duration, Instant};

use common::systemd::SystemdHarness;
use common::wait_until_every;

const UNIT: &str = "audiowarden.service";
/// Each check runs a process in the namespace: look a few times a second, not a thousand.
const POLL: Duration = Duration::from_millis(50);

/// Links the shipped unit and adds a drop-in for the test: the built binary, a private shm
/// dir, and no User=/Group= (a user manager cannot switch users). Everything else, hardening
/// included, is the shipped unit.
fn install(h: &SystemdHarness, shm: &str, extra_args: &str, extra_service: &str) {
    // The unit's sandbox hides /tmp (PrivateTmp) and /root, /home (ProtectHome), where a clone
    // may live: run a copy from the namespace's /run, which the unit sees.
    let bin = "/run/aw-bin/audiowardend";
    let out = h.run(&["install", "-D", "-m", "0755", env!("CARGO_BIN_EXE_audiowardend"), bin]);
    assert!(out.status.success(), "copy the daemon: {}", String::from_utf8_lossy(&out.stderr));
    let ctl = "/run/aw-bin/audiowardenctl";
    let out = h.run(&["install", "-D", "-m", "0755", env!("CARGO_BIN_EXE_audiowardenctl"), ctl]);
    assert!(out.status.success(), "copy the client: {}", String::from_utf8_lossy(&out.stderr));
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/audiowarden.service");
    let out = h.systemctl(&["link", unit]);
    assert!(out.status.success(), "link: {}", String::from_utf8_lossy(&out.stderr));
    h.drop_in(
        UNIT,
        "test",
        &format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart=\nExecStart={bin} --shm-dir {shm} --output virtual {extra_args}\nExecReload=\nExecReload={ctl} reload\nUser=\nGroup=\nSupplementaryGroups=\nAmbientCapabilities=\nWatchdogSec=1s\nTimeoutStopSec=3s\n{extra_service}\n"
        ),
    );
}

fn start(h: &SystemdHarness) {
    let t0 = Instant::now();
    let out = h.systemctl(&["start", UNIT]);
    assert!(
        out.status.success(),
        "systemctl start: {}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&h.systemctl(&["status", "--no-pager", UNIT]).stdout),
        h.journal(&["-n", "50", "--no-pager"])
    );
    eprintln!("systemctl start returned after {:?}", t0.elapsed());
}

fn busctl_metrics(h: &SystemdHarness) -> serde_json::Value {
    let out = h.run(&["busctl", "--system", "--json=short", "call", "org.audiowarden.Engine1", "/org/audiowarden/Engine1", "org.audiowarden.Engine1", "GetMetrics"]);
    assert!(out.status.success(), "busctl GetMetrics: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["data"][0].clone()
}

fn metric(m: &serde_json::Value, k: &str) -> u64 {
    m[k]["data"].as_u64().unwrap_or_else(|| panic!("{k} in {m}"))
}

fn shm_dir(tag: &str) -> common::ShmDir {
    common::ShmDir::new(&format!("sd-{tag}"))
}

/// Start (READY only when playing with a ready spare and the name owned), STATUS, busctl, a
/// worker crash absorbed without a restart, stop with STOPPING, and the journal of it all.
#[test]
fn lifecycle_under_systemd() {
    let h = SystemdHarness::start();
    let shm = shm_dir("life");
    install(&h, shm.0.to_str().unwrap(), "", "");
    start(&h);

    // READY came only once everything was up: by now it all holds.
    assert_eq!(h.show(UNIT, "ActiveState"), "active");
    assert_eq!(h.show(UNIT, "SubState"), "running");
    let status = h.show(UNIT, "StatusText");
    assert!(status.starts_with("playing 440.0 Hz, gain 0.25, spare ready"), "StatusText: {status}");
    let shown = String::from_utf8_lossy(&h.systemctl(&["status", "--no-pager", UNIT]).stdout).into_owned();
    assert!(shown.contains("Status: \"playing 440.0 Hz"), "systemctl status:\n{shown}");
    let state = h.run(&["busctl", "--system", "get-property", "org.audiowarden.Engine1", "/org/audiowarden/Engine1", "org.audiowarden.Engine1", "State"]);
    assert_eq!(String::from_utf8_lossy(&state.stdout).trim(), "s \"running\"");

    // A worker crash is the daemon's business, not systemd's.
    let m = busctl_metrics(&h);
    eprintln!("realtime under the user manager: {}", m["realtime"]["data"]);
    let primary = metric(&m, "primary_pid");
    assert!(h.run(&["kill", "-KILL", &primary.to_string()]).status.success());
    wait_until_every("the rebuild", Duration::from_secs(5), POLL, || {
        let m = busctl_metrics(&h);
        metric(&m, "replacements") == 1 && m["spare_ready"]["data"] == true
    });
    let m = busctl_metrics(&h);
    assert_eq!(metric(&m, "crash_count"), 1);
    assert_eq!(metric(&m, "underruns"), 0);
    assert_eq!(h.show(UNIT, "NRestarts"), "0");
    assert_eq!(h.show(UNIT, "ActiveState"), "active");
    wait_until_every("STATUS with the failover", Duration::from_secs(3), POLL, || h.show(UNIT, "StatusText").contains("1 failover"));

    // Stop: STOPPING, exit 0 in time, workers and segments gone. The manager logs every
    // notification it receives at debug level: that is how STOPPING=1 is seen arriving.
    assert!(h.systemctl(&["log-level", "debug"]).status.success());
    let t0 = Instant::now();
    assert!(h.systemctl(&["stop", UNIT]).status.success());
    let stop_time = t0.elapsed();
    assert!(stop_time < Duration::from_secs(3), "stop took {stop_time:?} (TimeoutStopSec=3s)");
    assert_eq!(h.show(UNIT, "Result"), "success");
    assert_eq!(h.show(UNIT, "ExecMainStatus"), "0");
    let manager = h.journal(&["--user-unit", UNIT, "--no-pager"]);
    assert!(
        manager.lines().any(|l| l.contains("Got notification message") && l.contains("STOPPING=1")),
        "the manager received no STOPPING=1:\n{manager}"
    );
    assert!(!shm.0.exists(), "the shm dir is removed on stop");
    let procs = h.run(&["pgrep", "-f", "audiowardend"]);
    assert!(String::from_utf8_lossy(&procs.stdout).trim().is_empty(), "left running: {}", String::from_utf8_lossy(&procs.stdout));

    // The story in the journal, with structured fields.
    let journal = h.journal(&["-u", UNIT, "-o", "json", "--no-pager"]);
    let entries: Vec<serde_json::Value> = journal.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let ours = |e: &&serde_json::Value| e["SYSLOG_IDENTIFIER"] == "audiowardend";
    let msg = |e: &serde_json::Value| e["MESSAGE"].as_str().unwrap_or("").to_owned();
    assert!(entries.iter().filter(ours).any(|e| msg(e).starts_with("playing 440 Hz")), "no start entry:\n{journal}");
    let fo = entries.iter().filter(ours).find(|e| e.get("FAILOVER_US").is_some()).unwrap_or_else(|| panic!("no failover entry:\n{journal}"));
    assert_eq!(fo["WORKER_PID"].as_str().unwrap(), primary.to_string());
    assert!(fo["NEW_PID"].as_str().unwrap().parse::<u32>().is_ok());
    assert!(entries.iter().filter(ours).any(|e| msg(e).contains("stopping")), "no stop entry:\n{journal}");
}

/// `systemctl reload` (ExecReload calls `audiowardenctl reload`, the D-Bus Reload method): it
/// is synchronous, so the new settings are live when it returns, and a bad file fails it with
/// the line named while the service plays on. SIGHUP (`systemctl kill -s HUP`) reloads too,
/// and the daemon tells the manager RELOADING=1 then READY=1. Nothing restarts.
#[test]
fn systemctl_reload_applies_the_edited_file() {
    let h = SystemdHarness::start();
    let shm = shm_dir("reload");
    let conf = "/run/aw-bin/audiowarden.toml";
    let write_conf = |text: &str| {
        let out = h.run(&["sh", "-c", &format!("mkdir -p /run/aw-bin && printf '{text}' > {conf}")]);
        assert!(out.status.success(), "write {conf}: {}", String::from_utf8_lossy(&out.stderr));
    };
    write_conf("gain = 0.25\\n");
    install(&h, shm.0.to_str().unwrap(), &format!("--config {conf}"), "");
    start(&h);
    let main_pid = h.show(UNIT, "MainPID");
    assert!(h.systemctl(&["log-level", "debug"]).status.success());
    let gain = || {
        let out = h.run(&["busctl", "--system", "get-property", "org.audiowarden.Engine1", "/org/audiowarden/Engine1", "org.audiowarden.Engine1", "Gain"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };

    write_conf("gain = 0.5\\nsample-rate = 44100\\n");
    let out = h.systemctl(&["reload", UNIT]);
    assert!(out.status.success(), "systemctl reload: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(gain(), "d 0.5", "live when systemctl reload returns");
    // (The daemon's own line: audiowardenctl's printout, from a process that has already
    // exited, was once missing from `journalctl -u` in CI.)
    wait_until_every("the reload in the journal", Duration::from_secs(5), POLL, || {
        h.journal(&["-u", UNIT, "--no-pager"]).contains("configuration reloaded: applied gain 0.25 -> 0.5; needs a restart to take effect: sample-rate 48000 -> 44100")
    });

    // A bad file: the reload fails, naming the line; nothing changes.
    write_conf("gain = 5\\n");
    let out = h.systemctl(&["reload", UNIT]);
    assert!(!out.status.success(), "a bad file must fail systemctl reload");
    wait_until_every("the refused reload in the journal", Duration::from_secs(5), POLL, || {
        h.journal(&["-u", UNIT, "--no-pager"]).contains(&format!("{conf}:1: `gain`"))
    });
    assert_eq!(gain(), "d 0.5");

    // SIGHUP: RELOADING=1, then READY=1.
    write_conf("gain = 0.75\\n");
    assert!(h.systemctl(&["kill", "--kill-who=main", "-s", "HUP", UNIT]).status.success());
    wait_until_every("the gain reloaded by SIGHUP", Duration::from_secs(5), POLL, || gain() == "d 0.75");
    wait_until_every("RELOADING=1 at the manager", Duration::from_secs(5), POLL, || {
        h.journal(&["--user-unit", UNIT, "--no-pager"]).lines().any(|l| l.contains("Got notification message") && l.contains("RELOADING=1"))
    });
    assert_eq!(h.show(UNIT, "ActiveState"), "active");
    assert_eq!(h.show(UNIT, "MainPID"), main_pid, "a reload is not a restart");
    assert!(h.systemctl(&["stop", UNIT]).status.success());
}

/// SIGSTOP of the main process: the watchdog fires, systemd restarts the service, and the new
/// instance reclaims the old one's segments and plays.
#[test]
fn watchdog_restarts_a_stopped_supervisor() {
    let h = SystemdHarness::start();
    let shm = shm_dir("wd-stop");
    install(&h, shm.0.to_str().unwrap(), "", "");
    start(&h);
    let main_pid = h.show(UNIT, "MainPID");
    assert!(h.run(&["kill", "-STOP", &main_pid]).status.success());
    wait_until_every("a watchdog restart", Duration::from_secs(15), POLL, || h.show(UNIT, "NRestarts") == "1" && h.show(UNIT, "ActiveState") == "active" && h.show(UNIT, "SubState") == "running");
    assert_ne!(h.show(UNIT, "MainPID"), main_pid);
    let m = busctl_metrics(&h);
    assert!(metric(&m, "stale_segments_reclaimed") >= 2, "the new instance reclaims the old one's segments: {m}");
    assert_eq!(metric(&m, "shm_leaks"), 0);
    let played = metric(&m, "frames_played");
    wait_until_every("the new instance playing", Duration::from_secs(2), POLL, || metric(&busctl_metrics(&h), "frames_played") > played);
    let journal = h.journal(&["-u", UNIT, "--no-pager"]);
    assert!(journal.contains("reclaimed 6 stale shared-memory segments"), "no reclaim logged:\n{journal}");
    let manager = h.journal(&["--user-unit", UNIT, "--no-pager"]);
    assert!(manager.contains("Watchdog timeout"), "systemd logged no watchdog timeout:\n{manager}");
    assert!(h.systemctl(&["stop", UNIT]).status.success());
}

/// An output that stops advancing (test-only fault) gets the service restarted as well: a
/// live process that plays nothing is a failure.
#[test]
fn watchdog_restarts_a_daemon_that_plays_nothing() {
    let h = SystemdHarness::start();
    let shm = shm_dir("wd-stall");
    install(&h, shm.0.to_str().unwrap(), "--test-fault-output-stall-ms 1500", "");
    start(&h);
    let main_pid = h.show(UNIT, "MainPID");
    wait_until_every("a watchdog restart", Duration::from_secs(15), POLL, || h.show(UNIT, "NRestarts").parse::<u32>().unwrap_or(0) >= 1);
    let manager = h.journal(&["--user-unit", UNIT, "--no-pager"]);
    assert!(manager.contains("Watchdog timeout"), "systemd logged no watchdog timeout:\n{manager}");
    assert_ne!(h.show(UNIT, "MainPID"), main_pid);
    let _ = h.systemctl(&["stop", UNIT]);
}

/// SIGKILL of the supervisor: Restart=on-failure brings a new instance, which reclaims the
/// old one's segments (counted, logged) and plays again within a second.
#[test]
fn restart_after_sigkill_reclaims_and_plays_within_a_second() {
    let h = SystemdHarness::start();
    let shm = shm_dir("restart");
    install(&h, shm.0.to_str().unwrap(), "", "");
    start(&h);
    let main_pid = h.show(UNIT, "MainPID");
    let t0 = Instant::now();
    assert!(h.run(&["kill", "-KILL", &main_pid]).status.success());
    let mut m = serde_json::Value::Null;
    wait_until_every("the new instance playing", Duration::from_secs(5), POLL, || {
        let out = h.run(&["busctl", "--system", "--json=short", "call", "org.audiowarden.Engine1", "/org/audiowarden/Engine1", "org.audiowarden.Engine1", "GetMetrics"]);
        if !out.status.success() {
            return false;
        }
        m = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["data"][0].clone();
        m["frames_played"]["data"].as_u64().unwrap_or(0) > 0 && m["primary_pid"]["data"].as_u64() != Some(0)
    });
    let took = t0.elapsed();
    eprintln!("SIGKILL of the supervisor -> new instance playing: {took:?}");
    assert_eq!(h.show(UNIT, "NRestarts"), "1");
    assert_ne!(h.show(UNIT, "MainPID"), main_pid);
    assert!(metric(&m, "stale_segments_reclaimed") >= 2, "{m}");
    assert!(took < Duration::from_secs(1), "playing again only after {took:?}");
    let journal = h.journal(&["-u", UNIT, "--no-pager"]);
    assert!(journal.contains("stale shared-memory segments"), "the reclaim is logged:\n{journal}");
    assert!(h.systemctl(&["stop", UNIT]).status.success());
}

/// READY waits for the bus name: a daemon that plays but cannot reach the bus never becomes
/// active, and systemd fails the start when TimeoutStartSec runs out.
#[test]
fn no_ready_without_the_bus_name() {
    let h = SystemdHarness::start();
    let shm = shm_dir("no-bus");
    install(&h, shm.0.to_str().unwrap(), "", "Environment=DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/nonexistent\nTimeoutStartSec=2s\nRestart=no");
    let out = h.systemctl(&["start", UNIT]);
    assert!(!out.status.success(), "start succeeded without the bus name");
    assert_eq!(h.show(UNIT, "Result"), "timeout");
    let journal = h.journal(&["-u", UNIT, "--no-pager"]);
    assert!(journal.contains("playing 440 Hz") && journal.contains("D-Bus API unavailable"), "it played, without the bus:\n{journal}");
}
