//! A real `systemd --user` manager with journald and a private system bus, in private mount,
//! PID and cgroup namespaces (tests/support/systemd-harness.sh), so that tests can run the
//! project's unit under `systemctl --user`. Needs root. Everything is torn down on drop (and by
//! the script's watchdog if the test process dies without dropping).
//!
//! Inside the namespaces: the bus on unix:path=/run/dbus/system_bus_socket, the journal in
//! /run/log/journal, XDG_RUNTIME_DIR=/run/xrt. PIDs reported inside (MainPID, worker PIDs in
//! metrics) are namespace PIDs: map them with [`SystemdHarness::ns_pid_to_host`] or signal them
//! with [`SystemdHarness::kill`]. A sandboxed unit (PrivateTmp=, ProtectHome=) does not see
//! /tmp, where the harness dir lives: binaries must come from the repo (target/), not /tmp.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

/// The shipped unit's name.
pub const UNIT: &str = "audiowarden.service";

/// The script behind the harness.
pub fn harness_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/systemd-harness.sh")
}

pub struct SystemdHarness {
    /// The harness dir: unit files can be written here, the manager's XDG_CONFIG_HOME is
    /// `config/`, the logs of the init part are in `harness.log`.
    pub dir: tempfile::TempDir,
    /// Host PID of the namespace's PID 1.
    pub init_pid: u32,
    /// Name of the cgroup subtree (`audiowarden-sd-...`).
    pub cgroup: String,
    /// The subtree's absolute paths, one per hierarchy (cpu first).
    pub cgroup_paths: Vec<PathBuf>,
    stopped: bool,
}

impl SystemdHarness {
    /// Starts the manager; returns once `systemctl --user is-system-running` says running or
    /// degraded. Panics with the harness log on failure.
    pub fn start() -> SystemdHarness {
        let dir = tempfile::Builder::new().prefix("aw-test-systemd-").tempdir().expect("tempdir");
        let out = Command::new("bash")
            .arg(harness_script())
            .arg("start")
            .arg(dir.path())
            .env("AW_DBUS_POLICY_DIR", concat!(env!("CARGO_MANIFEST_DIR"), "/dbus"))
            .env("AW_HARNESS_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .expect("run tests/support/systemd-harness.sh");
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.path().join("harness.log")).unwrap_or_default();
            panic!(
                "systemd harness failed to start ({})\n--- stderr ---\n{}\n--- harness.log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
                log
            );
        }
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_else(|e| panic!("harness {f}: {e}"));
        let init_pid = read("init.pid").trim().parse().expect("init.pid");
        let cgroup = read("cgroup").trim().to_string();
        let cgroup_paths = read("cgroup.paths").lines().map(PathBuf::from).collect();
        SystemdHarness { dir, init_pid, cgroup, cgroup_paths, stopped: false }
    }

    /// The manager's user unit dir ($XDG_CONFIG_HOME/systemd/user): `link` puts symlinks here,
    /// drop-ins (`<unit>.d/*.conf`) can be written here (then `daemon-reload`).
    pub fn unit_dir(&self) -> PathBuf {
        self.dir.path().join("config/systemd/user")
    }

    /// Writes `contents` as DIR/`name` and `systemctl --user link`s it. Panics on failure.
    pub fn install_unit(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("write unit");
        self.systemctl_ok(&["link", path.to_str().unwrap()]);
        path
    }

    /// Writes the drop-in `<unit>.d/<name>.conf` and reloads the manager.
    pub fn drop_in(&self, unit: &str, name: &str, contents: &str) {
        let d = self.unit_dir().join(format!("{unit}.d"));
        std::fs::create_dir_all(&d).expect("drop-in dir");
        std::fs::write(d.join(format!("{name}.conf")), contents).expect("write drop-in");
        self.systemctl_ok(&["daemon-reload"]);
    }

    /// Runs `args` inside the namespaces (with XDG_RUNTIME_DIR, XDG_CONFIG_HOME and
    /// DBUS_SYSTEM_BUS_ADDRESS set as the manager has them); stdout, stderr and the exit status
    /// are the command's.
    pub fn run(&self, args: &[&str]) -> Output {
        assert!(!args.is_empty(), "run: no command");
        Command::new("bash")
            .arg(harness_script())
            .arg("run")
            .arg(self.dir.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tests/support/systemd-harness.sh run")
    }

    /// Like `run`, but panics unless the command succeeds; returns its stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl --user ARGS` inside.
    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut v = vec!["systemctl", "--user", "--no-pager"];
        v.extend_from_slice(args);
        self.run(&v)
    }

    /// `systemctl --user ARGS`, panicking on failure; returns stdout.
    pub fn systemctl_ok(&self, args: &[&str]) -> String {
        let mut v = vec!["systemctl", "--user", "--no-pager"];
        v.extend_from_slice(args);
        self.run_ok(&v)
    }

    /// `systemctl --user show -p PROP --value UNIT`, trimmed.
    pub fn show(&self, unit: &str, prop: &str) -> String {
        self.systemctl_ok(&["show", "-p", prop, "--value", unit]).trim().to_string()
    }

    /// `journalctl --no-pager ARGS` inside (the namespace's journal only), stdout. What a
    /// service writes is under `-u UNIT`; the manager's own lines about it ("Started ...") under
    /// `--user-unit UNIT`. Syncs the journal first.
    pub fn journal(&self, args: &[&str]) -> String {
        let _ = self.run(&["journalctl", "--sync"]);
        let mut v = vec!["journalctl", "--no-pager"];
        v.extend_from_slice(args);
        String::from_utf8_lossy(&self.run(&v).stdout).into_owned()
    }

    /// `busctl --system ARGS` against the private bus inside.
    pub fn busctl(&self, args: &[&str]) -> Output {
        let mut v = vec!["busctl", "--system", "--no-pager"];
        v.extend_from_slice(args);
        self.run(&v)
    }

    /// The host PID of the process that has PID `ns_pid` inside the namespace (None if there is
    /// none), from NSpid in /proc/*/status of the processes in the namespace's PID namespace.
    pub fn ns_pid_to_host(&self, ns_pid: u32) -> Option<u32> {
        let our_ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init_pid)).ok()?;
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&our_ns) {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
            let Some(line) = status.lines().find(|l| l.starts_with("NSpid:")) else { continue };
            let ids: Vec<u32> = line[6..].split_whitespace().filter_map(|s| s.parse().ok()).collect();
            if ids.len() >= 2 && *ids.last().unwrap() == ns_pid {
                return Some(ids[0]);
            }
        }
        None
    }

    /// The host PID of UNIT's main process (None if it has none).
    pub fn main_pid_host(&self, unit: &str) -> Option<u32> {
        let ns: u32 = self.show(unit, "MainPID").parse().ok()?;
        if ns == 0 {
            return None;
        }
        self.ns_pid_to_host(ns)
    }

    /// Sends `signal` (a name like "KILL" or "SIGTERM", or a number) to namespace PID `ns_pid`,
    /// through `kill` inside. True if it was delivered.
    pub fn kill(&self, ns_pid: u32, signal: &str) -> bool {
        let sig = format!("-{}", signal.trim_start_matches('-'));
        self.run(&["kill", &sig, &ns_pid.to_string()]).status.success()
    }

    /// Gives the cpu cgroup `rel` (relative to the namespace's root, e.g. "app.slice" or
    /// "app.slice/foo.service") and each of its ancestors below the root an RT budget of `us`,
    /// so that `CPUSchedulingPolicy=fifo` works there. Returns false (and leaves the rest) if
    /// the kernel refuses (the siblings' budgets must stay within the parent's).
    pub fn grant_rt(&self, rel: &str, us: u64) -> bool {
        let mut p = self.cgroup_paths[0].clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p.push(part);
            if std::fs::write(p.join("cpu.rt_runtime_us"), us.to_string()).is_err() {
                return false;
            }
        }
        true
    }

    /// The log of the init part (journald, dbus-daemon and harness messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("harness.log")).unwrap_or_default()
    }

    /// Tears everything down now (drop does it otherwise). Idempotent.
    pub fn stop(&mut self) -> Result<(), String> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        super::stop_support_script("systemd-harness.sh", self.dir.path())
    }
}

impl Drop for SystemdHarness {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            // No panic in drop (it may run while unwinding): say it loudly instead.
            eprintln!("WARNING: {e}");
        }
    }
}

/// Links the shipped unit and adds a drop-in for the test: the built binary, a private shm
/// dir, and no User=/Group= (a user manager cannot switch users). Everything else, hardening
/// included, is the shipped unit.
pub fn install(h: &SystemdHarness, shm: &str, extra_args: &str, extra_service: &str) {
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
    // The shipped tmpfiles.d entry, for this test's shm dir and user (root): the unit's
    // ExecStartPre applies it before every start, as it does the installed one.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/audiowarden.tmpfiles")).unwrap();
    let entry = shipped.lines().find(|l| l.starts_with("d ")).expect("the shipped tmpfiles entry");
    let entry = entry.replace("/dev/shm/audiowarden", shm).replace("audiowarden audiowarden", "root root");
    let tmpfiles = "/run/aw-bin/audiowarden-tmpfiles.conf";
    let out = h.run(&["sh", "-c", &format!("printf '%s\\n' '{entry}' > {tmpfiles}")]);
    assert!(out.status.success(), "write {tmpfiles}: {}", String::from_utf8_lossy(&out.stderr));
    // The virtual output unless the test names one.
    let output = if extra_args.contains("--output") { "" } else { "--output virtual" };
    h.drop_in(
        UNIT,
        "test",
        &format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStartPre=\nExecStartPre=+/usr/bin/systemd-tmpfiles --create {tmpfiles}\nExecStart=\nExecStart={bin} --shm-dir {shm} {output} {extra_args}\nExecReload=\nExecReload={ctl} reload\nUser=\nGroup=\nSupplementaryGroups=\nAmbientCapabilities=\nWatchdogSec=1s\nTimeoutStopSec=3s\n{extra_service}\n"
        ),
    );
}

pub fn start(h: &SystemdHarness) {
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
