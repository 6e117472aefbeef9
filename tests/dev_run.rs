//! The README's development run, tried as a new user would on a machine with no bus at all:
//! the README's run command starts the daemon, and the README's "second terminal" commands
//! reach it (peer-to-peer D-Bus on the daemon's control socket, found by `audiowardenctl`).
//!
//! "No bus": a private mount namespace with an empty /run (so no
//! /run/dbus/system_bus_socket, and the daemon's /run/audiowarden is its own) and an empty
//! /dev/shm, no DBUS_* variables. Needs root (unshare --mount).

use std::path::Path;
use std::process::{Command, Stdio};

/// The README's lines that start with `prefix` (inside its code blocks), trimmed.
fn readme_lines(prefix: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    readme.lines().map(str::trim).filter(|l| l.contains(prefix)).map(str::to_owned).collect()
}

#[test]
fn the_readmes_run_and_control_commands_work_on_a_machine_with_no_bus() {
    // The run command: the daemon with its embedded defaults, no arguments.
    let run = readme_lines("cargo run --release --bin audiowardend");
    assert!(
        run.iter().any(|l| l.ends_with("cargo run --release --bin audiowardend")),
        "the README's run command changed (this test runs it as the daemon with no arguments): {run:?}"
    );
    // The second terminal's commands, as the README gives them.
    let prefix = "cargo run --release --bin audiowardenctl -- ";
    let ctl: Vec<String> = readme_lines(prefix)
        .iter()
        .filter_map(|l| l.split_once(prefix).map(|(_, args)| args.split('#').next().unwrap_or("").trim().to_owned()))
        .collect();
    assert!(ctl.iter().any(|a| a == "status"), "the README shows no `audiowardenctl -- status`: {ctl:?}");
    let set = ctl.iter().find(|a| a.starts_with("set-frequency ")).expect("the README shows a set-frequency");
    let hz: f64 = set["set-frequency ".len()..].parse().expect("a frequency");
    // And OSC, the other way in.
    let osc = readme_lines("oscsend osc.unix:///run/audiowarden/osc.sock /engine/gain f ");
    let osc =
        osc.first().expect("the README shows an oscsend of the gain").split('#').next().unwrap().trim().to_owned();
    let gain: f64 = osc.rsplit(' ').next().unwrap().parse().expect("a gain");

    let work = tempfile::Builder::new().prefix("aw-test-devrun-").tempdir().unwrap();
    let log = work.path().join("daemon.log");
    // In the namespace: empty /run and /dev/shm, the daemon as the README starts it, then the
    // client commands, each one's exit status and output recorded; then Ctrl-C (SIGINT).
    let script = format!(
        r#"set -u
mount -t tmpfs -o mode=0755 aw-devrun-run /run
mount -t tmpfs -o mode=1777 aw-devrun-shm /dev/shm
"$AW_DAEMON" > "$AW_LOG" 2>&1 &
pid=$!
for _ in $(seq 200); do [ -S /run/audiowarden/control.sock ] && break; sleep 0.05; done
for _ in $(seq 200); do "$AW_CTL" status --json 2>/dev/null | grep -q '"state":"running"' && break; sleep 0.05; done
echo "== status"; "$AW_CTL" status; echo "rc=$?"
echo "== {set}"; "$AW_CTL" {set}; echo "rc=$?"
echo "== osc"; {osc}; echo "rc=$?"
for _ in $(seq 100); do "$AW_CTL" status --json | grep -q '"gain":{gain}' && break; sleep 0.05; done
echo "== json"; "$AW_CTL" status --json; echo "rc=$?"
ls -l /run/audiowarden
kill -INT $pid; wait $pid; echo "daemon rc=$?"
echo "left: $(ls -A /run/audiowarden | tr '\n' ' ')."
"#
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "bash", "-c", &script])
        .env("AW_DAEMON", env!("CARGO_BIN_EXE_audiowardend"))
        .env("AW_CTL", env!("CARGO_BIN_EXE_audiowardenctl"))
        .env("AW_LOG", &log)
        .env("AUDIOWARDEN_LOG", "stderr")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .env_remove("AUDIOWARDEN_CONTROL_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
    let ctx = format!(
        "--- script output ---\n{text}\n--- stderr ---\n{}\n--- daemon log ---\n{daemon_log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let section = |name: &str| -> &str {
        let start = text.find(&format!("== {name}\n")).unwrap_or_else(|| panic!("no {name} section\n{ctx}"));
        let rest = &text[start..];
        &rest[..rest.find("rc=").map_or(rest.len(), |i| i + 5)]
    };
    // The daemon said where there is no bus, and where it can be reached instead.
    assert!(daemon_log.contains("D-Bus API unavailable on the system bus"), "{ctx}");
    assert!(daemon_log.contains("D-Bus API also peer-to-peer on unix:path=/run/audiowarden/control.sock"), "{ctx}");
    let status = section("status");
    assert!(status.contains("rc=0") && status.contains("running"), "status through the control socket\n{ctx}");
    assert!(section(set).contains("rc=0"), "{set} through the control socket\n{ctx}");
    let json_text = section("json");
    let json: serde_json::Value =
        serde_json::from_str(json_text.lines().nth(1).unwrap_or("")).unwrap_or_else(|e| panic!("{e}\n{ctx}"));
    assert_eq!(json["frequency"].as_f64(), Some(hz), "the tone is what the README's command set\n{ctx}");
    assert!(section("osc").contains("rc=0"), "{osc}\n{ctx}");
    assert_eq!(json["gain"].as_f64(), Some(gain), "the gain is what the README's oscsend set\n{ctx}");
    assert_eq!(json["metrics"]["underruns"].as_u64(), Some(0), "{ctx}");
    // Ctrl-C stops it cleanly, and it removes its sockets.
    assert!(text.contains("daemon rc=0"), "{ctx}");
    assert!(text.contains("control.sock") && text.contains("osc.sock"), "both sockets were there\n{ctx}");
    assert!(text.contains("left: ."), "the daemon removes its sockets on the way out\n{ctx}");
}
