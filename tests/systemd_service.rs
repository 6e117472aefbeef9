//! The unit under a real systemd user manager, with journald and a private system bus, in
//! namespaces (tests/support/systemd-harness.sh). PIDs seen inside are namespace PIDs, so
//! signals, busctl and journalctl go through the harness.

mod common;

use std::time::{Duration, Instant};

use common::systemd::{install, start, SystemdHarness, UNIT};
use common::wait_until_every;

/// Each check runs a process in the namespace: look a few times a second, not a thousand.
const POLL: Duration = Duration::from_millis(50);

/// GetMetrics through busctl inside the namespace, or why it failed.
fn try_busctl_metrics(h: &SystemdHarness) -> Result<serde_json::Value, String> {
    let out = h.run(&[
        "busctl",
        "--system",
        "--json=short",
        "call",
        "org.audiowarden.Engine1",
        "/org/audiowarden/Engine1",
        "org.audiowarden.Engine1",
        "GetMetrics",
    ]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v["data"][0].clone())
}

fn busctl_metrics(h: &SystemdHarness) -> serde_json::Value {
    try_busctl_metrics(h).unwrap_or_else(|e| panic!("busctl GetMetrics: {e}"))
}

/// A property of the service as busctl prints it inside the namespace (e.g. `d 0.5`).
fn property(h: &SystemdHarness, name: &str) -> String {
    let out = h.run(&[
        "busctl",
        "--system",
        "get-property",
        "org.audiowarden.Engine1",
        "/org/audiowarden/Engine1",
        "org.audiowarden.Engine1",
        name,
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
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
    assert_eq!(property(&h, "State"), "s \"running\"");

    // A worker crash is the daemon's business, not systemd's.
    let m = busctl_metrics(&h);
    eprintln!("realtime under the user manager: {}", m["realtime"]["data"]);
    // The unit's SystemCallFilter= lets workers install their own seccomp sandbox.
    assert_eq!(m["worker_sandboxed"]["data"], true, "workers run without their sandbox under the unit: {m}");
    // Out of memory, a worker goes first (+500, raised by itself), the supervisor last
    // (OOMScoreAdjust=-900), and an OOM-killed worker does not stop the unit.
    assert_eq!(h.show(UNIT, "OOMPolicy"), "continue");
    let oom_adj = |ns_pid: &str| h.run_ok(&["cat", &format!("/proc/{ns_pid}/oom_score_adj")]).trim().to_owned();
    assert_eq!(h.show(UNIT, "OOMScoreAdjust"), "-900");
    // Lowering a score needs CAP_SYS_RESOURCE, which these machines withhold even from root
    // (TESTING.md): the manager then skips it silently, as systemd does in containers.
    let want = if has_cap_sys_resource() { "-900" } else { "0" };
    assert_eq!(oom_adj(&h.show(UNIT, "MainPID")), want);
    assert_eq!(oom_adj(&metric(&m, "spare_pid").to_string()), "500");
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
    wait_until_every("STATUS with the failover", Duration::from_secs(3), POLL, || {
        h.show(UNIT, "StatusText").contains("1 failover")
    });

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
    common::assert_shm_dir_emptied(&shm.0);
    let procs = h.run(&["pgrep", "-f", "audiowardend"]);
    assert!(
        String::from_utf8_lossy(&procs.stdout).trim().is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&procs.stdout)
    );

    // The story in the journal, with structured fields.
    let journal = h.journal(&["-u", UNIT, "-o", "json", "--no-pager"]);
    let entries: Vec<serde_json::Value> = journal.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let ours = |e: &&serde_json::Value| e["SYSLOG_IDENTIFIER"] == "audiowardend";
    let msg = |e: &serde_json::Value| e["MESSAGE"].as_str().unwrap_or("").to_owned();
    assert!(entries.iter().filter(ours).any(|e| msg(e).starts_with("playing 440 Hz")), "no start entry:\n{journal}");
    let fo = entries
        .iter()
        .filter(ours)
        .find(|e| e.get("FAILOVER_US").is_some())
        .unwrap_or_else(|| panic!("no failover entry:\n{journal}"));
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
    let gain = || property(&h, "Gain");

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
        h.journal(&["--user-unit", UNIT, "--no-pager"])
            .lines()
            .any(|l| l.contains("Got notification message") && l.contains("RELOADING=1"))
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
    wait_until_every("a watchdog restart", Duration::from_secs(15), POLL, || {
        h.show(UNIT, "NRestarts") == "1"
            && h.show(UNIT, "ActiveState") == "active"
            && h.show(UNIT, "SubState") == "running"
    });
    assert_ne!(h.show(UNIT, "MainPID"), main_pid);
    let m = busctl_metrics(&h);
    assert!(metric(&m, "stale_segments_reclaimed") >= 2, "the new instance reclaims the old one's segments: {m}");
    assert_eq!(metric(&m, "shm_leaks"), 0);
    let played = metric(&m, "frames_played");
    wait_until_every("the new instance playing", Duration::from_secs(2), POLL, || {
        metric(&busctl_metrics(&h), "frames_played") > played
    });
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
    wait_until_every("a watchdog restart", Duration::from_secs(15), POLL, || {
        h.show(UNIT, "NRestarts").parse::<u32>().unwrap_or(0) >= 1
    });
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
        let Ok(now) = try_busctl_metrics(&h) else { return false };
        m = now;
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

/// This process has CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff & (1 << 24) != 0
}

/// `cmd` as user nobody (no groups), from the test's side (the namespace shares /dev/shm).
fn as_nobody(cmd: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .args(cmd)
        .output()
        .expect("setpriv")
}

/// /dev/shm is world-writable, but a local user cannot keep the service from starting by
/// squatting its shm dir. The directory is never removed (the daemon only empties it), so
/// between two starts `nobody` can neither create it nor plant anything in it; and if it
/// was gone (removed by root) and `nobody` made it first, with a file, FIFOs and a symlink
/// where the lock file and the manifest go, the unit's ExecStartPre (the shipped tmpfiles.d
/// entry) gives it back before the daemon starts, which sweeps what was planted without
/// following or opening it, and reaches `running`.
#[test]
fn a_squatted_shm_dir_cannot_keep_the_service_from_starting() {
    let h = SystemdHarness::start();
    let shm = shm_dir("squat");
    let dir = shm.0.to_str().unwrap();
    install(&h, dir, "", "");
    start(&h);
    assert!(h.systemctl(&["stop", UNIT]).status.success());
    common::assert_shm_dir_emptied(&shm.0);

    // Between two starts: nothing to squat.
    assert!(!as_nobody(&["mkdir", dir]).status.success(), "nobody created {dir}");
    for plant in [vec!["touch", "planted"], vec!["ln", "-s", "/etc/passwd", "manifest.json"], vec!["mkfifo", ".lock"]] {
        let mut cmd: Vec<String> = plant.iter().map(|s| s.to_string()).collect();
        let last = cmd.len() - 1;
        cmd[last] = format!("{dir}/{}", cmd[last]);
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        assert!(!as_nobody(&args).status.success(), "nobody planted {args:?}");
    }
    start(&h);
    assert_eq!(h.show(UNIT, "SubState"), "running");
    assert!(h.systemctl(&["stop", UNIT]).status.success());

    // The directory gone (root removed it), and nobody got there first.
    std::fs::remove_dir_all(&shm.0).unwrap();
    let squat = format!(
        "set -e; mkdir -m 0777 {dir}; touch {dir}/ring-0-g1; mkfifo {dir}/.lock {dir}/manifest.json.tmp; ln -s /etc/passwd {dir}/manifest.json"
    );
    let out = as_nobody(&["sh", "-c", &squat]);
    assert!(out.status.success(), "the squat itself failed: {}", String::from_utf8_lossy(&out.stderr));
    start(&h);
    assert_eq!(h.show(UNIT, "SubState"), "running");
    let m = busctl_metrics(&h);
    assert_eq!(metric(&m, "stale_segments_reclaimed"), 1, "the planted ring-0-g1 was swept: {m}");
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&shm.0).unwrap();
        assert!(
            meta.is_dir() && meta.uid() == 0 && meta.mode() & 0o7777 == 0o700,
            "given back to the service user, 0700: {meta:?}"
        );
        let lock = std::fs::symlink_metadata(shm.0.join(".lock")).unwrap();
        assert!(lock.file_type().is_file() && lock.uid() == 0, "the planted FIFO lock replaced by ours");
        let manifest = std::fs::symlink_metadata(shm.0.join("manifest.json")).unwrap();
        assert!(manifest.file_type().is_file() && manifest.uid() == 0, "the planted link replaced by our manifest");
    }
    assert!(std::fs::read_to_string("/etc/passwd").unwrap().contains("root:"), "the link's target untouched");
    assert!(h.systemctl(&["stop", UNIT]).status.success());
    common::assert_shm_dir_emptied(&shm.0);
}

/// READY waits for the bus name: a daemon that plays but cannot reach the bus never becomes
/// active, and systemd fails the start when TimeoutStartSec runs out.
#[test]
fn no_ready_without_the_bus_name() {
    let h = SystemdHarness::start();
    let shm = shm_dir("no-bus");
    install(
        &h,
        shm.0.to_str().unwrap(),
        "",
        "Environment=DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/nonexistent\nTimeoutStartSec=2s\nRestart=no",
    );
    let out = h.systemctl(&["start", UNIT]);
    assert!(!out.status.success(), "start succeeded without the bus name");
    assert_eq!(h.show(UNIT, "Result"), "timeout");
    let journal = h.journal(&["-u", UNIT, "--no-pager"]);
    assert!(
        journal.contains("playing 440 Hz") && journal.contains("D-Bus API unavailable"),
        "it played, without the bus:\n{journal}"
    );
}

/// The shipped OSC socket units under the real manager: systemd creates both sockets and
/// hands them over (LISTEN_FDS), so `oscsend` reaches the service over AF_UNIX and over UDP
/// although the unit keeps PrivateNetwork=yes and RestrictAddressFamilies=AF_UNIX (it could
/// open neither itself).
#[test]
fn osc_socket_units_hand_their_sockets_to_a_service_without_network() {
    let h = SystemdHarness::start();
    let shm = shm_dir("osc");
    install(&h, shm.0.to_str().unwrap(), "", "");
    for s in ["audiowarden-osc.socket", "audiowarden-osc-udp.socket"] {
        let path = format!("{}/systemd/{s}", env!("CARGO_MANIFEST_DIR"));
        assert!(h.systemctl(&["link", &path]).status.success(), "link {s}");
    }
    // A free port instead of the shipped 9000 (the namespace shares the host's network).
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    h.drop_in(
        "audiowarden-osc-udp.socket",
        "test",
        &format!("[Socket]\nListenDatagram=\nListenDatagram=127.0.0.1:{port}\n"),
    );
    h.systemctl_ok(&["start", "audiowarden-osc.socket", "audiowarden-osc-udp.socket"]);
    start(&h);
    assert_eq!(h.show(UNIT, "PrivateNetwork"), "yes");
    let stat = h.run_ok(&["stat", "-c", "%U %G %a %F", "/run/audiowarden/osc.sock"]);
    assert_eq!(stat.trim(), "root audio 660 socket");
    let journal = h.journal(&["-u", UNIT, "--no-pager"]);
    assert!(journal.contains("OSC on osc.unix:///run/audiowarden/osc.sock (from systemd"), "{journal}");
    assert!(journal.contains(&format!("OSC on osc.udp://127.0.0.1:{port} (from systemd")), "{journal}");

    let property = |name: &str| property(&h, name);
    let out = h.run(&["oscsend", "osc.unix:///run/audiowarden/osc.sock", "/engine/frequency", "f", "660"]);
    assert!(out.status.success(), "oscsend over AF_UNIX: {out:?}");
    wait_until_every("660 Hz over the AF_UNIX socket", Duration::from_secs(5), POLL, || {
        property("Frequency") == "d 660"
    });
    let out = h.run(&["oscsend", &format!("osc.udp://127.0.0.1:{port}"), "/engine/gain", "f", "0.5"]);
    assert!(out.status.success(), "oscsend over UDP: {out:?}");
    wait_until_every("gain 0.5 over UDP", Duration::from_secs(5), POLL, || property("Gain") == "d 0.5");
    let m = busctl_metrics(&h);
    assert_eq!(metric(&m, "osc_received"), 2);
    assert_eq!(metric(&m, "osc_rejected"), 0);
    // A restart keeps the sockets (the manager holds them): OSC works at once again.
    h.systemctl_ok(&["restart", UNIT]);
    let out = h.run(&["oscsend", "osc.unix:///run/audiowarden/osc.sock", "/engine/frequency", "f", "550"]);
    assert!(out.status.success(), "oscsend after a restart: {out:?}");
    wait_until_every("550 Hz after the restart", Duration::from_secs(5), POLL, || property("Frequency") == "d 550");
}

/// Under the shipped sandbox (ProtectSystem=strict: the file system is read-only to the
/// service, root included), the two places the daemon writes outside /dev/shm are writable:
/// node exporter's textfile directory (ReadWritePaths=; without it this fails), where the
/// metrics file appears and is removed again on stop; and its RuntimeDirectory, where the
/// control socket answers `audiowardenctl --socket`, and which outlives a stop
/// (RuntimeDirectoryPreserve=yes, so that the OSC socket unit's file in it does too; without
/// it the directory is gone after the stop). A user manager's RuntimeDirectory is under
/// $XDG_RUNTIME_DIR (/run/xrt here), which its services may write anyway: that
/// RuntimeDirectory= opens the system manager's /run/audiowarden, the daemon's default, is
/// systemd's documented behaviour, not shown here.
#[test]
fn the_sandbox_lets_the_control_socket_and_the_prometheus_textfile_be_written() {
    let textfile_dir = "/var/lib/prometheus/node-exporter";
    assert!(std::path::Path::new(textfile_dir).is_dir(), "{textfile_dir}: prometheus-node-exporter is not installed");
    let h = SystemdHarness::start();
    let shm = shm_dir("rw");
    let prom = format!("{textfile_dir}/audiowarden-test-{}.prom", std::process::id());
    let sock = "/run/xrt/audiowarden/control.sock";
    // And --osc-listen, which cannot work in a unit without IP sockets: it must say so.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let args = format!("--control-socket {sock} --prometheus-textfile {prom} --osc-listen 127.0.0.1:{port}");
    install(&h, shm.0.to_str().unwrap(), &args, "");
    start(&h);
    assert_eq!(h.show(UNIT, "ProtectSystem"), "strict");
    let journal = h.journal(&["-u", UNIT, "--no-pager"]);
    assert!(
        journal.contains(&format!("no OSC on UDP 127.0.0.1:{port}"))
            && journal.contains("enable audiowarden-osc-udp.socket instead"),
        "--osc-listen under the unit says why it cannot work:\n{journal}"
    );
    let out = h.run(&["/run/aw-bin/audiowardenctl", "--socket", sock, "status"]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("audiowarden running"),
        "status over the control socket: {out:?}\n{}",
        h.journal(&["-u", UNIT, "--no-pager"])
    );
    wait_until_every("the metrics file", Duration::from_secs(5), POLL, || {
        std::fs::read_to_string(&prom).is_ok_and(|t| t.contains("audiowarden_underruns_total 0"))
    });
    h.systemctl_ok(&["stop", UNIT]);
    assert!(std::fs::symlink_metadata(&prom).is_err(), "{prom} is removed on stop");
    let left = h.run_ok(&["ls", "-A", "/run/xrt/audiowarden"]);
    assert_eq!(left.trim(), "", "the runtime directory stays, emptied of the daemon's socket");
}
