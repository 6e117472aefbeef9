//! Proves tests/common/systemd.rs: a sandboxed Type=notify unit under the namespaced
//! `systemd --user`, the private bus and the journal inside, and nothing left behind.
mod common;

use common::systemd::SystemdHarness;

const UNIT: &str = "aw-harness-hello.service";

const UNIT_FILE: &str = r#"[Unit]
Description=audiowarden harness self-test
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=all
ExecStart=/bin/bash -c 'echo hello-from-the-unit; systemd-notify --ready --status="hello"; exec sleep infinity'
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
NoNewPrivileges=yes
RestrictNamespaces=yes
PrivateNetwork=yes
RestrictAddressFamilies=AF_UNIX
CapabilityBoundingSet=
"#;

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn sandboxed_notify_unit_under_namespaced_user_manager() {
    let h = SystemdHarness::start();
    let paths = h.cgroup_paths.clone();
    assert!(paths.iter().all(|p| p.is_dir()), "cgroup subtree missing: {paths:?}");

    h.install_unit(UNIT, UNIT_FILE);
    let out = h.systemctl(&["start", UNIT]);
    assert!(out.status.success(), "start failed: {}\n{}", text(&out), h.journal(&["-n", "50"]));
    assert_eq!(h.show(UNIT, "ActiveState"), "active");
    assert_eq!(h.show(UNIT, "StatusText"), "hello");
    let status = text(&h.systemctl(&["status", UNIT]));
    assert!(status.contains("hello"), "status lacks the STATUS= text:\n{status}");

    // MainPID is a namespace PID; it maps to a host PID running `sleep`.
    let host = h.main_pid_host(UNIT).expect("MainPID maps to a host pid");
    let cmdline = std::fs::read_to_string(format!("/proc/{host}/cmdline")).unwrap_or_default();
    assert!(cmdline.starts_with("sleep"), "host pid {host} is not the unit's sleep: {cmdline:?}");

    // The private system bus is there.
    let bus = h.busctl(&["list"]);
    assert!(bus.status.success(), "busctl --system list: {}", text(&bus));
    assert!(String::from_utf8_lossy(&bus.stdout).contains("org.freedesktop.DBus"), "{}", text(&bus));

    // The journal has the manager's "Started" line and the unit's own output.
    let manager = h.journal(&["--user-unit", UNIT]);
    assert!(manager.contains("Started aw-harness-hello.service"), "journal (--user-unit):\n{manager}");
    let own = h.journal(&["-u", UNIT]);
    assert!(own.contains("hello-from-the-unit"), "journal (-u):\n{own}");

    h.systemctl_ok(&["stop", UNIT]);
    assert_eq!(h.show(UNIT, "ActiveState"), "inactive");

    let name = h.cgroup.clone();
    let init_pid = h.init_pid;
    drop(h);

    assert!(!std::path::Path::new("/sys/fs/cgroup/cpu").join(&name).exists(), "cpu cgroup {name} left behind");
    for p in &paths {
        assert!(!p.exists(), "cgroup {} left behind", p.display());
    }
    assert!(!std::path::Path::new(&format!("/proc/{init_pid}")).exists(), "namespace init {init_pid} still alive");
    assert!(!std::path::Path::new(&format!("/proc/{host}")).exists(), "the unit's process {host} still alive");
}
