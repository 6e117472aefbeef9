//! The peer-to-peer control socket (`--control-socket`): the D-Bus API without a bus, with
//! the bus's signals, its file's permissions as the access rule, and clients that cannot
//! block it.

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::bus::{Daemon, PrivateBus};

/// A directory everyone may enter (so that only the socket file's own mode decides who may
/// connect), with the daemon's socket path in it.
fn socket_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("aw-test-p2p-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sock = dir.path().join("control.sock");
    (dir, sock)
}

/// audiowardenctl as `nobody`, with or without group audio.
fn ctl_as_nobody(socket: &Path, in_audio: bool) -> Output {
    let groups: &[&str] = if in_audio { &["--groups", "audio"] } else { &["--clear-groups"] };
    std::process::Command::new("setpriv")
        .args(["--reuid", "nobody", "--regid", "nogroup"])
        .args(groups)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_audiowardenctl"))
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .output()
        .unwrap()
}

/// audiowardenctl on the socket only (`--socket`), with no bus in its environment.
fn ctl_on(socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_audiowardenctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/aw-no-bus")
        .output()
        .expect("run audiowardenctl")
}

fn p2p(socket: &Path) -> zbus::blocking::Connection {
    let stream = UnixStream::connect(socket).expect("connect to the control socket");
    zbus::blocking::connection::Builder::async_io_unix_stream(stream).p2p().build().expect("p2p handshake")
}

#[test]
fn the_api_works_peer_to_peer_with_its_signals_and_the_file_is_group_audio() {
    let bus = PrivateBus::start();
    let (_dir, sock) = socket_dir();
    let mut d = Daemon::start(&bus, "p2p", &["--frequency", "440", "--control-socket", sock.to_str().unwrap()]);
    let meta = std::fs::symlink_metadata(&sock).expect("the control socket exists");
    assert_eq!(meta.mode() & 0o777, 0o660, "mode");
    let audio = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("audio:").and_then(|r| r.split(':').nth(1)).and_then(|g| g.parse::<u32>().ok()));
    assert_eq!(Some(meta.gid()), audio, "group audio");

    // A client of our own: methods, properties and the signals the bus gets.
    let conn = p2p(&sock);
    let p = common::bus::proxy(&conn);
    assert_eq!(p.frequency().unwrap(), 440.0);
    assert_eq!(p.state().unwrap(), "running");
    let signals = zbus::blocking::MessageIterator::from(&conn);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for m in signals.flatten() {
            let h = m.header();
            let member = h.member().map(|m| m.to_string()).unwrap_or_default();
            if tx.send(member).is_err() {
                return;
            }
        }
    });
    // Changed on the bus, announced to the peer too.
    let o = bus.command(env!("CARGO_BIN_EXE_audiowardenctl")).args(["set-frequency", "660"]).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while !seen.iter().any(|m| m == "PropertiesChanged") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(m) => seen.push(m),
            Err(_) => panic!("no PropertiesChanged on the peer connection; saw {seen:?}\n{}", d.log_text()),
        }
    }
    assert_eq!(p.frequency().unwrap(), 660.0);
    // Set through the peer: one more change received, the value follows.
    p.set_gain(0.5).unwrap();
    assert_eq!(p.gain().unwrap(), 0.5);
    let m = p.get_metrics().unwrap();
    assert_eq!(common::bus::get_u64(&m, "control_received"), 2);
    // A bad value is refused with its range, as on the bus.
    let o = ctl_on(&sock, &["set-frequency", "-5"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Hz"), "{o:?}");
    // The metrics text through the socket.
    let o = ctl_on(&sock, &["metrics", "--prometheus"]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("audiowarden_underruns_total 0"),
        "{o:?}"
    );

    // Not a member of group audio: the file refuses the connection; a member is served (and
    // authenticated as itself).
    let o = ctl_as_nobody(&sock, false);
    assert_eq!(o.status.code(), Some(3), "nobody: {o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"), "{o:?}");
    let o = ctl_as_nobody(&sock, true);
    assert!(o.status.success(), "nobody in group audio: {o:?}");

    drop(p);
    drop(conn);
    assert!(d.stop().success());
    assert!(std::fs::symlink_metadata(&sock).is_err(), "the socket file is removed on stop");
}

/// Clients that connect and say nothing (or never finish authenticating) hold neither the
/// socket nor a slot for long: others are served meanwhile, and the silent ones are cut off
/// after the handshake timeout. More than the limit of clients at once are refused, counted in
/// the journal, and the daemon plays on.
#[test]
fn silent_clients_and_a_flood_of_connections_block_nobody() {
    let bus = PrivateBus::start();
    let (_dir, sock) = socket_dir();
    let mut d = Daemon::start(&bus, "p2p-silent", &["--control-socket", sock.to_str().unwrap()]);
    let mut silent: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    // One that starts the handshake (the NUL byte and half an AUTH line) and stops.
    {
        use std::io::Write;
        let mut half = UnixStream::connect(&sock).unwrap();
        half.write_all(b"\0AUTH EXTER").unwrap();
        silent.push(half);
    }
    let t0 = Instant::now();
    let o = ctl_on(&sock, &["status"]);
    assert!(o.status.success(), "status with silent clients connected: {o:?}\n{}", d.log_text());
    // Cut off after the handshake timeout (2 s; the accept thread looks once a second).
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = loop {
            match s.read(&mut buf) {
                Ok(0) => break 0,
                Ok(_) => continue, // a REJECTED line or similar: read on to the end
                Err(e) => panic!("a silent client was not cut off within 10 s: {e}"),
            }
        };
        assert_eq!(n, 0);
    }
    assert!(t0.elapsed() >= Duration::from_secs(2), "cut off before its time: {:?}", t0.elapsed());
    drop(silent);

    // A flood: 40 silent connections at once; 16 are taken, the rest refused at once.
    let flood: Vec<UnixStream> = (0..40).filter_map(|_| UnixStream::connect(&sock).ok()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut closed = 0;
    for s in &flood {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        if matches!((&*s).read(&mut buf), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 40 - 16, "{closed} of 40 refused: the limit is 16 clients");
    drop(flood);
    // Once they are gone, clients are served again; the audio never noticed.
    common::wait_until("the socket serves again", Duration::from_secs(10), || {
        ctl_on(&sock, &["status"]).status.success()
    });
    let o = ctl_on(&sock, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["metrics"]["underruns"], 0);
    assert!(d.log_text().contains("a client was refused: 16 clients are connected already"), "{}", d.log_text());
    assert!(d.stop().success());
}
