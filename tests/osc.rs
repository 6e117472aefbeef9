//! OSC, the engine's original control path, with a real client: liblo's `oscsend` (Debian's
//! liblo-tools) over the AF_UNIX socket and over UDP, against the real daemon on a private
//! bus. A change lands bit-exact in a `wav:` capture across a SIGKILL of the primary; a few
//! thousand malformed datagrams are all counted as rejected while the tone plays on untouched;
//! `nobody` is refused by the socket's mode while group `audio` gets through; a status query
//! is answered to the sender.

mod common;

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use audiowarden::engine::{ControlKind, ControlMsg};
use common::bus::{get_bool, get_u64, proxy, Daemon, PrivateBus};
use common::{temp_wav, wait_until, Rng};
use rosc::{OscMessage, OscPacket, OscType};

fn oscsend(url: &str, args: &[&str]) -> std::process::Output {
    Command::new("oscsend").arg(url).args(args).output().expect("oscsend (liblo-tools) is installed")
}

/// A UDP port nobody listens on now.
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A directory others may traverse (the socket's own mode is what is tested), removed on drop.
struct OpenDir(PathBuf);

impl OpenDir {
    fn new(tag: &str) -> OpenDir {
        let p = std::env::temp_dir().join(format!("aw-test-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        OpenDir(p)
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn encode(addr: &str, args: Vec<OscType>) -> Vec<u8> {
    rosc::encoder::encode(&OscPacket::Message(OscMessage { addr: addr.into(), args })).unwrap()
}

/// The (seq, first frame) of the change the daemon logged for `what` (e.g. "/engine/frequency 660").
fn logged_stamp(d: &Daemon, what: &str) -> (u64, u64) {
    let text = d.log_text();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("OSC {what} from")))
        .unwrap_or_else(|| panic!("no log of {what}:\n{text}"));
    let after = line.split("change #").nth(1).expect("change #");
    let (seq, rest) = after.split_once(" at frame ").expect("at frame");
    let frame = rest.split_whitespace().next().unwrap();
    (seq.parse().unwrap(), frame.parse().unwrap())
}

#[test]
fn oscsend_over_the_unix_socket_and_udp_sets_what_plays() {
    let bus = PrivateBus::start();
    let dir = OpenDir::new("osc-both");
    let sock = dir.0.join("osc.sock");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(&bus, "osc-both", &["--osc-socket", sock.to_str().unwrap(), "--osc-listen", &listen]);
    let conn = bus.connection();
    let p = proxy(&conn);
    // The socket is group audio, 0660.
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // Clients on the bus hear of it (PropertiesChanged, followed by a caching proxy).
    let cached = audiowarden::dbus::Engine1ProxyBlocking::new(&conn).unwrap();
    assert_eq!(cached.frequency().unwrap(), 440.0);
    let heard = common::bus::follow(cached.receive_frequency_changed());

    let out = oscsend(&format!("osc.udp://{listen}"), &["/engine/frequency", "f", "660"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("660 Hz by OSC over UDP", Duration::from_secs(5), || p.frequency().unwrap() == 660.0);
    let t0 = std::time::Instant::now();
    while heard.recv_timeout(Duration::from_secs(5)).expect("PropertiesChanged for the OSC change") != 660.0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    // An integer argument, over the AF_UNIX socket; then a double.
    let out = oscsend(&format!("osc.unix://{}", sock.display()), &["/engine/gain", "i", "0"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("gain 0 by OSC over AF_UNIX", Duration::from_secs(5), || p.gain().unwrap() == 0.0);
    let out = oscsend(&format!("osc.unix://{}", sock.display()), &["/engine/gain", "d", "0.125"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("gain 0.125", Duration::from_secs(5), || p.gain().unwrap() == 0.125);

    let m = p.get_metrics().unwrap();
    assert_eq!(get_u64(&m, "osc_received"), 3);
    assert_eq!(get_u64(&m, "osc_rejected"), 0);
    assert_eq!(get_u64(&m, "control_received"), 3, "the same control path as D-Bus");
    // The journal says who changed what: the UDP peer, the AF_UNIX sender's uid.
    let log = d.log_text();
    assert!(log.contains("OSC /engine/frequency 660 from udp 127.0.0.1:"), "{log}");
    assert!(log.contains(&format!("OSC /engine/gain 0 from uid {} (pid", audiowarden::sys::euid())), "{log}");
    assert!(d.stop().success());
    assert!(!sock.exists(), "the socket file is removed on stop");
}

#[test]
fn an_osc_change_lands_bit_exact_across_a_kill_of_the_primary() {
    let bus = PrivateBus::start();
    let wav = temp_wav("osc-kill");
    let sock = wav.path.with_file_name("osc.sock");
    let output = format!("wav:{}", wav.path.display());
    let mut d = Daemon::start(
        &bus,
        "osc-kill",
        &["--output", &output, "--frequency", "1000", "--gain", "0.5", "--osc-socket", sock.to_str().unwrap()],
    );
    let conn = bus.connection();
    let p = proxy(&conn);
    std::thread::sleep(Duration::from_millis(300));
    let primary = get_u64(&p.get_metrics().unwrap(), "primary_pid") as u32;
    // The change, then the kill right after it (the change is still ahead of the output).
    let out = oscsend(&format!("osc.unix://{}", sock.display()), &["/engine/frequency", "f", "1500"]);
    assert!(out.status.success(), "{out:?}");
    common::signal(primary, libc::SIGKILL);
    wait_until("rebuilt after the kill", Duration::from_secs(5), || {
        let m = p.get_metrics().unwrap();
        get_u64(&m, "replacements") >= 1 && get_bool(&m, "spare_ready")
    });
    let out = oscsend(&format!("osc.unix://{}", sock.display()), &["/engine/gain", "f", "0.25"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("both applied", Duration::from_secs(5), || get_u64(&p.get_metrics().unwrap(), "control_applied") == 2);
    std::thread::sleep(Duration::from_millis(200));
    let m = p.get_metrics().unwrap();
    assert!(d.stop().success());
    assert_eq!(get_u64(&m, "crash_count"), 1, "{}", d.log_text());
    assert_eq!(get_u64(&m, "underruns"), 0);
    let (s1, f1) = logged_stamp(&d, "/engine/frequency 1500");
    let (s2, f2) = logged_stamp(&d, "/engine/gain 0.25");
    let msgs = [
        ControlMsg::new(s1, f1, ControlKind::SetFrequency, 1500.0),
        ControlMsg::new(s2, f2, ControlKind::SetGain, 0.25),
    ];
    let cfg = audiowarden::Config { frequency: 1000.0, gain: 0.5, ..audiowarden::Config::default() };
    common::assert_matches_reference(&wav.path, &cfg, &msgs, false);
}

/// Garbage of every kind: random bytes, truncated messages, wrong type tags, unknown
/// addresses, values out of range, bundles nested too deep, a datagram near 64 KiB, decoder
/// bombs.
#[allow(clippy::too_many_lines)]
fn garbage(rng: &mut Rng, i: usize) -> Vec<u8> {
    let valid = encode("/engine/frequency", vec![OscType::Float(880.0)]);
    match i % 10 {
        // Decoder bombs: bundles nested 390 deep, an array opened 7000 times (recursion, and a
        // recursive drop, on the daemon's OSC thread).
        8 => {
            let mut v = valid.clone();
            for _ in 0..390 {
                let mut b = b"#bundle\0".to_vec();
                b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
                b.extend_from_slice(&(v.len() as u32).to_be_bytes());
                b.extend_from_slice(&v);
                v = b;
            }
            v
        }
        9 => {
            let mut v = b"/engine/gain\0\0\0\0,".to_vec();
            v.extend(std::iter::repeat_n(b'[', 7000));
            v.resize(v.len().next_multiple_of(4) + 4, 0);
            v
        }
        0 => (0..(rng.range_ms(1, 200).as_millis() as usize)).map(|_| rng.range_ms(0, 256).as_millis() as u8).collect(),
        1 => valid[..rng.range_ms(1, valid.len() as u64).as_millis() as usize].to_vec(),
        2 => encode("/engine/frequency", vec![OscType::String("loud".into())]),
        3 => encode("/engine/gain", vec![OscType::Float(0.5), OscType::Float(0.5)]),
        4 => encode("/engine/volume", vec![OscType::Float(0.5)]),
        5 => encode("/engine/frequency", vec![[f64::NAN, -1.0, 1e9, 0.0][i / 10 % 4].into()]),
        6 => {
            let mut p = OscPacket::Message(OscMessage { addr: "/engine/gain".into(), args: vec![OscType::Float(0.1)] });
            for _ in 0..12 {
                p = OscPacket::Bundle(rosc::OscBundle { timetag: (0, 1).into(), content: vec![p] });
            }
            rosc::encoder::encode(&p).unwrap()
        }
        _ => {
            let mut v = encode("/engine/frequency", vec![OscType::Blob(vec![7; 60_000])]);
            v.truncate(60_000 + rng.range_ms(0, 20).as_millis() as usize);
            v
        }
    }
}

#[test]
fn thousands_of_malformed_datagrams_are_rejected_and_the_tone_plays_on() {
    let bus = PrivateBus::start();
    let wav = temp_wav("osc-garbage");
    let sock = wav.path.with_file_name("osc.sock");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let output = format!("wav:{}", wav.path.display());
    let mut d = Daemon::start(
        &bus,
        "osc-garbage",
        &["--output", &output, "--osc-socket", sock.to_str().unwrap(), "--osc-listen", &listen],
    );
    let conn = bus.connection();
    let p = proxy(&conn);
    let received = || get_u64(&p.get_metrics().unwrap(), "osc_received");
    let unix = UnixDatagram::unbound().unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng::new();
    let total = 4000;
    for i in 0..total {
        let bytes = garbage(&mut rng, i);
        // Half over each transport. AF_UNIX blocks when the daemon's queue is full; UDP would
        // drop instead (its buffer holds a few of the 60 KB ones), so every 10 datagrams, and
        // after each large one, wait until the daemon has read them all.
        if i % 2 == 0 {
            unix.send_to(&bytes, &sock).unwrap();
        } else {
            udp.send_to(&bytes, &listen).unwrap();
        }
        if i % 10 == 9 || bytes.len() > 4096 {
            wait_until("the daemon read them", Duration::from_secs(5), || received() == i as u64 + 1);
        }
    }
    wait_until("every datagram read", Duration::from_secs(5), || received() == total as u64);
    std::thread::sleep(Duration::from_millis(300));
    let m = p.get_metrics().unwrap();
    assert!(d.alive(), "the daemon died:\n{}", d.log_text());
    assert_eq!(get_u64(&m, "osc_rejected"), total as u64, "every one rejected, each once");
    assert_eq!(get_u64(&m, "control_received"), 0, "nothing changed");
    assert_eq!(get_u64(&m, "underruns"), 0);
    assert_eq!(p.frequency().unwrap(), 440.0);
    // Logged at most 10 a second, with the count of the rest (said within a second or so,
    // even with nothing more arriving).
    wait_until("the count of the lines not logged", Duration::from_secs(3), || {
        d.log_text().contains("more OSC messages were not logged")
    });
    let log = d.log_text();
    let rejected_lines = log.lines().filter(|l| l.contains("rejected:")).count();
    assert!(rejected_lines < 200, "{rejected_lines} log lines for {total} bad datagrams");
    assert!(d.stop().success());
    // The tone, untouched.
    let cfg = audiowarden::Config::default();
    common::assert_matches_reference(&wav.path, &cfg, &[], false);
}

#[test]
fn nobody_is_refused_by_the_unix_socket_and_group_audio_gets_through() {
    let bus = PrivateBus::start();
    let dir = OpenDir::new("osc-perm");
    let sock = dir.0.join("osc.sock");
    let mut d = Daemon::start(&bus, "osc-perm", &["--osc-socket", sock.to_str().unwrap()]);
    let conn = bus.connection();
    let p = proxy(&conn);
    let url = format!("osc.unix://{}", sock.display());
    let as_nobody = |groups: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup"]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.arg(format!("--groups={groups}"));
        }
        c.args(["oscsend", &url, "/engine/frequency", "f", "500"]).output().unwrap()
    };
    let out = as_nobody("");
    assert!(!out.status.success(), "nobody could send: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(get_u64(&p.get_metrics().unwrap(), "osc_received"), 0);
    assert_eq!(p.frequency().unwrap(), 440.0);
    // In group audio, nobody may.
    let out = as_nobody("audio");
    assert!(out.status.success(), "{out:?}");
    wait_until("500 Hz from group audio", Duration::from_secs(5), || p.frequency().unwrap() == 500.0);
    assert!(d.log_text().contains("OSC /engine/frequency 500 from uid 65534"), "{}", d.log_text());
    assert!(d.stop().success());
}

fn status_reply(reply: &[u8]) -> Vec<OscType> {
    match rosc::decoder::decode_udp(reply).unwrap().1 {
        OscPacket::Message(m) => {
            assert_eq!(m.addr, "/engine/status");
            m.args
        }
        p => panic!("not a message: {p:?}"),
    }
}

#[test]
fn a_status_query_is_answered_to_the_sender_and_errors_too() {
    let bus = PrivateBus::start();
    let dir = OpenDir::new("osc-status");
    let sock = dir.0.join("osc.sock");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut d = Daemon::start(
        &bus,
        "osc-status",
        &["--osc-socket", sock.to_str().unwrap(), "--osc-listen", &listen, "--frequency", "330"],
    );
    let mut buf = [0u8; 1024];
    // UDP: the answer goes back to the sender's address.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp.send_to(&encode("/engine/status", vec![]), &listen).unwrap();
    let n = udp.recv(&mut buf).expect("a status answer over UDP");
    let args = status_reply(&buf[..n]);
    assert_eq!(args[0], OscType::String("running".into()));
    assert_eq!(args[1], OscType::Double(330.0));
    assert_eq!(args[2], OscType::Double(0.25));
    assert_eq!(args[3], OscType::Bool(true), "standby ready");
    assert_eq!(args[4], OscType::Long(0), "underruns");
    // AF_UNIX: to a client that bound an address of its own.
    let client_path = dir.0.join("client.sock");
    let client = UnixDatagram::bind(&client_path).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.send_to(&encode("/engine/status", vec![]), &sock).unwrap();
    let n = client.recv(&mut buf).expect("a status answer over AF_UNIX");
    assert_eq!(status_reply(&buf[..n])[1], OscType::Double(330.0));
    // A bad value: an error answer naming the range.
    client.send_to(&encode("/engine/gain", vec![OscType::Float(2.0)]), &sock).unwrap();
    let n = client.recv(&mut buf).expect("an error answer");
    match rosc::decoder::decode_udp(&buf[..n]).unwrap().1 {
        OscPacket::Message(m) => {
            assert_eq!(m.addr, "/engine/error");
            assert_eq!(m.args[0], OscType::String("/engine/gain".into()));
            assert!(matches!(&m.args[1], OscType::String(s) if s.contains("0 <= g <= 1")), "{:?}", m.args);
        }
        p => panic!("{p:?}"),
    }
    // A sender that swaps its bound path for a symlink to someone else's socket: no answer
    // goes there (the kernel still reports the old name).
    let victim_path = dir.0.join("victim.sock");
    let victim = UnixDatagram::bind(&victim_path).unwrap();
    victim.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let swapped_path = dir.0.join("swapped.sock");
    let swapped = UnixDatagram::bind(&swapped_path).unwrap();
    std::fs::remove_file(&swapped_path).unwrap();
    std::os::unix::fs::symlink(&victim_path, &swapped_path).unwrap();
    swapped.send_to(&encode("/engine/status", vec![]), &sock).unwrap();
    assert!(victim.recv(&mut buf).is_err(), "an answer was aimed through the symlink at another socket");
    let conn = bus.connection();
    let m = proxy(&conn).get_metrics().unwrap();
    assert_eq!(get_u64(&m, "osc_received"), 4);
    assert_eq!(get_u64(&m, "osc_replies"), 2);
    assert_eq!(get_u64(&m, "osc_rejected"), 1);
    assert!(d.stop().success());
    let _ = std::fs::remove_file(Path::new(&client_path));
}

/// A flood of valid changes with long blocks (4096 frames: each waits about a second for its
/// frame) fills the workers' control rings: the excess is Busy, which over OSC is a dropped,
/// counted message (`osc_dropped`, `control_busy`) with an `/engine/error` answer where the
/// sender can take one; every datagram is accounted for, no worker is replaced, and what was
/// accepted is all played.
#[test]
fn a_flood_that_fills_the_control_rings_is_dropped_and_counted() {
    let bus = PrivateBus::start();
    let dir = OpenDir::new("osc-busy");
    let sock = dir.0.join("osc.sock");
    let mut d = Daemon::start(&bus, "osc-busy", &["--osc-socket", sock.to_str().unwrap(), "--block-frames", "4096"]);
    let conn = bus.connection();
    let p = proxy(&conn);
    let client_path = dir.0.join("client.sock");
    let client = UnixDatagram::bind(&client_path).unwrap();
    // Blocking sends: the kernel holds a sender back while the daemon's queue is full, so no
    // datagram is lost on the way and each one must show up in the counts.
    const N: u64 = 8000;
    for i in 0..N {
        let hz = 100.0 + (i % 1000) as f32;
        client.send_to(&encode("/engine/frequency", vec![OscType::Float(hz)]), &sock).unwrap();
    }
    let m = |k: &str| get_u64(&p.get_metrics().unwrap(), k);
    wait_until("every datagram counted", Duration::from_secs(10), || m("osc_received") == N);
    let dropped = m("osc_dropped");
    assert!(dropped > 0, "8000 changes in a row never filled a ring:\n{}", d.log_text());
    assert_eq!(m("osc_rejected"), 0, "valid changes are not rejected");
    assert_eq!(m("control_busy"), dropped, "each drop is a Busy");
    let accepted = N - dropped;
    assert_eq!(m("control_received"), accepted);
    // The sender heard why (rate-limited answers: at least one).
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = client.recv(&mut buf).expect("an /engine/error answer");
    match rosc::decoder::decode_udp(&buf[..n]).unwrap().1 {
        OscPacket::Message(msg) => {
            assert_eq!(msg.addr, "/engine/error");
            assert!(matches!(&msg.args[1], OscType::String(s) if s.contains("busy")), "{:?}", msg.args);
        }
        other => panic!("{other:?}"),
    }
    // Every accepted change is heard once the output passes its frame.
    wait_until("every accepted change played", Duration::from_secs(10), || {
        m("control_applied") + m("control_coalesced") == accepted
    });
    let metrics = p.get_metrics().unwrap();
    assert_eq!(get_u64(&metrics, "crash_count"), 0, "no worker replaced:\n{}", d.log_text());
    assert_eq!(get_u64(&metrics, "control_undelivered"), 0, "no worker missed a change");
    assert_eq!(get_u64(&metrics, "underruns"), 0);
    // The journal: a few lines a second, then the count of the rest (said with the next
    // message after the second: a status query here).
    client.send_to(&encode("/engine/status", vec![]), &sock).unwrap();
    wait_until("the count of the lines not logged", Duration::from_secs(5), || {
        d.log_text().contains("more OSC messages were not logged")
    });
    let lines = d.log_text().lines().filter(|l| l.contains("OSC /engine/frequency")).count();
    assert!(lines <= 100, "{lines} journal lines for {N} messages: not rate-limited");
    assert!(d.stop().success());
}
