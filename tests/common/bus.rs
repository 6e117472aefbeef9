//! A private system bus (a real dbus-daemon with the system bus's configuration and the
//! project's policy from dbus/) and the real `audiowardend` running against it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use audiowarden::dbus::Engine1ProxyBlocking;
use zbus::zvariant::OwnedValue;

use super::{wait_until, ShmDir};

/// The project's dbus/ directory (policy and introspection XML).
pub fn dbus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dbus")
}

/// dbus-daemon with /usr/share/dbus-1/system.conf minus what only the real system bus does
/// (user switch, fork, pid file, syslog, activation), listening on a socket of its own, with
/// the project's policy included. Killed (by PID) on drop.
pub struct PrivateBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
    conf: PathBuf,
    sock: PathBuf,
}

impl PrivateBus {
    pub fn start() -> PrivateBus {
        let dir = tempfile::Builder::new().prefix("aw-test-bus-").tempdir().expect("tempdir");
        // Other users (setpriv tests) must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sock = dir.path().join("system_bus_socket");
        let system = std::fs::read_to_string("/usr/share/dbus-1/system.conf")
            .expect("dbus-daemon installed (/usr/share/dbus-1/system.conf)");
        let drop = [
            "<user>",
            "<fork/>",
            "<pidfile>",
            "<syslog/>",
            "<servicehelper>",
            "<standard_system_servicedirs/>",
            "<listen>",
        ];
        let mut conf: String =
            system.lines().filter(|l| !drop.iter().any(|d| l.contains(d))).map(|l| format!("{l}\n")).collect();
        let tail = format!(
            "  <listen>unix:path={}</listen>\n  <includedir>{}</includedir>\n</busconfig>",
            sock.display(),
            dbus_dir().display()
        );
        conf = conf.replacen("</busconfig>", &tail, 1);
        let conf_path = dir.path().join("system.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = spawn_dbus_daemon(&conf_path, &sock);
        PrivateBus { address: format!("unix:path={}", sock.display()), dir, child, conf: conf_path, sock }
    }

    /// Kills the dbus-daemon and starts a new one on the same socket (as `systemctl restart
    /// dbus` would): every connection is lost, names with it.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        self.child = spawn_dbus_daemon(&self.conf, &self.sock);
    }

    /// A command with DBUS_SYSTEM_BUS_ADDRESS pointing here.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("DBUS_SYSTEM_BUS_ADDRESS", &self.address).stdin(Stdio::null());
        c
    }

    /// `busctl --system ARGS` against this bus.
    pub fn busctl(&self, args: &[&str]) -> Output {
        self.command("busctl").arg("--system").args(args).output().expect("run busctl")
    }

    pub fn connection(&self) -> zbus::blocking::Connection {
        zbus::blocking::connection::Builder::address(self.address.as_str())
            .expect("address")
            .build()
            .expect("connect to the private bus")
    }
}

fn spawn_dbus_daemon(conf: &Path, sock: &Path) -> Child {
    let child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .arg("--nofork")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dbus-daemon");
    // Until a connect succeeds, not until the file exists: dbus-daemon binds the socket (the
    // file appears) before it listens, and a connect in between is refused (rehearsal r23:
    // ECONNREFUSED on a loaded machine).
    wait_until("the private bus socket", Duration::from_secs(5), || {
        std::os::unix::net::UnixStream::connect(sock).is_ok()
    });
    child
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How [`Daemon::launch`] starts the daemon.
#[derive(Default)]
pub struct Launch<'a> {
    pub args: &'a [&'a str],
    pub env: &'a [(String, String)],
    /// A command (and its arguments) that execs the daemon with its arguments appended (as
    /// `"$@"`): a cgroup move, a private mount namespace.
    pub prefix: Vec<std::ffi::OsString>,
    /// `--shm-dir` (default: the Daemon's own ShmDir).
    pub shm_dir: Option<PathBuf>,
    /// Return at once instead of waiting until it is `running`.
    pub no_wait: bool,
}

/// `audiowardend` (the real binary) on a private bus with a private shm dir. SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub shm: ShmDir,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts it (on the virtual output unless `args` name one) and waits until it owns the
    /// name and reports `running`.
    pub fn start(bus: &PrivateBus, tag: &str, args: &[&str]) -> Daemon {
        Daemon::start_with_env(bus, tag, args, &[])
    }

    /// [`Daemon::start`] with more environment (e.g. a JACK server's).
    pub fn start_with_env(bus: &PrivateBus, tag: &str, args: &[&str], env: &[(String, String)]) -> Daemon {
        Daemon::start_in(bus, tag, args, env, None)
    }

    /// [`Daemon::start_with_env`], the daemon (and so its workers) in the cgroup directory
    /// `cgroup` (e.g. a cpu cgroup without an RT budget) from its first instruction on.
    pub fn start_in(
        bus: &PrivateBus,
        tag: &str,
        args: &[&str],
        env: &[(String, String)],
        cgroup: Option<&Path>,
    ) -> Daemon {
        let mut launch = Launch { args, env, ..Launch::default() };
        let cg = cgroup.map(|c| c.as_os_str().to_owned());
        if let Some(cg) = &cg {
            launch.prefix =
                vec!["sh".into(), "-c".into(), "echo $$ > \"$0/cgroup.procs\" && exec \"$@\"".into(), cg.clone()];
        }
        Daemon::launch(bus, tag, launch)
    }

    /// Starts it as `launch` says.
    pub fn launch(bus: &PrivateBus, tag: &str, launch: Launch<'_>) -> Daemon {
        let shm = ShmDir::new(tag);
        let output: &[&str] = if launch.args.contains(&"--output") { &[] } else { &["--output", "virtual"] };
        let log = bus.dir.path().join(format!("audiowardend-{tag}.log"));
        // AW_BENCH_DAEMON_BIN: another build, for a benchmark's before/after in one run.
        let exe = std::env::var_os("AW_BENCH_DAEMON_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_audiowardend").into());
        let mut cmd = match launch.prefix.split_first() {
            None => bus.command(&exe),
            Some((program, rest)) => {
                let mut c = bus.command(program);
                c.args(rest).arg(&exe);
                c
            }
        };
        let shm_dir = launch.shm_dir.clone().unwrap_or_else(|| shm.0.clone());
        // Its own OSC socket (never the shared default path, which parallel daemons would contend for).
        let osc: Vec<std::ffi::OsString> = if launch.args.contains(&"--osc-socket") {
            Vec::new()
        } else {
            vec!["--osc-socket".into(), bus.dir.path().join(format!("osc-{tag}.sock")).into()]
        };
        // Likewise its own D-Bus control socket.
        let control: Vec<std::ffi::OsString> = if launch.args.contains(&"--control-socket") {
            Vec::new()
        } else {
            vec!["--control-socket".into(), bus.dir.path().join(format!("control-{tag}.sock")).into()]
        };
        let child = cmd
            .arg("--shm-dir")
            .arg(&shm_dir)
            .args(output)
            .args(&osc)
            .args(&control)
            .args(launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .env("AUDIOWARDEN_LOG", "stderr")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn audiowardend");
        let mut d = Daemon { child, shm, log };
        if launch.no_wait {
            return d;
        }
        d.wait_running(bus, Duration::from_secs(10));
        d
    }

    /// Waits until it owns the name and reports `running` (panics after `timeout`, or if it
    /// exits).
    pub fn wait_running(&mut self, bus: &PrivateBus, timeout: Duration) {
        let conn = bus.connection();
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("audiowardend exited ({st}) before owning its name:\n{}", self.log_text());
            }
            let state = Engine1ProxyBlocking::builder(&conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .and_then(|p| p.state());
            if state.as_deref() == Ok("running") {
                break;
            }
            assert!(
                t0.elapsed() < timeout,
                "audiowardend not running on the bus after {timeout:?} ({state:?}):\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon is still running (it did not exit or die).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        super::signal(self.pid(), libc::SIGTERM);
        match super::wait_child(&mut self.child, Duration::from_secs(5)) {
            Some(st) => st,
            None => {
                let _ = self.child.kill();
                panic!("audiowardend ignored SIGTERM for 5 s:\n{}", self.log_text());
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the daemon this test spawned and has not reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            if super::wait_child(&mut self.child, Duration::from_secs(3)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// The values a caching proxy's property stream yields, from a thread of its own (the stream
/// may first yield the value it had cached).
pub fn follow<T>(mut changes: zbus::blocking::proxy::PropertyIterator<'static, T>) -> std::sync::mpsc::Receiver<T>
where
    T: TryFrom<OwnedValue> + Send + Unpin + 'static,
    T::Error: Into<zbus::Error>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in &mut changes {
            if let Ok(v) = c.get() {
                let _ = tx.send(v);
            }
        }
    });
    rx
}

/// A proxy without property caching (every read is a real Get).
pub fn proxy(conn: &zbus::blocking::Connection) -> Engine1ProxyBlocking<'static> {
    Engine1ProxyBlocking::builder(conn).cache_properties(zbus::proxy::CacheProperties::No).build().expect("proxy")
}

pub fn get_u64(m: &HashMap<String, OwnedValue>, k: &str) -> u64 {
    match &**m.get(k).unwrap_or_else(|| panic!("metric {k} missing")) {
        zbus::zvariant::Value::U32(x) => *x as u64,
        zbus::zvariant::Value::U64(x) => *x,
        v => panic!("metric {k} is {v:?}, not a count"),
    }
}

pub fn get_bool(m: &HashMap<String, OwnedValue>, k: &str) -> bool {
    match &**m.get(k).unwrap_or_else(|| panic!("metric {k} missing")) {
        zbus::zvariant::Value::Bool(x) => *x,
        v => panic!("metric {k} is {v:?}, not a flag"),
    }
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}
